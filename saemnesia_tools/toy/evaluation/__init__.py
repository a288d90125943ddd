"""The miniature UnlearnCanvas evaluation's pure parts (DESIGN §9): what is generated (protocol), how it is
scored (metrics) and how results are shown (report). Generating and judging the images needs ComfyUI and lives
in `saemnesia_tools.comfyui.toy.evaluate`."""
