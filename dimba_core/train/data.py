"""Training data: image/caption pairs (folder or JSONL), checked while encoded once into a latent/caption cache."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import CAPTION_LENGTH

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
    """Rows {"image": path (relative to the JSONL's folder), "caption": text}; a bad row is a ValueError naming
    the file and the line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raw = path.read_bytes()
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (bad byte 0x{raw[e.start]:02x}); save the JSONL "
                         "as UTF-8") from None
    samples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: expected a JSON object with 'image' and 'caption' ({e})") from None
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            got = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {_json_type(row)}"
            raise ValueError(f"{where}: expected a JSON object with 'image' and 'caption', got {got}")
        image, caption = row["image"], row["caption"]
        if not isinstance(image, str) or not image.strip() or "\0" in image:
            got = repr(image) if isinstance(image, str) else _json_type(image)
            raise ValueError(f"{where}: 'image' must be the path of an image file (a string), got {got}")
        if not isinstance(caption, str):
            raise ValueError(f"{where}: 'caption' must be text (a string), got {_json_type(caption)}; "
                             'write "caption": "" for an image without a caption')
        for name, value in (("image", image), ("caption", caption)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: '{name}' holds an unpaired surrogate escape (\\ud800-\\udfff), "
                                 "which is not text; fix the row") from None
        image = Path(image)
        samples.append(Sample(image if image.is_absolute() else path.parent / image, caption.strip()))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def _json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def open_rgb(path: Path, min_side: int):
    """The image as RGB (alpha composited on white), or a reason string why it cannot be used.

    An image over PIL's pixel limit (Image.MAX_IMAGE_PIXELS x 2, e.g. a decompression bomb) is refused from its
    header, before any pixel memory is allocated.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return f"unsupported mode {img.mode} (16-bit or float); save it as 8-bit RGB"
        if min(img.size) < min_side:
            return f"too small ({img.size[0]}x{img.size[1]} px, need at least {min_side} px on the shorter side)"
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img.convert("RGBA"))
        return img.convert("RGB")
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        return f"too large ({str(e).split(',')[0]}; a decompression bomb?)"
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... for damaged files
        return f"unreadable ({type(e).__name__})"


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
        write_atomically(folder / CACHE_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, folder: Path, key: str | None = None, encoders: str | None = None) -> "LatentCache | None":
        """The cache in folder if present and made for `key` and `encoders` (None: any), else None.

        A damaged cache (truncated, tensors missing or inconsistent, NaN) is warned about and treated as absent,
        so that it is encoded again; a safetensors file of another kind under the cache's name is a ValueError
        (it is not replaced).
        """
        from ..weights import DimbaLoadError, open_safetensors

        path = Path(folder) / CACHE_FILE
        if not path.is_file():
            return None
        try:
            with open_safetensors(path) as f:
                meta = f.metadata() or {}
                if "key" not in meta or "scaling_factor" not in meta:
                    raise ValueError(f"{path} is not a latent cache of `dimba_core train` (its metadata has no "
                                     "cache key); it is another file: move it away or choose another --cache-dir")
                if (key is not None and meta.get("key") != key) or (encoders and meta.get("encoders") != encoders):
                    return None
                t = {k: f.get_tensor(k) for k in CACHE_TENSORS if k in f.keys()}
        except DimbaLoadError:
            return _damaged(path, "unreadable: truncated or corrupt")
        problem = _cache_problem(t, meta)
        if problem:
            return _damaged(path, problem)
        return cls(t["mean"], t["std"], t["tokens"], t["lengths"], float(meta["scaling_factor"]),
                   float(meta.get("shift_factor", 0.0)))


CACHE_FILE = "cache.safetensors"
CACHE_TENSORS = ("mean", "std", "tokens", "lengths")


def _damaged(path: Path, why: str) -> None:
    warnings.warn(f"{path} is damaged ({why}); it is ignored and the data encoded again", stacklevel=3)
    return None


def _cache_problem(t: dict, meta: dict) -> str | None:
    """Why cached tensors cannot be a cache (names, shapes, dtypes, finite values), or None."""
    missing = [k for k in CACHE_TENSORS if k not in t]
    if missing:
        return f"no {', '.join(missing)} tensor"
    mean, std, tokens, lengths = (t[k] for k in CACHE_TENSORS)
    if mean.ndim != 4 or mean.shape[0] < 1 or std.shape != mean.shape or tokens.ndim != 2 or lengths.ndim != 1:
        return (f"shapes mean {tuple(mean.shape)}, std {tuple(std.shape)}, tokens {tuple(tokens.shape)}, "
                f"lengths {tuple(lengths.shape)} do not fit together")
    if not all(x.is_floating_point() for x in (mean, std, tokens)) or lengths.dtype not in (torch.int32, torch.int64):
        return "wrong tensor dtypes"
    if len(lengths) != len(mean):
        return f"{len(lengths)} caption lengths for {len(mean)} images"
    if bool((lengths < 0).any()) or int(lengths.sum()) != tokens.shape[0]:
        return f"the caption lengths add up to {int(lengths.sum())} tokens, {tokens.shape[0]} are stored"
    try:
        factors = float(meta["scaling_factor"]), float(meta.get("shift_factor", 0.0))
    except ValueError:
        return "unreadable scaling/shift factor"
    if not all(map(math.isfinite, factors)):
        return "a non-finite scaling/shift factor"
    for name, x in (("mean", mean), ("std", std), ("tokens", tokens)):
        if not bool(torch.isfinite(x).all()):
            return f"{name} holds NaN or infinite values"
    return None


@torch.no_grad()
def encode_samples(images: Iterable[tuple[Sample, Image.Image]], size: int, t5, vae, *, batch_size: int = 8,
                   max_length: int = CAPTION_LENGTH, progress: bool = True, total: int | None = None) -> LatentCache:
    """Caption tokens through T5 and the images through the VAE encoder (posterior mean and std).

    images: (sample, RGB image) pairs, e.g. from usable_images, taken one batch at a time.
    """
    from tqdm import tqdm

    tokens, lengths, means, stds = [], [], [], []
    bar = tqdm(total=total, desc="encoding data", unit="img", disable=not progress)
    images = iter(images)
    while chunk := list(itertools.islice(images, batch_size)):
        emb, mask = t5.encode([s.caption for s, _ in chunk], max_length=max_length)
        if not bool(torch.isfinite(emb).all()):
            bad = next(s.caption for (s, _), e in zip(chunk, emb) if not bool(torch.isfinite(e).all()))
            raise ValueError(f"T5 in {str(t5.dtype).replace('torch.', '')} gave NaN or infinite embeddings for "
                             f"the caption {bad[:60]!r}; encode with --t5-dtype bf16 or fp32")
        for e, m in zip(emb, mask):
            n = int(m.sum())
            tokens.append(e[:n].cpu())  # T5's dtype: bf16 on CUDA halves the cache (4096 x 2 bytes a token)
            lengths.append(n)
        x = torch.stack([image_tensor(img, size) for _, img in chunk])
        dist = vae.model.encode(x.to(vae.device, vae.dtype)).latent_dist
        finite = torch.isfinite(dist.mean).flatten(1).all(1) & torch.isfinite(dist.std).flatten(1).all(1)
        if not bool(finite.all()):
            bad = chunk[int((~finite).nonzero()[0])][0].image
            raise ValueError(f"the VAE gave NaN or infinite latents for {bad}; encode in float32 with the VAE "
                             "the checkpoint was trained with")
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(tokens), torch.tensor(lengths),
                       vae.scaling_factor, vae.shift_factor)
