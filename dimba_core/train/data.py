"""Training data: image/caption pairs (folder or JSONL), checked while encoded once into a latent/caption cache."""
from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1


@dataclass
class Sample:
    """One training image and its caption."""

    image: Path
    caption: str


def find_samples(data) -> list[Sample]:
    """Image/caption pairs from a folder (img.png + img.txt, searched recursively) or a JSONL file."""
    data = Path(data)
    if data.is_file() and data.suffix in (".jsonl", ".json"):
        return _read_jsonl(data)
    if not data.is_dir():
        raise ValueError(f"--data {data}: no such folder or .jsonl file")
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    samples, no_caption = [], []
    for path in images:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            samples.append(Sample(path, txt.read_text(encoding="utf-8", errors="replace").strip()))
        else:
            no_caption.append(path.name)
    if no_caption:
        warnings.warn(f"skipped {len(no_caption)} image(s) without a same-name .txt caption: "
                      f"{', '.join(no_caption[:5])}", stacklevel=2)
    if not samples:
        raise ValueError(f"--data {data}: no images with captions found (expected e.g. cat.png + cat.txt; "
                         f"image types {', '.join(IMAGE_SUFFIXES)})")
    return samples


def _read_jsonl(path: Path) -> list[Sample]:
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: expected a JSON object with 'image' and 'caption' ({e})") from None
        image = Path(image)
        samples.append(Sample(image if image.is_absolute() else path.parent / image, str(caption).strip()))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def open_rgb(path: Path, min_side: int):
    """The image as RGB (alpha composited on white), or a reason string why it cannot be used."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    if img.mode in ("I", "I;16", "I;16B", "F"):
        return f"unsupported mode {img.mode} (16-bit or float); save it as 8-bit RGB"
    if min(img.size) < min_side:
        return f"too small ({img.size[0]}x{img.size[1]} px, need at least {min_side} px on the shorter side)"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def usable_images(samples: list[Sample], min_side: int) -> Iterator[tuple[Sample, Image.Image]]:
    """(sample, RGB image) for each sample whose image opens and is large enough, one at a time; the others
    are skipped and, after the last, warned about in one message; none usable is a ValueError."""
    bad, good = [], 0
    for s in samples:
        img = open_rgb(s.image, min_side) if s.image.is_file() else "missing file"
        if isinstance(img, str):
            bad.append(f"{s.image.name}: {img}")
            continue
        good += 1
        yield s, img
    if bad:
        warnings.warn(f"skipped {len(bad)} image(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
                      stacklevel=2)
    if not good:
        raise ValueError("no usable training images: " + "; ".join(bad[:5]))


def image_tensor(img, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), center-crop to size x size: 3 x size x size in [-1, 1]."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1


def cache_key(samples: list[Sample], size: int, max_length: int) -> str:
    """A digest of the data the cache holds: files (path, size, mtime; a missing one as such), captions, crop size,
    caption length. It reads file stats only, so a cache is found without opening an image."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size, max_length]).encode())
    for s in samples:
        try:
            st = s.image.stat()
            stats = [st.st_size, st.st_mtime_ns]
        except OSError:
            stats = [None, None]
        h.update(json.dumps([str(s.image), *stats, s.caption]).encode())
    return h.hexdigest()[:16]


class LatentCache:
    """Encoded samples: posterior mean/std (N x 4 x h x w) and caption tokens (concatenated, with lengths)."""

    def __init__(self, mean, std, tokens, lengths, scaling_factor: float, shift_factor: float = 0.0):
        self.mean, self.std, self.tokens, self.lengths = mean, std, tokens, lengths
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

    def __len__(self) -> int:
        return self.mean.shape[0]

    def latent(self, i: int, eps: torch.Tensor) -> torch.Tensor:
        """A fresh posterior draw of sample i, scaled: ((mean + std * eps) - shift) * scaling_factor."""
        return (self.mean[i].float() + self.std[i].float() * eps - self.shift_factor) * self.scaling_factor

    def caption(self, i: int) -> torch.Tensor:
        """Valid caption tokens of sample i: n_i x C."""
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def save(self, folder: Path, key: str, encoders: str = "") -> None:
        from safetensors.torch import save_file

        from ..loader import write_atomically

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std, "tokens": self.tokens, "lengths": self.lengths}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        metadata = {"key": key, "encoders": encoders, "scaling_factor": str(self.scaling_factor),
                    "shift_factor": str(self.shift_factor)}
        write_atomically(folder / "cache.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, folder: Path, key: str | None = None, encoders: str | None = None) -> "LatentCache | None":
        """The cache in folder if present and made for `key` and `encoders` (None: any), else None."""
        from safetensors import safe_open

        path = Path(folder) / "cache.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if (key is not None and meta.get("key") != key) or (encoders and meta.get("encoders") != encoders):
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["mean"], t["std"], t["tokens"], t["lengths"], float(meta["scaling_factor"]),
                   float(meta["shift_factor"]))


@torch.no_grad()
def encode_samples(images: Iterable[tuple[Sample, Image.Image]], size: int, t5, vae, *, batch_size: int = 8,
                   max_length: int = 300, progress: bool = True, total: int | None = None) -> LatentCache:
    """Caption tokens through T5 and the images through the VAE encoder (posterior mean and std).

    images: (sample, RGB image) pairs, e.g. from usable_images, taken one batch at a time.
    """
    from tqdm import tqdm

    tokens, lengths, means, stds = [], [], [], []
    bar = tqdm(total=total, desc="encoding data", unit="img", disable=not progress)
    images = iter(images)
    while chunk := list(itertools.islice(images, batch_size)):
        emb, mask = t5.encode([s.caption for s, _ in chunk], max_length=max_length)
        for e, m in zip(emb, mask):
            n = int(m.sum())
            tokens.append(e[:n].cpu())  # T5's dtype: bf16 on CUDA halves the cache (4096 x 2 bytes a token)
            lengths.append(n)
        x = torch.stack([image_tensor(img, size) for _, img in chunk])
        dist = vae.model.encode(x.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(tokens), torch.tensor(lengths),
                       vae.scaling_factor, vae.shift_factor)
