"""The bidirectional Mamba mixer's core on each scan backend: one interface, (x, z, weights) -> gated y.

Each function takes x and z (batch, d, L) from the mixer's input projection and both directions' weights
(`MixerWeights`), runs causal conv + SiLU, the input-dependent (dt, B, C) projection, delta, the selective scan
and the D skip left to right and (on the reversed sequence) right to left, and returns
(y_fwd + y_bwd) * silu(z) in x's dtype, (batch, d, L).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

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
    """Causal depthwise conv + SiLU on the fastest path the backend allows."""
    from . import has_causal_conv1d

    if backend == "cuda" and has_causal_conv1d():
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


def fused(x, z, w: MixerWeights, backend: str = "triton") -> torch.Tensor:
    """`triton`: one bidirectional conv and one fused scan launch, no flips or transposed copies."""
    from .triton_scan import bidirectional_conv1d_silu, bidirectional_selective_scan_triton

    (cw, cb), (cw_b, cb_b) = w.conv
    x_f, x_b = bidirectional_conv1d_silu(x, cw.squeeze(1), cb, cw_b.squeeze(1), cb_b)
    split = [w.dt_rank, w.d_state, w.d_state]
    dt_f, B_f, C_f = F.linear(x_f.transpose(1, 2), w.x_proj[0]).split(split, dim=-1)
    dt_b, B_b, C_b = F.linear(x_b.transpose(1, 2), w.x_proj[1]).split(split, dim=-1)
    (w_f, bias_f), (w_b, bias_b) = w.dt_proj
    t = lambda v: v.transpose(1, 2)  # noqa: E731  (b, L, c) -> (b, c, L) view
    return bidirectional_selective_scan_triton(
        x_f, x_b, t(F.linear(dt_f, w_f)), t(F.linear(dt_b, w_b)), *w.A, t(B_f), t(B_b), t(C_f), t(C_b), *w.D, z,
        bias_f, bias_b)


BIDIRECTIONAL = {"cuda": two_scans, "torch": two_scans, "ref": two_scans, "parallel": stacked, "triton": fused}
