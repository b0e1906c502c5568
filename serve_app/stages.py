"""The three graph stages as plain classes; serve_app/deployments.py wraps each in a deployment.

Frames travel decoder -> tracker, detections tracker -> encoder, the mp4 encoder -> caller.
The tracker pulls frame chunks from the decoder a few chunks ahead (serve_app/pull.py: a Serve
stream would let the decoder run a whole video ahead). The encoder reads the tracker's
detections (bit-packed masks) through a streaming handle: as unbounded as any Serve stream,
but fed by the slowest stage, SAM 3, so what waits in it is only what the encoder has not
caught up on. The stages overlap, so a request takes about as long as its slowest stage.
Nothing but the mp4 comes back to the ingress. Each stream ends with a StageReport carrying
what that stage measured.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from serve_app.contract import JobConfig
from serve_app.trackers import Tracker
from serve_app.types import FrameChunk, StageTimings, VideoInfo
from serve_app.wire import PackedDetections, SegmentResult, StageReport, VideoRef, spooled


class DecodeStage:
    def __init__(self, chunk_frames: int = 16) -> None:
        self.chunk_frames = chunk_frames

    def decode(self, video: VideoRef, info: VideoInfo) -> Iterator[FrameChunk | StageReport]:
        from serve_app.video.decode import iter_chunks

        busy = 0.0  # time spent decoding, not waiting for the tracker to take a chunk
        with spooled(video) as path:
            chunks = iter_chunks(path, info, self.chunk_frames)
            while True:
                t = time.perf_counter()
                chunk = next(chunks, None)
                busy += time.perf_counter() - t
                if chunk is None:
                    break
                yield chunk
        yield StageReport({"decode_ms": busy * 1e3})


def split_report(items: Iterable[Any], report: dict[str, float]) -> Iterator[Any]:
    """Pass a stream's items on and collect its trailing StageReport into `report`."""
    for item in items:
        if isinstance(item, StageReport):
            report.update(item.timings)
        else:
            yield item


class TrackStage:
    """Pulls frame chunks from the decoder, yields packed detections."""

    def __init__(self, tracker: Tracker, decoder: Any) -> None:
        self.tracker = tracker
        self.decoder = decoder  # a RemoteDecoder (Decoder deployment), or a DecodeStage in-process

    def _chunks(self, video: VideoRef, info: VideoInfo, report: dict[str, float]) -> Iterable[FrameChunk]:
        if isinstance(self.decoder, DecodeStage):
            return split_report(self.decoder.decode(video, info), report)
        return self.decoder.chunks(video, info, report)

    def track(self, video: VideoRef, info: VideoInfo, config: JobConfig) -> Iterator[PackedDetections | StageReport]:
        start = time.perf_counter()
        upstream: dict[str, float] = {}
        detections = self.tracker.track(self._chunks(video, info, upstream), info, config)
        try:
            for dets in detections:
                yield PackedDetections.pack(dets.keep(config.confidence_threshold))
        finally:
            close = getattr(detections, "close", None)
            if close is not None:
                close()  # frees the tracker's session when the caller went away
        total = (time.perf_counter() - start) * 1e3
        # Pulled chunks are decoded while the tracker works: only its waits for them are not tracking.
        waited = upstream.pop("decode_wait_ms", upstream.get("decode_ms", 0.0))
        upstream["track_ms"] = max(0.0, total - waited)
        yield StageReport(upstream)


class EncodeStage:
    """Pulls detections from the tracker, composites and encodes; returns the mp4."""

    def __init__(self, tracker: Any, presets: dict[str, str] | None = None) -> None:
        from serve_app.pipeline import DEFAULT_PRESETS

        self.tracker = tracker  # DeploymentHandle (or a TrackStage, in-process)
        self.presets = {**DEFAULT_PRESETS, **(presets or {})}  # libx264 preset by mode

    def _detections(self, video: VideoRef, info: VideoInfo, config: JobConfig) -> Iterable[Any]:
        if isinstance(self.tracker, TrackStage):
            return self.tracker.track(video, info, config)
        return self.tracker.options(stream=True).track.remote(video, info, config)

    def segment(self, video: VideoRef, info: VideoInfo, config: JobConfig) -> SegmentResult:
        from serve_app.pipeline import composite_and_encode
        from serve_app.video.decode import iter_chunks

        timings = StageTimings()
        upstream: dict[str, float] = {}
        stream = self._detections(video, info, config)
        detections = (p.unpack() for p in split_report(stream, upstream))
        with spooled(video) as src, tempfile.TemporaryDirectory() as tmp:
            frame_at = _frame_reader(iter_chunks(src, info)) if config.mode == "overlay" else (lambda i: None)
            dst = os.path.join(tmp, "out.mp4")
            composite_and_encode(detections, frame_at, info, config, src, dst, timings=timings,
                                 preset=self.presets[config.mode])
            with open(dst, "rb") as f:
                mp4 = f.read()
        timings.decode_ms = upstream.get("decode_ms", 0.0)
        timings.track_ms = upstream.get("track_ms", timings.track_ms)
        # How the pull went (serve_app/pull.py): read by the benchmarks and tests.
        timings.extra.update({k: v for k, v in upstream.items() if k.startswith("decode_") and k != "decode_ms"})
        return SegmentResult(mp4=mp4, timings=timings, num_frames=info.num_frames, decoder=info.decoder)


def _frame_reader(chunks: Iterator[FrameChunk]):
    """frame_at(i) for increasing i over a chunk stream: overlay pixels decoded here, locally,
    so frames never cross processes twice."""
    current: list[FrameChunk | None] = [None]

    def frame_at(index: int):
        chunk = current[0]
        while chunk is None or chunk.start + len(chunk) <= index:
            chunk = next(chunks)
            current[0] = chunk
        return chunk.frames[index - chunk.start]

    return frame_at


