"""GPU speed of Dimba-L-2 against its attention-only twin, of the bidirectional scans, and of 20 sampling steps.

    python -m benchmarks.gpu_speed [--out gpu_speed.json] [--sizes 512 1024 2048] [--dtypes float16 bfloat16]

One CUDA device, one process, random weights, batch 2 (a CFG pair), 300-token captions with 120 valid,
CUDA events, median of --repeats after a warm-up (a run over 0.3 s is timed once). Model rows: the model as
users get it (`auto`), the attention-only twin (every Mamba block skipped), both again with the caption cut to its
120 valid tokens (`_trimmed`: what skipping the padding would save), the `parallel` backend, the fused
`triton` backend (when triton runs; also with its scan split 16 ways, `_seg16`) and the `torch` scan (512 px only: its per-step loop is a CPU path); at
--graph-sizes also auto / triton / the twin replayed as a captured CUDA graph (no launch overhead). Every row's
output is compared with the float32 model (relative L2 error; `ref` scan, at 2048 px the `parallel` scan, which
equals it to 1e-7 in float32, since the naive loop takes minutes there). Then the scan alone at
L = 1024/4096/16384, both directions: two mamba-ssm `selective_scan_fn` calls on flipped copies against one
stacked `parallel` call (the fused triton scan has its own benchmark, `python -m benchmarks.triton_scan`); then 20
DPM-Solver++ steps with CFG at 1024 px through `dimba_core.sample` (--sample-backends). Prints ms, ratios, GB/s,
peak activation memory, and the seconds since start on each row.
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
    """Median milliseconds of fn over `repeats` runs after `warmup` runs (CUDA events)."""
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


def timed(fn, repeats):
    """(median ms, peak activation GB) of fn, already run once (the warm-up); a run over 0.3 s is timed once."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    slow = time.perf_counter() - t0 > 0.3
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_ms(fn, warmup=0, repeats=1 if slow else repeats)
    return ms, (torch.cuda.max_memory_allocated() - base) / 1e9


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): a replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def inputs(px, dtype):
    g = torch.Generator().manual_seed(px)
    x = torch.randn(2, 4, px // 8, px // 8, generator=g).to("cuda", dtype)
    y = torch.randn(2, 1, 300, 4096, generator=g).to("cuda", dtype)
    mask = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    mask[:, :120] = 1
    return x, torch.tensor([500.0, 500.0], device="cuda"), y, mask


def set_segments(n):
    """The fused triton scan's default sequence split (ops.triton_scan.SEGMENTS), where triton runs."""
    if has_triton():
        from dimba_core.ops import triton_scan

        triton_scan.SEGMENTS = n


def attention_only(model):
    """The same network with mamba_ratio 0: Dimba's attention blocks and weights, no Mamba blocks."""
    with torch.device("cuda"):
        twin = Dimba(dataclasses.replace(model.config, mamba_ratio=0.0)).to(model.dtype)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mamba_blocks.")})
    return twin.eval().requires_grad_(False)


def model_rows(sizes, dtypes, repeats, graph_sizes, clock):
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp32 = Dimba(dimba_l_2()).eval().requires_grad_(False)
    refs = {}
    for px in sizes:  # the float32 model's outputs, once per size: naive `ref` scan, `parallel` (equal to 1e-7) at 2048
        x, t, y, mask = inputs(px, torch.float32)
        with torch.inference_mode():
            refs[px] = fp32.set_scan_backend("ref" if px <= 1024 else "parallel")(x, t, y, mask).cpu()
        print(f"[{clock():.0f} s] fp32 reference at {px} px", flush=True)
    rows = []
    for dtype in dtypes:
        model = copy.deepcopy(fp32).to(dtype)  # the same weights, rounded
        twin = attention_only(model)
        for px in sizes:
            args = inputs(px, dtype)
            variants = [("dimba", "auto", True), ("attention_only", "auto", False),
                        ("dimba_trimmed", "auto", True), ("attention_only_trimmed", "auto", False),
                        ("dimba_parallel", "parallel", True)]
            if has_triton():
                variants += [("dimba_triton", "triton", True), ("dimba_triton_seg16", "triton", True)]
            if px == 512:
                variants.append(("dimba_torch_scan", "torch", True))
            x, t, y, mask = args
            trimmed = (x, t, y[:, :, :120], None)  # the caption cut to its 120 valid tokens: no padding, no mask
            for name, backend, mamba in variants:
                net = model.set_scan_backend(backend) if mamba else twin
                call = trimmed if name.endswith("_trimmed") else args
                with torch.inference_mode():
                    out = net(*call)
                    used = net.mamba_blocks[0].mixer.backend_for(x) if mamba else "-"

                def run():
                    with torch.inference_mode():
                        net(*call)

                segments = 16 if name.endswith("_seg16") else 1  # the fused scan split 16 ways along the sequence
                set_segments(segments)
                if segments > 1:
                    with torch.inference_mode():
                        out = net(*call)
                ms, act = timed(run, repeats if backend != "torch" else 1)
                row = dict(kind="model", name=name, backend=used, px=px, tokens=(px // 16) ** 2, dtype=str(dtype),
                           ms=ms, act_gb=act, finite=bool(torch.isfinite(out).all()),
                           rel_err_vs_fp32_ref=rel_err(out.cpu(), refs[px]) if mamba else None)
                if px in graph_sizes and backend in ("auto", "triton"):  # launches removed: the GPU's own time
                    with torch.inference_mode():
                        row["cuda_graph_ms"] = cuda_ms(graphed(lambda: net(*call)), repeats=repeats)
                set_segments(1)
                rows.append(row)
                print(f"[{clock():.0f} s]", row, flush=True)
        del model, twin
        torch.cuda.empty_cache()
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
        if backend == "triton" and not has_triton():
            continue
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
    p.add_argument("--sample-backends", nargs="+", default=["auto", "triton"])
    p.add_argument("--graph-sizes", type=int, nargs="*", default=[512, 1024],
                   help="sizes also timed as a captured CUDA graph (auto, triton, attention-only)")
    a = p.parse_args()
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    assert torch.cuda.is_available(), "needs a CUDA device"
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, mamba-ssm installed: {has_mamba_ssm()}, triton runs: {has_triton()}")
    rows = model_rows(a.sizes, [getattr(torch, d) for d in a.dtypes], a.repeats, a.graph_sizes, clock)
    rows += scan_rows((1024, 4096, 16384))
    rows += sampling_rows(backends=a.sample_backends)
    json.dump(dict(device=card, torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)
    print(f"\n{card}")
    for r in rows:
        if r["kind"] == "model":
            twin_name = "attention_only_trimmed" if r["name"].endswith("_trimmed") else "attention_only"
            twin = next(o for o in rows if o["kind"] == "model" and o["name"] == twin_name
                        and o["px"] == r["px"] and o["dtype"] == r["dtype"])
            err = "" if r["rel_err_vs_fp32_ref"] is None else f"  rel err vs fp32 ref {r['rel_err_vs_fp32_ref']:.1e}"
            graph = ""
            if "cuda_graph_ms" in r and "cuda_graph_ms" in twin:
                graph = f"  CUDA graph {r['cuda_graph_ms']:.2f} ms x{r['cuda_graph_ms'] / twin['cuda_graph_ms']:.2f}"
            print(f"{r['px']:5d}px {r['dtype']:15s} {r['name']:22s} ({r['backend']:8s}) {r['ms']:9.2f} ms  "
                  f"x{r['ms'] / twin['ms']:.2f} vs attention-only  act {r['act_gb']:.2f} GB "
                  f"(x{r['act_gb'] / max(twin['act_gb'], 1e-9):.2f})  finite {r['finite']}{err}{graph}")
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
