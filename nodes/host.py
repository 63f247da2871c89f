"""Dimba inside ComfyUI: the MODEL wrapper, the DIMBA_T5 object and the pack's sampler (imports comfy)."""
import functools

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import comfy.utils
import latent_preview
from tqdm.auto import tqdm

from ._dimba import dimba_core, loader, sampling, text, weights

flat_mask = dimba_core.model.flat_mask
from .loaders import FP8_DTYPES
from .sampling import check_latent

SCHEDULE = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02, "timesteps": 1000}
DTYPES = {name: weights.torch_dtype(name) for name in weights.DTYPES}
FP8 = {name: getattr(torch, dtype) for name, dtype in FP8_DTYPES.items()}
CONFIG_KEY = loader.CONFIG_KEY


class FullLoadPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that moves all weights at once, for T5 (a transformers model of plain torch modules)."""

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return super().partially_load(device_to, self.model_size() + 1, force_patch_weights)

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        return 0  # ComfyUI then unloads the whole model


class DimbaPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher, which also patches (LoRA, model merges) the parameters its loader leaves alone:
    those that are not in a comfy.ops layer (scale_shift_table, the Mamba A_log / D, RMSNorm weights). They are
    small, so they are patched whole on every load, full or partial; unpatching restores them as usual."""

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        super().load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                     full_load=full_load)
        for key in list(self.patches):
            owner = comfy.utils.get_attr(self.model, key.rsplit(".", 1)[0])
            if key not in self.backup and not hasattr(owner, "comfy_cast_weights"):
                self.patch_weight_to_device(key, device_to=device_to)


def _cast_weights(layer, like, bias_dtype=None):
    """dimba_core's cast_weights hook: the layer's weights as ComfyUI's own forward would use them (LoRA and
    low-VRAM patches applied, cast to like's dtype and device)."""
    return comfy.ops.cast_bias_weight(layer, like, bias_dtype=bias_dtype)


@functools.cache
def dimba_operations(base):
    """The comfy.ops namespace ComfyUI picked, whose Linear and Conv1d also serve the Mamba mixer, which reads
    some weights directly (conv1d, x_proj, dt_proj), through dimba_core's `cast_weights` hook."""
    linear = type("Linear", (base.Linear,), {"cast_weights": _cast_weights})
    conv1d = type("Conv1d", (base.Conv1d,), {"cast_weights": _cast_weights})
    return type(f"Dimba_{base.__name__}", (base,), {"Linear": linear, "Conv1d": conv1d})


class DimbaModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config: eps prediction, linear betas 1e-4..0.02 over 1000 steps, SDXL latents."""

    unet_config = {"image_model": "dimba"}
    unet_extra_config = {}
    sampling_settings = SCHEDULE
    latent_format = comfy.latent_formats.SDXL
    memory_usage_factor = 0.5
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def process_unet_state_dict_for_saving(self, state_dict):
        """ModelSave / CheckpointSave: ComfyUI's keys plus the Dimba config (num_heads cannot be read from
        shapes) as a uint8 tensor of JSON, since ComfyUI writes its own file metadata."""
        out = super().process_unet_state_dict_for_saving(state_dict)
        config = dimba_core.DimbaConfig(**{k: v for k, v in self.unet_config.items()
                                           if k in dimba_core.DimbaConfig.__dataclass_fields__})
        out[CONFIG_KEY] = loader.config_tensor(config)
        return out


class DimbaDiffusion(torch.nn.Module):
    """ComfyUI's view of a dimba_core.Dimba built from ComfyUI's operations: the same modules under the same
    state-dict keys (so LoRA files, ModelSave and merges see `diffusion_model.<dimba key>`), called the ComfyUI
    way: (x, t, context, attention_mask) -> eps, computed in x's dtype. The Dimba stays reachable as `net`."""

    def __init__(self, image_model=None, dtype=None, device=None, operations=None, **config):
        super().__init__()
        ops = dimba_operations(operations or comfy.ops.disable_weight_init)
        net = dimba_core.Dimba(dimba_core.DimbaConfig(**config), operations=ops, dtype=dtype, device=device)
        object.__setattr__(self, "net", net)  # not a submodule: its children are registered here instead
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, buffer in net.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    @property
    def config(self):
        return self.net.config

    @property
    def dtype(self) -> torch.dtype:
        """The weight (storage) dtype, as ComfyUI's models report it; ComfyUI's manual cast sets the compute one."""
        return self.net.x_embedder.proj.weight.dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, control=None, transformer_options=None,
                **kwargs):
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:  # e.g. KSampler with an SD3/Flux latent
            check_latent(x.shape, self.config)
        return self.net(x, timesteps, context, attention_mask, dtype=x.dtype)[:, : self.config.in_channels]


