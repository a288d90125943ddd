"""SAEmnesia's tools, apart from what ComfyUI loads: the `saemnesia` command, the training pipeline, the toy world's
renderer, judges and evaluation, and helpers for tests and benchmarks. Nothing here imports ComfyUI except the
`comfyui` sub-package, which works with a ComfyUI host in-process or as a server."""
