"""Time of one training step (forward, backward, clip, optimizer), LoRA against full fine-tuning, with and without
gradient checkpointing, on synthetic latents; the first row is the baseline the others are compared with.

    python -m benchmarks.train_step --preset tiny --px 64 --batch 4     # CPU: the test suite's tiny model
    python -m benchmarks.train_step --preset L --px 512 --batch 2 --precision bf16 --optimizer came   # a GPU

One process, random weights, 300-token captions with 120 valid, the trainer's own pieces (LoRANetwork rank 16,
enable_checkpointing, training_losses, the scan backend the trainer picks). Median of --steps after 2 warm-ups;
on CUDA also the peak memory of a step (weights, gradients and optimizer state included).
"""
import argparse
import statistics
import time

import torch

from dimba_core import Dimba, DimbaConfig, dimba_g_2, dimba_l_2
from dimba_core.tiny_assets import TINY_CONFIG
from dimba_core.train import training_losses
from dimba_core.train.lora import LoRANetwork
from dimba_core.train.loop import PRECISIONS, enable_checkpointing, make_optimizer, pick_scan_backend

PRESETS = {"L": dimba_l_2, "G": dimba_g_2, "tiny": lambda: DimbaConfig(**TINY_CONFIG),
           "small": lambda: DimbaConfig(hidden_size=384, depth=6, num_heads=6, caption_channels=4096)}


def step_time(preset, px, batch, mode, checkpointing, precision, optimizer, steps, device):
    torch.manual_seed(0)
    model = Dimba(PRESETS[preset]()).to(device).train()
    backend = pick_scan_backend(model, device)
    params = list(model.parameters())
    if mode == "lora":
        model.requires_grad_(False)
        net = LoRANetwork(model, 16).to(device).attach(model)
        params = list(net.parameters())
    if checkpointing:
        enable_checkpointing(model)
    opt = make_optimizer(optimizer, params, 1e-5, 0.0)
    c = model.config
    x = torch.randn(batch, 4, px // 8, px // 8, device=device)
    y = torch.randn(batch, 1, 300, c.caption_channels, device=device)
    mask = torch.zeros(batch, 300, dtype=torch.long, device=device)
    mask[:, :120] = 1
    amp = PRECISIONS[precision]

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = training_losses(model, x, t, y, mask)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, backend


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--optimizer", choices=("came", "adamw"), default="adamw")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", default="lora,full,lora+ckpt,full+ckpt", help="comma-separated mode[+ckpt] rows")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{device}, torch {torch.__version__}, preset {args.preset}, {args.px} px, batch {args.batch}, "
          f"{args.precision}, {args.optimizer}")
    base = None
    for row in args.rows.split(","):
        mode, ckpt = row.split("+")[0], row.endswith("+ckpt")
        try:
            sec, peak, backend = step_time(args.preset, args.px, args.batch, mode, ckpt, args.precision,
                                           args.optimizer, args.steps, device)
        except torch.OutOfMemoryError:
            print(f"{row:12s} out of memory")
            torch.cuda.empty_cache()
            continue
        base = base or sec
        print(f"{row:12s} {sec * 1000:9.1f} ms/step  x{sec / base:5.2f}  peak {peak:6.2f} GiB  ({backend} scan)")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
