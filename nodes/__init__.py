"""ComfyUI nodes and the ComfyUI <-> diffusers bridge (to come; the core never imports ComfyUI)."""
