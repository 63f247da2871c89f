"""Selective scan (Mamba's S6 recurrence): a naive reference, a fast pure-PyTorch scan, the CUDA kernel.

All three take mamba-ssm's layout: u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L);
D, delta_bias: (dim,). They compute, in float32 (float64 for float64 inputs),
    h_l = exp(delta_l * A) * h_{l-1} + delta_l * B_l * u_l,   y_l = C_l . h_l + D * u_l,
and return y * silu(z) (when z is given) in the dtype of u.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _prepare(u, delta, delta_bias, delta_softplus):
    """Upcast u and delta to (at least) float32 and apply the bias and softplus to delta."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _finish(y, u, D, z, out_dtype):
    """Add the D skip, gate by silu(z) and cast back."""
    if D is not None:
        y = y + u * D[..., None].to(u.dtype)
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Naive scan: exp(delta A) and delta B u for all steps, then one Python step per position."""
    out_dtype = u.dtype
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    A, B, C = A.to(u.dtype), B.to(u.dtype), C.to(u.dtype)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_bu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        h = delta_a[:, :, i] * h + delta_bu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    return _finish(torch.stack(ys, dim=2), u, D, z, out_dtype)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         chunk_size: int = 128):
    """Chunked scan: time-major, one fused multiply-add per step, memory bounded by one chunk.

    Only positive decays exp(delta A) <= 1 are multiplied, so it is as stable as the naive loop,
    while each step is a single contiguous addcmul and the read-out C.h is one batched matmul per chunk.
    """
    out_dtype = u.dtype
    u, delta = _prepare(u, delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    n = A.shape[1]
    A = A.to(u.dtype)
    delta_t = delta.permute(2, 0, 1)  # L, b, d
    delta_u = (delta * u).permute(2, 0, 1)  # L, b, d
    B_t = B.to(u.dtype).permute(2, 0, 1)  # L, b, n
    C_t = C.to(u.dtype).permute(2, 0, 1).unsqueeze(-1)  # L, b, n, 1
    y = u.new_empty(length, batch, dim)
    h = u.new_zeros(batch, dim, n)
    chunk = min(chunk_size, length)
    decay_buf = u.new_empty(chunk, batch, dim, n)  # reused: no fresh pages per chunk
    hs_buf = u.new_empty(chunk, batch, dim, n)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        decay, hs = decay_buf[: end - start], hs_buf[: end - start]
        torch.mul(delta_t[start:end, :, :, None], A, out=decay).exp_()
        torch.mul(delta_u[start:end, :, :, None], B_t[start:end, :, None, :], out=hs)
        torch.addcmul(hs[0], decay[0], h, out=hs[0])
        for t in range(1, end - start):
            torch.addcmul(hs[t], decay[t], hs[t - 1], out=hs[t])
        h = hs[-1].clone()
        torch.matmul(hs, C_t[start:end], out=y[start:end].unsqueeze(-1))
    return _finish(y.permute(1, 2, 0), u, D, z, out_dtype)


def _mamba_scan_fn():
    """mamba-ssm's selective_scan_fn (imported lazily)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


class _Saved:
    """A stand-in autograd context: holds what an autograd.Function's forward saves for its backward."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _mamba_scan_vjp(grad, inputs, delta_softplus):
    """Gradients of mamba-ssm's scan for `inputs` (u, delta, A, B, C, D, z, delta_bias): its autograd.Function's
    forward (a recompute) and backward kernels called directly, since custom-op kernels run below autograd."""
    from mamba_ssm.ops.selective_scan_interface import SelectiveScanFn

    ctx = _Saved()
    SelectiveScanFn.forward(ctx, *inputs, delta_softplus)
    return SelectiveScanFn.backward(ctx, grad)[:len(inputs)]


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's fused CUDA kernel. Inside torch.compile it is the opaque op `dimba::mamba_scan` (dynamo cannot
    trace the kernel's C++ extension), so fullgraph capture, inductor and CUDA graphs work around it."""
    if torch.compiler.is_compiling() and D is not None and z is not None and delta_bias is not None:
        return torch.ops.dimba.mamba_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _mamba_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _define_mamba_scan_ops():
    """`dimba::mamba_scan` and its backward `dimba::mamba_scan_backward` (mamba-ssm's kernels), once per process."""
    if hasattr(torch.ops.dimba, "mamba_scan") or not hasattr(torch.library, "custom_op"):
        return
    tensors = 8  # u, delta, A, B, C, D, z, delta_bias; then delta_softplus

    @torch.library.custom_op("dimba::mamba_scan", mutates_args=())
    def mamba_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor,
                   delta_softplus: bool) -> Tensor:
        return _mamba_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus).contiguous()

    @torch.library.custom_op("dimba::mamba_scan_backward", mutates_args=())
    def mamba_scan_backward(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                            z: Tensor, delta_bias: Tensor, delta_softplus: bool) -> list[Tensor]:
        grads = _mamba_scan_vjp(grad.contiguous(), (u, delta, A, B, C, D, z, delta_bias), delta_softplus)
        return [g.contiguous() for g in grads]

    @mamba_scan.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return u.new_empty(u.shape)

    @mamba_scan_backward.register_fake
    def _(grad, *args):
        return [t.new_empty(t.shape) for t in args[:tensors]]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.delta_softplus = inputs[-1]

    def backward(ctx, grad):
        return (*torch.ops.dimba.mamba_scan_backward(grad, *ctx.saved_tensors, ctx.delta_softplus), None)

    mamba_scan.register_autograd(backward, setup_context=setup_context)


_define_mamba_scan_ops()
