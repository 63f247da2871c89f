"""The fused Triton scan on a GPU: every block config (and sequence split, `segments`) against a float32 PyTorch
reference, and mamba-ssm's kernel run twice on flipped copies (when installed):
python -m benchmarks.triton_scan [--lengths ...]."""
import argparse
import time

import torch
import triton

from dimba_core.ops import has_mamba_ssm, selective_scan_cuda, selective_scan_torch
from dimba_core.ops.triton_scan import bidirectional_selective_scan_triton
from benchmarks._common import rel_err


def main(argv=None):
    """GPU check and timing at Dimba-L mixer size (d 2304, n 16, batch 2): every block config against a
    float32 PyTorch reference, then mamba-ssm's kernel run twice on flipped copies (when installed)."""

    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_scan", description=main.__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--configs", nargs="+", default=["8x16x4", "4x32x4", "8x32x8", "16x16x8", "4x16x2", "16x32x4"],
                   help="BLOCK_DxBLOCK_Lxnum_warps[xsegments]")
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   help="x, delta, z as (b, d, L) memory, or as the mixer passes them: (b, d, L) views of (b, L, d)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1 (use a small --d)")
    a = p.parse_args(argv)
    dtype, dev, (b, d, n) = getattr(torch, a.dtype), torch.device(a.device), (2, a.d, 16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median_ms(fn, warmup=2, repeats=5):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(1e3 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]

    def two_scans(scan, k):  # forward + backward on flipped copies, flipped back: the reference model's way
        dirs = [[k[name + s] for name in ("x_", "delta_", "A_", "B_", "C_", "D_", "delta_bias_")] for s in "fb"]
        fl = lambda t: t.flip(-1)  # noqa: E731
        x, delta, A, B, C, D, bias = dirs[1]
        y_b = scan(fl(x), fl(delta), A, fl(B), fl(C), D, fl(k["z"]), delta_bias=bias, delta_softplus=True)
        x, delta, A, B, C, D, bias = dirs[0]
        return scan(x, delta, A, B, C, D, k["z"], delta_bias=bias, delta_softplus=True) + fl(y_b)

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, b {b} d {d} n {n}")
    for L, layout in ((L, layout) for L in a.lengths for layout in a.layouts):
        g = torch.Generator(device=dev).manual_seed(L)
        r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
        kw = dict(x_f=r(b, d, L), x_b=r(b, d, L), delta_f=0.5 * r(b, d, L), delta_b=0.5 * r(b, d, L),
                  A_f=-torch.exp(r(d, n)), A_b=-torch.exp(r(d, n)), B_f=r(b, n, L), B_b=r(b, n, L),
                  C_f=r(b, n, L), C_b=r(b, n, L), D_f=r(d), D_b=r(d), z=r(b, d, L),
                  delta_bias_f=0.5 * r(d), delta_bias_b=0.5 * r(d))
        kw = {k: v.to(dtype) if v.dim() == 3 else v for k, v in kw.items()}
        if layout == "channels_last":
            kw = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("x_f", "x_b", "delta_f", "delta_b", "z")
                  else v for k, v in kw.items()}
        ref = two_scans(selective_scan_torch, {k: v.float() for k, v in kw.items()})
        moved = 8 * b * d * L * kw["x_f"].element_size()  # 5 reads, y_bwd write + read back, out write
        for cfg in a.configs:
            bd, bl, nw, seg = ([int(v) for v in cfg.split("x")] + [1])[:4]
            run = lambda: bidirectional_selective_scan_triton(  # noqa: E731
                **kw, block_d=bd, block_l=bl, num_warps=nw, segments=seg)
            err = rel_err(run(), ref)
            t = median_ms(run)
            print(f"L={L:6d} {layout:13s} triton {cfg:11s} {t:9.3f} ms {moved / t / 1e6:6.0f} GB/s  rel err {err:.2e}",
                  flush=True)
        if dev.type == "cuda" and has_mamba_ssm() and layout == "contiguous":
            run = lambda: two_scans(selective_scan_cuda, kw)  # noqa: E731
            err = rel_err(run(), ref)
            print(f"L={L:6d} mamba-ssm x2 + flips {median_ms(run):9.3f} ms  rel err {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
