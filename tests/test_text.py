"""Tests for the T5 text encoder: tokenizer, folder and single-file loading, fp8, dtypes."""

import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dimba_core import text
from dimba_core.text import Float8Linear, T5TextEncoder, load_tokenizer, tokenize
from dimba_core.tiny_assets import write_tiny_t5

PROMPTS = ["a photo of a cat", ""]
CAT_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]


@pytest.fixture(scope="module")
def t5_dir(shared_dir):
    """Folder with the real T5 v1.1 tokenizer and XXL config."""
    return shared_dir / "t5"


@pytest.fixture(scope="module")
def tokenizer(t5_dir):
    """The real T5 v1.1 tokenizer."""
    return load_tokenizer(t5_dir)


@pytest.fixture(scope="module")
def tiny(t5_dir, tmp_path_factory):
    """A tiny random T5 folder whose weights are exactly representable in float16, and its weights."""
    folder = write_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), tokenizer=t5_dir)
    weights = {k: v.half().float() for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, weights


@pytest.fixture(scope="module")
def reference(tiny):
    """Embeddings of PROMPTS from the tiny folder in float32."""
    return T5TextEncoder.from_pretrained(tiny[0], dtype=torch.float32).encode(PROMPTS, max_length=32)


def test_tokenize_prompt_and_padding(tokenizer):
    ids, mask = tokenize(tokenizer, "a photo of a cat", max_length=300)
    assert ids.shape == mask.shape == (1, 300) and ids.dtype == mask.dtype == torch.int64
    assert ids[0, :8].tolist() == CAT_IDS and not ids[0, 8:].any()
    assert mask[0, :8].all() and not mask[0, 8:].any()


def test_tokenize_empty_prompt(tokenizer):
    ids, mask = tokenize(tokenizer, [""], max_length=300)
    assert ids[0].tolist() == [1] + [0] * 299
    assert mask[0].tolist() == [1] + [0] * 299


def test_truncation_warns(tokenizer):
    with pytest.warns(UserWarning, match=r"\b3 tokens were cut"):
        ids, mask = tokenize(tokenizer, "a photo of a cat", max_length=5)
    assert ids.tolist() == [[3, 9, 1202, 13, 1]] and mask.all()


def test_tiny_matches_t5_v11_family(tiny, t5_dir):
    config = json.loads((tiny[0] / "config.json").read_text())
    xxl = json.loads((t5_dir / "t5_v1_1_xxl_config.json").read_text())
    for key in ("vocab_size", "dense_act_fn", "is_gated_act", "relative_attention_num_buckets"):
        assert config[key] == xxl[key], key
    assert (tiny[0] / "tokenizer.json").is_file()


def test_folder_encode(tiny, reference):
    enc = T5TextEncoder.from_pretrained(tiny[0], dtype="fp32")
    emb, mask = reference
    assert enc.hidden_size == 64 and enc.device.type == "cpu" and enc.dtype == torch.float32
    assert emb.shape == (2, 32, 64) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert mask[0].sum() == 8 and mask[1].tolist() == [1] + [0] * 31


@pytest.mark.parametrize("prefix,dtype,embed_key", [
    ("", torch.float32, "shared.weight"),
    ("text_encoders.t5xxl.transformer.", torch.float16, "shared.weight"),
    ("", torch.bfloat16, "encoder.embed_tokens.weight"),
])
def test_single_file_matches_folder(tiny, reference, tmp_path, prefix, dtype, embed_key):
    folder, weights = tiny
    if dtype == torch.bfloat16:
        weights = {k: v.bfloat16().float() for k, v in weights.items()}
    sd = {prefix + k: v.to(dtype) for k, v in weights.items()}
    sd[prefix + embed_key] = sd.pop(prefix + "shared.weight")
    path = tmp_path / "t5xxl_test.safetensors"
    save_file(sd, str(path))
    emb, mask = T5TextEncoder.from_pretrained(path, tokenizer=folder, dtype=torch.float32).encode(PROMPTS, max_length=32)
    ref = reference[0]
    if dtype == torch.bfloat16:
        ref = _encode_weights(weights, folder, tmp_path)
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)
    assert torch.equal(mask, reference[1])


