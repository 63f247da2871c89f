"""GPU speed of Dimba-L-2 against its attention-only twin, of the bidirectional scans, and of 20 sampling steps.

    python -m benchmarks.gpu_speed [--out gpu_speed.json] [--sizes 512 1024 2048] [--dtypes float16 bfloat16]

One CUDA device, one process, random weights, batch 2 (a CFG pair), 300-token captions with 120 valid,
CUDA events, median of --repeats after 2 warm-ups. Model rows: the model as users get it (`auto`), the
attention-only twin (every Mamba block skipped), the `parallel` backend, the fused `triton` backend (when
triton runs) and the `torch` scan (512 px only: its per-step loop is a CPU path). Every row's output is
compared with the float32 model on the naive `ref` scan (relative L2 error; outputs must be finite).
Then the scan alone at L = 1024/4096/16384, both directions: two mamba-ssm `selective_scan_fn` calls on
flipped copies against one stacked `parallel` call (the fused triton scan has its own benchmark,
`python -m benchmarks.triton_scan`); then 20 DPM-Solver++ steps with CFG at 1024 px through
`dimba_core.sample` (`auto` and `parallel`). Prints ms, ratios, GB/s, peak activation memory.
"""
import argparse
import copy
import dataclasses
import json
import statistics
import time

import torch

from dimba_core import Dimba, dimba_l_2, noise_like, sample
from dimba_core.ops import SCANS, has_mamba_ssm, has_triton, selective_scan_parallel
from benchmarks._common import rel_err


