"""Headless text-to-image: T5 captions -> Dimba sampling -> VAE decode -> PIL images."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from .config import RESOLUTION_SETTINGS
from .loader import load_dimba
from .resolution import closest_bucket, parse_prompt, parse_ratio
from .sampling import check_seed, check_settings, noise_like, sample


MAX_SIDE = 4096  # px: twice the largest published resolution (the 2048 px buckets reach 4096 on one side)
MAX_BATCH = 64


class GenerationError(RuntimeError):
    """Sampling or decoding produced something that is not an image (NaN or infinite values)."""


def check_size(width: int | None, height: int | None, multiple: int = 16) -> None:
    """Image sides must be multiples of `multiple` px (VAE factor 8 x patch size: 16 for the published models)
    from 16 to MAX_SIDE px (None: not given)."""
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"image {name} must be a whole number of pixels, got {v!r}")
        if not 16 <= v <= MAX_SIDE:
            raise ValueError(f"image {name} {v} px is outside 16..{MAX_SIDE} px; Dimba was trained at up to 2048 px")
    if any(v is not None and v % multiple for v in (width, height)):
        w, h = (f"{max(multiple, v // multiple * multiple)}" if v is not None else "?" for v in (width, height))
        raise ValueError(f"image size {width}x{height} is not divisible by {multiple}; this Dimba model needs width "
                         f"and height that are multiples of {multiple} px (e.g. {w}x{h})")


def check_device(name, what: str = "device") -> torch.device:
    """A torch.device that exists on this machine, or a ValueError that says what to use instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {name!r} is not a device name; use cpu, cuda, cuda:1 or mps") from None
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"{what} {name!r}: this PyTorch ({torch.__version__}) sees no {device.type} device; "
                         "use --device cpu, or install a PyTorch build for your GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def check_vae(model, vae, name="the VAE") -> None:
    """The VAE must decode this model's latents: as many latent channels as the model has input channels (an SD3
    or Flux VAE has 16, the SDXL VAE 4), and not the SD 1.x/2.x VAE's scaling (Dimba's latents are the SDXL
    VAE's). Stand-ins without latent_channels / scaling_factor pass."""
    from .vae import SD_SCALING_FACTOR, SDXL_SCALING_FACTOR
    from .weights import DimbaLoadError

    channels, want = getattr(vae, "latent_channels", None), model.config.in_channels
    if isinstance(channels, int) and channels != want:
        raise DimbaLoadError(f"{name}: a VAE with {channels}-channel latents (SD3 and Flux VAEs have 16); this "
                             f"Dimba model's latents have {want} channels, the SDXL VAE's: use the SDXL VAE "
                             "(sdxl_vae.safetensors or its diffusers folder)")
    scale = getattr(vae, "scaling_factor", None)
    if isinstance(scale, float) and abs(scale - SD_SCALING_FACTOR) < 1e-6:
        raise DimbaLoadError(f"{name}: its scaling_factor is {SD_SCALING_FACTOR}, the SD 1.x/2.x VAE's; Dimba's "
                             f"latents are the SDXL VAE's (scaling {SDXL_SCALING_FACTOR}), this one gives wrong "
                             "colours: use the SDXL VAE (sdxl_vae.safetensors or its diffusers folder)")


