"""Loader and text nodes: Dimba checkpoints, T5 encoders, prompt encoding."""
import os

from ._dimba import dimba_core
from .common import DTYPE_CHOICES, WEIGHT_DTYPE_CHOICES, host

CAPTION_LENGTH = dimba_core.config.CAPTION_LENGTH


def _folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def checkpoint_names():
    """Files in ComfyUI's checkpoints and diffusion_models folders."""
    fp = _folder_paths()
    if fp is None:
        return []
    names = fp.get_filename_list("checkpoints")
    return names + [n for n in fp.get_filename_list("diffusion_models") if n not in names]


def checkpoint_path(name):
    fp = _folder_paths()
    path = fp and (fp.get_full_path("checkpoints", name) or fp.get_full_path("diffusion_models", name))
    if not path:
        raise ValueError(f"checkpoint {name!r} not found in models/checkpoints or models/diffusion_models")
    return path


def _is_t5_folder(path):
    return os.path.isfile(os.path.join(path, "config.json")) or os.path.isdir(os.path.join(path, "text_encoder"))


def t5_names():
    """T5 model folders (with config.json) and single .safetensors files in ComfyUI's text_encoders folders."""
    fp = _folder_paths()
    if fp is None:
        return []
    folders = set()
    for base in fp.get_folder_paths("text_encoders"):
        if os.path.isdir(base):
            folders.update(d for d in os.listdir(base) if _is_t5_folder(os.path.join(base, d)))
    files = [f for f in fp.get_filename_list("text_encoders")
             if f.endswith(".safetensors") and f.replace("\\", "/").split("/")[0] not in folders]
    return sorted(folders) + files


def t5_path(name):
    fp = _folder_paths()
    for base in fp.get_folder_paths("text_encoders") if fp else []:
        path = os.path.join(base, name)
        if os.path.isdir(path) or os.path.isfile(path):
            return path
    raise ValueError(f"text encoder {name!r} not found in models/text_encoders: put a T5 v1.1 folder "
                     "(config.json + .safetensors) or a t5xxl .safetensors file there")


def _combo(names, tooltip):
    return (names, {"default": names[0] if names else "", "tooltip": tooltip})


class DimbaCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": _combo(checkpoint_names(), "Dimba checkpoint (.safetensors, or a tensors-only .pt/.pth) "
                                "from models/checkpoints or models/diffusion_models."),
            "weight_dtype": (WEIGHT_DTYPE_CHOICES, {"default": "default", "tooltip": "How the weights are "
                             "stored: default lets ComfyUI pick for your device (fp32 on CPU); fp8_* halve the "
                             "memory of fp16 and compute in your device's dtype (_fast uses fp8 matrix "
                             "multiplication where the GPU has it); the Mamba state stays float32."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Dimba denoiser; works with DimbaSampler and ComfyUI's KSampler.",)
    FUNCTION = "load"
    CATEGORY = "Dimba/loaders"
    DESCRIPTION = "Loads a Dimba (Transformer-Mamba) diffusion checkpoint as a ComfyUI MODEL."

    def load(self, ckpt_name, weight_dtype="default"):
        return (host().load_model(checkpoint_path(ckpt_name), weight_dtype),)


class DimbaT5Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5_name": _combo(t5_names(), "T5 v1.1 encoder: a Hugging Face folder or a single t5xxl "
                              ".safetensors (fp16/bf16/fp8) in models/text_encoders."),
            "device": (["default", "cpu"], {"default": "default", "tooltip": "default: ComfyUI's text encoder "
                       "device; cpu keeps T5 off the GPU."}),
            "dtype": (DTYPE_CHOICES, {"default": "default", "tooltip": "Storage and compute dtype; default is "
                      "bf16 on the CPU (8.9 GiB for T5-XXL instead of 17.7 GiB in fp32) and ComfyUI's text encoder "
                      "dtype on GPUs. An fp8 file keeps its float8 weights (5.5 GiB), computed in this dtype."}),
        }}

    RETURN_TYPES = ("DIMBA_T5",)
    OUTPUT_TOOLTIPS = ("The T5 text encoder for DimbaT5TextEncode.",)
    FUNCTION = "load"
    CATEGORY = "Dimba/loaders"
    DESCRIPTION = "Loads the T5 text encoder that Dimba prompts are encoded with."

    def load(self, t5_name, device="default", dtype="default"):
        return (host().load_t5(t5_path(t5_name), device, dtype),)


class DimbaT5TextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5": ("DIMBA_T5", {"tooltip": "T5 from DimbaT5Loader."}),
            "text": ("STRING", {"default": "", "multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt; leave empty for the negative (unconditional) input."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = (f"T5 embedding ({CAPTION_LENGTH} tokens) with its attention mask.",)
    FUNCTION = "encode"
    CATEGORY = "Dimba/conditioning"
    DESCRIPTION = (f"Encodes a prompt with T5 into conditioning for Dimba, padded to {CAPTION_LENGTH} tokens with "
                   "a mask.")

    def encode(self, t5, text):
        return (t5.encode(text, max_length=CAPTION_LENGTH),)
