"""The model side of a run: load it, check it fits, add LoRA, recompute blocks, wrap for DDP/FSDP, optimize."""
from __future__ import annotations

import functools
import warnings

import torch

from .options import TrainOptions


def load_for_training(opts: TrainOptions, device):
    """The checkpoint in float32 on device, in train mode; `--resolution` sets base_size and pe_interpolation."""
    from ..config import RESOLUTION_SETTINGS
    from ..loader import load_dimba, read_state_dict

    sd, stored, name = read_state_dict(opts.checkpoint)
    overrides = dict(stored or {})
    if opts.num_heads:
        overrides["num_heads"] = opts.num_heads
    if opts.resolution is not None:
        overrides.update(RESOLUTION_SETTINGS[opts.resolution])
        sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # unused buffer shaped by the old base_size
    model = load_dimba(sd, device=device, dtype=torch.float32, **overrides)
    if model.y_embedder.y_embedding.abs().sum() == 0 and opts.class_dropout_prob > 0:
        warnings.warn(f"{name} has no y_embedder.y_embedding (the learned null caption); caption dropout "
                      "trains an all-zero caption instead", stacklevel=2)
    return model.train()


def pick_scan_backend(model, device) -> str:
    """Scan backend `auto`, which picks a scan with a backward while autograd records (mamba-ssm on CUDA,
    else `parallel`); returns the one that will run."""
    from .. import ops

    model.set_scan_backend("auto")
    return ops.resolve_backend("auto", device, needs_grad=True)




def check_model_fits(opts: TrainOptions, model) -> int:
    """The crop size this run trains at (--image-size, --resolution or the checkpoint's own), checked against the
    model; so is --max-length."""
    if opts.lora_rank and opts.resolution:
        warnings.warn(f"a LoRA trained at --resolution {opts.resolution} is applied onto the base checkpoint's "
                      "own position-embedding settings (ComfyUI and apply_lora patch weights only); adapt the "
                      "resolution with a full fine-tune, as the reference does", stacklevel=3)
    image_size = opts.image_size or opts.resolution or model.config.native_resolution
    multiple = 8 * model.config.patch_size
    if image_size % multiple:
        raise ValueError(f"--image-size {image_size} must be a multiple of {multiple} for this model")
    if opts.max_length > model.config.model_max_length:
        raise ValueError(f"max_length {opts.max_length} is longer than the model's captions "
                         f"({model.config.model_max_length} tokens, its learned null caption)")
    return image_size


def check_cache_fits(opts: TrainOptions, cache, config, image_size: int) -> None:
    """The cached captions and latents must be the width and shape the model takes."""
    from .files import cache_folder

    problems = []
    if cache.tokens.shape[1] != config.caption_channels:
        problems.append(f"captions {cache.tokens.shape[1]} wide, the model takes "
                        f"{config.caption_channels} (use the T5 the model was trained with)")
    if tuple(cache.mean.shape[1:]) != (config.in_channels, image_size // 8, image_size // 8):
        problems.append(f"latents of shape {tuple(cache.mean.shape[1:])}, the model takes "
                        f"{(config.in_channels, image_size // 8, image_size // 8)} at {image_size} px "
                        "(use the VAE the model was trained with)")
    if problems:
        raise ValueError(f"the latent cache in {cache_folder(opts)} does not fit the model: {'; '.join(problems)}"
                         "; pass --t5 and --vae to encode the data again")


def attach_lora(opts: TrainOptions, model, device, rank: int):
    """With --lora-rank: freeze the model and attach new LoRA adapters (returned); else train every weight (None).
    Seeded by --seed, so the adapters start the same on every process and for every number of processes."""
    from .lora import LoRANetwork

    torch.manual_seed(opts.seed)
    if not opts.lora_rank:
        model.requires_grad_(True)
        return None
    model.requires_grad_(False)
    lora = LoRANetwork(model, opts.lora_rank, opts.lora_alpha).to(device).attach(model)
    reduced = lora.reduced_ranks()
    if reduced and rank == 0:
        sizes = sorted(set(reduced.values()))
        warnings.warn(f"--lora-rank {opts.lora_rank}: {len(reduced)} of the {len(lora.names)} layers have fewer "
                      f"inputs or outputs ({next(iter(reduced))} and others: rank {', '.join(map(str, sizes))}) "
                      "and get their full rank instead, at the same scale alpha/rank; the LoRA file records "
                      "them in its metadata ('layer_ranks')", stacklevel=5)
    return lora


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


def wrap(trainee: Trainee, opts: TrainOptions, world: int, device) -> torch.nn.Module:
    """What the forward pass goes through: the Trainee sharded in place (--fsdp), wrapped in DDP (several
    processes) or as it is."""
    if opts.fsdp:
        from .parallel import shard

        shard(trainee.model)
        return trainee
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    return trainee


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


def warmup_schedule(optimizer, warmup: int):
    """Linear warm-up over `warmup` steps (step s at (s + 1) / warmup of the lr), then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
