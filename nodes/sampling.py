"""Sampling nodes: the paper's samplers and the reference resolution buckets."""
from ._dimba import dimba_core, resolution
from .common import host

RESOLUTION_SETTINGS = dimba_core.config.RESOLUTION_SETTINGS

RATIOS = [str(r) for r in resolution.ASPECT_RATIOS_1024]
SAMPLER_NAMES = list(dimba_core.SAMPLERS)  # dpmpp_2m, the default, first


class DimbaSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Dimba model from DimbaCheckpointLoader."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt (DimbaT5TextEncode or T5 CLIPTextEncode)."}),
            "negative": ("CONDITIONING", {"tooltip": "The unconditional prompt, usually empty text."}),
            "latent_image": ("LATENT", {"tooltip": "EmptyLatentImage for text-to-image, or VAEEncode output "
                                        "with denoise < 1 for image-to-image."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the headless dimba_core result."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (1 disables guidance)."}),
            "sampler_name": (SAMPLER_NAMES, {"default": "dpmpp_2m", "tooltip": "The paper's samplers: "
                             "dpmpp_2m (DPM-Solver++), ddim, iddpm (learned variance), euler, sa_solver (SA-Solver, stochastic)."}),
        }, "optional": {
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image; lower keeps more of latent_image (img2img)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Denoised latent for VAEDecode (SDXL VAE).",)
    FUNCTION = "sample"
    CATEGORY = "Dimba/sampling"
    DESCRIPTION = "Samples a Dimba model with the reference samplers, matching headless dimba_core for a seed."

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, denoise=1.0):
        return (host().sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, denoise),)


class DimbaResolutionSelect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_resolution": (list(RESOLUTION_SETTINGS), {"default": 512, "tooltip": "The resolution the checkpoint "
                                "was trained at (512 for the published dimba-l-512)."}),
            "aspect_ratio": (RATIOS, {"default": "1.0", "tooltip": "Height / width of the reference bucket."}),
        }}

    RETURN_TYPES = ("INT", "INT")
    RETURN_NAMES = ("width", "height")
    OUTPUT_TOOLTIPS = ("Image width in pixels.", "Image height in pixels.")
    FUNCTION = "select"
    CATEGORY = "Dimba/sampling"
    DESCRIPTION = "Width and height of the reference aspect-ratio bucket, for EmptyLatentImage."

    def select(self, base_resolution, aspect_ratio):
        height, width = resolution.closest_bucket(float(aspect_ratio), int(base_resolution))
        return (width, height)
