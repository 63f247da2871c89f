"""Hostile and broken files: every one ends in one DimbaLoadError naming the file, before heavy work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dimba_core import Dimba, DimbaConfig, DimbaLoadError, convert, load_dimba, loader, save_safetensors
from dimba_test_helpers import TINY_HALF_MAMBA

ROOT = Path(__file__).resolve().parents[1]


def tiny_sd(**kw) -> dict:
    torch.manual_seed(0)
    return Dimba(DimbaConfig(**{**TINY_HALF_MAMBA, **kw})).state_dict()


def load_error(source, **kw) -> str:
    """The DimbaLoadError message load_dimba raises (any other exception fails the test)."""
    with pytest.raises(DimbaLoadError) as err:
        load_dimba(source, **kw)
    return str(err.value)


def save_pt(tmp_path, obj, name="m.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def save_st(tmp_path, sd, config=None, name="m.safetensors") -> Path:
    path = tmp_path / name
    meta = None if config is None else {loader.CONFIG_KEY: config if isinstance(config, str) else json.dumps(config)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


# --- malformed checkpoints -------------------------------------------------------------------------------

def _drop(*keys):
    def edit(sd):
        for k in keys:
            del sd[k]
    return edit


def _set(key, value):
    def edit(sd):
        sd[key] = value
    return edit


def _drop_last_block(sd):
    for k in [k for k in sd if k.startswith("blocks.3.")]:
        del sd[k]


def _drop_last_block_mamba_everywhere(sd):
    sd.clear()
    sd.update(tiny_sd(mamba_ratio=1.0))
    _drop_last_block(sd)


MALFORMED = {
    "missing A_log": (_drop("mamba_blocks.0.mixer.A_log"), "A_log"),
    "missing conv": (_drop("mamba_blocks.0.mixer.conv1d.weight"), "conv1d.weight"),
    "missing dt_proj": (_drop("mamba_blocks.0.mixer.dt_proj.weight"), "dt_proj.weight"),
    "missing A_log of the second mixer": (_drop("mamba_blocks.1.mixer.A_b_log"), "A_b_log"),
    "1-D patch weight": (_set("x_embedder.proj.weight", torch.zeros(32)), "x_embedder.proj.weight"),
    "1-D mlp weight": (_set("blocks.0.mlp.fc1.weight", torch.zeros(128)), "blocks.0.mlp.fc1.weight"),
    "1-D caption weight": (_set("y_embedder.y_proj.fc1.weight", torch.zeros(32)), "y_embedder.y_proj.fc1.weight"),
    "1-D final weight": (_set("final_layer.linear.weight", torch.zeros(32)), "final_layer.linear.weight"),
    "1-D A_log": (_set("mamba_blocks.0.mixer.A_log", torch.zeros(64)), "A_log"),
    "2-D conv": (_set("mamba_blocks.0.mixer.conv1d.weight", torch.zeros(64, 4)), "conv1d.weight"),
    "3-D pos_embed not square": (_set("pos_embed", torch.zeros(1, 15, 32)), "pos_embed"),
    "1-D y_embedding": (_set("y_embedder.y_embedding", torch.zeros(8)), "y_embedding"),
    "non-square patch": (_set("x_embedder.proj.weight", torch.zeros(32, 4, 2, 3)), "x_embedder.proj.weight"),
    "zero width": (_set("x_embedder.proj.weight", torch.zeros(0, 4, 2, 2)), "x_embedder.proj.weight"),
    "final layer not a multiple of the patch": (_set("final_layer.linear.weight", torch.zeros(31, 32)),
                                                "final_layer.linear.weight"),
    "missing last block": (_drop_last_block, "blocks"),
    "missing last block, Mamba after every block": (_drop_last_block_mamba_everywhere, "blocks"),
    "block index far away": (_set("blocks.99999999999.mlp.fc1.weight", torch.zeros(128, 32)), "blocks"),
    "mamba index far away": (_set("mamba_blocks.99999999999.norm.weight", torch.zeros(32)), "mamba_blocks"),
    "int8 weights": (lambda sd: sd.update({k: v.to(torch.int8) for k, v in sd.items()}), "int8"),
    "one bool weight": (_set("blocks.0.attn.qkv.bias", torch.zeros(96, dtype=torch.bool)), "bool"),
    "complex weight": (_set("blocks.0.attn.qkv.bias", torch.zeros(96, dtype=torch.complex64)), "complex"),
}


@pytest.fixture
def no_big_build(monkeypatch):
    """Fail when the loader would build a model larger than the tiny one (i.e. trusted a claim)."""
    real = loader.Dimba

    def guarded(config, *a, **kw):
        assert config.depth <= 8 and config.base_size <= 64 and config.model_max_length <= 300, config
        return real(config, *a, **kw)

    monkeypatch.setattr(loader, "Dimba", guarded)


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_malformed_checkpoint_is_one_clear_error(tmp_path, case, fmt, no_big_build):
    edit, word = MALFORMED[case]
    sd = tiny_sd()
    edit(sd)
    path = save_pt(tmp_path, {"state_dict": sd}) if fmt == ".pt" else save_st(tmp_path, sd)
    msg = load_error(path, num_heads=4)
    assert msg.count(str(path)) == 1 and word in msg, msg


@pytest.mark.parametrize("obj,word", [
    ([torch.zeros(3)], "list"), (torch.zeros(3), "Tensor"), (None, "NoneType"), ({0: torch.zeros(3)}, "no tensors"),
    ({"state_dict": [1, 2]}, "state_dict"), ({"state_dict_ema": torch.zeros(1), "state_dict": {}}, "no tensors"),
    ({1: torch.zeros(1), "x_embedder.proj.weight": torch.zeros(32, 4, 2, 2)}, "not a Dimba checkpoint"),
    (42, "int"), ("text", "str"),
])
def test_pt_holding_something_else(tmp_path, obj, word):
    path = save_pt(tmp_path, obj)
    msg = load_error(path)
    assert str(path) in msg and word in msg, msg


def test_state_dict_argument_with_odd_keys():
    sd = {**tiny_sd(), 7: torch.zeros(1), ("a",): torch.zeros(1)}
    assert load_dimba(sd, num_heads=4).config.depth == 4  # non-string keys are not weights: ignored
    assert "no tensors" in load_error({0: torch.zeros(1)})


def test_directory_and_unknown_suffix(tmp_path):
    assert "folder" in load_error(tmp_path)
    other = tmp_path / "m.onnx"
    other.write_bytes(b"x")
    assert ".safetensors" in load_error(other)


def test_upper_case_suffix_loads(tmp_path):
    path = tmp_path / "M.SAFETENSORS"
    save_safetensors(load_dimba(tiny_sd(), num_heads=4), path)
    assert load_dimba(path).config.num_heads == 4


# --- config metadata -------------------------------------------------------------------------------------

def stored(**kw) -> dict:
    return {**DimbaConfig(**TINY_HALF_MAMBA).to_dict(), **kw}


BAD_METADATA = {
    "not JSON": ("{depth: 4", "not valid JSON"),
    "a list": ("[1, 2]", "JSON object"),
    "depth as text": (stored(depth="4"), "depth"),
    "float width": (stored(hidden_size=32.5), "hidden_size"),
    "bool heads": (stored(num_heads=True), "num_heads"),
    "unknown field": (stored(evil=1), "evil"),
    "NaN pe_interpolation": (json.dumps(stored()).replace('"pe_interpolation": 1.0', '"pe_interpolation": NaN'),
                             "pe_interpolation"),
    "zero heads": (stored(num_heads=0), "num_heads"),
    "negative heads": (stored(num_heads=-4), "num_heads"),
    "heads not dividing width": (stored(num_heads=5), "num_heads"),
    "negative depth": (stored(depth=-1), "depth"),
    "mamba ratio above 1": (stored(mamba_ratio=2.0), "mamba"),
    "width disagrees": (stored(hidden_size=64), "hidden_size"),
    "depth 3000": (stored(depth=3000), "depth"),
    "base_size 2**20 with pos_embed": (stored(base_size=2 ** 20), "base_size"),
    "mamba depth disagrees": (stored(mamba_ratio=1.0), "mamba"),
    "d_state disagrees": (stored(d_state=7), "d_state"),
    "dt_rank disagrees": (stored(dt_rank=3), "dt_rank"),
    "mlp_ratio disagrees": (stored(mlp_ratio=2.0), "mlp_ratio"),
    "learn_sigma disagrees": (stored(learn_sigma=False), "learn_sigma"),
    "model_max_length disagrees": (stored(model_max_length=300), "model_max_length"),
    "patch disagrees": (stored(patch_size=1), "patch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_config_metadata(tmp_path, case, no_big_build):
    config, word = BAD_METADATA[case]
    path = save_st(tmp_path, tiny_sd(), config)
    msg = load_error(path)
    assert msg.count(str(path)) == 1 and word in msg, msg


def test_claims_not_backed_by_tensors_allocate_nothing(tmp_path, no_big_build):
    """base_size / model_max_length without their (optional) tensors must not size a huge zero buffer."""
    sd = tiny_sd()
    del sd["pos_embed"], sd["y_embedder.y_embedding"]
    for claim, word in ((dict(base_size=2 ** 20), "base_size"), (dict(base_size=2 ** 12), "base_size"),
                        (dict(model_max_length=2 ** 40), "model_max_length")):
        path = save_st(tmp_path, sd, stored(**claim))
        msg = load_error(path)
        assert str(path) in msg and word in msg, msg
        assert word in load_error(sd, num_heads=4, **claim)
    ok = load_dimba(save_st(tmp_path, sd, stored(base_size=8)))  # a plausible claim is kept
    assert ok.config.base_size == 8 and ok.pos_embed.shape == (1, 64, 32)


def test_good_metadata_still_sets_what_shapes_cannot(tmp_path):
    path = save_st(tmp_path, tiny_sd(), stored(num_heads=8, pe_interpolation=2.0, mamba_ratio=0.5 + 1e-7))
    c = load_dimba(path).config
    assert (c.num_heads, c.pe_interpolation, c.mamba_depth) == (8, 2.0, 2)


@pytest.mark.parametrize("heads", [0, -4, 5, 2.5, True, "4"])
def test_bad_num_heads_argument(heads, no_big_build):
    assert "num_heads" in load_error(tiny_sd(), num_heads=heads)


def test_bad_overrides(no_big_build):
    assert "pe_interpolation" in load_error(tiny_sd(), num_heads=4, pe_interpolation=float("inf"))
    assert "hidden_size" in load_error(tiny_sd(), num_heads=4, hidden_size=64)
    assert "colour" in load_error(tiny_sd(), num_heads=4, colour=1)


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(num_heads=0), dict(num_heads=-4), dict(depth=0),
                                 dict(patch_size=0), dict(mlp_ratio=0.0), dict(mamba_ratio=-0.5),
                                 dict(base_size=-1), dict(pe_interpolation=float("nan")), dict(d_state=0),
                                 dict(expand=0), dict(dt_rank=0), dict(model_max_length=0), dict(depth=4.0),
                                 dict(learn_sigma="yes")])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DimbaConfig(**{**TINY_HALF_MAMBA, **bad})


# --- pickles on old torch --------------------------------------------------------------------------------

def test_pickle_refused_on_torch_with_unsafe_weights_only(tmp_path, monkeypatch):
    path = save_pt(tmp_path, {"state_dict": tiny_sd()})
    monkeypatch.setattr(loader, "torch_version", lambda: (2, 5, 1))
    msg = load_error(path, num_heads=4)
    assert str(path) in msg and "2.6" in msg and "CVE-2025-32434" in msg and ".safetensors" in msg
    monkeypatch.setattr(loader, "torch_version", lambda: (2, 6, 0))
    assert load_dimba(path, num_heads=4).config.depth == 4
    save_safetensors(load_dimba(path, num_heads=4), tmp_path / "m.safetensors")
    monkeypatch.setattr(loader, "torch_version", lambda: (1, 13))
    assert load_dimba(tmp_path / "m.safetensors").config.depth == 4  # safetensors need no pickle


def test_torch_version_parses_local_builds(monkeypatch):
    for text, want in (("2.13.0+cpu", (2, 13, 0)), ("2.6.0a0+git1234", (2, 6, 0)), ("2.5.1", (2, 5, 1))):
        monkeypatch.setattr(torch, "__version__", text)
        assert loader.torch_version() == want


# --- convert ---------------------------------------------------------------------------------------------

@pytest.fixture
def pt(tmp_path):
    return save_pt(tmp_path, {"state_dict": tiny_sd()})


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_never_replaces_its_input(tmp_path, pt, overwrite):
    st = tmp_path / "m.safetensors"
    convert(pt, st, num_heads=4)
    (tmp_path / "sym.pt").symlink_to(pt)
    (tmp_path / "sym.safetensors").symlink_to(st)
    os.link(st, tmp_path / "hard.safetensors")
    before = pt.read_bytes(), st.read_bytes()
    for src, dst in ((pt, pt), (st, st), (st, tmp_path / "sym.safetensors"), (tmp_path / "sym.safetensors", st),
                     (st, tmp_path / "hard.safetensors"), (tmp_path / "sub" / ".." / "m.safetensors", st)):
        if src.parent.name == "..":
            (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="same file"):
            convert(src, dst, overwrite=overwrite)
    assert (pt.read_bytes(), st.read_bytes()) == before
    assert load_dimba(st).config.depth == 4 and load_dimba(pt, num_heads=4).config.depth == 4


def test_convert_refuses_output_it_cannot_load(tmp_path, pt):
    for name in ("out.pt", "out.ckpt", "out.pth", "out", "out.safetensors.tmp"):
        with pytest.raises(ValueError, match=r"\.safetensors") as err:
            convert(pt, tmp_path / name, num_heads=4)
        assert name in str(err.value) and not (tmp_path / name).exists()


def test_convert_overwrites_only_when_asked(tmp_path, pt):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(ValueError, match="overwrite"):
        convert(pt, dst, num_heads=4)
    assert dst.read_bytes() == b"precious"
    convert(pt, dst, num_heads=4, overwrite=True)
    assert load_dimba(dst).config.num_heads == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.safetensors"]  # no temporary left
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="folder"):
        convert(pt, tmp_path / "d.safetensors", num_heads=4, overwrite=True)
    with pytest.raises(ValueError, match="no-such-dir"):
        convert(pt, tmp_path / "no-such-dir" / "m.safetensors", num_heads=4)


def test_convert_writes_atomically(tmp_path, pt, monkeypatch):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"precious")
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert(pt, dst, num_heads=4, overwrite=True)
    assert dst.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.safetensors"]


def test_convert_checks_arguments_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "read_state_dict", lambda *a, **k: pytest.fail("read before checking"))
    src = tmp_path / "m.pt"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="num_heads"):
        convert(src, tmp_path / "o.safetensors", num_heads=0)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert(src, tmp_path / "o.pt")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dimba_core", "convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_convert_cli_errors_and_force(tmp_path, pt):
    dst = tmp_path / "m.safetensors"
    for args, word in (((pt, pt), "same file"), ((pt, tmp_path / "o.pt"), ".safetensors"),
                       ((pt, dst, "--num-heads", "0"), "num_heads"), ((pt, dst, "--num-heads", "-2"), "num_heads")):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and word in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not dst.exists() and pt.stat().st_size > 1000
    assert cli(pt, dst, "--num-heads", "4").returncode == 0
    r = cli(pt, dst, "--num-heads", "2")
    assert r.returncode == 2 and "--force" in r.stderr and load_dimba(dst).config.num_heads == 4
    assert cli(pt, dst, "--num-heads", "2", "--force").returncode == 0
    assert load_dimba(dst).config.num_heads == 2


# --- T5 and VAE files ------------------------------------------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _garbage(path):
    path.write_bytes(os.urandom(5000))


def _header_only(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2]}    ")


@pytest.fixture(scope="module")
def t5_weights(tmp_path_factory):
    from dimba_core.tiny_assets import write_tiny_t5

    return write_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=16, num_layers=1, num_heads=2, d_ff=32)


def t5_error(path) -> str:
    from dimba_core.text import T5TextEncoder

    with pytest.raises(DimbaLoadError) as err:
        T5TextEncoder.from_pretrained(path)
    return str(err.value)


def test_t5_folder_without_weights_or_config(tmp_path, t5_weights):
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in t5_error(tmp_path / "empty")
    (tmp_path / "noconf").mkdir()
    save_file({"shared.weight": torch.zeros(2, 2)}, str(tmp_path / "noconf" / "model.safetensors"))
    assert "config.json" in t5_error(tmp_path / "noconf")
    (tmp_path / "badconf").mkdir()
    (tmp_path / "badconf" / "config.json").write_text("{oops")
    save_file({"shared.weight": torch.zeros(2, 2)}, str(tmp_path / "badconf" / "model.safetensors"))
    assert str(tmp_path / "badconf") in t5_error(tmp_path / "badconf")


def test_not_a_t5_file_or_folder(tmp_path):
    other = save_st(tmp_path, tiny_sd(), name="dimba.safetensors")
    assert "not a T5 encoder" in t5_error(other)
    bad = tmp_path / "t5.safetensors"
    anchor = "encoder.block.0.layer.0.SelfAttention.q.weight"
    save_file({anchor: torch.zeros(4, 4), "shared.weight": torch.zeros(8)}, str(bad))  # 1-D embedding
    assert str(bad) in t5_error(bad)
    save_file({anchor: torch.zeros(4, 4), "shared.weight": torch.zeros(8, 4),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 0)},
              str(bad))  # zero heads
    assert str(bad) in t5_error(bad)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))  # a VAE folder
    assert str(tmp_path) in t5_error(tmp_path)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def vae_error(path, **kw) -> str:
    from dimba_core.vae import load_vae

    with pytest.raises(DimbaLoadError) as err:
        load_vae(path, **kw)
    return str(err.value)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _header_only])
@pytest.mark.parametrize("form", ["file", "folder"])
@pytest.mark.parametrize("kind", ["t5", "vae"])
def test_broken_t5_or_vae_file(request, tmp_path, kind, damage, form):
    """A damaged weight file, single or inside its folder, is one DimbaLoadError naming it."""
    import shutil

    source, name, single, error = {
        "t5": ("t5_weights", "model.safetensors", "t5xxl_fp16.safetensors", t5_error),
        "vae": ("vae_folder", "diffusion_pytorch_model.safetensors", "sdxl_vae.safetensors", vae_error)}[kind]
    folder = Path(shutil.copytree(request.getfixturevalue(source), tmp_path / kind))
    weights = folder / name
    if form == "file":
        weights = Path(shutil.copy(weights, tmp_path / single))
    damage(weights)
    msg = error(weights if form == "file" else folder)
    assert str(weights if form == "file" else folder) in msg and "truncated or corrupt" in msg, msg


def test_vae_folder_without_weights_and_not_a_vae(tmp_path, vae_folder):
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in vae_error(tmp_path / "empty")
    other = save_st(tmp_path, tiny_sd(), name="dimba.safetensors")
    assert "not a VAE" in vae_error(other)
    bad = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8)}, str(bad))  # 1-D conv, nothing else
    assert str(bad) in vae_error(bad)
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
               "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
               "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(6, 8, 3, 3)}, str(bad))  # 6 % 32 groups
    assert str(bad) in vae_error(bad)
    (tmp_path / "noconf").mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "noconf" / "diffusion_pytorch_model.safetensors"))
    assert "config.json" in vae_error(tmp_path / "noconf")


# --- tokenizers and scaled fp8 T5 files ------------------------------------------------------------------

def _copy_t5(t5_weights, tmp_path, name="t5") -> Path:
    import shutil

    return Path(shutil.copytree(t5_weights, tmp_path / name))


@pytest.mark.parametrize("file,content", [
    ("tokenizer.json", None),  # truncated
    ("tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "Unigram"}})),  # another schema: KeyError
    ("tokenizer.json", "[1, 2]"),
    ("tokenizer.json", ""),
    ("tokenizer_config.json", "{oops"),
    ("special_tokens_map.json", b"\xff\xfe"),
])
def test_damaged_tokenizer_file_is_named(t5_weights, tmp_path, file, content):
    """A truncated or wrong-schema tokenizer file is one DimbaLoadError naming it and saying what to copy."""
    folder = _copy_t5(t5_weights, tmp_path)
    target = folder / file
    if content is None:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    msg = t5_error(folder)
    assert str(target) in msg and "copy the T5 v1.1 tokenizer files" in msg and "\n" not in msg, msg


def test_tokenizer_with_more_ids_than_the_embedding_is_refused(t5_weights, tmp_path, shared_dir):
    """Ids beyond the T5's embedding rows would fail deep in the embedding: refused when loading, naming the
    tokenizer. Fewer tokens than rows is fine (T5 v1.1: 32100 tokens, 32128 rows)."""
    from safetensors.torch import load_file

    from dimba_core.text import T5TextEncoder

    sd = load_file(t5_weights / "model.safetensors")
    sd["shared.weight"] = sd["shared.weight"][:100].contiguous()
    small = tmp_path / "t5_small_vocab.safetensors"
    save_file(sd, str(small))
    for tokenizer, ids in ((t5_weights, 192), (shared_dir / "t5", 32100)):
        with pytest.raises(DimbaLoadError) as err:
            T5TextEncoder.from_pretrained(small, tokenizer=tokenizer)
        msg = str(err.value)
        assert str(tokenizer) in msg and f"{ids} token ids" in msg and "only 100 embedding rows" in msg, msg
    enc = T5TextEncoder.from_pretrained(t5_weights, tokenizer=shared_dir / "t5")  # 32100 tokens, 32128 rows
    assert len(enc.tokenizer) == 32100 and enc.model.shared.weight.shape[0] == 32128
    assert torch.isfinite(enc.encode(["a photo of a cat"], max_length=16)[0].float()).all()


@pytest.mark.parametrize("prompts", [3, None, [b"a cat"], ["a cat", None]])
def test_non_string_prompts_are_refused(t5_weights, prompts):
    from dimba_core.text import T5TextEncoder

    enc = T5TextEncoder.from_pretrained(t5_weights)
    with pytest.raises(ValueError, match="prompts must be strings"):
        enc.encode(prompts)


def _scaled_fp8(t5_weights, prefix="") -> dict:
    """The tiny T5 as ComfyUI's t5xxl_fp8_e4m3fn_scaled stores it: float8 linear weights, each with scale_weight."""
    from safetensors.torch import load_file

    sd = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, w in load_file(t5_weights / "model.safetensors").items():
        if key.startswith("encoder.block.") and w.ndim == 2 and "relative_attention_bias" not in key:
            scale = w.abs().max() / 448.0
            sd[prefix + key] = (w / scale).to(torch.float8_e4m3fn)
            sd[prefix + key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            sd[prefix + key] = w.half()
    return sd


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_scaled_fp8_t5_without_its_scales_is_refused(t5_weights, tmp_path, prefix):
    """The scaled_fp8 marker promises a scale per float8 weight; without them the weights would load unscaled."""
    from dimba_core.text import T5TextEncoder

    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    sd = _scaled_fp8(t5_weights, prefix)
    save_file(sd, str(path))
    T5TextEncoder.from_pretrained(path, tokenizer=t5_weights)  # complete: loads
    q = prefix + "encoder.block.0.layer.0.SelfAttention.q.scale_weight"
    for dropped in ([q], [k for k in sd if k.endswith(".scale_weight")]):
        save_file({k: v for k, v in sd.items() if k not in dropped}, str(path))
        msg = t5_error(path)
        assert str(path) in msg and "scaled_fp8" in msg and "encoder.block.0.layer.0.SelfAttention.q.scale_weight" \
            in msg and f"of {len(dropped)} float8 weights" in msg, msg
