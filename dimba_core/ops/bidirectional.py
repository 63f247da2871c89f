"""The bidirectional Mamba mixer's core on each scan backend: one interface, (x, z, weights) -> gated y.

Each function takes x and z (batch, d, L) from the mixer's input projection and both directions' weights
(`MixerWeights`), runs causal conv + SiLU, the input-dependent (dt, B, C) projection, delta, the selective scan
and the D skip left to right and (on the reversed sequence) right to left, and returns
(y_fwd + y_bwd) * silu(z) in x's dtype, (batch, d, L).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dtypes import widen
from .causal_conv1d import causal_conv1d_cuda, causal_conv1d_torch
from .parallel_scan import selective_scan_parallel
from .selective_scan import selective_scan_cuda, selective_scan_ref, selective_scan_torch


class MixerWeights(NamedTuple):
    """Both directions' weights as the mixer reads them (each field: (forward, backward))."""

    conv: tuple  # (weight (d, 1, width), bias (d,)) per direction, in x's dtype
    x_proj: tuple  # weight (dt_rank + 2 n, d), in x's dtype
    dt_proj: tuple  # (weight (d, dt_rank) in x's dtype, bias (d,) float32)
    A: tuple  # -exp(A_log), (d, n), float32
    D: tuple  # (d,), float32
    dt_rank: int
    d_state: int


SCANS = {"cuda": selective_scan_cuda, "torch": selective_scan_torch, "ref": selective_scan_ref}


def causal_conv1d(x, weight, bias, backend: str):
    """Causal depthwise conv + SiLU on the fastest path the backend allows (under torch.compile the PyTorch one,
    which inductor fuses, since dynamo cannot trace causal-conv1d's extension)."""
    from . import has_causal_conv1d

    if backend == "cuda" and has_causal_conv1d() and not torch.compiler.is_compiling():
        return causal_conv1d_cuda(x, weight, bias)
    return causal_conv1d_torch(x, weight, bias)


def _direction(x, z, w: MixerWeights, i: int, backend: str) -> torch.Tensor:
    """One direction (i = 0 forward, 1 on the reversed x and z) with the backend's conv and scan."""
    (conv_w, conv_b), x_w, (dt_w, dt_b) = w.conv[i], w.x_proj[i], w.dt_proj[i]
    x = causal_conv1d(x.contiguous(), conv_w.squeeze(1), conv_b, backend)
    dt, B, C = F.linear(x.transpose(1, 2), x_w).split([w.dt_rank, w.d_state, w.d_state], dim=-1)
    delta = F.linear(dt, dt_w).transpose(1, 2)
    return SCANS[backend](x, delta.contiguous(), w.A[i], B.transpose(1, 2).contiguous(),
                          C.transpose(1, 2).contiguous(), w.D[i], z.contiguous(), delta_bias=dt_b,
                          delta_softplus=True)


def two_scans(x, z, w: MixerWeights, backend: str) -> torch.Tensor:
    """`cuda`, `torch`, `ref`: a scan per direction, the backward one on flipped copies (as the reference)."""
    y = _direction(x, z, w, 0, backend)
    return y + _direction(x.flip(-1), z.flip(-1), w, 1, backend).flip(-1)


def stacked(x, z, w: MixerWeights, backend: str = "parallel") -> torch.Tensor:
    """`parallel`: both directions as one problem (direction, batch, ...): one grouped conv, batched projections,
    one log-depth scan, the shared gate applied once after the sum."""
    b, d, length = x.shape
    pair = lambda fwd, bwd: torch.stack([fwd, bwd])[:, None]  # noqa: E731  (direction, 1, ...)
    (cw, cb), (cw_b, cb_b) = w.conv
    conv = causal_conv1d(torch.cat([x, x.flip(-1)], dim=1), torch.cat([cw, cw_b]).squeeze(1), torch.cat([cb, cb_b]),
                         "torch")
    xs = conv.view(b, 2, d, length).transpose(0, 1)  # 2, b, d, L: the backward one on the reversed sequence
    dt, B, C = torch.matmul(pair(*w.x_proj), xs).split([w.dt_rank, w.d_state, w.d_state], dim=2)
    (dt_w, dt_b), (dt_w_b, dt_b_b) = w.dt_proj
    delta = F.softplus(widen(torch.matmul(pair(dt_w, dt_w_b), dt)) + pair(dt_b, dt_b_b)[..., None])  # 2, b, d, L
    y = selective_scan_parallel(xs, delta, pair(*w.A), B, C, pair(*w.D))
    return (y[0] + y[1].flip(-1)) * F.silu(z)


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """A new dense (batch, d, L) tensor: channels-last memory when x is a channels-last view, else contiguous."""
    b, d, length = x.shape
    if x.stride(1) < x.stride(2):
        return x.new_empty(b, length, d).transpose(1, 2)
    return x.new_empty(b, d, length)


