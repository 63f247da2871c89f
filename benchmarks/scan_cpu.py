"""CPU benchmark of the pure-PyTorch scans, in one process: `torch` (the baseline), `parallel`, naive `ref`.

    python -m benchmarks.scan_cpu [--lengths 1024 4096] [--batch 2] [--dim 2304] [--state 16] [--threads 1] [--ref]

For each L: one selective scan (one direction) and one whole bidirectional mixer at Dimba-L-2 width
(d_model = dim / 2), inference mode, best of --repeats taken round-robin over the backends; prints seconds, the ratio to `torch` and the
relative error to `torch`. This is the measurement behind `auto` picking `torch` on the CPU. Not a test.
"""
import argparse
import time

import torch

from dimba_core.mamba import BiMambaMixer
from dimba_core.ops import SCANS
from benchmarks._common import rel_err


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=2304)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ref", action="store_true", help="also time the naive per-step reference (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids OpenMP stalls on a busy box)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    b, d, n = a.batch, a.dim, a.state
    backends = ["torch", "parallel"] + ["ref"] * a.ref
    print(f"batch {b}, d_inner {d}, d_state {n}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    torch.manual_seed(0)
    mixer = BiMambaMixer(d // 2, d_state=n)
    for L in a.lengths:
        g = torch.Generator().manual_seed(L)
        kw = dict(u=torch.randn(b, d, L, generator=g), delta=0.5 * torch.randn(b, d, L, generator=g),
                  A=-torch.exp(torch.randn(d, n, generator=g)), B=torch.randn(b, n, L, generator=g),
                  C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g),
                  z=torch.randn(b, d, L, generator=g), delta_bias=0.5 * torch.randn(d, generator=g),
                  delta_softplus=True)
        x = torch.randn(b, L, d // 2, generator=g)
        for what in ("scan", "mixer"):
            best, outs = {}, {}
            for rep in range(a.repeats):  # round-robin, so that load from other jobs hits every backend alike
                for backend in backends if rep == 0 else [b_ for b_ in backends if b_ != "ref"]:
                    if what == "scan":
                        fn = lambda: SCANS[backend](**kw)  # noqa: E731
                    else:
                        mixer.backend = backend
                        fn = lambda: mixer(x)  # noqa: E731
                    with torch.inference_mode():
                        sec, outs[backend] = timed(fn, 1)
                    best[backend] = min(sec, best.get(backend, sec))
            for backend in backends:
                print(f"L {L:6d} {what:5s} {backend:9s} {best[backend]:8.3f} s  x{best[backend] / best['torch']:6.2f} "
                      f"vs torch  rel err {rel_err(outs[backend], outs['torch']):.1e}", flush=True)

if __name__ == "__main__":
    main()
