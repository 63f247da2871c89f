"""Merge LoRA-family files into a Dimba model the way ComfyUI 0.3.64's LoraLoaderModelOnly patches a Dimba MODEL.

Keys: `diffusion_model.<stem>.<part>`, `model.diffusion_model.<stem>.<part>` or `lora_unet_<stem with . as _>.<part>`,
where `<stem>.weight` is a weight of the model (or `<stem>` a parameter that is not a `.weight`: a bias, `A_log`,
`scale_shift_table`; not for `lora_unet_`). Formats, with strength s and scale = alpha / rank (1 without alpha):
- LoRA: W += s * scale * up @ down; up/down spelled `lora_up/lora_down.weight`, `lora_B/lora_A[.weight]`,
  `lora.up/lora.down.weight`, `_lora.up/_lora.down.weight`, `lora_linear_layer.up/down.weight`,
  `lora_B/lora_A.default.weight`; `lora_mid.weight` (LoCon Tucker, conv2d); `dora_scale` (DoRA).
- LoHa: W += s * scale * (w1_a @ w1_b) * (w2_a @ w2_b) (`hada_*`; Tucker `hada_t1/t2` for conv2d), rank = w1_b rows.
- LoKr: W += s * scale * kron(w1, w2) (`lokr_w1` or `lokr_w1_a @ lokr_w1_b`, same for w2, Tucker `lokr_t2`);
  scale = alpha / rows of the last factored b (1 if neither is factored). A Tucker w2 that ComfyUI's torch.kron
  cannot take (most of them) is refused, as ComfyUI leaves that weight unpatched.
- `diff` / `w_norm`: W += s * diff; `diff_b` / `b_norm`: bias += s * diff (ComfyUI's TrainLoraNode writes these);
  `set_weight`: W = value (ComfyUI ignores the strength here, except that a strength of 0 leaves W alone).
GLoRA, OFT/BOFT and `reshape_weight` files are refused with a DimbaLoadError naming them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .weights import DimbaLoadError, open_safetensors, show

PREFIXES = ("diffusion_model.", "model.diffusion_model.", "lora_unet_")
LORA_SPELLINGS = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
                  (".lora_B", ".lora_A"), (".lora.up.weight", ".lora.down.weight"),
                  ("_lora.up.weight", "_lora.down.weight"), (".lora_B.default.weight", ".lora_A.default.weight"),
                  (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")]
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SUFFIXES = {  # key ending -> (format, part); diff_b patches the bias next to the weight
    **{up: ("LoRA", "lora_up") for up, _ in LORA_SPELLINGS},
    **{down: ("LoRA", "lora_down") for _, down in LORA_SPELLINGS}, ".lora_mid.weight": ("LoRA", "lora_mid"),
    **{f".{p}": ("LoHa", p) for p in LOHA}, **{f".{p}": ("LoKr", p) for p in LOKR},
    ".diff": ("diff", "diff"), ".w_norm": ("diff", "diff"), ".diff_b": ("diff_b", "diff"),
    ".b_norm": ("diff_b", "diff"), ".set_weight": ("set", "set_weight"),
    ".alpha": (None, "alpha"), ".dora_scale": (None, "dora_scale")}
UNSUPPORTED = {".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
               ".oft_blocks": "OFT/BOFT", ".rescale": "OFT/BOFT", ".reshape_weight": "reshape_weight (padded LoRA)"}


def read_lora(source) -> tuple[dict, str]:
    """(state dict, name for messages) from a .safetensors path or a state dict; never unpickles."""
    if isinstance(source, dict):
        return source, "<LoRA state dict>"
    if not isinstance(source, (str, os.PathLike)):
        raise DimbaLoadError(f"cannot read a LoRA from {type(source).__name__}; pass a .safetensors path or a dict")
    path = Path(source)
    if not path.is_file():
        raise DimbaLoadError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise DimbaLoadError(f"{path}: LoRA files are read as .safetensors only (pickles could run code); "
                             "convert it to .safetensors")
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, str(path)


def target_of(key: str, params, by_flat: dict):
    """(parameter key, format, part) a LoRA key patches, or None when it fits no parameter or known format."""
    suffix = max((s for s in SUFFIXES if key.endswith(s)), key=len, default=None)
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if suffix is None or prefix is None:
        return None
    fmt, part = SUFFIXES[suffix]
    stem = key[len(prefix): -len(suffix)]
    if prefix == "lora_unet_":
        target = by_flat.get(stem)
    else:  # ComfyUI's generic rule: <stem> names <stem>.weight, or a parameter that is not a .weight itself
        target = stem + ".weight" if stem + ".weight" in params else None if stem.endswith(".weight") else stem
    if fmt == "diff_b":  # the bias beside the weight <stem>.weight
        fmt, target = "diff", (target[: -len(".weight")] + ".bias" if target and target.endswith(".weight") else None)
    return (target, fmt, part) if target in params else None


def group_lora(sd: dict, params, name: str) -> dict:
    """{parameter key: {"format": ..., part: tensor}}; DimbaLoadError for keys that fit no parameter or format."""
    by_flat = {k[: -len(".weight")].replace(".", "_"): k for k in params if k.endswith(".weight")}
    groups: dict = {}
    stray, unsupported = [], []
    for key, value in sd.items():
        found = target_of(key, params, by_flat) if isinstance(value, torch.Tensor) else None
        if found is None:
            fmt = next((f for s, f in UNSUPPORTED.items() if key.endswith(s)), None)
            (unsupported if fmt else stray).append(f"{key} ({fmt})" if fmt else key)
            continue
        if key.endswith(".b_norm") and key[: -len("b_norm")] + "w_norm" not in sd:
            raise DimbaLoadError(f"{name}: {key} has no .w_norm next to it; ComfyUI reads a b_norm only with its "
                                 "w_norm (use .diff_b for a bias difference alone)")
        target, fmt, part = found
        group = groups.setdefault(target, {})
        if fmt is not None and group.setdefault("format", fmt) != fmt:
            raise DimbaLoadError(f"{name}: mixes {group['format']} and {fmt} keys for {target}; ComfyUI would apply "
                                 "only one of them: keep one format per layer")
        if part in group:
            raise DimbaLoadError(f"{name}: two {part} tensors for {target} (two spellings of one key?)")
        group[part] = value
    if unsupported:
        raise DimbaLoadError(f"{name}: LoRA formats dimba_core cannot merge: {show(unsupported)}; apply it in ComfyUI "
                             "or convert it to LoRA, LoHa, LoKr or diff keys")
    if stray:
        raise DimbaLoadError(f"{name}: not a LoRA for this Dimba model: keys that match no Dimba weight or LoRA "
                             f"format: {show(stray)} (expected diffusion_model.<key>.lora_down.weight / "
                             ".lora_up.weight / .alpha, lora_A / lora_B, hada_*, lokr_*, .diff, .diff_b, ...)")
    if not groups:
        raise DimbaLoadError(f"{name}: holds no LoRA weights")
    alone = [k for k, g in groups.items() if "format" not in g]
    if alone:
        raise DimbaLoadError(f"{name}: LoRA incomplete: only alpha/dora_scale, no LoRA matrices for {show(alone)}")
    return groups


def scaled_add(w, p, diff, rank, strength):
    """w + strength * alpha/rank * diff, or DoRA's rescaled merge when the file has a dora_scale."""
    scale = float(p["alpha"]) / rank if "alpha" in p and rank else 1.0
    diff = diff.reshape(w.shape)
    if "dora_scale" not in p:
        return w + (strength * scale) * diff
    new = w + diff * scale
    if p["dora_scale"].shape[0] == w.shape[0]:  # per output row; ComfyUI 0.3.64 takes this norm from the old weight
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:  # per input column, of the merged weight
        norm = new.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        norm = norm.reshape(-1, *[1] * (w.dim() - 1)).transpose(0, 1)
    new = new * (p["dora_scale"] / (norm + torch.finfo(w.dtype).eps))
    return w + strength * (new - w) if strength != 1.0 else new


