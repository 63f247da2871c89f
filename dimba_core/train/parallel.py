"""Several processes: the process group, FSDP2 sharding, and whole or sharded tensors."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def close_distributed(world: int) -> None:
    """End the process group that init_distributed started."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


def shard(model) -> None:
    """FSDP2: each attention and Mamba block its own unit, the rest in the root unit."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Dimba's forward adds block outputs out of place, so FSDP's warning about returned views does not apply
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in [*model.blocks, *model.mamba_blocks]:
        fully_shard(block)
    fully_shard(model)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor gathered whole (a collective: every rank calls it); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor on param's device and dtype, sharded as param is under FSDP (a collective there)."""
    t = t.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, param.device_mesh, param.placements)
    return t


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
