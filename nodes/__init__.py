"""ComfyUI nodes for Dimba; thin declarations over dimba_core (comfy is imported only when a node runs)."""
from .loaders import DimbaCheckpointLoader, DimbaT5Loader, DimbaT5TextEncode
from .sampling import DimbaResolutionSelect, DimbaSampler

NODE_CLASS_MAPPINGS = {
    "DimbaCheckpointLoader": DimbaCheckpointLoader,
    "DimbaT5Loader": DimbaT5Loader,
    "DimbaT5TextEncode": DimbaT5TextEncode,
    "DimbaSampler": DimbaSampler,
    "DimbaResolutionSelect": DimbaResolutionSelect,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DimbaCheckpointLoader": "Load Dimba Checkpoint",
    "DimbaT5Loader": "Load Dimba T5",
    "DimbaT5TextEncode": "Dimba T5 Text Encode",
    "DimbaSampler": "Dimba Sampler",
    "DimbaResolutionSelect": "Dimba Resolution Select",
}