class NotMergeable(ValueError):
    """A layer ComfyUI 0.3.64 cannot merge either (it logs an error and leaves the weight as it was)."""


def tucker(t, a, b):
    """Conv2d Tucker factor: out[p, r, k, l] = sum_ij t[i, j, k, l] b[j, r] a[i, p]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def lora_weight(p, w, strength):
    down = p["lora_down"].flatten(1)
    rank = down.shape[0]
    if "lora_mid" in p:  # LoCon Tucker: the mid conv sits between down and up
        down = torch.einsum("rskl,si->rikl", p["lora_mid"], down)
    return scaled_add(w, p, p["lora_up"].flatten(1) @ down.flatten(1), rank, strength)


def loha_weight(p, w, strength):
    if "hada_t1" in p or "hada_t2" in p:
        m1 = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        m2 = tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
    return scaled_add(w, p, m1 * m2, p["hada_w1_b"].shape[0], strength)


def lokr_weight(p, w, strength):
    rank = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
    w2 = p.get("lokr_w2")
    if w2 is None:
        rank = p["lokr_w2_b"].shape[0]
        w2 = (tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]) if "lokr_t2" in p
              else p["lokr_w2_a"] @ p["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    try:
        diff = torch.kron(w1, w2)
    except RuntimeError as e:  # kron views its arguments; a Tucker w2 is often laid out so that it cannot
        raise NotMergeable(f"ComfyUI 0.3.64 cannot merge this Tucker (lokr_t2) layer either, it leaves the weight "
                           f"unpatched ({e}); re-save the LoKr without Tucker decomposition") from None
    return scaled_add(w, p, diff, rank, strength)


def diff_weight(p, w, strength):
    if p["diff"].shape != w.shape:
        raise ValueError(f"diff {tuple(p['diff'].shape)} is not the parameter's shape")
    return w + strength * p["diff"]


def set_weight(p, w, strength):
    return w.clone().copy_(p["set_weight"]) if strength != 0 else w


FORMATS = {"LoRA": lora_weight, "LoHa": loha_weight, "LoKr": lokr_weight, "diff": diff_weight, "set": set_weight}


def merged(group: dict, w: torch.Tensor, strength: float, key: str, name: str) -> torch.Tensor:
    """The patched float32 weight; DimbaLoadError when the file lacks a part or does not fit the weight."""
    fmt = group["format"]
    parts = {k: v.to(w.device, torch.float32) for k, v in group.items() if k != "format"}
    try:
        new = FORMATS[fmt](parts, w, strength)
    except KeyError as e:
        raise DimbaLoadError(f"{name}: {fmt} incomplete: {e.args[0]} missing for {key}") from None
    except NotMergeable as e:
        raise DimbaLoadError(f"{name}: {fmt} for {key}: {e}") from None
    except (RuntimeError, ValueError, IndexError) as e:
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in parts.items())
        raise DimbaLoadError(f"{name}: {fmt} for {key} ({sizes}) does not fit the weight {tuple(w.shape)}; it was "
                             f"made for another model ({e})") from None
    if new.shape != w.shape:
        raise DimbaLoadError(f"{name}: {fmt} for {key} gives shape {tuple(new.shape)}, which does not fit the weight "
                             f"{tuple(w.shape)}; it was made for another model")
    return new


def apply_lora(model: torch.nn.Module, source, strength: float = 1.0) -> torch.nn.Module:
    """Merge a LoRA-family file (path or state dict) into the model's parameters in place, as ComfyUI patches them."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
    sd, name = read_lora(source)
    params = dict(model.named_parameters())
    groups = group_lora(sd, params, name)
    check_finite(sd, name)
    with torch.no_grad():
        new = {}
        for key, group in groups.items():  # validate all first
            value = merged(group, params[key].float(), strength, key, name).to(params[key].dtype)
            check_merged(value, params[key], strength, key, name)
            new[key] = value
        for key, value in new.items():
            params[key].copy_(value)
    return model


