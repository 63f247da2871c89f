"""Load published Dimba checkpoints (.pt/.pth/.ckpt/.safetensors or a state dict) without running pickled code.

Every problem with a file ends in one DimbaLoadError naming it. The architecture is read from the tensor
shapes; config metadata and overrides are checked against those shapes before any model is built, so a
file cannot make the loader allocate or loop beyond what its own tensors imply.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import RESOLUTION_SETTINGS, DimbaConfig
from .dtypes import FILE_DTYPES, headless_dtype
from .model import Dimba
from .weights import DimbaLoadError, check_keys, open_safetensors

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.", "model.")
OPTIONAL_BUFFERS = ("pos_embed", "y_embedder.y_embedding")  # unused at inference; zero-filled when absent
CONFIG_KEY = "dimba_config"  # the config: safetensors metadata, or (ComfyUI saves) a uint8 tensor of JSON
COMFY_PREFIX = "model.diffusion_model."  # the denoiser's keys in a ComfyUI checkpoint (CheckpointSave, ModelSave)
SAFE_PICKLE_TORCH = (2, 6)  # before 2.6, torch.load(weights_only=True) can still run code (CVE-2025-32434)
FILL_SLACK = 1 << 20  # values a zero-filled optional buffer may have beyond the checkpoint's own


def torch_version() -> tuple[int, ...]:
    """The installed torch as (major, minor, patch), ignoring local and pre-release tags."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(torch.__version__))
    return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


def is_dimba(keys, prefix: str = "") -> bool:
    """Whether state-dict keys (under `prefix`) are a Dimba denoiser's: PixArt's timestep block with Mamba blocks
    beside it, or the config tensor the pack stores. Key names only, as ComfyUI's model detection works."""
    keys = keys if isinstance(keys, (set, frozenset, Mapping)) else set(keys)
    if prefix + CONFIG_KEY in keys:
        return True
    return prefix + "t_block.1.weight" in keys and any(
        isinstance(k, str) and k.startswith(prefix + "mamba_blocks.") for k in keys)


def read_state_dict(source, *, ema: bool = False, metadata: Mapping | None = None) -> tuple[dict, dict | None, str]:
    """Return (state dict of float tensors, config dict stored with it or None, name for messages).

    `metadata` is a state dict's safetensors metadata (str -> str), for a state dict read elsewhere.
    """
    name = _name(source)
    stored_config = None
    if metadata and isinstance(metadata.get(CONFIG_KEY), str):
        stored_config = _parse_config(metadata[CONFIG_KEY], name, "metadata")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise DimbaLoadError(f"{name}: is a folder; pass the checkpoint file (.safetensors or .pt) inside it")
        if not path.is_file():
            raise DimbaLoadError(f"{name}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            raw, stored_config = _read_safetensors(path)
        elif suffix in PICKLE_SUFFIXES:
            raw = _read_pickle(path)
        else:
            raise DimbaLoadError(f"{name}: unknown checkpoint type {path.suffix!r}; expected .safetensors, "
                                 f"{', '.join(PICKLE_SUFFIXES)}")
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise DimbaLoadError(f"cannot load a Dimba model from {type(source).__name__}; pass a path or a state dict")
    tensor = raw.get(CONFIG_KEY, raw.get(COMFY_PREFIX + CONFIG_KEY)) if isinstance(raw, Mapping) else None
    if stored_config is None and isinstance(tensor, torch.Tensor):
        stored_config = _config_tensor(tensor, name)
    sd = _select(raw, ema, name)
    _check_tensors(sd, name, from_file=not isinstance(source, Mapping))
    return sd, stored_config, name


def _parse_config(text: str, name: str, where: str) -> dict:
    """The config JSON object stored with a checkpoint."""
    try:
        stored = json.loads(text)
    except ValueError as e:
        raise DimbaLoadError(f"{name}: its '{CONFIG_KEY}' {where} is not valid JSON ({e}); convert the "
                             "original checkpoint again") from None
    if not isinstance(stored, dict):
        raise DimbaLoadError(f"{name}: its '{CONFIG_KEY}' {where} is a JSON {type(stored).__name__}, not a "
                             "JSON object of config fields; convert the original checkpoint again")
    return stored


def _config_tensor(t: torch.Tensor, name: str) -> dict:
    """The config a ComfyUI ModelSave / CheckpointSave of the pack stores as a uint8 tensor of JSON text."""
    if t.dtype != torch.uint8 or t.ndim != 1 or t.numel() > 1 << 16:
        raise DimbaLoadError(f"{name}: its '{CONFIG_KEY}' tensor must be a 1-D uint8 tensor of JSON text, got "
                             f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}")
    try:
        text = bytes(t.tolist()).decode("utf-8")
    except UnicodeDecodeError:
        raise DimbaLoadError(f"{name}: its '{CONFIG_KEY}' tensor is not UTF-8 JSON text") from None
    return _parse_config(text, name, "tensor")


def _denoiser_keys(keys) -> list[str]:
    """The string keys, only the denoiser's and the config when a ComfyUI checkpoint (CheckpointSave) bundles a
    VAE and text encoder beside `model.diffusion_model.*`."""
    keys = [k for k in keys if isinstance(k, str)]
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return [k for k in keys if k.startswith(COMFY_PREFIX) or k == CONFIG_KEY]
    return keys


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"


def _read_safetensors(path: Path):
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in _denoiser_keys(f.keys())}  # a bundled VAE / T5 is never read
    if CONFIG_KEY not in meta:
        return sd, None
    return sd, _parse_config(meta[CONFIG_KEY], str(path), "metadata")


