"""ComfyUI-Dimba: the Dimba Transformer-Mamba text-to-image model as ComfyUI nodes."""
if __package__:  # ComfyUI imports the checkout folder as a package; tools may import this file alone
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
