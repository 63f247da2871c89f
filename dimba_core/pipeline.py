"""Headless text-to-image: T5 captions -> Dimba sampling -> VAE decode -> PIL images."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .loader import load_dimba
from .resolution import parse_prompt
from .sampling import noise_like, sample


def check_size(width: int, height: int) -> None:
    """Image sides must be positive multiples of 16 (VAE factor 8 x patch 2)."""
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"image size {width}x{height} is not divisible by 16; Dimba needs width and height "
                         f"that are multiples of 16 px (e.g. {max(16, width // 16 * 16)}x{max(16, height // 16 * 16)})")


def native_resolution(model) -> int:
    """The pixel size the checkpoint was trained at: base_size latents x patch x VAE factor 8."""
    return model.config.base_size * model.config.patch_size * 8


def check_caption_width(width: int, config) -> None:
    """Text features must be as wide as the model's caption channels (4096: T5 v1.1 XXL)."""
    if width != config.caption_channels:
        raise ValueError(f"the text embeddings are {width} wide but this Dimba model takes {config.caption_channels} "
                         "(caption_channels): use the T5 the model was trained with (T5 v1.1 XXL: 4096)")


@dataclass
class Generation:
    """One generated image with what made it."""

    image: object  # PIL.Image.Image
    prompt: str
    seed: int
    index: int


class DimbaPipeline:
    """Dimba + T5 + VAE; the text encoder may stay on the CPU while the denoiser runs on the GPU."""

    def __init__(self, model, text_encoder, vae, device=None):
        check_caption_width(text_encoder.hidden_size, model.config)
        self.model, self.text_encoder, self.vae = model, text_encoder, vae
        self.device = torch.device(device) if device else next(model.parameters()).device

    @classmethod
    def from_files(cls, checkpoint, t5, vae, *, device=None, dtype=None, t5_device="cpu", t5_dtype=torch.float32,
                   tokenizer=None, vae_dtype=torch.float32, **model_overrides) -> "DimbaPipeline":
        """Load the three parts from files/folders."""
        from .text import T5TextEncoder
        from .vae import load_vae

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        model = load_dimba(checkpoint, device=device, dtype=dtype, **model_overrides)
        text_encoder = T5TextEncoder.from_pretrained(t5, tokenizer=tokenizer, device=t5_device, dtype=t5_dtype)
        return cls(model, text_encoder, load_vae(vae, device=device, dtype=vae_dtype), device=device)

    @torch.inference_mode()
    def __call__(self, prompt: str, *, negative: str = "", width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg_scale: float = 4.5, sampler: str = "dpmpp_2m", seed: int = 0,
                 batch: int = 1, callback=None) -> list[Generation]:
        """Generate `batch` images for one prompt; a `--ar h:w` / `--hw h:w` suffix sets the size."""
        base = native_resolution(self.model)
        prompt, size = parse_prompt(prompt, base if base in (512, 1024, 2048) else 1024)
        if size and width is None and height is None:
            height, width = size
        width, height = width or base, height or base
        check_size(width, height)
        cond, mask = self.text_encoder.encode([prompt])  # batch 1: sample() broadcasts it to the noise batch
        uncond, _ = self.text_encoder.encode([negative])
        cond, uncond = (t.to(self.device, self.model.dtype) for t in (cond, uncond))
        noise = noise_like((batch, self.model.config.in_channels, height // 8, width // 8), seed, self.device)
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        latents = sample(self.model, noise, cond, uncond, mask=mask.to(self.device), steps=steps,
                         cfg_scale=cfg_scale, sampler=sampler, generator=generator, callback=callback)
        images = self.vae.decode(latents.to(self.vae.device, self.vae.dtype))
        return [Generation(to_pil(img), prompt, seed, i) for i, img in enumerate(images)]


def to_pil(image: torch.Tensor):
    """3 x H x W float in [0, 1] -> PIL image."""
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def file_name(prompt: str, seed: int, index: int) -> str:
    """A safe PNG name from the prompt's first words, the seed and the batch index."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "empty"
    return f"{slug}_s{seed}_{index}.png"