def _encode_weights(weights, folder, tmp_path):
    """Embeddings of PROMPTS for float32 weights written as a plain single file."""
    path = tmp_path / "plain.safetensors"
    save_file(weights, str(path))
    return T5TextEncoder.from_pretrained(path, tokenizer=folder, dtype=torch.float32).encode(PROMPTS, max_length=32)[0]


def _kept_float8(enc) -> dict:
    """{layer name: Float8Linear} of an encoder."""
    return {n: m for n, m in enc.model.named_modules() if isinstance(m, Float8Linear)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_fp8_file_stays_float8(tiny, tmp_path, dtype):
    """t5xxl_fp8_e4m3fn_scaled's layout: its attention and wi weights stay float8 with their scales (wo, whose input
    transformers casts to wo's dtype, is upcast), and the embeddings equal those of the dequantized weights stored
    in float32, bit for bit; .to(dtype) keeps them float8."""
    folder, weights = tiny
    sd, dequant = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, w in weights.items():
        if key.startswith("encoder.block.") and w.ndim == 2 and "relative_attention_bias" not in key:
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            module = key[: -len(".weight")]
            sd[key], sd[module + ".scale_weight"] = q, scale.reshape(1)
            sd[module + ".scale_input"] = torch.ones(1)
            dequant[key] = q.float() * scale
        else:
            sd[key] = dequant[key] = w.half()
    path, plain = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", tmp_path / "dequantized.safetensors"
    save_file(sd, str(path))
    save_file({k: v.float() for k, v in dequant.items()}, str(plain))
    enc = T5TextEncoder.from_pretrained(path, tokenizer=folder, dtype=dtype)
    kept = _kept_float8(enc)
    assert kept and all(".wo" not in n for n in kept) and all("wo" in n or "wi" in n or "Attention" in n
                                                              for n in kept)
    for name, layer in kept.items():
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.dequantized(layer.weight, torch.float32), dequant[name + ".weight"]), name
    want = T5TextEncoder.from_pretrained(plain, tokenizer=folder, dtype=dtype).encode(PROMPTS, max_length=32)[0]
    assert torch.equal(enc.encode(PROMPTS, max_length=32)[0], want)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in _kept_float8(enc.to(dtype=torch.float16)).values())
    upcast = T5TextEncoder.from_pretrained(path, tokenizer=folder, dtype=dtype, keep_float8=False)  # as on MPS
    assert not _kept_float8(upcast) and torch.equal(upcast.encode(PROMPTS, max_length=32)[0], want)


def test_plain_fp8_file_stays_float8(tiny, tmp_path):
    """An fp8 file without scales (t5xxl_fp8_e4m3fn): the same, with scale 1; a quarter of float32's bytes."""
    folder, weights = tiny
    sd = {k: v.to(torch.float8_e4m3fn) if k.startswith("encoder.block.") else v for k, v in weights.items()}
    path, plain = tmp_path / "t5xxl_fp8_e4m3fn.safetensors", tmp_path / "upcast.safetensors"
    save_file(sd, str(path))
    save_file({k: v.float() for k, v in sd.items()}, str(plain))
    enc = T5TextEncoder.from_pretrained(path, tokenizer=folder, dtype=torch.float32)
    ref = T5TextEncoder.from_pretrained(plain, tokenizer=folder, dtype=torch.float32)
    assert torch.equal(enc.encode(PROMPTS, max_length=32)[0], ref.encode(PROMPTS, max_length=32)[0])
    kept = _kept_float8(enc)
    assert kept and all(float(m.float8_scale) == 1.0 for m in kept.values())
    size = {n: sum(p.numel() * p.element_size() for p in e.model.parameters()) for n, e in (("f8", enc), ("f32", ref))}
    saved = sum(m.weight.numel() * 3 for m in kept.values())  # 1 byte instead of 4 per kept weight
    assert size["f8"] == size["f32"] - saved


