"""Checks that run inside a real ComfyUI's Python, on the CPU with the tiny models (ComfyUI's venv needs no pytest):

    python tests/in_comfyui.py COMFYUI_PATH REPO MODELS [TEST_NAME ...]

tests/test_comfy_host.py runs them. Each test_* function below is one check; the shared objects (the pack,
the Dimba MODEL, T5 conditioning, a latent) are built once by `setup`. Without names, every test except the
slow TorchCompileModel one runs.
"""
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import traceback
import types

import safetensors.torch
import torch

S = {}  # shared state filled by setup()


def setup(comfy_path, repo, models):
    """Import ComfyUI (CPU) and the pack as ComfyUI does, load the tiny models, encode two prompts."""
    sys.path.insert(0, comfy_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("ComfyUI_Dimba", f"{repo}/__init__.py",
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    host = importlib.import_module("ComfyUI_Dimba.nodes.host")
    ckpt, t5_dir = f"{models}/checkpoints/dimba_tiny.safetensors", f"{models}/text_encoders/t5_tiny"
    model, t5 = host.load_model(ckpt), host.load_t5(t5_dir, "cpu")
    encode = pack.NODE_CLASS_MAPPINGS["DimbaT5TextEncode"]().encode
    S.update(tmp=tempfile.mkdtemp(prefix="dimba_in_comfyui_"), models=models, repo=repo, pack=pack, host=host,
             core=importlib.import_module("ComfyUI_Dimba.dimba_core"), ckpt=ckpt,
             t5_dir=t5_dir, model=model, pos=encode(t5, "a cat on a mat")[0], neg=encode(t5, "")[0],
             latent={"samples": torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))},
             sampler=pack.NODE_CLASS_MAPPINGS["DimbaSampler"]())


def error(fn) -> str:
    """The message of the exception fn raises."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("no error")


def run_node(cls, *args, **inputs):
    """A ComfyUI node called as its executor calls it, V1 (FUNCTION method) or V3 (io.ComfyNode.execute on a
    prepared class clone); positional inputs take the names of INPUT_TYPES in order. Returns the output tuple."""
    import asyncio
    import inspect

    types = cls.INPUT_TYPES()
    names = [*types.get("required", {}), *types.get("optional", {})]
    inputs.update(zip(names, args))
    if hasattr(cls, "PREPARE_CLASS_CLONE"):  # V3 (FUNCTION exists there too, as a compatibility property)
        out = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**inputs)
        out = asyncio.run(out) if inspect.isawaitable(out) else out
        return tuple(out.args) if hasattr(out, "args") else tuple(out)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(out.get("result", ())) if isinstance(out, dict) else tuple(out or ())


def ksampler(model, positive, negative, latent, sampler="euler", scheduler="normal", steps=4):
    """comfy.sample.sample as KSampler calls it (seed 3)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(model, noise, steps, 4.5, sampler, scheduler, positive, negative, latent, seed=3,
                               disable_pbar=True)


def test_t5_conditioning_is_the_headless_encoding():
    pos = S["pos"]
    assert pos[0][0].shape == (1, 300, 64) and pos[0][1]["attention_mask"].shape == (1, 300)
    emb, mask = S["core"].text.T5TextEncoder.from_pretrained(S["t5_dir"]).encode(["a cat on a mat"])
    assert torch.equal(emb.float(), pos[0][0]) and torch.equal(mask, pos[0][1]["attention_mask"])
    t5 = S["host"].load_t5(S["t5_dir"], "cpu")  # DIMBA_T5 on the CPU is stored in bf16, 2 bytes a parameter
    numel = sum(v.numel() for v in t5.encoder.model.state_dict().values())  # the tied embedding counted twice
    assert {p.dtype for p in t5.encoder.model.parameters()} == {torch.bfloat16}
    assert t5.patcher.model_size() <= 2 * numel + 4096


def small_t5_v11_folder():
    """A small random T5 v1.1-family encoder (T5 v1.1 vocabulary and gated-GELU; d_model 64) with ComfyUI's bundled
    T5 tokenizer, as a Hugging Face folder; returns (folder, its config.json)."""
    import shutil

    import comfy.text_encoders.pixart_t5 as pixart
    from transformers import T5Config, T5EncoderModel

    folder = os.path.join(S["tmp"], "t5_small_v11")
    if not os.path.isdir(folder):
        torch.manual_seed(3)
        config = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
        config.dense_act_fn = "gelu_pytorch_tanh"  # as T5 v1.1 XXL's config names it (ComfyUI's T5 knows this name)
        T5EncoderModel(config).save_pretrained(folder, safe_serialization=True)
        tokenizer = os.path.join(os.path.dirname(pixart.__file__), "t5_tokenizer")
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), folder)
    return folder, os.path.join(folder, "config.json")


