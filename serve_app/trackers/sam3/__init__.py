"""The real SAM 3 tracker stage: `serve_app.trackers.sam3:Sam3Tracker`.

Modules: loading (weights, vocabulary, device, build), compat (sam3 work-arounds), worker (the
model-owner thread), frames (lazy model input), session (one video through SAM 3), trim
(bounded session memory), convert (outputs to Detections), tracker (the stage itself).
torch and sam3 are imported only when a tracker is built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Sam3Tracker"]


def __getattr__(name: str) -> Any:
    if name == "Sam3Tracker":
        from serve_app.trackers.sam3.tracker import Sam3Tracker

        return Sam3Tracker
    raise AttributeError(name)
