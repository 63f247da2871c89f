"""Headless SD/SDXL VAE (diffusers AutoencoderKL) from a diffusers folder or one LDM-style .safetensors file.

A single LDM file does not say whether it is the SD (scaling 0.18215) or the SDXL VAE (0.13025): the
`scaling_factor=` argument decides, defaulting to 0.13025, the SDXL VAE that the Dimba config names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .weights import DimbaLoadError, check_keys, check_weights_folder, key_prefix, load_guarded, open_safetensors, weights_source

SDXL_SCALING_FACTOR = 0.13025
SD_SCALING_FACTOR = 0.18215
ANCHOR_KEY = "encoder.conv_in.weight"
LDM_RENAMES = (
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
)


def _diffusers():
    """Import diffusers' AutoencoderKL or explain how to install it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("decoding latents needs diffusers: pip install diffusers") from err
    return AutoencoderKL


def ldm_to_diffusers(state: dict) -> dict:
    """Rename original LDM VAE keys to diffusers AutoencoderKL keys (attention 1×1 convs → linear)."""
    ups = {int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    out = {}
    for key, value in state.items():
        new = key
        m = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.", key)
        if m:
            block = len(ups) - 1 - int(m[1])
            inner = f"resnets.{m[3]}." if m[3] is not None else "upsamplers.0.conv."
            new = f"decoder.up_blocks.{block}.{inner}" + key[m.end():]
        for pattern, repl in LDM_RENAMES:
            new = re.sub(pattern, repl, new)
        if ".attentions.0.to_" in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def infer_vae_config(state: dict) -> dict:
    """AutoencoderKL config from diffusers-named weights (norm_num_groups cannot be seen: 32)."""
    downs = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    layers = {int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        block_out_channels=[state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in downs],
        down_block_types=["DownEncoderBlock2D"] * len(downs),
        up_block_types=["UpDecoderBlock2D"] * len(downs),
        layers_per_block=len(layers),
        norm_num_groups=32,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(".mid_block.attentions." in k for k in state),
    )


def read_vae_file(path) -> dict:
    """VAE weights from one .safetensors file, prefix stripped (first_stage_model., vae., ...), diffusers names."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
        prefix = key_prefix(path, keys, ANCHOR_KEY, "VAE", "the SDXL VAE (e.g. sdxl_vae.safetensors) or a diffusers "
                            "VAE folder")
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        state = {k[len(prefix):]: f.get_tensor(k) for k in keys
                 if k.startswith(prefix) and k[len(prefix):].startswith(parts)}
    if any(k.startswith("encoder.down.") for k in state):
        state = ldm_to_diffusers(state)
    return state


def _build_from_file(path, dtype, config):
    """AutoencoderKL from a single file; DimbaLoadError naming missing or mis-shaped keys."""
    AutoencoderKL = _diffusers()
    state = read_vae_file(path)
    try:
        cfg = {**infer_vae_config(state), **(config or {})}
    except KeyError as err:
        raise DimbaLoadError(f"{path}: cannot infer the VAE config, key {err} is missing") from None
    except (IndexError, ValueError, TypeError) as err:
        raise DimbaLoadError(f"{path}: cannot infer the VAE config from its tensor shapes ({err}); the file is "
                             "damaged or not a VAE") from None
    with torch.device("meta"):
        model = AutoencoderKL(**cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, {k: v.shape for k, v in state.items()}, path,
               f"an AutoencoderKL with {cfg['block_out_channels']} channels", unexpected_ok=True)
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=True, assign=True)
    return model


def _build_from_folder(path, dtype):
    """AutoencoderKL from a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    AutoencoderKL = _diffusers()
    check_weights_folder(Path(path), "diffusers VAE", "a single-file VAE .safetensors")
    return AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                         use_safetensors=True, low_cpu_mem_usage=False)


class VAE:
    """Decode scaled latents to images in [0, 1] and encode images back to scaled latents."""

    def __init__(self, model, scaling_factor: float, shift_factor: float = 0.0):
        self.model = model.eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return next(self.model.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """Channels of the latent space."""
        return self.model.config.latent_channels

    def to(self, device=None, dtype=None):
        """Move and/or cast in place; returns self."""
        if device is not None:
            self.model.to(device=device)
        if dtype is not None:
            self.model.to(dtype=dtype)
        return self

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents B×C×h×w → float32 images B×3×8h×8w in [0, 1]."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        images = self.model.decode(z).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images B×3×H×W in [0, 1] → scaled latents (distribution mode), float32."""
        x = images.to(self.device, self.dtype) * 2 - 1
        z = self.model.encode(x).latent_dist.mode()
        return ((z.float() - self.shift_factor) * self.scaling_factor)


def load_vae(path, *, device="cpu", dtype=torch.float32, scaling_factor=None, config=None) -> VAE:
    """Load a VAE from a diffusers folder or an LDM/diffusers single .safetensors file.

    scaling_factor overrides the folder's config; for single files it defaults to 0.13025 (SDXL).
    config overrides inferred AutoencoderKL settings of single files (e.g. norm_num_groups).
    """
    kind, path = weights_source(path, "VAE", "vae")
    if kind == "folder":
        model = load_guarded(lambda: _build_from_folder(path, dtype), path, "VAE")
        default_scale = model.config.scaling_factor
    else:
        model = load_guarded(lambda: _build_from_file(path, dtype, config), path, "VAE")
        default_scale = SDXL_SCALING_FACTOR
    scale = default_scale if scaling_factor is None else scaling_factor
    shift = getattr(model.config, "shift_factor", None)
    return VAE(model, scale, shift).to(device=device)


__all__ = ["VAE", "load_vae", "ldm_to_diffusers", "infer_vae_config", "read_vae_file",
           "SDXL_SCALING_FACTOR", "SD_SCALING_FACTOR"]
