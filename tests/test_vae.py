"""Tests for headless VAE loading: diffusers folder vs LDM single file, scaling, sizes."""

import re

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from dimba_core.vae import SDXL_SCALING_FACTOR, ldm_to_diffusers, load_vae  # noqa: E402

TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.5)


def to_ldm(state):
    """diffusers AutoencoderKL keys → original LDM keys (test-side inverse of the loader's renaming)."""
    ups = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{ups - 1 - int(m[1])}.", key)
        for a, b in [(r"\.down_blocks\.", ".down."), (r"\.up\.(\d+)\.resnets\.", r".up.\1.block."),
                     (r"\.down\.(\d+)\.resnets\.", r".down.\1.block."),
                     (r"\.downsamplers\.0\.", ".downsample."), (r"\.upsamplers\.0\.", ".upsample."),
                     (r"\.mid_block\.resnets\.0\.", ".mid.block_1."), (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
                     (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
                     (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
                     (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
                     (r"\.conv_shortcut\.", ".nin_shortcut."), (r"\.conv_norm_out\.", ".norm_out.")]:
            new = re.sub(a, b, new)
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny random AutoencoderKL saved as a diffusers folder; returns (model, folder)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # randomise norms and biases too, so every path matters
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def latents():
    """Scaled latents B×4×8×6 (non-square)."""
    return torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))


def test_ldm_file_has_ldm_names(tiny_vae):
    ldm = to_ldm(tiny_vae[0].state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight",
                "decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.q.weight", "decoder.norm_out.bias"):
        assert key in ldm, key
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert ldm_to_diffusers(ldm).keys() == tiny_vae[0].state_dict().keys()


def test_folder_decode_size_and_range(tiny_vae, latents):
    vae = load_vae(tiny_vae[1])
    assert vae.scaling_factor == 0.5 and vae.latent_channels == 4
    images = vae.decode(latents)
    assert images.shape == (2, 3, 64, 48) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        raw = tiny_vae[0].decode(latents / 0.5).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_ldm_file_matches_folder(tiny_vae, latents, tmp_path, prefix):
    path = tmp_path / "tiny_vae_ldm.safetensors"
    extra = {"model_ema.decay": torch.ones(1)} if prefix else {}
    save_file({**extra, **{prefix + k: v for k, v in to_ldm(tiny_vae[0].state_dict()).items()}}, str(path))
    single = load_vae(path, scaling_factor=0.5, config={"norm_num_groups": 4})
    folder = load_vae(tiny_vae[1])
    torch.testing.assert_close(single.decode(latents), folder.decode(latents), rtol=0, atol=1e-6)
    images = folder.decode(latents)
    torch.testing.assert_close(single.encode(images), folder.encode(images), rtol=0, atol=1e-6)
    assert single.encode(images).shape == (2, 4, 8, 6)


def test_single_file_default_scaling_is_sdxl(tiny_vae, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(to_ldm(tiny_vae[0].state_dict()), str(path))
    assert load_vae(path, config={"norm_num_groups": 4}).scaling_factor == SDXL_SCALING_FACTOR == 0.13025
    assert load_vae(tiny_vae[1], scaling_factor=0.18215).scaling_factor == 0.18215


def test_diffusers_named_single_file(tiny_vae, latents, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vae[0].state_dict().items()}, str(path))
    single = load_vae(path, scaling_factor=0.5, config={"norm_num_groups": 4})
    torch.testing.assert_close(single.decode(latents), load_vae(tiny_vae[1]).decode(latents), rtol=0, atol=1e-6)


def test_bad_files_name_the_problem(tiny_vae, tmp_path):
    ldm = to_ldm(tiny_vae[0].state_dict())
    ldm.pop("decoder.up.3.upsample.conv.weight")
    path = tmp_path / "broken_vae.safetensors"
    save_file(ldm, str(path))
    with pytest.raises(ValueError, match="up_blocks.0.upsamplers.0.conv.weight"):
        load_vae(path, config={"norm_num_groups": 4})
    other = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a VAE"):
        load_vae(other)


def test_bfloat16_decode(tiny_vae, latents):
    vae = load_vae(tiny_vae[1], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    images = vae.decode(latents)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    torch.testing.assert_close(images, load_vae(tiny_vae[1]).decode(latents), rtol=0, atol=0.1)
