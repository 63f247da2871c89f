"""dimba_core, imported relatively inside the ComfyUI pack and absolutely from the repository root."""
import importlib

try:
    from .. import dimba_core
except ImportError:  # `nodes` is a top-level package: tests and tools run from the repository root
    import dimba_core


def core(submodule: str):
    """A dimba_core submodule (imported on first use, e.g. core("text"))."""
    return importlib.import_module(f"{dimba_core.__name__}.{submodule}")
