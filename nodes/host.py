"""Dimba inside ComfyUI: the model config and MODEL ComfyUI builds, the DIMBA_T5 object and the pack's sampler
(imports comfy)."""
import contextlib
import functools
import inspect
import logging
import uuid

import torch

import comfy.conds
import comfy.latent_formats
import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.samplers
import comfy.supported_models_base
import comfy.utils
import latent_preview
from tqdm.auto import tqdm

from ._dimba import dimba_core, dtypes, loader, sampling, text
from .common import check_latent

flat_mask = dimba_core.model.flat_mask
SCHEDULE = {"beta_schedule": "sqrt_linear", "linear_start": sampling.SCHEDULE["beta_start"],  # ComfyUI's names
            "linear_end": sampling.SCHEDULE["beta_end"], "timesteps": sampling.SCHEDULE["num_timesteps"]}
CONFIG_KEY = loader.CONFIG_KEY
log = logging.getLogger("ComfyUI-Dimba")
NATIVE_LOADING = False  # set by integration.install() once Dimba is in ComfyUI's model detection


# ComfyUI >= 0.4 pairs an offloadable cast with a release (CastBiasWeightContext); 0.3.64 has the plain cast only.
_CAST_CONTEXT = getattr(comfy.ops, "CastBiasWeightContext", None)
if _CAST_CONTEXT is not None and "offloadable" not in inspect.signature(comfy.ops.cast_bias_weight).parameters:
    _CAST_CONTEXT = None


def _cast_weights(layer, like, bias_dtype=None):
    """dimba_core's cast_weights hook: a context giving the layer's weights as ComfyUI's own forward uses them
    (LoRA and low-VRAM patches applied, cast to like's dtype and device), released when it exits."""
    if _CAST_CONTEXT is not None:
        return _CAST_CONTEXT(layer, like, bias_dtype=bias_dtype, offloadable=True)
    return contextlib.nullcontext(comfy.ops.cast_bias_weight(layer, like, bias_dtype=bias_dtype))


@functools.cache
def dimba_operations(base):
    """The comfy.ops namespace ComfyUI picked, whose Linear and Conv1d also serve the Mamba mixer, which reads
    some weights directly (conv1d, x_proj, dt_proj), through dimba_core's `cast_weights` hook."""
    linear = type("Linear", (base.Linear,), {"cast_weights": _cast_weights})
    conv1d = type("Conv1d", (base.Conv1d,), {"cast_weights": _cast_weights})
    return type(f"Dimba_{base.__name__}", (base,), {"Linear": linear, "Conv1d": conv1d})


def comfy_attention(q, k, v, mask=None, options=None):
    """dimba_core's attention hook: ComfyUI's attention dispatch (--use-sage-attention, --use-flash-attention,
    xformers, PyTorch, and transformer_options["optimized_attention_override"]) over B x heads x N x head_dim;
    the boolean key mask becomes the additive mask ComfyUI's backends take."""
    import comfy.ldm.modules.attention as attention

    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return attention.optimized_attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True, skip_output_reshape=True,
                                         transformer_options=options if options is not None else {})


def _text_encoder_target(state_dict):
    """ComfyUI's PixArt T5-XXL CLIP target when a bundled checkpoint carries T5 weights, else None."""
    try:
        import comfy.text_encoders.pixart_t5 as pixart_t5
    except ImportError:
        return None
    if not any(k.startswith(p + "t5xxl.") for k in state_dict for p in DimbaModelConfig.text_encoder_key_prefix):
        return None
    return comfy.supported_models_base.ClipTarget(pixart_t5.PixArtTokenizer, pixart_t5.PixArtT5XXL)


def dimba_config(unet_config) -> "dimba_core.DimbaConfig":
    """The DimbaConfig in a ComfyUI unet config (which also holds image_model and dtype)."""
    fields = dimba_core.DimbaConfig.__dataclass_fields__
    return dimba_core.DimbaConfig(**{k: v for k, v in unet_config.items() if k in fields})


class DimbaModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config: eps prediction, linear betas 1e-4..0.02 over 1000 steps, SDXL latents.

    Registered in comfy.supported_models by the pack; its unet_config is the DimbaConfig that the pack's model
    detection read from the state dict (nodes/integration.py).
    """

    unet_config = {"image_model": "dimba"}
    unet_extra_config = {}
    sampling_settings = SCHEDULE
    latent_format = comfy.latent_formats.SDXL
    memory_usage_factor = 0.5
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    text_encoder_key_prefix = ["text_encoders.", "cond_stage_model."]

    @property
    def dimba_config(self) -> "dimba_core.DimbaConfig":
        return dimba_config(self.unet_config)

    def get_model(self, state_dict, prefix="", device=None):
        return DimbaModel(self, device=device)

    def clip_target(self, state_dict={}):
        return _text_encoder_target(state_dict)

    def process_unet_state_dict(self, state_dict):
        """The denoiser's tensors as the model's keys: the config tensor dropped, absent unused buffers zeroed."""
        state_dict.pop(CONFIG_KEY, None)
        config = self.dimba_config
        sizes = {"pos_embed": (1, config.base_size ** 2, config.hidden_size),
                 "y_embedder.y_embedding": (config.model_max_length, config.caption_channels)}
        for key, shape in sizes.items():
            state_dict.setdefault(key, torch.zeros(shape))
        return state_dict

    def process_unet_state_dict_for_saving(self, state_dict):
        """ModelSave / CheckpointSave: ComfyUI's keys plus the Dimba config (num_heads cannot be read from
        shapes) as a uint8 tensor of JSON beside the denoiser's keys, since ComfyUI writes its own metadata."""
        out = super().process_unet_state_dict_for_saving(state_dict)
        out[loader.COMFY_PREFIX + CONFIG_KEY] = loader.config_tensor(self.dimba_config)
        return out


class DimbaDiffusion(torch.nn.Module):
    """ComfyUI's view of a dimba_core.Dimba built from ComfyUI's operations: the same modules under the same
    state-dict keys (so LoRA files, ModelSave and merges see `diffusion_model.<dimba key>`), called the ComfyUI
    way: (x, t, context, attention_mask) -> eps, computed in x's dtype. The Dimba stays reachable as `net`."""

    def __init__(self, image_model=None, dtype=None, device=None, operations=None, **config):
        super().__init__()
        ops = dimba_operations(operations or comfy.ops.disable_weight_init)
        net = dimba_core.Dimba(dimba_config(config), operations=ops, attention=comfy_attention, dtype=dtype, device=device)
        self.weight_dtype = dtype  # what ComfyUI chose; with Dynamic VRAM the tensors hold the file's dtype until used
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
        """The weight (storage) dtype ComfyUI built the model with, as its own models report it (not the loaded
        tensors', which keep the file's dtype under Dynamic VRAM); ComfyUI's manual cast sets the compute one."""
        return self.weight_dtype or self.net.x_embedder.proj.weight.dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, control=None, transformer_options=None,
                **kwargs):
        """The eps prediction, run inside ComfyUI's DIFFUSION_MODEL wrappers (EasyCache hooks there), with the
        transformer_options handed to every attention call."""
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers)
        return executor.execute(x, timesteps, context, attention_mask, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context=None, attention_mask=None, control=None, transformer_options=None,
                 **kwargs):
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:  # e.g. KSampler with an SD3/Flux latent
            check_latent(x.shape, self.config)
        out = self.net(x, timesteps, context, attention_mask, dtype=x.dtype, attention_options=transformer_options)
        return out[:, : self.config.in_channels]