def non_finite(t: torch.Tensor) -> bool:
    """Whether a (not meta) tensor holds NaN or an infinity; float8 and integer tensors are checked as float32."""
    if t.is_meta or not (t.is_floating_point() or t.is_complex()):
        return False
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not t.is_complex():
        t = t.float()
    return not bool(torch.isfinite(t).all())


def check_finite(sd: dict, name: str) -> None:
    """A DimbaLoadError naming the first LoRA tensor (matrix, alpha, dora_scale, diff) with NaN or inf values."""
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and non_finite(v)]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise DimbaLoadError(f"{name}: {bad[0]}{more} holds NaN or infinite values; the LoRA is damaged (or saved "
                             "from a training run that diverged): merging it would break the model, use another "
                             "file or re-export it")


def check_merged(value: torch.Tensor, old: torch.Tensor, strength: float, key: str, name: str) -> None:
    """A DimbaLoadError when merging made a finite weight NaN or infinite (strength or scale too large)."""
    if non_finite(value) and not non_finite(old):
        dtype = str(old.dtype).replace("torch.", "")
        raise DimbaLoadError(f"{name}: merging it at strength {strength:g} makes {key} NaN or infinite (beyond "
                             f"{dtype}'s range); the strength or the LoRA's alpha / matrices are far too large: use "
                             "a strength of about -2 to 2, or another file")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (FILE, STRENGTH); a tail that is not a number belongs to the path; a non-finite
    strength (nan, inf) is a ValueError."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(strength):
            raise ValueError(f"--lora {spec}: the strength must be a finite number")
        return path, strength
    return spec, 1.0


__all__ = ["apply_lora", "parse_lora_spec", "read_lora"]
