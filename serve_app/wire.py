"""What crosses process boundaries in the graph, and the job JSON the HTTP API answers with.

- `VideoRef`: the upload, put in Ray's object store once and read by each stage that needs it
  (decoder, and encoder for audio and overlay pixels); wrapping the ObjectRef keeps Ray from
  resolving it into every call's arguments. Without Ray (local testing mode) it holds the bytes.
- `PackedDetections`: masks bit-packed (8x smaller) for the tracker -> encoder stream.
- `PulledChunk`: one chunk of frames the tracker asked the decoder for, with what it cost.
- `SegmentResult`: the mp4 and the per-stage timings, what the graph returns.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from serve_app.contract import JOB_TYPE, JobConfig
from serve_app.types import Detections, FrameChunk, StageTimings


@dataclass
class VideoRef:
    ref: Any = None          # ray.ObjectRef of the bytes
    data: bytes | None = None

    @classmethod
    def put(cls, data: bytes) -> "VideoRef":
        import ray

        if ray.is_initialized():
            return cls(ref=ray.put(data))
        return cls(data=data)

    def get(self) -> bytes:
        if self.data is not None:
            return self.data
        import ray

        return ray.get(self.ref)


@contextmanager
def spooled(video: VideoRef | bytes) -> Iterator[str]:
    """The video's bytes as a temporary file (decord and PyAV read paths best)."""
    data = video.get() if isinstance(video, VideoRef) else video
    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        del data
        yield path
    finally:
        os.unlink(path)


@dataclass
class PulledChunk:
    chunk: FrameChunk
    decode_ms: float = 0.0         # this call's decoding, frames skipped to reach the chunk included
    decoded_at: float = 0.0        # time.time() when it was ready: how far decoding ran ahead
    wasted_frames: int = 0         # frames decoded for this job and never used (see pull.py)
    opened: bool = False           # the replica opened the video for this call


@dataclass
class PackedDetections:
    frame_index: int
    obj_ids: np.ndarray
    scores: np.ndarray
    boxes_xywh: np.ndarray
    bits: np.ndarray               # np.packbits of the (N, H, W) masks
    shape: tuple[int, int, int]

    @classmethod
    def pack(cls, dets: Detections) -> "PackedDetections":
        return cls(dets.frame_index, dets.obj_ids, dets.scores, dets.boxes_xywh,
                   np.packbits(dets.masks, axis=None), tuple(dets.masks.shape))

    def unpack(self) -> Detections:
        n = int(np.prod(self.shape))
        masks = np.unpackbits(self.bits, count=n).astype(bool).reshape(self.shape)
        return Detections(self.frame_index, self.obj_ids, self.scores, self.boxes_xywh, masks)


@dataclass
class StageReport:
    """Sent by a stage after its last item: what it measured."""

    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SegmentResult:
    mp4: bytes
    timings: StageTimings
    num_frames: int
    decoder: str = ""


def new_request_id() -> str:
    return uuid.uuid4().hex


def job_json(request_id: str, config: JobConfig | dict | None, created: float, *,
             timings: StageTimings | None = None, error: str | None = None) -> dict[str, Any]:
    """The job JSON the API answers with (the `job` part of a multipart answer)."""
    now = time.time()
    cfg = config.model_dump() if isinstance(config, JobConfig) else (config or {})
    body: dict[str, Any] = {
        "id": request_id,
        "type": JOB_TYPE,
        "config": cfg,
        "state": {"current": "failed" if error else "completed"},
        "created_at": _iso(created),
        "updated_at": _iso(now),
        "metrics": {"elapsed": round(now - created, 3)},
    }
    if timings is not None:
        body["metrics"].update({k: round(v, 1) for k, v in asdict(timings).items() if k != "extra"})
    if error is not None:
        body["error"] = error
    return body


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
