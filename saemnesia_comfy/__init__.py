"""SAEmnesia for ComfyUI, the runtime: exactly what ComfyUI loads (the nodes, the block patch, erasure and probing of
a MODEL or CLIP, the SAE library of the model folders, the toy model's loader). It imports only `saemnesia_core` and
ComfyUI, and importing it has no side effects; the tools live in `saemnesia_tools`."""
