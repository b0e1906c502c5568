"""One job, written once: frames -> track -> threshold -> composite -> encode.

The same three pieces run a job in one process (`run_local`: the CLI's --local, tests,
benchmarks) and across the Ray graph (serve_app/graph), where each lives in its own replica:

    FrameSource ──chunks──► track() ──TrackedBatch──► write() ──► mp4
    (decoded frames)        (the tracker, the          (composite, encode)
                             confidence threshold)

- A `FrameSource` yields a video's FrameChunks in order and keeps `timings` of what decoding
  them cost. In one process it is `LocalFrames` (a decode thread); in the graph the tracker
  replica's source pulls chunks from the Decoder deployment (graph/pull.py).
- `track()` runs a tracker over a FrameSource wherever the model lives and yields
  `TrackedBatch`es: consecutive frames' kept detections and the stage timings so far.
- `write()` composites each frame's kept detections and encodes the mp4. Overlays take the
  input's pixels from a `FrameBuffer`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from serve_app.contract import JobConfig, Limits
from serve_app.errors import ModelError
from serve_app.media import Deadline, Detections, FrameChunk, StageTimings, VideoInfo, chunk_frames_for
from serve_app.trackers import Tracker

Progress = Callable[[int, int], None]  # (frames written, frames in all)

# libx264 preset per mode (docs/design.md: a mask compresses trivially at ultrafast).
DEFAULT_PRESETS = {"mask": "ultrafast", "overlay": "veryfast"}
class FrameSource(Protocol):
    """A video's decoded frames, in order, and what decoding them has cost so far."""

    timings: StageTimings

    def __iter__(self) -> Iterator[FrameChunk]: ...


class LocalFrames:
    """Decodes in a thread of this process, up to `ahead` chunks before they are taken, in the
    tracker's order (media.chunk_plan: forward from `prompt_frame`, then backward)."""

    def __init__(self, path: str | os.PathLike, info: VideoInfo, chunk_frames: int = 16, ahead: int = 2,
                 prompt_frame: int = 0) -> None:
        from serve_app.video.decode import iter_plan
        from serve_app.video.threads import ReadAhead

        size = chunk_frames_for(info, chunk_frames)
        self._read = ReadAhead(iter_plan(path, info, size, prompt_frame), depth=ahead, name="decode")

    @property
    def timings(self) -> StageTimings:
        return StageTimings(decode_ms=self._read.busy_s * 1e3)

    def __iter__(self) -> Iterator[FrameChunk]:
        return iter(self._read)

    def close(self) -> None:
        self._read.close()


class FrameBuffer:
    """The input's pixels for overlays, by frame index, read forward.

    In one process the tracker reads its chunks through the buffer, so each decoded frame
    serves both; in the graph nothing else reads them and `frame(i)` reads on. `frame(i)` is the
    compositor's to draw on: the tracker has read frame i before its detections came. A chunk is
    released once the compositor has passed it: memory follows the tracker's lag behind its
    input, not the video's length.
    """

    def __init__(self, source: Iterable[FrameChunk]) -> None:
        self._chunks = iter(source)
        self._source = source
        self._held: deque[FrameChunk] = deque()

    @property
    def timings(self) -> StageTimings:
        return self._source.timings

    def __iter__(self) -> Iterator[FrameChunk]:
        for chunk in self._chunks:
            self._held.append(chunk)
            yield chunk

    def frame(self, index: int) -> np.ndarray:
        while self._held and self._held[0].start + len(self._held[0]) <= index:
            self._held.popleft()
        while not self._held or self._held[-1].start + len(self._held[-1]) <= index:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ModelError(f"frame {index} was asked for past the video's end")
            self._held.append(chunk)
        head = self._held[0]
        if head.start > index:
            raise ModelError(f"frame {index} was asked for after it was released")
        return head.frames[index - head.start]


@dataclass
class TrackedBatch:
    """Consecutive frames' detections, the job's threshold applied, and the tracker stage's
    timings so far (decode and track). What the tracker replica streams to the encoder."""

    detections: list[Detections]
    timings: StageTimings = field(default_factory=StageTimings)


