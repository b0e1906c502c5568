"""The whole job in one process: probe -> decode -> track -> composite -> encode.

The Ray graph runs the same stages in separate deployments; `composite_and_encode` is the
piece both share, so the local path and the served path cannot drift apart.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from serve_app.contract import JobConfig
from serve_app.errors import ModelError
from serve_app.trackers import Tracker
from serve_app.types import Detections, FrameChunk, Limits, StageTimings, VideoInfo

Progress = Callable[[int, int], None]  # (frames written, frames in all)

# libx264 preset per mode. A black-and-white mask is trivial to compress: ultrafast halves its
# encode time (0.79 vs 1.63 s of CPU for 300 masks at 720p, measured) for a file 1.8x larger
# (38 vs 21 KB per second) that still thresholds back at 128 without a wrong pixel. Overlay
# pictures are real footage, where the slower preset's quality per byte is worth it.
DEFAULT_PRESETS = {"mask": "ultrafast", "overlay": "veryfast"}


class FrameBuffer:
    """Passes decoded chunks to the tracker and keeps them until their detections come back.

    The tracker may lag behind its input (SAM 3 holds outputs back `hotstart_delay` frames), so
    a frame is released only when the compositor has taken it; memory is bounded by that lag.
    With `keep=False` (mask mode) nothing is kept: the mask needs no pixels.
    `wait_s` is the time the tracker spent waiting for the next chunk.
    """

    def __init__(self, chunks: Iterable[FrameChunk], keep: bool) -> None:
        self._chunks = iter(chunks)
        self._keep = keep
        self._held: deque[FrameChunk] = deque()
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[FrameChunk]:
        while True:
            t = time.perf_counter()
            chunk = next(self._chunks, None)
            self.wait_s += time.perf_counter() - t
            if chunk is None:
                return
            if self._keep:
                self._held.append(chunk)
            yield chunk

    def frame(self, index: int) -> np.ndarray | None:
        if not self._keep:
            return None
        while self._held and self._held[0].start + len(self._held[0]) <= index:
            self._held.popleft()
        if not self._held or self._held[0].start > index:
            raise ModelError(f"frame {index} was asked for after it was released")
        head = self._held[0]
        return head.frames[index - head.start]


def composite_and_encode(
    detections: Iterable[Detections],
    frame_at: Callable[[int], np.ndarray | None],
    info: VideoInfo,
    config: JobConfig,
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    progress: Progress | None = None,
    timings: StageTimings | None = None,
    preset: str | None = None,
) -> StageTimings:
    """Render each frame's kept objects and write the mp4 (audio taken from `src_path`).

    `detections` must hold exactly one entry per frame, in order; `frame_at(i)` gives frame i
    (RGB, display orientation) in overlay mode and may return None in mask mode. Time spent
    waiting on `detections` is counted as tracking. `preset`: libx264's, default by mode.
    """
    from serve_app.composite import Compositor
    from serve_app.overlap import WriteBehind
    from serve_app.video.encode import Mp4Writer

    timings = timings or StageTimings()
    width, height = info.display_size
    compositor = Compositor(config.mode, config.alpha, height=height, width=width)
    det_iter = iter(detections)
    written = 0
    with Mp4Writer(dst_path, info, audio_source=src_path, preset=preset or DEFAULT_PRESETS[config.mode]) as writer:
        # libx264 and the colour conversion run in their own thread while the next frame is
        # tracked and composited; a few pictures queue at most.
        encoder = WriteBehind(writer.write, depth=4, name="encode")
        try:
            while True:
                t0 = time.perf_counter()
                dets = next(det_iter, None)
                t1 = time.perf_counter()
                timings.track_ms += (t1 - t0) * 1e3
                if dets is None:
                    break
                if dets.frame_index != written:
                    raise ModelError(f"tracker returned frame {dets.frame_index} where frame {written} was due")
                picture = compositor(frame_at(written), dets.keep(config.confidence_threshold))
                timings.composite_ms += (time.perf_counter() - t1) * 1e3
                encoder.put(picture)  # waits while the encoder is behind; its busy time is encode_ms
                written += 1
                if progress is not None:
                    progress(written, info.num_frames)
        except BaseException:
            encoder.close(raise_failure=False)  # the error in hand is the one to report
            raise
        encoder.close()
        t = time.perf_counter()
    timings.encode_ms += encoder.busy_s * 1e3 + (time.perf_counter() - t) * 1e3  # + flush and moov move
    if written != info.num_frames:
        raise ModelError(f"tracker returned {written} frames; the video has {info.num_frames}")
    return timings


def run_local(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    config: JobConfig,
    tracker: Tracker,
    limits: Limits = Limits(),
    progress: Progress | None = None,
    chunk_frames: int = 16,
) -> StageTimings:
    """Segment `src_path` into `dst_path` in this process. Returns per-stage milliseconds."""
    from serve_app.overlap import ReadAhead
    from serve_app.video.decode import iter_chunks
    from serve_app.video.probe import probe

    start = time.perf_counter()
    timings = StageTimings()
    info = probe(src_path, limits)
    timings.probe_ms = (time.perf_counter() - start) * 1e3

    # Decoding runs a couple of chunks ahead in its own thread.
    decoded = ReadAhead(iter_chunks(src_path, info, chunk_frames), depth=2, name="decode")
    frames = FrameBuffer(decoded, keep=config.mode == "overlay")
    detections = tracker.track(frames, info, config)
    try:
        composite_and_encode(detections, frames.frame, info, config, src_path, dst_path, progress, timings)
    finally:
        close = getattr(detections, "close", None)
        if close is not None:
            close()  # a generator tracker frees its session even when we stop early
        decoded.close()
    timings.decode_ms = decoded.busy_s * 1e3
    # Waiting for the next detections includes the tracker waiting for decoded frames.
    timings.track_ms = max(0.0, timings.track_ms - frames.wait_s * 1e3)
    timings.total_ms = (time.perf_counter() - start) * 1e3
    return timings
