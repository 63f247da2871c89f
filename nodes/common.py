"""What the node modules share: the dtype choices, the latent check with node hints, and host (imported when a
node runs, since it imports comfy)."""
from ._dimba import dtypes

DTYPE_CHOICES = ["default", *dtypes.DTYPES]
# ComfyUI's Load Diffusion Model float8 choices, offered with fp16/bf16/fp32
WEIGHT_DTYPE_CHOICES = ["default", *dtypes.FP8_DTYPES, *dtypes.DTYPES]
LATENT_HINT = {16: "an SD3/Flux latent, e.g. from EmptySD3LatentImage, which is not for Dimba"}


def check_latent(shape, config):
    """DimbaConfig.check_latent, with the ComfyUI node to use in the message."""
    shape = tuple(shape)
    try:
        config.check_latent(shape)
    except ValueError as err:
        if len(shape) == 4 and shape[1] != config.in_channels:
            hint = LATENT_HINT.get(shape[1], "not an SDXL latent")
            raise ValueError(f"latent_image has {shape[1]} channels ({hint}); Dimba uses the SDXL VAE's "
                             f"{config.in_channels}-channel latents: use EmptyLatentImage for text-to-image, or "
                             "VAEEncode with the SDXL VAE for image-to-image") from None
        if len(shape) == 4:
            side = 8 * config.patch_size
            raise ValueError(f"{err}: got {shape[-1] * 8} x {shape[-2] * 8} px; use DimbaResolutionSelect or round "
                             f"EmptyLatentImage to a multiple of {side}") from None
        raise ValueError(f"latent_image is {len(shape)}-D {shape}, not B x {config.in_channels} x H x W; use "
                         "EmptyLatentImage for text-to-image, or VAEEncode for image-to-image") from None


def host():
    """nodes/host.py, imported on first use: it imports comfy, which only a node run inside ComfyUI has."""
    from . import host as module

    return module
