"""Dimba configuration: a dataclass and the published presets."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass


CAPTION_LENGTH = 300  # T5 tokens a caption is padded to: the reference's model_max_length

INT_FIELDS = ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "caption_channels",
              "model_max_length", "d_state", "d_conv", "expand", "dt_rank", "base_size")
FLOAT_FIELDS = ("mlp_ratio", "mamba_ratio", "pe_interpolation")


@dataclass
class DimbaConfig:
    """Architecture of a Dimba denoiser; field names follow the reference constructor."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = CAPTION_LENGTH
    mamba_ratio: float = 1.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(hidden_size / 16)
    base_size: int = 32  # input_size // patch_size of the trained model (32 for 512 px)
    pe_interpolation: float = 1.0  # 1 at 512 px, 2 at 1024, 4 at 2048

    def __post_init__(self):
        self._check_types()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.hidden_size / 16)
        if not 0 <= self.mamba_ratio <= 1:
            raise ValueError(f"mamba_ratio must lie in [0, 1] (the share of blocks followed by Mamba), "
                             f"got {self.mamba_ratio}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        self.mamba_after()  # validates mamba_ratio against depth

    def _check_types(self):
        """Positive integers and finite positive numbers where the architecture needs them."""
        for name in INT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "dt_rank":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and name != "mamba_ratio"):
                raise ValueError(f"{name} must be a finite {'non-negative' if name == 'mamba_ratio' else 'positive'}"
                                 f" number, got {value!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma must be true or false, got {self.learn_sigma!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def native_resolution(self) -> int:
        """The pixel size the model was trained at: base_size latents x patch x VAE factor 8."""
        return self.base_size * self.patch_size * 8

    @property
    def mamba_depth(self) -> int:
        return int(self.mamba_ratio * self.depth)

    def mamba_after(self) -> dict[int, int]:
        """Map attention-block index i -> Mamba-block index j run right after it (the reference's rule)."""
        n = self.mamba_depth
        if n <= 0:
            return {}
        gap = self.depth // n
        if gap == 1:
            plan = {i: i for i in range(self.depth)}
        else:
            plan = {i: i // gap for i in range(self.depth) if i % gap == 1}
        if any(j >= n for j in plan.values()) or len(set(plan.values())) != n:
            raise ValueError(
                f"mamba_ratio {self.mamba_ratio} with depth {self.depth} gives {n} Mamba blocks that the "
                f"reference interleaving (gap {gap}) cannot place; choose a ratio of 1, 1/2, 1/3, ..."
            )
        return plan

    def check_latent(self, shape) -> None:
        """A latent this model takes: B x in_channels x H x W with H, W multiples of the patch size."""
        shape = tuple(shape)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"latents must be B x {self.in_channels} x H x W, got shape {shape}")
        if shape[-2] % self.patch_size or shape[-1] % self.patch_size:
            raise ValueError(f"latent height and width must be multiples of the patch size {self.patch_size} "
                             f"(image sides multiples of {8 * self.patch_size} px), got {shape[-2:]}")

    def check_caption_width(self, width: int) -> None:
        """Text features must be caption_channels wide (4096: T5 v1.1 XXL)."""
        if width != self.caption_channels:
            raise ValueError(f"the text embeddings are {width} wide but this Dimba model takes {self.caption_channels}"
                             " (caption_channels): use the T5 the model was trained with (T5 v1.1 XXL: 4096)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DimbaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Dimba config fields: {sorted(unknown)}")
        return cls(**d)


# A model trained at R px has input_size R / 8 latents, so base_size = R / 16 with patch 2.
RESOLUTION_SETTINGS = {512: dict(base_size=32, pe_interpolation=1.0),
                       1024: dict(base_size=64, pe_interpolation=2.0),
                       2048: dict(base_size=128, pe_interpolation=4.0)}


def dimba_l_2(resolution: int = 512, **kw) -> DimbaConfig:
    """Dimba-L-2: 0.86B parameters, 28 blocks of width 1152."""
    return DimbaConfig(**{**dict(hidden_size=1152, depth=28, num_heads=16), **_res(resolution), **kw})


def dimba_g_2(resolution: int = 512, **kw) -> DimbaConfig:
    """Dimba-G-2: 1.82B parameters, 40 blocks of width 1408."""
    return DimbaConfig(**{**dict(hidden_size=1408, depth=40, num_heads=16), **_res(resolution), **kw})


def _res(resolution: int) -> dict:
    if resolution not in RESOLUTION_SETTINGS:
        raise ValueError(f"resolution {resolution} is not one of {sorted(RESOLUTION_SETTINGS)}")
    return RESOLUTION_SETTINGS[resolution]


PRESETS = {"Dimba-L-2": dimba_l_2, "Dimba-G-2": dimba_g_2}