class DimbaModel(comfy.model_base.BaseModel):
    """A Dimba network as a ComfyUI BaseModel; reads the T5 embedding and attention mask from conditioning."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device, unet_model=DimbaDiffusion)
        self.diffusion_model.requires_grad_(False)  # as ComfyUI >= 0.4 does for every model (training adds adapters)

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


# Parameters outside comfy.ops layers (scale_shift_table, the Mamba A_log / D, RMSNorm weights): ComfyUI's patchers
# skip them (they sit on modules with submodules, or on plain leaves the Dynamic VRAM patcher does not patch), so
# LoRA and merge patches on them are applied here, after every load, in float32 from the unpatched values.
ON_LOAD_KEY = "dimba_direct_parameters"


def _is_ops_key(model, key):
    owner = comfy.utils.get_attr(model, key.rsplit(".", 1)[0]) if "." in key else model
    return hasattr(owner, "comfy_cast_weights")


def patch_direct_parameters(patcher, *args, **kwargs):
    """ON_LOAD callback: set every direct (non-ops) parameter and buffer of the Dimba MODEL to its unpatched value
    with this patcher's patches applied in float32 (float64 stays). Idempotent: it starts from the originals,
    which are kept (on the CPU) the first time a key is patched."""
    model = patcher.model
    originals = model.__dict__.setdefault("dimba_originals", {})
    keys = [k for k in patcher.patches if k not in originals and not _is_ops_key(model, k)]
    for key in keys:  # ComfyUI may have patched it already in this load: its backup holds the original
        source = patcher.backup[key][0] if key in patcher.backup else comfy.utils.get_attr(model, key)
        originals[key] = source.detach().to("cpu", copy=True)
    for key, original in originals.items():
        target = comfy.utils.get_attr(model, key)
        value = original
        if patcher.patches.get(key):
            wide = torch.float64 if original.dtype == torch.float64 else torch.float32
            value = comfy.lora.calculate_weight(patcher.patches[key], original.to(target.device, wide, copy=True),
                                                key, intermediate_dtype=wide)
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def attach(patcher):
    """Give a Dimba MODEL's patcher the callback that patches its direct parameters (once; clones copy it)."""
    if isinstance(getattr(patcher, "model", None), DimbaModel) and \
            not patcher.get_callbacks(comfy.patcher_extension.CallbacksMP.ON_LOAD, ON_LOAD_KEY):
        patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, ON_LOAD_KEY,
                                      patch_direct_parameters)
        scan_hint(patcher.load_device)
    return patcher


_HINTED = set()


def scan_hint(device) -> bool:
    """Once per process and device: say when the Mamba layers will run on the portable `parallel` scan on an NVIDIA
    GPU (neither mamba-ssm nor triton importable), which the H200 measured 3.8x / 9.9x slower than mamba-ssm at
    512 / 1024 px, and what to install. Returns whether it logged."""
    device = torch.device(device)
    if device.type != "cuda" or device in _HINTED:
        return False
    _HINTED.add(device)
    if dimba_core.ops.resolve_backend("auto", device) != "parallel":
        return False
    log.warning("Dimba: neither mamba-ssm nor triton imports, so the Mamba layers run on the portable PyTorch scan "
                "(4-10x slower than mamba-ssm on an H200). Install triton (on Windows the triton-windows package) "
                "or, on Linux, mamba-ssm + causal-conv1d, then restart ComfyUI")
    return True


def model_options(weight_dtype, load_device):
    """ComfyUI's model_options for a weight dtype name (default lets ComfyUI pick for the device and model)."""
    if weight_dtype in ("default", None):
        return {}
    if weight_dtype not in dtypes.FP8_DTYPES and weight_dtype not in dtypes.DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is unknown; pick one of "
                         f"{', '.join(['default', *dtypes.FP8_DTYPES, *dtypes.DTYPES])}")
    dtype = dtypes.weight_dtype(weight_dtype)
    if not mm.supports_cast(load_device, dtype):
        raise ValueError(f"weight_dtype {weight_dtype}: the {load_device.type} device cannot hold "
                         f"{str(dtype).replace('torch.', '')} weights (Apple MPS has no float8); pick "
                         "fp16 or default")
    return {"dtype": dtype, **({"fp8_optimizations": True} if weight_dtype == "fp8_e4m3fn_fast" else {})}


def load_model(path, weight_dtype="default", disable_dynamic=False):
    """A Dimba checkpoint as a ComfyUI MODEL, built by ComfyUI's own loader (comfy.sd), as Load Diffusion Model
    builds it: the pack reads and checks the file (no pickled code runs; a bundled VAE / T5 is skipped), hands
    ComfyUI the state dict with its config tensor, and ComfyUI picks operations, dtypes and the patcher."""
    try:
        config, sd = loader.read_checkpoint(path)
    except dimba_core.DimbaLoadError as err:
        raise ValueError(f"not a usable Dimba checkpoint: {err}") from None
    sd[CONFIG_KEY] = loader.config_tensor(config)
    options = model_options(weight_dtype, mm.get_torch_device())
    with torch.inference_mode(False):  # weights a training node (TrainLoraNode) can save for backward
        patcher = load_state_dict(sd, config, options, disable_dynamic=disable_dynamic)
    if hasattr(patcher, "cached_patcher_init"):  # multi-GPU and non-dynamic clones rebuild it from the file
        patcher.cached_patcher_init = (load_model, (path, weight_dtype))
    return attach(patcher)