def comfy_pixart_clip(folder, config_path, dtype):
    """ComfyUI's own T5 path as CLIPLoader(type pixart) builds it (its T5 module, the PixArt tokenizer, a CLIP
    ModelPatcher), with the small config instead of XXL's, loaded with the folder's weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart
    import comfy.text_encoders.t5

    class SmallT5(pixart.T5XXLModel):  # ComfyUI's T5XXLModel arguments, the small config
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False,
                     model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config_path, dtype=dtype,
                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options={**model_options, "model_name": "t5xxl"})

    class SmallPixArtT5(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=SmallT5, model_options=model_options)

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(pixart.PixArtTokenizer, SmallPixArtT5),
                         model_options={} if dtype is None else {"dtype": dtype})
    clip.load_sd(safetensors.torch.load_file(os.path.join(folder, "model.safetensors")))
    return clip


def test_comfy_clip_path_gives_dimba_t5_conditioning():
    """ComfyUI's T5 path (pixart CLIP + CLIPTextEncode) on the same weights as DimbaT5TextEncode: the same tokens
    ("" is [EOS]) and embeddings within float rounding; over 300 tokens ComfyUI's tokenizer does not truncate while
    Dimba's (the reference's) keeps 300."""
    import nodes as comfy_nodes

    folder, config_path = small_t5_v11_folder()
    ours = S["host"].load_t5(folder, "cpu", "fp32")
    for dtype, limit in ((torch.float32, 1e-5), (None, 2e-2)):  # None: ComfyUI's text-encoder dtype (fp16 on the CPU)
        clip = comfy_pixart_clip(folder, config_path, dtype)
        for prompt in ("a cat on a mat", "", "a photograph of an astronaut riding a horse, highly detailed"):
            theirs = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text=prompt)[0][0][0].float()
            emb, mask = ours.encode(prompt, 300)[0]
            n = int(mask["attention_mask"].sum())
            assert theirs.shape[1] == n, (prompt, theirs.shape, n)  # the same tokens, no padding
            err = rel(theirs, emb[:, :n])
            print(f"CLIPTextEncode (pixart, {dtype or 'ComfyUI default'}) vs DimbaT5TextEncode fp32, {prompt!r}: "
                  f"relative {err:.1e}")
            assert err < limit, (prompt, dtype, err)
    long = "cat " * 400
    theirs = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text=long)[0][0][0]
    assert theirs.shape[1] > 300 and int(ours.encode(long, 300)[0][1]["attention_mask"].sum()) == 300


def test_t5_partial_load_equals_full_load():
    """DIMBA_T5 is built from ComfyUI's cast-at-use layers, so ComfyUI can load a part of it and stream the rest
    (as it does its own text encoders on small GPUs): with a third of its weights loaded the conditioning equals
    the full load's."""
    t5 = S["host"].load_t5(S["t5_dir"], "cpu")
    layers = [m for m in t5.encoder.model.modules() if hasattr(m, "comfy_cast_weights")]
    assert layers and not [m for m in t5.encoder.model.modules()
                           if not hasattr(m, "comfy_cast_weights") and list(m.parameters(recurse=False))]
    cpu = torch.device("cpu")
    full = t5.encode("a cat on a mat", 300)
    t5.patcher.patch_model(cpu, lowvram_model_memory=t5.patcher.model_size() // 3, load_weights=True)
    try:
        assert t5.patcher.model.model_lowvram  # ComfyUI streams what did not fit
        emb, mask = t5.encoder.encode(["a cat on a mat"], max_length=300, device=cpu)
    finally:
        t5.patcher.unpatch_model(cpu, unpatch_weights=True)
    assert torch.equal(emb.float(), full[0][0]) and torch.equal(mask, full[0][1]["attention_mask"])


def test_fp8_t5_stays_float8_and_streams():
    """A t5xxl_fp8_e4m3fn_scaled-style file in DimbaT5Loader: its float8 weights stay float8 in ComfyUI's
    cast-at-use layers (a quarter of float32's bytes), its conditioning is the headless one bit for bit, and a third
    loaded gives the full load's."""
    from safetensors.torch import load_file, save_file

    weights = load_file(f"{S['t5_dir']}/model.safetensors")
    sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, w in weights.items():
        if key.startswith("encoder.block.") and w.ndim == 2 and "relative_attention_bias" not in key:
            scale = w.float().abs().max() / 448.0
            sd[key], sd[key[: -len("weight")] + "scale_weight"] = (w.float() / scale).to(torch.float8_e4m3fn), scale
        else:
            sd[key] = w
    path = f"{S['tmp']}/t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({k: v.reshape(1) if k.endswith("scale_weight") else v for k, v in sd.items()}, path)
    t5 = S["host"].load_t5(path, "cpu")
    kept = [m for m in t5.encoder.model.modules() if isinstance(m, S["host"].CastFloat8Linear)]
    assert kept and all(m.weight.dtype == torch.float8_e4m3fn and m.comfy_cast_weights for m in kept)
    head = S["core"].text.T5TextEncoder.from_pretrained(path)  # the tokenizer found as DimbaT5Loader finds it
    full = t5.encode("a cat on a mat", 300)
    want = head.encode(["a cat on a mat"])[0].float()
    assert torch.equal(full[0][0], want)
    cpu = torch.device("cpu")
    t5.patcher.patch_model(cpu, lowvram_model_memory=t5.patcher.model_size() // 3, load_weights=True)
    try:
        assert t5.patcher.model.model_lowvram
        emb, _ = t5.encoder.encode(["a cat on a mat"], max_length=300, device=cpu)
    finally:
        t5.patcher.unpatch_model(cpu, unpatch_weights=True)
    assert torch.equal(emb.float(), full[0][0])
    print(f"fp8 T5: {len(kept)} float8 layers, model size {t5.patcher.model_size()} bytes")


def test_scan_hint_on_cuda_without_kernels():
    """On an NVIDIA GPU without mamba-ssm and triton a Dimba MODEL's load says once what to install; not on the
    CPU, not with either package."""
    import logging

    ops, host = S["core"].ops, S["host"]
    saved = dict(ops._IMPORTABLE)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    host.log.addHandler(handler)
    try:
        ops._IMPORTABLE.update({"mamba_ssm.ops.selective_scan_interface": False, "triton.language": False})
        host._HINTED.clear()
        assert not host.scan_hint("cpu")
        assert host.scan_hint("cuda:0") and not host.scan_hint("cuda:0")  # once
        ops._IMPORTABLE["triton.language"] = True
        host._HINTED.clear()
        assert not host.scan_hint("cuda:0")
    finally:
        host.log.removeHandler(handler)
        ops._IMPORTABLE.clear()
        ops._IMPORTABLE.update(saved)
        host._HINTED.clear()
    assert len(records) == 1 and "triton-windows" in records[0].getMessage()


class PytorchAttention:
    """ComfyUI's attention dispatch set to PyTorch SDPA (as --use-pytorch-cross-attention, the default on GPUs;
    on the CPU ComfyUI picks its sub-quadratic attention, which differs from SDPA at float rounding)."""

    def __enter__(self):
        import comfy.ldm.modules.attention as attention

        self.saved = attention.optimized_attention
        attention.optimized_attention = attention.attention_pytorch

    def __exit__(self, *exc):
        import comfy.ldm.modules.attention as attention

        attention.optimized_attention = self.saved


def test_dimba_sampler_equals_headless_sample():
    """Bit for bit with ComfyUI's PyTorch attention, every sampler, txt2img and img2img, seeded as dimba_core.pipeline
    seeds; within float rounding with the CPU's default (sub-quadratic) attention."""
    core, latent = S["core"], S["latent"]
    ref, enc = core.load_dimba(S["ckpt"]), core.text.T5TextEncoder.from_pretrained(S["t5_dir"])
    (pe, pm), (ne, _) = enc.encode(["a cat on a mat"]), enc.encode([""])
    for name in core.SAMPLERS:
        for denoise in (1.0, 0.6):
            with PytorchAttention():
                got = S["sampler"].sample(S["model"], S["pos"], S["neg"], latent, 7, 4, 4.5, name, denoise)[0]
            default = S["sampler"].sample(S["model"], S["pos"], S["neg"], latent, 7, 4, 4.5, name, denoise)[0]
            init = latent["samples"] * 0.13025 if denoise < 1 else None
            want = core.sample(ref, core.noise_like((2, 4, 24, 40), 7), pe.expand(2, -1, -1), ne.expand(2, -1, -1),
                               mask=pm.expand(2, -1), steps=4, cfg_scale=4.5, sampler=name, init_latent=init,
                               seed=7, denoise=denoise) / 0.13025
            got, default = got["samples"], default["samples"]
            assert torch.equal(got, want), (name, denoise, float((got - want).abs().max()))
            print(f"DimbaSampler {name} denoise {denoise}: CPU default attention vs headless, relative "
                  f"{rel(default, want):.1e}")
            assert rel(default, want) < 1e-4


def test_largest_seed_equals_headless_sample():
    core, seed = S["core"], 2**64 - 1
    with PytorchAttention():
        got = S["sampler"].sample(S["model"], S["pos"], S["neg"], S["latent"], seed, 3, 4.5, "iddpm")[0]["samples"]
    enc = core.text.T5TextEncoder.from_pretrained(S["t5_dir"])
    (pe, pm), (ne, _) = enc.encode(["a cat on a mat"]), enc.encode([""])
    want = core.sample(core.load_dimba(S["ckpt"]), core.noise_like((2, 4, 24, 40), seed), pe, ne, mask=pm, steps=3,
                       cfg_scale=4.5, sampler="iddpm", seed=seed) / 0.13025
    assert torch.equal(got, want)


def test_ksampler_with_masked_and_maskless_t5_conditioning():
    """DimbaT5 conditioning (300 tokens + mask) equals CLIPLoader(pixart)-style conditioning (no mask)."""
    model, pos, neg, latent = S["model"], S["pos"], S["neg"], S["latent"]["samples"]
    masked = ksampler(model, pos, neg, latent)
    n = int(pos[0][1]["attention_mask"].sum())
    clip_pos = [[pos[0][0][:, :n], {"pooled_output": None}]]
    clip_neg = [[neg[0][0][:, :1], {"pooled_output": None}]]
    assert masked.shape == (2, 4, 24, 40) and torch.isfinite(masked).all()
    assert torch.allclose(masked, ksampler(model, clip_pos, clip_neg, latent), atol=1e-3, rtol=1e-3)
    out = S["sampler"].sample(model, clip_pos, clip_neg, S["latent"], 7, 4, 4.5, "dpmpp_2m")[0]["samples"]
    assert torch.isfinite(out).all()
    for sampler, scheduler in [("dpmpp_2m", "karras"), ("uni_pc", "simple"), ("ddim", "ddim_uniform")]:
        assert torch.isfinite(ksampler(model, pos, neg, latent, sampler, scheduler)).all(), (sampler, scheduler)


def test_errors_name_the_problem():
    import safetensors.torch

    model, sampler, latent, pos, neg = S["model"], S["sampler"], S["latent"], S["pos"], S["neg"]
    wide = [[torch.zeros(1, 5, 32), {"pooled_output": None}]]
    assert "caption_channels" in error(lambda: sampler.sample(model, wide, wide, latent, 0, 2, 4.5, "ddim"))
    assert "caption_channels" in error(lambda: ksampler(model, wide, wide, latent["samples"]))
    odd = {"samples": torch.zeros(1, 4, 25, 40)}
    assert "multiples of 16" in error(lambda: sampler.sample(model, pos, neg, odd, 0, 2, 4.5, "ddim"))
    bad = os.path.join(tempfile.mkdtemp(), "sd15.safetensors")
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, bad)
    assert "not a Dimba checkpoint" in error(lambda: S["host"].load_model(bad))
    sd3 = torch.randn(1, 16, 24, 40)  # an SD3/Flux latent: both samplers say which node to use
    for fail in (lambda: sampler.sample(model, pos, neg, {"samples": sd3}, 0, 2, 4.5, "ddim"),
                 lambda: ksampler(model, pos, neg, sd3, steps=2)):
        message = error(fail)
        assert "16 channels" in message and "EmptyLatentImage" in message and "VAEEncode" in message, message


def denoise(patcher, lowvram_budget=0, seed=4):
    """BaseModel.apply_model on fixed inputs, with the weights loaded as ComfyUI loads them (0: full load, else a
    budget in bytes: ComfyUI loads what fits and casts the rest at use, with its LoRA patches)."""
    g = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([14.6, 0.9])
    emb, mask = S["pos"][0][0].expand(2, -1, -1), S["pos"][0][1]["attention_mask"].expand(2, -1)
    patcher.patch_model(torch.device("cpu"), lowvram_model_memory=lowvram_budget, load_weights=True)
    S["lowvram_patches"] = patcher.model.lowvram_patch_counter  # LoRA patches applied at use, not merged
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, c_crossattn=emb, attention_mask=mask).float()
    finally:
        patcher.unpatch_model(torch.device("cpu"), unpatch_weights=True)


