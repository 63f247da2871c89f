"""apply_lora: every LoRA format ComfyUI applies to a Dimba MODEL (LoRA spellings, LoCon, DoRA, LoHa, LoKr, diff,
diff_b, set_weight) against independent math, merging equals the trained adapters, clear errors for bad files."""
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
    with pytest.raises(DimbaLoadError, match=r"lora\.safetensors.*does not fit the weight"):
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


D = "diffusion_model."
# targets of shape (192, 64), (128, 1, 4), (64, 4, 2, 2): linear, Mamba conv1d, patch-embedding conv2d
LIN, CONV1D, CONV2D = "blocks.0.attn.qkv", "mamba_blocks.0.mixer.conv1d", "x_embedder.proj"


def outer_sum(up, down):
    """sum over the rank of outer products: up @ down written another way."""
    return sum(torch.outer(up[:, r], down[r]) for r in range(up.shape[1]))


def kron(a, b):
    """Kronecker product of a 2-D a with a 2-D or 4-D b (a as a 1x1 kernel), via einsum."""
    out = torch.einsum("mn,pq...->mpnq...", a, b)
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def tucker_ref(t, a, b):
    """[p, r, k, l] = sum_ij t[i, j, k, l] a[i, p] b[j, r], by tensordot."""
    return (torch.tensordot(a, t, dims=([0], [0])).permute(0, 2, 3, 1) @ b).permute(0, 3, 1, 2)


# a LoKr Tucker layer ComfyUI 0.3.64 cannot merge (torch.kron refuses the einsum's layout): apply_lora refuses it
TUCKER_KRON = {D + CONV2D + ".lokr_w1": torch.ones(4, 2), D + CONV2D + ".lokr_t2": torch.ones(2, 2, 2, 2),
               D + CONV2D + ".lokr_w2_a": torch.ones(2, 16), D + CONV2D + ".lokr_w2_b": torch.ones(2, 2)}


