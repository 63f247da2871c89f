"""Reading and checking weight files, shared by the Dimba, T5 and VAE loaders: one error type, one key report."""
from __future__ import annotations

import contextlib
from pathlib import Path


class DimbaLoadError(ValueError):
    """A weight file that cannot be loaded; the message names the file, says why and what to do."""


@contextlib.contextmanager
def open_safetensors(path):
    """safe_open(path) on the CPU; a bad header, a short file or an unreadable tensor is one DimbaLoadError."""
    import safetensors

    def corrupt(err):
        return DimbaLoadError(f"{path}: cannot read this safetensors file ({err}); it is truncated or corrupt, "
                              "download or convert it again")

    try:
        f = safetensors.safe_open(str(path), framework="pt", device="cpu")
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise corrupt(e) from None
    with f:
        try:
            yield f
        except getattr(safetensors, "SafetensorError", ()) as e:
            raise corrupt(e) from None


def weights_source(path, what: str, subfolder: str) -> tuple[str, Path]:
    """("folder" | "file", path) for a Hugging Face/diffusers folder (or a pipeline folder holding `subfolder`)
    or a single .safetensors file; anything else is a DimbaLoadError, a missing path a FileNotFoundError."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / subfolder).is_dir():
        path = path / subfolder
    if path.is_dir():
        return "folder", path
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return "file", path
    if path.exists():
        raise DimbaLoadError(f"{path}: expected a {what} folder or a .safetensors file")
    raise FileNotFoundError(f"{what} not found: {path}")


def check_weights_folder(path: Path, what: str, alternative: str) -> None:
    """A Hugging Face/diffusers folder must hold config.json and intact .safetensors weights (headers read)."""
    weights = sorted(Path(path).glob("*.safetensors"))
    if not weights:
        raise DimbaLoadError(f"{path} has no .safetensors weights; pickled .bin weights are not loaded: convert "
                             f"them to safetensors or use {alternative}")
    if not (Path(path) / "config.json").is_file():
        raise DimbaLoadError(f"{path} has no config.json; a {what} folder holds config.json beside its "
                             f".safetensors weights (or use {alternative})")
    for file in weights:
        with open_safetensors(file):
            pass


def load_guarded(build, path, what: str):
    """build(); a failure caused by the file's contents becomes one DimbaLoadError naming path."""
    try:
        return build()
    except (DimbaLoadError, ImportError, MemoryError):
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise DimbaLoadError(f"{path}: cannot load a {what} from it ({type(err).__name__}: {first}); it is "
                             f"damaged or not a {what}") from None


def key_prefix(path, keys, anchor: str, what: str, hint: str) -> str:
    """The shortest prefix in front of `anchor` among keys (e.g. 'first_stage_model.'), or a DimbaLoadError."""
    found = sorted((k[: -len(anchor)] for k in keys if k.endswith(anchor)), key=len)
    if not found:
        raise DimbaLoadError(f"{path} is not a {what} file: no key ending in '{anchor}'; pass {hint}")
    return found[0]


def show(items, limit: int = 5) -> str:
    """A short printable list."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_keys(expected: dict, found: dict, name, what: str, *, unexpected_ok: bool = False) -> None:
    """Compare {key: shape} maps; one DimbaLoadError naming missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v) for k, v in expected.items()}
    found = {k: tuple(v) for k, v in found.items()}
    problems = [("missing keys", [k for k in expected if k not in found]),
                ("unexpected keys", [] if unexpected_ok else [k for k in found if k not in expected]),
                ("wrong shapes", [f"{k} {found[k]} (expected {expected[k]})" for k in expected
                                  if k in found and found[k] != expected[k]])]
    report = "; ".join(f"{label}: {show(items)}" for label, items in problems if items)
    if report:
        raise DimbaLoadError(f"{name}: does not match {what}: {report}")