def partial_budget(patcher):
    """A budget of a third of the model: ComfyUI streams the rest."""
    return patcher.model_size() // 3


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def saved_checkpoint(sd, name):
    """A Dimba .safetensors with the tiny config, for a hand-edited state dict."""
    core = S["core"]
    config, _ = core.loader.read_checkpoint(S["ckpt"])
    model = core.Dimba(config).eval()
    model.load_state_dict(sd)
    path = os.path.join(S["tmp"], name)
    core.loader.save_safetensors(model, path)
    return path


def test_weights_built_outside_inference_mode():
    """Nodes run under torch.inference_mode(); a MODEL holding inference tensors could never be trained."""
    with torch.inference_mode():
        model = S["host"].load_model(S["ckpt"])
    held = [n for n, t in model.model.state_dict(keep_vars=True).items() if t.is_inference()]
    assert not held, held[:5]


def test_partial_load_equals_full_load():
    """With a budget smaller than the model, ComfyUI loads part of it (lowvram) and the output is unchanged."""
    model = S["host"].load_model(S["ckpt"])
    full = denoise(model)
    budget = partial_budget(model)
    model.patch_model(torch.device("cpu"), lowvram_model_memory=budget, load_weights=True)
    lowvram, loaded = model.model.model_lowvram, model.loaded_size()
    model.unpatch_model(torch.device("cpu"), unpatch_weights=True)
    assert lowvram and 0 < loaded < model.model_size(), (loaded, model.model_size())
    assert torch.equal(denoise(model, budget), full)
    print(f"partial load: {loaded} of {model.model_size()} bytes loaded, output identical")


