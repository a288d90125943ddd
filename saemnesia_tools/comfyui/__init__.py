"""The tools that need a ComfyUI host: collection from a ComfyUI MODEL or CLIP, the toy world's model training, build
and evaluation runner, a ComfyUI server and a browser driven over HTTP, and random ComfyUI models for tests.

Importing this package makes ComfyUI importable (`host.import_comfy`: the host this checkout set up, or
$COMFYUI_PATH), so that its modules can import ComfyUI at their top. The runtime (`saemnesia_comfy`) does nothing of
the kind: inside ComfyUI the host is already there."""

from .host import import_comfy

import_comfy()
