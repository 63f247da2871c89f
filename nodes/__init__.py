"""ComfyUI nodes for Dimba; thin declarations over dimba_core."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