def test_weight_dtypes():
    """DimbaCheckpointLoader's weight dtypes: storage in fp8/fp16/bf16, compute in the device's dtype (float32 on
    the CPU), the Mamba SSM parameters float32; outputs close to the float32 model."""
    import comfy.ops

    loader = S["pack"].NODE_CLASS_MAPPINGS["DimbaCheckpointLoader"]()
    assert loader.INPUT_TYPES()["required"]["weight_dtype"][0] == [
        "default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "fp16", "bf16", "fp32"]
    ref = denoise(S["host"].load_model(S["ckpt"]))
    limits = {"fp8_e4m3fn": 0.08, "fp8_e4m3fn_fast": 0.08, "fp8_e5m2": 0.15, "fp16": 2e-3, "bf16": 1e-2}
    stored = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name, limit in limits.items():
        model = S["host"].load_model(S["ckpt"], name)
        net = model.model.diffusion_model
        mixer = net.mamba_blocks[0].mixer
        assert net.dtype == mixer.in_proj.weight.dtype == mixer.x_proj.weight.dtype == stored[name], name
        assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32, name
        assert model.model.manual_cast_dtype == torch.float32, name  # the CPU computes in float32
        assert isinstance(mixer.in_proj, comfy.ops.manual_cast.Linear), type(mixer.in_proj).__mro__
        err = rel(denoise(model), ref)
        print(f"weight dtype {name}: relative error {err:.2e} vs fp32 (limit {limit})")
        assert err < limit, (name, err)
        if name == "fp8_e4m3fn":  # DimbaSampler too
            out = S["sampler"].sample(model, S["pos"], S["neg"], S["latent"], 7, 3, 4.5, "dpmpp_2m")[0]["samples"]
            assert torch.isfinite(out).all()
    model = S["host"].load_model(S["ckpt"], "fp8_e4m3fn")
    assert torch.equal(denoise(model, partial_budget(model)), denoise(model))  # partial loading in fp8 too
    mps = torch.device("mps")  # Apple GPUs cannot hold float8 tensors: a clear error, not one from deep in torch
    assert "fp16 or default" in error(lambda: S["host"].model_options("fp8_e4m3fn", mps))
    assert S["host"].model_options("fp16", mps) == {"dtype": torch.float16}
    from comfy_extras.nodes_model_merging import ModelSave

    save_model(ModelSave, model, "dimba_fp8")  # an fp8 MODEL saves fp8 weights, which load again
    back = S["host"].load_model(os.path.join(S["tmp"], "dimba_fp8_00001_.safetensors"))
    assert torch.equal(denoise(back), denoise(model))


def run_saving_node(node, folder, *args, **inputs):
    """A saving node (ModelSave, CheckpointSave, SaveLoRA; V1 or V3) writing into `folder`."""
    import folder_paths

    output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(folder)
    try:
        return run_node(node, *args, **inputs)
    finally:
        folder_paths.set_output_directory(output)


def save_model(node, model, prefix, **inputs):
    """ModelSave / CheckpointSave writing into the test's folder."""
    run_saving_node(node, S["tmp"], model=model, filename_prefix=prefix, **inputs)


def lora_targets():
    """(key, shape) of the weights the LoRA test patches: attention and every Mamba projection."""
    sd = S["host"].load_model(S["ckpt"]).model.diffusion_model.state_dict()
    keys = ["blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.0.mlp.fc1"] + [
        f"mamba_blocks.{i}.mixer.{n}" for i in (0, 1)
        for n in ("in_proj", "out_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b")]
    return [(k, sd[k + ".weight"].shape) for k in keys]


def lora_file(formats_seed=0):
    """A LoRA file mixing ComfyUI's key styles and adapters, and the deltas (alpha and rank applied) it means."""
    g = torch.Generator().manual_seed(formats_seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd, deltas = {}, {}
    for i, (key, (out, inp)) in enumerate(lora_targets()):
        style = i % 4
        if style == 0:  # kohya names under diffusion_model.
            up, down, alpha = r(out, 4), r(4, inp), 2.0
            sd.update({f"diffusion_model.{key}.lora_up.weight": up, f"diffusion_model.{key}.lora_down.weight": down,
                       f"diffusion_model.{key}.alpha": torch.tensor(alpha)})
            deltas[key] = alpha / 4 * up @ down
        elif style == 1:  # PEFT names under lora_unet_, no alpha (alpha = rank)
            flat = "lora_unet_" + key.replace(".", "_")
            up, down = r(out, 2), r(2, inp)
            sd.update({f"{flat}.lora_B.weight": up, f"{flat}.lora_A.weight": down})
            deltas[key] = up @ down
        elif style == 2:  # LoHa
            a1, b1, a2, b2 = r(out, 2), r(2, inp), r(out, 2), r(2, inp)
            sd.update({f"diffusion_model.{key}.hada_w1_a": a1, f"diffusion_model.{key}.hada_w1_b": b1,
                       f"diffusion_model.{key}.hada_w2_a": a2, f"diffusion_model.{key}.hada_w2_b": b2,
                       f"diffusion_model.{key}.alpha": torch.tensor(1.0)})
            deltas[key] = 0.5 * (a1 @ b1) * (a2 @ b2)
        else:  # LoKr: w1 whole, w2 factored (alpha / its rank applies)
            w1, a2, b2 = r(2, 2), r(out // 2, 2), r(2, inp // 2)
            sd.update({f"diffusion_model.{key}.lokr_w1": w1, f"diffusion_model.{key}.lokr_w2_a": a2,
                       f"diffusion_model.{key}.lokr_w2_b": b2, f"diffusion_model.{key}.alpha": torch.tensor(3.0)})
            deltas[key] = 1.5 * torch.kron(w1, a2 @ b2)
    return sd, deltas


def test_lora_loader_full_and_partial_load():
    """LoraLoaderModelOnly with LoRA, PEFT, LoHa and LoKr keys on attention and Mamba projections equals the same
    deltas merged into the checkpoint by hand, in full and in partial loads."""
    import folder_paths
    import nodes as comfy_nodes
    import safetensors.torch

    sd, deltas = lora_file()
    loras = os.path.join(S["tmp"], "loras")
    os.makedirs(loras, exist_ok=True)
    safetensors.torch.save_file(sd, os.path.join(loras, "mixed.safetensors"))
    folder_paths.add_model_folder_path("loras", loras)
    strength = 0.7
    base = S["core"].loader.read_checkpoint(S["ckpt"])[1]
    merged = {k: v + strength * deltas[k.removesuffix(".weight")] if k.removesuffix(".weight") in deltas else v
              for k, v in base.items()}
    want = denoise(S["host"].load_model(saved_checkpoint(merged, "merged.safetensors")))
    model = S["host"].load_model(S["ckpt"])
    patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "mixed.safetensors", strength)[0]
    assert len(patched.patches) == len(deltas)
    full, partial = denoise(patched), denoise(patched, partial_budget(patched))
    assert S["lowvram_patches"] > 0
    print(f"LoRA formats: full load {rel(full, want):.1e}, partial load {rel(partial, want):.1e} from the hand merge")
    assert rel(full, want) < 1e-5 and rel(partial, want) < 1e-5
    assert rel(full, denoise(model)) > 1e-3  # the LoRA does change the output
    headless = S["core"].apply_lora(S["core"].load_dimba(S["ckpt"]), sd, strength)
    for key in deltas:
        w = headless.get_parameter(key + ".weight")
        assert torch.allclose(w, merged[key + ".weight"], atol=1e-6), key


def test_console_progress_bar_and_cancel():
    import comfy.model_management as mm

    sys.stderr.write("console bar check\n")
    S["sampler"].sample(S["model"], S["pos"], S["neg"], S["latent"], 0, 3, 4.5, "euler")  # tqdm on stderr
    closed = []

    class Recorded(S["host"].tqdm):  # the console bar DimbaSampler opens
        def close(self):
            closed.append(True)
            super().close()

    saved, S["host"].tqdm = S["host"].tqdm, Recorded
    mm.interrupt_current_processing(True)
    try:
        assert "Interrupt" in error(lambda: S["sampler"].sample(S["model"], S["pos"], S["neg"], S["latent"], 0, 2,
                                                                4.5, "ddim"))
        assert closed, "the console bar stayed open after Cancel"
    finally:
        mm.interrupt_current_processing(False)
        S["host"].tqdm = saved


def test_torch_compile_model():
    """ComfyUI's TorchCompileModel (inductor) accepts the Dimba MODEL; KSampler through it matches eager."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    latent = torch.zeros(1, 4, 16, 16)
    eager = ksampler(S["model"], S["pos"], S["neg"], latent, steps=3)
    compiled = TorchCompileModel.execute(S["model"], "inductor").result[0]
    start = time.time()
    out = ksampler(compiled, S["pos"], S["neg"], latent, steps=3)
    breaks = sum(counters["graph_break"].values())
    print(f"compiled KSampler run: {time.time() - start:.1f} s, {counters['stats']['unique_graphs']} graphs, "
          f"{breaks} graph breaks")
    assert compiled.model_options.get("torch_compile_kwargs", {}).get("backend") == "inductor"
    assert torch.isfinite(out).all() and torch.allclose(out, eager, atol=1e-3, rtol=1e-3), float((out - eager).abs().max())


def test_train_lora_node_save_and_load_back():
    """ComfyUI's TrainLoraNode trains a LoRA on the Dimba MODEL (attention and Mamba layers), SaveLoRA writes it,
    LoraLoaderModelOnly loads it back: the prediction moves towards the training latents, and the same file
    applied headless gives the same sample."""
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_train import SaveLoRA, TrainLoraNode

    g = torch.Generator().manual_seed(5)
    ramp = torch.linspace(-1, 1, 16)
    latents = (ramp[None, None, :, None] * ramp[None, None, None, :] * 3).repeat(4, 4, 1, 1)  # one "style"
    latents = latents + 0.1 * torch.randn(latents.shape, generator=g)
    with torch.inference_mode():  # as ComfyUI runs nodes
        model = S["host"].load_model(S["ckpt"])
        trained, lora, loss, steps = run_node(
            TrainLoraNode, model=model, latents={"samples": latents}, positive=S["pos"], batch_size=4, steps=30,
            grad_accumulation_steps=1, learning_rate=3e-3, rank=4, optimizer="AdamW", loss_function="MSE", seed=0,
            training_dtype="bf16", lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=True,
            existing_lora="[None]")
    assert steps == 30 and len(loss["loss"]) == 30
    mamba = [k for k in lora if ".mixer." in k and k.endswith("lora_up.weight")]
    assert {k.split(".mixer.")[1].split(".")[0] for k in mamba} >= {"in_proj", "out_proj", "x_proj", "x_proj_b",
                                                                   "dt_proj", "dt_proj_b"}, mamba
    assert all(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))  # every up moved

    def x0_error(patcher):
        """The training objective on fixed noise and sigmas: MSE of the denoised prediction to the latents."""
        import comfy.sample

        total = 0.0
        for i, sigma in enumerate((0.5, 2.0, 6.0)):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(i))
            ms = patcher.model.model_sampling
            xt = ms.noise_scaling(torch.tensor(sigma), noise, latents)
            emb, mask = S["pos"][0][0].expand(4, -1, -1), S["pos"][0][1]["attention_mask"].expand(4, -1)
            patcher.patch_model(torch.device("cpu"), load_weights=True)
            try:
                with torch.no_grad():
                    out = patcher.model.apply_model(xt, torch.full((4,), sigma), c_crossattn=emb,
                                                    attention_mask=mask)
            finally:
                patcher.unpatch_model(torch.device("cpu"), unpatch_weights=True)
            total += float(((ms.calculate_denoised(torch.full((4,), sigma), out, xt) - latents) ** 2).mean())
        return total / 3

    loras = os.path.join(S["tmp"], "loras")
    os.makedirs(loras, exist_ok=True)
    folder_paths.add_model_folder_path("loras", loras)
    run_saving_node(SaveLoRA, loras, lora, "dimba_lora", steps)
    name = next(f for f in os.listdir(loras) if f.startswith("dimba_lora_30_steps"))
    fresh = S["host"].load_model(S["ckpt"])
    loaded = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(fresh, name, 1.0)[0]
    before, after = x0_error(fresh), x0_error(loaded)
    print(f"TrainLoraNode: loss {sum(loss['loss'][:5]) / 5:.3f} (first 5) -> {sum(loss['loss'][-5:]) / 5:.3f} "
          f"(last 5); x0 error on the training latents {before:.4f} -> {after:.4f} with the saved LoRA")
    assert after < 0.9 * before
    # the saved file is the trained model, which TrainLoraNode left computing in bf16 (its training dtype)
    assert rel(denoise(loaded), denoise(trained)) < 2e-2

    core, seed = S["core"], 11
    with PytorchAttention():
        got = S["sampler"].sample(loaded, S["pos"], S["neg"], S["latent"], seed, 4, 4.5, "dpmpp_2m")[0]["samples"]
    enc = core.text.T5TextEncoder.from_pretrained(S["t5_dir"])
    (pe, pm), (ne, _) = enc.encode(["a cat on a mat"]), enc.encode([""])
    net = core.apply_lora(core.load_dimba(S["ckpt"]), os.path.join(loras, name))
    want = core.sample(net, core.noise_like((2, 4, 24, 40), seed), pe.expand(2, -1, -1), ne.expand(2, -1, -1),
                       mask=pm.expand(2, -1), steps=4, cfg_scale=4.5, sampler="dpmpp_2m", seed=seed) / 0.13025
    print(f"ComfyUI vs headless --lora sample: max abs difference {float((got - want).abs().max()):.2e}")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_save_and_checkpoint_save_load_back():
    """ModelSave and CheckpointSave files (ComfyUI keys, the VAE and text encoder beside the denoiser) load with
    DimbaCheckpointLoader and give the same output; the config (num_heads) travels inside."""
    import types

    import comfy.model_patcher
    import comfy.sd
    from comfy_extras.nodes_model_merging import CheckpointSave, ModelSave

    model = S["host"].load_model(S["ckpt"])
    save_model(ModelSave, model, "diffusion_models/dimba_saved")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(f"{S['models']}/vae/dimba_tiny_vae.safetensors"))
    encoder = torch.nn.Linear(4, 4)  # a stand-in text encoder: CheckpointSave needs a CLIP, Dimba uses DIMBA_T5
    clip = types.SimpleNamespace(get_sd=encoder.state_dict, load_model=lambda: comfy.model_patcher.ModelPatcher(
        encoder, torch.device("cpu"), torch.device("cpu")))
    save_model(CheckpointSave, model, "checkpoints/dimba_bundled", clip=clip, vae=vae)
    want = denoise(model)
    for path in ("diffusion_models/dimba_saved_00001_.safetensors", "checkpoints/dimba_bundled_00001_.safetensors"):
        keys = comfy.utils.load_torch_file(os.path.join(S["tmp"], path)).keys()
        assert "model.diffusion_model.dimba_config" in keys, path  # the config stays with the denoiser's keys
        back = S["host"].load_model(os.path.join(S["tmp"], path))
        assert back.model.diffusion_model.config == model.model.diffusion_model.config  # num_heads 4, not 16
        assert torch.equal(denoise(back), want), path
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("text_encoders.")
                                                                          for k in keys)  # PixArt's layout


def test_model_merge_simple():
    """ModelMergeSimple of two Dimba MODELs equals the hand-merged weights."""
    import comfy.utils
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    base = S["core"].loader.read_checkpoint(S["ckpt"])[1]
    g = torch.Generator().manual_seed(9)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ratio = 0.3  # ComfyUI: ratio * model1 + (1 - ratio) * model2
    merged = {k: ratio * base[k] + (1 - ratio) * other[k] for k in base}
    want = denoise(S["host"].load_model(saved_checkpoint(merged, "hand_merged.safetensors")))
    a, b = S["host"].load_model(S["ckpt"]), S["host"].load_model(saved_checkpoint(other, "other.safetensors"))
    got = run_node(ModelMergeSimple, a, b, ratio)[0]
    assert rel(denoise(got), want) < 1e-5 and rel(denoise(got, partial_budget(got)), want) < 1e-5
    got.patch_model(torch.device("cpu"), load_weights=True)  # the float32 parameters outside comfy.ops layers:
    try:  # merged in float32 (ComfyUI >= 0.4 would patch them in fp16 on GPUs, or not at all)
        for key in ("mamba_blocks.0.mixer.A_log", "mamba_blocks.1.mixer.D_b", "blocks.0.scale_shift_table",
                    "mamba_blocks.0.norm.weight"):
            value = comfy.utils.get_attr(got.model.diffusion_model, key)
            assert value.dtype == torch.float32 and rel(value, merged[key]) < 1e-6, key
    finally:
        got.unpatch_model(torch.device("cpu"), unpatch_weights=True)


def meta_state_dict(module):
    """Keys and shapes of a module built on the meta device (no memory), as a state dict for model detection."""
    return dict(module.state_dict())


def dimba_l2_state_dict(dtype=torch.bfloat16):
    """A Dimba-L-2 state dict with the published keys and shapes (../shared/fixtures manifest), zero-filled."""
    import json

    manifest = json.loads(open(os.path.join(S["repo"], "..", "shared", "fixtures", "dimba_official_keys.json")).read())
    return {k: torch.zeros(shape, dtype=dtype) for k, shape in manifest["Dimba-L-2"]["keys"].items()}


def test_stock_loaders_build_the_dimba_model():
    """Load Diffusion Model (every weight_dtype) on the .safetensors and on a published-style .pt, Load Checkpoint on
    a CheckpointSave file and ModelSave -> Load Diffusion Model give DimbaCheckpointLoader's MODEL and output."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_merging import CheckpointSave, ModelSave

    host, core = S["host"], S["core"]
    diffusion = os.path.join(S["tmp"], "diffusion_models")
    os.makedirs(diffusion, exist_ok=True)
    os.symlink(S["ckpt"], os.path.join(diffusion, "dimba_tiny.safetensors"))
    config, sd = core.loader.read_checkpoint(S["ckpt"])
    torch.save({"state_dict": sd}, os.path.join(diffusion, "dimba_tiny.pt"))  # the published layout
    folder_paths.add_model_folder_path("diffusion_models", diffusion)
    folder_paths.add_model_folder_path("checkpoints", os.path.join(S["tmp"], "checkpoints"))
    unet_dtypes = comfy_nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    for weight_dtype in unet_dtypes:
        ours = host.load_model(S["ckpt"], weight_dtype)
        stock = run_node(comfy_nodes.UNETLoader, "dimba_tiny.safetensors", weight_dtype)[0]
        assert isinstance(stock.model, host.DimbaModel), type(stock.model)
        assert stock.model.diffusion_model.config == config  # num_heads 4 from the file's metadata
        assert stock.model.get_dtype() == ours.model.get_dtype(), weight_dtype
        assert torch.equal(denoise(stock), denoise(ours)), weight_dtype
    pt = run_node(comfy_nodes.UNETLoader, "dimba_tiny.pt", "default")[0]
    assert torch.equal(denoise(pt), denoise(host.load_model(os.path.join(diffusion, "dimba_tiny.pt"))))
    model = host.load_model(S["ckpt"])
    want = denoise(model)
    save_model(ModelSave, model, "diffusion_models/dimba_resaved")
    back = run_node(comfy_nodes.UNETLoader, "dimba_resaved_00001_.safetensors", "default")[0]
    assert back.model.diffusion_model.config == config and torch.equal(denoise(back), want)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(f"{S['models']}/vae/dimba_tiny_vae.safetensors"))
    encoder = torch.nn.Linear(4, 4)  # a stand-in text encoder (not T5: Load Checkpoint gives no CLIP for it)
    clip = types.SimpleNamespace(get_sd=encoder.state_dict, state_dict_for_saving=encoder.state_dict,
                                 load_model=lambda: comfy.model_patcher.ModelPatcher(encoder, torch.device("cpu"),
                                                                                     torch.device("cpu")))
    save_model(CheckpointSave, model, "checkpoints/dimba_bundle", clip=clip, vae=vae)
    bundled = run_node(comfy_nodes.CheckpointLoaderSimple, "dimba_bundle_00001_.safetensors")
    assert isinstance(bundled[0].model, host.DimbaModel) and bundled[2] is not None
    assert bundled[0].model.diffusion_model.config == config and torch.equal(denoise(bundled[0]), want)


def test_stock_detection_of_dimba_pixart_sd_and_flux():
    """ComfyUI's model detection: Dimba-L-2 and the tiny Dimba are Dimba, PixArt / SD1.5 / Flux state dicts are
    what they were; a Dimba-L-2-shaped state dict loads through Load Diffusion Model's path with no key left over."""
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ldm.pixart.pixartms
    import comfy.model_detection
    import comfy.ops
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.utils

    host = S["host"]
    detect = comfy.model_detection.model_config_from_unet
    big = dimba_l2_state_dict()
    found = detect(big, "")
    assert isinstance(found, host.DimbaModelConfig)
    assert (found.unet_config["hidden_size"], found.unet_config["depth"], found.unet_config["dt_rank"],
            found.unet_config["num_heads"]) == (1152, 28, 72, 16)
    tiny = comfy.utils.load_torch_file(S["ckpt"])
    assert isinstance(detect(tiny, ""), host.DimbaModelConfig)
    ops = comfy.ops.disable_weight_init
    pixart = comfy.ldm.pixart.pixartms.PixArtMS(depth=28, num_heads=16, patch_size=2, hidden_size=1152,
                                                pe_interpolation=1, model_max_length=300, device="meta",
                                                operations=ops)
    assert type(detect(meta_state_dict(pixart), "")) in (sm.PixArtAlpha, sm.PixArtSigma)  # PixArt, as before
    sd15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8, context_dim=768,
                use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False, adm_in_channels=None)
    unet = openaimodel.UNetModel(**sd15, device="meta", operations=ops)
    assert type(detect(meta_state_dict(unet), "")) is sm.SD15
    flux = comfy.ldm.flux.model.Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                                     hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                                     axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True,
                                     image_model="flux", patch_size=2, device="meta", operations=ops)
    assert type(detect(meta_state_dict(flux), "")) in (sm.Flux, sm.FluxInpaint)
    loaded = comfy.sd.load_diffusion_model_state_dict(big, model_options={"dtype": torch.bfloat16})
    assert isinstance(loaded.model, host.DimbaModel) and not big  # every key consumed, none left over
    assert loaded.model.diffusion_model.net.x_embedder.proj.weight.shape == (1152, 4, 2, 2)
    del loaded


