"""T5 v1.1 text encoder for Dimba prompts, loaded from a Hugging Face folder or one .safetensors file."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from .config import CAPTION_LENGTH
from .dtypes import FLOAT8, headless_dtype
from .weights import (DimbaLoadError, check_keys, check_weights_folder, key_prefix, load_guarded, open_safetensors,
                      show, weights_source)

MAX_LENGTH = CAPTION_LENGTH
ANCHOR_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
QUANT_EXTRA = (".scale_input", ".input_scale", ".comfy_quant")


def _has_tokenizer(folder) -> bool:
    """True when a folder holds T5 tokenizer files."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def comfy_tokenizer_dir() -> Path | None:
    """The host ComfyUI's bundled T5 tokenizer folder, found without importing comfy."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "text_encoders" / "t5_tokenizer"
        if _has_tokenizer(folder):
            return folder
    return None


def find_tokenizer_dir(model_path, tokenizer=None) -> Path:
    """Pick the tokenizer folder: explicit, the model folder's own, ComfyUI's, else raise."""
    if tokenizer is not None:
        if not _has_tokenizer(tokenizer):
            raise FileNotFoundError(
                f"tokenizer folder {tokenizer} has no tokenizer.json (or spiece.model); "
                "point tokenizer= at a folder with the T5 v1.1 tokenizer files")
        return Path(tokenizer)
    model_path = Path(model_path)
    if model_path.is_dir():
        for folder in (model_path, model_path / "tokenizer", model_path.parent / "tokenizer"):
            if _has_tokenizer(folder):
                return folder
    host = comfy_tokenizer_dir()
    if host is not None:
        return host
    raise FileNotFoundError(
        f"no T5 tokenizer found for {model_path}: pass tokenizer=<folder with tokenizer.json>, "
        "or put the T5 v1.1 tokenizer files (tokenizer.json, tokenizer_config.json, "
        "special_tokens_map.json) next to config.json in the model folder")


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FIX = ("copy the T5 v1.1 tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) "
                 "into its folder again")


def load_tokenizer(folder) -> T5TokenizerFast:
    """Load a T5 fast tokenizer from a local folder (no network); a damaged file is one DimbaLoadError naming it."""
    import json

    folder = Path(folder)
    for name in TOKENIZER_JSON:
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise DimbaLoadError(f"{file}: not valid JSON ({e}); the tokenizer file is truncated or damaged: "
                                 f"{TOKENIZER_FIX}") from None
        if not isinstance(value, dict):
            raise DimbaLoadError(f"{file}: holds a JSON {type(value).__name__}, not the JSON object of a tokenizer "
                                 f"file: {TOKENIZER_FIX}")
    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (ImportError, MemoryError, FileNotFoundError):
        raise
    except Exception as e:  # a tokenizer.json of another schema: KeyError, TypeError, tokenizers' Exception
        file = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else folder / "spiece.model"
        first = (str(e).strip().splitlines() or [""])[0]
        raise DimbaLoadError(f"{file}: cannot load it as a T5 tokenizer ({type(e).__name__}: {first}); it is not "
                             f"a Hugging Face tokenizer file of T5 v1.1: {TOKENIZER_FIX}") from None


def check_vocab(tokenizer, rows: int, what: str = "the T5 encoder") -> None:
    """A tokenizer whose ids reach beyond the encoder's embedding rows is refused when loading (T5 v1.1's
    32100 tokens in 32128 rows are fine: fewer tokens than rows)."""
    try:
        size = max(tokenizer.get_vocab().values(), default=-1) + 1
    except (AttributeError, TypeError, ValueError):  # a stand-in tokenizer without a vocabulary
        return
    if size > rows:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DimbaLoadError(f"{where}: this tokenizer has {size} token ids but {what} has only {rows} embedding "
                             f"rows; ids from {rows} up would fail: use the tokenizer this T5 encoder was trained with "
                             "(T5 v1.1: 32100 tokens)")


def tokenize(tokenizer, prompts, max_length=MAX_LENGTH):
    """Token ids and mask (B×max_length int64), padded; warns when a prompt is truncated."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        prompts = [prompts]
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r:.60}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    for i, ids in enumerate(tokenizer(list(prompts))["input_ids"]):
        if len(ids) > max_length:
            warnings.warn(
                f"prompt {i} has {len(ids)} tokens; {len(ids) - max_length} tokens were cut "
                f"to fit max_length={max_length}", stacklevel=3)
    out = tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True,
                    return_tensors="pt")
    return out["input_ids"].long(), out["attention_mask"].long()


