"""ComfyUI-aware parts shared by the nodes, tools and tests. Imports comfy: only import where ComfyUI runs."""
