"""load_dimba / convert: formats, config inference, EMA selection, safety and clear errors."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimba_core import Dimba, DimbaConfig, DimbaLoadError, load_dimba, save_safetensors
from dimba_core.loader import CONFIG_KEY
from dimba_test_helpers import TINY_HALF_MAMBA


def tiny_model(**kw):
    torch.manual_seed(1)
    model = Dimba(DimbaConfig(**{**TINY_HALF_MAMBA, **kw})).eval()
    for p in model.parameters():  # randomise everything so that no path is zero
        p.data.normal_(0, 0.2)
    return model


def run(model):
    torch.manual_seed(5)
    x, y = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 8, 16)
    with torch.no_grad():
        return model(x, torch.tensor([3.0, 700.0]), y, torch.tensor([[1] * 4 + [0] * 4, [1] * 8]))


def test_pt_and_safetensors_round_trip(tmp_path):
    model = tiny_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    from_pt = load_dimba(tmp_path / "m.pt", num_heads=4)
    assert from_pt.config == model.config
    save_safetensors(from_pt, tmp_path / "m.safetensors")
    from_st = load_dimba(tmp_path / "m.safetensors")  # num_heads comes from the stored config
    assert from_st.config.num_heads == 4
    out = run(model)
    assert torch.equal(run(from_pt), out) and torch.equal(run(from_st), out)


def test_config_inferred_from_shapes():
    model = tiny_model(depth=6, mamba_ratio=1 / 3, d_state=8, expand=3, d_conv=3, dt_rank=5, base_size=8,
                       mlp_ratio=2.0, model_max_length=12)
    loaded = load_dimba(model.state_dict(), num_heads=4)
    c = loaded.config
    assert (c.depth, c.mamba_depth, c.d_state, c.expand, c.d_conv, c.dt_rank, c.base_size, c.pe_interpolation,
            c.mlp_ratio, c.model_max_length) == (6, 2, 8, 3, 3, 5, 8, 1.0, 2.0, 12)
    assert load_dimba(model.state_dict(), num_heads=4, pe_interpolation=2.0).config.pe_interpolation == 2.0


def test_ema_selection_and_prefixes():
    a, b = tiny_model(), tiny_model()
    for p in b.parameters():
        p.data.mul_(0.5)
    ckpt = {"state_dict": {"module." + k: v for k, v in a.state_dict().items()},
            "state_dict_ema": b.state_dict(), "step": 100}
    assert torch.equal(run(load_dimba(ckpt, num_heads=4)), run(a))
    assert torch.equal(run(load_dimba(ckpt, num_heads=4, ema=True)), run(b))
    with pytest.raises(DimbaLoadError, match="state_dict_ema"):
        load_dimba({"state_dict": a.state_dict()}, ema=True)


def test_device_and_dtype_arguments():
    loaded = load_dimba(tiny_model().state_dict(), num_heads=4, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not any(p.requires_grad for p in loaded.parameters())


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(DimbaLoadError, match="refused"):
            load_dimba(p)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_gives_clear_error(tmp_path, suffix):
    model, path = tiny_model(), tmp_path / f"m{suffix}"
    save_safetensors(model, path) if suffix == ".safetensors" else torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DimbaLoadError, match="truncated or corrupt") as e:
        load_dimba(path)
    assert str(path) in str(e.value)


def test_wrong_shapes_and_missing_keys_are_listed():
    sd = tiny_model().state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(96, 16)
    del sd["mamba_blocks.0.mixer.D_b"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(DimbaLoadError) as e:
        load_dimba(sd, num_heads=4)
    msg = str(e.value)
    assert "missing keys: mamba_blocks.0.mixer.D_b" in msg and "unexpected keys: extra.weight" in msg
    assert "blocks.1.attn.qkv.weight (96, 16) (expected (96, 32))" in msg


def test_not_a_dimba_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3)}, str(path))
    with pytest.raises(DimbaLoadError, match="not a Dimba checkpoint") as e:
        load_dimba(path)
    assert str(e.value).count(str(path)) == 1
    with pytest.raises(DimbaLoadError, match="no such file"):
        load_dimba(tmp_path / "missing.pt")
    with pytest.raises(DimbaLoadError, match="num_heads"):
        load_dimba(tiny_model().state_dict(), num_heads=5)


def test_full_manifest_state_dict_loads(manifest):
    keys = manifest["Dimba-L-2"]["keys"]
    sd = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    model = load_dimba(sd, device="meta")
    assert model.config.hidden_size == 1152 and model.config.depth == 28 and model.config.base_size == 32


def test_convert_cli(tmp_path):
    model = tiny_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    subprocess.run([sys.executable, "-m", "dimba_core", "convert", str(tmp_path / "m.pt"),
                    str(tmp_path / "m.safetensors"), "--num-heads", "4"], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    assert torch.equal(run(load_dimba(tmp_path / "m.safetensors")), run(model))


def test_ssm_parameters_stay_float32_in_every_weight_dtype(tmp_path):
    """A, D and the delta bias sit in exp/softplus: they are kept float32 when the weights are half or float8."""
    model = tiny_model()
    half = load_dimba(model.state_dict(), num_heads=4, dtype=torch.float16)
    mixer = half.mamba_blocks[0].mixer
    assert mixer.in_proj.weight.dtype == half.blocks[0].scale_shift_table.dtype == torch.float16
    assert {mixer.A_log.dtype, mixer.D_b.dtype, mixer.dt_proj.bias.dtype, mixer.dt_proj_b.bias.dtype} == {torch.float32}
    assert torch.equal(mixer.A_log, model.mamba_blocks[0].mixer.A_log)  # not rounded to float16 on the way
    save_safetensors(model, tmp_path / "h.safetensors", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        assert f.get_slice("mamba_blocks.0.mixer.A_log").get_dtype() == "F32"
        assert f.get_slice("mamba_blocks.0.mixer.in_proj.weight").get_dtype() == "F16"


def test_float8_file_loads_in_float32(tmp_path):
    """A float8 file (e.g. saved from ComfyUI with fp8 weights) loads headless as float32 weights of those values."""
    from safetensors.torch import save_file

    model = tiny_model()
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    save_file(fp8, str(tmp_path / "f8.safetensors"))
    loaded = load_dimba(tmp_path / "f8.safetensors", num_heads=4)
    assert loaded.dtype == loaded.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, fp8["blocks.0.attn.qkv.weight"].float())
    assert torch.isfinite(run(loaded)).all()


def test_comfyui_checkpoint_layout(tmp_path):
    """A ComfyUI ModelSave / CheckpointSave file: model.diffusion_model. keys, VAE and text encoder keys beside
    them, the config as a uint8 tensor of JSON (ComfyUI writes its own metadata)."""
    from safetensors.torch import save_file

    model = tiny_model()
    config = torch.frombuffer(bytearray(model.config.to_json().encode()), dtype=torch.uint8)
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    sd.update({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2), CONFIG_KEY: config,
               "cond_stage_model.transformer.shared.weight": torch.zeros(3)})
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    loaded = load_dimba(tmp_path / "comfy.safetensors")
    assert loaded.config == model.config and torch.equal(run(loaded), run(model))
    for bad, why in ((torch.zeros(3), "uint8"), (torch.tensor(list(b"[1, 2]"), dtype=torch.uint8), "JSON object"),
                     (torch.tensor([255, 254], dtype=torch.uint8), "UTF-8")):
        save_file({**sd, CONFIG_KEY: bad}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(DimbaLoadError, match=why):
            load_dimba(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype,word", [
    (torch.float8_e4m3fn, "float8_e4m3fn stores weights in float8, which only ComfyUI"),
    (torch.float8_e5m2, "float8_e5m2 stores weights in float8"), (torch.int8, "int8 cannot hold Dimba weights"),
    (torch.bool, "bool cannot hold"), (torch.complex64, "complex64 cannot hold"),
    ("fp8", "'fp8' is not a weight dtype"), ("half precision", "is not a weight dtype"), (16, "16 cannot hold")])
def test_load_dtype_that_cannot_run_headless_is_refused_before_reading(dtype, word, monkeypatch):
    """float8 storage needs an operations namespace that casts (ComfyUI); int, bool and complex never hold weights.
    One ValueError naming the dtype and the ones to use, before the checkpoint is read."""
    from dimba_core import loader

    monkeypatch.setattr(loader, "read_checkpoint", lambda *a, **k: pytest.fail("read before checking the dtype"))
    with pytest.raises(ValueError, match="load_dimba dtype") as err:
        load_dimba(tiny_model().state_dict(), num_heads=4, dtype=dtype)
    assert word in str(err.value) and "fp16, bf16, fp32" in str(err.value)


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
                                        ("float16", torch.float16), ("BF16", torch.bfloat16)])
def test_load_dtype_by_name(name, dtype):
    """The CLI's --dtype names (and the torch names) work in the API too."""
    model = load_dimba(tiny_model().state_dict(), num_heads=4, dtype=name)
    assert model.dtype == model.blocks[0].attn.qkv.weight.dtype == dtype
    assert torch.isfinite(run(model)).all()
