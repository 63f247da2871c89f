"""The trainer end to end on tiny random assets: overfitting, exact resume, 1 vs 2 processes, outputs, bad data."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dimba_core import apply_lora, load_dimba
from dimba_core.train import TrainOptions, train, training_losses
from dimba_core.train.data import LatentCache, find_samples, usable_images

ROOT = Path(__file__).resolve().parents[1]
# env, train_cache and write_images are tests/conftest.py's fixtures


def options(env, out, **kw) -> TrainOptions:
    base = dict(checkpoint=str(env["checkpoint"]), t5=str(env["t5"]), vae=str(env["vae"]), data=str(env["data"]),
                out=str(out), cache_dir=str(env["cache"]), image_size=64, steps=2, batch_size=4, optimizer="adamw",
                warmup_steps=0, progress=False)
    return TrainOptions(**{**base, **kw})


def eval_mse(model, cache: LatentCache) -> float:
    """Eps error of the model on the cached images (posterior means) at fixed timesteps and noise."""
    n = len(cache)
    x0 = torch.stack([cache.latent(i, torch.zeros_like(cache.mean[0])) for i in range(n)]).repeat(4, 1, 1, 1)
    t = torch.tensor([50, 250, 500, 750]).repeat_interleave(n)
    length = int(cache.lengths.max())
    y = torch.zeros(4 * n, 1, length, cache.tokens.shape[1])
    mask = torch.zeros(4 * n, length, dtype=torch.long)
    for j in range(4 * n):
        c = cache.caption(j % n)
        y[j, 0, : len(c)], mask[j, : len(c)] = c, 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return training_losses(model, x0, t, y, mask, noise)["mse"].mean().item()


@pytest.fixture(scope="module")
def lora_run(env, train_cache):
    """A LoRA trained hard on the 4 images."""
    out = env["root"] / "lora"
    result = train(options(env, out, steps=20, lr=1e-2, lora_rank=8, max_grad_norm=1.0, class_dropout_prob=0.0))
    return dict(result, out=out)


def test_lora_overfits_four_images_and_loads_headless(env, lora_run):
    cache = LatentCache.load(env["cache"])
    assert len(cache) == 4 and cache.mean.shape[1:] == (4, 8, 8)
    base = load_dimba(env["checkpoint"])
    tuned = apply_lora(load_dimba(env["checkpoint"]), lora_run["weights"])
    before, after = eval_mse(base, cache), eval_mse(tuned, cache)
    assert after < 0.75 * before, (before, after)
    losses = lora_run["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    sd = load_file(str(lora_run["weights"]))
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in sd)
    from safetensors import safe_open

    with safe_open(str(lora_run["weights"]), "pt") as f:  # rank 8; the dt_proj layers have 4 inputs: rank 4
        meta = f.metadata()
    assert meta["rank"] == "8" and set(json.loads(meta["layer_ranks"]).values()) == {4}
    assert all(sd[f"diffusion_model.{k}.lora_down.weight"].shape[0] == 4 for k in json.loads(meta["layer_ranks"]))
    log = [json.loads(line) for line in (lora_run["out"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21)) and all(np.isfinite(r["loss"]) for r in log)


def test_generate_with_lora_changes_the_image(env, lora_run, tmp_path, capsys):
    from dimba_core import DimbaPipeline
    from dimba_core.__main__ import main

    def generate(out, *extra):
        return main(["generate", "--checkpoint", str(env["checkpoint"]), "--t5", str(env["t5"]), "--vae",
                     str(env["vae"]), "--prompt", env["captions"][0], "--width", "64", "--height", "64", "--steps", "2",
                     "--out", str(out), *extra])

    pipe = DimbaPipeline.from_files(env["checkpoint"], env["t5"], env["vae"], device="cpu")
    plain = np.asarray(pipe(env["captions"][0], width=64, height=64, steps=2, seed=0)[0].image, dtype=float)
    assert generate(tmp_path / "lora", "--lora", f"{lora_run['weights']}:1.0") == 0
    (png,) = (tmp_path / "lora").glob("*.png")
    assert np.abs(np.asarray(Image.open(png), dtype=float) - plain).mean() > 0.5
    capsys.readouterr()
    assert generate(tmp_path / "bad", "--lora", str(tmp_path / "nope.safetensors")) == 2
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.usefixtures("train_cache")
def test_resume_continues_exactly(env, tmp_path):
    pytest.importorskip("came_pytorch")
    kw = dict(lora_rank=4, optimizer="came", lr=1e-3, ema_decay=0.9, grad_accum=2, warmup_steps=3, seed=7)
    whole = train(options(env, tmp_path / "whole", steps=4, **kw))
    train(options(env, tmp_path / "split", steps=2, **kw))
    assert (tmp_path / "split" / "checkpoints" / "step-0000002.pt").is_file()
    split = train(options(env, tmp_path / "split", steps=4, resume="latest", **kw))
    assert split["losses"] == whole["losses"][2:]
    for kind in ("weights", "ema"):
        a, b = load_file(str(whole[kind])), load_file(str(split[kind]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    with pytest.raises(ValueError, match="options differ.*seed"):
        train(options(env, tmp_path / "split", steps=5, resume="latest", **dict(kw, seed=8)))


@pytest.mark.usefixtures("train_cache")
def test_two_processes_give_the_same_weights_as_one(env, tmp_path):
    args = ["--checkpoint", str(env["checkpoint"]), "--data", str(env["data"]), "--cache-dir", str(env["cache"]),
            "--image-size", "64", "--steps", "2", "--batch-size", "4", "--lora-rank", "4", "--optimizer", "adamw",
            "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "dimba_core", "train", "--out", str(tmp_path / "one"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_vars)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dimba_core", "train", "--out", str(tmp_path / "two"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_vars)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "dimba_lora.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))


@pytest.mark.usefixtures("train_cache")
def test_fsdp_full_finetune_matches_one_process_and_resumes(env, tmp_path):
    args = ["--checkpoint", str(env["checkpoint"]), "--data", str(env["data"]), "--cache-dir", str(env["cache"]),
            "--image-size", "64", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "0",
            "--ema", "0.9", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "dimba_core", "train", "--fsdp"]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(torchrun + ["--out", str(tmp_path / "two"), "--steps", "1", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env_vars)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(torchrun + ["--out", str(tmp_path / "two"), "--steps", "2", "--resume", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env_vars)
    assert again.returncode == 0, again.stderr[-3000:]
    one = train(options(env, tmp_path / "one", steps=2, lr=1e-3, ema_decay=0.9))
    for kind, name in (("weights", "dimba_finetuned"), ("ema", "dimba_finetuned_ema")):
        a, b = load_file(str(one[kind])), load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("train_cache")
def test_full_finetune_at_1024_writes_a_loadable_checkpoint(env, tmp_path):
    result = train(options(env, tmp_path, steps=1, resolution=1024, grad_checkpointing=True, lr=1e-3,
                           precision="bf16"))
    model = load_dimba(result["weights"])
    assert (model.config.base_size, model.config.pe_interpolation) == (64, 2.0)
    base = load_dimba(env["checkpoint"])
    changed = [k for k, v in model.state_dict().items() if k != "pos_embed" and not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 10


@pytest.mark.usefixtures("train_cache")
def test_full_finetune_saved_in_bf16_keeps_the_ssm_parameters_float32(env, tmp_path):
    from safetensors import safe_open

    result = train(options(env, tmp_path, steps=1, save_dtype="bf16"))
    with safe_open(str(result["weights"]), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    a_log = [k for k in dtypes if k.startswith("mamba_blocks.") and k.endswith(".mixer.A_log")]
    assert a_log and all(dtypes[k] == "F32" for k in a_log)
    assert dtypes["x_embedder.proj.weight"] == "BF16"


@pytest.mark.usefixtures("train_cache")
def test_the_log_records_the_lr_each_step_used(env, tmp_path):
    """Warm-up over 4 steps from lr 1e-3: step 1 trains at 1/4 of it, step 2 at 2/4 (not the next step's lr)."""
    train(options(env, tmp_path, steps=2, lora_rank=4, lr=1e-3, warmup_steps=4))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["lr"] == pytest.approx(1e-3 / 4) and log[1]["lr"] == pytest.approx(1e-3 * 2 / 4)


def test_bad_data_is_skipped_with_warnings_or_refused(tmp_path, write_images):
    good = write_images(tmp_path / "d", 2)
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(good / "gray.png")  # non-RGB: converted
    Image.fromarray(np.zeros((80, 80, 4), np.uint8)).save(good / "rgba.png")  # alpha: composited on white
    Image.fromarray(np.zeros((80, 80), np.uint16)).save(good / "deep.png")  # 16-bit: refused
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good / "tiny.png")
    (good / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(good / "nocaption.png")
    for name in ("gray", "rgba", "deep", "tiny", "broken"):
        (good / f"{name}.txt").write_text(name)
    with pytest.warns(UserWarning, match="without a same-name .txt caption: nocaption.png"):
        samples = find_samples(good)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [s for s, _ in usable_images(samples, min_side=32)]
    message = " ".join(str(w.message) for w in caught)
    assert {s.image.name for s in kept} == {"img0.png", "img1.png", "gray.png", "rgba.png"}
    assert "broken.png: unreadable" in message and "tiny.png: too small" in message
    assert "deep.png: unsupported mode" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images with captions found"):
        find_samples(tmp_path / "empty")
    with pytest.raises(ValueError, match="no usable training images"), pytest.warns(UserWarning):
        list(usable_images([s for s in samples if s.image.stem in ("tiny", "broken")], min_side=32))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"image": "d/img0.png", "caption": "x"}\n{"image": "d/img1.png"}\n')
    with pytest.raises(ValueError, match="line 2"):
        find_samples(jsonl)
    jsonl.write_text('{"image": "d/img0.png", "caption": " x "}\n\n')
    assert [(s.image, s.caption) for s in find_samples(jsonl)] == [(good / "img0.png", "x")]


def test_cli_refuses_an_empty_folder_before_training(env, tmp_path, capsys):
    from dimba_core.__main__ import main

    (tmp_path / "empty").mkdir()
    argv = ["train", "--checkpoint", str(env["checkpoint"]), "--data", str(tmp_path / "empty"), "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    assert "no images with captions found" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert main(argv + ["--batch-size", "3", "--grad-accum", "2"]) == 2
    assert "must be a positive multiple" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", float("nan")), ("lr", -1.0), ("lora_rank", -1),
                                          ("ema_decay", 2.0), ("class_dropout_prob", 1.5),
                                          ("max_grad_norm", float("inf")), ("seed", -3), ("warmup_steps", -1),
                                          ("grad_accum", 0), ("lora_alpha", 0.0)])
def test_impossible_options_are_refused_before_loading(field, value):
    from dimba_core.train.loop import TrainOptions

    with pytest.raises(ValueError, match=f"--{field.replace('_decay', '').replace('_', '-')} must be"):
        TrainOptions(checkpoint="missing.safetensors", data="missing", out="out", **{field: value})