def _read_pickle(path: Path):
    if torch_version() < SAFE_PICKLE_TORCH:
        raise DimbaLoadError(
            f"{path}: refused: torch {torch.__version__} can run code hidden in a pickled checkpoint even with "
            "weights_only=True (CVE-2025-32434). Upgrade torch to 2.6+, or convert the file with a trusted, "
            f"up-to-date install (python -m dimba_core convert {path.name} {path.stem}.safetensors) and use "
            "the .safetensors file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DimbaLoadError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers, "
            f"and loading it could run code ({str(e).splitlines()[0] if str(e) else 'unsafe pickle'}). "
            "Only load checkpoints you trust; a published Dimba checkpoint holds tensors only.") from None
    except Exception as e:
        raise DimbaLoadError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); the file is "
                             "truncated or corrupt, download it again") from None


def _select(raw, ema: bool, name: str) -> dict:
    """Pick state_dict / state_dict_ema from a training checkpoint, keep named tensors, strip wrapper prefixes."""
    if not isinstance(raw, Mapping):
        raise DimbaLoadError(f"{name}: holds a {type(raw).__name__}, not a state dict (names -> tensors); "
                             "this is not a Dimba checkpoint")
    wanted = "state_dict_ema" if ema else "state_dict"
    if wanted in raw:
        raw = raw[wanted]
        if not isinstance(raw, Mapping):
            raise DimbaLoadError(f"{name}: its '{wanted}' holds a {type(raw).__name__}, not a state dict")
    elif ema:
        keys = sorted(str(k) for k in raw)[:5]
        raise DimbaLoadError(f"{name}: has no 'state_dict_ema' (keys: {keys}); load with ema=False")
    elif isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    sd = {k: raw[k] for k in _denoiser_keys(raw)
          if isinstance(raw[k], torch.Tensor) and k not in (CONFIG_KEY, COMFY_PREFIX + CONFIG_KEY)}
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _check_tensors(sd: dict, name: str, from_file: bool) -> None:
    """Weights must be dense float tensors with data (dtype and layout only: no pass over the values)."""
    bad = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in sd.items()
           if v.dtype not in FILE_DTYPES or v.layout != torch.strided or (from_file and v.is_meta)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DimbaLoadError(f"{name}: Dimba weights must be dense float8/16/32/64 tensors, "
                             f"found {', '.join(bad[:5])}{more}; convert the original float checkpoint instead")


def _shape(sd: dict, key: str, ndim: int, name: str) -> tuple[int, ...]:
    """Shape of a tensor the architecture is read from, checked to be ndim-D and non-empty."""
    if key not in sd:
        raise DimbaLoadError(f"{name}: missing {key}, needed to read the architecture; the file is incomplete "
                             "(download it again) or not a Dimba checkpoint")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise DimbaLoadError(f"{name}: {key} has shape {shape}; a Dimba checkpoint has a non-empty {ndim}-D "
                             "tensor there (the file is damaged or not a Dimba checkpoint)")
    return shape