def track(tracker: Tracker, frames: FrameSource, info: VideoInfo, config: JobConfig, *,
          deadline: Deadline | None = None, batch_frames: int = 16, batch_s: float = 0.5) -> Iterator[TrackedBatch]:
    """Run `tracker` over `frames`; batches of up to `batch_frames` frames, or what `batch_s`
    seconds produced. The last batch comes after the input was read to its end, so its timings
    are final. Closing the generator closes the tracker's (a SAM 3 session is freed)."""
    waited = 0.0
    chunks = iter(frames)

    def feed() -> Iterator[FrameChunk]:
        nonlocal waited
        while True:
            t = time.perf_counter()
            chunk = next(chunks, None)
            waited += time.perf_counter() - t
            if chunk is None:
                return
            yield chunk

    source = feed()
    detections = iter(tracker.track(source, info, config))
    busy = 0.0
    batch: list[Detections] = []
    flushed = time.perf_counter()

    def done() -> TrackedBatch:
        nonlocal batch, flushed
        out = TrackedBatch(batch, replace(frames.timings, track_ms=busy * 1e3))
        batch, flushed = [], time.perf_counter()
        return out

    try:
        while True:
            t, w = time.perf_counter(), waited
            dets = next(detections, None)
            busy += time.perf_counter() - t - (waited - w)  # the tracker's own time, not its waits for frames
            if dets is None:
                break
            if deadline is not None:
                deadline.check(dets.frame_index)
            # Every tracker bounds its own objects; this holds a third-party one to the job's too.
            batch.append(dets.keep(config.confidence_threshold, config.max_objects))
            if len(batch) >= batch_frames or time.perf_counter() - flushed >= batch_s:
                yield done()
        for extra in source:  # the tracker asks for no frame past the last; let the source end
            if len(extra):
                raise ModelError(f"the decoder sent frames from {extra.start} on; the probe counted fewer")
        yield done()
    finally:
        for closable in (detections, chunks):
            getattr(closable, "close", lambda: None)()


def write(batches: Iterable[TrackedBatch], frames: FrameBuffer | None, info: VideoInfo, config: JobConfig,
          src_path: str | os.PathLike, dst_path: str | os.PathLike, *, preset: str | None = None,
          objects_path: str | os.PathLike | None = None,
          deadline: Deadline | None = None) -> Generator[int, None, StageTimings]:
    """Composite each frame's detections and encode the mp4 (audio from `src_path`), and with
    `objects_path` write objects.json (video/objects.py).

    `batches` must hold exactly one Detections per frame, in the tracker's order: presentation
    order, or with `config.prompt_frame` forward from it and then backward (those are put back in
    order: `Reordered`). `frames` gives the input's pixels in overlay mode (None in mask mode).
    Yields the frames done so far after each frame (tracked, while they are put in order;
    written); returns the tracker stage's timings with composite and encode added (`finish`)."""
    if not config.prompt_frame:
        return (yield from _written(batches, frames, info, config, src_path, dst_path, preset, objects_path, deadline))
    reordered = Reordered()
    try:
        for batch in batches:
            if deadline is not None:
                deadline.check(len(reordered))
            yield reordered.add(batch)
        return (yield from _written(reordered.replay(info.num_frames), frames, info, config, src_path, dst_path,
                                    preset, objects_path, deadline, done=info.num_frames))
    finally:
        reordered.close()


class Reordered:
    """A prompt frame's detections, which come forward from it and then backward, put back in
    presentation order: kept on disk until frame 0 has come (masks bit-packed and compressed,
    a few KB a frame), so memory stays flat whatever the video's length."""

    def __init__(self) -> None:
        from serve_app.spool import Spool

        self.spill = Spool(suffix=".detections")
        self.where: dict[int, tuple[int, int]] = {}  # frame -> (offset, length) in the spill
        self.timings = StageTimings()

    def __len__(self) -> int:
        return len(self.where)

    def add(self, batch: TrackedBatch) -> int:
        import pickle
        import zlib

        self.timings = batch.timings
        for dets in batch.detections:
            data = zlib.compress(pickle.dumps(dets, protocol=pickle.HIGHEST_PROTOCOL), 1)
            self.where[dets.frame_index] = (self.spill.size, len(data))
            self.spill.write(data)
        return len(self.where)

    def replay(self, num_frames: int) -> Iterator[TrackedBatch]:
        import pickle
        import zlib

        if len(self.where) != num_frames or set(self.where) != set(range(num_frames)):
            raise ModelError(f"tracker returned {len(self.where)} distinct frames; the video has {num_frames}")
        with open(self.spill.done(), "rb") as f:
            for index in range(num_frames):
                offset, length = self.where[index]
                f.seek(offset)
                yield TrackedBatch([pickle.loads(zlib.decompress(f.read(length)))], self.timings)

    def close(self) -> None:
        self.spill.remove()


