"""SAEmnesia for ComfyUI: erase concepts at inference time with supervised sparse autoencoders."""

import importlib.util
import os
import sys

# The pack's packages (saemnesia_comfy, the runtime, and saemnesia_core, the library under it) sit beside this
# file; a git clone into custom_nodes/ has them nowhere else.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

WEB_DIRECTORY = "./web"

# Outside ComfyUI (a test runner importing this folder as a package) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    from saemnesia_comfy.nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
