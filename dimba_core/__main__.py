"""Command line: `python -m dimba_core convert IN OUT` and `python -m dimba_core generate ...`."""
from __future__ import annotations

import argparse
import sys

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def convert_main(args) -> None:
    import torch

    from .loader import convert

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = convert(args.src, args.dst, ema=args.ema, dtype=dtype, num_heads=args.num_heads)
    print(f"wrote {args.dst}: {model.config.to_json()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dimba_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a checkpoint to .safetensors with its config stored")
    conv.add_argument("src", help="checkpoint: .pt/.pth/.ckpt/.safetensors")
    conv.add_argument("dst", help="output .safetensors file")
    conv.add_argument("--ema", action="store_true", help="take state_dict_ema instead of state_dict")
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype")
    conv.add_argument("--num-heads", type=int, default=None, help="attention heads (default 16)")
    conv.set_defaults(func=convert_main)
    return parser


def main(argv=None) -> int:
    from .loader import DimbaLoadError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DimbaLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
