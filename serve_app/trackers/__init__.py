"""Trackers turn decoded frames plus a text prompt into per-frame detections.

A tracker is chosen by import path, `module:Name`, and constructed with keyword options.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from serve_app.contract import JobConfig
from serve_app.types import Detections, FrameChunk, VideoInfo

SAM3_TRACKER = "serve_app.trackers.sam3:Sam3Tracker"
FAKE_TRACKER = "serve_app.trackers.fake:ColorShapeTracker"


@runtime_checkable
class Tracker(Protocol):
    """What every tracker implements.

    `track` consumes frame chunks as they are decoded and yields exactly one `Detections` per
    frame, in frame order, possibly lagging behind the input (SAM 3 holds frames back). It may
    use `config.confidence_threshold` to tune itself; the pipeline filters by it afterwards
    in any case, so a tracker never has to.
    """

    def track(
        self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig
    ) -> Iterator[Detections]: ...


def load_tracker(spec: str, **options: Any) -> Tracker:
    """Import `module:Name` and construct it with `options`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"tracker is {spec!r}; it must be an import path like 'package.module:ClassName'")
    cls = getattr(importlib.import_module(module_name), attr)
    tracker = cls(**options)
    if not isinstance(tracker, Tracker):
        raise TypeError(f"{spec} has no track(chunks, info, config) method")
    return tracker
