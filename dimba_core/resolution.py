"""The reference's aspect-ratio buckets and prompt suffixes (--ar h:w, --hw h:w)."""
from __future__ import annotations

import math
import re

from .config import RESOLUTION_SETTINGS

# key h/w -> (h, w) at 1024 px; the 512 px table is this halved, 2048 px doubled.
ASPECT_RATIOS_1024 = {
    0.25: (512, 2048), 0.28: (512, 1856), 0.32: (576, 1792), 0.33: (576, 1728), 0.35: (576, 1664),
    0.4: (640, 1600), 0.42: (640, 1536), 0.48: (704, 1472), 0.5: (704, 1408), 0.52: (704, 1344),
    0.57: (768, 1344), 0.6: (768, 1280), 0.68: (832, 1216), 0.72: (832, 1152), 0.78: (896, 1152),
    0.82: (896, 1088), 0.88: (960, 1088), 0.94: (960, 1024), 1.0: (1024, 1024), 1.07: (1024, 960),
    1.13: (1088, 960), 1.21: (1088, 896), 1.29: (1152, 896), 1.38: (1152, 832), 1.46: (1216, 832),
    1.67: (1280, 768), 1.75: (1344, 768), 2.0: (1408, 704), 2.09: (1472, 704), 2.4: (1536, 640),
    2.5: (1600, 640), 3.0: (1728, 576), 4.0: (2048, 512),
}


def aspect_ratios(base: int = 1024) -> dict[float, tuple[int, int]]:
    """Buckets {h/w: (h, w)} for a 512, 1024 or 2048 px model."""
    if base not in RESOLUTION_SETTINGS:
        raise ValueError(f"base resolution {base} is not one of {', '.join(map(str, RESOLUTION_SETTINGS))}")
    return {r: (h * base // 1024, w * base // 1024) for r, (h, w) in ASPECT_RATIOS_1024.items()}


def closest_bucket(ratio: float, base: int = 1024) -> tuple[int, int]:
    """(height, width) of the bucket whose h/w is nearest to `ratio`; a ratio beyond the table's ends (up to
    infinity) takes the end bucket. The ratio is bounded to the table first: |r - ratio| ties in float for huge
    ratios (1e30 - 4.0 == 1e30 - 0.25), while inside the table it picks what the reference's distance picks."""
    table = aspect_ratios(base)
    ratio = float(ratio)
    if not ratio >= 0:
        raise ValueError(f"aspect ratio must be a positive number h/w, got {ratio!r}")
    ratio = min(max(ratio, min(table)), max(table))
    return table[min(table, key=lambda r: abs(r - ratio))]


def parse_ratio(text: str) -> float:
    """'16:9' or '1.5' -> h/w as a float (for --ar h:w); both sides positive and finite."""
    parts = str(text).strip().split(":")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"cannot read aspect ratio {text!r}; write h:w with two positive numbers such as 3:4, "
                         "or one positive number h/w such as 0.75")
    return values[0] / values[1] if len(values) == 2 else values[0]


def parse_hw(text: str) -> tuple[int, int]:
    """'512:768' -> (512, 768): exact height and width in pixels (for --hw h:w)."""
    parts = str(text).strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"cannot read size {text!r}; write --hw height:width in pixels, such as 512:768")
    h, w = (int(p) for p in parts)
    return h, w


_SUFFIX = re.compile(r"(?:^|\s)--(ar|hw)(?=\s|$)(?:\s+(?!--)(\S+))?")


def parse_prompt(prompt: str, base: int = 1024) -> tuple[str, tuple[int, int] | None]:
    """Strip the reference's `--ar h:w` (bucketed) or `--hw h:w` (exact pixels) suffix: (prompt, (h, w) or None).

    A suffix without a value, or with a value that is not a positive size or ratio, is a ValueError.
    """
    size = None
    for kind, value in _SUFFIX.findall(prompt):
        if not value:
            raise ValueError(f"--{kind} in the prompt needs a value, such as --{kind} "
                             f"{'3:4' if kind == 'ar' else '512:768'}")
        size = closest_bucket(parse_ratio(value), base) if kind == "ar" else parse_hw(value)
    return _SUFFIX.sub(" ", prompt).strip(), size