def _triton_kernels():
    """The fused Triton conv and scan (importing .triton_scan imports triton)."""
    from .triton_scan import bidirectional_conv1d_silu, bidirectional_selective_scan_triton

    return bidirectional_conv1d_silu, bidirectional_selective_scan_triton


def fused(x, z, w: MixerWeights, backend: str = "triton") -> torch.Tensor:
    """`triton`: one bidirectional conv and one fused scan launch, no flips or transposed copies. Inside
    torch.compile the two kernels are the opaque ops `dimba::triton_bidirectional_conv` / `_scan`."""
    if torch.compiler.is_compiling():
        conv_silu, scan = torch.ops.dimba.triton_bidirectional_conv, torch.ops.dimba.triton_bidirectional_scan
    else:
        conv_silu, scan = _triton_kernels()
    (cw, cb), (cw_b, cb_b) = w.conv
    x_f, x_b = conv_silu(x, cw.squeeze(1), cb, cw_b.squeeze(1), cb_b)
    split = [w.dt_rank, w.d_state, w.d_state]
    dt_f, B_f, C_f = F.linear(x_f.transpose(1, 2), w.x_proj[0]).split(split, dim=-1)
    dt_b, B_b, C_b = F.linear(x_b.transpose(1, 2), w.x_proj[1]).split(split, dim=-1)
    (w_f, bias_f), (w_b, bias_b) = w.dt_proj
    t = lambda v: v.transpose(1, 2)  # noqa: E731  (b, L, c) -> (b, c, L) view
    return scan(x_f, x_b, t(F.linear(dt_f, w_f)), t(F.linear(dt_b, w_b)), *w.A, t(B_f), t(B_b), t(C_f), t(C_b), *w.D,
                z, bias_f, bias_b)


def _define_triton_ops():
    """The fused Triton kernels as custom ops for torch.compile (forward only, as the backend), once per process.
    Their fake functions give the layouts the kernels allocate, so inductor plans the same strides."""
    if hasattr(torch.ops.dimba, "triton_bidirectional_scan") or not hasattr(torch.library, "custom_op"):
        return

    @torch.library.custom_op("dimba::triton_bidirectional_conv", mutates_args=())
    def triton_bidirectional_conv(x: Tensor, w_f: Tensor, b_f: Optional[Tensor], w_b: Tensor,
                                  b_b: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return _triton_kernels()[0](x, w_f, b_f, w_b, b_b)

    @triton_bidirectional_conv.register_fake
    def _(x, w_f, b_f, w_b, b_b):
        return empty_like_layout(x), empty_like_layout(x)

    @torch.library.custom_op("dimba::triton_bidirectional_scan", mutates_args=())
    def triton_bidirectional_scan(x_f: Tensor, x_b: Tensor, delta_f: Tensor, delta_b: Tensor, A_f: Tensor, A_b: Tensor,
                                  B_f: Tensor, B_b: Tensor, C_f: Tensor, C_b: Tensor, D_f: Tensor, D_b: Tensor,
                                  z: Tensor, delta_bias_f: Tensor, delta_bias_b: Tensor) -> Tensor:
        return _triton_kernels()[1](x_f, x_b, delta_f, delta_b, A_f, A_b, B_f, B_b, C_f, C_b, D_f, D_b, z,
                                    delta_bias_f, delta_bias_b)

    @triton_bidirectional_scan.register_fake
    def _(x_f, x_b, *args):
        return empty_like_layout(x_f if x_f.stride() == x_b.stride() else x_f.contiguous())


_define_triton_ops()


BIDIRECTIONAL = {"cuda": two_scans, "torch": two_scans, "ref": two_scans, "parallel": stacked, "triton": fused}
