"""The trainer on hostile input: every problem is one clear error (or a skip with a warning), never a traceback
from inside torch/PIL/safetensors, a silently wrong result or a lost file. Tiny random models, CPU."""
import json
import os
import shutil
import struct
import warnings
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dimba_core.loader import save_safetensors
from dimba_core.tiny_assets import tiny_dimba
from dimba_core.train import TrainOptions, train
from dimba_core.train.data import LatentCache, cache_key, find_samples, usable_images
from dimba_core.train.loop import TrainingDiverged, check_paths, prepare_cache, seed_for
from dimba_core.weights import DimbaLoadError
from test_train import options  # env, train_cache and write_images: tests/conftest.py's fixtures


def cli(argv, capsys):
    """(exit code, stderr) of `python -m dimba_core ...` run in this process."""
    from dimba_core.__main__ import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one `error: ...` line, with no traceback before it."""
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def train_argv(env, out, *extra):
    return ["train", "--checkpoint", str(env["checkpoint"]), "--data", str(env["data"]), "--out", str(out),
            "--cache-dir", str(env["cache"]), "--image-size", "64", "--batch-size", "4", "--optimizer", "adamw",
            "--warmup-steps", "0", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(env, train_cache):
    """A 2-step LoRA run with a checkpoint after each step."""
    out = env["root"] / "run"
    result = train(options(env, out, steps=2, save_every=1, lora_rank=4, lr=1e-3))
    return dict(result, out=out)


def copy_run(run, dest):
    shutil.copytree(run["out"], dest)
    return dest


# --- 1. resume ----------------------------------------------------------------------------------------

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("kind, message", [
    ("truncated", r"cannot read this checkpoint \(RuntimeError: PytorchStreamReader.*truncated or damaged"),
    ("hostile", r"refused to load: the pickle holds objects other than tensors"),
    ("model_pt", r"holds a model's weights, not a training checkpoint"),
    ("model_safetensors", r"is a \.safetensors weights file \(a model\), not a training checkpoint"),
    ("lora", r"is a \.safetensors weights file \(a LoRA\), not a training checkpoint"),
    ("text", r"cannot read this checkpoint"),
    ("list", r"holds a list, not a training checkpoint"),
    ("no_optimizer", r"is not a training checkpoint \(no optimizer\)"),
    ("bad_rng", r"its random state is malformed"),
])
def test_resume_refuses_what_is_not_a_training_checkpoint(env, run, tmp_path, kind, message):
    step = run["out"] / "checkpoints" / "step-0000001.pt"
    bad = tmp_path / f"{kind}.pt"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        bad.write_bytes(step.read_bytes()[: step.stat().st_size // 2])
    elif kind == "hostile":
        torch.save({"step": 1, "options": Evil(marker)}, bad)
    elif kind == "model_pt":
        torch.save(tiny_dimba().state_dict(), bad)
    elif kind == "model_safetensors":
        bad = env["checkpoint"]
    elif kind == "lora":
        bad = run["weights"]
    elif kind == "text":
        bad.write_text("hello world")
    elif kind == "list":
        torch.save([1, 2, 3], bad)
    else:
        state = torch.load(step, weights_only=True)
        if kind == "no_optimizer":
            del state["optimizer"]
        else:
            state["rng"]["torch"] = "not a tensor"
        torch.save(state, bad)
    with pytest.raises(DimbaLoadError, match=message) as caught:
        train(options(env, tmp_path / "out", steps=3, lora_rank=4, lr=1e-3, resume=str(bad)))
    assert "--resume takes a training checkpoint" in str(caught.value)
    assert not marker.exists()  # no pickled code ran
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or made


def test_resume_cli_is_one_error_line(env, run, tmp_path, capsys):
    code, err = cli(train_argv(env, tmp_path / "out", "--lora-rank", "4", "--resume", str(run["weights"])), capsys)
    assert code == 2
    assert "is a .safetensors weights file (a LoRA)" in error_line(err)


def test_resume_refuses_a_checkpoint_of_another_model_or_rank(env, run, tmp_path):
    step = str(run["out"] / "checkpoints" / "step-0000001.pt")
    other = tmp_path / "other.safetensors"
    save_safetensors(tiny_dimba(hidden_size=128), other)
    with pytest.raises(DimbaLoadError, match=r"written for another model or LoRA rank .*wrong shapes"):
        train(options(env, tmp_path / "a", checkpoint=str(other), steps=3, lora_rank=4, lr=1e-3, resume=step))
    with pytest.raises(ValueError, match=r"options differ.*lora_rank"):
        train(options(env, tmp_path / "b", steps=3, lora_rank=2, lr=1e-3, resume=step))
    with pytest.raises(ValueError, match="no checkpoint to continue from"):
        train(options(env, tmp_path / "c", steps=3, lora_rank=4, resume="latest"))


def test_resume_applies_a_new_lr_and_drops_later_log_records(env, run, tmp_path):
    out = copy_run(run, tmp_path / "out")
    (out / "checkpoints" / "step-0000002.pt").unlink()  # interrupted after step 2, checkpoint of step 1 kept
    with pytest.warns(UserWarning, match=r"--lr 0.0005 replaces the lr 0.001 of the run"):
        train(options(env, out, steps=2, lora_rank=4, lr=5e-4, resume="latest"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # step 2 of the first attempt is not kept twice
    assert log[0]["lr"] == 1e-3 and log[1]["lr"] == 5e-4


def test_resume_of_another_run_into_a_used_out_is_refused(env, run, tmp_path):
    out = copy_run(run, tmp_path / "other")
    step = run["out"] / "checkpoints" / "step-0000002.pt"
    with pytest.raises(ValueError, match=r"already holds .*, and --resume .*step-0000002.pt is not one of its"):
        train(options(env, out, steps=3, lora_rank=4, lr=1e-3, resume=str(step)))


def test_resume_refuses_to_branch_below_later_checkpoints(env, run, tmp_path):
    out = copy_run(run, tmp_path / "out")
    with pytest.raises(ValueError, match=r"already holds later steps \(step-0000002.pt\)"):
        train(options(env, out, steps=3, lora_rank=4, lr=1e-3, resume=str(out / "checkpoints" / "step-0000001.pt")))


# --- 2. output over input, a used --out -----------------------------------------------------------------

def test_an_output_that_is_an_input_is_refused(env, tmp_path):
    folder = tmp_path / "D"
    folder.mkdir()
    ckpt = folder / "dimba_finetuned.safetensors"
    shutil.copyfile(env["checkpoint"], ckpt)
    before = ckpt.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"is the file .*dimba_finetuned.safetensors that this run writes"):
            train(options(env, folder, checkpoint=str(ckpt), steps=1, overwrite=overwrite))
    assert ckpt.read_bytes() == before
    jsonl = tmp_path / "E" / "log.jsonl"  # the data is the run's own log
    jsonl.parent.mkdir()
    jsonl.write_text(json.dumps({"image": str(env["data"] / "img0.png"), "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="--data .*log.jsonl is the file"):
        train(options(env, jsonl.parent, data=str(jsonl), steps=1))
    cache = tmp_path / "C"  # the latent cache would replace the checkpoint
    cache.mkdir()
    shutil.copyfile(env["checkpoint"], cache / "cache.safetensors")
    with pytest.raises(ValueError, match="--checkpoint .*cache.safetensors is the file"):
        train(options(env, tmp_path / "F", checkpoint=str(cache / "cache.safetensors"), cache_dir=str(cache)))
    os.symlink(env["checkpoint"], tmp_path / "link.safetensors")  # the same file under another name
    (tmp_path / "G").mkdir()
    os.symlink(env["checkpoint"], tmp_path / "G" / "dimba_lora.safetensors")
    with pytest.raises(ValueError, match="that this run writes"):
        train(options(env, tmp_path / "G", checkpoint=str(tmp_path / "link.safetensors"), overwrite=True))
    with pytest.raises(ValueError, match="is the --data folder"):
        train(options(env, env["data"], overwrite=True))
    assert env["checkpoint"].is_file()


def test_a_used_out_needs_resume_or_overwrite(env, run, tmp_path, capsys):
    code, err = cli(train_argv(env, run["out"], "--lora-rank", "4", "--steps", "2"), capsys)
    assert code == 2
    line = error_line(err)
    assert "already holds checkpoints/, dimba_lora.safetensors, log.jsonl" in line and "--overwrite" in line
    (tmp_path / "only_cache" / "cache").mkdir(parents=True)  # a cache alone is reused, not refused
    check_paths(options(env, tmp_path / "only_cache"))


def test_overwrite_starts_clean_and_keeps_other_files(env, run, tmp_path):
    out = copy_run(run, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    torch.save({}, out / "checkpoints" / "step-0000009.pt")  # a later step of the old run
    result = train(options(env, out, steps=1, lora_rank=4, lr=1e-3, overwrite=True))
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001.pt"]
    assert (out / "notes.txt").read_text() == "mine" and result["weights"].is_file()


# --- 3. training data ---------------------------------------------------------------------------------

def png_header(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_with_a_warning(tmp_path, write_images):
    data = write_images(tmp_path / "d", 1)
    png_header(data / "bomb.png", 30000, 30000)
    (data / "bomb.txt").write_text("boom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [s.image.name for s, _ in usable_images(find_samples(data), min_side=32)]
    assert kept == ["img0.png"]
    assert "bomb.png: too large (Image size (900000000 pixels) exceeds limit" in str(caught[-1].message)


@pytest.mark.parametrize("row, message", [
    ('{"image": null, "caption": "x"}', r"line 2: 'image' must be the path of an image file \(a string\), got null"),
    ('{"image": 7, "caption": "x"}', r"line 2: 'image' must be .*got a number \(7\)"),
    ('{"image": ["a.png"], "caption": "x"}', r"line 2: 'image' must be .*got a list"),
    ('{"image": "", "caption": "x"}', r"line 2: 'image' must be .*got ''"),
    ('{"image": "a\\u0000.png", "caption": "x"}', r"line 2: 'image' must be"),
    ('{"image": "d/img0.png", "caption": null}', r"line 2: 'caption' must be text \(a string\), got null"),
    ('{"image": "d/img0.png", "caption": 3}', r"line 2: 'caption' must be text"),
    ('{"image": "d/img0.png", "caption": "\\ud800"}', r"line 2: 'caption' holds an unpaired surrogate"),
    ('["d/img0.png", "x"]', r"line 2: expected a JSON object .*got a JSON a list"),
])
def test_bad_jsonl_rows_name_the_line(tmp_path, row, message, write_images):
    write_images(tmp_path / "d", 1)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"image": "d/img0.png", "caption": "ok"}\n' + row + "\n")
    with pytest.raises(ValueError, match=message):
        find_samples(jsonl)


def test_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl line 2: not UTF-8 text \(bad byte 0xe9\)"):
        find_samples(jsonl)
    jsonl.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "caption": "ok"}\n')  # a BOM is fine
    assert [s.caption for s in find_samples(jsonl)] == ["ok"]


def small_cache(folder, key="k", **changes):
    tensors = dict(mean=torch.zeros(2, 4, 8, 8), std=torch.ones(2, 4, 8, 8), tokens=torch.zeros(5, 64),
                   lengths=torch.tensor([2, 3]))
    LatentCache(**tensors, scaling_factor=0.13).save(folder, key)
    if changes:
        with safe_open(str(folder / "cache.safetensors"), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v for k, v in {**t, **changes}.items() if v is not None}, str(folder / "cache.safetensors"),
                  metadata=meta)
    return folder / "cache.safetensors"


@pytest.mark.parametrize("damage, why", [
    ("truncate", "unreadable: truncated or corrupt"),
    ("lengths", "caption lengths add up to 11 tokens, 5 are stored"),
    ("missing", "no tokens tensor"),
    ("nan", "mean holds NaN"),
])
def test_a_damaged_cache_is_ignored_with_a_warning(tmp_path, damage, why):
    if damage == "truncate":
        path = small_cache(tmp_path)
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "lengths":
        small_cache(tmp_path, lengths=torch.tensor([2, 9]))
    elif damage == "missing":
        small_cache(tmp_path, tokens=None)
    else:
        small_cache(tmp_path, mean=torch.full((2, 4, 8, 8), float("nan")))
    with pytest.warns(UserWarning, match=f"cache.safetensors is damaged \\([^)]*{why}"):
        assert LatentCache.load(tmp_path, "k") is None
    small_cache(tmp_path / "fine")
    assert len(LatentCache.load(tmp_path / "fine", "k")) == 2


def test_a_foreign_file_named_like_the_cache_is_refused_not_replaced(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "cache.safetensors"))  # no metadata at all
    with pytest.raises(ValueError, match="is not a latent cache of `dimba_core train`"):
        LatentCache.load(tmp_path, "k")


def test_a_truncated_cache_is_rebuilt(env, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.warns(UserWarning, match="is damaged"):
        result = train(options(env, tmp_path / "out", cache_dir=str(cache), steps=1, lora_rank=4))
    assert result["weights"].is_file() and len(LatentCache.load(cache)) == 4


# --- 4. options, checked before anything loads ---------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("image_size", 0, "--image-size must be a multiple of 16 px from 16 to 4096"),
    ("image_size", -64, "--image-size must be"),
    ("image_size", 24, "--image-size must be"),
    ("image_size", 8192, "--image-size must be"),
    ("seed", 2 ** 64, r"--seed must be a whole number from 0 to 2\^64 - 1"),
    ("device", "gpu", "--device 'gpu' is not a device name"),
    ("device", "cuda:banana", "--device 'cuda:banana' is not a device name"),
    ("t5_dtype", "fp64", "--t5-dtype must be one of bf16, fp16, fp32"),
    ("precision", "fp8", "--precision must be one of"),
    ("resolution", 768, "--resolution must be one of 512, 1024, 2048"),
    ("overwrite", True, "give one of them"),
])
def test_more_impossible_options_are_refused_before_loading(field, value, message):
    extra = {"resume": "latest"} if field == "overwrite" else {}
    with pytest.raises(ValueError, match=message):
        TrainOptions(checkpoint="missing.safetensors", data="missing", out="out", **{field: value}, **extra)


@pytest.mark.parametrize("device", ["mps", "cuda"])
def test_a_device_this_machine_lacks_is_refused(device):
    available = torch.backends.mps.is_available() if device == "mps" else torch.cuda.is_available()
    if available:
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ValueError, match=f"--device '{device}': this PyTorch .* sees no {device} device"):
        TrainOptions(checkpoint="c", data="d", out="o", device=device)


def test_seed_none_and_an_overlong_max_length_are_refused(env, tmp_path):
    with pytest.raises(ValueError, match="--seed must be a whole number from 0 to 2"):
        TrainOptions(checkpoint="c", data="d", out="o", seed=None)
    with pytest.raises(ValueError, match=r"max_length 301 is longer than the model's captions \(300 tokens"):
        train(options(env, tmp_path / "out", max_length=301, lora_rank=4))


def test_the_largest_seed_trains_and_seeds_differ_beyond_32_bits():
    TrainOptions(checkpoint="c", data="d", out="o", seed=2 ** 64 - 1)
    torch.manual_seed(2 ** 64 - 1)
    assert seed_for(2 ** 32 + 1, 0, 0) != seed_for(1, 0, 0)


def test_out_that_is_a_file_fails_before_the_encoders(env, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code, err = cli(train_argv(env, tmp_path / "out", "--cache-dir", str(tmp_path / "cache"), "--t5",
                               str(env["t5"]), "--vae", str(env["vae"])), capsys)
    assert code == 2 and "--out" in error_line(err) and "is a file" in error_line(err)
    assert not (tmp_path / "cache").exists()
    code, err = cli(train_argv(env, tmp_path / "o2", "--image-size", "-64"), capsys)
    assert code == 2 and "--image-size must be" in error_line(err) and not (tmp_path / "o2").exists()


def test_a_vae_with_other_latent_channels_fails_before_encoding(env, tmp_path):
    from dimba_core.tiny_assets import sd_vae_shapes

    shapes = sd_vae_shapes(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v, generator=gen) * 0.02 for k, v in shapes.items()}, str(tmp_path / "vae16.safetensors"))
    with pytest.raises(ValueError, match="makes 16-channel latents but the model takes 4"):
        train(options(env, tmp_path / "out", vae=str(tmp_path / "vae16.safetensors"), cache_dir=str(tmp_path / "c"),
                      steps=1, lora_rank=4))
    assert not (tmp_path / "c" / "cache.safetensors").exists()


def test_a_lora_rank_above_a_layer_is_its_full_rank_at_the_same_scale():
    from dimba_core.train.lora import LoRANetwork

    model = tiny_dimba()
    lora = LoRANetwork(model, 8, alpha=16)
    reduced = lora.reduced_ranks()
    assert reduced and all(n.endswith(("dt_proj", "dt_proj_b")) and r == 4 for n, r in reduced.items())
    assert {layer.scale for _, layer in lora.items()} == {2.0}  # alpha / rank everywhere, as asked


# --- 5. non-finite training ---------------------------------------------------------------------------

@pytest.mark.usefixtures("train_cache")
def test_a_diverging_run_stops_and_writes_nothing_non_finite(env, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(train_argv(env, out, "--lora-rank", "4", "--lr", "1e10", "--steps", "8", "--save-every", "1"),
                    capsys)
    assert code == 2
    assert "training diverged: the loss was NaN or infinite in 3 steps in a row" in error_line(err)
    assert not list(out.glob("dimba_lora*.safetensors"))
    for path in (out / "checkpoints").glob("step-*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["trained"].values()), path
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] is True and log[-1]["loss"] is None


def test_non_finite_weights_are_never_written(tmp_path):
    from dimba_core.train.loop import _check_finite

    with pytest.raises(TrainingDiverged, match="hold NaN or infinite values at step 3, so they are not written"):
        _check_finite([torch.ones(2), torch.tensor([1.0, float("inf")])], None, torch.device("cpu"), 1, tmp_path, 3)
    _check_finite([torch.ones(2)], {"a": torch.zeros(1)}, torch.device("cpu"), 1, tmp_path, 3)


def test_weights_that_overflow_the_save_dtype_are_not_written(env, tmp_path):
    from dimba_core.train.loop import _check_fits, write_outputs

    with pytest.raises(TrainingDiverged, match="does not fit in --save-dtype fp16"):
        _check_fits({"w": torch.tensor([1.0, 1e6])}, torch.float16, "fp16")
    _check_fits({"w": torch.tensor([1.0, 1e6])}, torch.bfloat16, "bf16")
    model = tiny_dimba()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["x_embedder.proj.weight"][0, 0, 0, 0] = 1e6
    opts = options(env, tmp_path, save_dtype="fp16", ema_decay=0.5)
    with pytest.raises(TrainingDiverged, match="x_embedder.proj.weight does not fit"):
        write_outputs(opts, model, None, {"x_embedder.proj.weight": sd["x_embedder.proj.weight"]}, 0,
                      model.state_dict())
    assert not list(tmp_path.iterdir())  # neither the weights nor the EMA file


# --- 6. T5 dtype --------------------------------------------------------------------------------------

@pytest.mark.usefixtures("train_cache")
def test_the_cache_knows_the_t5_dtype(env, tmp_path):
    samples = find_samples(env["data"])
    key = cache_key(samples, 64, 300)
    bf16 = json.dumps([str(env["t5"]), str(env["vae"]), "bf16"])
    assert LatentCache.load(env["cache"], key, bf16).tokens.dtype == torch.bfloat16  # the default
    opts = options(env, tmp_path / "out", cache_dir=str(tmp_path / "c"), t5_dtype="fp32")
    assert prepare_cache(opts, 0, 1, torch.device("cpu"), 64).tokens.dtype == torch.float32
    assert LatentCache.load(tmp_path / "c", key, bf16) is None  # an fp32 cache is not reused for a bf16 run