def _keep_fp32(key: str, dtype) -> bool:
    """Whether a weight stays float32 when running in float16 (as transformers does for T5)."""
    keep = T5EncoderModel._keep_in_fp32_modules or []
    return dtype == torch.float16 and any(name in key.split(".") for name in keep)


def _infer_config(shapes: dict) -> T5Config:
    """T5 encoder config from tensor shapes (v1.1 defaults for what shapes cannot tell)."""
    rel = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    vocab, d_model = shapes["shared.weight"]
    num_heads = rel[1]
    num_layers = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    d_ff = shapes[ff + ("wi_0.weight" if gated else "wi.weight")][0]
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=shapes[ANCHOR_KEY][0] // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=rel[0],
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
        is_encoder_decoder=False, use_cache=False)


def read_t5_file(path, dtype=torch.float32, keep_float8=False):
    """Read a single-file T5 encoder: stripped keys, fp8 upcast and scaled (or block linear weights kept float8,
    their scales under FLOAT8_SCALE keys), plus the inferred config."""
    with open_safetensors(path) as f:
        keys = list(f.keys())
        prefix = key_prefix(path, keys, ANCHOR_KEY, "T5 encoder",
                            "a T5 v1.1 XXL encoder (e.g. t5xxl_fp16.safetensors) or its Hugging Face folder")
        names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        if "shared.weight" not in names and "encoder.embed_tokens.weight" in names:
            names["shared.weight"] = names["encoder.embed_tokens.weight"]
        names.pop("encoder.embed_tokens.weight", None)
        scales = {k: v for k, v in names.items() if k.endswith((".scale_weight", ".weight_scale"))}
        weights = {k: v for k, v in names.items()
                   if (k.startswith("encoder.") or k == "shared.weight")
                   and k not in scales and not k.endswith(QUANT_EXTRA)}
        shapes = {k: list(f.get_slice(v).get_shape()) for k, v in weights.items()}
        try:
            config = _infer_config(shapes)
        except KeyError as err:
            raise DimbaLoadError(f"{path}: cannot infer the T5 config, key {err} is missing") from None
        except (ValueError, IndexError, TypeError, ZeroDivisionError) as err:
            raise DimbaLoadError(f"{path}: cannot infer the T5 config from its tensor shapes ({err}); the file is "
                                 "damaged or not a T5 v1.1 encoder") from None
        check_fp8_scales(path, f, names, weights, scales)
    state = {}
    for key, name in weights.items():
        # the file opened (memory-mapped) anew for each tensor: the pages read are unmapped before the next one,
        # so resident memory grows by the converted weights, not by the file as well
        with open_safetensors(path) as f:
            module = key.rsplit(".", 1)[0]
            scale = scales.get(module + ".scale_weight", scales.get(key + "_scale"))
            scale = None if scale is None else f.get_tensor(scale).float()
            if keep_float8 and _stays_float8(f, name, key, scale):
                state[key] = f.get_tensor(name)
                state[module + FLOAT8_SCALE] = torch.ones(()) if scale is None else scale.reshape(())
            else:
                state[key] = read_tensor(f, name, torch.float32 if _keep_fp32(key, dtype) else dtype, scale)
    return state, config


FLOAT8_SCALE = ".float8_scale"  # the state key of a kept float8 weight's scale


def _stays_float8(f, name, key, scale) -> bool:
    """A float8 weight of an encoder block's linear layer (with at most one scale) is kept as stored; but not the
    feed-forward output `wo`, whose input transformers casts to wo's weight dtype (that would be float8)."""
    part = f.get_slice(name)
    return (SAFETENSORS_DTYPES.get(part.get_dtype()) in FLOAT8 and len(part.get_shape()) == 2
            and key.startswith("encoder.block.") and key.endswith(".weight")
            and not key.endswith(".wo.weight") and "relative_attention_bias" not in key
            and (scale is None or scale.numel() == 1))


class Float8Linear(torch.nn.Linear):
    """A bias-free linear layer whose weight stays in the file's float8, times its float32 scale, dequantized at
    use into the input's dtype: the values a float32 upcast at load would give, in a quarter (half) of the memory
    of float32 (16-bit) weights."""

    def dequantized(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """weight (float8, or already cast by a host) times the scale, rounded once into dtype."""
        return (weight.float() * self.float8_scale.to(weight.device)).to(dtype)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantized(self.weight, x.dtype))


