"""Frames travel decoder -> tracker by pull: the tracker asks for chunk k, a few chunks ahead
(docs/design.md: Serve streams have no backpressure).

- Decoder side, `OpenReaders`: each replica keeps one open reader per job, positioned at the
  next chunk, so in-order calls cost one chunk's decode. Nothing depends on routing: a replica
  without the job's reader opens the video and decodes forward to the chunk, skipping frames
  without converting them.
- Tracker side, `RemoteDecoder.frames()`: a FrameSource (serve_app/pipeline.py) that keeps at
  most `ahead` calls in flight beyond the chunk the tracker is on.
"""

from __future__ import annotations

import threading
import time
import uuid
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from typing import Any

from serve_app.errors import ModelError
from serve_app.graph.wire import PulledChunk, VideoRef
from serve_app.media import FrameChunk, StageTimings, VideoInfo, chunk_frames_for, chunk_plan
from serve_app.ray_compat import prefer_local_routing
from serve_app.spool import spooled


class _OpenVideo:
    """One job's video, open at the next chunk of its plan (media.chunk_plan: forward from the
    prompt frame, then backward). Every method but `close` runs with `lock` held."""

    def __init__(self, video: VideoRef, info: VideoInfo, chunk_frames: int, max_stash: int, prompt_frame: int) -> None:
        self.lock = threading.Lock()
        self.video, self.info, self.chunk_frames, self.max_stash = video, info, chunk_frames, max_stash
        self.plan = chunk_plan(info.num_frames, chunk_frames, prompt_frame)
        self.forward = {first: i for i, (first, _, step) in enumerate(self.plan) if step == 1}
        self.served: set[int] = set()
        self.reader = None
        self.path: str | None = None
        self.files = ExitStack()
        # Chunks decoded on the way to a later one that was asked for first: prefetch calls may
        # arrive out of order, and the earlier one is on its way.
        self.stash: dict[int, FrameChunk] = {}
        self.closed = False
        self.last_used = 0.0

    def serve(self, index: int) -> tuple[FrameChunk, int, bool]:
        """(chunk `index` of the plan, frames decoded here for nothing, whether the video was
        opened for it). Frames are decoded for nothing when another replica served earlier
        chunks of the job (a backward chunk's way from its keyframe is not counted)."""
        self.served.add(index)
        wasted = 0
        for stale in [i for i in self.stash if i < index - self.max_stash]:
            wasted += len(self.stash.pop(stale))  # passed by the tracker: another replica served it
        if index in self.stash:
            return self.stash.pop(index), wasted, False
        first, count, step = self.plan[index]
        if self.closed or (step == 1 and self.reader is not None and self.reader.position > first):
            return self._once(index)  # behind this reader (or evicted): leave it where it is
        opened = self._open_reader()
        if step == -1:  # backward: the frames before the one read last, from the keyframe before them
            self.reader.seek(first - count + 1)
            return self.reader.read(count).backward(), wasted, opened
        gap = (first - self.reader.position) // self.chunk_frames
        if opened or gap > self.max_stash:
            wasted += first - self.reader.position
            self.reader.skip(first - self.reader.position)
        else:
            while self.reader.position < first:
                chunk = self.reader.read(min(self.chunk_frames, first - self.reader.position))
                if chunk.start in self.forward:
                    self.stash[self.forward[chunk.start]] = chunk
        return self.reader.read(count), wasted, opened

    def done(self) -> bool:
        """The plan's last chunk served (the video's end, or its first frames after a backward
        pass), and none kept for a call still on its way."""
        return len(self.plan) - 1 in self.served and not self.stash

    def _open_reader(self) -> bool:
        from serve_app.video.decode import ChunkReader

        if self.reader is not None:
            return False
        self.path = self.files.enter_context(spooled(self.video.get()))
        self.reader = self.files.enter_context(closing(ChunkReader(self.path, self.info, self.chunk_frames)))
        return True

    def _once(self, index: int) -> tuple[FrameChunk, int, bool]:
        from serve_app.video.decode import ChunkReader

        first, count, step = self.plan[index]
        with ExitStack() as files:
            path = self.path if not self.closed else files.enter_context(spooled(self.video.get()))
            reader = files.enter_context(closing(ChunkReader(path, self.info, self.chunk_frames)))
            reader.seek(first if step == 1 else first - count + 1)
            chunk = reader.read(count)
            return (chunk if step == 1 else chunk.backward()), first, True

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.stash.clear()
            self.reader = self.path = None
            self.files.close()


