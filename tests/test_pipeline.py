"""DimbaPipeline with a tiny random model and stand-in text encoder / VAE: encoding reuse and sizes."""
import torch

from dimba_core import Dimba, DimbaConfig, DimbaPipeline
from dimba_core.resolution import parse_prompt


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
    model = Dimba(DimbaConfig(hidden_size=32, depth=2, num_heads=2, caption_channels=16, model_max_length=8,
                              base_size=4)).eval()
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