def _count(sd: dict, prefix: str, name: str) -> int:
    """Number of blocks `prefix.<i>.` (indices must run 0..n-1 without gaps)."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if not idx:
        return 0
    if len(idx) != max(idx) + 1:
        gaps = [i for i in range(len(idx) + 1) if i not in idx][:5]  # a gap lies below len(idx) + 1
        raise DimbaLoadError(f"{name}: {prefix} are not numbered 0..{len(idx) - 1}: {len(idx)} blocks up to index "
                             f"{max(idx)}, first missing {gaps}; the file is incomplete or damaged")
    return len(idx)


def shape_config(sd: dict, name: str = "<state dict>") -> dict:
    """The config fields that the tensor shapes determine (every other field comes from metadata or defaults)."""
    need = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "blocks.0.mlp.fc1.weight",
            "final_layer.linear.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise DimbaLoadError(f"{name}: this is not a Dimba checkpoint: missing {', '.join(missing)} "
                             f"(found e.g. {', '.join(sorted(sd)[:3]) or 'no tensors'})")
    hidden, in_ch, patch, patch_w = _shape(sd, "x_embedder.proj.weight", 4, name)
    if patch != patch_w:
        raise DimbaLoadError(f"{name}: x_embedder.proj.weight has {patch} x {patch_w} patches; Dimba's are square")
    depth, n_mamba = _count(sd, "blocks", name), _count(sd, "mamba_blocks", name)
    if n_mamba > depth:
        raise DimbaLoadError(f"{name}: {n_mamba} Mamba blocks but only {depth} attention blocks: blocks are "
                             "missing (an incomplete file?)")
    final = _shape(sd, "final_layer.linear.weight", 2, name)[0]
    out_ch = final // (patch * patch)
    if final % (patch * patch) or out_ch not in (in_ch, 2 * in_ch):
        raise DimbaLoadError(f"{name}: final_layer.linear.weight has {final} rows; with patch {patch} and {in_ch} "
                             f"latent channels a Dimba checkpoint has {patch * patch * in_ch} or "
                             f"{2 * patch * patch * in_ch}")
    fc1 = _shape(sd, "blocks.0.mlp.fc1.weight", 2, name)[0]
    cfg = dict(hidden_size=hidden, depth=depth, patch_size=patch, in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch,
               mlp_ratio=_ratio(fc1, hidden),
               caption_channels=_shape(sd, "y_embedder.y_proj.fc1.weight", 2, name)[1],
               mamba_ratio=_ratio(n_mamba, depth))
    if "y_embedder.y_embedding" in sd:
        cfg["model_max_length"] = _shape(sd, "y_embedder.y_embedding", 2, name)[0]
    if n_mamba:
        mixer = "mamba_blocks.0.mixer."
        d_inner, d_state = _shape(sd, mixer + "A_log", 2, name)
        if d_inner % hidden:
            raise DimbaLoadError(f"{name}: {mixer}A_log has {d_inner} rows, not a multiple of the width {hidden}")
        cfg.update(d_state=d_state, expand=d_inner // hidden, d_conv=_shape(sd, mixer + "conv1d.weight", 3, name)[-1],
                   dt_rank=_shape(sd, mixer + "dt_proj.weight", 2, name)[1])
    if "pos_embed" in sd:
        n = _shape(sd, "pos_embed", 3, name)[1]
        if math.isqrt(n) ** 2 != n:
            raise DimbaLoadError(f"{name}: pos_embed holds {n} positions, not a square grid")
        cfg["base_size"] = math.isqrt(n)
    return cfg


def _ratio(n: int, d: int) -> float:
    """A ratio r with int(r * d) == n, as the model computes sizes (mamba_ratio, mlp_ratio)."""
    r = n / d
    return r if int(r * d) == n else (n + 1e-6) / d


def _agrees(field: str, claim, shapes: dict) -> bool:
    """Whether a claimed config value gives the shapes found in the file."""
    real = isinstance(claim, numbers.Real) and not isinstance(claim, bool) and math.isfinite(claim)
    if field == "mamba_ratio":
        return real and 0 <= claim <= 1 and int(claim * shapes["depth"]) == int(shapes[field] * shapes["depth"])
    if field == "mlp_ratio":
        h = shapes["hidden_size"]
        return real and claim > 0 and int(h * claim) == int(h * shapes[field])
    if field == "learn_sigma":
        return claim is shapes[field]
    return isinstance(claim, numbers.Integral) and not isinstance(claim, bool) and claim == shapes[field]


def resolve_config(sd: dict, stored: dict | None = None, overrides: dict | None = None,
                   name: str = "<state dict>") -> DimbaConfig:
    """Config from the shapes, then stored metadata, then overrides; every claim is checked against the shapes."""
    fields = set(DimbaConfig.__dataclass_fields__)
    shapes = shape_config(sd, name)
    base_size = shapes.get("base_size", (stored or {}).get("base_size", 32))
    # the published resolutions pair base_size with pe_interpolation (512 px 32/1, 1024 64/2, 2048 128/4)
    pe = {r["base_size"]: r["pe_interpolation"] for r in RESOLUTION_SETTINGS.values()}.get(base_size, 1.0) \
        if type(base_size) is int else 1.0
    claims = {"num_heads": 16, "pe_interpolation": pe}
    for origin, values in (("the file's metadata", stored), ("the arguments", overrides)):
        values = {k: v for k, v in (values or {}).items() if not (k == "dt_rank" and v is None)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise DimbaLoadError(f"{name}: unknown Dimba config fields in {origin}: {unknown}"
                                 + ("; convert the original checkpoint again" if "metadata" in origin else ""))
        wrong = [f"{k} {v!r} (the tensors say {shapes[k]!r})" for k, v in values.items()
                 if k in shapes and not _agrees(k, v, shapes)]
        if wrong:
            raise DimbaLoadError(f"{name}: {origin} disagree with the tensor shapes: {'; '.join(wrong)}")
        claims.update(values)
    try:
        config = DimbaConfig(**{**claims, **shapes})
    except (TypeError, ValueError) as e:
        hint = ""
        if "interleaving" in str(e):
            hint = (f"; the file holds {shapes['depth']} attention and {int(shapes['mamba_ratio'] * shapes['depth'])} "
                    "Mamba blocks, so blocks are missing (an incomplete file?)")
        raise DimbaLoadError(f"{name}: {e}{hint}") from None
    _check_fill(sd, config, name)
    return config


def _check_fill(sd: dict, config: DimbaConfig, name: str) -> None:
    """Refuse claims (base_size, model_max_length) that would zero-fill an absent buffer larger than the file."""
    budget = sum(v.numel() for v in sd.values()) + FILL_SLACK
    sizes = {"pos_embed": ("base_size", config.base_size ** 2 * config.hidden_size),
             "y_embedder.y_embedding": ("model_max_length", config.model_max_length * config.caption_channels)}
    for key, (field, numel) in sizes.items():
        if key not in sd and numel > budget:
            raise DimbaLoadError(f"{name}: {field} {getattr(config, field)} would need a {key} of {numel} values, "
                                 f"more than the whole checkpoint holds; the value is wrong (pass a plausible one)")


def _check_num_heads(num_heads, name: str) -> None:
    if num_heads is not None and (not isinstance(num_heads, numbers.Integral) or isinstance(num_heads, bool)
                                  or num_heads <= 0):
        raise DimbaLoadError(f"{name}: num_heads must be a positive integer, got {num_heads!r}")


def read_checkpoint(source, *, num_heads: int | None = None, ema: bool = False, metadata: Mapping | None = None,
                    **overrides) -> tuple[DimbaConfig, dict]:
    """(config, state dict) of a checkpoint path or state dict, every key and shape checked; builds no model.

    num_heads cannot be read from shapes: it defaults to the value stored by `convert` (or by ComfyUI's
    ModelSave through the pack), else 16 (both published presets). Other config fields (pe_interpolation,
    base_size, ...) may be overridden. Absent optional buffers are zero-filled. `metadata`: as in read_state_dict.
    """
    _check_num_heads(num_heads, _name(source))
    sd, stored, name = read_state_dict(source, ema=ema, metadata=metadata)
    overrides = {k: v for k, v in dict(overrides, num_heads=num_heads).items() if v is not None}
    config = resolve_config(sd, stored, overrides, name)
    with torch.device("meta"):
        expected = Dimba(config).state_dict()
    sd = dict(sd)
    for key in OPTIONAL_BUFFERS:
        if key not in sd:
            sd[key] = torch.zeros(expected[key].shape)
    check_keys({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in sd.items()}, name,
               f"the Dimba architecture {config.to_dict()}")
    return config, sd


def load_dimba(source, *, device=None, dtype=None, num_heads: int | None = None, ema: bool = False,
               scan_backend: str = "auto", **overrides) -> Dimba:
    """Build a Dimba model from a checkpoint path or state dict, inferring its config, and load it strictly.

    Weights are stored in `dtype` (default: the file's; float32 for float8 files), the Mamba SSM parameters in
    float32; `dtype` is a torch float dtype or "fp16" / "bf16" / "fp32" (float8 storage needs ComfyUI's
    operations, so it is refused here). num_heads and the overrides as in `read_checkpoint`.
    """
    from . import ops

    ops.check_backend(scan_backend)
    dtype = headless_dtype(dtype, "load_dimba dtype")
    config, sd = read_checkpoint(source, num_heads=num_heads, ema=ema, **overrides)
    stored = sd["x_embedder.proj.weight"].dtype
    dtype = dtype or (torch.float32 if stored.itemsize == 1 else stored)
    with torch.device("meta"):
        model = Dimba(config, scan_backend=scan_backend, dtype=dtype)
    model = model.to_empty(device=device or "cpu")
    model.load_state_dict(sd, strict=True)  # copies into each parameter's own dtype
    return model.eval().requires_grad_(False)


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: the output must be a .safetensors file (load_dimba reads other suffixes as "
                         f"pickles); name it e.g. {path.with_suffix('.safetensors').name}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the output file's path")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist; create it first")


def write_atomically(path, write) -> None:
    """Call write(temporary path) in path's folder, flush the file to disk, then rename it over path."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask sets the permissions
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_safetensors(model: Dimba, path, dtype=None) -> None:
    """Write the model's state dict with its config in the file's metadata (read back by load_dimba), atomically."""
    save_state_dict(model.state_dict(), model.config, path, dtype)


def save_state_dict(sd: dict, config: DimbaConfig, path, dtype=None) -> None:
    """Write a Dimba state dict and its config (metadata) to a .safetensors file atomically; with `dtype`, each
    tensor in the dtype a model built with `dtype` stores it in (the Mamba SSM parameters stay float32)."""
    import safetensors.torch

    path = Path(path)
    _check_output(path)
    if dtype is not None:
        with torch.device("meta"):
            dtypes = {k: v.dtype for k, v in Dimba(config, dtype=dtype).state_dict().items()}
    sd = {k: (v.to(dtypes[k]) if dtype else v).contiguous().cpu() for k, v in sd.items()}
    metadata = {CONFIG_KEY: config.to_json(), "format": "pt"}
    write_atomically(path, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata=metadata))


def config_tensor(config: DimbaConfig) -> torch.Tensor:
    """The config as a uint8 tensor of JSON text, for files whose metadata another program writes (ComfyUI's
    ModelSave / CheckpointSave); read_state_dict reads it back."""
    return torch.frombuffer(bytearray(config.to_json().encode()), dtype=torch.uint8)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)  # follows symlinks; hard links share the inode
    except (OSError, ValueError):
        return False


def convert(src, dst, *, ema: bool = False, dtype=None, num_heads: int | None = None, overwrite: bool = False,
            **overrides) -> Dimba:
    """Convert a checkpoint (e.g. dimba-l-512.pt) to .safetensors with its config stored; never touches src.

    An existing dst is replaced only with overwrite=True (--force), and never when it is src itself.
    """
    dst = Path(dst)
    if _same_file(src, dst):
        raise ValueError(f"{dst} is the same file as the input {src}; convert never replaces its input: "
                         "write to another name")
    _check_output(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ValueError(f"{dst} exists; pass --force (overwrite=True) to replace it")
    _check_num_heads(num_heads, str(src))
    model = load_dimba(src, ema=ema, num_heads=num_heads, **overrides)
    save_safetensors(model, dst, dtype=dtype)
    return model
