"""Tiny random Dimba and T5 laid out as a ComfyUI models folder, for tests: python -m dimba_core.tiny_assets OUT_DIR."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .config import DimbaConfig
from .loader import save_safetensors
from .model import Dimba

CHECKPOINT = "dimba_tiny.safetensors"
T5_FOLDER = "t5_tiny"
T5_WIDTH = 64
TINY_CONFIG = dict(hidden_size=64, depth=2, num_heads=4, patch_size=2, caption_channels=T5_WIDTH,
                   base_size=32, pe_interpolation=1.0, d_state=8)


def tiny_dimba(seed: int = 0, **overrides) -> Dimba:
    """A small random Dimba whose outputs are non-trivial but small enough for sampling to stay finite."""
    torch.manual_seed(seed)
    model = Dimba(DimbaConfig(**{**TINY_CONFIG, **overrides}))
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(0.5)  # eps of about unit scale keeps CFG-amplified steps tame
    return model.eval().requires_grad_(False)


def find_tokenizer(explicit=None) -> Path:
    """T5 tokenizer folder: explicit, ../shared/t5 beside the checkout, the host ComfyUI's, or $COMFYUI_PATH's."""
    from .text import comfy_tokenizer_dir

    candidates = [explicit, Path(__file__).resolve().parents[2] / "shared" / "t5", comfy_tokenizer_dir()]
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "text_encoders" / "t5_tokenizer")
    for folder in candidates:
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            return Path(folder)
    raise FileNotFoundError("no T5 tokenizer found: pass --tokenizer DIR (a folder with tokenizer.json), "
                            "or set COMFYUI_PATH to a ComfyUI checkout")


def write_tiny_assets(out_dir, tokenizer=None, seed: int = 0) -> dict:
    """Write checkpoints/dimba_tiny.safetensors and text_encoders/t5_tiny/ under out_dir; returns their paths."""
    from .text import save_tiny_t5

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoints" / CHECKPOINT
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tiny_dimba(seed), ckpt)
    t5 = save_tiny_t5(out_dir / "text_encoders" / T5_FOLDER, find_tokenizer(tokenizer), d_model=T5_WIDTH,
                      seed=seed)
    return {"checkpoint": ckpt, "t5": Path(t5)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dimba_core.tiny_assets", description=__doc__)
    parser.add_argument("out_dir", help="models folder to fill (e.g. ComfyUI's models/)")
    parser.add_argument("--tokenizer", help="T5 tokenizer folder (default: found automatically)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind, path in write_tiny_assets(args.out_dir, args.tokenizer, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
