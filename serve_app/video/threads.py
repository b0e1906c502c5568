"""Run a stage in a thread of its own so that decode, track and encode overlap in one process.

FFmpeg (PyAV, decord), OpenCV and most of numpy release the GIL while they work, so on two
cores a decode thread and an encode thread beside the tracking thread take a job from the sum
of its stages towards the slowest one. Queues are bounded: memory stays a few items per stage,
whatever the video's length. Each helper counts the seconds its thread was busy (not waiting),
which is what the stage timings report.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()
_POLL_S = 0.1  # how often a blocked thread looks for a stop request


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Iterates `items` in a background thread, at most `depth` items ahead of the consumer.

    Iterating this object yields the same items in the same order and re-raises the producer's
    exception at the point it happened. `close()` (also on garbage collection of an abandoned
    iteration, via the generator's close) stops the producer and closes `items` in its thread.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2, name: str = "read-ahead") -> None:
        self.busy_s = 0.0      # time the producer spent producing
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[Any]) -> None:
        iterator = iter(items)
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self._put(_DONE)
                    return
                finally:
                    self.busy_s += time.perf_counter() - t
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class WriteBehind:
    """Calls `consume(item)` for each `put(item)` in a background thread, in order.

    `put` blocks once `depth` items are waiting, so a slow consumer slows the producer instead
    of piling up memory. A consumer failure is raised by the next `put` or by `close`.
    `close()` waits until every item is consumed.
    """

    def __init__(self, consume: Callable[[Any], None], depth: int = 8, name: str = "write-behind") -> None:
        self.busy_s = 0.0
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._failure is not None:
                continue  # drain: the producer learns of the failure on its next put
            t = time.perf_counter()
            try:
                self._consume(item)
            except BaseException as exc:
                self._failure = exc
            finally:
                self.busy_s += time.perf_counter() - t

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def put(self, item: Any) -> None:
        self._raise_failure()
        self._queue.put(item)

    def close(self, raise_failure: bool = True) -> None:
        """Waits for the queued items; raises the consumer's failure, if any and if asked."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        if raise_failure:
            self._raise_failure()
