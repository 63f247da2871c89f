"""Which dtype each kind of tensor is stored and computed in (the model's dtype policy in one place)."""
from __future__ import annotations

import torch

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # the weight dtypes offered by name
# ComfyUI's float8 weight_dtype choices (Load Diffusion Model's), as torch dtype names
FP8_DTYPES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3fn_fast": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, *FLOAT8)  # what a weight file may hold


def torch_dtype(name: str) -> torch.dtype:
    """torch.float16 for "fp16" (and likewise for the other names in DTYPES)."""
    return getattr(torch, DTYPES[name])


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype of a weight-dtype name: one of DTYPES or of ComfyUI's FP8_DTYPES."""
    return getattr(torch, DTYPES.get(name) or FP8_DTYPES[name])


def headless_dtype(dtype, what: str = "dtype"):
    """None, or the torch dtype the layers of dimba_core (torch.nn) can store and run weights in: a torch float
    dtype (16, 32 or 64 bits) or a name of DTYPES ("fp16", "bf16", "fp32"; also "float16", ...); anything else
    is a ValueError saying what to pass."""
    if dtype is None:
        return None
    names = ", ".join(DTYPES)
    if isinstance(dtype, str):
        name = DTYPES.get(dtype.strip().lower(), dtype.strip().lower())
        if name not in (*DTYPES.values(), "float64"):
            raise ValueError(f"{what} {dtype!r} is not a weight dtype; use one of {names} (or a torch float dtype)")
        return getattr(torch, name)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize == 1:
        raise ValueError(f"{what} {str(dtype).replace('torch.', '')} stores weights in float8, which only ComfyUI "
                         "(or an operations namespace whose layers cast weights to the compute dtype) can run; "
                         f"headless, use one of {names} (a float8 file loads as float32 by default)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        shown = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else repr(dtype)
        raise ValueError(f"{what} {shown} cannot hold Dimba weights; use one of {names} (or torch.float16, "
                         "torch.bfloat16, torch.float32)")
    return dtype


def wide(dtype: torch.dtype) -> torch.dtype:
    """At least float32: float64 for float64, else float32 (the scan state, A, D, the delta projection, the
    Mamba residual stream, norms)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widen(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """t in wide(t.dtype), on like's device when given; t itself when it already is."""
    if like is None:
        return t.to(wide(t.dtype))
    return cast_to(t, like, wide(t.dtype))


def table_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of small parameters the forward reads directly (norm weights, modulation tables): the weight
    dtype, but float32 for 1-byte (float8) weights, which only an operations namespace's layers compute with."""
    return torch.float32 if dtype is not None and dtype.itemsize == 1 else dtype


def cast_to(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A weight the forward reads directly, as `dtype` (default like's) on like's device; t itself if it already is.

    Storage may differ from compute (float8 weights) and partial loading may leave it on another device.
    """
    dtype = like.dtype if dtype is None else dtype
    if t is None or (t.dtype == dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=dtype)
