"""Test doubles for the served graph: small real trackers with scripted misbehaviour.

They run inside Ray Serve replicas, so they live in an importable module (the test cluster puts
the repository on every worker's PYTHONPATH) and are chosen by import path like any third-party tracker (`{"kind": "import", ...}`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator

from serve_app.contract import JobConfig
from serve_app.errors import UnsupportedMedia
from serve_app.trackers.fake import ColorShapeTracker, FakeConfig
from serve_app.media import Detections, FrameChunk, VideoInfo

SCRIPTED_TRACKER = "testkit.doubles:ScriptedTracker"


class ScriptedTracker(ColorShapeTracker):
    """The stand-in tracker, plus behaviour a prompt word asks for:

    - `slow`: sleeps `delay_s` per frame, so a request holds its replica for a known time
      (queues fill, stages can be seen overlapping);
    - `crash`: kills this process after `crash_after` frames, as an out-of-memory kill or a
      lost GPU would: the replica dies in the middle of a request.
    - `raise`: raises a plain RuntimeError after `crash_after` frames (a bug in our code);
    - `refuse`: raises UnsupportedMedia after `crash_after` frames (an error meant for the user).
    Other words work as for ColorShapeTracker (colour names).
    """

    def __init__(self, delay_s: float = 0.05, crash_after: int = 5, **options) -> None:
        super().__init__(FakeConfig(**options))
        self.delay_s = delay_s
        self.crash_after = crash_after

    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        words = set(re.findall(r"[a-z]+", " ".join(config.concepts).lower()))
        for n, dets in enumerate(super().track(chunks, info, config)):
            if n == self.crash_after and "crash" in words:
                os._exit(17)
            if n == self.crash_after and "raise" in words:
                raise RuntimeError("scripted tracker failure")
            if n == self.crash_after and "refuse" in words:
                raise UnsupportedMedia("scripted refusal from the tracker replica")
            if "slow" in words:
                time.sleep(self.delay_s)
            yield dets
