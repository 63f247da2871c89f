"""Command line: `python -m dimba_core convert IN OUT`, `python -m dimba_core generate ...` and `... train ...`."""
from __future__ import annotations

import argparse
import sys

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def convert_main(args) -> None:
    import torch

    from .loader import convert

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = convert(args.src, args.dst, ema=args.ema, dtype=dtype, num_heads=args.num_heads, overwrite=args.force)
    print(f"wrote {args.dst}: {model.config.to_json()}")


def generate_main(args) -> None:
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from .pipeline import DimbaPipeline, file_name
    from .resolution import closest_bucket, parse_ratio

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [p.strip() for p in Path(args.prompts_file).read_text().splitlines() if p.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts-file FILE")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = DimbaPipeline.from_files(args.checkpoint, args.t5, args.vae, device=args.device, dtype=dtype,
                                    t5_device=args.t5_device, tokenizer=args.tokenizer)
    if args.lora:
        from .lora import apply_lora, parse_lora_spec

        for spec in args.lora:
            apply_lora(pipe.model, *parse_lora_spec(spec))
    width, height = args.width, args.height
    if args.ar:
        from .pipeline import native_resolution

        height, width = closest_bucket(parse_ratio(args.ar), native_resolution(pipe.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for prompt in prompts:
        with tqdm(desc=prompt[:40], unit="step") as bar:
            results = pipe(prompt, negative=args.negative, width=width, height=height, steps=args.steps,
                           cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed, batch=args.batch,
                           callback=lambda i, n, x, x0: (setattr(bar, "total", n), bar.update(1)))
        for r in results:
            path = out / file_name(r.prompt, r.seed, r.index)
            r.image.save(path)
            print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dimba_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint to .safetensors with its config stored")
    conv.add_argument("src", help="checkpoint: .pt/.pth/.ckpt/.safetensors")
    conv.add_argument("dst", help="output .safetensors file")
    conv.add_argument("--ema", action="store_true", help="take state_dict_ema instead of state_dict")
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype")
    conv.add_argument("--num-heads", type=int, default=None, help="attention heads (default 16)")
    conv.add_argument("--force", action="store_true", help="replace DST if it exists (never the input itself)")
    conv.set_defaults(func=convert_main)

    from .sampling import SAMPLERS

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--checkpoint", required=True, help="Dimba checkpoint (.pt/.safetensors)")
    gen.add_argument("--t5", required=True, help="T5 v1.1 XXL encoder: Hugging Face folder or .safetensors file")
    gen.add_argument("--vae", required=True, help="SD/SDXL VAE: diffusers folder or .safetensors file")
    gen.add_argument("--tokenizer", help="T5 tokenizer folder if the T5 path has none")
    gen.add_argument("--prompt", action="append", help="prompt; may end with --ar h:w or --hw h:w (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--negative", default="", help="negative prompt (default: empty, as the reference)")
    gen.add_argument("--width", type=int, help="image width in px, multiple of 16")
    gen.add_argument("--height", type=int, help="image height in px, multiple of 16")
    gen.add_argument("--ar", help="aspect ratio h:w, snapped to the reference buckets")
    gen.add_argument("--steps", type=int, help="sampling steps (default: dpmpp_2m 20, ddim 50, euler 30, iddpm 100, sa_solver 25)")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    gen.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch", type=int, default=1, help="images per prompt")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="denoiser dtype (default fp16 on CUDA, fp32 on CPU)")
    gen.add_argument("--t5-device", default="cpu", help="where T5 runs (default cpu)")
    gen.add_argument("--out", required=True, help="output folder for PNGs")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                     help="merge a LoRA (.safetensors) into the denoiser, strength 1 by default (repeatable)")
    gen.set_defaults(func=generate_main)

    from .train.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv=None) -> int:
    from .loader import DimbaLoadError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DimbaLoadError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
