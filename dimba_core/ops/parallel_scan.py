"""Selective scan as a parallel (log-depth) scan in plain PyTorch: the `parallel` backend for any device.

Same contract as selective_scan_ref (.selective_scan), plus leading batch dimensions, so that both
directions of the bidirectional mixer go through one call: u, delta, z: (..., d, L); B, C: (..., n, L);
A: (..., d, n); D, delta_bias: (..., d); all broadcast against each other like numpy arrays.

The sequence is cut into blocks of T positions, T chosen so that one (..., T, d, n) state tensor holds
about BLOCK_ELEMENTS numbers: memory is bounded by the block whatever L is (about three such tensors
live at once). Inside a block the recurrence h_t = a_t h_{t-1} + b_t, with a_t = exp(delta_t A) <= 1 and
b_t = delta_t B_t u_t, is solved in three stages over groups of GROUP (8) positions:
  1. each group is scanned sequentially (GROUP - 1 fused multiply-adds on 1/GROUP of the block, all
     groups at once) and the decays' running products inside each group are taken (one cumprod);
  2. the groups' end states are scanned by doubling (Hillis-Steele): after the step with offset k every
     group holds the composition of its last 2k groups, h_g <- h_g + a_g h_{g-k}, a_g <- a_g a_{g-k};
  3. every position adds (decays since its group's start) x (state before its group).
That is about 3 log2(T / GROUP) + GROUP + 8 ops a block and about 20 passes over the block's state (doubling
over all T positions, used for a ragged last block, needs about 60). Only decays <= 1 are multiplied (no
logs, no division), so it is as stable as the naive loop and underflows to 0 where that does. The state
carried from the previous block enters as the state before the first group. State and arithmetic are
float32 (float64 for float64 inputs). Autograd works through it: while gradients are recorded every op is
out of place and each block is checkpointed (training memory stays about one block too).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .selective_scan import _finish, _prepare

BLOCK_ELEMENTS = 1 << 25  # numbers in one (..., T, d, n) state tensor of a block (128 MiB in float32)
GROUP = 8  # positions scanned one after another inside a block before the doubling runs over the groups


def block_length(state_per_position: int, length: int) -> int:
    """Positions in one block: as many as BLOCK_ELEMENTS allows, a multiple of GROUP (at least 2 GROUPs)."""
    return max(1, min(length, max(2 * GROUP, BLOCK_ELEMENTS // max(1, state_per_position) // GROUP * GROUP)))


def scan_block(a: torch.Tensor, b: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
    """All states h_t = a_t h_{t-1} + b_t of one block by doubling; carry: the state before it (..., 1, d, n).

    The step with offset k needs the decays only at positions t >= k, so they are kept as a shrinking tail
    (a[i] is the product of the k decays ending at position k + i). While autograd records (or a compiler
    traces), every op is out of place; otherwise h ping-pongs between two buffers (one fused multiply-add a
    step, no temporaries).
    """
    grad, h, k = torch.is_grad_enabled() or torch.compiler.is_compiling(), b, 1  # compilers plan memory themselves
    if carry is not None and grad:  # h_0 = b_0 + a_0 carry
        h = torch.cat([torch.addcmul(b[..., :1, :, :], a[..., :1, :, :], carry), b[..., 1:, :, :]], dim=-3)
    elif carry is not None:
        h[..., :1, :, :].addcmul_(a[..., :1, :, :], carry)
    a, spare = a[..., 1:, :, :], None
    while k < h.shape[-3]:
        if grad:
            h = torch.cat([h[..., :k, :, :], torch.addcmul(h[..., k:, :, :], a, h[..., :-k, :, :])], dim=-3)
        else:
            spare = torch.empty_like(h) if spare is None else spare
            torch.addcmul(h[..., k:, :, :], a, h[..., :-k, :, :], out=spare[..., k:, :, :])
            spare[..., :k, :, :] = h[..., :k, :, :]
            h, spare = spare, h
        if 2 * k < h.shape[-3]:
            a = a[..., k:, :, :] * a[..., :-k, :, :]
        k *= 2
    return h


def grouped_scan(a: torch.Tensor, b: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
    """Like scan_block, with T a multiple of GROUP: a short sequential scan inside groups of GROUP positions (all
    groups at once), doubling over the groups' end states only, then each position adds (its decays since the
    group start) x (the state before its group). Same op count as doubling over T, about a third of the traffic.
    """
    grad = torch.is_grad_enabled() or torch.compiler.is_compiling()
    a, b = a.unflatten(-3, (-1, GROUP)), b.unflatten(-3, (-1, GROUP))  # ..., G, GROUP, d, n
    if grad:
        hs = [b[..., 0, :, :]]
        for j in range(1, GROUP):
            hs.append(torch.addcmul(b[..., j, :, :], a[..., j, :, :], hs[-1]))
        h = torch.stack(hs, dim=-3)
    else:  # b is a fresh tensor: scan it in place
        h = b
        for j in range(1, GROUP):
            h[..., j, :, :].addcmul_(a[..., j, :, :], h[..., j - 1, :, :])
    decay = torch.cumprod(a, dim=-3)  # products of decays <= 1 since each group's start
    ends = scan_block(decay[..., -1, :, :], h[..., -1, :, :].clone(), carry)  # state at each group's end
    start = ends[..., :-1, :, :]
    if carry is not None:
        before = torch.cat([carry, start], dim=-3)
    else:
        before = torch.cat([torch.zeros_like(ends[..., :1, :, :]), start], dim=-3)
    h = torch.addcmul(h, decay, before.unsqueeze(-3)) if grad else h.addcmul_(decay, before.unsqueeze(-3))
    return h.flatten(-4, -3)


def _block(delta, u, A, B, C, carry):
    """One block: decays and inputs (..., T, d, n), the scan, the read-out C.h and the last state."""
    scan = grouped_scan if delta.shape[-3] % GROUP == 0 else scan_block
    h = scan((delta * A).exp_(), delta * u * B, carry)
    return torch.matmul(h, C), h[..., -1:, :, :].clone()


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            block_len: int | None = None):
    """Parallel selective scan: blocks of block_len positions (default: from BLOCK_ELEMENTS), doubling inside."""
    out_dtype = u.dtype
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    dtype, length = u.dtype, u.shape[-1]
    A = A.to(dtype).unsqueeze(-3)  # ..., 1, d, n
    batch = torch.broadcast_shapes(u.shape[:-2], A.shape[:-3], B.shape[:-2], C.shape[:-2])
    # time-major inside each batch entry: ..., L, d, 1 (decay, input) and ..., L, 1, n / ..., L, n, 1 (B, C)
    delta_t, u_t = delta.transpose(-1, -2).unsqueeze(-1), u.transpose(-1, -2).unsqueeze(-1)
    B_t = B.to(dtype).transpose(-1, -2).unsqueeze(-2)
    C_t = C.to(dtype).transpose(-1, -2).contiguous().unsqueeze(-1)
    T = block_len or block_length(math.prod(batch) * A.shape[-2] * A.shape[-1], length)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (delta_t, u_t, A, B_t, C_t))
    ys, carry = [], None
    for start in range(0, length, T):
        part = slice(start, min(start + T, length))
        args = (delta_t[..., part, :, :], u_t[..., part, :, :], A, B_t[..., part, :, :], C_t[..., part, :, :])
        if grad:  # keep only the block's inputs for backward; recompute the rest
            y, carry = checkpoint(_block, *args, carry, use_reentrant=False)
        else:
            y, carry = _block(*args, carry)
        ys.append(y)
    y = torch.cat(ys, dim=-3).squeeze(-1).transpose(-1, -2)  # ..., d, L
    return _finish(y, u, D, z, out_dtype)
