"""Dimba in ComfyUI's own model loading (imports comfy): model detection, the supported-models list and two
loader hooks, installed once when ComfyUI loads the pack.

- `comfy.model_detection.detect_unet_config` recognises a Dimba state dict (PixArt's `t_block` beside
  `mamba_blocks`, or the pack's config tensor) before ComfyUI's PixArt rule does, checks every key and shape,
  and returns the DimbaConfig as the unet config; `DimbaModelConfig` (first in `comfy.supported_models.models`)
  then builds the MODEL. Load Diffusion Model, Load Checkpoint, ModelSave reloads and DimbaCheckpointLoader
  all go through this one path, with ComfyUI's own operations, dtypes and patcher (Dynamic VRAM included).
- `comfy.sd.load_diffusion_model` hands detection the file's config (safetensors metadata, or the config
  tensor of an older ModelSave) where ComfyUI does not pass the metadata itself (0.3.64).
- The loaders' results get the ON_LOAD callback that patches parameters outside comfy.ops layers.

Where this ComfyUI's internals are not what the hooks expect, one line is logged, ComfyUI's loaders are left as
they are except that a Dimba file given to them fails naming DimbaCheckpointLoader (never loads as PixArt), and
DimbaCheckpointLoader builds the MODEL itself.
"""
import contextvars
import functools
import inspect
import logging
import re

import comfy.model_base
import comfy.model_detection
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models

from . import host
from ._dimba import dimba_core, loader

MIN_COMFYUI = (0, 3, 64)  # the oldest ComfyUI the pack is tested on (docs/comfyui.md)
CONFIG_KEY = loader.CONFIG_KEY
log = logging.getLogger("ComfyUI-Dimba")
STATE = {"installed": False, "problem": None}
_file_config = contextvars.ContextVar("dimba_file_config", default=None)  # (metadata, config tensor) of a file


def comfyui_version():
    """ComfyUI's version as a tuple, or None when it cannot be read."""
    try:
        import comfyui_version
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(getattr(comfyui_version, "__version__", "")))
    return tuple(int(g) for g in m.groups()) if m else None


def check_version(version=None):
    """Refuse a ComfyUI older than the pack supports, with the fix."""
    version = version or comfyui_version()
    if version is not None and version < MIN_COMFYUI:
        found, need = ".".join(map(str, version)), ".".join(map(str, MIN_COMFYUI))
        raise ImportError(f"ComfyUI-Dimba needs ComfyUI {need} or newer, this is {found}: update ComfyUI "
                          "(git pull, or the Manager's Update ComfyUI)")


