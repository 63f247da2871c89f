"""`python -m dimba_core generate` end to end on tiny random assets."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "t5"
pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(), reason="T5 tokenizer not found")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from dimba_core.tiny_assets import write_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    paths = write_tiny_assets(out, TOKENIZER)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(out / "vae")
    return paths["checkpoint"], paths["t5"], out / "vae"


def generate(assets, out, *args):
    ckpt, t5, vae = assets
    cmd = [sys.executable, "-m", "dimba_core", "generate", "--checkpoint", str(ckpt), "--t5", str(t5),
           "--vae", str(vae), "--steps", "3", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generate_writes_pngs_of_the_requested_size(assets, tmp_path):
    from PIL import Image

    r = generate(assets, tmp_path / "a", "--prompt", "a photo of a cat", "--width", "96", "--height", "64",
                 "--batch", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "a").glob("*.png"))
    assert [f.name for f in files] == ["a_photo_of_a_cat_s3_0.png", "a_photo_of_a_cat_s3_1.png"]
    assert all(Image.open(f).size == (96, 64) for f in files)

    again = generate(assets, tmp_path / "b", "--prompt", "a photo of a cat", "--width", "96", "--height", "64",
                     "--batch", "2", "--seed", "3")
    other = generate(assets, tmp_path / "c", "--prompt", "a photo of a cat", "--width", "96", "--height", "64",
                     "--batch", "2", "--seed", "4")
    assert again.returncode == 0 and other.returncode == 0
    assert (tmp_path / "b" / files[0].name).read_bytes() == files[0].read_bytes()  # same seed, same bytes
    assert (tmp_path / "c" / "a_photo_of_a_cat_s4_0.png").read_bytes() != files[0].read_bytes()


def test_prompt_suffixes_and_prompts_file(assets, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car --hw 32:64\n\nmountains --ar 1:2\n")
    r = generate(assets, tmp_path / "o", "--prompts-file", str(prompts), "--sampler", "ddim")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o" / "a_red_car_s0_0.png").size == (64, 32)  # --hw h:w is exact
    assert Image.open(tmp_path / "o" / "mountains_s0_0.png").size == (704, 352)  # 512-px bucket 0.5


def test_bad_size_and_sampler_are_clear_errors(assets, tmp_path):
    r = generate(assets, tmp_path, "--prompt", "x", "--width", "100", "--height", "64")
    assert r.returncode == 2 and "not divisible by 16" in r.stderr and "Traceback" not in r.stderr
    r = generate(assets, tmp_path, "--prompt", "x", "--sampler", "nope")
    assert r.returncode != 0 and "invalid choice: 'nope'" in r.stderr