def test_stock_loaders_name_dimba_when_the_hooks_are_missing():
    """Where ComfyUI's internals differ, the stock loaders refuse a Dimba file naming DimbaCheckpointLoader (never
    PixArt), other files load as before, and DimbaCheckpointLoader's own build gives the same MODEL."""
    import comfy.model_detection
    import comfy.utils

    integration = importlib.import_module("ComfyUI_Dimba.nodes.integration")
    assert integration.STATE["installed"] and not integration.missing_internals()
    original = inspect_unwrap(comfy.model_detection.detect_unet_config)
    refusing = integration._refusing(original)
    message = error(lambda: refusing(comfy.utils.load_torch_file(S["ckpt"]), ""))
    assert "Dimba" in message and "DimbaCheckpointLoader" in message, message
    flux_like = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}
    assert refusing(flux_like, "") == original(flux_like, "")  # others unchanged
    config, sd = S["core"].loader.read_checkpoint(S["ckpt"])
    sd[integration.CONFIG_KEY] = S["core"].loader.config_tensor(config)
    built = S["host"]._build(dict(sd), config, {})
    assert torch.equal(denoise(S["host"].attach(built)), denoise(S["host"].load_model(S["ckpt"])))
    assert "0.3.64 or newer" in error(lambda: integration.check_version((0, 3, 40)))
    integration.check_version((0, 38, 1))


