"""CPU benchmark: the `torch` selective scan against the naive per-step reference, in one process.

    python benchmarks/scan_cpu.py [--length 4096] [--batch 2] [--dim 2304] [--state 16]

Prints both times, the speed-up and the relative error; not a test (no timed assertions).
"""
import argparse
import time

import torch

from dimba_core.ops import selective_scan_ref, selective_scan_torch


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=2304)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    b, d, n, L = a.batch, a.dim, a.state, a.length
    kw = dict(u=torch.randn(b, d, L, generator=g), delta=0.5 * torch.randn(b, d, L, generator=g),
              A=-torch.exp(torch.randn(d, n, generator=g)), B=torch.randn(b, n, L, generator=g),
              C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g),
              delta_bias=0.5 * torch.randn(d, generator=g), delta_softplus=True)
    print(f"batch {b}, d_inner {d}, d_state {n}, L {L}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    t_fast, y_fast = timed(lambda: selective_scan_torch(**kw, chunk_size=a.chunk), a.repeats)
    t_ref, y_ref = timed(lambda: selective_scan_ref(**kw), 1)
    err = ((y_fast - y_ref).norm() / y_ref.norm()).item()
    print(f"naive reference : {t_ref:8.3f} s")
    print(f"torch (chunk {a.chunk}): {t_fast:8.3f} s")
    print(f"speed-up        : {t_ref / t_fast:8.2f}x   relative L2 error {err:.2e}")


if __name__ == "__main__":
    main()
