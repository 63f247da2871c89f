"""Fused bidirectional selective scan and bidirectional depthwise conv in Triton (scan backend "triton").

The Dimba mixer runs Mamba's S6 scan twice per block: left to right on (x_f, delta_f, B_f, C_f) and right
to left on (x_b, delta_b, B_b, C_b), both gated by the same silu(z). The reference does the second one on
flipped copies with a second kernel; here one launch does both by indexing, with no flips or copies.
Per direction (all math in float32, inputs fp32/fp16/bf16, output in x's dtype):
    delta' = softplus(delta + delta_bias)        (torch's threshold: v if v > 20)
    h_l = exp(delta'_l A) h_{l-1} + delta'_l B_l x_l,    y_l = C_l . h_l + D x_l
    out = (y_fwd + y_bwd) * silu(z)

Layout: x, delta, z, out: (batch, d, L); B, C: (batch, n, L); A: (d, n); D, delta_bias: (d,). Any strides
are accepted (x_f/x_b, delta_f/delta_b, B/C pairs must share theirs), so the mixer passes the channels-last
views its linears produce ((batch, L, d) memory) without a single transpose copy.

The scan kernel: one program owns (batch b, BLOCK_D channels) for both directions, keeps the state h
(BLOCK_D, n) in registers and walks the sequence in chunks of BLOCK_L steps, each chunk a parallel
`tl.associative_scan` over (decay, input) pairs. Pass 1 runs right to left and stores the ungated y_bwd into
`out`; pass 2 runs left to right, adds y_fwd and stores (y_fwd + y_bwd) * silu(z). Each out element is
written and read by the same program only. Design notes, cost model, register counts and measurements:
NOTES.md.

The depthwise conv kernel computes both directions' SiLU(conv + bias) from one read of x: the forward
taps x[l-W+1..l] with w_f, the backward taps x[l..l+W-1] with w_b reversed (what a causal conv on the
flipped sequence computes, flipped back).

Triton is imported when this module is; dimba_core.ops imports it only for the "triton" backend. Under
TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors for tests.
"""
from __future__ import annotations

import torch

from .bidirectional import empty_like_layout

try:
    import triton
    import triton.language as tl
except ImportError:  # the "triton" backend reports itself unavailable
    triton = None

