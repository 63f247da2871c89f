"""ComfyUI-Dimba: the Dimba Transformer-Mamba text-to-image model as ComfyUI nodes."""
if __package__:  # ComfyUI imports the checkout folder as a package; tools may import this file alone
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    try:
        import comfy.sd  # noqa: F401  (present inside ComfyUI)
    except ImportError:  # imported as a package outside ComfyUI, e.g. by pytest from the checkout
        pass
    else:
        from .nodes import integration

        integration.check_version()  # a too-old ComfyUI: the import fails with the fix in ComfyUI's log
        integration.install()  # Dimba joins ComfyUI's model detection: its own loaders build the Dimba MODEL

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
