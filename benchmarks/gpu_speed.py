"""GPU speed of Dimba-L-2 against its attention-only twin, and of the bidirectional scan (issue: GPU speed).

    python -m benchmarks.gpu_speed [--out gpu_speed.json] [--sizes 512 1024 2048]

One CUDA device, one process, random weights, batch 2 (a CFG pair), 300-token captions with 120 valid,
CUDA events, median of 5 after 2 warm-ups. Rows: the model as users get it (scan backend `auto`), the
same model with every Mamba block skipped, the fused `triton` backend, and the `torch` scan backend (512 px only: its per-step loop
is a CPU path); then the scan alone at L = 1024/4096/16384 for our fastest path and for two calls of
mamba-ssm's selective_scan_fn on flipped copies. Prints ms, ratios, GB/s and peak activation memory.
"""
import argparse
import json
import statistics

import torch

from dimba_core import Dimba, dimba_l_2
from dimba_core.ops import SCANS, has_mamba_ssm, has_triton


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


def model_rows(sizes, dtypes):
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        model = Dimba(dimba_l_2()).to("cuda", dtype).eval()
        for px in sizes:
            lat = px // 8
            x = torch.randn(2, 4, lat, lat, device="cuda", dtype=dtype)
            y = torch.randn(2, 1, 300, 4096, device="cuda", dtype=dtype)
            mask = torch.zeros(2, 300, dtype=torch.long, device="cuda")
            mask[:, :120] = 1
            t = torch.tensor([500.0, 500.0], device="cuda")
            variants = [("dimba", "auto", True), ("attention_only", "auto", False)]
            if has_triton():
                variants.append(("dimba_triton", "triton", True))
            if px == 512:
                variants.append(("dimba_torch_scan", "torch", True))
            for name, backend, mamba in variants:
                model.set_scan_backend(backend)
                model.mamba_enabled = mamba

                def run():
                    with torch.inference_mode():
                        model(x, t, y, mask)

                rows.append(dict(kind="model", name=name, px=px, tokens=(lat // 2) ** 2, dtype=str(dtype),
                                 ms=cuda_ms(run), act_gb=peak_activation_gb(run)))
            model.mamba_enabled = True
    return rows


def scan_rows(lengths, dtype=torch.float16):
    rows = []
    b, d, n = 2, 2304, 16
    for L in lengths:
        kw = dict(u=torch.randn(b, d, L, device="cuda", dtype=dtype),
                  delta=0.5 * torch.randn(b, d, L, device="cuda", dtype=dtype),
                  A=-torch.exp(torch.randn(d, n, device="cuda")), B=torch.randn(b, n, L, device="cuda", dtype=dtype),
                  C=torch.randn(b, n, L, device="cuda", dtype=dtype), D=torch.randn(d, device="cuda"),
                  z=torch.randn(b, d, L, device="cuda", dtype=dtype), delta_bias=torch.randn(d, device="cuda"),
                  delta_softplus=True)
        flipped = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        moved = sum(kw[k].numel() * kw[k].element_size() for k in ("u", "delta", "B", "C", "z")) + \
            kw["u"].numel() * kw["u"].element_size()  # one read of the inputs, one write of y
        scan = SCANS["cuda"]
        ms = cuda_ms(lambda: (scan(**kw), scan(**flipped)))
        rows.append(dict(kind="scan", name="mamba_ssm_x2", L=L, ms=ms, gbps=2 * moved / ms / 1e6))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_speed.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    a = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    card = torch.cuda.get_device_name()
    rows = model_rows(a.sizes, (torch.float16, torch.bfloat16))
    if has_mamba_ssm():
        rows += scan_rows((1024, 4096, 16384))
    print(f"{card}, torch {torch.__version__}, mamba-ssm installed: {has_mamba_ssm()}")
    for r in rows:
        if r["kind"] == "model":
            twin = next(o for o in rows if o["kind"] == "model" and o["name"] == "attention_only"
                        and o["px"] == r["px"] and o["dtype"] == r["dtype"])
            print(f"{r['px']:5d}px {r['dtype']:15s} {r['name']:18s} {r['ms']:9.2f} ms  x{r['ms'] / twin['ms']:.2f} "
                  f"vs attention-only  act {r['act_gb']:.2f} GB")
        else:
            print(f"scan L={r['L']:6d} {r['name']:18s} {r['ms']:9.3f} ms  {r['gbps']:.0f} GB/s")
    json.dump(dict(device=card, torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