class DimbaModel(comfy.model_base.BaseModel):
    """A Dimba network as a ComfyUI BaseModel; reads the T5 embedding and attention mask from conditioning."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device, unet_model=DimbaDiffusion)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        context = kwargs.get("cross_attn", None)
        if context is not None:
            self.diffusion_model.config.check_caption_width(context.shape[-1])
            mask = kwargs.get("attention_mask", None)
            if mask is None or mask.shape[-1] != context.shape[1]:
                mask = torch.ones(context.shape[:2], dtype=torch.long)  # no mask: every token is valid
            out["c_crossattn"] = comfy.conds.CONDRegular(context)  # equal lengths batch; no repeat-padding
            out["attention_mask"] = comfy.conds.CONDRegular(flat_mask(mask).long())
        return out

    def compute_dtype(self) -> torch.dtype:
        """The dtype ComfyUI computes this model in: the manual cast dtype (float8 weights, a training node's
        choice), else the weights' dtype."""
        return self.manual_cast_dtype or self.get_dtype()


def pick_dtype(weight_dtype, stored, n_params, load_device):
    """The weight (storage) dtype: the user's choice, or ComfyUI's for this device and model size."""
    if weight_dtype in FP8 or weight_dtype in DTYPES:
        dtype = FP8.get(weight_dtype) or DTYPES[weight_dtype]
        if not mm.supports_cast(load_device, dtype):
            raise ValueError(f"weight_dtype {weight_dtype}: the {load_device.type} device cannot hold "
                             f"{str(dtype).replace('torch.', '')} weights (Apple MPS has no float8); pick "
                             "fp16 or default")
        return dtype
    return mm.unet_dtype(model_params=n_params, supported_dtypes=DimbaModelConfig.supported_inference_dtypes,
                         weight_dtype=stored)


def load_model(path, weight_dtype="default"):
    """A Dimba checkpoint as a ComfyUI MODEL, built the way ComfyUI builds its own: layers from the comfy.ops
    that pick_operations chooses, weights stored in `weight_dtype` and cast at use where compute differs."""
    try:
        config, sd = loader.read_checkpoint(path)
    except dimba_core.DimbaLoadError as err:
        raise ValueError(f"not a usable Dimba checkpoint: {err}") from None
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = pick_dtype(weight_dtype, sd["x_embedder.proj.weight"].dtype, sum(v.numel() for v in sd.values()),
                       load_device)
    model_config = DimbaModelConfig({**DimbaModelConfig.unet_config, **config.to_dict()})
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    if weight_dtype == "fp8_e4m3fn_fast":
        model_config.optimizations["fp8"] = True
    with torch.inference_mode(False):  # weights a training node (TrainLoraNode) can save for backward
        model = DimbaModel(model_config, device=offload_device)
        model.load_model_weights(sd, "")
    return DimbaPatcher(model, load_device=load_device, offload_device=offload_device)


def dimba_network(model) -> dimba_core.Dimba:
    """The dimba_core.Dimba inside a MODEL, or a clear error for other models."""
    view = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(view, DimbaDiffusion):
        raise ValueError("DimbaSampler needs a MODEL from DimbaCheckpointLoader; use KSampler for other models")
    return view.net


class DimbaT5:
    """DIMBA_T5: a dimba_core T5TextEncoder whose weights ComfyUI's memory manager moves."""

    def __init__(self, encoder, load_device, offload_device):
        self.encoder = encoder
        holder = torch.nn.Module()
        holder.t5 = encoder.model
        self.patcher = FullLoadPatcher(holder, load_device=load_device, offload_device=offload_device)

    @property
    def hidden_size(self):
        return self.encoder.hidden_size

    def encode(self, text, max_length):
        """[[emb 1 x L x C, {"attention_mask": 1 x L, "pooled_output": None}]] on the intermediate device."""
        mm.load_models_gpu([self.patcher])
        emb, mask = self.encoder.encode([text], max_length=max_length)
        device = mm.intermediate_device()
        return [[emb.float().to(device), {"attention_mask": mask.long().to(device), "pooled_output": None}]]


