"""The one thread that owns the model, and the queues between it and the requests.

SAM 3 must be built and called on one thread: building it enters a bf16 autocast on that
thread only (upstream #329), and its sessions and lazy caches are not thread-safe. So each
replica starts one `ModelWorker` thread that builds the model and then runs tasks from a
bounded queue, one at a time; a request finding the queue full is refused (Overloaded)
rather than queued without bound.

A tracking task talks to the request's thread through a `Feed`: the model thread asks for
frames (`Feed.pull`, which blocks until the request's thread has read the next chunk from its
input) and sends back one result per frame (`Feed.emit`). The request's thread does all the
reading of its input, so a decoder stream is only ever iterated by the thread that owns it,
and frames are read only as fast as the model consumes them. Cancelling a job (the client
went away) makes the model thread stop at its next frame boundary: the next `pull` or
`checkpoint` raises `Cancelled`.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
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


class Feed:
    """One tracking task's two queues, between its request's thread and the model thread."""

    def __init__(self) -> None:
        self.to_request: queue.Queue = queue.Queue()  # NEED_FRAMES | result | DONE | BaseException
        self.to_model: queue.Queue = queue.Queue()    # FrameChunk | None (input ended) | _CANCEL
        self.cancelled = threading.Event()
        self.finished = threading.Event()             # the model thread is done with this feed
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

    # -- request thread --------------------------------------------------------------------
    def cancel(self) -> bool:
        """Stop the job; True if the model thread had started it (wait for `finished`)."""
        with self._lock:
            self.cancelled.set()
            self.to_model.put(_CANCEL)
            return self._started


class _Task:
    def __init__(self, fn: Callable[[Any], Any], feed: Feed | None) -> None:
        self.fn, self.feed = fn, feed
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ModelWorker:
    """Builds the model with `build()` on its own thread, then runs submitted tasks there."""

    def __init__(self, build: Callable[[], Any], max_pending: int = 4, name: str = "sam3-model") -> None:
        self.max_pending = max_pending
        self._tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self.model: Any = None
        self._thread = threading.Thread(target=self._main, args=(build,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> None:
        if not self.alive():
            raise ModelUnavailable("the SAM 3 model thread has stopped; this replica must be restarted")

    def _main(self, build: Callable[[], Any]) -> None:
        try:
            self.model = build()
        except BaseException as exc:  # reported to the constructor's caller
            self._build_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            try:
                if task.feed is not None and not task.feed.start():
                    raise Cancelled()
                task.result = task.fn(self.model)
            except Cancelled:
                pass
            except BaseException as exc:
                # The traceback's frames hold the failed session (its outputs, SAM 3's hotstart
                # buffer of masks) until the next task: keep the lines, drop the variables.
                traceback.clear_frames(exc.__traceback__)
                task.error = exc
                if task.feed is not None:
                    task.feed.emit(exc)
            finally:
                task.done.set()
                if task.feed is not None:
                    task.feed.finished.set()

    def submit(self, fn: Callable[[Any], Any], feed: Feed | None = None) -> _Task:
        """Queue `fn(model)` to run on the model thread; refuse if the queue is full."""
        self.check()
        task = _Task(fn, feed)
        try:
            self._tasks.put_nowait(task)
        except queue.Full:
            raise Overloaded(f"{self.max_pending} jobs are already waiting for this SAM 3 replica; retry later") from None
        return task

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run `fn(model)` on the model thread and return its result (warm-up, measurements)."""
        task = self.submit(fn)
        if not task.done.wait(timeout):
            raise ModelError(f"the SAM 3 model thread did not answer within {timeout} s")
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            self._tasks.put(_STOP)
            self._thread.join(timeout)
        if not self.alive():
            self.model = None  # the weights go with the thread


def stream(worker: ModelWorker, fn: Callable[[Any, Feed], None], chunks: Iterable[FrameChunk]) -> Iterator[Any]:
    """Run `fn(model, feed)` on the model thread, feeding it `chunks` as it pulls them and
    yielding what it emits, until it emits DONE. Runs on the request's thread.

    Closing the generator (or an error from `chunks`) cancels the job; if the model thread had
    started it, this waits until `fn` has returned, so its resources are released by then.
    Errors raised by `fn` arrive here as ModelError (or as the ServiceError they were).
    """
    feed = Feed()
    worker.submit(lambda model: fn(model, feed), feed)
    source = iter(chunks)
    try:
        while True:
            try:
                message = feed.to_request.get(timeout=1.0)
            except queue.Empty:
                worker.check()
                continue
            if message is NEED_FRAMES:
                feed.to_model.put(next(source, None))
            elif message is DONE:
                return
            elif isinstance(message, BaseException):
                if isinstance(message, ServiceError):
                    raise message
                raise ModelError(f"SAM 3 failed: {type(message).__name__}: {message}") from message
            else:
                yield message
    finally:
        if feed.cancel():
            feed.finished.wait()
