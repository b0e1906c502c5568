"""The graph's stage deployments, thin around the pipeline (serve_app/pipeline.py). Their
options (replicas, GPUs, queues) are set in serve_app/app.py, the one place the graph is bound.

    Encoder.segment ══TrackedBatch stream══► Tracker.track ──chunk calls──► Decoder.chunk
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from serve_app import spool
from serve_app.contract import JobConfig
from serve_app.graph.pull import OpenReaders, RemoteDecoder, node_id
from serve_app.graph.wire import JobProgress, PulledChunk, SegmentResult, VideoRef
from serve_app.media import Deadline, VideoInfo
from serve_app.pipeline import DEFAULT_PRESETS, FrameBuffer, LocalFrames, TrackedBatch, track, write
from serve_app.spool import spool_dir, spooled
from serve_app.trackers import TrackerConfig, build as build_tracker


def give_back_memory() -> None:
    """Return a finished job's freed memory to the OS: glibc keeps freed frame buffers in its
    heap for reuse (docs/design.md, Memory bounds), so a replica would keep its peak for good."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


_END = object()


def stoppable(method: Callable[..., Iterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """A stage's blocking generator method as an async generator method that Serve can stop.

    Serve cannot stop a sync generator method: cancelled, it runs to its end in Serve's thread
    pool (a client gone or an async job deleted, and the tracker still works through the
    whole video). An async one is cancelled or closed; then the blocking generator, stepped
    in a worker thread, is closed as soon as the step it is in has ended, so its cleanup runs
    at once (the tracker's session is freed at its next frame)."""

    @functools.wraps(method)
    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(_in_thread(method(self, *args, **kwargs))) as items:
            async for item in items:
                yield item

    return stream


async def _in_thread(steps: Iterator[Any]) -> AsyncIterator[Any]:
    # One thread for all of a job's steps, as Serve ran the sync generator: what the steps
    # allocate stays in one malloc arena, and a step never finds another thread's state.
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-steps")
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = loop.run_in_executor(thread, next, steps, _END)
            item = await asyncio.shield(pending)
            pending = None
            if item is _END:
                return
            yield item
    finally:
        async def close() -> None:
            if pending is not None:  # a generator cannot be closed while it runs a step
                with contextlib.suppress(BaseException):
                    await pending
            await loop.run_in_executor(thread, steps.close)
            await asyncio.to_thread(thread.shutdown)
            give_back_memory()  # again: what the thread freed as it ended came after the stage's trim

        await asyncio.shield(asyncio.ensure_future(close()))


@serve.deployment(name="Decoder")
class DecoderDeployment:
    """CPU: decodes the chunks trackers ask for, keeping each job's reader open between calls."""

    def __init__(self, chunk_frames: int, readers: int, idle_s: float, ahead: int) -> None:
        from ray.serve.exceptions import RayServeException

        spool.sweep()  # what replicas killed on this node left
        self.readers = OpenReaders(chunk_frames, capacity=readers, idle_s=idle_s, max_stash=ahead)
        self.readers.start_reaper()
        self.node = node_id()
        try:
            serve.get_replica_context()
            self.routed = True
        except RayServeException:  # local testing mode: one replica and no multiplexing support
            self.routed = False

    # The job id as multiplexed model id: the replica serving a job's chunk 0 has Serve route
    # the job's later calls to it (docs/design.md). 16 ids cover the readers kept.
    @serve.multiplexed(max_num_models_per_replica=16)
    async def _register(self, job_id: str) -> str:
        return job_id

    async def chunk(self, video: VideoRef, info: VideoInfo, job_id: str, index: int, chunk_frames: int,
                    prompt_frame: int = 0) -> PulledChunk:
        if self.routed and index == 0:
            await self._register(job_id)
        pulled = await asyncio.to_thread(self.readers.chunk, video, info, job_id, index, chunk_frames, prompt_frame)
        pulled.node = self.node
        if job_id not in self.readers.jobs():  # its last chunk: trim once the chunk has been sent
            asyncio.get_running_loop().call_later(1.0, give_back_memory)
        return pulled

    def close_job(self, job_id: str) -> None:
        self.readers.close(job_id)
        give_back_memory()

    def __del__(self) -> None:
        if hasattr(self, "readers"):
            self.readers.shutdown()


@serve.deployment(name="Tracker")
class TrackerDeployment:
    """GPU: holds the (compiled, warmed) model; streams detections to the encoder."""

    def __init__(self, decoder: RemoteDecoder, tracker: TrackerConfig) -> None:
        # The replica reports ready (and takes requests) only once the model is built and warm.
        self.tracker = build_tracker(tracker)
        self.decoder = decoder
        decoder.prefer_local()

    @stoppable
    def track(self, video: VideoRef, info: VideoInfo, config: JobConfig, deadline: Deadline) -> Iterator[TrackedBatch]:
        try:
            frames = self.decoder.frames(video, info, config.prompt_frame)
            yield from track(self.tracker, frames, info, config, deadline=deadline)
        finally:
            give_back_memory()

    def check_health(self) -> None:
        # SAM 3 runs on one model thread per replica; if it died, Serve must replace the replica.
        check = getattr(self.tracker, "check_health", None)
        if check is not None:
            check()


@serve.deployment(name="Encoder")
class EncoderDeployment:
    """CPU: composites each frame's kept objects and encodes the mp4."""

    def __init__(self, tracker: Any, presets: dict[str, str]) -> None:
        spool.sweep()  # what replicas killed on this node left
        self.tracker = tracker
        self.presets = {**DEFAULT_PRESETS, **presets}  # libx264 preset by mode

    @stoppable
    def segment(self, video: VideoRef, info: VideoInfo, config: JobConfig,
                deadline: Deadline) -> Iterator[JobProgress | SegmentResult]:
        """Streams how far it has got (from its first frame on, every `PROGRESS_S`), then the result."""
        batches = self.tracker.options(stream=True).track.remote(video, info, config, deadline)
        try:
            with spooled(video.get()) as src, spool_dir() as tmp:
                # Overlay pixels are decoded here rather than sent on by the tracker: a decode
                # costs less than a frame's trip through the object store (docs/design.md).
                source = LocalFrames(src, info) if config.mode == "overlay" else None
                dst, objects = os.path.join(tmp, "out.mp4"), os.path.join(tmp, "objects.json")
                steps = write(batches, source and FrameBuffer(source), info, config, src, dst,
                              preset=self.presets[config.mode], deadline=deadline,
                              objects_path=objects if "objects" in config.outputs else None)
                try:
                    timings = yield from _every(steps, info.num_frames, PROGRESS_S)
                finally:
                    steps.close()
                    if source is not None:
                        source.close()
                result = SegmentResult(_read(dst), timings, info.num_frames, info.decoder,
                                       _read(objects) if "objects" in config.outputs else None)
        finally:
            batches.cancel()  # the tracker stops at its next frame if this ended early
            give_back_memory()
        yield result


PROGRESS_S = 0.5


def _every(steps, total: int, seconds: float):
    """`write`'s steps, passed on as JobProgress at most every `seconds`; returns its timings."""
    last = 0.0
    while True:
        try:
            done = next(steps)
        except StopIteration as end:
            return end.value
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            yield JobProgress(done, total)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