def test_missing_and_wrong_keys_name_them(tiny, tmp_path):
    folder, weights = tiny
    sd = dict(weights)
    sd.pop("encoder.block.1.layer.0.SelfAttention.k.weight")
    sd["encoder.block.1.layer.0.SelfAttention.v.weight"] = torch.zeros(3, 64)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="broken.safetensors") as err:
        T5TextEncoder.from_pretrained(path, tokenizer=folder)
    assert "block.1.layer.0.SelfAttention.k.weight" in str(err.value)
    assert "block.1.layer.0.SelfAttention.v.weight" in str(err.value)


def test_not_a_t5_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a T5 encoder"):
        T5TextEncoder.from_pretrained(path)


def test_missing_tokenizer_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "comfy_tokenizer_dir", lambda: None)
    path = tmp_path / "t5.safetensors"
    save_file(tiny[1], str(path))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        T5TextEncoder.from_pretrained(path)


def test_comfy_tokenizer_found_without_importing_comfy(tiny, t5_dir, tmp_path, monkeypatch):
    pkg = tmp_path / "host" / "comfy"
    (pkg / "text_encoders" / "t5_tokenizer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('comfy must not be imported')\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (pkg / "text_encoders" / "t5_tokenizer" / name).write_bytes((t5_dir / name).read_bytes())
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "host"))
    importlib.invalidate_caches()
    assert text.comfy_tokenizer_dir() == pkg / "text_encoders" / "t5_tokenizer"
    path = tmp_path / "t5.safetensors"
    save_file(tiny[1], str(path))
    ids, _ = T5TextEncoder.from_pretrained(path).tokenize("a photo of a cat", max_length=8)
    assert ids[0].tolist() == CAT_IDS and "comfy" not in sys.modules


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu(tiny, reference, dtype):
    enc = T5TextEncoder.from_pretrained(tiny[0], dtype=dtype)
    emb, _ = enc.encode(PROMPTS, max_length=32)
    assert emb.dtype == dtype == enc.dtype and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.float(), reference[0], rtol=0.1, atol=0.1)
    if dtype == torch.float16:
        assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_to_changes_dtype(tiny, reference):
    enc = T5TextEncoder.from_pretrained(tiny[0]).to(dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.model.shared.weight.dtype == torch.bfloat16
    assert enc.encode(PROMPTS, max_length=32)[0].dtype == torch.bfloat16
    emb = enc.to(device="cpu", dtype=torch.float32).encode(PROMPTS, max_length=32)[0]
    assert emb.dtype == torch.float32 and enc.model.shared.weight.dtype == torch.float32
    torch.testing.assert_close(emb, reference[0], rtol=0.1, atol=0.1)


def test_t5_defaults_to_bf16_close_to_float32(tiny, reference):
    """T5 is stored and run in bf16 by default (half of float32's memory); names and torch dtypes are accepted,
    other dtypes refused with the choices."""
    enc = T5TextEncoder.from_pretrained(tiny[0])
    assert enc.dtype == enc.model.shared.weight.dtype == torch.bfloat16
    emb, mask = enc.encode(PROMPTS, max_length=32)
    want, _ = reference
    valid = mask.bool()
    err = float((emb.float() - want)[valid].norm() / want[valid].norm())
    assert emb.dtype == torch.bfloat16 and err < 2e-2, err
    assert T5TextEncoder.from_pretrained(tiny[0], dtype="fp16").dtype == torch.float16
    for bad in ("int8", torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="bf16"):
            T5TextEncoder.from_pretrained(tiny[0], dtype=bad)
