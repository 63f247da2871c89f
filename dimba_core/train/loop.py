"""The training loop: LoRA or full fine-tuning, DDP across processes, exact resume, EMA, atomic checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..weights import DTYPES, torch_dtype
from .data import LatentCache, cache_key, encode_samples, find_samples, usable_images
from .objective import NUM_TIMESTEPS, training_losses

PRECISIONS = {name: None if name == "fp32" else torch_dtype(name) for name in DTYPES}  # autocast; fp32: none
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

    def __post_init__(self):
        """Numbers that cannot work are refused before anything loads (ValueError naming the option)."""
        def bad(name, value, rule):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value!r}")

        for name in ("steps", "grad_accum", "encode_batch_size", "max_length"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, getattr(self, name), "a whole number of at least 1")
        for name in ("lora_rank", "save_every", "warmup_steps", "seed"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 0):
                bad(name, value, "a whole number of at least 0")
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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing: nearby inputs give unrelated streams)."""
    import numpy as np

    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]) >> 1


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

def prepare_cache(opts: TrainOptions, rank: int, world: int, device, image_size: int) -> LatentCache:
    """Rank 0 finds the cache of the data, or checks and encodes the data once (T5 + VAE, then freed); the other
    ranks then read the cache.

    A cache made from the same files (by their size and time), captions and crop size is reused, without opening
    an image; without --t5/--vae with any encoders, with them only if it was made by the same ones.
    """
    folder = Path(opts.cache_dir or Path(opts.out) / "cache")
    cache = None
    if rank == 0:
        samples = find_samples(opts.data)
        key = cache_key(samples, image_size, opts.max_length)
        encoders = json.dumps([str(opts.t5), str(opts.vae)]) if opts.t5 and opts.vae else None
        cache = LatentCache.load(folder, key, encoders)
        if cache is None:
            cache = encode_to(folder, key, encoders, samples, opts, device, image_size)
    barrier(world)
    if cache is None:  # the other ranks read what rank 0 found or wrote
        cache = LatentCache.load(folder)
    if cache is None:
        raise RuntimeError(f"no latent cache in {folder}")
    return cache


