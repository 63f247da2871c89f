"""Bidirectional Mamba mixer ("Vim v2") and the pre-norm Mamba block with its float32 residual stream."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import ops
from .dtypes import cast_to, table_dtype, wide, widen


def layer_weights(layer: nn.Module, like: torch.Tensor, bias_dtype: torch.dtype | None = None):
    """A context manager giving (weight, bias) of a layer whose weights the forward reads directly, in like's
    dtype (the bias in `bias_dtype` if given) on like's device, valid until the context exits.

    A layer from an operations namespace may supply them itself through a `cast_weights(like, bias_dtype)`
    method returning such a context manager: ComfyUI's layers do, so that their LoRA and low-VRAM weight patches
    apply here too and streamed weights are released after their last use (inside the `with` block).
    """
    hook = getattr(layer, "cast_weights", None)
    if hook is not None:
        return hook(like, bias_dtype)
    return contextlib.nullcontext((cast_to(layer.weight, like), cast_to(layer.bias, like, bias_dtype)))


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 (eps 1e-5, weight only)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = widen(x)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * cast_to(self.weight, x)


SSM_KEYS = ("A_log", "A_b_log", "D", "D_b", "dt_proj.weight", "dt_proj.bias", "dt_proj_b.weight", "dt_proj_b.bias")


def _ssm_dtype_on_load(mixer, state_dict, prefix, *args):
    """Load pre-hook: the SSM tensors a state dict brings, in the mixer's SSM dtype (float32, float64 for a
    float64 model), whatever the file stores and however the layers receive them (copy, assign, lazy init)."""
    ssm = mixer.A_log.dtype
    for name in SSM_KEYS:
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != ssm:
            state_dict[prefix + name] = t.to(ssm)


class BiMambaMixer(nn.Module):
    """Mamba selective-SSM mixer scanning the sequence both ways; out = out_proj(y_fwd + y_bwd)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, backend: str = "auto", *, operations=nn, dtype=None, device=None):
        super().__init__()
        dd = {"dtype": dtype, "device": device}
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend = ops.check_backend(backend)
        self.in_proj = operations.Linear(d_model, 2 * self.d_inner, bias=False, **dd)
        self.out_proj = operations.Linear(self.d_inner, d_model, bias=False, **dd)
        # The SSM parameters (A, D and the delta projection with its bias) are float32 whatever the weight
        # dtype: they sit in exp/softplus, where half or 8-bit rounding would shift every step size (the CUDA
        # kernels read A, D and the bias as float32 anyway). The delta projection is built as a float32 layer
        # (a few MB at Dimba-L) rather than converted after construction, so layers that an operations
        # namespace creates empty and fills at load time get the same dtype; `_ssm_dtype_on_load` casts what a
        # state dict brings (a half-precision file, a load with assign=True).
        ssm = wide(dtype or torch.get_default_dtype())
        for suffix in ("", "_b"):  # forward and backward direction
            setattr(self, "conv1d" + suffix, operations.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, **dd))
            setattr(self, "x_proj" + suffix, operations.Linear(
                self.d_inner, self.dt_rank + 2 * d_state, bias=False, **dd))
            setattr(self, "dt_proj" + suffix, operations.Linear(self.dt_rank, self.d_inner, dtype=ssm,
                                                                 device=device))
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=ssm, device=device)).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(A_log)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(self.d_inner, dtype=ssm, device=device))
        self.D_b = nn.Parameter(torch.ones(self.d_inner, dtype=ssm, device=device))
        self.register_load_state_dict_pre_hook(_ssm_dtype_on_load)

    def backend_for(self, hidden: torch.Tensor) -> str:
        """The scan backend a forward on `hidden` runs (the setting resolved for its device and autograd)."""
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad
                                                                              for p in self.parameters()))
        return ops.resolve_backend(self.backend, hidden.device, needs_grad)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """in_proj -> both directions on the backend (ops.BIDIRECTIONAL), gated by silu(z) -> out_proj."""
        backend = self.backend_for(hidden)
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # b, d, L views of (b, L, 2d)
        if any(_hooked(getattr(self, name)) for name in DIRECT_LAYERS):
            return self.out_proj(self._through_layers(x, z, backend).transpose(1, 2))
        ssm = wide(x.dtype)
        with (layer_weights(self.conv1d, x) as conv, layer_weights(self.conv1d_b, x) as conv_b,
              layer_weights(self.x_proj, x) as (x_w, _), layer_weights(self.x_proj_b, x) as (x_w_b, _),
              layer_weights(self.dt_proj, x, ssm) as dt, layer_weights(self.dt_proj_b, x, ssm) as dt_b):
            weights = ops.MixerWeights(
                conv=(conv, conv_b), x_proj=(x_w, x_w_b), dt_proj=(dt, dt_b),
                A=(-torch.exp(widen(self.A_log, x)), -torch.exp(widen(self.A_b_log, x))),
                D=(widen(self.D, x), widen(self.D_b, x)), dt_rank=self.dt_rank, d_state=self.d_state)
            y = ops.BIDIRECTIONAL[backend](x, z, weights, backend)
        return self.out_proj(y.transpose(1, 2))

    def _through_layers(self, x, z, backend):
        """Both directions with conv1d, x_proj and dt_proj called as modules, for layers a host has hooked or whose
        forward it replaced (ComfyUI's bypass-mode adapters on newer versions): they then act on those layers too.
        The same function as the weight-reading path (the delta projection in float32, its bias given to the scan);
        used only while such a hook is on, with `parallel` standing in for `triton`."""
        scan = ops.SCANS.get(backend, ops.selective_scan_parallel)
        ssm, length, y = wide(x.dtype), x.shape[-1], 0
        for i, suffix in enumerate(("", "_b")):
            conv, x_proj, dt_proj = (getattr(self, name + suffix) for name in ("conv1d", "x_proj", "dt_proj"))
            A_log, D = getattr(self, ("A_log", "A_b_log")[i]), getattr(self, "D" + suffix)
            xi, zi = (x, z) if i == 0 else (x.flip(-1), z.flip(-1))
            xi = torch.nn.functional.silu(conv(xi.contiguous())[..., :length])
            dt, B, C = x_proj(xi.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            bias = cast_to(dt_proj.bias, dt, ssm)
            delta = (dt_proj(dt.to(dt_proj.weight.dtype)).to(ssm) - bias).to(x.dtype).transpose(1, 2)
            out = scan(xi, delta.contiguous(), -torch.exp(widen(A_log, x)), B.transpose(1, 2).contiguous(),
                       C.transpose(1, 2).contiguous(), widen(D, x), zi.contiguous(), delta_bias=bias,
                       delta_softplus=True)
            y = y + (out if i == 0 else out.flip(-1))
        return y


DIRECT_LAYERS = ("conv1d", "conv1d_b", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b")  # read by weight, not called


def _hooked(layer: nn.Module) -> bool:
    """Whether calling the layer would do more than its weights say: a forward replaced on the instance (ComfyUI's
    bypass adapters), or forward (pre-)hooks."""
    return "forward" in layer.__dict__ or bool(layer._forward_hooks) or bool(layer._forward_pre_hooks)


class MambaBlock(nn.Module):
    """Pre-norm Mamba block: residual = residual + x (float32), returns (Mixer(RMSNorm(residual)), residual)."""

    def __init__(self, d_model: int, *, dtype=None, device=None, **mixer_kw):
        super().__init__()
        self.norm = RMSNorm(d_model, dtype=table_dtype(dtype), device=device)
        self.mixer = BiMambaMixer(d_model, dtype=dtype, device=device, **mixer_kw)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        residual = widen(x) if residual is None else residual + widen(x)
        return self.mixer(self.norm(residual).to(x.dtype)), residual