def _keep_float8(model: T5EncoderModel, state: dict) -> dict:
    """Make the linear layers whose weights the state keeps in float8 Float8Linear (scale buffers registered);
    returns the state without the scales."""
    for key in [k for k in state if k.endswith(FLOAT8_SCALE)]:
        layer = model.get_submodule(key[: -len(FLOAT8_SCALE)])
        if type(layer) is not torch.nn.Linear or layer.bias is not None:
            raise DimbaLoadError(f"float8 weight {key[: -len(FLOAT8_SCALE)]}.weight is not a bias-free linear layer's")
        layer.__class__ = Float8Linear
        layer.register_buffer("float8_scale", state.pop(key).float())
    return state


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def read_tensor(f, name, dtype, scale=None, chunk=1 << 22):
    """One tensor of an open safetensors file in `dtype` (a float8 one upcast and times its scale), converted in
    slices of about `chunk` values: no whole-tensor temporary in the file's dtype, so resident memory grows by the
    result alone (whole-tensor temporaries stay in the allocator's heap and double the peak)."""
    part = f.get_slice(name)
    shape, stored = part.get_shape(), SAFETENSORS_DTYPES.get(part.get_dtype())
    scale = None if scale is None else scale.reshape(()) if scale.numel() == 1 else scale
    if (stored == dtype and scale is None) or not shape or (scale is not None and scale.ndim):
        t = f.get_tensor(name)  # whole: nothing to convert, a 0-d tensor, or a per-row scale
        if scale is not None or t.dtype in FLOAT8:
            t = t.float() * (1 if scale is None else scale)
        return t.to(dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, chunk // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        piece = part[start:start + rows]
        if scale is not None or piece.dtype in FLOAT8:
            piece = piece.float() * (1 if scale is None else scale)
        out[start:start + rows] = piece
    return out


def check_fp8_scales(path, f, names: dict, weights: dict, scales: dict) -> None:
    """A file with ComfyUI's `scaled_fp8` marker must hold a scale for each float8 weight (read from the header):
    without it the weight would load unscaled, silently wrong."""
    if "scaled_fp8" not in names and "scaled_fp8" not in f.keys():
        return
    missing = [k.rsplit(".", 1)[0] + ".scale_weight" for k, v in weights.items()
               if f.get_slice(v).get_dtype().startswith("F8")
               and k.rsplit(".", 1)[0] + ".scale_weight" not in scales and k + "_scale" not in scales]
    if missing:
        raise DimbaLoadError(f"{path}: a scaled fp8 T5 (it has the 'scaled_fp8' marker) without the scales of "
                             f"{len(missing)} float8 weights: missing {show(missing)}; the file is incomplete or "
                             "damaged: download t5xxl_fp8_e4m3fn_scaled.safetensors again, or use "
                             "t5xxl_fp16.safetensors")


def _empty_encoder(config: T5Config):
    """A T5EncoderModel on the meta device and {key: shape} of the weights it takes (the input embedding is tied
    to `shared`, so not among them)."""
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return model, {k: v.shape for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _filled(model: T5EncoderModel, state: dict) -> T5EncoderModel:
    """The meta model holding the state's tensors as its weights (no copy), its input embedding tied to `shared`."""
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if model.encoder.embed_tokens.weight.is_meta:
        model.encoder.embed_tokens = model.shared
    return model


def _build_from_file(path, dtype, keep_float8=True) -> T5EncoderModel:
    """T5EncoderModel with weights from one .safetensors file; ValueError on missing/mismatched keys."""
    state, config = read_t5_file(path, dtype, keep_float8)
    model, expected = _empty_encoder(config)
    state = _keep_float8(model, state)
    check_keys(expected, {k: v.shape for k, v in state.items()}, path,
               f"a T5 encoder of the inferred shape (d_model {config.d_model}, {config.num_layers} layers, "
               f"{config.num_heads} heads)", unexpected_ok=True)
    return _filled(model, {k: state[k] for k in expected})


def _build_from_folder(path, dtype) -> T5EncoderModel:
    """T5EncoderModel from a Hugging Face folder: config.json and its .safetensors weights (shards too), read tensor
    by tensor into dtype as single files are (no network, no pickles, no float32 copy)."""
    path = Path(path)
    check_weights_folder(path, "T5", "a single-file t5xxl .safetensors")
    model, expected = _empty_encoder(T5Config.from_pretrained(str(path), local_files_only=True))
    where, shapes = {}, {}
    for file in sorted(path.glob("*.safetensors")):
        with open_safetensors(file) as f:
            for key in f.keys():
                name = "shared.weight" if key == "encoder.embed_tokens.weight" else key
                if name in expected and name not in where:
                    where[name] = (file, key)
                    shapes[name] = f.get_slice(key).get_shape()
    check_keys(expected, shapes, path, "its config.json (T5 weights)", unexpected_ok=True)
    state = {}
    for name, (file, key) in where.items():
        with open_safetensors(file) as f:  # opened for each tensor, as in read_t5_file
            state[name] = read_tensor(f, key, torch.float32 if _keep_fp32(name, dtype) else dtype)
    return _filled(model, state)


def t5_dtype(dtype=None, device="cpu") -> torch.dtype:
    """The T5 storage and compute dtype for a name ("bf16", "fp16", "fp32"), a torch float dtype or None (the
    default: bf16, or fp16 on a CUDA GPU that has no bf16)."""
    if dtype is not None:
        return headless_dtype(dtype, "T5 dtype")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class T5TextEncoder:
    """Prompt → (embeddings, mask) with a T5 encoder and its tokenizer."""

    def __init__(self, model: T5EncoderModel, tokenizer, *, dtype=None):
        check_vocab(tokenizer, model.shared.weight.shape[0])
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._dtype = dtype or model.shared.weight.dtype

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, device="cpu", dtype=None, keep_float8=None):
        """Load from a Hugging Face folder or a single t5xxl .safetensors file.

        dtype (a torch dtype or "bf16" / "fp16" / "fp32"): what the weights are stored and run in; default bf16
        (T5 v1.1's own training dtype: half of float32's memory, 8.9 GiB instead of 17.7 GiB for T5-XXL, and
        fast on CPUs with bf16 matrix units), fp16 on a CUDA GPU without bf16. Weights are read tensor by tensor
        into that dtype, with no float32 or second copy of the model. A float8 file's attention and gated-GELU
        input weights (t5xxl_fp8_e4m3fn[_scaled]) stay float8 with their scales (Float8Linear; about 5.9 GB for
        T5-XXL in all): dequantized at use, they give the embeddings of a load-time upcast bit for bit.
        keep_float8=False upcasts them at load instead (default: kept, except on Apple MPS, which has no float8).
        """
        dtype = t5_dtype(dtype, device)
        if keep_float8 is None:
            keep_float8 = torch.device(device).type != "mps"
        kind, path = weights_source(path, "T5 model", "text_encoder")
        model = load_guarded(lambda: _build_from_folder(path, dtype) if kind == "folder" else
                             _build_from_file(path, dtype, keep_float8), path, "T5 encoder")
        tok = load_tokenizer(find_tokenizer_dir(path, tokenizer))
        return cls(model, tok, dtype=dtype).to(device=device)

    @property
    def hidden_size(self) -> int:
        """Embedding width (d_model)."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the encoder and of its embeddings."""
        return self._dtype

    def to(self, device=None, dtype=None):
        """Move and/or cast the encoder in place; returns self."""
        if dtype is not None:
            for name, module in self.model.named_modules():  # float8 weights stay float8 (Float8Linear)
                target = torch.float32 if _keep_fp32(name + ".weight", dtype) else dtype
                for tensor in module.parameters(recurse=False):
                    if tensor.dtype not in FLOAT8:
                        tensor.data = tensor.data.to(target)
            self._dtype = dtype
        if device is not None:
            self.model.to(device=device)
        return self

    def tokenize(self, prompts, max_length=MAX_LENGTH):
        """Token ids and mask (B×max_length int64, CPU)."""
        return tokenize(self.tokenizer, prompts, max_length)

    @torch.inference_mode()
    def encode(self, prompts, max_length=MAX_LENGTH, device=None):
        """Embeddings B×L×C (encoder dtype) and mask B×L int64 for prompts padded to max_length, computed on
        `device` (default the weights'; a host that streams weights names its compute device)."""
        ids, mask = tokenize(self.tokenizer, prompts, max_length)
        device = self.device if device is None else device
        ids, mask = ids.to(device), mask.to(device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return emb.to(self.dtype), mask


__all__ = ["Float8Linear", "T5TextEncoder", "load_tokenizer", "tokenize", "find_tokenizer_dir",
           "comfy_tokenizer_dir", "read_t5_file", "t5_dtype", "MAX_LENGTH"]