class DynamicVramEmulation:
    """ComfyUI 0.38's Dynamic VRAM contracts inside 0.3.64, after the rule in its newest comfy/ops.py: a
    comfy.ops Linear / Embedding that keeps the base _load_from_state_dict is built holding no tensors and takes
    the state dict's tensors, in the file's dtype, at load time; models load with assign=True."""

    def __enter__(self):
        import comfy.model_base
        import comfy.ops

        ops = comfy.ops.disable_weight_init
        self.saved = [(cls, name, cls.__dict__.get(name)) for cls in (ops.Linear, ops.Embedding)
                      for name in ("__init__", "_load_from_state_dict")]
        self.saved.append((comfy.model_base.BaseModel, "load_model_weights",
                           comfy.model_base.BaseModel.__dict__["load_model_weights"]))

        def lazy(cls, shape_of):
            def __init__(self, *args, device=None, dtype=None, **kwargs):
                if type(self)._load_from_state_dict is not cls._load_from_state_dict:  # a custom loader: eager
                    return super(cls, self).__init__(*args, device=device, dtype=dtype, **kwargs)
                torch.nn.Module.__init__(self)
                self.lazy_args, self.lazy_kwargs = args, kwargs
                for i, name in enumerate(shape_of):
                    setattr(self, name, args[i] if i < len(args) else kwargs.get(name))
                self.weight = self.bias = None
                self.wants_bias = kwargs.get("bias", args[2] if len(args) > 2 else True) if cls is ops.Linear else False
                self.weight_comfy_model_dtype = self.bias_comfy_model_dtype = dtype

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
                if not hasattr(self, "lazy_args"):
                    return super(cls, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                                                  unexpected, errors)
                assign = local_metadata.get("assign_to_params_buffers", False)
                for key, value in state_dict.items():
                    name = key[len(prefix):]
                    if name in ("weight", "bias") and value is not None:
                        setattr(self, name, torch.nn.Parameter(value if assign else value.clone(), requires_grad=False))
                    else:
                        unexpected.append(key)
                for name in ("weight", "bias") if self.wants_bias else ("weight",):
                    if getattr(self, name) is None:
                        missing.append(prefix + name)

            cls.__init__, cls._load_from_state_dict = __init__, _load_from_state_dict

        lazy(ops.Linear, ("in_features", "out_features"))
        lazy(ops.Embedding, ("num_embeddings", "embedding_dim"))

        def load_model_weights(model, sd, unet_prefix=""):  # 0.38: assign=patcher.is_dynamic()
            to_load = {k[len(unet_prefix):]: sd.pop(k) for k in list(sd) if k.startswith(unet_prefix)}
            to_load = model.model_config.process_unet_state_dict(to_load)
            model.diffusion_model.load_state_dict(to_load, strict=False, assign=True)
            return model

        comfy.model_base.BaseModel.load_model_weights = load_model_weights
        return self

    def __exit__(self, *exc):
        for cls, name, value in self.saved:
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


