"""TrainOptions: every setting of a run, with each check that needs neither the files nor the number of processes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config import CAPTION_LENGTH
from ..dtypes import DTYPES, torch_dtype

PRECISIONS = {name: None if name == "fp32" else torch_dtype(name) for name in DTYPES}  # autocast; fp32: none
OPTIMIZERS = ("came", "adamw")


@dataclass
class TrainOptions:
    """Everything a training run needs; the command line fills it field by field."""

    checkpoint: str
    data: str
    out: str
    t5: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    steps: int = 1000
    batch_size: int = 4  # global: all processes and accumulation steps together
    grad_accum: int = 1
    lr: float | None = None  # 2e-5 full (the reference), 1e-4 LoRA
    seed: int = 0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # None: the rank (scale 1)
    resolution: int | None = None  # 512/1024/2048: base_size and pe_interpolation as the reference sets them
    image_size: int | None = None  # crop size in px (default: the resolution)
    optimizer: str = "came"
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: min(1000, steps // 10)
    max_grad_norm: float = 0.05
    class_dropout_prob: float = 0.1
    precision: str = "fp32"
    grad_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    save_every: int = 0
    resume: str | None = None  # checkpoint path or "latest"
    cache_dir: str | None = None
    device: str | None = None
    save_dtype: str = "fp32"
    num_heads: int | None = None
    encode_batch_size: int = 8
    max_length: int = CAPTION_LENGTH
    progress: bool = True
    fsdp: bool = False  # shard a full fine-tune across processes (FSDP2) instead of replicating it (DDP)
    t5_dtype: str = "bf16"  # T5 is loaded and run in this dtype to encode the captions (fp16/bf16/fp32)
    overwrite: bool = False  # start a new run in a used --out: the old run's log, checkpoints and weights go first

    def __post_init__(self):
        """Values that cannot work are refused before anything loads (ValueError naming the option)."""
        check_options(self)

    @property
    def learning_rate(self) -> float:
        """--lr, or the default: 2e-5 for a full fine-tune (the reference's), 1e-4 for a LoRA."""
        return self.lr or (1e-4 if self.lora_rank else 2e-5)

    @property
    def warmup(self) -> int:
        """Linear warm-up steps: --warmup-steps, or min(1000, steps // 10)."""
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 10)


def check_options(opts: TrainOptions) -> None:
    """Every check that does not depend on the number of processes or on files; ValueError naming the option."""
    from ..config import RESOLUTION_SETTINGS
    from ..pipeline import MAX_SIDE, check_device
    from ..sampling import MAX_SEED

    def bad(name, value, rule):
        raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value!r}")

    for name in ("checkpoint", "data", "out"):
        value = getattr(opts, name)
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            bad(name, value, "a path")
    for name in ("steps", "grad_accum", "encode_batch_size", "max_length"):
        if not _whole(getattr(opts, name)) or getattr(opts, name) < 1:
            bad(name, getattr(opts, name), "a whole number of at least 1")
    for name in ("lora_rank", "save_every", "warmup_steps"):
        value = getattr(opts, name)
        if value is not None and (not _whole(value) or value < 0):
            bad(name, value, "a whole number of at least 0")
    if not _whole(opts.seed) or not 0 <= opts.seed <= MAX_SEED:
        bad("seed", opts.seed, "a whole number from 0 to 2^64 - 1")
    if opts.image_size is not None and not (_whole(opts.image_size) and 16 <= opts.image_size <= MAX_SIDE
                                            and opts.image_size % 16 == 0):
        bad("image_size", opts.image_size, f"a multiple of 16 px from 16 to {MAX_SIDE} (leave it out to train at "
                                           "--resolution or the checkpoint's own size)")
    if opts.num_heads is not None and (not _whole(opts.num_heads) or opts.num_heads < 1):
        bad("num_heads", opts.num_heads, "a whole number of at least 1")
    if opts.resolution is not None and opts.resolution not in RESOLUTION_SETTINGS:
        bad("resolution", opts.resolution, f"one of {', '.join(map(str, RESOLUTION_SETTINGS))}")
    for name, choices in (("precision", PRECISIONS), ("save_dtype", DTYPES), ("t5_dtype", DTYPES),
                          ("optimizer", OPTIMIZERS)):
        if getattr(opts, name) not in choices:
            bad(name, getattr(opts, name), f"one of {', '.join(sorted(choices))}")
    for name in ("lr", "lora_alpha"):
        value = getattr(opts, name)
        if value is not None and not (_real(value) and value > 0):
            bad(name, value, "a positive finite number")
    for name in ("weight_decay", "max_grad_norm"):
        if not (_real(getattr(opts, name)) and getattr(opts, name) >= 0):
            bad(name, getattr(opts, name), "a finite number of at least 0")
    if not (_real(opts.class_dropout_prob) and 0 <= opts.class_dropout_prob <= 1):
        bad("class_dropout_prob", opts.class_dropout_prob, "a probability from 0 to 1")
    if not (_real(opts.ema_decay) and 0 <= opts.ema_decay < 1):
        bad("ema", opts.ema_decay, "a decay from 0 (off) to below 1, e.g. 0.9999")
    if opts.device is not None:
        check_device(opts.device, "--device")
    if opts.fsdp and opts.lora_rank:
        raise ValueError(FSDP_NEEDS_PROCESSES)
    if opts.fsdp and opts.optimizer == "came":
        raise ValueError("--fsdp needs --optimizer adamw: came-pytorch's CAME cannot step sharded (DTensor) "
                         "parameters, and its factored statistics need whole weights")
    if opts.resume is not None and opts.overwrite:
        raise ValueError("--overwrite starts a new run in --out and --resume continues one: give one of them")


FSDP_NEEDS_PROCESSES = "--fsdp shards a full fine-tune (no --lora-rank) across several processes (torchrun)"


def micro_batch(opts: TrainOptions, world: int) -> int:
    """Samples per process and accumulation step; the checks that need the number of processes."""
    micro, rest = divmod(opts.batch_size, world * opts.grad_accum)
    if opts.batch_size < 1 or rest or micro < 1:
        raise ValueError(f"--batch-size {opts.batch_size} must be a positive multiple of processes "
                         f"({world}) x --grad-accum ({opts.grad_accum})")
    if opts.fsdp and world < 2:
        raise ValueError(FSDP_NEEDS_PROCESSES)
    return micro


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