if triton is not None:

    @triton.jit
    def _ssm_combine(a_l, b_l, a_r, b_r):
        """(a_l, b_l) then (a_r, b_r): h -> a_r (a_l h + b_l) + b_r."""
        return a_l * a_r, a_r * b_l + b_r

    @triton.jit
    def _softplus(v):
        """torch's softplus (threshold 20); log1p(t) = log(u) t / (u - 1) with u = 1 + t, exact when u == 1."""
        t = tl.exp(tl.minimum(v, 20.0))
        u = 1.0 + t
        log1p = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
        return tl.where(v > 20.0, v, log1p)

    @triton.jit
    def _scan_pass(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, pid_b, offs_d, mask_d, lo, hi,
                   h, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sbc_b, sbc_n, sbc_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                   N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                   REVERSE: tl.constexpr, FINAL: tl.constexpr, STORE: tl.constexpr):
        """One direction over positions [lo, hi) from state h (right to left when REVERSE). STORE writes y, FINAL
        adds the stored other direction and gates by silu(z). Returns the end state and the sum of the deltas."""
        offs_n = tl.arange(0, N)
        offs_t = tl.arange(0, BLOCK_L)  # step inside a chunk, in scan order
        A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
        A = A.to(tl.float32) * 1.4426950408889634  # exp(delta A) = exp2(delta A log2 e)
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        x_row = x_ptr + pid_b * sx_b + offs_d[:, None] * sx_d
        dt_row = dt_ptr + pid_b * sdt_b + offs_d[:, None] * sdt_d
        z_row = z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d
        o_row = out_ptr + pid_b * so_b + offs_d[:, None] * so_d
        B_row = B_ptr + pid_b * sbc_b + offs_n[None, :] * sbc_n
        C_row = C_ptr + pid_b * sbc_b + offs_n[None, :] * sbc_n
        dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(0, hi - lo, BLOCK_L):
            t = start + offs_t
            mask_t = t < hi - lo
            if REVERSE:
                pos = hi - 1 - t
            else:
                pos = lo + t
            m2 = mask_d[:, None] & mask_t[None, :]
            x = tl.load(x_row + pos[None, :] * sx_l, mask=m2, other=0.0).to(tl.float32)
            dt = tl.load(dt_row + pos[None, :] * sdt_l, mask=m2, other=0.0).to(tl.float32)
            dt = tl.where(m2, _softplus(dt + bias[:, None]), 0.0)  # padded steps: decay 1, input 0
            dt_sum += tl.sum(dt, axis=1)
            Bt = tl.load(B_row + pos[:, None] * sbc_l, mask=mask_t[:, None], other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, :, None] * A[:, None, :])  # (BLOCK_D, BLOCK_L, N)
            inp = (dt * x)[:, :, None] * Bt[None, :, :]
            acc_a, acc_b = tl.associative_scan((decay, inp), axis=1, combine_fn=_ssm_combine)
            hs = acc_a * h[:, None, :] + acc_b
            h = tl.sum(tl.where(offs_t[None, :, None] == BLOCK_L - 1, hs, 0.0), axis=1)
            if STORE:
                Ct = tl.load(C_row + pos[:, None] * sbc_l, mask=mask_t[:, None], other=0.0).to(tl.float32)
                y = tl.sum(hs * Ct[None, :, :], axis=2) + D[:, None] * x
                o_ptrs = o_row + pos[None, :] * so_l
                if FINAL:
                    z = tl.load(z_row + pos[None, :] * sz_l, mask=m2, other=0.0).to(tl.float32)
                    y = (y + tl.load(o_ptrs, mask=m2, other=0.0).to(tl.float32)) * z * tl.sigmoid(z)
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
        return h, dt_sum

    @triton.jit
    def _bidir_scan_kernel(xf_ptr, xb_ptr, dtf_ptr, dtb_ptr, Af_ptr, Ab_ptr, Bf_ptr, Bb_ptr, Cf_ptr, Cb_ptr,
                           Df_ptr, Db_ptr, biasf_ptr, biasb_ptr, z_ptr, out_ptr, hs_ptr, dts_ptr, d, L, SEG, S,
                           sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sbc_b, sbc_n, sbc_l,
                           sz_b, sz_d, sz_l, so_b, so_d, so_l,
                           N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, SEGMENTED: tl.constexpr):
        """Both directions over segment pid(2) of SEG positions (the whole sequence when not SEGMENTED): its carries
        come from the other segments' end states and delta sums (hs, dts, from _bidir_segment_states_kernel)."""
        pid_b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        h_f = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        h_b = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        lo, hi = 0, L
        if SEGMENTED:
            seg = tl.program_id(2)
            lo = seg * SEG
            hi = tl.minimum(lo + SEG, L)
            offs_n = tl.arange(0, N)
            m_dn = mask_d[:, None]
            a_f = tl.load(Af_ptr + offs_d[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0) * 1.4426950408889634
            a_b = tl.load(Ab_ptr + offs_d[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0) * 1.4426950408889634
            for j in range(0, seg):  # forward carry: segments 0 .. seg-1 in order
                row = (pid_b * S + j) * d  # direction 0
                dts = tl.load(dts_ptr + row + offs_d, mask=mask_d, other=0.0)
                hs = tl.load(hs_ptr + (row + offs_d[:, None]) * N + offs_n[None, :], mask=m_dn, other=0.0)
                h_f = tl.exp2(a_f * dts[:, None]) * h_f + hs
            for k in range(0, S - 1 - seg):  # backward carry: segments S-1 down to seg+1
                row = ((tl.num_programs(0) + pid_b) * S + (S - 1 - k)) * d  # direction 1
                dts = tl.load(dts_ptr + row + offs_d, mask=mask_d, other=0.0)
                hs = tl.load(hs_ptr + (row + offs_d[:, None]) * N + offs_n[None, :], mask=m_dn, other=0.0)
                h_b = tl.exp2(a_b * dts[:, None]) * h_b + hs
        _scan_pass(xb_ptr, dtb_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr, biasb_ptr, z_ptr, out_ptr, pid_b, offs_d, mask_d,
                   lo, hi, h_b, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sbc_b, sbc_n, sbc_l, sz_b, sz_d, sz_l,
                   so_b, so_d, so_l, N, BLOCK_D, BLOCK_L, True, False, True)
        tl.debug_barrier()  # pass 2 reads what other threads of this program stored in pass 1
        _scan_pass(xf_ptr, dtf_ptr, Af_ptr, Bf_ptr, Cf_ptr, Df_ptr, biasf_ptr, z_ptr, out_ptr, pid_b, offs_d, mask_d,
                   lo, hi, h_f, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sbc_b, sbc_n, sbc_l, sz_b, sz_d, sz_l,
                   so_b, so_d, so_l, N, BLOCK_D, BLOCK_L, False, True, True)

    @triton.jit
    def _bidir_segment_states_kernel(xf_ptr, xb_ptr, dtf_ptr, dtb_ptr, Af_ptr, Ab_ptr, Bf_ptr, Bb_ptr, Cf_ptr,
                                     Cb_ptr, Df_ptr, Db_ptr, biasf_ptr, biasb_ptr, z_ptr, out_ptr, hs_ptr, dts_ptr,
                                     d, L, SEG, S, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sbc_b, sbc_n, sbc_l,
                                     sz_b, sz_d, sz_l, so_b, so_d, so_l,
                                     N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        """Each segment's end state from zero and its delta sum, both directions: hs (2, batch, S, d, N), dts
        (2, batch, S, d), float32. The decay across a segment is exp(A * delta sum)."""
        pid_b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        seg = tl.program_id(2)
        lo = seg * SEG
        hi = tl.minimum(lo + SEG, L)
        offs_n = tl.arange(0, N)
        zero = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        for direction in tl.static_range(2):
            if direction == 0:
                h, dt_sum = _scan_pass(xf_ptr, dtf_ptr, Af_ptr, Bf_ptr, Cf_ptr, Df_ptr, biasf_ptr, z_ptr, out_ptr,
                                       pid_b, offs_d, mask_d, lo, hi, zero, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l,
                                       sbc_b, sbc_n, sbc_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                                       N, BLOCK_D, BLOCK_L, False, False, False)
            else:
                h, dt_sum = _scan_pass(xb_ptr, dtb_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr, biasb_ptr, z_ptr, out_ptr,
                                       pid_b, offs_d, mask_d, lo, hi, zero, sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l,
                                       sbc_b, sbc_n, sbc_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                                       N, BLOCK_D, BLOCK_L, True, False, False)
            row = ((direction * tl.num_programs(0) + pid_b) * S + seg) * d
            tl.store(dts_ptr + row + offs_d, dt_sum, mask=mask_d)
            tl.store(hs_ptr + (row + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_d[:, None])

    @triton.jit
    def _bidir_conv_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, of_ptr, ob_ptr, d, L,
                           sx_b, sx_d, sx_l, so_b, so_d, so_l,
                           W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        pid_b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_d = offs_d < d
        acc_f = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        acc_f += tl.load(bf_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        acc_b = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        acc_b += tl.load(bb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        x_row = x_ptr + pid_b * sx_b + offs_d[:, None] * sx_d
        for s in tl.static_range(2 * W - 1):  # x[l + s - W + 1]: forward taps s <= W-1, backward taps s >= W-1
            pos = offs_l + (s - (W - 1))
            m = mask_d[:, None] & ((pos >= 0) & (pos < L))[None, :]
            x = tl.load(x_row + pos[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
            if s <= W - 1:
                acc_f += tl.load(wf_ptr + offs_d * W + s, mask=mask_d, other=0.0).to(tl.float32)[:, None] * x
            if s >= W - 1:
                w = tl.load(wb_ptr + offs_d * W + (2 * W - 2 - s), mask=mask_d, other=0.0)
                acc_b += w.to(tl.float32)[:, None] * x
        m_out = mask_d[:, None] & (offs_l < L)[None, :]
        o_off = pid_b * so_b + offs_d[:, None] * so_d + offs_l[None, :] * so_l
        tl.store(of_ptr + o_off, (acc_f * tl.sigmoid(acc_f)).to(of_ptr.dtype.element_ty), mask=m_out)
        tl.store(ob_ptr + o_off, (acc_b * tl.sigmoid(acc_b)).to(ob_ptr.dtype.element_ty), mask=m_out)


def _require_triton():
    if triton is None:
        raise RuntimeError("the 'triton' scan backend needs the triton package (pip install triton)")


def _pair(a: torch.Tensor, b: torch.Tensor):
    """Two tensors with one shared set of strides (contiguous copies only if theirs differ)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch between directions: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a, b) if a.stride() == b.stride() else (a.contiguous(), b.contiguous())


SEGMENTS = 1  # default for `segments`: 1 (each program walks the whole sequence) until a GPU sweep says otherwise


def bidirectional_selective_scan_triton(x_f, x_b, delta_f, delta_b, A_f, A_b, B_f, B_b, C_f, C_b, D_f, D_b, z,
                                        delta_bias_f, delta_bias_b, *, block_d: int = 8, block_l: int = 16,
                                        num_warps: int = 4, segments: int | None = None):
    """(scan_fwd(x_f, ...) + scan_bwd(x_b, ...)) * silu(z); returns (batch, d, L) in x_f's dtype. segments > 1
    splits the sequence across that many programs per channel block: one launch finds each segment's end state
    and delta sum, a second rescans each segment from its carries (about 1.8x the work, segments x the
    parallelism); 1 is one launch walking the whole sequence."""
    _require_triton()
    batch, d, L = x_f.shape
    n = A_f.shape[1]
    segments = SEGMENTS if segments is None else segments
    assert n & (n - 1) == 0, f"d_state must be a power of 2, got {n}"
    assert block_d & (block_d - 1) == 0 and block_l & (block_l - 1) == 0, "block sizes must be powers of 2"
    assert segments >= 1, f"segments must be at least 1, got {segments}"
    x_f, x_b = _pair(x_f, x_b)
    delta_f, delta_b = _pair(delta_f, delta_b)
    B_f, B_b = _pair(B_f, B_b)
    C_f, C_b = _pair(C_f, C_b)
    if B_f.stride() != C_f.stride():
        B_f, B_b, C_f, C_b = (t.contiguous() for t in (B_f, B_b, C_f, C_b))
    assert delta_f.shape == z.shape == x_f.shape and B_f.shape == C_f.shape == (batch, n, L)
    assert A_f.shape == A_b.shape == (d, n) and D_f.shape == D_b.shape == (d,)
    A_f, A_b, D_f, D_b, delta_bias_f, delta_bias_b = (
        t.float().contiguous() for t in (A_f, A_b, D_f, D_b, delta_bias_f, delta_bias_b))
    out = empty_like_layout(x_f)
    if out.numel() == 0:
        return out
    seg = triton.cdiv(triton.cdiv(L, segments), block_l) * block_l
    count = triton.cdiv(L, seg) if segments > 1 else 1
    hs = x_f.new_empty(2, batch, count, d, n, dtype=torch.float32) if count > 1 else out
    dts = x_f.new_empty(2, batch, count, d, dtype=torch.float32) if count > 1 else out
    args = (x_f, x_b, delta_f, delta_b, A_f, A_b, B_f, B_b, C_f, C_b, D_f, D_b, delta_bias_f, delta_bias_b, z, out,
            hs, dts, d, L, seg, count, *x_f.stride(), *delta_f.stride(), *B_f.stride(), *z.stride(), *out.stride())
    grid = (batch, triton.cdiv(d, block_d), count)
    if count > 1:
        _bidir_segment_states_kernel[grid](*args, N=n, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps)
    _bidir_scan_kernel[grid](*args, N=n, BLOCK_D=block_d, BLOCK_L=block_l, SEGMENTED=count > 1,
                             num_warps=num_warps)
    return out


def bidirectional_conv1d_silu(x, w_f, b_f, w_b, b_b, *, block_d: int = 32, block_l: int = 32):
    """SiLU(causal depthwise conv(x, w_f) + b_f) and SiLU(anti-causal conv(x, w_b) + b_b), both (batch, d, L).

    w_f, w_b: (d, width). The anti-causal one is the causal conv of the flipped sequence, flipped back:
    position l sees x[l..l+width-1] with w_b[width-1..0]. Outputs keep x's layout kind (channels-last or not).
    """
    _require_triton()
    batch, d, L = x.shape
    width = w_f.shape[-1]
    x_f, x_b = empty_like_layout(x), empty_like_layout(x)
    if x.numel() == 0:
        return x_f, x_b
    zeros = None if b_f is not None and b_b is not None else x.new_zeros(d, dtype=torch.float32)
    grid = (batch, triton.cdiv(d, block_d), triton.cdiv(L, block_l))
    _bidir_conv_kernel[grid](x, w_f.contiguous(), zeros if b_f is None else b_f, w_b.contiguous(),
                             zeros if b_b is None else b_b, x_f, x_b, d, L, *x.stride(), *x_f.stride(),
                             W=width, BLOCK_D=block_d, BLOCK_L=block_l)
    return x_f, x_b