def load_t5(path, device="default", dtype="default"):
    """A T5 encoder folder or .safetensors file as DIMBA_T5."""
    load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    if dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    elif mm.is_device_cpu(load_device):
        torch_dtype = torch.float32
    else:
        torch_dtype = mm.text_encoder_dtype(load_device)
        if torch_dtype not in DTYPES.values():  # fp8 storage: compute T5 in half precision instead
            torch_dtype = torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float16
    encoder = text.T5TextEncoder.from_pretrained(path, device=offload_device, dtype=torch_dtype)
    return DimbaT5(encoder, load_device, offload_device)


def _first(conditioning, name):
    """(embedding, mask or None) of the first entry of a CONDITIONING."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty; connect a DimbaT5TextEncode or CLIPTextEncode output")
    emb, extra = conditioning[0][0], conditioning[0][1]
    return emb, extra.get("attention_mask", None)


def _pad(emb, mask, length):
    """Zero-pad an embedding to `length` tokens and return it with its mask (1 = real token)."""
    mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else flat_mask(mask).long()
    extra = length - emb.shape[1]
    if extra > 0:
        emb = torch.nn.functional.pad(emb, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(mask, (0, extra))
    return emb, mask


def captions(positive, negative, batch):
    """cond, uncond, mask, uncond_mask for dimba_core.sample, repeated to the latent batch.

    As in the reference, the prompt's mask also serves the uncond half when both have the same length
    (uncond_mask None); otherwise both are zero-padded to one length and each keeps its own mask.
    """
    cond, mask = _first(positive, "positive")
    uncond, u_mask = _first(negative, "negative")
    if cond.shape[1] == uncond.shape[1] and mask is not None:
        mask, u_mask = flat_mask(mask), None
    else:
        length = max(cond.shape[1], uncond.shape[1])
        cond, mask = _pad(cond, mask, length)
        uncond, u_mask = _pad(uncond, u_mask, length)
    return tuple(None if t is None else t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
                 for t in (cond, uncond, mask, u_mask))


def sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name, denoise=1.0):
    """Run dimba_core.sample on ComfyUI's device with its progress bar, previews and cancel button.

    Seeds as dimba_core.pipeline does (noise_like(shape, seed); the step noise from step_generator(seed)), so a
    seed gives the headless result.
    """
    net = dimba_network(model)
    config = net.config
    latent = latent_image["samples"]
    if "noise_mask" in latent_image:
        raise ValueError("DimbaSampler does not inpaint (the latent has a noise_mask): use KSampler with the "
                         "Dimba MODEL for masked latents")
    check_latent(latent.shape, config)
    cond, uncond, mask, u_mask = captions(positive, negative, latent.shape[0])
    config.check_caption_width(cond.shape[-1])
    config.check_caption_width(uncond.shape[-1])
    scale = model.model.latent_format.scale_factor
    noise = sampling.noise_like(latent.shape, seed)
    mm.load_models_gpu([model], memory_required=model.memory_required([2 * latent.shape[0], *latent.shape[1:]]),
                       minimum_memory_required=model.memory_required(list(latent.shape)))
    device = model.load_device
    preview = latent_preview.prepare_callback(model, steps)  # ComfyUI's UI progress bar and previews
    console = tqdm(total=steps, disable=not comfy.utils.PROGRESS_BAR_ENABLED)  # the console bar, as KSampler's

    def callback(step, total, x, denoised):
        mm.throw_exception_if_processing_interrupted()
        console.total = total
        console.update(1)
        preview(step, denoised, x, total)

    to = functools.partial(torch.Tensor.to, device=device)
    denoiser = functools.partial(net, dtype=model.model.compute_dtype())
    out = dimba_core.sample(
        denoiser, to(noise), to(cond), to(uncond),
        mask=to(mask), uncond_mask=None if u_mask is None else to(u_mask), steps=steps, cfg_scale=cfg,
        sampler=sampler_name, seed=seed, callback=callback,
        init_latent=to(latent.float() * scale) if denoise < 1.0 else None, denoise=denoise)
    console.close()
    return {"samples": (out.float() / scale).to(mm.intermediate_device())}
