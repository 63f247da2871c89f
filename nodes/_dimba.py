"""dimba_core and the submodules the nodes use, imported relatively inside the ComfyUI pack and absolutely
from the repository root (tests and tools)."""
try:
    from .. import dimba_core
    from ..dimba_core import dtypes, loader, resolution, sampling, text, weights
except ImportError:  # `nodes` is a top-level package: tests and tools run from the repository root
    import dimba_core
    from dimba_core import dtypes, loader, resolution, sampling, text, weights

__all__ = ["dimba_core", "dtypes", "loader", "resolution", "sampling", "text", "weights"]
