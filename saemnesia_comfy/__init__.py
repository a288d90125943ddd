"""ComfyUI-aware parts shared by the nodes, tools and tests. Importing it makes ComfyUI importable
(a no-op inside a running ComfyUI; elsewhere it finds the host, see runtime.comfyui_path)."""

from .runtime import import_comfy

import_comfy()
