"""Bidirectional Mamba mixer ("Vim v2") and the pre-norm Mamba block with its float32 residual stream."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        backend = self.backend_for(hidden)
        if backend == "triton":
            return self._forward_fused(hidden)
        if backend == "parallel":
            return self._forward_stacked(hidden)
        xz = self.in_proj(hidden).transpose(1, 2)  # b, 2d, L
        x, z = xz.chunk(2, dim=1)
        y = self._scan(x, z, "", backend)
        y = y + self._scan(x.flip(-1), z.flip(-1), "_b", backend).flip(-1)
        return self.out_proj(y.transpose(1, 2))

    def _scan(self, x, z, suffix: str, backend: str) -> torch.Tensor:
        """One direction: causal conv + SiLU, input-dependent (dt, B, C), selective scan, D skip, SiLU(z) gate."""
        conv, x_proj, dt_proj = (getattr(self, n + suffix) for n in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = (self.A_log, self.D) if suffix == "" else (self.A_b_log, self.D_b)
        with layer_weights(conv, x) as (conv_w, conv_b):
            x = ops.causal_conv1d(x.contiguous(), conv_w.squeeze(1), conv_b, backend)
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        with layer_weights(dt_proj, dt, wide(x.dtype)) as (dt_w, dt_b):
            delta = F.linear(dt, dt_w).transpose(1, 2)
            scan = ops.SCANS[backend]
            return scan(x, delta.contiguous(), -torch.exp(widen(A_log, x)), B.transpose(1, 2).contiguous(),
                        C.transpose(1, 2).contiguous(), widen(D, x), z.contiguous(),
                        delta_bias=dt_b, delta_softplus=True)

    def _forward_stacked(self, hidden: torch.Tensor) -> torch.Tensor:
        """Both directions as one problem (direction, batch, ...): one grouped conv, batched projections, one scan."""
        b, length = hidden.shape[:2]
        d, split = self.d_inner, [self.dt_rank, self.d_state, self.d_state]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # b, d, L
        pair = lambda fwd, bwd: torch.stack([fwd, bwd])[:, None]  # noqa: E731  (direction, 1, ...)
        f = lambda t: widen(t, x)  # noqa: E731  (A, D: float32 on x's device)
        with layer_weights(self.conv1d, x) as (cw, cb), layer_weights(self.conv1d_b, x) as (cw_b, cb_b):
            conv = ops.causal_conv1d(torch.cat([x, x.flip(-1)], dim=1), torch.cat([cw, cw_b]).squeeze(1),
                                     torch.cat([cb, cb_b]), "torch")
        xs = conv.view(b, 2, d, length).transpose(0, 1)  # 2, b, d, L: the backward one on the reversed sequence
        with layer_weights(self.x_proj, x) as (x_w, _), layer_weights(self.x_proj_b, x) as (x_w_b, _):
            dt, B, C = torch.matmul(pair(x_w, x_w_b), xs).split(split, dim=2)
        with layer_weights(self.dt_proj, x, wide(x.dtype)) as (dt_w, dt_b), \
                layer_weights(self.dt_proj_b, x, wide(x.dtype)) as (dt_w_b, dt_b_b):
            delta = F.softplus(widen(torch.matmul(pair(dt_w, dt_w_b), dt)) + pair(dt_b, dt_b_b)[..., None])  # 2, b, d, L
        A = -torch.exp(pair(f(self.A_log), f(self.A_b_log)))
        y = ops.selective_scan_parallel(xs, delta, A, B, C, pair(f(self.D), f(self.D_b)))
        return self.out_proj(((y[0] + y[1].flip(-1)) * F.silu(z)).transpose(1, 2))  # the gate shared by both

    def _forward_fused(self, hidden: torch.Tensor) -> torch.Tensor:
        """Both directions without flips or transposed copies: one bidirectional conv and one fused scan launch."""
        from .ops.triton_scan import bidirectional_conv1d_silu, bidirectional_selective_scan_triton

        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # b, d, L views of (b, L, 2d)
        f = lambda t: widen(t, x)  # noqa: E731  (A, D: float32 on x's device)
        with layer_weights(self.conv1d, x) as (cw, cb), layer_weights(self.conv1d_b, x) as (cw_b, cb_b):
            x_f, x_b = bidirectional_conv1d_silu(x, cw.squeeze(1), cb, cw_b.squeeze(1), cb_b)
        split = [self.dt_rank, self.d_state, self.d_state]
        dt_f, B_f, C_f = self.x_proj(x_f.transpose(1, 2)).split(split, dim=-1)
        dt_b, B_b, C_b = self.x_proj_b(x_b.transpose(1, 2)).split(split, dim=-1)
        t = lambda v: v.transpose(1, 2)  # noqa: E731  (b, L, c) -> (b, c, L) view
        with layer_weights(self.dt_proj, x, wide(x.dtype)) as (w_f, bias_f), \
                layer_weights(self.dt_proj_b, x, wide(x.dtype)) as (w_b, bias_b):
            y = bidirectional_selective_scan_triton(
                x_f, x_b, t(F.linear(dt_f, w_f)), t(F.linear(dt_b, w_b)), -torch.exp(f(self.A_log)),
                -torch.exp(f(self.A_b_log)), t(B_f), t(B_b), t(C_f), t(C_b), f(self.D), f(self.D_b), z, bias_f,
                bias_b)
        return self.out_proj(y.transpose(1, 2))


class MambaBlock(nn.Module):
    """Pre-norm Mamba block: residual = residual + x (float32), returns (Mixer(RMSNorm(residual)), residual)."""

    def __init__(self, d_model: int, *, dtype=None, device=None, **mixer_kw):
        super().__init__()
        self.norm = RMSNorm(d_model, dtype=table_dtype(dtype), device=device)
        self.mixer = BiMambaMixer(d_model, dtype=dtype, device=device, **mixer_kw)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        residual = widen(x) if residual is None else residual + widen(x)
        return self.mixer(self.norm(residual).to(x.dtype)), residual
