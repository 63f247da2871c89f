"""Command line: `python -m dimba_core convert IN OUT`, `python -m dimba_core generate ...` and `... train ...`."""
from __future__ import annotations

import argparse
import sys

from .dtypes import DTYPES, torch_dtype


def convert_main(args) -> None:
    from .loader import convert

    dtype = torch_dtype(args.dtype) if args.dtype else None
    model = convert(args.src, args.dst, ema=args.ema, dtype=dtype, num_heads=args.num_heads, overwrite=args.force)
    print(f"wrote {args.dst}: {model.config.to_json()}")


def read_prompts(args) -> list[str]:
    """--prompt values and --prompts-file lines (UTF-8), without blanks and repeats."""
    from pathlib import Path

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {path}: {'is a folder' if path.is_dir() else 'no such file'}; "
                             "give a text file with one prompt per line")
        try:
            prompts += path.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                             "save it as UTF-8") from None
    for text in prompts + [args.negative]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"the prompt {text!r} holds bytes that are not UTF-8 text; pass prompts as UTF-8 "
                             "(or use --prompts-file)") from None
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts-file FILE")
    return prompts


def plan_outputs(args, prompts) -> dict:
    """{prompt: [PNG path per batch index]}, checked before anything loads: folder usable, no file replaced."""
    from pathlib import Path

    from .pipeline import file_name

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the PNGs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create this folder ({e.strerror}); give a writable folder") from None
    plan = {p: [out / file_name(p, args.seed, i) for i in range(args.batch)] for p in prompts}
    existing = [str(path) for paths in plan.values() for path in paths if path.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                         "choose another --out folder, or pass --overwrite to replace them")
    return plan


def check_generate_args(args, prompts) -> None:
    """Every check that needs no model: sizes, settings, devices, input paths, LoRA specs."""
    from pathlib import Path

    from .lora import parse_lora_spec
    from .pipeline import check_device, check_request, check_size
    from .resolution import parse_prompt, parse_ratio

    check_request(seed=args.seed, batch=args.batch, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler)
    check_size(args.width, args.height)
    if args.ar is not None:
        if args.width is not None or args.height is not None:
            raise ValueError("give --ar or --width/--height, not both")
        parse_ratio(args.ar)
    for prompt in prompts:
        _, size = parse_prompt(prompt)
        if size is not None:
            check_size(size[1], size[0])
    if args.device is not None:
        check_device(args.device, "--device")
    check_device(args.t5_device, "--t5-device")
    for flag in ("checkpoint", "t5", "vae", "tokenizer"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise ValueError(f"--{flag} {value}: no such file or folder")
    for spec in args.lora:
        path, _ = parse_lora_spec(spec)
        if not Path(path).is_file():
            raise ValueError(f"--lora {spec}: no such file {path}")
        from .lora import check_finite, read_lora

        check_finite(*read_lora(path))  # a damaged LoRA fails before the model and T5 load


def generate_main(args) -> None:
    from tqdm import tqdm

    from .pipeline import DimbaPipeline

    prompts = read_prompts(args)
    check_generate_args(args, prompts)
    plan = plan_outputs(args, prompts)
    dtype = torch_dtype(args.dtype) if args.dtype else None
    pipe = DimbaPipeline.from_files(args.checkpoint, args.t5, args.vae, device=args.device, dtype=dtype,
                                    t5_device=args.t5_device, t5_dtype=args.t5_dtype, tokenizer=args.tokenizer)
    if args.lora:
        from .lora import apply_lora, parse_lora_spec

        for spec in args.lora:
            apply_lora(pipe.model, *parse_lora_spec(spec))
    for prompt, paths in plan.items():
        with tqdm(desc=prompt[:40], unit="step") as bar:
            results = pipe(prompt, negative=args.negative, width=args.width, height=args.height,
                           aspect_ratio=args.ar, steps=args.steps,
                           cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed, batch=args.batch,
                           callback=lambda i, n, x, x0: (setattr(bar, "total", n), bar.update(1)))
        for r, path in zip(results, paths):
            r.image.save(path)
            print(path)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser for argv (default sys.argv[1:]). The train sub-command's parser imports the trainer (and
    torch.distributed), so it is built only when argv's command is train; otherwise a stand-in lists it."""
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

    from .sampling import DEFAULT_STEPS, SAMPLERS

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("--checkpoint", required=True, help="Dimba checkpoint (.pt/.safetensors)")
    gen.add_argument("--t5", required=True, help="T5 v1.1 XXL encoder: Hugging Face folder or .safetensors file")
    gen.add_argument("--vae", required=True, help="SD/SDXL VAE: diffusers folder or .safetensors file")
    gen.add_argument("--tokenizer", help="T5 tokenizer folder if the T5 path has none")
    gen.add_argument("--prompt", action="append", help="prompt; may end with --ar h:w or --hw h:w (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--negative", default="", help="negative prompt (default: empty, as the reference)")
    gen.add_argument("--width", type=int, help="image width in px, multiple of 16, at most 4096")
    gen.add_argument("--height", type=int, help="image height in px, multiple of 16, at most 4096")
    gen.add_argument("--ar", help="aspect ratio h:w, snapped to the reference buckets")
    defaults = ", ".join(f"{name} {n}" for name, n in DEFAULT_STEPS.items())
    gen.add_argument("--steps", type=int, help=f"sampling steps (default: {defaults})")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    gen.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS)
    gen.add_argument("--seed", type=int, default=0, help="0 to 2^64-1; the same seed gives the same image")
    gen.add_argument("--batch", type=int, default=1, help="images per prompt (1 to 64)")
    gen.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: cuda when available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="denoiser dtype (default fp16 on CUDA, fp32 on CPU)")
    gen.add_argument("--t5-device", default="cpu", help="where T5 runs (default cpu)")
    gen.add_argument("--t5-dtype", choices=sorted(DTYPES), help="T5's weights and compute dtype (default bf16: "
                     "8.9 GiB of RAM for T5-XXL instead of 17.7 GiB in fp32; fp16 on a CUDA GPU without bf16)")
    gen.add_argument("--out", required=True, help="output folder for PNGs (named prompt_hash_sSEED_INDEX.png)")
    gen.add_argument("--overwrite", action="store_true", help="replace PNGs of the same name in --out")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                     help="merge a LoRA (.safetensors) into the denoiser, strength 1 by default (repeatable)")
    gen.set_defaults(func=generate_main)

    if _command(argv) == "train":
        from .train.cli import add_train_parser

        add_train_parser(sub)
    else:
        sub.add_parser("train", help="fine-tune Dimba (LoRA or full) on images with captions")
    return parser


def _command(argv) -> str | None:
    """The sub-command argv names: its first argument that is not an option (the main parser has only -h)."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)


def main(argv=None) -> int:
    from .loader import DimbaLoadError
    from .pipeline import GenerationError

    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except (DimbaLoadError, ValueError, OSError, ImportError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