def lora_files():
    """{name: (LoRA state dict, want(base state dict, strength) -> {key: merged tensor})} for every format."""
    g = torch.Generator().manual_seed(7)
    base = tiny_dimba().state_dict()

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def linear(deltas):
        return lambda ref, s: {k: ref[k] + s * d for k, d in deltas.items()}

    files = {}
    up, down, up1, down1, up2, down2 = t(192, 4), t(4, 64), t(128, 2), t(2, 4), t(64, 3), t(3, 16)
    lora = {D + LIN + ".lora_up.weight": up, D + LIN + ".lora_down.weight": down, D + LIN + ".alpha": torch.tensor(2.0),
            D + CONV1D + ".lora_up.weight": up1, D + CONV1D + ".lora_down.weight": down1,  # no alpha: scale 1
            D + CONV2D + ".lora_up.weight": up2, D + CONV2D + ".lora_down.weight": down2,
            D + CONV2D + ".alpha": torch.tensor(1.5)}
    lora_want = linear({LIN + ".weight": 0.5 * outer_sum(up, down),
                        CONV1D + ".weight": outer_sum(up1, down1).reshape(128, 1, 4),
                        CONV2D + ".weight": 0.5 * outer_sum(up2, down2).reshape(64, 4, 2, 2)})
    files["lora"] = lora, lora_want
    peft = {k.replace("lora_up", "lora_B").replace("lora_down", "lora_A"): v for k, v in lora.items()}
    files["peft"] = peft, lora_want
    # every up/down spelling ComfyUI reads, and lora_unet_ names, one per layer
    spellings = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                 (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
                 (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                 (".lora_B.default.weight", ".lora_A.default.weight"), (".lora_B.weight", ".lora_A.weight")]
    layers = ["blocks.0.attn.proj", "blocks.0.cross_attn.q_linear", "blocks.0.cross_attn.kv_linear", CONV1D,
              "mamba_blocks.0.mixer.in_proj", "mamba_blocks.0.mixer.x_proj_b", "t_block.1"]
    sd, deltas = {}, {}
    for i, (layer, (u, d)) in enumerate(zip(layers, spellings)):
        shape = base[layer + ".weight"].shape
        mu, md = t(shape[0], 2), t(2, shape[1:].numel())
        stem = "lora_unet_" + layer.replace(".", "_") if i % 2 else D + layer
        sd.update({stem + u: mu, stem + d: md, stem + ".alpha": torch.tensor(4.0)})
        deltas[layer + ".weight"] = 2.0 * outer_sum(mu, md).reshape(shape)
    files["spellings"] = sd, linear(deltas)
    # LoCon Tucker (lora_mid) on the conv2d
    mu, md, mid = t(64, 3, 1, 1), t(3, 4, 1, 1), t(3, 3, 2, 2)
    down_eff = torch.tensordot(mid, md.flatten(1), dims=([1], [0])).permute(0, 3, 1, 2)  # (rank, in, 2, 2)
    files["locon_tucker"] = ({D + CONV2D + ".lora_up.weight": mu, D + CONV2D + ".lora_down.weight": md,
                              D + CONV2D + ".lora_mid.weight": mid, D + CONV2D + ".alpha": torch.tensor(1.0)},
                             linear({CONV2D + ".weight": outer_sum(mu.flatten(1), down_eff.flatten(1)).reshape(
                                 64, 4, 2, 2) / 3}))
    # LoHa: linear with alpha, conv1d without, conv2d with Tucker factors
    a1, b1, a2, b2 = t(192, 2), t(2, 64), t(192, 2), t(2, 64)
    c1, d1, c2, d2 = t(128, 3), t(3, 4), t(128, 3), t(3, 4)
    t1, e1, f1, t2, e2, f2 = t(2, 2, 2, 2), t(2, 64), t(2, 4), t(2, 2, 2, 2), t(2, 64), t(2, 4)
    loha = {D + LIN + ".hada_w1_a": a1, D + LIN + ".hada_w1_b": b1, D + LIN + ".hada_w2_a": a2,
            D + LIN + ".hada_w2_b": b2, D + LIN + ".alpha": torch.tensor(1.0),
            D + CONV1D + ".hada_w1_a": c1, D + CONV1D + ".hada_w1_b": d1, D + CONV1D + ".hada_w2_a": c2,
            D + CONV1D + ".hada_w2_b": d2,
            D + CONV2D + ".hada_w1_a": e1, D + CONV2D + ".hada_w1_b": f1, D + CONV2D + ".hada_w2_a": e2,
            D + CONV2D + ".hada_w2_b": f2, D + CONV2D + ".hada_t1": t1, D + CONV2D + ".hada_t2": t2,
            D + CONV2D + ".alpha": torch.tensor(4.0)}
    files["loha"] = loha, linear({
        LIN + ".weight": 0.5 * outer_sum(a1, b1) * outer_sum(a2, b2),
        CONV1D + ".weight": (outer_sum(c1, d1) * outer_sum(c2, d2)).reshape(128, 1, 4),
        CONV2D + ".weight": 2.0 * tucker_ref(t1, e1, f1) * tucker_ref(t2, e2, f2)})
    # LoKr: full w1 + factored w2, factored w1 + full w2 (conv1d), Tucker w2 (conv2d), both full (alpha unused)
    w1, w2a, w2b = t(8, 4), t(24, 2), t(2, 16)
    v1a, v1b, v2 = t(8, 2), t(2, 1), t(16, 4)
    u1, tt, u2a, u2b = t(4, 4), t(1, 1, 2, 2), t(1, 16), t(1, 1)  # a Tucker layout ComfyUI's torch.kron takes
    x1, x2 = t(16, 8), t(24, 8)
    lokr = {D + LIN + ".lokr_w1": w1, D + LIN + ".lokr_w2_a": w2a, D + LIN + ".lokr_w2_b": w2b,
            D + LIN + ".alpha": torch.tensor(3.0),
            D + CONV1D + ".lokr_w1_a": v1a, D + CONV1D + ".lokr_w1_b": v1b, D + CONV1D + ".lokr_w2": v2,
            D + CONV1D + ".alpha": torch.tensor(1.0),
            D + CONV2D + ".lokr_w1": u1, D + CONV2D + ".lokr_t2": tt, D + CONV2D + ".lokr_w2_a": u2a,
            D + CONV2D + ".lokr_w2_b": u2b, D + CONV2D + ".alpha": torch.tensor(0.5),
            D + "t_block.1.lokr_w1": x1, D + "t_block.1.lokr_w2": x2, D + "t_block.1.alpha": torch.tensor(5.0)}
    files["lokr"] = lokr, linear({
        LIN + ".weight": 1.5 * kron(w1, outer_sum(w2a, w2b)),
        CONV1D + ".weight": 0.5 * kron(outer_sum(v1a, v1b), v2).reshape(128, 1, 4),
        CONV2D + ".weight": 0.5 * kron(u1, tucker_ref(tt, u2a, u2b)),
        "t_block.1.weight": kron(x1, x2)})

    # DoRA: a per-output-row magnitude on the linear, a per-input-column one on out_proj
    def dora(ref, key, diff, mag, s):
        w = ref[key]
        merged = w + diff
        rows = mag.shape[0] == w.shape[0]  # ComfyUI 0.3.64: row norms of the old weight, column norms of the merged
        norm = (torch.linalg.vector_norm(w, dim=1, keepdim=True) if rows else
                torch.linalg.vector_norm(merged, dim=0, keepdim=True)) + torch.finfo(torch.float32).eps
        return w + s * (merged * mag / norm - w)

    du, dd, ou, od = t(192, 2), t(2, 64), t(64, 3), t(3, 128)
    mag_rows = base[LIN + ".weight"].norm(dim=1, keepdim=True) * (1 + t(192, 1))
    mag_cols = base["mamba_blocks.0.mixer.out_proj.weight"].norm(dim=0, keepdim=True) * (1 + t(1, 128))
    out = D + "mamba_blocks.0.mixer.out_proj"
    files["dora"] = ({D + LIN + ".lora_up.weight": du, D + LIN + ".lora_down.weight": dd,
                      D + LIN + ".dora_scale": mag_rows,
                      out + ".lora_up.weight": ou, out + ".lora_down.weight": od, out + ".alpha": torch.tensor(6.0),
                      out + ".dora_scale": mag_cols},
                     lambda ref, s: {LIN + ".weight": dora(ref, LIN + ".weight", outer_sum(du, dd), mag_rows, s),
                                     out[len(D):] + ".weight":
                                         dora(ref, out[len(D):] + ".weight", 2.0 * outer_sum(ou, od), mag_cols, s)})
    # what ComfyUI's TrainLoraNode saves: LoRA (alpha 1) on every >= 2-D weight, diff on 1-D weights, diff_b on biases
    sd, deltas = {}, {}
    for name, module in tiny_dimba().named_modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, torch.nn.Parameter):
            if weight.dim() >= 2:
                mu, md = t(weight.shape[0], 2), t(2, weight.shape[1:].numel())
                sd.update({D + name + ".lora_up.weight": mu, D + name + ".lora_down.weight": md,
                           D + name + ".alpha": torch.tensor(1.0)})
                deltas[name + ".weight"] = 0.5 * outer_sum(mu, md).reshape(weight.shape)
            else:
                sd[D + name + ".diff"] = deltas[name + ".weight"] = t(*weight.shape)
        if isinstance(bias, torch.nn.Parameter):
            sd[D + name + ".diff_b"] = deltas[name + ".bias"] = t(*bias.shape)
    assert any(k.endswith(".diff") for k in sd) and sum(k.endswith(".diff_b") for k in sd) > 20
    files["trainlora"] = sd, linear(deltas)
    # full differences (diff, w_norm, parameters by their own key, diff_b, b_norm), a LoRA on a parameter that is not
    # a .weight (ComfyUI's diffusion_model.<key> rule), set_weight
    pd, nd, qb, new, fb, tb, tw = t(64, 64), t(64), t(192), t(32, 64), t(32), t(64), t(64, 256)
    a_log, db, table = t(128, 8), t(128), t(6, 64)
    files["diff_set"] = ({D + "blocks.0.attn.proj.diff": pd, D + "mamba_blocks.0.norm.w_norm": nd,
                          D + "mamba_blocks.0.mixer.A_log.diff": a_log, D + "mamba_blocks.0.mixer.D_b.diff": db,
                          D + "blocks.0.scale_shift_table.lora_up.weight": table[:, :2],
                          D + "blocks.0.scale_shift_table.lora_down.weight": table[:2],
                          D + "blocks.0.attn.qkv.bias.diff": qb, D + "final_layer.linear.set_weight": new,
                          D + "final_layer.linear.diff_b": fb, D + "t_embedder.mlp.0.b_norm": tb,
                          D + "t_embedder.mlp.0.w_norm": tw},
                         lambda ref, s: {"final_layer.linear.weight": new,  # set ignores the strength, as in ComfyUI
                                         **linear({"blocks.0.attn.proj.weight": pd, "mamba_blocks.0.norm.weight": nd,
                                                   "blocks.0.attn.qkv.bias": qb, "final_layer.linear.bias": fb,
                                                   "t_embedder.mlp.0.bias": tb, "t_embedder.mlp.0.weight": tw,
                                                   "mamba_blocks.0.mixer.A_log": a_log, "mamba_blocks.0.mixer.D_b": db,
                                                   "blocks.0.scale_shift_table":
                                                       outer_sum(table[:, :2], table[:2])})(ref, s)})
    return files


