"""The UI's progress bar as a test sees it: every (value, total) a node reports through comfy.utils.ProgressBar."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def recorded_progress():
    """Yields a list that receives (value, total) for each progress update while the block runs; newer hosts'
    throttling (at most one update per 100 ms) is switched off so every tick arrives."""
    import comfy.utils

    ticks: list[tuple[int, int]] = []
    saved = {name: getattr(comfy.utils, name) for name in ("PROGRESS_BAR_HOOK", "PROGRESS_THROTTLE_MIN_INTERVAL",
                                                          "PROGRESS_THROTTLE_MIN_PERCENT") if hasattr(comfy.utils, name)}
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, node_id=None: ticks.append((value, total)))
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if name in saved:
            setattr(comfy.utils, name, 0)
    try:
        yield ticks
    finally:
        for name, value in saved.items():
            setattr(comfy.utils, name, value)
