"""The data a run steps through: its latent cache (found, or encoded once) and the batch of each step."""
from __future__ import annotations

import functools
import json

import torch

from ..dtypes import torch_dtype
from .data import LatentCache, cache_key, encode_samples, find_samples, usable_images
from .files import cache_folder
from .objective import NUM_TIMESTEPS
from .options import TrainOptions
from .parallel import barrier


def seed_for(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence mixing: nearby inputs give unrelated
    streams); each part counts whole (a part of 2^32 or more as several 32-bit words)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def prepare_cache(opts: TrainOptions, rank: int, world: int, device, image_size: int, config=None) -> LatentCache:
    """Rank 0 finds the cache of the data, or checks and encodes the data once (T5 + VAE, then freed); the other
    ranks then read the cache.

    A cache made from the same files (by their size and time), captions and crop size is reused, without opening
    an image; without --t5/--vae with any encoders, with them only if it was made by the same ones (and T5 dtype).
    A damaged cache is encoded again (with a warning). config: the model's, to check the encoders against.
    """
    folder = cache_folder(opts)
    cache = None
    if rank == 0:
        samples = find_samples(opts.data)
        key = cache_key(samples, image_size, opts.max_length)
        encoders = json.dumps([str(opts.t5), str(opts.vae), opts.t5_dtype]) if opts.t5 and opts.vae else None
        cache = LatentCache.load(folder, key, encoders)
        if cache is None:
            cache = encode_to(folder, key, encoders, samples, opts, device, image_size, config)
    barrier(world)
    if cache is None:  # the other ranks read what rank 0 found or wrote
        cache = LatentCache.load(folder)
    if cache is None:
        raise RuntimeError(f"no latent cache in {folder}")
    return cache


def encode_to(folder, key, encoders, samples, opts: TrainOptions, device, image_size: int,
              config=None) -> LatentCache:
    """Encode the usable samples with T5 (in --t5-dtype) and the VAE (each image decoded once, the unusable
    skipped with a warning), save the cache, free both encoders; returns the cache. The VAE's latent channels and
    T5's width are checked against the model's config before anything is encoded."""
    import gc
    import itertools

    from ..text import T5TextEncoder
    from ..vae import load_vae

    images = usable_images(samples, min_side=max(1, image_size // 2))
    first = next(images)  # a set without a usable image is refused here, before the encoders load
    if not opts.t5 or not opts.vae:
        raise ValueError("the first run on a data set needs --t5 and --vae to encode it "
                         f"(no usable cache for it in {folder})")
    vae = load_vae(opts.vae, device=device, dtype=torch.float32)
    if config is not None and vae.latent_channels != config.in_channels:
        raise ValueError(f"--vae {opts.vae} makes {vae.latent_channels}-channel latents but the model takes "
                         f"{config.in_channels}: use the VAE the checkpoint was trained with (the SDXL VAE for "
                         "the published Dimba models)")
    if opts.t5_dtype == "fp16" and device.type == "cpu":
        import warnings

        warnings.warn("--t5-dtype fp16 on the CPU is very slow (CPUs have no fast fp16 matmuls); bf16 is as small "
                      "and fast", stacklevel=2)
    t5 = T5TextEncoder.from_pretrained(opts.t5, tokenizer=opts.tokenizer, device=device,
                                       dtype=torch_dtype(opts.t5_dtype))
    if config is not None:
        try:
            config.check_caption_width(t5.hidden_size)
        except ValueError as err:
            raise ValueError(f"--t5 {opts.t5}: {err}") from None
    cache = encode_samples(itertools.chain([first], images), image_size, t5, vae, batch_size=opts.encode_batch_size,
                           max_length=opts.max_length, progress=opts.progress, total=len(samples))
    cache.save(folder, key, encoders)
    del t5, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cache


class Batches:
    """The batch of each step: per global sample k of step s, its dataset index, timestep, noise, posterior draw
    and caption dropout.

    Everything is drawn from generators seeded by (seed, step, k), so the batch does not depend on how many
    processes share it, and a resumed run continues exactly.
    """

    def __init__(self, cache: LatentCache, seed: int, batch_size: int, dropout: float):
        self.cache, self.seed, self.batch_size, self.dropout = cache, seed, batch_size, dropout
        self._perm: dict = {}

    def index(self, step: int, k: int) -> int:
        """The dataset index of global sample k of step s: each epoch one permutation of the cache."""
        epoch, i = divmod(step * self.batch_size + k, len(self.cache))
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(seed_for(self.seed, 0xDA7A, epoch))
            self._perm = {epoch: torch.randperm(len(self.cache), generator=g)}
        return int(self._perm[epoch][i])

    def batch(self, step: int, ks, null_caption: torch.Tensor, device):
        """x_start, t, y (b x 1 x L x C), mask, noise for the global samples ks of this step; null_caption:
        the learned null caption (L x C, float32 on the CPU)."""
        xs, ts, noises, caps, drops = [], [], [], [], []
        shape = self.cache.mean.shape[1:]
        for k in ks:
            g = torch.Generator().manual_seed(seed_for(self.seed, step, k))
            i = self.index(step, k)
            ts.append(int(torch.randint(0, NUM_TIMESTEPS, (1,), generator=g)))
            xs.append(self.cache.latent(i, torch.randn(shape, generator=g)))
            noises.append(torch.randn(shape, generator=g))
            drops.append(bool(torch.rand(1, generator=g) < self.dropout))
            caps.append(self.cache.caption(i))
        length = max(c.shape[0] for c in caps)
        y = torch.zeros(len(ks), length, caps[0].shape[1])
        mask = torch.zeros(len(ks), length, dtype=torch.long)
        for j, c in enumerate(caps):
            y[j, : c.shape[0]], mask[j, : c.shape[0]] = c, 1
            if drops[j]:  # the learned null caption, with the caption's own mask (as the reference)
                y[j] = null_caption[:length]
        to = functools.partial(torch.Tensor.to, device=device)
        return (to(torch.stack(xs)), to(torch.tensor(ts)), to(y[:, None]), to(mask), to(torch.stack(noises)))