@pytest.mark.parametrize("name", ["lora", "peft", "spellings", "locon_tucker", "loha", "lokr", "dora", "trainlora",
                                  "diff_set"])
def test_each_format_merges_as_computed_independently(name):
    sd, want = lora_files()[name]
    ref = tiny_dimba().state_dict()
    for strength in (1.0, 0.7):
        got = apply_lora(tiny_dimba(), sd, strength).state_dict()
        expect = want(ref, strength)
        assert expect and all(not torch.equal(got[k], ref[k]) for k in expect)
        for k in ref:
            torch.testing.assert_close(got[k], expect.get(k, ref[k]), rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def test_strength_zero_changes_nothing():
    ref = tiny_dimba().state_dict()
    for name, (sd, _) in lora_files().items():
        got = apply_lora(tiny_dimba(), sd, 0.0).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


def test_unsupported_and_broken_formats_are_clear_errors():
    files = lora_files()
    lokr, loha = files["lokr"][0], files["loha"][0]
    w = torch.zeros(4, 4)
    cases = {
        "GLoRA": ({D + LIN + ".a1.weight": w, D + LIN + ".a2.weight": w}, r"a1\.weight \(GLoRA\).*apply it in ComfyUI"),
        "OFT": ({D + LIN + ".oft_blocks": w}, r"qkv\.oft_blocks \(OFT/BOFT\)"),
        "reshape": ({**files["lora"][0], D + LIN + ".reshape_weight": torch.tensor([200, 64])}, r"reshape_weight"),
        "mixed": ({**files["lora"][0], **{k: v for k, v in loha.items() if LIN in k}},
                  r"mixes LoRA and LoHa.*qkv\.weight"),
        "lokr half": ({k: v for k, v in lokr.items() if not k.endswith(LIN + ".lokr_w2_b")},
                      r"LoKr incomplete: lokr_w2_b missing for blocks\.0\.attn\.qkv\.weight"),
        "loha half": ({k: v for k, v in loha.items() if not k.endswith("hada_t2")}, r"hada_t2 missing for x_embedder"),
        "tucker on linear": ({**{k: v for k, v in loha.items() if LIN not in k},
                              **{k.replace(CONV2D, LIN): v for k, v in loha.items() if CONV2D in k}},
                             r"LoHa for blocks\.0\.attn\.qkv\.weight \(.*hada_t1 \(2, 2, 2, 2\).*"
                             r"does not fit the weight \(192, 64\)"),
        "lokr tucker": ({**{k: v for k, v in lokr.items() if CONV2D not in k}, **TUCKER_KRON},
                        r"x_embedder.*ComfyUI 0\.3\.64 cannot merge"),
        "diff shape": ({D + LIN + ".diff": torch.zeros(64, 192)},
                       r"diff for blocks\.0\.attn\.qkv\.weight.*does not fit"),
        "no bias": ({D + "mamba_blocks.0.mixer.in_proj.diff_b": torch.zeros(256)},
                    r"match no Dimba weight.*in_proj\.diff_b"),
        "buffer": ({D + "pos_embed.diff": torch.zeros(1, 1024, 64)}, r"match no Dimba weight.*pos_embed\.diff"),
        "b_norm alone": ({D + "t_embedder.mlp.0.b_norm": torch.zeros(64)}, r"mlp\.0\.b_norm has no \.w_norm"),
        "alpha only": ({D + LIN + ".alpha": torch.tensor(1.0)}, r"only alpha/dora_scale.*qkv\.weight"),
        "twice": ({**files["lora"][0], "lora_unet_blocks_0_attn_qkv.lora_A.weight": torch.zeros(4, 64)},
                  r"two lora_down tensors for blocks\.0\.attn\.qkv\.weight"),
    }
    for case, (sd, message) in cases.items():
        model = tiny_dimba()
        with pytest.raises(DimbaLoadError, match=message):
            apply_lora(model, sd)
        assert all(torch.equal(v, tiny_dimba().state_dict()[k]) for k, v in model.state_dict().items()), case


COMFY_CHECK = r"""
import importlib, importlib.util, logging, sys, torch
comfy_path, repo, ckpt, *files = sys.argv[1:]
loras, refused = files[:files.index("--refused")], files[files.index("--refused") + 1:]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.utils
spec = importlib.util.spec_from_file_location("ComfyUI_Dimba", f"{repo}/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
host, core = importlib.import_module("ComfyUI_Dimba.nodes.host"), importlib.import_module("ComfyUI_Dimba.dimba_core")
warnings = []
class Record(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Record(logging.WARNING))
model = host.load_model(ckpt)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
base = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
def patched(lora):
    warnings.clear()
    loaded = comfy.lora.load_lora(comfy.utils.load_torch_file(lora, safe_load=True), key_map)  # warns for unused keys
    clone = model.clone()
    assert len(clone.add_patches(loaded, 0.7)) == len(loaded)
    clone.patch_model()
    got = {k: v.clone() for k, v in clone.model.diffusion_model.state_dict().items()}
    clone.unpatch_model()
    changed = max((got[k].float() - base[k].float()).abs().max().item() for k in base)
    return got, len(loaded), changed
for lora in loras:
    got, n, changed = patched(lora)
    want = core.apply_lora(core.load_dimba(ckpt), lora, 0.7).state_dict()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    print("comfy-lora", lora.rsplit("/", 1)[-1], n, "patches, max abs diff", worst, "change", round(changed, 4))
    assert not warnings, warnings
    assert worst < 1e-6 and changed > 1e-3, (worst, changed)
for lora in refused:  # apply_lora refuses these because ComfyUI leaves the weights they name as they were
    got, n, changed = patched(lora)
    try:
        core.apply_lora(core.load_dimba(ckpt), lora, 0.7)
        raise AssertionError(f"apply_lora took {lora}")
    except core.DimbaLoadError as err:
        print("comfy-lora refused", lora.rsplit("/", 1)[-1], n, "patches, change in ComfyUI", changed, "|", err)
    assert changed == 0, changed
print("comfy-lora-ok")
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout for the host tier")
def test_comfyui_lora_loader_patches_what_apply_lora_merges(tmp_path):
    """ComfyUI's LoRA loading (LoraLoaderModelOnly's path) on the Dimba MODEL equals the headless merge, per format."""
    from dimba_core.loader import save_safetensors

    save_safetensors(tiny_dimba(), tmp_path / "dimba.safetensors")
    save_file(trained_network(tiny_dimba()).to_comfy_state_dict(), str(tmp_path / "trained.safetensors"))
    paths = [str(tmp_path / "trained.safetensors")]
    for name, (sd, _) in lora_files().items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        paths.append(str(tmp_path / f"{name}.safetensors"))
    paths.append("--refused")
    save_file(TUCKER_KRON, str(tmp_path / "lokr_tucker.safetensors"))
    paths.append(str(tmp_path / "lokr_tucker.safetensors"))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, "-c", COMFY_CHECK, os.environ["COMFYUI_PATH"], str(ROOT),
                        str(tmp_path / "dimba.safetensors"), *paths], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0 and "comfy-lora-ok" in r.stdout, r.stdout + r.stderr[-3000:]


def test_strength_must_be_finite():
    for strength in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            apply_lora(tiny_dimba(), {}, strength)


def test_non_finite_loras_are_refused_naming_the_file_and_key(tmp_path):
    """NaN / inf matrices or alpha, and a strength that overflows the merged weight, are one DimbaLoadError naming
    the file (and the first bad key), and leave the model as it was."""
    sd = trained_network(tiny_dimba()).to_comfy_state_dict()
    up, alpha = D + LIN + ".lora_up.weight", D + LIN + ".alpha"
    cases = {"nan matrix": ({**sd, up: torch.full_like(sd[up], float("nan"))}, 1.0, up),
             "inf matrix": ({**sd, up: sd[up].clone().index_fill_(0, torch.tensor([0]), float("inf"))}, 1.0, up),
             "nan alpha": ({**sd, alpha: torch.tensor(float("nan"))}, 1.0, alpha),
             "inf alpha": ({**sd, alpha: torch.tensor(float("inf"))}, 1.0, alpha),
             "fp8 inf": ({**sd, up: torch.full_like(sd[up], float("nan")).to(torch.float8_e5m2)}, 1.0, up),
             "strength 1e300": (sd, 1e300, "strength 1e+300"),
             "huge alpha": ({**sd, alpha: torch.tensor(3e38)}, 1e3, "strength 1000 makes")}
    for case, (lora, strength, word) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        save_file(lora, str(path))
        model = tiny_dimba()
        with pytest.raises(DimbaLoadError) as err:
            apply_lora(model, path, strength)
        msg = str(err.value)
        assert str(path) in msg and word in msg and "\n" not in msg, (case, msg)
        assert all(torch.equal(v, tiny_dimba().state_dict()[k]) for k, v in model.state_dict().items()), case
    half = tiny_dimba().half()  # a strength float32 holds but float16 does not: the stored weight overflows
    with pytest.raises(DimbaLoadError, match=r"makes blocks\.\d+\..* NaN or infinite \(beyond float16's range\)"):
        apply_lora(half, sd, 1e6)
    nan_model = tiny_dimba()  # a weight that was non-finite before the merge is not the LoRA's fault
    with torch.no_grad():
        nan_model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    apply_lora(nan_model, sd)
