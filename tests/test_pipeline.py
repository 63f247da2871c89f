"""DimbaPipeline with a tiny random model and stand-in text encoder / VAE: encoding reuse and sizes."""
import pytest
import torch

from dimba_core import Dimba, DimbaConfig, DimbaPipeline
from dimba_core.resolution import aspect_ratios, closest_bucket, parse_prompt, parse_ratio
from dimba_test_helpers import TINY


class CountingEncoder:
    """T5 stand-in: a fixed embedding per text (mask all ones); counts what it encodes."""

    hidden_size = 16

    def __init__(self):
        self.seen = []

    def encode(self, texts, max_length=8):
        self.seen += texts
        g = torch.Generator().manual_seed(sum(map(ord, texts[0])))
        return torch.randn(1, max_length, self.hidden_size, generator=g), torch.ones(1, max_length, dtype=torch.long)


class ShapeVAE:
    """VAE stand-in: records the latent shape and returns grey images of the decoded size."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.latents = []

    def decode(self, latents):
        self.latents.append(latents.clone())
        return torch.full((latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8), 0.5)


def pipeline():
    torch.manual_seed(0)
    model = Dimba(DimbaConfig(**TINY)).eval()
    return DimbaPipeline(model, CountingEncoder(), ShapeVAE(), device="cpu")


def test_negative_prompt_is_encoded_once_while_it_stays_the_same():
    pipe = pipeline()
    for prompt in ("a", "b"):
        pipe(prompt, negative="blurry", width=32, height=32, steps=1)
    pipe("c", negative="dark", width=32, height=32, steps=1)
    assert pipe.text_encoder.seen == ["a", "blurry", "b", "c", "dark"]
    fresh = pipeline()
    fresh("b", negative="blurry", width=32, height=32, steps=1)
    assert torch.equal(fresh.vae.latents[0], pipe.vae.latents[1])  # reuse changes nothing


def test_aspect_ratio_argument_uses_the_prompt_suffix_buckets():
    """`aspect_ratio` (the CLI's --ar) and a `--ar` prompt suffix give the same size, even for a checkpoint
    whose native size has no bucket table of its own (this one is 64 px: the 1024 table)."""
    pipe = pipeline()
    pipe("x", aspect_ratio="2:1", steps=1)
    pipe("x --ar 2:1", steps=1)
    h, w = parse_prompt("x --ar 2:1", 1024)[1]
    assert [tuple(z.shape[2:]) for z in pipe.vae.latents] == [(h // 8, w // 8)] * 2


def tiny_vae(latent_channels=4, scaling_factor=0.13025):
    """A small random diffusers AutoencoderKL wrapped as dimba_core's VAE."""
    diffusers = pytest.importorskip("diffusers")
    from dimba_core.vae import VAE

    model = diffusers.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                    latent_channels=latent_channels, scaling_factor=scaling_factor,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2)
    return VAE(model, scaling_factor)


def test_sizes_of_zero_are_refused_not_replaced():
    pipe = pipeline()
    for size in (dict(width=0), dict(height=0), dict(width=0, height=0), dict(width=0, height=32)):
        with pytest.raises(ValueError, match=r"0 px is outside 16\.\.4096"):
            pipe("x", steps=1, **size)
    assert not pipe.vae.latents and not pipe.text_encoder.seen  # refused before anything ran


@pytest.mark.parametrize("args", [dict(prompt=3), dict(prompt=None), dict(prompt=["a", "b"]), dict(prompt=b"x"),
                                  dict(prompt="x", negative=None), dict(prompt="x", negative=0.5)])
def test_prompts_must_be_strings(args):
    pipe = pipeline()
    with pytest.raises(ValueError, match="prompts must be strings"):
        pipe(**args, width=32, height=32, steps=1)
    assert not pipe.text_encoder.seen


def test_extreme_aspect_ratios_take_the_end_buckets():
    """h/w beyond the table (up to float overflow to infinity) is the tallest or widest bucket; |r - ratio| alone
    ties in float for huge ratios and picked the widest bucket for the tallest request."""
    table = aspect_ratios(1024)
    tallest, widest = table[max(table)], table[min(table)]
    for text in ("1e30:1", "1e300:1e-300", "1e308", "4.5", "9999:1"):
        assert parse_prompt(f"x --ar {text}")[1] == closest_bucket(parse_ratio(text)) == tallest, text
    for text in ("1:1e30", "1e-300:1e300", "1e-320", "0.1"):
        assert parse_prompt(f"x --ar {text}")[1] == closest_bucket(parse_ratio(text)) == widest, text
    assert closest_bucket(float("inf")) == tallest and closest_bucket(0.0) == widest
    assert all(closest_bucket(r) == hw for r, hw in table.items())  # inside the table: unchanged
    assert closest_bucket(0.26) == table[0.25] and closest_bucket(1.6) == table[1.67]
    with pytest.raises(ValueError, match="aspect ratio"):
        closest_bucket(float("nan"))
    pipe = pipeline()
    pipe("x --ar 1e30:1", steps=1)
    pipe("x", aspect_ratio="1e30:1", steps=1)
    assert [tuple(z.shape[2:]) for z in pipe.vae.latents] == [(tallest[0] // 8, tallest[1] // 8)] * 2


def test_vae_with_other_latent_channels_or_sd_scaling_is_refused(tmp_path, monkeypatch):
    """A 16-channel (SD3 / Flux) VAE failed after sampling with a conv2d traceback, the SD 1.x VAE (0.18215)
    gave wrong colours silently: both are refused when the pipeline is built, from_files naming the VAE path
    before T5 loads."""
    from dimba_core import DimbaLoadError, save_safetensors, text
    from dimba_core.pipeline import check_vae

    model = pipeline().model
    with pytest.raises(DimbaLoadError, match=r"the VAE: a VAE with 16-channel latents.*have 4 channels"):
        DimbaPipeline(model, CountingEncoder(), tiny_vae(16, 1.5305))
    with pytest.raises(DimbaLoadError, match=r"scaling_factor is 0\.18215, the SD 1\.x/2\.x VAE's.*SDXL VAE"):
        DimbaPipeline(model, CountingEncoder(), tiny_vae(4, 0.18215))
    check_vae(model, tiny_vae())  # the SDXL VAE's channels and scaling
    save_safetensors(model, tmp_path / "dimba.safetensors")
    monkeypatch.setattr(text.T5TextEncoder, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("T5 loaded before the VAE was checked")))
    for channels, scale, word in ((16, 1.5305, "16-channel latents"), (4, 0.18215, "0.18215")):
        folder = tmp_path / f"vae_{channels}_{scale}"
        tiny_vae(channels, scale).model.save_pretrained(folder, safe_serialization=True)
        with pytest.raises(DimbaLoadError) as err:
            DimbaPipeline.from_files(tmp_path / "dimba.safetensors", tmp_path, folder, device="cpu")
        assert str(folder) in str(err.value) and word in str(err.value), str(err.value)
