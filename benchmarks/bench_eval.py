# SPDX-License-Identifier: GPL-3.0-or-later
"""The miniature UnlearnCanvas evaluation as a benchmark: the same as `saemnesia eval` (same flags; reports under
benchmarks/results/eval_quick/ or eval_full/). See saemnesia_tools/toy/evaluation/ for the protocol.

    python benchmarks/bench_eval.py            # quick
    python benchmarks/bench_eval.py --full     # hours; rerun to resume
"""

import sys

from saemnesia_tools.comfyui.toy.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