def load_state_dict(sd, config, model_options, disable_dynamic=False):
    """A Dimba state dict (with its config tensor) as a MODEL: through ComfyUI's loader when the hooks are in,
    else built directly the same way."""
    if NATIVE_LOADING:
        import comfy.sd

        params = inspect.signature(inspect.unwrap(comfy.sd.load_diffusion_model_state_dict)).parameters
        kwargs = {"disable_dynamic": True} if disable_dynamic and "disable_dynamic" in params else {}
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, **kwargs)
        if patcher is None:
            raise ValueError("ComfyUI did not recognise this Dimba checkpoint (another custom node may have replaced "
                             "its model detection); please report it with the start-up log")
        return patcher
    return _build(sd, config, model_options)


def _build(sd, config, model_options):
    """DimbaCheckpointLoader's own build, for a ComfyUI whose loading internals the hooks do not know."""
    model_config = DimbaModelConfig({"image_model": "dimba", **config.to_dict()})
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = model_options.get("dtype") or mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=model_config.supported_inference_dtypes,
        weight_dtype=sd["x_embedder.proj.weight"].dtype)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model_config.optimizations["fp8"] = bool(model_options.get("fp8_optimizations"))
    model = model_config.get_model(sd, "", device=offload_device)
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def dimba_network(model) -> dimba_core.Dimba:
    """The dimba_core.Dimba inside a MODEL, or a clear error for other models."""
    view = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(view, DimbaDiffusion):
        raise ValueError("DimbaSampler needs a MODEL from DimbaCheckpointLoader; use KSampler for other models")
    return view.net


def _cast_norm_class(base):
    """A cast-at-use twin of transformers' T5LayerNorm that ComfyUI manages like its own layers."""

    def forward(self, hidden):
        weight, _ = comfy.ops.cast_bias_weight(self, device=hidden.device, dtype=self.weight.dtype)
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        if weight.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.to(weight.dtype)
        return weight * hidden

    return type(f"Cast{base.__name__}", (base, comfy.ops.CastWeightBiasOp),
                {"forward": forward, "comfy_cast_weights": True, "bias": None})


def streamable(model):
    """Give a transformers T5 ComfyUI's cast-at-use layers (comfy.ops manual_cast Linear and Embedding, and a twin
    of T5LayerNorm), so that ComfyUI loads what fits on the GPU and streams the rest, as its own text encoders."""
    ops = comfy.ops.manual_cast
    for module in model.modules():
        if type(module) is text.Float8Linear:
            module.__class__ = CastFloat8Linear
        elif type(module) is torch.nn.Linear:
            module.__class__ = ops.Linear
        elif type(module) is torch.nn.Embedding:
            module.__class__ = ops.Embedding
            module.bias = None  # what comfy.ops' Embedding sets when it builds one
        elif type(module).__name__ == "T5LayerNorm":
            module.__class__ = _cast_norm_class(type(module))
    return model


class CastFloat8Linear(text.Float8Linear, comfy.ops.CastWeightBiasOp):
    """dimba_core's Float8Linear (a float8 T5 weight kept as stored) as a ComfyUI cast-at-use layer: ComfyUI moves
    the float8 weight where it computes (streaming it when it did not fit), then it is dequantized there."""

    comfy_cast_weights = True

    def forward(self, x):
        weight, _ = comfy.ops.cast_bias_weight(self, device=x.device, dtype=self.weight.dtype)
        return torch.nn.functional.linear(x, self.dequantized(weight, x.dtype))


class DimbaT5:
    """DIMBA_T5: a dimba_core T5TextEncoder whose weights ComfyUI's memory manager loads, fully or partially."""

    def __init__(self, encoder, load_device, offload_device):
        self.encoder = encoder
        holder = torch.nn.Module()
        holder.t5 = streamable(encoder.model)
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)

    @property
    def hidden_size(self):
        return self.encoder.hidden_size

    def encode(self, text, max_length):
        """[[emb 1 x L x C, {"attention_mask": 1 x L, "pooled_output": None}]] on the intermediate device."""
        mm.load_models_gpu([self.patcher])
        emb, mask = self.encoder.encode([text], max_length=max_length, device=self.patcher.load_device)
        device = mm.intermediate_device()
        return [[emb.float().to(device), {"attention_mask": mask.long().to(device), "pooled_output": None}]]