def test_dynamic_vram_lazy_layers_give_the_eager_results():
    """Under the emulated Dynamic VRAM contracts: DimbaCheckpointLoader and Load Diffusion Model in each
    weight_dtype, LoRA (attention, Mamba and an A_log patch), partial loading and KSampler give the eager results
    (equal where the storage dtype is float32; within the dtype's tolerance where 0.38 would cast at streaming)."""
    import comfy.sd
    import nodes as comfy_nodes

    host = S["host"]
    g = torch.Generator().manual_seed(11)
    lora = {"diffusion_model.blocks.0.attn.qkv.lora_up.weight": 0.1 * torch.randn(192, 4, generator=g),
            "diffusion_model.blocks.0.attn.qkv.lora_down.weight": 0.1 * torch.randn(4, 64, generator=g),
            "diffusion_model.mamba_blocks.0.mixer.in_proj.lora_up.weight": 0.1 * torch.randn(256, 4, generator=g),
            "diffusion_model.mamba_blocks.0.mixer.in_proj.lora_down.weight": 0.1 * torch.randn(4, 64, generator=g),
            "diffusion_model.mamba_blocks.0.mixer.A_log.diff": 0.01 * torch.randn(128, 8, generator=g),
            "diffusion_model.blocks.1.scale_shift_table.diff": 0.01 * torch.randn(6, 64, generator=g)}

    def outputs(model):
        patched = comfy.sd.load_lora_for_models(model, None, lora, 0.7, 0)[0]
        latent = torch.zeros(1, 4, 16, 24)
        return (denoise(model), denoise(patched), denoise(patched, partial_budget(patched)),
                ksampler(patched, S["pos"], S["neg"], latent, steps=3))

    limits = {"fp16": 2e-3, "bf16": 1e-2, "fp8_e4m3fn": 8e-2, "fp8_e4m3fn_fast": 8e-2, "fp8_e5m2": 0.15}
    for weight_dtype in ("default", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"):
        eager_model = host.load_model(S["ckpt"], weight_dtype)
        eager = outputs(eager_model)
        with DynamicVramEmulation():
            model = host.load_model(S["ckpt"], weight_dtype)
            # the dtype ComfyUI chose, not the file's that the lazily filled tensors hold (it picks the compute dtype)
            assert model.model.get_dtype() == eager_model.model.get_dtype(), weight_dtype
            assert model.model.diffusion_model.blocks[0].attn.qkv.lazy_args  # built empty, filled at load
            mixer = model.model.diffusion_model.mamba_blocks[0].mixer
            assert {mixer.A_log.dtype, mixer.dt_proj.weight.dtype, mixer.dt_proj.bias.dtype} == {torch.float32}
            lazy = outputs(model)
            if weight_dtype in comfy_nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]:
                stock = comfy.sd.load_diffusion_model(S["ckpt"], host.model_options(weight_dtype, torch.device("cpu")))
                assert torch.equal(denoise(stock), lazy[0])
        for got, want in zip(lazy, eager):
            err = rel(got, want)
            print(f"dynamic VRAM emulation, {weight_dtype}: relative difference {err:.1e} from the eager load")
            assert torch.isfinite(got).all() and err <= limits.get(weight_dtype, 1e-6), (weight_dtype, err)
    assert rel(eager[1], eager[0]) > 1e-3  # the LoRA (incl. the A_log and table patches) changed the output


class CountedForward:
    """Counts network evaluations of the Dimba MODEL (DimbaDiffusion._forward, inside the wrapper executor)."""

    def __enter__(self):
        cls = S["host"].DimbaDiffusion
        self.saved, self.calls = cls._forward, 0

        def counted(net, *args, **kwargs):
            self.calls += 1
            return self.saved(net, *args, **kwargs)

        cls._forward = counted
        return self

    def __exit__(self, *exc):
        S["host"].DimbaDiffusion._forward = self.saved