def _written(batches: Iterable[TrackedBatch], frames: FrameBuffer | None, info: VideoInfo, config: JobConfig,
             src_path: str | os.PathLike, dst_path: str | os.PathLike, preset: str | None,
             objects_path: str | os.PathLike | None, deadline: Deadline | None,
             done: int | None = None) -> Generator[int, None, StageTimings]:
    from serve_app.video.composite import Compositor
    from serve_app.video.encode import Mp4Writer
    from serve_app.video.objects import ObjectsWriter
    from serve_app.video.threads import WriteBehind

    timings, composite_s = StageTimings(), 0.0
    width, height = info.display_size
    # Labels name each object's concept when the job asked for several (`prompts`).
    compositor = Compositor(config.mode, config.alpha, height=height, width=width, in_place=True,
                            concepts=config.concepts if config.prompts is not None else None)
    written = 0
    with Mp4Writer(dst_path, info, audio_source=src_path, preset=preset or DEFAULT_PRESETS[config.mode]) as writer, \
            closing(ObjectsWriter(objects_path, info, config.concepts)) if objects_path else nullcontext() as objects:
        # libx264 and the colour conversion run in their own thread while the next frame is composited.
        encoder = WriteBehind(writer.write, depth=4, name="encode")
        try:
            for batch in batches:
                timings = batch.timings  # the tracker stage's so far
                for dets in batch.detections:
                    if dets.frame_index != written:
                        raise ModelError(f"tracker returned frame {dets.frame_index} where frame {written} was due")
                    if deadline is not None:
                        deadline.check(written)
                    t = time.perf_counter()
                    if objects is not None:
                        objects.add(dets)
                    picture = compositor(frames.frame(written) if frames is not None else None, dets)
                    composite_s += time.perf_counter() - t
                    encoder.put(picture)  # waits while the encoder is behind; its busy time is encode_ms
                    written += 1
                    yield done or written
        except BaseException:
            encoder.close(raise_failure=False)  # the error in hand is the one to report
            raise
        encoder.close()
        t = time.perf_counter()
    if written != info.num_frames:
        raise ModelError(f"tracker returned {written} frames; the video has {info.num_frames}")
    # encode: the encoder thread's busy time, plus the flush and moov move
    return replace(timings, composite_ms=composite_s * 1e3,
                   encode_ms=(encoder.busy_s + time.perf_counter() - t) * 1e3)


def finish(steps: Generator[int, None, StageTimings], total: int, progress: Progress | None = None) -> StageTimings:
    """Run `write`'s steps to the end, telling `progress` (frames written, frames in all)."""
    while True:
        try:
            done = next(steps)
        except StopIteration as end:
            return end.value
        if progress is not None:
            progress(done, total)


def run_local(src_path: str | os.PathLike, dst_path: str | os.PathLike, config: JobConfig, tracker: Tracker,
              limits: Limits = Limits(), progress: Progress | None = None, chunk_frames: int = 16,
              preset: str | None = None, objects_path: str | os.PathLike | None = None) -> StageTimings:
    """Segment `src_path` into `dst_path` (and objects.json into `objects_path`) in this
    process. Returns per-stage milliseconds."""
    from serve_app.video.probe import probe

    start = time.perf_counter()
    info = probe(src_path, limits)
    probe_ms = (time.perf_counter() - start) * 1e3
    config.check_video(info)
    source = LocalFrames(src_path, info, chunk_frames, prompt_frame=config.prompt_frame)
    # Overlay pixels: the tracker's own frames, when it reads in presentation order; else a decode
    # of their own (the tracker's order is the prompt frame's both ways).
    pixels = (LocalFrames(src_path, info, chunk_frames) if config.prompt_frame else source) \
        if config.mode == "overlay" else None
    frames = FrameBuffer(pixels) if pixels is not None else None
    batches = track(tracker, frames if pixels is source else source, info, config)
    try:
        steps = write(batches, frames, info, config, src_path, dst_path, preset=preset, objects_path=objects_path)
        timings = finish(steps, info.num_frames, progress)
    finally:
        batches.close()  # a tracker stopped early frees its session now
        source.close()
        if pixels is not None:
            pixels.close()
    timings.probe_ms = probe_ms
    timings.total_ms = (time.perf_counter() - start) * 1e3
    return timings