def encode_to(folder, key, encoders, samples, opts: TrainOptions, device, image_size: int) -> LatentCache:
    """Encode the usable samples with T5 and the VAE (each image decoded once, the unusable skipped with a
    warning), save the cache, free both encoders; returns the cache."""
    import gc
    import itertools

    from ..text import T5TextEncoder
    from ..vae import load_vae

    images = usable_images(samples, min_side=max(1, image_size // 2))
    first = next(images)  # a set without a usable image is refused here, before the encoders load
    if not opts.t5 or not opts.vae:
        raise ValueError("the first run on a data set needs --t5 and --vae to encode it "
                         f"(no matching cache in {folder})")
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    t5 = T5TextEncoder.from_pretrained(opts.t5, tokenizer=opts.tokenizer, device=device, dtype=half)
    vae = load_vae(opts.vae, device=device, dtype=torch.float32)
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


def restore_state(model, lora, optimizer, state: dict, fsdp: bool) -> None:
    """Load the trained tensors and the optimizer state of a checkpoint (each rank reads the whole file)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["trained"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    (lora if lora is not None else model).load_state_dict(state["trained"])
    optimizer.load_state_dict(state["optimizer"])


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(opts: TrainOptions) -> dict:
    path = latest_checkpoint(Path(opts.out)) if opts.resume == "latest" else Path(opts.resume)
    if path is None or not path.is_file():
        raise ValueError(f"--resume: no checkpoint found ({opts.resume if opts.resume != 'latest' else opts.out})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    differ = {k: (state["options"].get(k), getattr(opts, k)) for k in RESUME_KEYS
              if state["options"].get(k) != getattr(opts, k)}
    if differ:
        raise ValueError(f"--resume {path}: these options differ from the run that wrote it (was, now): {differ}")
    return state


def write_outputs(opts: TrainOptions, model, lora, ema: dict | None, rank: int, model_sd: dict) -> dict:
    """OUT/dimba_lora.safetensors (LoRA) or OUT/dimba_finetuned.safetensors (full), plus *_ema with EMA."""
    from safetensors.torch import save_file

    from ..loader import save_state_dict, write_atomically

    if rank != 0:
        return {}
    out, dtype = Path(opts.out), torch_dtype(opts.save_dtype)
    paths = {}
    for suffix, weights in (("", None), ("_ema", ema)):
        if suffix and weights is None:
            continue
        if lora is not None:
            saved = {k: v.detach().clone() for k, v in lora.state_dict().items()}
            if weights is not None:
                lora.load_state_dict(weights)
            sd = lora.to_comfy_state_dict(dtype)
            lora.load_state_dict(saved)
            path = out / f"dimba_lora{suffix}.safetensors"
            meta = {"format": "pt", "dimba_config": model.config.to_json(), "rank": str(opts.lora_rank)}
            write_atomically(path, functools.partial(save_file, sd, metadata=meta))
        else:  # each tensor in the dtype a model of save_dtype keeps it in (the Mamba SSM parameters stay float32)
            path = out / f"dimba_finetuned{suffix}.safetensors"
            save_state_dict({**model_sd, **(weights or {})}, model.config, path, dtype)
        paths["ema" if suffix else "weights"] = path
    return paths


# --- the loop ---------------------------------------------------------------------------------------

def train(opts: TrainOptions) -> dict:
    """Run a training job; returns {"weights": path, "ema": path?, "losses": [...], "step_seconds": [...]}."""
    rank, world, device = init_distributed(opts.device)
    try:
        micro, rest = divmod(opts.batch_size, world * opts.grad_accum)
        if opts.batch_size < 1 or rest or micro < 1:
            raise ValueError(f"--batch-size {opts.batch_size} must be a positive multiple of processes "
                             f"({world}) x --grad-accum ({opts.grad_accum})")
        if opts.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}")
        if opts.fsdp and (opts.lora_rank or world < 2):
            raise ValueError("--fsdp shards a full fine-tune (no --lora-rank) across several processes (torchrun)")
        if opts.fsdp and opts.optimizer == "came":
            raise ValueError("--fsdp needs --optimizer adamw: came-pytorch's CAME cannot step sharded (DTensor) "
                             "parameters, and its factored statistics need whole weights")
        model = load_for_training(opts, device)
        native = model.config.base_size * model.config.patch_size * 8
        if opts.lora_rank and opts.resolution:
            import warnings

            warnings.warn(f"a LoRA trained at --resolution {opts.resolution} is applied onto the base checkpoint's "
                          "own position-embedding settings (ComfyUI and apply_lora patch weights only); adapt the "
                          "resolution with a full fine-tune, as the reference does", stacklevel=2)
        image_size = opts.image_size or opts.resolution or native
        if image_size % 16:
            raise ValueError(f"--image-size {image_size} must be a multiple of 16")
        cache = prepare_cache(opts, rank, world, device, image_size)
        if cache.tokens.shape[1] != model.config.caption_channels:
            raise ValueError(f"the cached captions are {cache.tokens.shape[1]} wide but the model takes "
                             f"{model.config.caption_channels}: use the T5 the model was trained with")
        return _run(opts, model, cache, rank, world, device, micro)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(opts, model, cache, rank, world, device, micro) -> dict:
    from ..loader import write_atomically
    from .lora import LoRANetwork

    backend = pick_scan_backend(model, device)
    torch.manual_seed(opts.seed)  # LoRA initialisation: the same on every rank and for every world size
    lora = None
    if opts.lora_rank:
        model.requires_grad_(False)
        lora = LoRANetwork(model, opts.lora_rank, opts.lora_alpha).to(device).attach(model)
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
    if opts.resume:
        state = load_checkpoint(opts)
        restore_state(model, lora, optimizer, state, opts.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema = {n: placed_like(state["ema"][n], p) for n, p in zip(names, params)}
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]
    sampler = Sampler(cache, opts.seed, opts.batch_size, opts.class_dropout_prob)
    null_caption = model.y_embedder.y_embedding.detach().float().cpu()  # a buffer: fixed during training
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    bar = None
    if rank == 0 and opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=start, desc=f"train ({'LoRA' if lora else 'full'}, {backend} scan)",
                   unit="step")
    losses, step_seconds = [], []
    per_step = opts.batch_size // opts.grad_accum
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
            with ctx, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                terms = training_losses(net, x0, t, y, mask, noise)
                loss = terms["loss"].sum() * (world / opts.batch_size)
            scaler.scale(loss).backward()
            total += torch.stack([terms[k].detach().double().sum() for k in ("loss", "mse", "vb")])
        if step == start:
            unused = [n for n, p in zip(names, params) if p.grad is None]
            if unused:
                raise RuntimeError(f"{len(unused)} trainable tensors got no gradient ({', '.join(unused[:3])}): "
                                   f"the {backend} scan path bypasses them; train with another scan backend")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm > 0 else math.inf)
        grad_norm = float(full_tensor(grad_norm))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            with torch.no_grad():
                for n, p in zip(names, params):
                    ema[n].lerp_(p.detach(), 1 - opts.ema_decay)
        if world > 1:
            dist.all_reduce(total)
        total = (total / opts.batch_size).tolist()
        step_seconds.append(time.perf_counter() - t0)
        losses.append(total[0])
        done = step + 1
        if rank == 0:
            log.write(json.dumps(dict(step=done, loss=total[0], mse=total[1], vb=total[2],
                                      lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                      seconds=step_seconds[-1])) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{total[0]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
        if (opts.save_every and done % opts.save_every == 0) or done == opts.steps:
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
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    model_sd = full_model_state(model, opts.fsdp, rank) if lora is None else {}
    paths = write_outputs(opts, model, lora, _strip(ema, lora, rank), rank, model_sd)
    barrier(world)
    return dict(paths, losses=losses, step_seconds=step_seconds, scan_backend=backend)


def _strip(ema: dict | None, lora, rank: int) -> dict | None:
    """EMA tensors keyed like the trained module's state dict (drop the Trainee's model./lora. prefix), whole and
    on the CPU on rank 0 (None elsewhere; under FSDP a collective)."""
    if ema is None:
        return None
    prefix = "lora." if lora is not None else "model."
    return gathered({n[len(prefix):]: v for n, v in ema.items()}, rank)