def test_wrappers_and_attention_override_reach_the_network():
    """A DIFFUSION_MODEL wrapper runs once per network evaluation and an optimized_attention_override once per
    attention call (self- and cross-attention of every block), under KSampler; the override under DimbaSampler
    too; neither changes the result."""
    import comfy.patcher_extension as pe

    model, pos, neg, latent = S["model"].clone(), S["pos"], S["neg"], S["latent"]["samples"]
    calls = {"wrapper": 0, "override": 0}

    def wrapper(executor, *args, **kwargs):
        calls["wrapper"] += 1
        return executor(*args, **kwargs)

    def override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "dimba_test", wrapper)
    model.model_options["transformer_options"]["optimized_attention_override"] = override
    plain = ksampler(S["model"], pos, neg, latent, steps=3)
    with CountedForward() as evaluations:
        out = ksampler(model, pos, neg, latent, steps=3)
    depth = len(S["model"].model.diffusion_model.blocks)
    print(f"KSampler 3 steps: {evaluations.calls} network evaluations, wrapper {calls['wrapper']}, attention "
          f"override {calls['override']}")
    assert evaluations.calls >= 3 and calls["wrapper"] == evaluations.calls
    assert calls["override"] == 2 * depth * evaluations.calls and torch.equal(out, plain)
    calls.update(wrapper=0, override=0)
    only_override = S["model"].clone()
    only_override.model_options["transformer_options"]["optimized_attention_override"] = override
    S["sampler"].sample(only_override, pos, neg, S["latent"], 7, 2, 4.5, "ddim")
    assert calls["override"] == 2 * depth * 2  # 2 steps of one evaluation (cond and uncond batched)


def cache_runs(run, steps, counter):
    """run(model, steps) on the MODEL with no cache, EasyCache and LazyCache (their defaults), after a 2-step
    warm-up each: {name: (network evaluations, seconds, output)}; printed against no cache."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    rows = {}
    for name, node in (("none", None), ("EasyCache", EasyCacheNode), ("LazyCache", LazyCacheNode)):
        model = S["model"] if node is None else run_node(node, model=S["model"], reuse_threshold=0.2,
                                                         start_percent=0.15, end_percent=0.95, verbose=False)[0]
        run(model, 2)
        with counter() as evaluations:
            t0 = time.perf_counter()
            out = run(model, steps)
            rows[name] = (evaluations.calls, time.perf_counter() - t0, out)
    base_calls, base_time, base = rows["none"]
    for name, (calls, seconds, out) in rows.items():
        print(f"  cache {name}: {calls} network evaluations, {seconds:.2f} s ({seconds / base_time:.2f}x of none), "
              f"relative difference {rel(out, base):.2e}")
    for name in ("EasyCache", "LazyCache"):
        assert rows[name][0] < base_calls and torch.isfinite(rows[name][2]).all(), name
    return rows


def test_easycache_and_lazycache_skip_network_evaluations():
    """EasyCache and LazyCache on the Dimba MODEL under KSampler (20 steps, default settings): fewer network
    evaluations. Prints evaluations, wall time and the difference from no cache (one process); on the random tiny
    model the difference says nothing about real images."""
    latent = torch.zeros(1, 4, 64, 64)  # 512 px
    print("KSampler euler 20 steps 512 px")
    cache_runs(lambda model, steps: ksampler(model, S["pos"], S["neg"], latent, steps=steps), 20, CountedForward)


class CountedNetwork:
    """Counts forwards of the dimba_core network inside the Dimba MODEL (what DimbaSampler evaluates)."""

    def __enter__(self):
        self.net, self.calls = S["model"].model.diffusion_model.net, 0
        forward = self.net.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        self.net.forward = counted
        return self

    def __exit__(self, *exc):
        del self.net.forward


def test_dimba_sampler_runs_sampling_wrappers():
    """DimbaSampler runs OUTER_SAMPLE once and CALC_COND_BATCH / DIFFUSION_MODEL / PREDICT_NOISE once per network
    evaluation; pass-through wrappers leave the result bit for bit (PREDICT_NOISE: within its sigma-space round
    trip). The DIFFUSION_MODEL wrapper sees ComfyUI's transformer_options (sigmas, uuids, cond_or_uncond)."""
    import comfy.patcher_extension as pe

    pos, neg, latent = S["pos"], S["neg"], S["latent"]
    plain = S["sampler"].sample(S["model"], pos, neg, latent, 7, 4, 4.5, "dpmpp_2m")[0]["samples"]
    for kinds in ((pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.CALC_COND_BATCH, pe.WrappersMP.DIFFUSION_MODEL),
                  (pe.WrappersMP.PREDICT_NOISE,)):
        model, calls, seen = S["model"].clone(), {k: 0 for k in kinds}, []
        for kind in kinds:
            def wrapper(executor, *args, kind=kind, **kwargs):
                calls[kind] += 1
                if kind == pe.WrappersMP.DIFFUSION_MODEL:
                    seen.append(args[-1])
                return executor(*args, **kwargs)

            model.add_wrapper_with_key(kind, "dimba_test", wrapper)
        with CountedNetwork() as evaluations:
            out = S["sampler"].sample(model, pos, neg, latent, 7, 4, 4.5, "dpmpp_2m")[0]["samples"]
        print(f"DimbaSampler 4 steps, wrappers {calls}, {evaluations.calls} network evaluations, "
              f"relative difference {rel(out, plain):.1e}")
        for kind in kinds:
            assert evaluations.calls == 4 and calls[kind] == (1 if kind == pe.WrappersMP.OUTER_SAMPLE else 4), kind
        if pe.WrappersMP.PREDICT_NOISE in kinds:
            assert rel(out, plain) < 1e-5
        else:
            assert torch.equal(out, plain)
            options = seen[0]
            assert len(options["uuids"]) == 2 and options["cond_or_uncond"] == [1, 0]
            batch = latent["samples"].shape[0]  # one sigma per latent, as ComfyUI's calc_cond_batch gives them
            assert options["sigmas"].shape == (batch,) and len(options["sample_sigmas"]) == 5


def test_dimba_sampler_with_easycache_and_lazycache():
    """EasyCache and LazyCache under DimbaSampler (20 steps, 512 px, the nodes' defaults): fewer network
    evaluations, finite latents; iddpm (learned variance) too. Prints evaluations, wall time and the difference
    from no cache; on the random tiny model the difference says nothing about real images."""
    for sampler, steps, px in (("dpmpp_2m", 20, 512), ("iddpm", 12, 256)):
        latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}
        print(f"DimbaSampler {sampler} {steps} steps {px} px")
        cache_runs(lambda model, n: S["sampler"].sample(model, S["pos"], S["neg"], latent, 3, n, 4.5, sampler)[0][
            "samples"], steps, CountedNetwork)
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    one, two = {"samples": S["latent"]["samples"][:1]}, S["latent"]
    for node, latent in ((EasyCacheNode, one), (LazyCacheNode, two)):  # ComfyUI's EasyCache: batch 1 only (docs)
        model = run_node(node, model=S["model"], reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                         verbose=False)[0]
        for cfg, denoise, sampler in ((1.0, 1.0, "dpmpp_2m"), (4.5, 0.6, "dpmpp_2m"), (3.0, 1.0, "sa_solver")):
            out = S["sampler"].sample(model, S["pos"], S["neg"], latent, 3, 10, cfg, sampler, denoise)[0]["samples"]
            assert out.shape == latent["samples"].shape and torch.isfinite(out).all(), (node, cfg, denoise, sampler)


def inspect_unwrap(fn):
    import inspect

    return inspect.unwrap(fn)


SLOW = ("test_torch_compile_model",)


def main(argv) -> int:
    comfy_path, repo, models, *names = argv
    tests = {n: f for n, f in globals().items() if n.startswith("test_") and callable(f)}
    names = names or [n for n in tests if n not in SLOW]
    setup(comfy_path, repo, models)
    failed = 0
    for name in names:
        try:
            tests[name]()
            print(f"PASSED {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
