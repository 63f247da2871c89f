"""Merge LoRA files into a Dimba model: kohya/ComfyUI (`lora_down`/`lora_up`/`alpha`) and PEFT (`lora_A`/`lora_B`) keys.

A LoRA for weight `<key>.weight` is stored under `diffusion_model.<key>` or `lora_unet_<key with . as _>`
(ComfyUI's LoraLoaderModelOnly reads both); it adds strength * alpha / rank * up @ down to the weight.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .weights import DimbaLoadError, open_safetensors, show

PREFIXES = ("diffusion_model.", "model.diffusion_model.", "lora_unet_")
PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
         ".alpha": "alpha"}


def read_lora(source) -> tuple[dict, str]:
    """(state dict, name for messages) from a .safetensors path or a state dict; never unpickles."""
    if isinstance(source, dict):
        return source, "<LoRA state dict>"
    if not isinstance(source, (str, os.PathLike)):
        raise DimbaLoadError(f"cannot read a LoRA from {type(source).__name__}; pass a .safetensors path or a dict")
    path = Path(source)
    if not path.is_file():
        raise DimbaLoadError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise DimbaLoadError(f"{path}: LoRA files are read as .safetensors only (pickles could run code); "
                             "convert it to .safetensors")
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, str(path)


def group_lora(sd: dict, weight_keys, name: str) -> dict:
    """Map each target weight key to {"down", "up", "alpha"}; DimbaLoadError for keys that fit no weight."""
    by_flat = {k[: -len(".weight")].replace(".", "_"): k for k in weight_keys}
    groups: dict = {}
    stray = []
    for key, value in sd.items():
        part = next((p for p in PARTS if key.endswith(p)), None)
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if part is None or prefix is None or not isinstance(value, torch.Tensor):
            stray.append(key)
            continue
        stem = key[len(prefix): -len(part)]
        target = by_flat.get(stem) if prefix == "lora_unet_" else stem + ".weight"
        if target not in weight_keys:
            stray.append(key)
            continue
        groups.setdefault(target, {})[PARTS[part]] = value
    if stray:
        raise DimbaLoadError(f"{name}: not a LoRA for this Dimba model: keys that match no Dimba weight or LoRA "
                             f"format: {show(stray)} (expected diffusion_model.<key>.lora_down.weight / "
                             ".lora_up.weight / .alpha, or lora_A / lora_B)")
    if not groups:
        raise DimbaLoadError(f"{name}: holds no LoRA weights")
    half = [k for k, g in groups.items() if "down" not in g or "up" not in g]
    if half:
        raise DimbaLoadError(f"{name}: LoRA incomplete: up or down matrix missing for {show(half)}")
    return groups


def lora_delta(group: dict, shape, key: str, name: str) -> torch.Tensor:
    """alpha / rank * up @ down in float32, reshaped to the weight's shape."""
    down, up = group["down"].float().flatten(1), group["up"].float().flatten(1)
    rank = down.shape[0]
    if up.shape != (shape[0], rank) or down.shape[1] != torch.Size(shape)[1:].numel():
        raise DimbaLoadError(f"{name}: LoRA for {key} has up {tuple(group['up'].shape)} and down "
                             f"{tuple(group['down'].shape)}, which do not fit the weight {tuple(shape)}; "
                             "it was made for another model")
    alpha = float(group["alpha"]) if "alpha" in group else float(rank)
    return (alpha / rank) * (up @ down).reshape(shape)


def apply_lora(model: torch.nn.Module, source, strength: float = 1.0) -> torch.nn.Module:
    """Merge a LoRA (path or state dict) into the model's weights in place: W += strength * alpha/r * up @ down."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
    sd, name = read_lora(source)
    weights = {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    groups = group_lora(sd, set(weights), name)
    deltas = {k: lora_delta(g, weights[k].shape, k, name) for k, g in groups.items()}  # validate all first
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            w = params[key]
            w.copy_((w.float() + strength * delta.to(w.device)).to(w.dtype))
    return model


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (FILE, STRENGTH); a tail that is not a number belongs to the path; a non-finite
    strength (nan, inf) is a ValueError."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(strength):
            raise ValueError(f"--lora {spec}: the strength must be a finite number")
        return path, strength
    return spec, 1.0


__all__ = ["apply_lora", "parse_lora_spec", "read_lora"]
