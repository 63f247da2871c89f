"""Scan backends for the Mamba mixer: `cuda` (mamba-ssm kernels), `parallel` (log-depth scan in plain PyTorch,
any device, differentiable), `torch` (per-step CPU loop, inference only), `ref` (naive), `triton` (fused
bidirectional Triton kernels in .triton_scan, imported only when used; inference only).

`auto` (resolve_backend): on CUDA mamba-ssm when importable, else `triton` (TRITON_VALIDATED: it passed on a
GPU) when triton imports and autograd is not recording, else `parallel`; on MPS, XPU and other accelerators
`parallel`; on the CPU `torch` (fastest there), except while autograd records, when it picks a differentiable scan
(`parallel`).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .bidirectional import BIDIRECTIONAL, MixerWeights, causal_conv1d
from .parallel_scan import selective_scan_parallel
from .selective_scan import selective_scan_cuda, selective_scan_ref, selective_scan_torch

BACKENDS = ("auto", "cuda", "parallel", "torch", "ref", "triton")
SCANS = {"cuda": selective_scan_cuda, "parallel": selective_scan_parallel, "torch": selective_scan_torch,
         "ref": selective_scan_ref}
NO_AUTOGRAD = ("torch", "triton")  # forward-only backends (in-place loop, raw kernels)
TRITON_VALIDATED = True  # passed on an H200 (NOTES.md): ref accuracy, and 4-5x faster than `parallel` there


_IMPORTABLE: dict[str, bool] = {}  # a plain dict, not functools.cache: torch.compile reads it as a constant


def _importable(module: str) -> bool:
    """Whether `module` imports cleanly; a broken or mismatched build counts as absent (fall back to PyTorch)."""
    if module not in _IMPORTABLE:
        try:
            _IMPORTABLE[module] = importlib.util.find_spec(module.split(".")[0]) is not None and bool(
                importlib.import_module(module))
        except Exception:
            _IMPORTABLE[module] = False
    return _IMPORTABLE[module]


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
    return _triton_importable() and (_triton_interpret() or torch.cuda.is_available())


def check_backend(name: str) -> str:
    """Validate a backend name, and look up (once) the packages it may use, so that compiled code needn't."""
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "cuda"):
        has_mamba_ssm(), has_causal_conv1d()
    if name == "triton" or (name == "auto" and TRITON_VALIDATED):
        _triton_importable()
    return name


def resolve_backend(name: str, device, needs_grad: bool = False) -> str:
    """The backend that runs for tensors on `device`; needs_grad: autograd is recording through the scan."""
    check_backend(name)
    kind = torch.device(device).type
    on_cuda = kind == "cuda"
    if name == "auto":
        if on_cuda and has_mamba_ssm():
            return "cuda"
        if on_cuda and TRITON_VALIDATED and not needs_grad and _triton_importable():
            return "triton"
        return "torch" if kind == "cpu" and not needs_grad else "parallel"
    if name == "cuda" and not (on_cuda and has_mamba_ssm()):
        raise RuntimeError(
            "scan backend 'cuda' needs CUDA tensors and the mamba-ssm package "
            "(pip install mamba-ssm causal-conv1d); use backend 'auto' or 'parallel' instead"
        )
    if name == "triton" and not (_triton_importable() and (on_cuda or _triton_interpret())):
        raise RuntimeError(
            "scan backend 'triton' needs the triton package (pip install triton) and CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests); use 'auto' or 'parallel' instead"
        )
    if name in NO_AUTOGRAD and needs_grad:
        raise RuntimeError(
            f"scan backend {name!r} has no backward pass, but gradients are being recorded; for training use "
            f"'parallel' (or 'auto', which picks a differentiable scan), or run inference under torch.no_grad()"
        )
    return name


__all__ = ["BACKENDS", "BIDIRECTIONAL", "MixerWeights", "SCANS", "causal_conv1d", "check_backend", "has_mamba_ssm", "has_triton", "resolve_backend",
           "selective_scan_cuda", "selective_scan_parallel", "selective_scan_ref", "selective_scan_torch"]