class OpenReaders:
    """The open readers of one decoder replica, by job id: at most `capacity` (least recently
    used closed first), each closed after its last chunk or `idle_s` without a call."""

    def __init__(self, chunk_frames: int = 16, capacity: int = 8, idle_s: float = 60.0, max_stash: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.chunk_frames, self.capacity, self.idle_s, self.max_stash = chunk_frames, capacity, idle_s, max_stash
        self.clock = clock
        self._lock = threading.Lock()
        self._readers: OrderedDict[str, _OpenVideo] = OrderedDict()
        self._stop = threading.Event()

    def chunk(self, video: VideoRef, info: VideoInfo, job_id: str, index: int, chunk_frames: int = 0,
              prompt_frame: int = 0) -> PulledChunk:
        """Chunk `index` of the job's plan (media.chunk_plan: `chunk_frames` frames a chunk,
        forward from `prompt_frame`, then backward); the job's calls all name the same
        `chunk_frames` (default: the replica's) and `prompt_frame`."""
        chunk_frames = chunk_frames or self.chunk_frames
        chunks = len(chunk_plan(info.num_frames, chunk_frames, prompt_frame))
        if not 0 <= index < chunks:
            raise ValueError(f"chunk {index} asked for; the video has {chunks}")
        entry = self._open(video, info, job_id, chunk_frames, prompt_frame)
        try:
            with entry.lock:  # not timed while waiting here: that is another call's decoding
                start = time.perf_counter()
                entry.last_used = self.clock()
                chunk, wasted, opened = entry.serve(index)
                entry.last_used = self.clock()
                busy = time.perf_counter() - start
                done = entry.done()
        except BaseException:
            self.close(job_id, entry)  # a damaged file fails each call alike; nothing to keep
            raise
        if done:
            self.close(job_id, entry)
        return PulledChunk(chunk, busy * 1e3, time.time(), wasted, opened)

    def _open(self, video: VideoRef, info: VideoInfo, job_id: str, chunk_frames: int, prompt_frame: int) -> _OpenVideo:
        with self._lock:
            entry = self._readers.get(job_id)
            if entry is None:
                entry = self._readers[job_id] = _OpenVideo(video, info, chunk_frames, self.max_stash, prompt_frame)
            elif info.pts and not entry.info.pts:  # the call that brings timestamps (to seek by)
                entry.info = info
            entry.last_used = self.clock()  # not idle: it must not expire below
            self._readers.move_to_end(job_id)
            gone = self._expired_locked()
            while len(self._readers) > self.capacity:
                gone.append(self._readers.popitem(last=False)[1])
        for old in gone:
            old.close()  # outside the cache lock: waits for a call in progress on it
        return entry

    def _expired_locked(self) -> list[_OpenVideo]:
        now = self.clock()
        expired = [job for job, s in self._readers.items() if now - s.last_used > self.idle_s]
        return [self._readers.pop(job) for job in expired]

    def close(self, job_id: str, entry: _OpenVideo | None = None) -> None:
        """Closes `job_id`'s video (only if it is still `entry`, when given)."""
        with self._lock:
            current = self._readers.get(job_id)
            if current is None or (entry is not None and current is not entry):
                return
            del self._readers[job_id]
        current.close()

    def sweep(self) -> None:
        """Closes the readers idle for longer than `idle_s`: their trackers are gone."""
        with self._lock:
            gone = self._expired_locked()
        for entry in gone:
            entry.close()

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._readers)

    def start_reaper(self, interval_s: float | None = None) -> None:
        interval = interval_s or max(self.idle_s / 4, 0.05)

        def reap() -> None:
            while not self._stop.wait(interval):
                self.sweep()

        threading.Thread(target=reap, name="decode-reaper", daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            gone, self._readers = list(self._readers.values()), OrderedDict()
        for entry in gone:
            entry.close()


@dataclass
class RemoteDecoder:
    """The tracker's end: a Decoder deployment's handle (build_app binds it) and how to pull."""

    handle: Any
    chunk_frames: int = 16
    ahead: int = 2

    def frames(self, video: VideoRef, info: VideoInfo, prompt_frame: int = 0) -> "PulledFrames":
        return PulledFrames(self, video, info, prompt_frame)

    def prefer_local(self) -> None:
        """Send each job's first call to a decoder on this node when there is one (Serve's
        locality routing, a private handle option of Ray 2.x); the job's later calls follow it
        there by multiplexing, so its frames stay on the node."""
        prefer_local_routing(self.handle)


class PulledFrames:
    """One job's chunks from the Decoder deployment, in order: while the tracker works on chunk
    i, chunks up to i + `ahead` are asked for. `timings` sums each call's decode time and counts
    how the pull went (StageTimings.decode_*)."""

    def __init__(self, remote: RemoteDecoder, video: VideoRef, info: VideoInfo, prompt_frame: int = 0) -> None:
        self.remote, self.video, self.info, self.prompt_frame = remote, video, info, prompt_frame
        self.timings = StageTimings()

    def __iter__(self) -> Iterator[FrameChunk]:
        job_id = uuid.uuid4().hex
        # The job id as multiplexed model id: Serve prefers the replica that holds its reader.
        # The first call goes without it, so locality (prefer_local) picks its replica.
        decoder = self.remote.handle.options(multiplexed_model_id=job_id)
        here = node_id()
        # Reading forward needs no timestamps, and 18,000 of them would travel with every call
        # (~90 KB): they go with the first call and the first backward one, which seek by them.
        bare = replace(self.info, pts=())
        size = chunk_frames_for(self.info, self.remote.chunk_frames)
        plan = chunk_plan(self.info.num_frames, size, self.prompt_frame)
        total, ahead = len(plan), self.remote.ahead
        timed = {0, next((i for i, (_, _, step) in enumerate(plan) if step == -1), 0)}
        pending: deque = deque()
        issued = 0
        decoded: list[float] = []
        taken: list[float] = []
        try:
            for index in range(total):
                # Chunk 0 is asked for alone: the replica serving it registers the job with
                # Serve's router, and calls sent before the router knows would land anywhere.
                while issued < min(total, index + 1 + (ahead if index else 0)):
                    via = decoder if issued else self.remote.handle
                    sent = self.info if issued in timed else bare
                    pending.append(via.chunk.remote(self.video, sent, job_id, issued, size, self.prompt_frame))
                    issued += 1
                pulled: PulledChunk = pending.popleft().result()
                if (pulled.chunk.start, pulled.chunk.step) != (plan[index][0], plan[index][2]):
                    raise ModelError(f"decoder returned frame {pulled.chunk.start} for chunk {index}")
                decoded.append(pulled.decoded_at)
                self.timings.decode_ms += pulled.decode_ms
                self.timings.decode_wasted_frames += pulled.wasted_frames
                self.timings.decode_opens += int(pulled.opened)
                if pulled.node != here:
                    self.timings.decode_cross_node_bytes += pulled.chunk.frames.nbytes
                taken.append(time.time())
                yield pulled.chunk
        finally:
            for response in pending:
                response.cancel()
            if len(taken) < total:
                # The job stopped early: free its reader now rather than after the idle timeout.
                decoder.close_job.remote(job_id)
            self.timings.decode_lead_chunks = decode_lead(decoded, taken)


def node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # no Ray here (tests): every chunk is local
        return ""


def decode_lead(decoded: list[float], taken: list[float]) -> int:
    """The most chunks that were decoded and not yet taken by the tracker at any one time, from
    when each chunk was decoded (`decoded[j]`, the decoder's clock) and taken (`taken[i]`).

    Pulling bounds it by `ahead + 1`: the chunks asked for beyond the one the tracker works on,
    and the next one on its way to it."""
    decoded, taken = sorted(decoded), sorted(taken)
    return max((bisect_right(decoded, t) - bisect_right(taken, t) for t in decoded), default=0)
