"""The ComfyUI workflows `imagepipe agent` ships, in ComfyUI's API format (one JSON file per workflow)."""
