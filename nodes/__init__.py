"""ComfyUI nodes (`attencraft_nodes`), their plain logic (`logic`) and the ComfyUI -> diffusers bridge (`bridge`)."""
