"""Where a Dimba-L-2 forward spends its GPU time: one forward under torch.profiler after two warm-ups.

    python -m benchmarks.gpu_profile [--sizes 512 2048] [--backends auto triton] [--top 15]

fp16, batch 2, 300-token captions with 120 valid (as benchmarks.gpu_speed), random weights; the model on each
backend and its attention-only twin. Prints per run: wall ms (CUDA events around the profiled forward), the sum of
GPU kernel time, the number of kernel launches, and the largest kernels by self GPU time with their counts (the
table ../shared/PERF.md gives for the published model).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dimba_core import Dimba, dimba_l_2
from benchmarks.gpu_speed import attention_only, inputs


def profiled(net, args, top):
    with torch.inference_mode():
        for _ in range(2):
            net(*args)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start.record()
            net(*args)
            end.record()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    print(f"  wall {start.elapsed_time(end):.1f} ms, GPU kernels {gpu_us / 1e3:.1f} ms in {launches} launches")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--backends", nargs="+", default=["auto", "triton"])
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Dimba(dimba_l_2()).to(torch.float16).eval().requires_grad_(False)
    twin = attention_only(model)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, batch 2")
    for px in a.sizes:
        args = inputs(px, torch.float16)
        for backend in a.backends:
            model.set_scan_backend(backend)
            print(f"{px} px, Dimba-L-2, {model.mamba_blocks[0].mixer.backend_for(args[0])} scan")
            profiled(model, args, a.top)
        print(f"{px} px, attention-only twin")
        profiled(twin, args, a.top)


if __name__ == "__main__":
    main()
