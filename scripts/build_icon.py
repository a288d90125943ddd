# SPDX-License-Identifier: GPL-3.0-or-later
"""Makes the pack's icon for the Comfy Registry (web/icon.png, the `Icon` of pyproject's [tool.comfy]): a toy
render of a heart whose right half is erased down to the empty background a clean erasure leaves.

    .venv/bin/python scripts/build_icon.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

from saemnesia_tools.toy.render import render_batch

ICON = Path(__file__).resolve().parents[1] / "web" / "icon.png"
SIZE = 256


def main() -> None:
    heart, empty = render_batch([("Hearts", "Neon"), (None, "Neon")], [3, 3])
    cols = np.indices(heart.shape[:2])[1]
    middle = np.flatnonzero((heart != empty).any(-1).any(0)).mean()  # the heart's middle column
    icon = np.where((cols > middle)[..., None], empty, heart)
    Image.fromarray(icon).resize((SIZE, SIZE), Image.NEAREST).save(ICON, optimize=True)
    print(f"wrote {ICON}")


if __name__ == "__main__":
    main()
