"""Dimba (Transformer-Mamba diffusion) for PyTorch: model, loader, samplers, T5 and a text-to-image pipeline."""
from .config import PRESETS, DimbaConfig, dimba_g_2, dimba_l_2
from .loader import DimbaLoadError, convert, load_dimba, save_safetensors
from .model import Dimba
from .sampling import SAMPLERS, noise_like, sample

__all__ = ["PRESETS", "Dimba", "DimbaConfig", "DimbaLoadError", "convert", "dimba_g_2", "dimba_l_2", "load_dimba",
           "noise_like", "sample", "save_safetensors", "SAMPLERS",
           "T5TextEncoder", "load_vae", "DimbaPipeline", "apply_lora", "training_losses"]


_LAZY = {"T5TextEncoder": ".text", "load_vae": ".vae", "DimbaPipeline": ".pipeline", "apply_lora": ".lora",
         "training_losses": ".train.objective"}  # heavy imports on demand


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