def load_t5(path, device="default", dtype="default"):
    """A T5 encoder folder or .safetensors file as DIMBA_T5."""
    load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    if dtype in dtypes.DTYPES:
        torch_dtype = dtypes.torch_dtype(dtype)
    elif mm.is_device_cpu(load_device):
        torch_dtype = torch.bfloat16  # 16 bits as ComfyUI stores text encoders; fp16 matmuls are slow on CPUs
    else:
        torch_dtype = mm.text_encoder_dtype(load_device)
        if torch_dtype.itemsize == 1:  # --fp8_e4m3fn-text-enc: a float8 file stays float8; the rest in 16 bits
            torch_dtype = torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float16
    encoder = text.T5TextEncoder.from_pretrained(path, device=offload_device, dtype=torch_dtype,
                                                 keep_float8=load_device.type != "mps")  # MPS has no float8
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


_WRAPPERS = comfy.patcher_extension.WrappersMP
RUN_WRAPPERS = (_WRAPPERS.OUTER_SAMPLE, _WRAPPERS.CALC_COND_BATCH, _WRAPPERS.PREDICT_NOISE, _WRAPPERS.DIFFUSION_MODEL)
OTHER_WRAPPERS = (_WRAPPERS.SAMPLER_SAMPLE, _WRAPPERS.APPLY_MODEL)  # parts of ComfyUI's loop DimbaSampler has not


def _wrapper_keys(model, kinds):
    """Keys of the wrappers of these kinds on a MODEL (EasyCache, LazyCache and other caching packs add them)."""
    wrappers = getattr(model, "wrappers", {}) or {}
    return sorted({str(key) for kind in kinds for key, found in wrappers.get(kind, {}).items() if found})


def _wrapped(kind, options, fn, class_obj=None):
    """fn inside the wrappers of `kind` found in these model options, as ComfyUI's sampling code calls them."""
    found = comfy.patcher_extension.get_all_wrappers(kind, options, is_model_options=True)
    return comfy.patcher_extension.WrapperExecutor.new_class_executor(fn, class_obj, found)


