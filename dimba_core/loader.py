"""Load published Dimba checkpoints (.pt/.pth/.ckpt/.safetensors or a state dict) without running pickled code."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import torch

from .config import DimbaConfig
from .model import Dimba

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "model.")
OPTIONAL_BUFFERS = ("pos_embed", "y_embedder.y_embedding")  # unused at inference; zero-filled when absent
CONFIG_KEY = "dimba_config"


class DimbaLoadError(ValueError):
    """A checkpoint that cannot be loaded as a Dimba model; the message says why and what to do."""


def read_state_dict(source, *, ema: bool = False) -> tuple[dict, dict | None, str]:
    """Return (state dict, config dict stored with it or None, name for messages)."""
    name = "<state dict>"
    stored_config = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise DimbaLoadError(f"{name}: no such file")
        if path.suffix == ".safetensors":
            sd, stored_config = _read_safetensors(path)
        elif path.suffix in PICKLE_SUFFIXES:
            sd = _read_pickle(path)
        else:
            raise DimbaLoadError(f"{name}: unknown checkpoint type {path.suffix!r}; expected .safetensors, "
                                 f"{', '.join(PICKLE_SUFFIXES)}")
    elif isinstance(source, dict):
        sd = source
    else:
        raise DimbaLoadError(f"cannot load a Dimba model from {type(source).__name__}; pass a path or a state dict")
    return _select(sd, ema, name), stored_config, name


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise DimbaLoadError(f"{path}: cannot read this safetensors file ({e}); it is truncated or corrupt, "
                             "download or convert it again") from None
    stored = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    return sd, stored


def _read_pickle(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DimbaLoadError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers, "
            f"and loading it could run code ({str(e).splitlines()[0] if str(e) else 'unsafe pickle'}). "
            "Only load checkpoints you trust; a published Dimba checkpoint holds tensors only.") from None
    except Exception as e:
        raise DimbaLoadError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); the file is "
                             "truncated or corrupt, download it again") from None


def _select(sd: dict, ema: bool, name: str) -> dict:
    """Pick state_dict / state_dict_ema from a training checkpoint and strip wrapper prefixes."""
    wanted = "state_dict_ema" if ema else "state_dict"
    if wanted in sd:
        sd = sd[wanted]
    elif ema:
        raise DimbaLoadError(f"{name}: has no 'state_dict_ema' (keys: {sorted(sd)[:5]}); load with ema=False")
    elif "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_config(sd: dict, name: str = "<state dict>", **overrides) -> DimbaConfig:
    """Derive the whole architecture from tensor shapes (num_heads, pe_interpolation come from overrides)."""
    need = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "blocks.0.mlp.fc1.weight",
            "final_layer.linear.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise DimbaLoadError(f"{name}: this is not a Dimba checkpoint: missing {', '.join(missing)} "
                             f"(found e.g. {', '.join(sorted(sd)[:3]) or 'no tensors'})")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = _count(sd, r"blocks\.(\d+)\.")
    n_mamba = _count(sd, r"mamba_blocks\.(\d+)\.")
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    cfg = dict(hidden_size=hidden, depth=depth, patch_size=patch, in_channels=in_ch,
               learn_sigma=out_ch == 2 * in_ch, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
               caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
               mamba_ratio=_ratio(n_mamba, depth))
    if "y_embedder.y_embedding" in sd:
        cfg["model_max_length"] = sd["y_embedder.y_embedding"].shape[0]
    if n_mamba:
        mixer = "mamba_blocks.0.mixer."
        d_inner, d_state = sd[mixer + "A_log"].shape
        cfg.update(d_state=d_state, expand=d_inner // hidden, d_conv=sd[mixer + "conv1d.weight"].shape[-1],
                   dt_rank=sd[mixer + "dt_proj.weight"].shape[1])
    if "pos_embed" in sd:
        cfg["base_size"] = math.isqrt(sd["pos_embed"].shape[1])
    # the published resolutions pair base_size with pe_interpolation: 512 px 32/1, 1024 64/2, 2048 128/4
    cfg["pe_interpolation"] = {32: 1.0, 64: 2.0, 128: 4.0}.get(cfg.get("base_size", 32), 1.0)
    return DimbaConfig(**{**cfg, **overrides})


def _count(sd, pattern) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _ratio(n: int, depth: int) -> float:
    """mamba_ratio such that int(ratio * depth) == n, as the reference computes it."""
    ratio = n / depth
    return ratio if int(ratio * depth) == n else (n + 1e-6) / depth


def check_state_dict(model: torch.nn.Module, sd: dict, name: str) -> None:
    """Raise one DimbaLoadError listing missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise DimbaLoadError(f"{name}: does not match the Dimba architecture {model.config.to_dict()}: "
                             + "; ".join(problems))


def load_dimba(source, *, device=None, dtype=None, num_heads: int | None = None, ema: bool = False,
               scan_backend: str = "auto", **overrides) -> Dimba:
    """Build a Dimba model from a checkpoint path or state dict, inferring its config, and load it strictly.

    num_heads cannot be read from shapes: it defaults to the value stored by `convert`, else 16 (both
    published presets). Other config fields (pe_interpolation, base_size, ...) may be overridden.
    """
    sd, stored, name = read_state_dict(source, ema=ema)
    overrides = {k: v for k, v in dict(overrides, num_heads=num_heads).items() if v is not None}
    try:
        config = (DimbaConfig.from_dict({**stored, **overrides}) if stored is not None
                  else infer_config(sd, name, **{"num_heads": 16, **overrides}))
    except DimbaLoadError:
        raise
    except (TypeError, ValueError) as e:
        raise DimbaLoadError(f"{name}: {e}") from None
    with torch.device("meta"):
        model = Dimba(config, scan_backend=scan_backend)
    sd = dict(sd)
    for key in OPTIONAL_BUFFERS:
        if key not in sd:
            sd[key] = torch.zeros(model.get_buffer(key).shape)
    check_state_dict(model, sd, name)
    model.load_state_dict(sd, strict=True, assign=True)
    dtype = dtype or sd["x_embedder.proj.weight"].dtype
    return model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)


def save_safetensors(model: Dimba, path, dtype=None) -> None:
    """Write the model's state dict with its config in the file's metadata (read back by load_dimba)."""
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={CONFIG_KEY: model.config.to_json(), "format": "pt"})


def convert(src, dst, *, ema: bool = False, dtype=None, num_heads: int | None = None, **overrides) -> Dimba:
    """Convert a checkpoint (e.g. dimba-l-512.pt) to .safetensors with its config stored."""
    model = load_dimba(src, ema=ema, num_heads=num_heads, **overrides)
    save_safetensors(model, dst, dtype=dtype)
    return model
