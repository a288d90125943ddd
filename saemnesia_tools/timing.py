"""Timing variants side by side: interleaved rounds (one call of each variant per round) after warm-up, so that a
machine's drift hits every variant alike. A time budget that runs out (SIGINT, e.g. scripts/gpu_check.sh's) keeps
the rounds every variant finished, and says the result is partial."""

from __future__ import annotations

import time
from typing import Callable


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                sync: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], bool]:
    """({variant: seconds per call, one per finished round}, partial)."""
    times = {name: [] for name in calls}
    try:
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                sync()
                start = time.perf_counter()
                call()
                sync()
                times[name].append(time.perf_counter() - start)
    except KeyboardInterrupt:
        rounds = min(len(v) for v in times.values())
        if rounds == 0:
            raise
        return {name: v[:rounds] for name, v in times.items()}, True
    return times, False
