"""Decode exactly the frames a player shows, as RGB uint8 in display orientation.

Two decoders, picked by the probe (`VideoInfo.decoder`, with its reason):
- PyAV: the general path. It applies edit lists (drops discard-flagged frames), handles every
  codec FFmpeg 8 has, and holds a few frames at a time whatever the consumer's pace.
- decord: only for small plain inputs (see probe.py for the measured rules); it returns the
  same pixels as PyAV there.
Either way the frames are counted against the probe: fewer decoded frames than probed means
the file is damaged, and that is an error, never a silently short answer.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterator

import numpy as np

from serve_app.errors import UnsupportedMedia
from serve_app.media import FrameChunk, VideoInfo


def iter_chunks(
    path: str | os.PathLike, info: VideoInfo, chunk_frames: int = 16, start: int = 0
) -> Iterator[FrameChunk]:
    """Yields `FrameChunk`s of up to `chunk_frames` frames, from frame `start` to the last
    (`info.num_frames` in all with `start=0`).

    Frames before `start` are decoded (the codec needs them) but never converted to RGB: a
    decode from `start` costs less than a full one and gives exactly the frames a full decode
    gives from that index. Raises UnsupportedMedia if the file decodes to fewer frames than
    the probe found.
    """
    reader = ChunkReader(path, info, chunk_frames)
    try:
        reader.skip(start)
        while (chunk := reader.read()) is not None:
            yield chunk
    finally:
        reader.close()


def iter_plan(path: str | os.PathLike, info: VideoInfo, chunk_frames: int = 16,
              prompt_frame: int = 0) -> Iterator[FrameChunk]:
    """The video's chunks in the tracker's order (media.chunk_plan): forward from `prompt_frame`,
    then backward from the frame before it, each backward chunk last frame first."""
    from serve_app.media import chunk_plan

    reader = ChunkReader(path, info, chunk_frames)
    try:
        for first, count, step in chunk_plan(info.num_frames, chunk_frames, prompt_frame):
            reader.seek(first if step == 1 else first - count + 1)
            chunk = reader.read(count)
            yield chunk if step == 1 else chunk.backward()
    finally:
        reader.close()


class ChunkReader:
    """A video's presented frames read forward: `skip(n)` passes frames without converting
    them, `read()` returns the next chunk (None after the last frame), `seek(i)` moves back (a
    backward pass reads chunks in reverse). `position` is the index of the next frame."""

    def __init__(self, path: str | os.PathLike, info: VideoInfo, chunk_frames: int = 16) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        self.path, self.info = path, info
        self.chunk_frames = chunk_frames
        self.position = 0
        self._source = _decord_frames if info.decoder == "decord" else _pyav_frames
        self._frames = self._source(path, info)  # (raw frame, its RGB conversion) pairs, lazily

    def seek(self, frame: int) -> None:
        """Moves to `frame`: forward by skipping; back from the keyframe before it, found by its
        timestamp (PyAV, with the probe's timestamps), else by decoding from the start again."""
        if frame >= self.position:
            return self.skip(frame - self.position)
        self._frames.close()
        if self._source is _pyav_frames and len(self.info.pts) == self.info.num_frames:
            self._frames, self.position = _pyav_frames(self.path, self.info, self.info.pts[frame]), frame
        else:
            self._frames, self.position = self._source(self.path, self.info), 0
            self.skip(frame)

    def skip(self, n: int) -> None:
        """Passes the next `n` frames (fewer at the end) without converting them."""
        if n < 0:
            raise ValueError(f"cannot skip {n} frames; a reader only moves forward")
        for _ in range(min(n, self.info.num_frames - self.position)):
            self._next()
            self.position += 1

    def read(self, count: int | None = None) -> FrameChunk | None:
        """The next `count` frames (chunk_frames by default; fewer at the end)."""
        width, height = self.info.display_size
        n = min(count or self.chunk_frames, self.info.num_frames - self.position)
        if n <= 0:
            return None  # the probe's count is the contract; a stray extra frame is not shown
        # A fresh buffer per chunk: the consumer may keep the chunk after the next is made.
        buf = np.empty((n, height, width, 3), np.uint8)
        for i in range(n):
            raw, convert = self._next()
            frame = convert(raw)
            if frame.shape != (height, width, 3):
                raise UnsupportedMedia(
                    f"frame {self.position} decodes as {frame.shape[1]}x{frame.shape[0]}; "
                    f"expected {width}x{height} (the picture size changes mid-stream)"
                )
            buf[i] = frame
            self.position += 1
        return FrameChunk(start=self.position - n, frames=buf)

    def _next(self):
        item = next(self._frames, None)
        if item is None:
            raise UnsupportedMedia(
                f"video is truncated or damaged: {self.position} of {self.info.num_frames} frames decode"
            )
        return item

    def close(self) -> None:
        self._frames.close()  # closes the container (PyAV) or drops the reader (decord)


def _to_display(coded: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return coded
    # Rotation is counter-clockwise, as np.rot90 turns for positive k.
    return np.rot90(coded, k=rotation // 90)


def _pyav_frames(path, info: VideoInfo, from_pts: int | None = None) -> Iterator[tuple[Any, Callable[[Any], np.ndarray]]]:
    """The presented frames, or those from the one presented at `from_pts` on (decoded from the
    keyframe before it; the frames between are decoded, never converted)."""
    import av

    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise UnsupportedMedia(f"video cannot be opened: {exc}") from None
    with container:
        stream = container.streams.video[0]
        # Frame threading: the decoder uses the cores; memory stays a few frames per thread.
        stream.thread_type = "AUTO"

        def convert(frame) -> np.ndarray:
            # No scaling happens, so swscale's interpolation only picks its code path: POINT
            # gives the default's very pixels (tests/unit/test_decode.py), several times faster.
            return _to_display(frame.to_ndarray(format="rgb24", interpolation="POINT"), info.rotation)

        try:
            frames = container.decode(stream) if from_pts is None else _decode_from(container, stream, info, from_pts)
            for frame in frames:
                if from_pts is not None and frame.pts is not None and frame.pts < from_pts:
                    continue
                yield frame, convert
        except av.error.FFmpegError as exc:
            raise UnsupportedMedia(f"video stream is damaged: {exc}") from None


def _decode_from(container, stream, info: VideoInfo, from_pts: int) -> Iterator[Any]:
    """Decoded frames from the one presented at `from_pts` on, decoded from a keyframe before it.
    The demuxer seeks by decode time, which runs behind presentation time where frames are
    reordered, and some files flag keyframes FFmpeg cannot decode from (a real clip's IDR gave
    corrupt frames): a seek that lands past the frame, or whose frames up to it are corrupt, is
    made again from further back, at worst from the start."""
    back = 0
    while True:
        container.seek(from_pts - back, stream=stream, backward=True, any_frame=False)
        frames, sound, first = container.decode(stream), True, None
        for frame in frames:
            if frame.pts is None or frame.pts >= from_pts:
                first = frame
                break
            sound = sound and not frame.is_corrupt
        missed = first is not None and first.pts is not None and (first.pts > from_pts or first.is_corrupt)
        if (sound and not missed) or from_pts - back < info.pts[0]:
            return itertools.chain([first] if first is not None else [], frames)
        back = 2 * back or max(int(1 / info.time_base), 1)  # a second back, then twice as far each time


def _decord_frames(path, info: VideoInfo) -> Iterator[tuple[Any, Callable[[Any], np.ndarray]]]:
    import decord

    try:
        reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
    except decord.DECORDError as exc:
        raise UnsupportedMedia(f"video cannot be opened by decord: {_first_line(exc)}") from None
    total = len(reader)
    try:
        # Sequential next(), skipping by reading: faster than get_batch, and skip_frames()
        # lands on the wrong frame (docs/design.md, Decoders).
        for _ in range(total):
            # decord applies 180-degree rotation itself (quarter turns are routed to PyAV).
            yield reader.next(), _asnumpy
    except decord.DECORDError as exc:
        raise UnsupportedMedia(f"video stream is damaged: {_first_line(exc)}") from None
    except StopIteration:
        return
    finally:
        del reader


def _asnumpy(frame) -> np.ndarray:
    return frame.asnumpy()


def _first_line(exc: BaseException) -> str:
    import re

    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # Drop decord's "[12:00:00] /src/path.cc:123: " prefix: it means nothing to a user.
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1])[:160]