def native_resolution(model) -> int:
    """The pixel size the checkpoint was trained at (DimbaConfig.native_resolution)."""
    return model.config.native_resolution


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
        model.config.check_caption_width(text_encoder.hidden_size)
        check_vae(model, vae)
        self.model, self.text_encoder, self.vae = model, text_encoder, vae
        self.device = torch.device(device) if device else next(model.parameters()).device
        self._negative: tuple[str, torch.Tensor] | None = None  # (text, T5 embedding) of the last negative

    @classmethod
    def from_files(cls, checkpoint, t5, vae, *, device=None, dtype=None, t5_device="cpu", t5_dtype=None,
                   tokenizer=None, vae_dtype=torch.float32, **model_overrides) -> "DimbaPipeline":
        """Load the three parts from files/folders."""
        from .text import T5TextEncoder
        from .vae import load_vae

        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        t5_device = check_device(t5_device, "t5_device")
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        model = load_dimba(checkpoint, device=device, dtype=dtype, **model_overrides)
        decoder = load_vae(vae, device=device, dtype=vae_dtype)
        check_vae(model, decoder, vae)  # before T5 XXL loads, as train checks its data first
        text_encoder = T5TextEncoder.from_pretrained(t5, tokenizer=tokenizer, device=t5_device, dtype=t5_dtype)
        return cls(model, text_encoder, decoder, device=device)

    @torch.inference_mode()
    def __call__(self, prompt: str, *, negative: str = "", width: int | None = None, height: int | None = None,
                 aspect_ratio: str | None = None, steps: int | None = None, cfg_scale: float = 4.5,
                 sampler: str = "dpmpp_2m", seed: int = 0, batch: int = 1, callback=None) -> list[Generation]:
        """Generate `batch` images for one prompt; `aspect_ratio` ("h:w", the closest training bucket) or a
        `--ar h:w` / `--hw h:w` prompt suffix sets the size when width and height are not given."""
        for what, text in (("prompt", prompt), ("negative", negative)):
            if not isinstance(text, str):
                raise ValueError(f"prompts must be strings: {what} is {type(text).__name__} {text!r:.60} "
                                 "(one prompt a call; the negative prompt is text too, empty by default)")
        base = native_resolution(self.model)
        buckets = base if base in RESOLUTION_SETTINGS else 1024  # the bucket table the checkpoint was trained on
        prompt, size = parse_prompt(prompt, buckets)
        if aspect_ratio is not None:
            size = closest_bucket(parse_ratio(aspect_ratio), buckets)
        if size and width is None and height is None:
            height, width = size
        width, height = (base if v is None else v for v in (width, height))  # 0 is checked, not replaced
        check_size(width, height, 8 * self.model.config.patch_size)
        check_request(seed=seed, batch=batch, steps=steps, cfg_scale=cfg_scale, sampler=sampler)
        cond, mask = self.text_encoder.encode([prompt])  # batch 1: sample() broadcasts it to the noise batch
        uncond = self.encode_negative(negative)
        cond, uncond = (t.to(self.device, self.model.dtype) for t in (cond, uncond))
        noise = noise_like((batch, self.model.config.in_channels, height // 8, width // 8), seed, self.device)
        latents = sample(self.model, noise, cond, uncond, mask=mask.to(self.device), steps=steps,
                         cfg_scale=cfg_scale, sampler=sampler, seed=seed, callback=callback)
        if not torch.isfinite(latents).all():
            raise GenerationError(f"sampling produced NaN or infinite latents for {prompt!r}: the model overflowed "
                                  f"in {self.model.dtype}; try --dtype fp32 or bf16, or a lower cfg")
        images = self.vae.decode(latents.to(self.vae.device, self.vae.dtype))
        if not torch.isfinite(images).all():
            raise GenerationError(f"the VAE produced NaN or infinite pixels in {self.vae.dtype}: decode in float32")
        return [Generation(to_pil(img), prompt, seed, i) for i, img in enumerate(images)]

    def encode_negative(self, negative: str) -> torch.Tensor:
        """T5 embedding of the negative prompt, encoded once while it stays the same (many prompts, one negative)."""
        if self._negative is None or self._negative[0] != negative:
            self._negative = (negative, self.text_encoder.encode([negative])[0])
        return self._negative[1]


def check_request(*, seed: int = 0, batch: int = 1, steps: int | None = None, cfg_scale: float = 4.5,
                  sampler: str = "dpmpp_2m") -> None:
    """Check generation settings before any model runs; raises a ValueError naming the setting."""
    check_seed(seed)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be a whole number from 1 to {MAX_BATCH}, got {batch!r}")
    check_settings(sampler, steps, cfg_scale)


def to_pil(image: torch.Tensor):
    """3 x H x W float in [0, 1] -> PIL image."""
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def file_name(prompt: str, seed: int, index: int) -> str:
    """A safe PNG name: the prompt's first words, a hash of the whole prompt, the seed and the batch index.

    The hash keeps names of distinct prompts distinct (non-Latin prompts, prompts sharing their start).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60].rstrip("_") or "prompt"
    digest = hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}_{digest}_s{seed}_{index}.png"
