"""The training loop: LoRA or full fine-tuning, DDP across processes, exact resume, EMA, atomic checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..weights import DTYPES, torch_dtype
from .data import LatentCache, cache_key, encode_samples, find_samples, usable_images
from .objective import NUM_TIMESTEPS, training_losses

PRECISIONS = {name: None if name == "fp32" else torch_dtype(name) for name in DTYPES}  # autocast; fp32: none
OPTIMIZERS = ("came", "adamw")
MAX_NONFINITE_STEPS = 3  # non-finite steps in a row (each skipped) after which the run stops
# arguments a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("seed", "batch_size", "lora_rank", "lora_alpha", "resolution", "image_size", "optimizer",
               "class_dropout_prob", "fsdp")


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
    max_length: int = 300
    progress: bool = True
    fsdp: bool = False  # shard a full fine-tune across processes (FSDP2) instead of replicating it (DDP)
    t5_dtype: str = "bf16"  # T5 is loaded and run in this dtype to encode the captions (fp16/bf16/fp32)
    overwrite: bool = False  # start a new run in a used --out: the old run's log, checkpoints and weights go first

    def __post_init__(self):
        """Values that cannot work are refused before anything loads (ValueError naming the option); every check
        that does not depend on the number of processes or on files is here."""
        from ..config import RESOLUTION_SETTINGS
        from ..pipeline import MAX_SIDE, check_device
        from ..sampling import MAX_SEED

        def bad(name, value, rule):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value!r}")

        for name in ("checkpoint", "data", "out"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                bad(name, value, "a path")
        for name in ("steps", "grad_accum", "encode_batch_size", "max_length"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, getattr(self, name), "a whole number of at least 1")
        for name in ("lora_rank", "save_every", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 0):
                bad(name, value, "a whole number of at least 0")
        if not _whole(self.seed) or not 0 <= self.seed <= MAX_SEED:
            bad("seed", self.seed, "a whole number from 0 to 2^64 - 1")
        if self.image_size is not None and not (_whole(self.image_size) and 16 <= self.image_size <= MAX_SIDE
                                                and self.image_size % 16 == 0):
            bad("image_size", self.image_size, f"a multiple of 16 px from 16 to {MAX_SIDE} (leave it out to train at "
                                               "--resolution or the checkpoint's own size)")
        if self.num_heads is not None and (not _whole(self.num_heads) or self.num_heads < 1):
            bad("num_heads", self.num_heads, "a whole number of at least 1")
        if self.resolution is not None and self.resolution not in RESOLUTION_SETTINGS:
            bad("resolution", self.resolution, f"one of {', '.join(map(str, RESOLUTION_SETTINGS))}")
        for name, choices in (("precision", PRECISIONS), ("save_dtype", DTYPES), ("t5_dtype", DTYPES),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                bad(name, getattr(self, name), f"one of {', '.join(sorted(choices))}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (_real(value) and value > 0):
                bad(name, value, "a positive finite number")
        for name in ("weight_decay", "max_grad_norm"):
            if not (_real(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, getattr(self, name), "a finite number of at least 0")
        if not (_real(self.class_dropout_prob) and 0 <= self.class_dropout_prob <= 1):
            bad("class_dropout_prob", self.class_dropout_prob, "a probability from 0 to 1")
        if not (_real(self.ema_decay) and 0 <= self.ema_decay < 1):
            bad("ema", self.ema_decay, "a decay from 0 (off) to below 1, e.g. 0.9999")
        if self.device is not None:
            check_device(self.device, "--device")
        if self.fsdp and self.lora_rank:
            raise ValueError("--fsdp shards a full fine-tune (no --lora-rank) across several processes (torchrun)")
        if self.fsdp and self.optimizer == "came":
            raise ValueError("--fsdp needs --optimizer adamw: came-pytorch's CAME cannot step sharded (DTensor) "
                             "parameters, and its factored statistics need whole weights")
        if self.resume is not None and self.overwrite:
            raise ValueError("--overwrite starts a new run in --out and --resume continues one: give one of them")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_for(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence mixing: nearby inputs give unrelated
    streams); each part counts whole (a part of 2^32 or more as several 32-bit words)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


# --- files ------------------------------------------------------------------------------------------

WEIGHT_FILES = ("dimba_lora.safetensors", "dimba_lora_ema.safetensors", "dimba_finetuned.safetensors",
                "dimba_finetuned_ema.safetensors")
LOG_FILE = "log.jsonl"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
INPUTS = ("checkpoint", "data", "t5", "vae", "tokenizer")


def cache_folder(opts: TrainOptions) -> Path:
    return Path(opts.cache_dir) if opts.cache_dir else Path(opts.out) / "cache"


def step_files(out: Path) -> dict[int, Path]:
    """{step: path} of the resumable checkpoints OUT/checkpoints/step-NNNNNNN.pt."""
    folder = Path(out) / "checkpoints"
    found = {}
    for path in folder.glob("step-*.pt") if folder.is_dir() else ():
        m = STEP_FILE.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def check_paths(opts: TrainOptions) -> None:
    """Before anything loads: the inputs exist, --out is a folder that the run may use, and no file the run
    writes (or removes with --overwrite) is one of its inputs. Reads only; the same on every process."""
    from ..loader import _same_file

    out, cache = Path(opts.out), cache_folder(opts)
    for path, flag in ((out, "--out"), (cache, "--cache-dir" if opts.cache_dir else "the cache folder")):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; give a folder for the run's outputs (weights, "
                             "checkpoints/, cache/, log.jsonl)")
    inputs = {}
    for flag in INPUTS:
        value = getattr(opts, flag)
        if value is not None:
            if not Path(value).exists():
                raise ValueError(f"--{flag} {value}: no such file or folder")
            inputs[flag] = Path(value)
    outputs = [out / name for name in (*WEIGHT_FILES, LOG_FILE)] + [cache / "cache.safetensors"]
    for flag, path in inputs.items():
        if path.is_dir():
            for folder, what in ((out, "--out"), (cache, "the cache folder")):
                if _same_file(folder, path):
                    raise ValueError(f"{what} {folder} is the --{flag} folder; give the run a folder of its own "
                                     "(a new one, or one that holds only an earlier run)")
            continue
        clash = next((o for o in outputs if _same_file(o, path)), None)
        if clash is None and STEP_FILE.fullmatch(path.name) and _same_file(path.parent, out / "checkpoints"):
            clash = path
        if clash is not None:
            raise ValueError(f"--{flag} {path} is the file {clash} that this run writes: it would replace its own "
                             "input; choose another --out (or --cache-dir), or move the input elsewhere first")
    if opts.resume is not None:
        if opts.resume == "latest":
            if not step_files(out):
                raise ValueError(f"--resume: no checkpoint to continue from in {out / 'checkpoints'} (step-*.pt); "
                                 "leave out --resume to start a run, or give --resume FILE")
        elif not Path(opts.resume).is_file():
            raise ValueError(f"--resume {opts.resume}: no such file; give a checkpoint OUT/checkpoints/step-*.pt "
                             "(or --resume alone for the latest in --out)")
    keep = [out / "cache", cache, cache / "cache.safetensors"]  # a latent cache is checked, and reused
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                   if not any(p == k or _same_file(p, k) for k in keep)) if out.is_dir() else []
    held = f"--out {out} already holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}"
    if found and opts.resume is None and not opts.overwrite:
        raise ValueError(f"{held}: pass --resume to continue the run there, --overwrite to start a new run in its "
                         "place (its log.jsonl, checkpoints/ and weights are removed first), or give an empty or "
                         "new folder")
    if found and opts.resume not in (None, "latest") and not _same_file(Path(opts.resume).parent, out / "checkpoints"):
        raise ValueError(f"{held}, and --resume {opts.resume} is not one of its checkpoints: continue a run in its "
                         "own --out, or into an empty or new folder")


def make_out(opts: TrainOptions) -> None:
    for path, flag in ((Path(opts.out), "--out"), (cache_folder(opts), "--cache-dir")):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot create this folder ({e.strerror}); give a writable "
                             "folder") from None


def clear_previous_run(opts: TrainOptions) -> None:
    """--overwrite: remove what an earlier run wrote to --out (weights, log, checkpoints), never anything else; the
    latent cache stays (it is checked against the data before it is used)."""
    out = Path(opts.out)
    doomed = [out / name for name in (*WEIGHT_FILES, LOG_FILE)] + list(step_files(out).values())
    for name in (*WEIGHT_FILES, LOG_FILE):  # leftovers of interrupted atomic writes
        doomed += out.glob(f".{name}.*.tmp")
    doomed += (out / "checkpoints").glob(".step-*.pt.*.tmp")
    for path in doomed:
        if path.is_file() or path.is_symlink():
            path.unlink()
    with contextlib.suppress(OSError):
        (out / "checkpoints").rmdir()  # only when empty


def trim_log(out: Path, step: int) -> None:
    """Resuming at `step`: drop the log records of later steps (a run interrupted after its last checkpoint)."""
    from ..loader import write_atomically

    path = out / LOG_FILE
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            later = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            later = False
        kept += [] if later else [line]
        dropped += later
    if dropped:
        text = "".join(line + "\n" for line in kept)
        write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- distributed ------------------------------------------------------------------------------------

def init_distributed(device: str | None):
    """(rank, world size, device); starts a process group under torchrun (NCCL on CUDA, Gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    dev = torch.device(f"cuda:{local}" if cuda and world > 1 else (device or ("cuda" if cuda else "cpu")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, dev


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --- model ------------------------------------------------------------------------------------------

def load_for_training(opts: TrainOptions, device):
    """The checkpoint in float32 on device, in train mode; `--resolution` sets base_size and pe_interpolation."""
    from ..config import RESOLUTION_SETTINGS
    from ..loader import load_dimba, read_state_dict

    sd, stored, name = read_state_dict(opts.checkpoint)
    overrides = dict(stored or {})
    if opts.num_heads:
        overrides["num_heads"] = opts.num_heads
    if opts.resolution is not None:
        if opts.resolution not in RESOLUTION_SETTINGS:
            raise ValueError(f"--resolution must be one of {sorted(RESOLUTION_SETTINGS)}, got {opts.resolution}")
        overrides.update(RESOLUTION_SETTINGS[opts.resolution])
        sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # unused buffer shaped by the old base_size
    model = load_dimba(sd, device=device, dtype=torch.float32, **overrides)
    if model.y_embedder.y_embedding.abs().sum() == 0 and opts.class_dropout_prob > 0:
        import warnings

        warnings.warn(f"{name} has no y_embedder.y_embedding (the learned null caption); caption dropout "
                      "trains an all-zero caption instead", stacklevel=2)
    return model.train()


def pick_scan_backend(model, device) -> str:
    """Scan backend `auto`, which picks a scan with a backward while autograd records (mamba-ssm on CUDA,
    else `parallel`); returns the one that will run."""
    from .. import ops

    model.set_scan_backend("auto")
    return ops.resolve_backend("auto", device, needs_grad=True)


def enable_checkpointing(model) -> None:
    """Recompute each attention and Mamba block in the backward pass (keys and outputs unchanged)."""
    from torch.utils.checkpoint import checkpoint

    def wrapped(forward, *args):
        return checkpoint(forward, *args, use_reentrant=False)

    for block in [*model.blocks, *model.mamba_blocks]:
        block.forward = functools.partial(wrapped, block.forward)


class Trainee(torch.nn.Module):
    """The model plus its LoRA adapters as one module, so that DDP sees every trainable parameter."""

    def __init__(self, model, lora=None):
        super().__init__()
        self.model, self.lora = model, lora

    def forward(self, *args):
        return self.model(*args)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    """CAME with the reference's settings (came-pytorch), or AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise ImportError("--optimizer came needs the came-pytorch package: pip install came-pytorch "
                              "(or pip install 'comfyui-dimba[train]'), or use --optimizer adamw") from None
        return CAME(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    raise ValueError(f"unknown optimizer {name!r}; choose came or adamw")


# --- data -------------------------------------------------------------------------------------------

def prepare_cache(opts: TrainOptions, rank: int, world: int, device, image_size: int, config=None) -> LatentCache:
    """Rank 0 finds the cache of the data, or checks and encodes the data once (T5 + VAE, then freed); the other
    ranks then read the cache.

    A cache made from the same files (by their size and time), captions and crop size is reused, without opening
    an image; without --t5/--vae with any encoders, with them only if it was made by the same ones (and T5 dtype).
    A damaged cache is encoded again (with a warning). config: the model's, to check the encoders against.
    """
    folder = cache_folder(opts)
    cache = None
    if rank == 0:
        samples = find_samples(opts.data)
        key = cache_key(samples, image_size, opts.max_length)
        encoders = json.dumps([str(opts.t5), str(opts.vae), opts.t5_dtype]) if opts.t5 and opts.vae else None
        cache = LatentCache.load(folder, key, encoders)
        if cache is None:
            cache = encode_to(folder, key, encoders, samples, opts, device, image_size, config)
    barrier(world)
    if cache is None:  # the other ranks read what rank 0 found or wrote
        cache = LatentCache.load(folder)
    if cache is None:
        raise RuntimeError(f"no latent cache in {folder}")
    return cache


def encode_to(folder, key, encoders, samples, opts: TrainOptions, device, image_size: int,
              config=None) -> LatentCache:
    """Encode the usable samples with T5 (in --t5-dtype) and the VAE (each image decoded once, the unusable
    skipped with a warning), save the cache, free both encoders; returns the cache. The VAE's latent channels and
    T5's width are checked against the model's config before anything is encoded."""
    import gc
    import itertools

    from ..text import T5TextEncoder
    from ..vae import load_vae

    images = usable_images(samples, min_side=max(1, image_size // 2))
    first = next(images)  # a set without a usable image is refused here, before the encoders load
    if not opts.t5 or not opts.vae:
        raise ValueError("the first run on a data set needs --t5 and --vae to encode it "
                         f"(no usable cache for it in {folder})")
    vae = load_vae(opts.vae, device=device, dtype=torch.float32)
    if config is not None and vae.latent_channels != config.in_channels:
        raise ValueError(f"--vae {opts.vae} makes {vae.latent_channels}-channel latents but the model takes "
                         f"{config.in_channels}: use the VAE the checkpoint was trained with (the SDXL VAE for "
                         "the published Dimba models)")
    if opts.t5_dtype == "fp16" and device.type == "cpu":
        import warnings

        warnings.warn("--t5-dtype fp16 on the CPU is very slow (CPUs have no fast fp16 matmuls); bf16 is as small "
                      "and fast", stacklevel=2)
    t5 = T5TextEncoder.from_pretrained(opts.t5, tokenizer=opts.tokenizer, device=device,
                                       dtype=torch_dtype(opts.t5_dtype))
    if config is not None and t5.hidden_size != config.caption_channels:
        raise ValueError(f"--t5 {opts.t5} gives {t5.hidden_size}-wide embeddings but the model takes "
                         f"{config.caption_channels}: use the T5 the model was trained with (T5 v1.1 XXL)")
    cache = encode_samples(itertools.chain([first], images), image_size, t5, vae, batch_size=opts.encode_batch_size,
                           max_length=opts.max_length, progress=opts.progress, total=len(samples))
    cache.save(folder, key, encoders)
    del t5, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cache


class Sampler:
    """Per global sample k of step s: dataset index, timestep, noise, posterior draw and caption dropout.

    Everything is drawn from generators seeded by (seed, step, k), so the batch does not depend on how many
    processes share it, and a resumed run continues exactly.
    """

    def __init__(self, cache: LatentCache, seed: int, batch_size: int, dropout: float):
        self.cache, self.seed, self.batch_size, self.dropout = cache, seed, batch_size, dropout
        self._perm: dict = {}

    def index(self, step: int, k: int) -> int:
        epoch, i = divmod(step * self.batch_size + k, len(self.cache))
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0xDA7A, epoch))
            self._perm = {epoch: torch.randperm(len(self.cache), generator=g)}
        return int(self._perm[epoch][i])

    def batch(self, step: int, ks, null_caption: torch.Tensor, device):
        """x_start, t, y (b x 1 x L x C), mask, noise for the global samples ks of this step; null_caption:
        the learned null caption (L x C, float32 on the CPU)."""
        xs, ts, noises, caps, drops = [], [], [], [], []
        shape = self.cache.mean.shape[1:]
        for k in ks:
            g = torch.Generator().manual_seed(seed_for(self.seed, step, k))
            i = self.index(step, k)
            ts.append(int(torch.randint(0, NUM_TIMESTEPS, (1,), generator=g)))
            xs.append(self.cache.latent(i, torch.randn(shape, generator=g)))
            noises.append(torch.randn(shape, generator=g))
            drops.append(bool(torch.rand(1, generator=g) < self.dropout))
            caps.append(self.cache.caption(i))
        length = max(c.shape[0] for c in caps)
        y = torch.zeros(len(ks), length, caps[0].shape[1])
        mask = torch.zeros(len(ks), length, dtype=torch.long)
        for j, c in enumerate(caps):
            y[j, : c.shape[0]], mask[j, : c.shape[0]] = c, 1
            if drops[j]:  # the learned null caption, with the caption's own mask (as the reference)
                y[j] = null_caption[:length]
        to = functools.partial(torch.Tensor.to, device=device)
        return (to(torch.stack(xs)), to(torch.tensor(ts)), to(y[:, None]), to(mask), to(torch.stack(noises)))


# --- state ------------------------------------------------------------------------------------------

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor gathered whole (a collective: every rank calls it); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model) -> None:
    """FSDP2: each attention and Mamba block its own unit, the rest in the root unit."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Dimba's forward adds block outputs out of place, so FSDP's warning about returned views does not apply
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in [*model.blocks, *model.mamba_blocks]:
        fully_shard(block)
    fully_shard(model)


def placed_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor on param's device and dtype, sharded as param is under FSDP (a collective there)."""
    whole = whole.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole, param.device_mesh, param.placements)
    return whole


def full_model_state(model, fsdp: bool, rank: int) -> dict:
    """The model's whole state dict on the CPU, on rank 0 (which alone writes; empty elsewhere); under FSDP a
    collective that every rank joins."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else {}


def gather_state(model, lora, optimizer, fsdp: bool, rank: int) -> tuple[dict, dict]:
    """(trained tensors, optimizer state), whole and on the CPU, on rank 0 (empty elsewhere); under FSDP a
    collective that every rank joins. Without FSDP the tensors may share memory with the live ones (on the
    CPU): save them before the next step."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}, {}
    trained = lora.state_dict() if lora is not None else model.state_dict()
    return {k: v.detach().cpu() for k, v in trained.items()}, optimizer.state_dict()


def gathered(tensors: dict, rank: int) -> dict | None:
    """The tensors whole and on the CPU on rank 0, None elsewhere; a sharded (FSDP) one is gathered, a collective
    that every rank joins. They may share memory with the live ones (on the CPU)."""
    out = {}
    for k, v in tensors.items():
        v = full_tensor(v).detach()
        if rank == 0:
            out[k] = v.cpu()
    return out if rank == 0 else None


def restore_state(model, lora, optimizer, state: dict, fsdp: bool, path=None) -> None:
    """Load the trained tensors and the optimizer state of a checkpoint (each rank reads the whole file)."""
    from ..weights import DimbaLoadError

    try:
        _restore(model, lora, optimizer, state, fsdp)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DimbaLoadError(f"--resume {path}: its optimizer or model state does not fit this run "
                             f"({type(e).__name__}: {first}); the file is damaged or from another run") from None


def _restore(model, lora, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["trained"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    (lora if lora is not None else model).load_state_dict(state["trained"])
    optimizer.load_state_dict(state["optimizer"])


def latest_checkpoint(out: Path) -> Path | None:
    found = step_files(out)
    return found[max(found)] if found else None


CHECKPOINT_KEYS = ("step", "options", "trained", "optimizer", "scheduler", "scaler", "rng")
RESUME_WANTS = ("--resume takes a training checkpoint that `python -m dimba_core train` writes "
                "(OUT/checkpoints/step-NNNNNNN.pt)")


def read_checkpoint_file(path: Path) -> dict:
    """A training checkpoint's contents, structure checked; never runs pickled code (torch.load weights_only).
    Anything else (a model or LoRA file, a damaged or hostile file) is one DimbaLoadError saying what it is."""
    from ..loader import SAFE_PICKLE_TORCH, torch_version
    from ..weights import DimbaLoadError

    what = f"--resume {path}"
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{":
        kind = "a LoRA" if _is_lora(path) else "a model"
        raise DimbaLoadError(f"{what} is a .safetensors weights file ({kind}), not a training checkpoint; "
                             f"{RESUME_WANTS}. To train on from a fine-tuned model, give it as --checkpoint")
    if torch_version() < SAFE_PICKLE_TORCH:
        raise DimbaLoadError(f"{what}: refused: torch {torch.__version__} can run code hidden in a pickle even with "
                             "weights_only=True (CVE-2025-32434); upgrade torch to 2.6 or later to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unsafe pickle"])[0]
        if "weights only" in first.lower():
            raise DimbaLoadError(f"{what}: refused to load: the pickle holds objects other than tensors and plain "
                                 "containers, and loading them could run code; it is not a checkpoint of this "
                                 f"trainer. {RESUME_WANTS}") from None
        raise DimbaLoadError(f"{what}: not a torch checkpoint ({first}); {RESUME_WANTS}") from None
    except Exception as e:
        first = re.split(r"(?<=\w)\. ", (str(e).strip().splitlines() or [""])[0])[0][:160]  # its first sentence
        raise DimbaLoadError(f"{what}: cannot read this checkpoint ({type(e).__name__}: {first}); it is truncated "
                             f"or damaged: resume from an earlier step-*.pt. {RESUME_WANTS}") from None
    if not isinstance(state, dict):
        raise DimbaLoadError(f"{what} holds a {type(state).__name__}, not a training checkpoint; {RESUME_WANTS}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        tensors = all(isinstance(v, torch.Tensor) for v in state.values())
        if state and (tensors or "state_dict" in state):
            kind = "a LoRA's" if any(str(k).endswith("lora_down.weight") for k in state) else "a model's"
            raise DimbaLoadError(f"{what} holds {kind} weights, not a training checkpoint (no optimizer state or "
                                 f"step); {RESUME_WANTS}. To train on from a fine-tuned model, give it as "
                                 "--checkpoint")
        raise DimbaLoadError(f"{what} is not a training checkpoint (no {', '.join(missing)}); {RESUME_WANTS}")
    problem = None
    if not _whole(state["step"]) or state["step"] < 0:
        problem = f"step {state['step']!r}"
    elif not isinstance(state["options"], dict):
        problem = "options"
    elif not isinstance(state["trained"], dict) or not all(isinstance(v, torch.Tensor)
                                                            for v in state["trained"].values()):
        problem = "trained tensors"
    elif not (state.get("ema") is None or isinstance(state["ema"], dict)):
        problem = "EMA"
    elif not all(isinstance(state[k], dict) for k in ("optimizer", "scheduler", "scaler", "rng")):
        problem = "optimizer, scheduler, scaler or random state"
    elif not (isinstance(state["rng"].get("torch"), torch.Tensor) and state["rng"]["torch"].dtype == torch.uint8):
        problem = "random state"
    if problem:
        raise DimbaLoadError(f"{what}: its {problem} is malformed; the file is damaged or not written by this "
                             f"trainer. {RESUME_WANTS}")
    return state


def _is_lora(path: Path) -> bool:
    try:
        from ..weights import open_safetensors

        with open_safetensors(path) as f:
            return any(k.endswith(("lora_down.weight", "lora_A.weight", ".diff")) for k in f.keys())
    except Exception:
        return False


def load_checkpoint(opts: TrainOptions) -> tuple[Path, dict]:
    """(path, contents) of the checkpoint --resume names (or the latest in --out), checked to come from a run
    with the same options; a later step already in --out would be picked by a later --resume, so it is refused."""
    out = Path(opts.out)
    path = latest_checkpoint(out) if opts.resume == "latest" else Path(opts.resume)
    if path is None or not path.is_file():
        raise ValueError(f"--resume: no checkpoint found ({opts.resume if opts.resume != 'latest' else opts.out})")
    state = read_checkpoint_file(path)
    differ = {k: (state["options"].get(k), getattr(opts, k)) for k in RESUME_KEYS
              if state["options"].get(k) != getattr(opts, k)}
    if differ:
        raise ValueError(f"--resume {path}: these options differ from the run that wrote it (was, now): {differ}")
    later = sorted(p.name for step, p in step_files(out).items() if step > state["step"])
    if later:
        raise ValueError(f"--resume {path} continues step {state['step']}, but {out / 'checkpoints'} already holds "
                         f"later steps ({', '.join(later[:3])}) that a later --resume would pick: move them away "
                         "first, or resume into another --out")
    return path, state


def check_resume_fits(path: Path, state: dict, expected: dict, opts: TrainOptions) -> None:
    """The checkpoint's trained tensors must be this run's (the same model and LoRA rank), names and shapes."""
    from ..weights import DimbaLoadError, show

    found = {k: tuple(v.shape) for k, v in state["trained"].items()}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (this run: {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    if missing or extra or wrong:
        was = state["options"]
        report = "; ".join(f"{label}: {show(items, 3)}" for label, items in
                           (("wrong shapes", wrong), ("missing", missing), ("unexpected", extra)) if items)
        raise DimbaLoadError(f"--resume {path} was written for another model or LoRA rank (it trained "
                             f"{was.get('checkpoint')!s} with --lora-rank {was.get('lora_rank')}): its trained tensors "
                             f"do not fit this run ({report}); resume with the --checkpoint of the run that wrote it")


def trained_shapes(opts: TrainOptions, model) -> dict:
    """{name: shape} of what this run trains and checkpoints: the model's state dict, or the LoRA's."""
    if not opts.lora_rank:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from .lora import LoRANetwork

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        lora = LoRANetwork(model, opts.lora_rank, opts.lora_alpha)
    return {k: tuple(v.shape) for k, v in lora.state_dict().items()}


def write_outputs(opts: TrainOptions, model, lora, ema: dict | None, rank: int, model_sd: dict) -> dict:
    """OUT/dimba_lora.safetensors (LoRA) or OUT/dimba_finetuned.safetensors (full), plus *_ema with EMA."""
    from safetensors.torch import save_file

    from ..loader import save_state_dict, write_atomically

    if rank != 0:
        return {}
    out, dtype = Path(opts.out), torch_dtype(opts.save_dtype)
    writes = {}  # kind -> (path, write); every file is checked before the first is written
    for suffix, weights in (("", None), ("_ema", ema)):
        if suffix and weights is None:
            continue
        if lora is not None:
            saved = {k: v.detach().clone() for k, v in lora.state_dict().items()}
            if weights is not None:
                lora.load_state_dict(weights)
            sd = lora.to_comfy_state_dict(dtype)
            lora.load_state_dict(saved)
            _check_fits(sd, dtype, opts.save_dtype)
            path = out / f"dimba_lora{suffix}.safetensors"
            meta = {"format": "pt", "dimba_config": model.config.to_json(), "rank": str(opts.lora_rank)}
            if lora.reduced_ranks():  # layers with fewer inputs or outputs than the rank: their (full) rank
                meta["layer_ranks"] = json.dumps(lora.reduced_ranks())
            write = functools.partial(write_atomically, path, functools.partial(save_file, sd, metadata=meta))
        else:  # each tensor in the dtype a model of save_dtype keeps it in (the Mamba SSM parameters stay float32)
            path = out / f"dimba_finetuned{suffix}.safetensors"
            sd = {**model_sd, **(weights or {})}
            _check_fits(sd, dtype, opts.save_dtype)
            write = functools.partial(save_state_dict, sd, model.config, path, dtype)
        writes["ema" if suffix else "weights"] = (path, write)
    for path, write in writes.values():
        write()
    return {kind: path for kind, (path, _) in writes.items()}


# --- the loop ---------------------------------------------------------------------------------------

def train(opts: TrainOptions) -> dict:
    """Run a training job; returns {"weights": path, "ema": path?, "losses": [...], "step_seconds": [...]}."""
    check_paths(opts)  # every process, before any of them writes
    rank, world, device = init_distributed(opts.device)
    try:
        micro, rest = divmod(opts.batch_size, world * opts.grad_accum)
        if opts.batch_size < 1 or rest or micro < 1:
            raise ValueError(f"--batch-size {opts.batch_size} must be a positive multiple of processes "
                             f"({world}) x --grad-accum ({opts.grad_accum})")
        if opts.fsdp and world < 2:
            raise ValueError("--fsdp shards a full fine-tune (no --lora-rank) across several processes (torchrun)")
        resumed = load_checkpoint(opts) if opts.resume else None
        if rank == 0:
            make_out(opts)
        model = load_for_training(opts, device)
        native = model.config.base_size * model.config.patch_size * 8
        if opts.lora_rank and opts.resolution:
            import warnings

            warnings.warn(f"a LoRA trained at --resolution {opts.resolution} is applied onto the base checkpoint's "
                          "own position-embedding settings (ComfyUI and apply_lora patch weights only); adapt the "
                          "resolution with a full fine-tune, as the reference does", stacklevel=2)
        image_size = opts.image_size or opts.resolution or native
        multiple = 8 * model.config.patch_size
        if image_size % multiple:
            raise ValueError(f"--image-size {image_size} must be a multiple of {multiple} for this model")
        if opts.max_length > model.config.model_max_length:
            raise ValueError(f"max_length {opts.max_length} is longer than the model's captions "
                             f"({model.config.model_max_length} tokens, its learned null caption)")
        if resumed is not None:
            check_resume_fits(*resumed, trained_shapes(opts, model), opts)
        barrier(world)  # rank 0 made --out
        cache = prepare_cache(opts, rank, world, device, image_size, model.config)
        problems = []
        if cache.tokens.shape[1] != model.config.caption_channels:
            problems.append(f"captions {cache.tokens.shape[1]} wide, the model takes "
                            f"{model.config.caption_channels} (use the T5 the model was trained with)")
        if tuple(cache.mean.shape[1:]) != (model.config.in_channels, image_size // 8, image_size // 8):
            problems.append(f"latents of shape {tuple(cache.mean.shape[1:])}, the model takes "
                            f"{(model.config.in_channels, image_size // 8, image_size // 8)} at {image_size} px "
                            "(use the VAE the model was trained with)")
        if problems:
            raise ValueError(f"the latent cache in {cache_folder(opts)} does not fit the model: {'; '.join(problems)}"
                             "; pass --t5 and --vae to encode the data again")
        return _run(opts, model, cache, rank, world, device, micro, resumed)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class TrainingDiverged(ValueError):
    """The loss or the trained weights went NaN or infinite; nothing non-finite was written."""


def all_finite(tensors, device, world: int) -> bool:
    """Whether every tensor is finite on every process (sharded tensors: each its own shards; a collective)."""
    ok = torch.ones((), device=device)
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            ok.zero_()
            break
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def _run(opts, model, cache, rank, world, device, micro, resumed=None) -> dict:
    import warnings

    from ..loader import write_atomically
    from ..weights import DimbaLoadError
    from .lora import LoRANetwork

    backend = pick_scan_backend(model, device)
    torch.manual_seed(opts.seed)  # LoRA initialisation: the same on every rank and for every world size
    lora = None
    if opts.lora_rank:
        model.requires_grad_(False)
        lora = LoRANetwork(model, opts.lora_rank, opts.lora_alpha).to(device).attach(model)
        reduced = lora.reduced_ranks()
        if reduced and rank == 0:
            sizes = sorted(set(reduced.values()))
            warnings.warn(f"--lora-rank {opts.lora_rank}: {len(reduced)} of the {len(lora.names)} layers have fewer "
                          f"inputs or outputs ({next(iter(reduced))} and others: rank {', '.join(map(str, sizes))}) "
                          "and get their full rank instead, at the same scale alpha/rank; the LoRA file records "
                          "them in its metadata ('layer_ranks')", stacklevel=3)
    else:
        model.requires_grad_(True)
    if opts.grad_checkpointing:
        enable_checkpointing(model)
    trainee = Trainee(model, lora)
    net = trainee
    if opts.fsdp:
        shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in trainee.parameters() if p.requires_grad]  # after sharding: FSDP swaps them for DTensors
    names = [n for n, p in trainee.named_parameters() if p.requires_grad]
    lr = opts.lr or (1e-4 if lora is not None else 2e-5)
    optimizer = make_optimizer(opts.optimizer, params, lr, opts.weight_decay)
    warmup = opts.warmup_steps if opts.warmup_steps is not None else min(1000, opts.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    amp_dtype = PRECISIONS[opts.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    ema = {n: p.detach().clone() for n, p in zip(names, params)} if opts.ema_decay else None
    start = 0
    if resumed is not None:
        path, state = resumed
        restore_state(model, lora, optimizer, state, opts.fsdp, path)
        try:
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema") is not None:
                ema = {n: placed_like(state["ema"][n], p) for n, p in zip(names, params)}
            torch.set_rng_state(state["rng"]["torch"])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise DimbaLoadError(f"--resume {path}: its schedule, scaler, EMA or random state does not fit this run "
                                 f"({type(e).__name__}: {e}); the file is damaged or from another run") from None
        start = state["step"]
        was = scheduler.base_lrs[0]
        if opts.lr is not None and opts.lr != was:  # a given --lr applies from here on; without one, the run's own
            scheduler.base_lrs = [opts.lr] * len(optimizer.param_groups)
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = opts.lr, opts.lr * factor
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            if rank == 0:
                warnings.warn(f"--lr {opts.lr:g} replaces the lr {was:g} of the run that wrote {path.name} from step "
                              f"{start} on", stacklevel=3)
    sampler = Sampler(cache, opts.seed, opts.batch_size, opts.class_dropout_prob)
    null_caption = model.y_embedder.y_embedding.detach().float().cpu()  # a buffer: fixed during training
    out = Path(opts.out)
    if rank == 0:
        if opts.overwrite:
            clear_previous_run(opts)
        elif resumed is not None:
            trim_log(out, start)
    barrier(world)
    log = (out / LOG_FILE).open("a") if rank == 0 else None
    bar = None
    if rank == 0 and opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=start, desc=f"train ({'LoRA' if lora else 'full'}, {backend} scan)",
                   unit="step")
    losses, step_seconds = [], []
    per_step = opts.batch_size // opts.grad_accum
    bad_steps = []  # the non-finite steps in a row up to now
    try:
        for step in range(start, opts.steps):
            t0 = time.perf_counter()
            total = torch.zeros(3, dtype=torch.float64, device=device)
            for a in range(opts.grad_accum):
                first = a * per_step + rank * micro
                x0, t, y, mask, noise = sampler.batch(step, range(first, first + micro), null_caption, device)
                sync = a == opts.grad_accum - 1
                if opts.fsdp:
                    model.set_requires_gradient_sync(sync)
                ctx = net.no_sync() if not sync and world > 1 and not opts.fsdp else contextlib.nullcontext()
                with ctx, torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
                    terms = training_losses(net, x0, t, y, mask, noise)
                    loss = terms["loss"].sum() * (world / opts.batch_size)
                scaler.scale(loss).backward()
                total += torch.stack([terms[k].detach().double().sum() for k in ("loss", "mse", "vb")])
            if step == start:
                unused = [n for n, p in zip(names, params) if p.grad is None]
                if unused:
                    raise RuntimeError(f"{len(unused)} trainable tensors got no gradient ({', '.join(unused[:3])}): "
                                       f"the {backend} scan path bypasses them; train with another scan backend")
            if world > 1:
                dist.all_reduce(total)
            total = (total / opts.batch_size).tolist()
            scaler.unscale_(optimizer)
            clip = opts.max_grad_norm if opts.max_grad_norm > 0 else math.inf
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
            # the loss terms (the objective zeroes a NaN loss, not mse/vb) and, unless fp16's scaler skips
            # overflowing steps itself, the gradient: a non-finite step is skipped, several in a row stop the run
            finite = all(map(math.isfinite, total)) and (scaler.is_enabled() or math.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None and finite:
                with torch.no_grad():
                    for n, p in zip(names, params):
                        ema[n].lerp_(p.detach(), 1 - opts.ema_decay)
            step_seconds.append(time.perf_counter() - t0)
            losses.append(total[0] if finite else math.nan)
            done = step + 1
            bad_steps = [] if finite else bad_steps + [done]
            if rank == 0:
                clean = [v if math.isfinite(v) else None for v in (*total, grad_norm)]
                record = dict(step=done, loss=clean[0] if finite else None, mse=clean[1], vb=clean[2],
                              lr=scheduler.get_last_lr()[0], grad_norm=clean[3], seconds=step_seconds[-1])
                log.write(json.dumps(record if finite else dict(record, skipped=True)) + "\n")
                log.flush()
                if not finite:
                    warnings.warn(f"step {done}: the loss or gradient is NaN or infinite; the step is skipped (no "
                                  "weight update)", stacklevel=3)
                if bar is not None:
                    bar.set_postfix(loss=f"{total[0]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    bar.update(1)
            if len(bad_steps) >= MAX_NONFINITE_STEPS:
                raise TrainingDiverged(
                    f"training diverged: the loss was NaN or infinite in {len(bad_steps)} steps in a row (steps "
                    f"{bad_steps[0]}-{bad_steps[-1]}, skipped); lower the learning rate (it is "
                    f"{scheduler.get_last_lr()[0]:g}), keep --max-grad-norm on, or train in --precision fp32/bf16. "
                    f"{_last_good(out)}")
            if (opts.save_every and done % opts.save_every == 0) or done == opts.steps:
                _check_finite(params, ema, device, world, out, done)
                trained, optim_state = gather_state(model, lora, optimizer, opts.fsdp, rank)
                ema_copy = None if ema is None else gathered(ema, rank)
                if rank == 0:
                    path = out / "checkpoints" / f"step-{done:07d}.pt"
                    path.parent.mkdir(exist_ok=True)
                    saved = dict(step=done, options=dataclasses.asdict(opts), trained=trained,
                                 optimizer=optim_state, scheduler=scheduler.state_dict(),
                                 scaler=scaler.state_dict(), ema=ema_copy, rng={"torch": torch.get_rng_state()})
                    write_atomically(path, functools.partial(torch.save, saved))
                barrier(world)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    _check_finite(params, ema, device, world, out, opts.steps)
    model_sd = full_model_state(model, opts.fsdp, rank) if lora is None else {}
    paths = write_outputs(opts, model, lora, _strip(ema, lora, rank), rank, model_sd)
    barrier(world)
    return dict(paths, losses=losses, step_seconds=step_seconds, scan_backend=backend)


def _check_fits(sd: dict, dtype, name: str) -> None:
    """Weights that turn infinite in the output dtype (beyond fp16's 65504) are refused, not written."""
    for key, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v.to(dtype)).all()):
            raise TrainingDiverged(f"the trained weight {key} does not fit in --save-dtype {name} (it would hold "
                                   "infinite values), so nothing was written; save in fp32 or bf16, or train with a "
                                   "lower learning rate")


def _last_good(out: Path) -> str:
    last = latest_checkpoint(out)
    return (f"Nothing non-finite was written; the last checkpoint is {last}." if last else
            "Nothing non-finite was written.")


def _check_finite(params, ema, device, world: int, out: Path, step: int) -> None:
    """Refuse to write trained weights (or their EMA) that hold NaN or infinite values: a collective."""
    if not all_finite([*params, *(ema.values() if ema else ())], device, world):
        raise TrainingDiverged(f"training diverged: the trained weights hold NaN or infinite values at step {step}, "
                               f"so they are not written; lower the learning rate. {_last_good(out)}")


def _strip(ema: dict | None, lora, rank: int) -> dict | None:
    """EMA tensors keyed like the trained module's state dict (drop the Trainee's model./lora. prefix), whole and
    on the CPU on rank 0 (None elsewhere; under FSDP a collective)."""
    if ema is None:
        return None
    prefix = "lora." if lora is not None else "model."
    return gathered({n[len(prefix):]: v for n, v in ema.items()}, rank)

