"""Tiny random Dimba, T5 and VAE laid out as a ComfyUI models folder: python -m dimba_core.tiny_assets OUT_DIR.

Everything is built here from random numbers (no download, no other files): a small Dimba whose width
matches a small T5 v1.1-family encoder with a character-level tokenizer, and a random VAE of the SD/SDXL
architecture (ComfyUI's VAELoader builds only that one). The images they make are noise; they exist so
that the command line, the Python API and the shipped workflows run end to end in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch

from .config import DimbaConfig
from .loader import save_safetensors
from .model import Dimba

CHECKPOINT = "dimba_tiny.safetensors"
T5_FOLDER = "t5_tiny"
VAE_FILE = "dimba_tiny_vae.safetensors"
T5_WIDTH = 64
T5_VOCAB_SIZE = 32128  # the T5 v1.1 vocabulary size, so the real tokenizer fits the tiny encoder too
TINY_CONFIG = dict(hidden_size=64, depth=2, num_heads=4, patch_size=2, caption_channels=T5_WIDTH,
                   base_size=32, pe_interpolation=1.0, d_state=8)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def tiny_dimba(seed: int = 0, **overrides) -> Dimba:
    """A small random Dimba whose outputs are non-trivial but small enough for sampling to stay finite."""
    torch.manual_seed(seed)
    model = Dimba(DimbaConfig(**{**TINY_CONFIG, **overrides}))
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(0.5)  # eps of about unit scale keeps CFG-amplified steps tame
    return model.eval().requires_grad_(False)


def write_tiny_tokenizer(out_dir) -> Path:
    """A character-level Unigram tokenizer in T5's format (Metaspace, </s> appended, <pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces = ["▁" + c for c in chars] + list(chars) + ["▁"]
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"model_max_length": 512, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "extra_ids": 0, "additional_special_tokens": [], "tokenizer_class": "T5Tokenizer"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return out_dir


def write_tiny_t5(out_dir, *, d_model: int = T5_WIDTH, num_layers: int = 2, num_heads: int = 4, d_ff: int = 128,
                  seed: int = 0, tokenizer=None) -> Path:
    """A small random T5 v1.1-family encoder folder (config.json, model.safetensors, tokenizer files).

    tokenizer: a folder with T5 tokenizer files to copy (e.g. the real T5 v1.1 one); default: the built-in
    character-level tokenizer.
    """
    import shutil

    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} must be a multiple of num_heads {num_heads}")
    config = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      dense_act_fn="gelu_pytorch_tanh", is_encoder_decoder=False, use_cache=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5EncoderModel(config).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        if key.endswith("layer_norm.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            unscaled = key.endswith(("shared.weight", "relative_attention_bias.weight"))
            state[key] = torch.randn(shape, generator=gen) / (1 if unscaled else shape[-1] ** 0.5)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["T5EncoderModel"]
    config.to_json_file(str(out_dir / "config.json"))
    if tokenizer is None:
        write_tiny_tokenizer(out_dir)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
            if (Path(tokenizer) / name).is_file():
                shutil.copyfile(Path(tokenizer) / name, out_dir / name)
    return out_dir


def sd_vae_shapes(ch: int = 128, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2, z_channels: int = 4) -> dict:
    """Key -> shape of the SD/SDXL VAE in the original (LDM) layout that ComfyUI and single files use."""
    shapes = {}

    def conv(name, c_out, c_in, k):
        shapes[name + ".weight"], shapes[name + ".bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[name + ".weight"], shapes[name + ".bias"] = (c,), (c,)

    def resnet(name, c_in, c_out):
        norm(name + ".norm1", c_in), conv(name + ".conv1", c_out, c_in, 3)
        norm(name + ".norm2", c_out), conv(name + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(name + ".nin_shortcut", c_out, c_in, 1)

    def middle(name, c):
        resnet(name + ".mid.block_1", c, c)
        norm(name + ".mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{part}", c, c, 1)
        resnet(name + ".mid.block_2", c, c)

    widths = [ch * m for m in ch_mult]
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, w in enumerate(widths):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, w)
            c = w
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    middle("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", 2 * z_channels, c, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1)
    conv("post_quant_conv", z_channels, z_channels, 1)
    conv("decoder.conv_in", widths[-1], z_channels, 3)
    middle("decoder", widths[-1])
    c = widths[-1]
    for i in reversed(range(len(widths))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
    return shapes


def write_tiny_vae(path, seed: int = 0, dtype=torch.float16) -> Path:
    """A random SD/SDXL-architecture VAE (84M parameters, LDM keys) initialised as PyTorch initialises layers."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = sd_vae_shapes()
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 4:  # conv weight and its bias: uniform(+-1/sqrt(fan_in)), as torch.nn.Conv2d does
            bound = (shape[1] * shape[2] * shape[3]) ** -0.5
            bias = key[: -len("weight")] + "bias"
            state[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            state[bias] = (torch.rand(shapes[bias], generator=gen) * 2 - 1) * bound
        elif key not in state:  # group norms: identity
            state[key] = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def asset_paths(out_dir) -> dict:
    """Where write_tiny_assets puts the Dimba checkpoint, the T5 folder and the VAE under a models folder."""
    out_dir = Path(out_dir)
    return {"checkpoint": out_dir / "checkpoints" / CHECKPOINT, "t5": out_dir / "text_encoders" / T5_FOLDER,
            "vae": out_dir / "vae" / VAE_FILE}


def _present(path: Path) -> bool:
    return (path / "config.json").is_file() if path.suffix == "" else path.is_file()


def write_tiny_assets(out_dir, tokenizer=None, seed: int = 0, force: bool = False) -> dict:
    """Write checkpoints/, text_encoders/ and vae/ under out_dir; returns {"checkpoint", "t5", "vae"} paths.

    Existing tiny assets are kept unless force is set; nothing else in out_dir is touched, so it is safe
    to run on a real ComfyUI models folder.
    """
    paths = asset_paths(out_dir)
    writers = {"checkpoint": lambda p: save_safetensors(tiny_dimba(seed), p),
               "t5": lambda p: write_tiny_t5(p, d_model=T5_WIDTH, seed=seed, tokenizer=tokenizer),
               "vae": lambda p: write_tiny_vae(p, seed=seed)}
    for kind, path in paths.items():
        if force or not _present(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[kind](path)
    return paths


def main(argv=None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="python -m dimba_core.tiny_assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="models folder to fill (e.g. ComfyUI/models or any new folder)")
    parser.add_argument("--tokenizer", help="copy the T5 tokenizer from this folder instead of the built-in "
                        "character-level one (e.g. a real T5 v1.1 tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite the tiny assets if they exist")
    args = parser.parse_args(argv)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        print(f"error: {args.out_dir} is a file; give a folder", file=sys.stderr)
        return 2
    kept = {k for k, p in asset_paths(args.out_dir).items() if _present(p) and not args.force}
    for kind, path in write_tiny_assets(args.out_dir, args.tokenizer, args.seed, args.force).items():
        print(f"{kind}: {path}" + (" (exists, kept; --force rewrites it)" if kind in kept else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
