"""Scan backends for the Mamba mixer: `cuda` (mamba-ssm kernels), `torch` (pure PyTorch), `ref` (naive),
`triton` (fused bidirectional Triton kernels in .triton_scan, imported only when used; never picked by `auto`)."""
from __future__ import annotations

import functools
import importlib.util
import os

from .causal_conv1d import causal_conv1d_cuda, causal_conv1d_torch
from .selective_scan import selective_scan_cuda, selective_scan_ref, selective_scan_torch

BACKENDS = ("auto", "cuda", "torch", "ref", "triton")
SCANS = {"cuda": selective_scan_cuda, "torch": selective_scan_torch, "ref": selective_scan_ref}


@functools.cache
def _importable(module: str) -> bool:
    """Whether `module` imports cleanly; a broken or mismatched build counts as absent (fall back to PyTorch)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def has_mamba_ssm() -> bool:
    """Whether mamba-ssm's selective-scan kernel can be imported."""
    return _importable("mamba_ssm.ops.selective_scan_interface")


def has_causal_conv1d() -> bool:
    """Whether causal-conv1d's kernel can be imported."""
    return _importable("causal_conv1d")


def _triton_importable() -> bool:
    return _importable("triton.language")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def has_triton() -> bool:
    """Whether the `triton` backend can run: triton importable and a CUDA device (or TRITON_INTERPRET=1)."""
    import torch

    return _triton_importable() and (_triton_interpret() or torch.cuda.is_available())


def check_backend(name: str) -> str:
    """Validate a backend name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device) -> str:
    """The backend that runs for tensors on `device`: `auto` picks `cuda` on CUDA when installed."""
    check_backend(name)
    on_cuda = getattr(device, "type", device) == "cuda"
    if name == "auto":
        return "cuda" if on_cuda and has_mamba_ssm() else "torch"
    if name == "cuda" and not (on_cuda and has_mamba_ssm()):
        raise RuntimeError(
            "scan backend 'cuda' needs CUDA tensors and the mamba-ssm package "
            "(pip install mamba-ssm causal-conv1d); use backend 'auto' or 'torch' instead"
        )
    if name == "triton" and not (_triton_importable() and (on_cuda or _triton_interpret())):
        raise RuntimeError(
            "scan backend 'triton' needs the triton package (pip install triton) and CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests); use 'auto' or 'torch' instead"
        )
    return name


def causal_conv1d(x, weight, bias, backend: str):
    """Causal depthwise conv + SiLU on the fastest path the backend allows."""
    if backend == "cuda" and has_causal_conv1d():
        return causal_conv1d_cuda(x, weight, bias)
    return causal_conv1d_torch(x, weight, bias)


__all__ = ["BACKENDS", "SCANS", "causal_conv1d", "check_backend", "has_mamba_ssm", "has_triton", "resolve_backend",
           "selective_scan_cuda", "selective_scan_ref", "selective_scan_torch"]
