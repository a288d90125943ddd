"""The toy world on the ComfyUI side (DESIGN §8): its model built from ComfyUI's classes, sampling it as a workflow
would, training it, the one-command build of every shipped file, and the evaluation runner. The shipped files and
SAE sites are named in `saemnesia_tools.toy.assets`."""
