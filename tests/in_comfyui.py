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
    S.update(pack=pack, host=host, core=importlib.import_module("ComfyUI_Dimba.dimba_core"), ckpt=ckpt,
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
    assert torch.equal(emb, pos[0][0]) and torch.equal(mask, pos[0][1]["attention_mask"])


def test_dimba_sampler_equals_headless_sample():
    """Bit for bit, every sampler, txt2img and img2img, seeded as dimba_core.pipeline seeds."""
    core, latent = S["core"], S["latent"]
    ref, enc = core.load_dimba(S["ckpt"]), core.text.T5TextEncoder.from_pretrained(S["t5_dir"])
    (pe, pm), (ne, _) = enc.encode(["a cat on a mat"]), enc.encode([""])
    for name in core.SAMPLERS:
        for denoise in (1.0, 0.6):
            got = S["sampler"].sample(S["model"], S["pos"], S["neg"], latent, 7, 4, 4.5, name, denoise)[0]["samples"]
            init = latent["samples"] * 0.13025 if denoise < 1 else None
            want = core.sample(ref, core.noise_like((2, 4, 24, 40), 7), pe.expand(2, -1, -1), ne.expand(2, -1, -1),
                               mask=pm.expand(2, -1), steps=4, cfg_scale=4.5, sampler=name, init_latent=init,
                               seed=7, denoise=denoise) / 0.13025
            assert torch.equal(got, want), (name, denoise, float((got - want).abs().max()))


def test_largest_seed_equals_headless_sample():
    core, seed = S["core"], 2**64 - 1
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


def test_low_vram_budgets_still_load_every_weight():
    """The layers are plain torch modules, so ComfyUI moves the model whole (issue #11 changes this)."""
    fresh = S["host"].load_model(S["ckpt"])
    fresh.partially_load(torch.device("cpu"), 1)
    assert not fresh.model.model_lowvram and fresh.loaded_size() == fresh.model_size()
    assert fresh.partially_unload(torch.device("cpu"), 1) == 0


def test_console_progress_bar_and_cancel():
    import comfy.model_management as mm

    sys.stderr.write("console bar check\n")
    S["sampler"].sample(S["model"], S["pos"], S["neg"], S["latent"], 0, 3, 4.5, "euler")  # tqdm on stderr
    mm.interrupt_current_processing(True)
    try:
        assert "Interrupt" in error(lambda: S["sampler"].sample(S["model"], S["pos"], S["neg"], S["latent"], 0, 2,
                                                                4.5, "ddim"))
    finally:
        mm.interrupt_current_processing(False)


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