def _params(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def missing_internals():
    """What of ComfyUI's loading internals the hooks need is absent (empty when all is there)."""
    need = {
        "comfy.model_detection.detect_unet_config(state_dict, key_prefix, ...)":
            list(_params(getattr(comfy.model_detection, "detect_unet_config", None)))[:2] == ["state_dict", "key_prefix"],
        "comfy.supported_models.models (a list)": isinstance(getattr(comfy.supported_models, "models", None), list),
        "comfy.sd.load_diffusion_model_state_dict(sd, model_options)":
            "model_options" in _params(getattr(comfy.sd, "load_diffusion_model_state_dict", None)),
        "comfy.sd.load_diffusion_model(unet_path, ...)":
            "unet_path" in _params(getattr(comfy.sd, "load_diffusion_model", None)),
        "comfy.sd.load_state_dict_guess_config": callable(getattr(comfy.sd, "load_state_dict_guess_config", None)),
        "BaseModel(unet_model=...)": "unet_model" in _params(comfy.model_base.BaseModel.__init__),
        "CallbacksMP.ON_LOAD": hasattr(comfy.patcher_extension.CallbacksMP, "ON_LOAD"),
    }
    return [name for name, ok in need.items() if not ok]


def dimba_unet_config(state_dict, key_prefix="", metadata=None):
    """The unet config of a Dimba state dict: {"image_model": "dimba", **DimbaConfig}, after checking every key and
    shape against the architecture. The config comes from the pack's config tensor, the file's metadata or the
    file the current Load Diffusion Model reads, else from shapes (num_heads 16)."""
    view = {k[len(key_prefix):]: v for k, v in state_dict.items() if k.startswith(key_prefix)}
    file_metadata, file_tensor = _file_config.get() or (None, None)
    if CONFIG_KEY not in view:  # a config tensor at the top of the file (ModelSave files of pack 0.1.0)
        tensor = state_dict.get(CONFIG_KEY, file_tensor)
        if tensor is not None:
            view[CONFIG_KEY] = tensor
    if not (metadata and CONFIG_KEY in metadata):
        metadata = file_metadata
    try:
        config, _ = loader.read_checkpoint(view, metadata=metadata)
    except dimba_core.DimbaLoadError as err:
        raise ValueError(f"Dimba checkpoint: {err}") from None
    return {"image_model": "dimba", **config.to_dict()}


def _metadata(args, kwargs):
    return kwargs.get("metadata", args[0] if args else None)


def _detecting(original):
    @functools.wraps(original)
    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        if loader.is_dimba(state_dict, key_prefix):
            return dimba_unet_config(state_dict, key_prefix, _metadata(args, kwargs))
        return original(state_dict, key_prefix, *args, **kwargs)

    detect_unet_config.dimba_hook = True
    return detect_unet_config


def _refusing(original):
    @functools.wraps(original)
    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        if loader.is_dimba(state_dict, key_prefix):
            raise ValueError("this is a Dimba checkpoint, which this ComfyUI's own loaders cannot build (see the "
                             "ComfyUI-Dimba line in the log at start-up): load it with Load Dimba Checkpoint "
                             "(DimbaCheckpointLoader)")
        return original(state_dict, key_prefix, *args, **kwargs)

    detect_unet_config.dimba_hook = True
    return detect_unet_config


def _read_file_config(path):
    """(safetensors metadata, top-level config tensor) of a file, or (None, None)."""
    if not str(path).lower().endswith(".safetensors"):
        return None, None
    try:
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(CONFIG_KEY) if CONFIG_KEY in f.keys() else None
            return f.metadata() or {}, tensor
    except Exception:  # ComfyUI's own reader reports an unreadable file
        return None, None


def _attaching(original):
    """A loader whose MODEL (or (MODEL, ...) tuple) gets the pack's ON_LOAD callback when it is a Dimba one."""
    @functools.wraps(original)
    def load(*args, **kwargs):
        out = original(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) and out else out
        if first is not None:
            host.attach(first)
        return out

    load.dimba_hook = True
    return load


def _with_file_config(original):
    @functools.wraps(original)
    def load_diffusion_model(unet_path, *args, **kwargs):
        token = _file_config.set(_read_file_config(unet_path))
        try:
            return original(unet_path, *args, **kwargs)
        finally:
            _file_config.reset(token)

    load_diffusion_model.dimba_hook = True
    return load_diffusion_model


def install():
    """Join ComfyUI's model loading (once); where its internals differ, log one line and only refuse Dimba files."""
    if getattr(getattr(comfy.model_detection, "detect_unet_config", None), "dimba_hook", False):
        return STATE
    missing = missing_internals()
    if missing:
        STATE.update(installed=False, problem="this ComfyUI lacks " + ", ".join(missing))
        log.warning("ComfyUI-Dimba: %s, so Load Diffusion Model / Load Checkpoint cannot build Dimba models here and "
                    "refuse Dimba files; use Load Dimba Checkpoint (DimbaCheckpointLoader)", STATE["problem"])
        if callable(getattr(comfy.model_detection, "detect_unet_config", None)):
            comfy.model_detection.detect_unet_config = _refusing(comfy.model_detection.detect_unet_config)
        return STATE
    comfy.supported_models.models.insert(0, host.DimbaModelConfig)
    comfy.model_detection.detect_unet_config = _detecting(comfy.model_detection.detect_unet_config)
    comfy.sd.load_diffusion_model = _with_file_config(comfy.sd.load_diffusion_model)
    for name in ("load_diffusion_model_state_dict", "load_state_dict_guess_config"):
        setattr(comfy.sd, name, _attaching(getattr(comfy.sd, name)))
    STATE.update(installed=True, problem=None)
    host.NATIVE_LOADING = True
    return STATE
