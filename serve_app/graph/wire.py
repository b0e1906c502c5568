"""What crosses replicas in the graph, besides the media values (serve_app/media.py):

- `VideoRef`: the upload, put in Ray's object store once and read by each stage that needs it
  (decoder; encoder for audio and overlay pixels); wrapping the ObjectRef keeps Ray from
  resolving it into every call's arguments. Without Ray (local testing mode) it holds the bytes.
- `PulledChunk`: one chunk of frames the tracker asked the decoder for, with what it cost.
- `JobProgress`: how far the encoder has got, streamed before the result.
- `SegmentResult`: the mp4 (and objects.json) and the per-stage timings, what the graph returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.media import FrameChunk, StageTimings


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


@dataclass
class PulledChunk:
    chunk: FrameChunk
    decode_ms: float = 0.0         # this call's decoding, frames skipped to reach the chunk included
    decoded_at: float = 0.0        # time.time() when it was ready: how far decoding ran ahead
    wasted_frames: int = 0         # frames decoded for this job and never used (see pull.py)
    opened: bool = False           # the replica opened the video for this call
    node: str = ""                 # the Ray node the decoder ran on


@dataclass
class JobProgress:
    frames_done: int
    frames_total: int


@dataclass
class SegmentResult:
    mp4: bytes
    timings: StageTimings
    num_frames: int
    decoder: str = ""
    objects: bytes | None = None   # objects.json, when the job asked for it
