"""`python -m dimba_core generate` end to end on the tiny assets, and every argument mistake as one clear error."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimba_core.__main__ import main
from dimba_core.loader import save_safetensors
from dimba_core.pipeline import file_name
from dimba_core.resolution import parse_prompt
from dimba_core.tiny_assets import tiny_dimba, write_tiny_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("diffusers")
    paths = write_tiny_assets(tmp_path_factory.mktemp("assets"))
    return paths["checkpoint"], paths["t5"], paths["vae"]


def args_for(assets, out, *extra, checkpoint=None):
    ckpt, t5, vae = assets
    return ["generate", "--checkpoint", str(checkpoint or ckpt), "--t5", str(t5), "--vae", str(vae),
            "--steps", "2", "--out", str(out), *extra]


def run(assets, out, *extra, cwd=None):
    """The command as a user types it, in a fresh process started outside the checkout."""
    cmd = [sys.executable, "-m", "dimba_core", *args_for(assets, out, *extra)]
    return subprocess.run(cmd, cwd=cwd or out.parent, capture_output=True, text=True, timeout=300)


def test_generate_writes_pngs_of_the_requested_size(assets, tmp_path):
    from PIL import Image

    r = run(assets, tmp_path / "a", "--prompt", "a photo of a cat", "--width", "96", "--height", "64",
            "--batch", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    names = [file_name("a photo of a cat", 3, i) for i in range(2)]
    assert sorted(f.name for f in (tmp_path / "a").glob("*.png")) == names
    assert names[0].startswith("a_photo_of_a_cat_") and names[0].endswith("_s3_0.png")
    assert all(Image.open(tmp_path / "a" / n).size == (96, 64) for n in names)
    assert r.stdout.split() == [str(tmp_path / "a" / n) for n in names]

    for out, seed in (("b", "3"), ("c", "4")):
        assert main(args_for(assets, tmp_path / out, "--prompt", "a photo of a cat", "--width", "96", "--height",
                             "64", "--batch", "2", "--seed", seed)) == 0
    assert (tmp_path / "b" / names[0]).read_bytes() == (tmp_path / "a" / names[0]).read_bytes()  # same seed
    assert (tmp_path / "c" / file_name("a photo of a cat", 4, 0)).read_bytes() != (tmp_path / "a" / names[0]).read_bytes()


def test_prompt_suffixes_prompts_file_and_distinct_names(assets, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    same_start = "a" * 70
    lines = ["a red car --hw 32:64", "", "猫の写真 --hw 32:32", "東京の夜 --hw 32:32",
             same_start + " one --hw 32:32", same_start + " two --hw 32:32", "a red car --hw 32:64"]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(args_for(assets, tmp_path / "o", "--prompts-file", str(prompts), "--sampler", "ddim")) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 5  # the repeated line runs once; no name is shared
    assert Image.open(tmp_path / "o" / file_name("a red car --hw 32:64", 0, 0)).size == (64, 32)  # --hw exact
    assert parse_prompt("mountains --ar 1:2", 512) == ("mountains", (352, 704))  # --ar: the 512-px bucket
    assert file_name("猫の写真", 0, 0) != file_name("東京の夜", 0, 0)
    assert file_name("猫の写真", 0, 0).startswith("prompt_")

    again = run(assets, tmp_path / "o", "--prompt", "a red car --hw 32:64")
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert main(args_for(assets, tmp_path / "o", "--prompt", "a red car --hw 32:64", "--overwrite")) == 0


def test_nan_results_are_reported_not_saved(assets, tmp_path):
    model = tiny_dimba()
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    save_safetensors(model, tmp_path / "nan.safetensors")
    code = main(args_for(assets, tmp_path / "out", "--prompt", "x", "--width", "32", "--height", "32",
                         checkpoint=tmp_path / "nan.safetensors"))
    assert code == 2 and not list((tmp_path / "out").glob("*.png"))


def test_largest_seed_and_stochastic_samplers(assets, tmp_path):
    for sampler in ("iddpm", "sa_solver"):
        out = tmp_path / sampler
        assert main(args_for(assets, out, "--prompt", "x", "--width", "32", "--height", "32", "--sampler",
                             sampler, "--seed", str(2**64 - 1))) == 0
        assert len(list(out.glob(f"*_s{2**64 - 1}_0.png"))) == 1


def bad_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    return {
        "width not /16": (["--width", "100", "--height", "64"], "not divisible by 16"),
        "absurd width": (["--width", "16" + "0" * 20, "--height", "64"], "outside 16..4096"),
        "absurd --hw": (["--prompt", "x --hw 99999999999999999999999:16"], "outside 16..4096"),
        "--hw without w": (["--prompt", "x --hw 512"], "--hw height:width"),
        "--hw without value": (["--prompt", "x --hw"], "needs a value"),
        "--ar 0:4": (["--prompt", "x --ar 0:4"], "aspect ratio"),
        "--ar -1:2": (["--prompt", "x --ar -1:2"], "aspect ratio"),
        "--ar nan": (["--prompt", "x", "--ar", "nan"], "aspect ratio"),
        "--ar inf": (["--prompt", "x --ar inf"], "aspect ratio"),
        "--ar and --width": (["--prompt", "x", "--ar", "1:2", "--width", "512"], "not both"),
        "negative batch": (["--batch", "-1"], "batch"),
        "cfg nan": (["--cfg", "nan"], "finite"),
        "cfg inf": (["--cfg", "inf"], "finite"),
        "negative seed": (["--seed", "-1"], "seed"),
        "seed 2^64": (["--seed", str(2**64)], "seed"),
        "steps 0": (["--steps", "0"], "steps"),
        "cuda without CUDA": (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
                              "cuda"),
        "unknown device": (["--device", "banana"], "not a device name"),
        "unknown t5 device": (["--t5-device", "gpu0"], "not a device name"),
        "folder as prompts file": (["--prompts-file", str(tmp_path)], "is a folder"),
        "missing prompts file": (["--prompts-file", str(tmp_path / "nope.txt")], "no such file"),
        "non-UTF-8 prompts file": (["--prompts-file", str(latin1)], "not UTF-8"),
        "non-UTF-8 prompt": (["--prompt", "caf\udce9"], "not UTF-8"),
        "--out is a file": (["--out", str(a_file)], "is a file"),
        "--out under a file": (["--out", str(a_file / "sub")], "cannot create"),
        "missing lora": (["--lora", str(tmp_path / "nope.safetensors:0.5")], "no such file"),
        "lora strength nan": (["--lora", f"{a_file}:nan"], "finite"),
        "no prompt": ([], "--prompt"),
    }


def test_argument_mistakes_are_one_clear_error_before_anything_loads(assets, tmp_path, capsys):
    # The checkpoint is not a Dimba file: every case must fail on its argument before loading reaches it.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    for name, (extra, message) in bad_cases(tmp_path).items():
        own_prompt = name == "no prompt" or any(a in ("--prompt", "--prompts-file") for a in extra)
        argv = args_for(assets, tmp_path / "out", *([] if own_prompt else ["--prompt", "x"]), *extra,
                        checkpoint=junk)  # a repeated --out: the case's own, last one wins
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("error: ") and message in err and "junk" not in err, (name, err)


def test_cli_reports_file_errors_without_traceback(assets, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    ckpt, t5, vae = assets
    r = subprocess.run([sys.executable, "-m", "dimba_core", "generate", "--checkpoint", str(junk), "--t5", str(t5),
                        "--vae", str(vae), "--prompt", "x", "--out", str(tmp_path / "o")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "junk" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "dimba_core", "generate", "--checkpoint", str(ckpt), "--t5", str(t5),
                        "--vae", str(vae), "--prompt", "x", "--sampler", "nope", "--out", str(tmp_path / "o")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_bad_lora_and_vae_files_are_one_error_line(assets, tmp_path, capsys):
    """A NaN LoRA, a LoRA strength that overflows the weights, and a 16-channel VAE are each an `error:` line
    naming the file, exit code 2, no PNG (not "the model overflowed" after sampling, not a conv2d traceback)."""
    from safetensors.torch import save_file

    from test_pipeline import tiny_vae

    g = torch.Generator().manual_seed(0)
    lora = {"diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.randn(192, 2, generator=g) * 0.01,
            "diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.randn(2, 64, generator=g) * 0.01}
    save_file(lora, str(tmp_path / "ok.safetensors"))
    save_file({**lora, "diffusion_model.blocks.0.attn.qkv.alpha": torch.tensor(float("nan"))},
              str(tmp_path / "nan.safetensors"))
    vae16 = tmp_path / "flux_like_vae"
    tiny_vae(16, 0.3611).model.save_pretrained(vae16, safe_serialization=True)
    ckpt, t5, _ = assets
    cases = {"nan alpha": (["--lora", str(tmp_path / "nan.safetensors")], ["nan.safetensors", "alpha", "NaN"]),
             "strength 1e300": (["--lora", f"{tmp_path / 'ok.safetensors'}:1e300"],
                                ["ok.safetensors", "strength 1e+300", "blocks.0.attn.qkv.weight"]),
             "16-channel VAE": (["--vae", str(vae16)], [str(vae16), "16-channel latents", "SDXL VAE"])}
    for name, (extra, words) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        code = main(args_for(assets, out, "--prompt", "x", "--width", "32", "--height", "32", *extra))
        err = capsys.readouterr().err  # after transformers' "Loading weights" bar when T5 loaded first
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and err.count("error: ") == 1, (name, err)
        assert all(w in last for w in words) and "overflowed" not in err and "Traceback" not in err, (name, err)
        assert not list(out.glob("*.png")), name
    assert main(args_for(assets, tmp_path / "fine", "--prompt", "x", "--width", "32", "--height", "32", "--lora",
                         f"{tmp_path / 'ok.safetensors'}:0.5")) == 0


# Runs the command line in this process, then reports whether the trainer package was imported.
IMPORTS_TRAINER = """
import runpy, sys
sys.argv = ["dimba_core", *sys.argv[1:]]
try:
    runpy.run_module("dimba_core", run_name="__main__")
except SystemExit:
    pass
print("trainer imported:", "dimba_core.train" in sys.modules)
"""


@pytest.mark.parametrize("argv, trainer", [(["convert", "--help"], False), (["generate", "--seed", "x"], False),
                                           (["--help"], False), (["train", "--help"], True)])
def test_only_train_imports_the_trainer(tmp_path, argv, trainer):
    r = subprocess.run([sys.executable, "-c", IMPORTS_TRAINER, *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert f"trainer imported: {trainer}" in r.stdout, r.stdout + r.stderr
    if argv == ["--help"]:
        assert "train" in r.stdout and "fine-tune" in r.stdout
