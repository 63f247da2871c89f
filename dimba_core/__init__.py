"""Dimba (Transformer-Mamba diffusion) for PyTorch: model, loader, samplers, T5 and a text-to-image pipeline."""
from .config import PRESETS, DimbaConfig, dimba_g_2, dimba_l_2
from .loader import DimbaLoadError, convert, load_dimba, save_safetensors
from .lora import apply_lora
from .model import Dimba
from .pipeline import DimbaPipeline
from .sampling import SAMPLERS, noise_like, sample
from .vae import load_vae

__all__ = ["PRESETS", "Dimba", "DimbaConfig", "DimbaLoadError", "convert", "dimba_g_2", "dimba_l_2", "load_dimba",
           "noise_like", "sample", "save_safetensors", "SAMPLERS",
           "T5TextEncoder", "load_vae", "DimbaPipeline", "apply_lora", "training_losses"]


def __getattr__(name):
    # On demand only: T5TextEncoder imports transformers; training_losses imports dimba_core.train (the trainer).
    if name == "T5TextEncoder":
        from .text import T5TextEncoder

        return T5TextEncoder
    if name == "training_losses":
        from .train.objective import training_losses

        return training_losses
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
