"""T5 v1.1 text encoder for Dimba prompts, loaded from a Hugging Face folder or one .safetensors file."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from .weights import (DimbaLoadError, check_keys, check_weights_folder, key_prefix, load_guarded, open_safetensors,
                      show, weights_source)

MAX_LENGTH = 300
ANCHOR_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
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


def load_tokenizer(folder) -> T5TokenizerFast:
    """Load a T5 fast tokenizer from a local folder (no network)."""
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts, max_length=MAX_LENGTH):
    """Token ids and mask (B×max_length int64), padded; warns when a prompt is truncated."""
    if isinstance(prompts, str):
        prompts = [prompts]
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


def read_t5_file(path, dtype=torch.float32):
    """Read a single-file T5 encoder: stripped keys, fp8 upcast and scaled, plus the inferred config."""
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
        state = {}
        for key, name in weights.items():
            t = f.get_tensor(name)
            module = key.rsplit(".", 1)[0]
            scale = scales.get(module + ".scale_weight", scales.get(key + "_scale"))
            if scale is not None or t.dtype in FP8_DTYPES:
                t = t.float()
            if scale is not None:
                s = f.get_tensor(scale).float()
                t = t * (s.reshape(()) if s.numel() == 1 else s)
            state[key] = t.to(torch.float32 if _keep_fp32(key, dtype) else dtype)
    return state, config


def _build_from_file(path, dtype) -> T5EncoderModel:
    """T5EncoderModel with weights from one .safetensors file; ValueError on missing/mismatched keys."""
    state, config = read_t5_file(path, dtype)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    check_keys(expected, {k: v.shape for k, v in state.items()}, path,
               f"a T5 encoder of the inferred shape (d_model {config.d_model}, {config.num_layers} layers, "
               f"{config.num_heads} heads)", unexpected_ok=True)
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    model.tie_weights()
    if model.encoder.embed_tokens.weight.is_meta:
        model.encoder.embed_tokens = model.shared
    return model


def _build_from_folder(path, dtype) -> T5EncoderModel:
    """T5EncoderModel from a Hugging Face folder with .safetensors weights (no network, no pickles)."""
    path = Path(path)
    check_weights_folder(path, "T5", "a single-file t5xxl .safetensors")
    model, info = T5EncoderModel.from_pretrained(
        str(path), dtype=dtype, local_files_only=True, use_safetensors=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if k != "encoder.embed_tokens.weight"]
    wrong = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or wrong:
        report = "; ".join(f"{label}: {show(items)}" for label, items in (("missing keys", missing),
                                                                          ("wrong shapes", wrong)) if items)
        raise DimbaLoadError(f"{path}: T5 weights do not match config.json: {report}")
    return model


class T5TextEncoder:
    """Prompt → (embeddings, mask) with a T5 encoder and its tokenizer."""

    def __init__(self, model: T5EncoderModel, tokenizer, *, dtype=None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._dtype = dtype or model.shared.weight.dtype

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, device="cpu", dtype=torch.float32):
        """Load from a Hugging Face folder or a single t5xxl .safetensors file."""
        kind, path = weights_source(path, "T5 model", "text_encoder")
        build = _build_from_folder if kind == "folder" else _build_from_file
        model = load_guarded(lambda: build(path, dtype), path, "T5 encoder")
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
            self.model.to(dtype=dtype)
            self._dtype = dtype
            for name, module in self.model.named_modules():
                if _keep_fp32(name + ".weight", dtype):
                    module.float()
        if device is not None:
            self.model.to(device=device)
        return self

    def tokenize(self, prompts, max_length=MAX_LENGTH):
        """Token ids and mask (B×max_length int64, CPU)."""
        return tokenize(self.tokenizer, prompts, max_length)

    @torch.inference_mode()
    def encode(self, prompts, max_length=MAX_LENGTH):
        """Embeddings B×L×C (encoder dtype/device) and mask B×L int64 for prompts padded to max_length."""
        ids, mask = tokenize(self.tokenizer, prompts, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return emb.to(self.dtype), mask


__all__ = ["T5TextEncoder", "load_tokenizer", "tokenize", "find_tokenizer_dir",
           "comfy_tokenizer_dir", "read_t5_file", "MAX_LENGTH"]


def __getattr__(name):
    if name == "save_tiny_t5":  # moved in 0.2: deprecated alias for one release
        import warnings

        from .tiny_assets import write_tiny_t5

        warnings.warn("dimba_core.text.save_tiny_t5 moved to dimba_core.tiny_assets.write_tiny_t5", DeprecationWarning,
                      stacklevel=2)
        return lambda out_dir, tokenizer_dir, **kw: write_tiny_t5(out_dir, tokenizer=tokenizer_dir, **kw)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
