"""The one thread that owns a model, and the queues between it and the requests.

SAM 3 must be built and called on one thread: building it enters a bf16 autocast on that
thread only (upstream #329), its compiled CUDA graphs belong to the thread that recorded
them, and its sessions and lazy caches are not thread-safe. So each replica starts one
`ModelWorker` thread that builds the model and then runs tasks from a bounded queue; a request
finding the queue full is refused (Overloaded) rather than queued without bound.

Several jobs share the thread frame by frame. A tracking task is a generator that yields at
each frame boundary; the worker holds up to `max_sessions` of them and steps them in turn, one
frame each, preferring one whose next frames have arrived. So a short video is not stuck
behind a long one, and while one job waits for its decoder another uses the model. Anything
a step changes on the shared model (SAM 3's per-job thresholds) it must put back before it
yields. A plain function task runs to its end when its turn comes.

A tracking task talks to the request's thread through a `Feed`: the model thread asks for
frames (`Feed.pull`, which blocks until the request's thread has read the next chunk from its
input) and sends back one result per frame (`Feed.emit`). The request's thread does all the
reading of its input, so a decoder stream is only ever iterated by the thread that owns it;
it keeps one chunk queued ahead of the model, so frames are read only as fast as the model
consumes them, plus one chunk. Cancelling a job (the client went away) makes the model
thread stop it at its next frame boundary: the worker closes its generator, or the next
`pull` or `checkpoint` raises `Cancelled`.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from serve_app.errors import ModelError, ModelUnavailable, Overloaded, ServiceError
from serve_app.media import FrameChunk

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled; raised on the model thread to unwind a session."""


NEED_FRAMES = object()   # model -> request: read the next chunk and send it
DONE = object()          # model -> request: every frame was emitted
_CANCEL = object()       # request -> model: stop
_STOP = object()         # shut the worker down
WAIT_FOR_INPUT_S = 0.05  # how long the model thread waits for some job's frames before blocking on one


