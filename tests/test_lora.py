"""apply_lora: kohya/ComfyUI and PEFT key formats, merging equals the trained adapters, clear errors for bad files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dimba_core import DimbaLoadError, apply_lora, ops
from dimba_core.lora import parse_lora_spec
from dimba_core.tiny_assets import tiny_dimba
from dimba_core.train.lora import LoRANetwork

ROOT = Path(__file__).resolve().parents[1]


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.randn(2, 1, 6, c.caption_channels, generator=g)
    return x, torch.tensor([10.0, 700.0]), y, torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])


def trained_network(model, rank=3, alpha=6.0):
    torch.manual_seed(1)
    net = LoRANetwork(model, rank, alpha)
    with torch.no_grad():
        for _, lora in net.items():
            lora.up.normal_(0, 0.05)
    return net


def test_merged_lora_equals_the_hooked_adapters(tmp_path):
    base = tiny_dimba()
    net = trained_network(base)
    names = [n for n, _ in net.items()]
    assert any("dt_proj_b" in n for n in names) and any("cross_attn.kv_linear" in n for n in names)
    assert not any("mlp" in n for n in names)
    sd = net.to_comfy_state_dict()
    save_file(sd, str(tmp_path / "lora.safetensors"))
    merged = apply_lora(tiny_dimba(), tmp_path / "lora.safetensors")
    args = inputs(base)
    with torch.no_grad():
        before = base(*args)
        net.attach(base)
        for backend in [b for b in ("torch", "parallel", "ref") if b in ops.BACKENDS]:  # scan paths differ
            hooked = base.set_scan_backend(backend)(*args)
            out = merged.set_scan_backend(backend)(*args)
            assert (hooked - before).abs().max() > 1e-3  # the LoRA changes the output ...
            torch.testing.assert_close(out, hooked, rtol=1e-4, atol=1e-5)  # ... merging gives the same function
    # ComfyUI's LoraLoaderModelOnly maps diffusion_model.<key> to the MODEL's diffusion_model.<key>.weight
    weights = {"diffusion_model." + k for k in tiny_dimba().state_dict()}
    stems = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in sd}
    assert all(s + ".weight" in weights for s in stems)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)


def test_kohya_and_peft_names_and_strength():
    base = tiny_dimba()
    net = trained_network(base)
    sd = net.to_comfy_state_dict()
    kohya = {k.replace("diffusion_model.", "lora_unet_", 1).replace(".", "_").replace("_lora_down_weight",
             ".lora_down.weight").replace("_lora_up_weight", ".lora_up.weight").replace("_alpha", ".alpha"): v
             for k, v in sd.items()}
    peft = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in sd.items()}
    ref = apply_lora(tiny_dimba(), sd, strength=0.5).state_dict()
    for other in (kohya, peft):
        got = apply_lora(tiny_dimba(), other, strength=0.5).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    twice = apply_lora(apply_lora(tiny_dimba(), sd, 0.25), sd, 0.25).state_dict()
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(twice[key], ref[key])
    assert not torch.equal(ref[key], tiny_dimba().state_dict()[key])


def test_bad_lora_files_are_clear_errors(tmp_path):
    model = tiny_dimba()
    sd = trained_network(model).to_comfy_state_dict()
    other = tiny_dimba(hidden_size=32, num_heads=4)
    with pytest.raises(DimbaLoadError, match=r"lora\.safetensors.*do not fit the weight"):
        save_file(sd, str(tmp_path / "lora.safetensors"))
        apply_lora(other, tmp_path / "lora.safetensors")
    stray = dict(sd, **{"diffusion_model.blocks.9.attn.qkv.lora_up.weight": torch.zeros(3, 3)})
    with pytest.raises(DimbaLoadError, match=r"blocks\.9\.attn\.qkv"):
        apply_lora(model, stray)
    half = {k: v for k, v in sd.items() if not k.endswith("blocks.0.attn.proj.lora_up.weight")}
    with pytest.raises(DimbaLoadError, match=r"missing for blocks\.0\.attn\.proj\.weight"):
        apply_lora(model, half)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DimbaLoadError, match=r"bad\.safetensors.*corrupt"):
        apply_lora(model, tmp_path / "bad.safetensors")
    torch.save(sd, tmp_path / "lora.pt")
    with pytest.raises(DimbaLoadError, match=r"lora\.pt.*safetensors only"):
        apply_lora(model, tmp_path / "lora.pt")
    with pytest.raises(DimbaLoadError, match="no such LoRA file"):
        apply_lora(model, tmp_path / "missing.safetensors")


def test_parse_lora_spec():
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_spec("a/b.safetensors:0.6") == ("a/b.safetensors", 0.6)
    assert parse_lora_spec("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_spec("C:\\x.safetensors:-1") == ("C:\\x.safetensors", -1.0)


COMFY_CHECK = r"""
import importlib, importlib.util, sys, torch
comfy_path, repo, ckpt, lora = sys.argv[1:5]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.utils
spec = importlib.util.spec_from_file_location("ComfyUI_Dimba", f"{repo}/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
host, core = importlib.import_module("ComfyUI_Dimba.nodes.host"), importlib.import_module("ComfyUI_Dimba.dimba_core")
model = host.load_model(ckpt)
sd = comfy.utils.load_torch_file(lora, safe_load=True)
loaded = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
assert 3 * len(loaded) == len(sd), (len(loaded), len(sd))
patched = model.clone()
assert len(patched.add_patches(loaded, 0.7)) == len(loaded)
patched.patch_model()
got = patched.model.diffusion_model.state_dict()
want = core.apply_lora(core.load_dimba(ckpt), lora, 0.7).state_dict()
worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
assert worst < 1e-6, worst
print("comfy-lora-ok", len(loaded), worst)
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout for the host tier")
def test_comfyui_lora_loader_patches_what_apply_lora_merges(tmp_path):
    """ComfyUI's LoRA loading (LoraLoaderModelOnly's path) on the Dimba MODEL equals the headless merge."""
    from dimba_core.loader import save_safetensors

    save_safetensors(tiny_dimba(), tmp_path / "dimba.safetensors")
    save_file(trained_network(tiny_dimba()).to_comfy_state_dict(), str(tmp_path / "lora.safetensors"))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, "-c", COMFY_CHECK, os.environ["COMFYUI_PATH"], str(ROOT), str(tmp_path / "dimba.safetensors"),
                        str(tmp_path / "lora.safetensors")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "comfy-lora-ok" in r.stdout, r.stdout + r.stderr[-3000:]


def test_strength_must_be_finite():
    for strength in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            apply_lora(tiny_dimba(), {}, strength)