class WrappedSampling:
    """DimbaSampler's loop with the MODEL's sampling wrappers run where ComfyUI's samplers run them: OUTER_SAMPLE
    around the whole loop (with a CFGGuider as the executor's object), then per network evaluation CALC_COND_BATCH
    and DIFFUSION_MODEL (transformer_options with sigmas, sample_sigmas, uuids, cond_or_uncond), and PREDICT_NOISE
    around the guided prediction in ComfyUI's terms (x and denoised in sigma space). Timesteps become sigmas
    through the MODEL's model_sampling. With wrappers that return what they are given, the result is the unwrapped
    one bit for bit (PREDICT_NOISE wrappers add a round trip through sigma space)."""

    def __init__(self, model, denoiser, cfg, steps, seed, denoise=1.0):
        self.model, self.denoiser, self.cfg, self.steps, self.seed = model, denoiser, cfg, steps, seed
        self.denoise = denoise
        self.sampling = model.model.model_sampling
        self.guider = comfy.samplers.CFGGuider(model)
        self.guider.set_cfg(cfg)
        options = comfy.model_patcher.create_model_options_clone(model.model_options)
        comfy.patcher_extension.merge_nested_dicts(options["transformer_options"].setdefault("wrappers", {}),
                                                   model.wrappers, copy_dict1=False)
        self.guider.model_options = options
        self.uuids = [uuid.uuid4(), uuid.uuid4()]  # the uncond and cond halves of each batch, in that order
        self.variance = None  # the variance channels of the last evaluation that ran (a cached step reuses them)

    def run(self, noise, latent, sample_fn):
        """sample_fn(network, wrap_denoiser) inside the OUTER_SAMPLE wrappers."""
        start = 999 * min(1.0, self.denoise)  # sample_sigmas, for wrappers that count or schedule steps
        self.sample_sigmas = self.sampling.sigma(torch.linspace(start, 0, self.steps + 1))

        def outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
            return sample_fn(self.network, self.wrap_denoiser)

        executor = _wrapped(_WRAPPERS.OUTER_SAMPLE, self.guider.model_options, outer_sample, self.guider)
        return executor.execute(noise, latent, None, self.sample_sigmas, None, None, True, self.seed)

    @property
    def options(self):
        return self.guider.model_options  # replaced by OUTER_SAMPLE wrappers (EasyCache puts its state there)

    def network(self, x, t, y, mask):
        """One network evaluation (the batch is [uncond, cond] halves, or cond alone), inside CALC_COND_BATCH and
        DIFFUSION_MODEL wrappers; wrappers see the eps channels, the variance channels pass beside them."""
        halves = 1 if self.cfg == 1.0 else 2  # dimba_core's CFG batches [uncond, cond]
        sigmas = self.sampling.sigma(t[: x.shape[0] // halves])  # one per latent, as ComfyUI's calc_cond_batch
        opts = dict(self.options["transformer_options"], sigmas=sigmas, sample_sigmas=self.sample_sigmas,
                    uuids=self.uuids[-halves:], cond_or_uncond=[1, 0][-halves:])
        channels = x.shape[1]

        def forward(x, timesteps, context, attention_mask, control, transformer_options, **kwargs):
            out = self.denoiser(x, timesteps, context, attention_mask, attention_options=transformer_options)
            self.variance = out[:, channels:] if out.shape[1] > channels else None
            return out[:, :channels]

        def calc_cond_batch(model, conds, x_in, timestep, model_options):
            diffusion = _wrapped(_WRAPPERS.DIFFUSION_MODEL, {"transformer_options": opts}, forward,
                                 self.model.model.diffusion_model)
            return diffusion.execute(x_in, t, y, mask, None, opts)

        eps = _wrapped(_WRAPPERS.CALC_COND_BATCH, self.options, calc_cond_batch).execute(
            self.model.model, None, x, sigmas, self.options)
        if self.variance is None or self.variance.shape[0] != eps.shape[0]:
            return eps
        return torch.cat([eps, self.variance], dim=1)

    def wrap_denoiser(self, guided):
        """The guided denoiser inside PREDICT_NOISE wrappers, which take and give ComfyUI's x and denoised."""
        found = comfy.patcher_extension.get_all_wrappers(_WRAPPERS.PREDICT_NOISE, self.options, is_model_options=True)
        if not found:
            return guided
        state = {"variance": None}  # kept from the last prediction that ran (a cached step reuses it)

        def predict_noise(x_sigma, timestep, model_options=None, seed=None):
            eps, state["variance"] = guided(x_sigma * state["alpha"], state["t"])
            return x_sigma - state["sigma"] * eps

        def wrapped(x, t):
            sigma = self.sampling.sigma(torch.as_tensor(t, dtype=torch.float32).reshape(1)).to(x.device)
            alpha = 1 / torch.sqrt(1 + sigma ** 2)
            state.update(t=t, sigma=sigma, alpha=alpha)
            x_sigma = x / alpha
            executor = _wrapped(_WRAPPERS.PREDICT_NOISE, self.options, predict_noise, self.guider)
            denoised = executor.execute(x_sigma, sigma.expand(x.shape[0]), self.options, self.seed)
            return (x_sigma - denoised) / sigma, state["variance"]

        return wrapped


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
    ignored = _wrapper_keys(model, OTHER_WRAPPERS)
    if ignored:
        log.warning("DimbaSampler: the MODEL's %s wrappers (%s) hook parts of ComfyUI's sampling loop that "
                    "DimbaSampler does not have; use KSampler for them", "/".join(OTHER_WRAPPERS), ", ".join(ignored))
    denoiser = functools.partial(net, dtype=model.model.compute_dtype())

    def run(network, wrap_denoiser=None):
        return dimba_core.sample(
            network, to(noise), to(cond), to(uncond),
            mask=to(mask), uncond_mask=None if u_mask is None else to(u_mask), steps=steps, cfg_scale=cfg,
            sampler=sampler_name, seed=seed, callback=callback,
            init_latent=to(latent.float() * scale) if denoise < 1.0 else None, denoise=denoise,
            wrap_denoiser=wrap_denoiser)

    wrappers = _wrapper_keys(model, RUN_WRAPPERS)
    try:  # the console bar is closed on Cancel too
        if wrappers:
            log.info("DimbaSampler: running the MODEL's sampling wrappers (%s)", ", ".join(wrappers))
            wrapped = WrappedSampling(model, denoiser, cfg, steps, seed, denoise)
            out = wrapped.run(noise, latent, run)
        else:
            options = dict(model.model_options.get("transformer_options", {}))  # e.g. an attention override
            out = run(functools.partial(denoiser, attention_options=options))
    finally:
        console.close()
    return {"samples": (out.float() / scale).to(mm.intermediate_device())}