def cuda_ms(fn, warmup=2, repeats=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_activation_gb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def inputs(px, dtype):
    g = torch.Generator().manual_seed(px)
    x = torch.randn(2, 4, px // 8, px // 8, generator=g).to("cuda", dtype)
    y = torch.randn(2, 1, 300, 4096, generator=g).to("cuda", dtype)
    mask = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    mask[:, :120] = 1
    return x, torch.tensor([500.0, 500.0], device="cuda"), y, mask


def attention_only(model):
    """The same network with mamba_ratio 0: Dimba's attention blocks and weights, no Mamba blocks."""
    with torch.device("cuda"):
        twin = Dimba(dataclasses.replace(model.config, mamba_ratio=0.0)).to(model.dtype)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mamba_blocks.")})
    return twin.eval().requires_grad_(False)


def model_rows(sizes, dtypes, repeats):
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp32 = Dimba(dimba_l_2()).eval().requires_grad_(False)
    refs = {}
    for px in sizes:  # the float32 reference outputs (naive scan), computed once per size
        x, t, y, mask = inputs(px, torch.float32)
        with torch.inference_mode():
            refs[px] = fp32.set_scan_backend("ref")(x, t, y, mask).cpu()
    rows = []
    for dtype in dtypes:
        model = copy.deepcopy(fp32).to(dtype)  # the same weights, rounded
        twin = attention_only(model)
        for px in sizes:
            args = inputs(px, dtype)
            variants = [("dimba", "auto", True), ("attention_only", "auto", False),
                        ("dimba_parallel", "parallel", True)]
            if has_triton():
                variants.append(("dimba_triton", "triton", True))
            if px == 512:
                variants.append(("dimba_torch_scan", "torch", True))
            for name, backend, mamba in variants:
                net = model.set_scan_backend(backend) if mamba else twin
                with torch.inference_mode():
                    out = net(*args)
                    used = net.mamba_blocks[0].mixer.backend_for(args[0]) if mamba else "-"

                    def run():
                        with torch.inference_mode():
                            net(*args)

                    ms = cuda_ms(run, repeats=repeats if backend != "torch" else 2)
                row = dict(kind="model", name=name, backend=used, px=px, tokens=(px // 16) ** 2, dtype=str(dtype),
                           ms=ms, act_gb=peak_activation_gb(run), finite=bool(torch.isfinite(out).all()),
                           rel_err_vs_fp32_ref=rel_err(out.cpu(), refs[px]) if mamba else None)
                rows.append(row)
                print(row, flush=True)
        del model, twin
    return rows


def scan_rows(lengths, dtype=torch.float16):
    rows = []
    b, d, n = 2, 2304, 16
    for L in lengths:
        first = len(rows)
        g = torch.Generator().manual_seed(L)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        half = lambda v: v.to("cuda", dtype)  # noqa: E731
        fwd = dict(u=half(r(b, d, L)), delta=half(0.5 * r(b, d, L)), A=-torch.exp(r(d, n)).cuda(), B=half(r(b, n, L)),
                   C=half(r(b, n, L)), D=r(d).cuda(), z=half(r(b, d, L)), delta_bias=r(d).cuda(), delta_softplus=True)
        bwd = {k: (half(r(*v.shape)) if k in ("u", "delta", "B", "C") else v) for k, v in fwd.items()}
        moved = 2 * sum(fwd[k].numel() * fwd[k].element_size() for k in ("u", "delta", "B", "C", "z", "u"))
        ref = None
        if has_mamba_ssm():
            scan = SCANS["cuda"]
            seq = ("u", "delta", "B", "C", "z")
            flip = lambda kw: {k: (v.flip(-1) if k in seq else v) for k, v in kw.items()}  # noqa: E731

            def two_calls():
                return scan(**fwd) + scan(**flip(bwd)).flip(-1)

            ref = two_calls()
            ms = cuda_ms(two_calls)
            rows.append(dict(kind="scan", name="mamba_ssm_x2", L=L, ms=ms, gbps=moved / ms / 1e6, rel_err=0.0))
        stacked = {k: (torch.stack([fwd[k], bwd[k].flip(-1)]) if k in ("u", "delta", "B", "C") else fwd[k])
                   for k in fwd}
        stacked.update(A=torch.stack([fwd["A"], bwd["A"]])[:, None], D=torch.stack([fwd["D"], bwd["D"]])[:, None],
                       delta_bias=torch.stack([fwd["delta_bias"], bwd["delta_bias"]])[:, None], z=None)

        def parallel():
            y = selective_scan_parallel(**stacked)
            return (y[0] + y[1].flip(-1)) * torch.nn.functional.silu(fwd["z"])

        with torch.inference_mode():
            out = parallel()
            ms = cuda_ms(parallel)
        rows.append(dict(kind="scan", name="parallel_stacked", L=L, ms=ms, gbps=moved / ms / 1e6,
                         rel_err=rel_err(out, ref) if ref is not None else None))
        for row in rows[first:]:
            print(row, flush=True)
    return rows


def sampling_rows(px=1024, steps=20, dtype=torch.float16, backends=("auto",)):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Dimba(dimba_l_2()).to(dtype).eval().requires_grad_(False)
    _, _, y, mask = inputs(px, dtype)
    cond, uncond = y[:1], torch.zeros_like(y[:1])
    rows = []
    for backend in backends:
        model.set_scan_backend(backend)
        noise = noise_like((1, 4, px // 8, px // 8), seed=0, device="cuda", dtype=dtype)

        def run():
            with torch.inference_mode():
                return sample(model, noise, cond, uncond, mask=mask[:1], steps=steps, cfg_scale=4.5)

        latent = run()  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        latent = run()
        torch.cuda.synchronize()
        rows.append(dict(kind="sample", backend=model.mamba_blocks[0].mixer.backend_for(latent), px=px, steps=steps,
                         dtype=str(dtype), s=time.perf_counter() - t0, finite=bool(torch.isfinite(latent).all())))
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_speed.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-backends", nargs="+", default=["auto", "parallel"])
    a = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, mamba-ssm installed: {has_mamba_ssm()}, triton runs: {has_triton()}")
    rows = model_rows(a.sizes, [getattr(torch, d) for d in a.dtypes], a.repeats)
    rows += scan_rows((1024, 4096, 16384))
    rows += sampling_rows(backends=a.sample_backends)
    json.dump(dict(device=card, torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)
    print(f"\n{card}")
    for r in rows:
        if r["kind"] == "model":
            twin = next(o for o in rows if o["kind"] == "model" and o["name"] == "attention_only"
                        and o["px"] == r["px"] and o["dtype"] == r["dtype"])
            err = "" if r["rel_err_vs_fp32_ref"] is None else f"  rel err vs fp32 ref {r['rel_err_vs_fp32_ref']:.1e}"
            print(f"{r['px']:5d}px {r['dtype']:15s} {r['name']:16s} ({r['backend']:8s}) {r['ms']:9.2f} ms  "
                  f"x{r['ms'] / twin['ms']:.2f} vs attention-only  act {r['act_gb']:.2f} GB "
                  f"(x{r['act_gb'] / max(twin['act_gb'], 1e-9):.2f})  finite {r['finite']}{err}")
        elif r["kind"] == "scan":
            base = next((o for o in rows if o["kind"] == "scan" and o["name"] == "mamba_ssm_x2"
                         and o["L"] == r["L"]), r)
            print(f"scan L={r['L']:6d} {r['name']:18s} {r['ms']:9.3f} ms  {base['ms'] / r['ms']:.2f}x faster than "
                  f"mamba-ssm x2  {r['gbps']:.0f} GB/s  rel err {r['rel_err']}")
        else:
            print(f"sample {r['steps']} steps {r['px']} px {r['dtype']} {r['backend']}: {r['s']:.2f} s, "
                  f"finite {r['finite']}")


if __name__ == "__main__":
    main()