class Feed:
    """One tracking task's two queues, between its request's thread and the model thread."""

    def __init__(self) -> None:
        self.to_request: queue.Queue = queue.Queue()  # NEED_FRAMES | result | DONE | BaseException
        self.to_model: queue.Queue = queue.Queue()    # FrameChunk | None (input ended) | _CANCEL
        self.cancelled = threading.Event()
        self.finished = threading.Event()             # the model thread is done with this feed
        # Set by the task: True while its next step needs no new chunk (frames already held).
        self.holding: Callable[[], bool] = lambda: False
        self.arrived: threading.Event | None = None   # the worker's: set when a chunk is queued
        self._lock = threading.Lock()
        self._started = False

    # -- model thread ----------------------------------------------------------------------
    def pull(self) -> FrameChunk | None:
        self.checkpoint()
        self.to_request.put(NEED_FRAMES)
        item = self.to_model.get()
        if item is _CANCEL:
            raise Cancelled()
        return item

    def emit(self, result: Any) -> None:
        self.to_request.put(result)

    def checkpoint(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()

    def start(self) -> bool:
        """Claim the job for the model thread; False if it was cancelled while queued."""
        with self._lock:
            self._started = not self.cancelled.is_set()
            return self._started

    def ready(self) -> bool:
        """Whether the next step can run without waiting for the request's thread."""
        return self.cancelled.is_set() or not self.to_model.empty() or self.holding()

    # -- request thread --------------------------------------------------------------------
    def send(self, chunk: FrameChunk | None) -> None:
        self.to_model.put(chunk)
        if self.arrived is not None:
            self.arrived.set()

    def cancel(self) -> bool:
        """Stop the job; True if the model thread had started it (wait for `finished`)."""
        with self._lock:
            self.cancelled.set()
            self.to_model.put(_CANCEL)
            if self.arrived is not None:
                self.arrived.set()
            return self._started


class _Task:
    def __init__(self, fn: Callable[[Any], Any], feed: Feed | None) -> None:
        self.fn, self.feed = fn, feed
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.steps: Iterator[Any] | None = None  # a session's generator, while it runs

    def ready(self) -> bool:
        return self.feed is None or self.feed.ready()


class ModelWorker:
    """Builds the model with `build()` on its own thread, then runs submitted tasks there,
    up to `max_sessions` generator tasks interleaved frame by frame."""

    def __init__(self, build: Callable[[], Any], max_pending: int = 4, name: str = "model",
                 max_sessions: int = 1, label: str = "tracker") -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_pending = max_pending
        self.max_sessions = max_sessions
        self.label = label
        self._tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self._arrived = threading.Event()
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self.model: Any = None
        self.most_sessions = 0  # the most sessions that were ever interleaved at once
        self._thread = threading.Thread(target=self._main, args=(build,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> None:
        if not self.alive():
            raise ModelUnavailable(f"the {self.label} model thread has stopped; this replica must be restarted")

    # -- the model thread ------------------------------------------------------------------------
    def _main(self, build: Callable[[], Any]) -> None:
        try:
            self.model = build()
        except BaseException as exc:  # reported to the constructor's caller
            self._build_error = exc
            self._ready.set()
            return
        self._ready.set()
        active: deque[_Task] = deque()
        while True:
            while len(active) < self.max_sessions:  # admit waiting tasks while there is room
                try:
                    task = self._tasks.get() if not active else self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is _STOP:
                    for running in active:
                        self._finish(running, ModelUnavailable(f"the {self.label} replica is shutting down"))
                    return
                self._start(task, active)
            if active:
                self._step(self._next(active), active)

    def _start(self, task: _Task, active: deque[_Task]) -> None:
        if task.feed is not None:
            task.feed.arrived = self._arrived
            if not task.feed.start():
                self._finish(task)
                return
        try:
            result = task.fn(self.model)
        except BaseException as exc:
            self._finish(task, exc)
            return
        if isinstance(result, types.GeneratorType):
            task.steps = result
            active.append(task)
            self.most_sessions = max(self.most_sessions, len(active))
        else:
            task.result = result
            self._finish(task)

    def _next(self, active: deque[_Task]) -> _Task:
        """The next session in turn whose input is there; if none has its input yet, wait a
        moment for one, then take the first in turn (its step waits for its frames)."""
        for attempt in range(2):
            for _ in range(len(active)):
                if active[0].ready():
                    return active.popleft()
                active.rotate(-1)
            if attempt == 0 and len(active) > 1:
                self._arrived.clear()
                if any(task.ready() for task in active):
                    continue
                self._arrived.wait(WAIT_FOR_INPUT_S)
        return active.popleft()

    def _step(self, task: _Task, active: deque[_Task]) -> None:
        try:
            if task.feed is not None and task.feed.cancelled.is_set():
                task.steps.close()  # the session's cleanup runs now, on this thread
                self._finish(task)
                return
            next(task.steps)
        except StopIteration as stop:
            task.result = stop.value
            self._finish(task)
        except BaseException as exc:
            self._finish(task, exc)
        else:
            active.append(task)  # the back of the line: every other session steps first

    def _finish(self, task: _Task, exc: BaseException | None = None) -> None:
        task.steps = None
        if exc is not None and not isinstance(exc, Cancelled):
            # The traceback's frames hold the failed session (its outputs, SAM 3's hotstart
            # buffer of masks) until the next task: keep the lines, drop the variables.
            traceback.clear_frames(exc.__traceback__)
            task.error = exc
            if task.feed is not None:
                task.feed.emit(exc)
        task.done.set()
        if task.feed is not None:
            task.feed.finished.set()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], feed: Feed | None = None) -> _Task:
        """Queue `fn(model)` to run on the model thread; refuse if the queue is full."""
        self.check()
        task = _Task(fn, feed)
        try:
            self._tasks.put_nowait(task)
        except queue.Full:
            raise Overloaded(f"{self.max_pending} jobs are already waiting for this {self.label} replica; "
                             "retry later") from None
        return task

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run `fn(model)` on the model thread and return its result (warm-up, measurements)."""
        task = self.submit(fn)
        if not task.done.wait(timeout):
            raise ModelError(f"the {self.label} model thread did not answer within {timeout} s")
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            self._tasks.put(_STOP)
            self._thread.join(timeout)
        if not self.alive():
            self.model = None  # the weights go with the thread


def stream(worker: ModelWorker, fn: Callable[[Any, Feed], Any], chunks: Iterable[FrameChunk]) -> Iterator[Any]:
    """Run `fn(model, feed)` on the model thread, feeding it `chunks` as it pulls them (one
    chunk ahead) and yielding what it emits, until it emits DONE. Runs on the request's thread.
    `fn` may be a generator function: then it is one session, stepped at each of its yields.

    Closing the generator (or an error from `chunks`) cancels the job; if the model thread had
    started it, this waits until `fn` has returned, so its resources are released by then.
    Errors raised by `fn` arrive here as ModelError (or as the ServiceError they were).
    """
    feed = Feed()
    worker.submit(lambda model: fn(model, feed), feed)
    source = iter(chunks)
    try:
        feed.send(next(source, None))  # one chunk ahead: the model's first pull does not wait
        while True:
            try:
                message = feed.to_request.get(timeout=1.0)
            except queue.Empty:
                worker.check()
                continue
            if message is NEED_FRAMES:
                feed.send(next(source, None))
            elif message is DONE:
                _check_unread(feed)
                return
            elif isinstance(message, BaseException):
                if isinstance(message, ServiceError):
                    raise message
                raise ModelError(f"{worker.label} failed: {type(message).__name__}: {message}") from message
            else:
                yield message
    finally:
        if feed.cancel():
            feed.finished.wait()


def _check_unread(feed: Feed) -> None:
    """The chunk read ahead for a model that wanted no more: more frames than the probe counted
    (the model asks for exactly that many), which the caller would otherwise never see."""
    while True:
        try:
            chunk = feed.to_model.get_nowait()
        except queue.Empty:
            return
        if isinstance(chunk, FrameChunk) and len(chunk):
            raise ModelError(f"the decoder sent frames from {chunk.start} on; the probe counted fewer")
