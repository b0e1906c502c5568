"""The values the stages pass each other: what the probe learnt, decoded frames, detections, what
each stage cost and when the job must end.

Frames are RGB uint8 in *display* orientation: exactly what a player shows, rotation applied.
The encoder turns them back to the input's coded orientation and writes the same rotation
metadata, so the output has the input's width, height and display matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from fractions import Fraction

import numpy as np

from serve_app.errors import ClientGone, JobTimeout


@dataclass(frozen=True)
class AudioInfo:
    codec: str            # FFmpeg codec name, e.g. "aac", "mp3", "pcm_s16le"
    copyable: bool        # mp4 can hold it as is (else it is transcoded to AAC)


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learned about an accepted upload."""

    width: int                      # coded width (what the encoder must write)
    height: int                     # coded height
    num_frames: int                 # frames a player presents (edit lists applied)
    pts: tuple[int, ...]            # presentation timestamp of each presented frame, in time_base
    time_base: Fraction
    avg_fps: Fraction               # the stream's average frame rate
    rotation: int = 0               # display rotation, degrees counter-clockwise: 0, 90, 180, 270
    codec: str = "h264"
    pix_fmt: str = "yuv420p"
    decoder: str = "decord"         # which decoder the probe chose: "decord" | "pyav"
    audio: AudioInfo | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) of the frames the decoder yields: rotation applied."""
        if self.rotation % 180 == 90:
            return self.height, self.width
        return self.width, self.height


@dataclass
class FrameChunk:
    """Consecutive decoded frames in the order a tracker takes them: `frames[i]` is frame number
    `start + i * step` (step -1 in the backward pass from a prompt frame)."""

    start: int
    frames: np.ndarray              # (n, H, W, 3) uint8 RGB, display orientation
    step: int = 1

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def indices(self) -> range:
        return range(self.start, self.start + self.step * len(self), self.step)

    def backward(self) -> "FrameChunk":
        """A chunk read forward, as a backward pass takes it: its last frame first."""
        return FrameChunk(self.indices()[-1], np.ascontiguousarray(self.frames[::-1]), -self.step)


@dataclass
class Detections:
    """The objects found on one frame. Conventions follow SAM 3's own outputs."""

    frame_index: int
    obj_ids: np.ndarray             # (N,) int64, stable across frames for one tracked object
    scores: np.ndarray              # (N,) float32 in [0, 1]
    boxes_xywh: np.ndarray          # (N, 4) float32, normalised to [0, 1] of display width/height
    masks: np.ndarray               # (N, H, W) bool at display resolution
    concepts: np.ndarray | None = None  # (N,) int16: each object's index in the job's concepts; -1 boxes alone

    @classmethod
    def empty(cls, frame_index: int, height: int, width: int) -> "Detections":
        return cls(
            frame_index=frame_index,
            obj_ids=np.zeros((0,), np.int64),
            scores=np.zeros((0,), np.float32),
            boxes_xywh=np.zeros((0, 4), np.float32),
            masks=np.zeros((0, height, width), bool),
        )

    def __len__(self) -> int:
        return int(self.obj_ids.shape[0])

    def keep(self, min_score: float, most: int | None = None) -> "Detections":
        """Only the objects scoring at least `min_score` (the job's confidence_threshold), and
        of those the `most` highest-scoring (ties: the older object)."""
        sel = self.scores >= min_score
        if most is not None and sel.sum() > most:
            ranked = [i for i in np.lexsort((self.obj_ids, -self.scores)) if sel[i]][:most]
            sel = np.zeros_like(sel)
            sel[ranked] = True
        if sel.all():
            return self
        return Detections(self.frame_index, self.obj_ids[sel], self.scores[sel], self.boxes_xywh[sel], self.masks[sel],
                          None if self.concepts is None else self.concepts[sel])

    # Between replicas (tracker -> encoder) masks travel bit-packed: 8x fewer bytes.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["masks"] = (np.packbits(self.masks, axis=None), self.masks.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        bits, shape = state.pop("masks")
        masks = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
        self.__dict__.update(state, masks=masks)


STAGES = ("probe", "decode", "track", "composite", "encode", "total")
OWNER_CHECK_S = 2.0
CHUNK_BYTES = 64 << 20  # a chunk's decoded frames at most: 16 frames of 720p, 10 of 1080p, 2 of 4K


def chunk_frames_for(info: VideoInfo, most: int = 16) -> int:
    """Frames per chunk for this video: at most `most`, and no more than CHUNK_BYTES decoded."""
    width, height = info.display_size
    return max(1, min(most, CHUNK_BYTES // (width * height * 3)))


def chunk_plan(num_frames: int, size: int, prompt_frame: int = 0) -> list[tuple[int, int, int]]:
    """(first frame, frames, step) of each chunk, in the order the tracker takes them: forward
    from the prompt frame to the last, then backward from the frame before it to the first, as
    SAM 3 propagates "both" ways. With the prompt on frame 0: every chunk, forward."""
    plan = [(first, min(size, num_frames - first), 1) for first in range(prompt_frame, num_frames, size)]
    return plan + [(end - 1, min(size, end), -1) for end in range(prompt_frame, 0, -size)]


@dataclass
class StageTimings:
    """Milliseconds each stage of one job spent working (not waiting), and how its frames were
    pulled. Reported as x-<stage>-ms headers, metrics and the job's log line."""

    probe_ms: float = 0.0
    decode_ms: float = 0.0
    track_ms: float = 0.0
    composite_ms: float = 0.0
    encode_ms: float = 0.0
    total_ms: float = 0.0
    decode_opens: int = 0           # times a decoder opened the video for this job (1 at best)
    decode_wasted_frames: int = 0   # frames decoded for this job and never used
    decode_lead_chunks: int = 0     # most chunks decoded ahead of the tracker at one time
    decode_cross_node_bytes: int = 0  # decoded frames that reached the tracker from another node


@dataclass(frozen=True)
class Deadline:
    """When a job must be done by (time.time()); every stage checks it between frames. With an
    `owner` (the actor that asked for the job: its ingress replica), the check also stops a job
    whose owner has died, within OWNER_CHECK_S: nobody is left to take its answer."""

    at: float
    seconds: float  # the job's allowance, for the message
    owner: Any = None
    _checked: list[float] = field(default_factory=lambda: [time.monotonic()], compare=False, repr=False)

    def check(self, frame: int) -> None:
        if time.time() > self.at:
            raise self.passed(frame)
        if self.owner is not None and time.monotonic() - self._checked[0] > OWNER_CHECK_S:
            from serve_app.ray_compat import actor_alive

            self._checked[0] = time.monotonic()
            if not actor_alive(self.owner):
                raise ClientGone(f"the replica that asked for this job is gone; stopped at frame {frame}")

    def passed(self, frame: int | None = None) -> JobTimeout:
        where = "" if frame is None else f" at frame {frame}"
        return JobTimeout(f"the job ran past its {self.seconds:g} s deadline{where} and was stopped; "
                          "send a shorter video or try again later")
