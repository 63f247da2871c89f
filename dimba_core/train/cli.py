"""`python -m dimba_core train ...` (also under `torchrun --nproc-per-node N -m dimba_core train ...`)."""
from __future__ import annotations

import argparse
import dataclasses

from ..config import RESOLUTION_SETTINGS
from ..dtypes import DTYPES
from .options import TrainOptions


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Register the `train` sub-command on the main parser's subparsers."""
    p = sub.add_parser("train", help="fine-tune Dimba (LoRA or full) on images with captions",
                       description="Fine-tune a Dimba checkpoint with the reference objective. Run it under "
                                   "torchrun --nproc-per-node N for several processes (DDP).")
    p.add_argument("--checkpoint", required=True, help="Dimba checkpoint to start from (.pt/.safetensors)")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions, or a JSONL "
                                                 'of {"image": path, "caption": text}')
    p.add_argument("--out", required=True,
                   help="output folder (weights, checkpoints/, cache/, log.jsonl); must be new or empty (a cache/ "
                        "in it is fine) unless --resume or --overwrite is given; no output may be an input file")
    p.add_argument("--t5", help="T5 v1.1 XXL encoder (folder or .safetensors); needed to build the cache")
    p.add_argument("--vae", help="SDXL VAE (diffusers folder or .safetensors); needed to build the cache")
    p.add_argument("--tokenizer", help="T5 tokenizer folder if the T5 path has none")
    p.add_argument("--t5-dtype", choices=sorted(DTYPES),
                   help="dtype T5 is loaded and run in to encode the captions (default %(default)s; fp16 is very "
                        "slow on a CPU); a cache made in another dtype is not reused with --t5/--vae")
    p.add_argument("--cache-dir", help="where the encoded data is kept (default OUT/cache)")
    p.add_argument("--steps", type=int, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int,
                   help="global batch: all processes and accumulation steps (default %(default)s)")
    p.add_argument("--grad-accum", type=int,
                   help="gradient accumulation steps per optimizer step (default %(default)s)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-5 full, as the reference; 1e-4 LoRA; with "
                                            "--resume: the resumed run's, unless given)")
    p.add_argument("--seed", type=int, help="0 to 2^64-1 (default %(default)s)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank on the attention and Mamba projections (default "
                                                 "%(default)s); 0: full fine-tuning. A layer with fewer inputs or "
                                                 "outputs gets its full rank (recorded in the file)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--resolution", type=int, choices=tuple(RESOLUTION_SETTINGS),
                   help="train at this resolution with the reference's base_size / pe_interpolation "
                        "(resolution adaptation, e.g. a 512 px checkpoint at 1024)")
    p.add_argument("--image-size", type=int, help="crop size in px, a multiple of 16 from 16 to 4096 (default: "
                                                  "--resolution or the checkpoint's)")
    p.add_argument("--optimizer", choices=("came", "adamw"),
                   help="came (the reference's; pip install came-pytorch) or adamw (default %(default)s)")
    p.add_argument("--weight-decay", type=float, help="(default %(default)s)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up, then constant (default min(1000, steps/10))")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default %(default)s; 0: off)")
    p.add_argument("--class-dropout-prob", type=float,
                   help="probability of replacing a caption by the learned null caption (default %(default)s)")
    p.add_argument("--precision", choices=sorted(DTYPES),
                   help="autocast dtype (default %(default)s); master weights stay float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    p.add_argument("--ema", type=float, dest="ema_decay", metavar="DECAY",
                   help="keep an EMA of the trained weights with this decay (e.g. 0.9999); 0: off")
    p.add_argument("--save-every", type=int, help="write a resumable checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue the run in --out from its latest OUT/checkpoints/step-*.pt (or from FILE, a "
                        "checkpoint of a run with the same options); later log records are dropped")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --out that holds an earlier one: its log.jsonl, checkpoints/ and "
                        "weights are removed before the first step (other files and the cache stay)")
    p.add_argument("--fsdp", action="store_true",
                   help="full fine-tuning under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                        "instead of replicating them (DDP); for Dimba-G-2")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: cuda when available; torchrun: one GPU "
                                    "per process)")
    p.add_argument("--save-dtype", choices=sorted(DTYPES), help="dtype of the output (default %(default)s)")
    p.add_argument("--num-heads", type=int, help="attention heads if the checkpoint does not say (default 16)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # the defaults are TrainOptions' own, so that the command line and the Python API cannot drift apart
    p.set_defaults(func=train_main, **{f.name: f.default for f in dataclasses.fields(TrainOptions)
                                       if f.default is not dataclasses.MISSING})
    return p


def train_main(args) -> None:
    """Build TrainOptions from parsed arguments and run."""
    from .loop import train

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(opts)
    for kind in ("weights", "ema"):
        if kind in result:
            print(f"wrote {result[kind]}")
