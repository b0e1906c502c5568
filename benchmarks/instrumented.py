"""What tests and benchmarks measure on the SAM 3 tracker, kept out of the serving class.

`InstrumentedSam3Tracker` is a Sam3Tracker that can be built with random weights (the real
architecture, meaningless outputs: no checkpoint needed) and records, after every emitted
frame of its latest job, the bytes the session holds, the objects SAM 3 tracks and the GPU
memory allocated (`frame_log`); `sessions_alive()` counts SAM 3 sessions still in memory.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from serve_app.contract import JobConfig
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.loading import WeightsSource
from serve_app.trackers.sam3.tracker import Sam3Tracker


@dataclass(frozen=True)
class FrameRecord:
    frame: int
    held_bytes: int          # tensor/array bytes the session holds (trim.held_bytes)
    objects_tracked: int     # SAM 3's frame_stats["num_obj_tracked"] (before hiding any)
    cuda_allocated: int      # torch.cuda.memory_allocated() on a GPU, else 0


class InstrumentedSam3Tracker(Sam3Tracker):
    def __init__(self, config: Sam3Config = Sam3Config(), random_weights: bool = False) -> None:
        self.frame_log: list[FrameRecord] = []
        super().__init__(config, WeightsSource(random=True) if random_weights else None)

    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        self.frame_log = []
        yield from super().track(chunks, info, config)

    def _after_frame(self, session, outputs: dict) -> None:
        from serve_app.trackers.sam3.trim import held_bytes

        tracked = int((outputs.get("frame_stats") or {}).get("num_obj_tracked", 0))
        self.frame_log.append(FrameRecord(session.emitted, held_bytes(session.state), tracked,
                                          _cuda_allocated(session.model.device)))

    def call(self, fn, timeout: float | None = None):
        """Run `fn(model)` on the model thread (to read or set model state)."""
        return self._worker.call(fn, timeout)

    @staticmethod
    def sessions_alive() -> int:
        """SAM 3 sessions still reachable anywhere in the process (0 between jobs)."""
        from serve_app.trackers.sam3.session import Session

        gc.collect()
        return sum(isinstance(o, Session) for o in gc.get_objects())


def _cuda_allocated(device) -> int:
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated(device))
