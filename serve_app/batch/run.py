"""The batch: every item through a Segmenter, bounded, retried, resumable, with one progress bar.

Worker threads take items in manifest order. Each checks whether its item is done already
(dest.Dest.done), reads the input into memory and puts it where the jobs read it (the object
store), then runs its job while holding one of `inflight` slots: at most `inflight` jobs are in
the graph at once (by default what the graph runs at once), and `read_ahead` more threads read
the next inputs and write finished outputs meanwhile, so the graph is not idle between jobs.

- A refusal (4xx: not a video, over a limit, a bad config) fails that input with its code and
  message; the batch goes on.
- A 5xx, a lost replica or any unexpected error is tried again after 2, 4, 8, ... s, `retries`
  times; 429 (the graph's queues are full) waits its Retry-After without counting, for up to an
  hour.
- A DEST that cannot be written stops the batch (every later input would fail the same way),
  and so do `max(5, 2 x inflight)` inputs in a row that failed all their tries with a 5xx or a
  lost replica: the graph is down, and going on would fail the whole manifest overnight.
- Ctrl-C or SIGTERM stops it: jobs in flight are cancelled, results.jsonl is written for what
  finished, and a rerun does the rest.
"""

from __future__ import annotations

import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.batch.dest import RESULTS, Dest, Source
from serve_app.batch.manifest import Item
from serve_app.batch.segmenters import Segmenter
from serve_app.errors import (InputUnreadable, ModelError, ModelUnavailable, Overloaded, ServiceError, UploadTooLarge,
                              http_status)

CHECKPOINT_S = 10.0         # results.jsonl is rewritten this often while the batch runs
OVERLOAD_PATIENCE_S = 3600  # an input refused with 429 for this long fails (code overloaded)


@dataclass
class Outcome:
    item: Item
    status: str                 # done | skipped | failed
    frames: int | None = None
    seconds: float = 0.0        # from its first job's start (not its wait for a slot) to its outputs written
    attempts: int = 0
    code: str | None = None
    error: str | None = None
    tried_out: bool = False     # failed every try with a 5xx or a lost replica (not the input's fault)

    def line(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.item.input, "output": self.item.output, "status": self.status}
        if self.status == "failed":
            out["code"], out["error"] = self.code, self.error
        return out | {"frames": self.frames, "seconds": round(self.seconds, 3), "attempts": self.attempts}


@dataclass
class Report:
    total: int
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0

    def lines(self) -> list[dict[str, Any]]:
        return [self.outcomes[i].line() for i in sorted(self.outcomes)]


class _Stopped(Exception):
    pass


class _DestFailed(Exception):
    def __init__(self, error: ServiceError) -> None:
        super().__init__(error)
        self.error = error


class Batch:
    def __init__(self, items: list[Item], dest: Dest, segmenter: Segmenter, *, inflight: int | None = None,
                 read_ahead: int = 2, retries: int = 3, backoff_s: float = 2.0, show_progress: bool = True) -> None:
        self.items, self.dest, self.segmenter = items, dest, segmenter
        self.inflight = inflight or segmenter.jobs_at_once
        self.read_ahead, self.retries, self.backoff_s = read_ahead, retries, backoff_s
        self.show_progress = show_progress
        self.slots = threading.Semaphore(self.inflight)
        self.stop = threading.Event()
        self.finished: queue.Queue[Outcome] = queue.Queue()
        self.calls: set[Any] = set()
        self.lock = threading.Lock()
        self.pending = iter(items)
        self.fatal: ServiceError | None = None  # why the batch stopped before its end
        self.down_after, self.failing = max(5, 2 * self.inflight), 0  # inputs in a row that tried out

    def run(self) -> Report:
        """Runs the batch; raises KeyboardInterrupt after writing what finished when stopped, and
        the DEST's error when it cannot be written."""
        from serve_app.batch.progress import Progress

        report, start = Report(len(self.items)), time.monotonic()
        self.dest.start()
        progress = Progress(len(self.items), self.show_progress)
        threads = [threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
                   for i in range(self.inflight + self.read_ahead)]
        for t in threads:
            t.start()
        written = time.monotonic()
        try:
            while any(t.is_alive() for t in threads) or not self.finished.empty():
                try:
                    outcome = self.finished.get(timeout=0.5)
                    report.outcomes[outcome.item.index] = outcome
                    progress.add(outcome)
                except queue.Empty:
                    pass
                if time.monotonic() - written > CHECKPOINT_S:
                    self.dest.results(report.lines())
                    written = time.monotonic()
        except KeyboardInterrupt:
            report.stopped = True
        finally:
            self._halt(threads)
            while not self.finished.empty():
                outcome = self.finished.get()
                report.outcomes[outcome.item.index] = outcome
            progress.close()
            report.seconds = time.monotonic() - start
            try:
                self.dest.results(report.lines())
            finally:
                self.dest.close()
        if self.fatal is not None or report.stopped:
            report.stopped = True
            if self.show_progress:
                print(summary(report, self.dest), file=sys.stderr)
            raise self.fatal or KeyboardInterrupt()
        return report

    def _halt(self, threads: list[threading.Thread]) -> None:
        """Stop taking items, cancel the jobs in flight, and wait for the workers (their writes
        in progress end whole or not at all)."""
        self.stop.set()
        with self.lock:
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        for t in threads:
            t.join(60)

    def _next(self) -> Item | None:
        with self.lock:
            return None if self.stop.is_set() else next(self.pending, None)

    def _worker(self) -> None:
        while (item := self._next()) is not None:
            start = time.monotonic()
            try:
                outcome = self._one(item, start)
            except _Stopped:
                return
            except _DestFailed as exc:
                self.fatal = exc.error
                self.stop.set()
                return
            except Exception as exc:  # a bug of ours: that input fails, the batch goes on
                outcome = Outcome(item, "failed", seconds=time.monotonic() - start, code="internal_error",
                                  error=f"{type(exc).__name__}: {_line(exc)}")
            self.finished.put(outcome)
            self._watch(outcome)

    def _watch(self, outcome: Outcome) -> None:
        """Stop the batch once the graph looks down: inputs in a row that tried out."""
        if outcome.status == "skipped":
            return
        with self.lock:
            self.failing = self.failing + 1 if outcome.tried_out else 0
            if self.failing >= self.down_after and self.fatal is None:
                self.fatal = ModelUnavailable(
                    f"{self.failing} inputs in a row failed every try (the last: {outcome.code}: {outcome.error}); "
                    "the graph looks down, so the batch stopped: run it again once it is back")
                self.stop.set()

    def _one(self, item: Item, start: float) -> Outcome:
        read: dict[str, Any] = {}

        def content() -> str:  # read once: the check's hash is the job's input too
            try:
                read["data"], read["sha"] = source.read(self.segmenter.max_bytes)
            except (InputUnreadable, UploadTooLarge) as exc:
                read["error"] = exc
            return read.get("sha", "")

        try:
            source = Source.of(item.input)
        except InputUnreadable as exc:
            return Outcome(item, "failed", seconds=time.monotonic() - start, code=exc.code, error=exc.message)
        marker = self._dest(self.dest.done, item, source, content)
        if marker is not None:
            return Outcome(item, "skipped", frames=marker.get("frames"))
        if not read:
            content()
        if "error" in read:
            exc = read["error"]
            return Outcome(item, "failed", seconds=time.monotonic() - start, code=exc.code, error=exc.message)
        self._dest(self.dest.forget, item)
        video = self.segmenter.put(read.pop("data"))  # the object store holds it; this process does not
        result, attempts, failure, start = self._call(item, video)
        del video
        if failure is not None:
            code, error, tried_out = failure
            return Outcome(item, "failed", seconds=time.monotonic() - start, attempts=attempts, code=code, error=error,
                           tried_out=tried_out)
        files = {f"{item.output}.mp4": result.mp4}
        if "objects" in item.config.outputs and result.objects is not None:
            files[f"{item.output}.objects.json"] = result.objects
        self._dest(self.dest.finish, item, source, read["sha"], files, result.num_frames, time.monotonic() - start)
        return Outcome(item, "done", frames=result.num_frames, seconds=time.monotonic() - start, attempts=attempts)

    def _dest(self, method, *args):
        try:
            return method(*args)
        except (OSError, ServiceError) as exc:
            raise _DestFailed(exc if isinstance(exc, ServiceError) else
                              ServiceError(f"--out {self.dest.url} cannot be used: {exc}")) from None

    def _call(self, item: Item, video: Any) -> tuple[Any, int, tuple[str, str, bool] | None, float]:
        """(result, attempts, None, started) or (None, attempts, (code, message, tried out), started),
        `started` when its first job took a slot."""
        attempts, busy_since, started = 0, None, None
        while True:
            attempts += 1
            with self.slots:
                if self.stop.is_set():
                    raise _Stopped
                started = started or time.monotonic()
                call = self.segmenter.submit(video, item.config)
                with self.lock:
                    self.calls.add(call)
                try:
                    return call.result(), attempts, None, started
                except Exception as exc:
                    error = exc
                finally:
                    with self.lock:
                        self.calls.discard(call)
            if self.stop.is_set():
                raise _Stopped
            kind, code, message, wait_s = classify(error)
            if kind == "refused":
                return None, attempts, (code, message, False), started
            if kind == "busy":
                attempts -= 1  # not the input's fault
                busy_since = busy_since or time.monotonic()
                if time.monotonic() - busy_since > OVERLOAD_PATIENCE_S:
                    return None, attempts, (code, f"{message} (refused for {OVERLOAD_PATIENCE_S / 60:.0f} min)",
                                            True), started
            elif attempts > self.retries:
                return None, attempts, (code, f"{message} (after {attempts} attempts)", True), started
            else:
                wait_s = self.backoff_s * 2 ** (attempts - 1) * random.uniform(0.8, 1.2)
            if self.stop.wait(wait_s):
                raise _Stopped


def classify(exc: BaseException) -> tuple[str, str, str, float]:
    """(refused | busy | retry, code, message, seconds to wait) for a job's error, out of Ray's
    wrappers: a 4xx is the input's (refused), 429 the graph's queues (busy), anything else ours
    or the cluster's (retry)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    cause = getattr(exc, "cause", None)  # RayTaskError(X) is an X, but its args are Ray's
    inner = cause if isinstance(cause, ServiceError) else exc
    if isinstance(inner, Overloaded):
        return "busy", inner.code, inner.message, float(inner.retry_after_s)
    if isinstance(exc, BackPressureError):
        return "busy", Overloaded.code, "the graph's queue is full", 5.0
    if isinstance(inner, ServiceError):
        return ("refused" if http_status(inner) < 500 else "retry"), inner.code, inner.message, 0.0
    if isinstance(exc, RayActorError):
        return "retry", ModelError.code, f"a replica died: {_line(exc)}", 0.0
    return "retry", "internal_error", f"{type(exc).__name__}: {_line(exc)}", 0.0


def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def summary(report: Report, dest: Dest, slowest: int = 5, failures: int = 10) -> str:
    """The closing table: done / skipped / failed, throughput, the slowest inputs, the failures."""
    outcomes = list(report.outcomes.values())
    done = [o for o in outcomes if o.status == "done"]
    frames = sum(o.frames or 0 for o in done)
    rows = [f"batch: {len(outcomes)} of {report.total} inputs in {report.seconds:.1f} s"
            + (f" (stopped: {report.total - len(outcomes)} not run; run the same command again to finish them)"
               if report.stopped else ""),
            f"  {'':8} {'videos':>7} {'frames':>10}"]
    for status in ("done", "skipped", "failed"):
        some = [o for o in outcomes if o.status == status]
        rows.append(f"  {status:8} {len(some):>7,} {sum(o.frames or 0 for o in some):>10,}")
    if report.seconds > 0:
        rows.append(f"  {frames / report.seconds:.1f} frames/s, {len(done) / report.seconds:.2f} videos/s done")
    if done:
        rows.append("slowest:")
        for o in sorted(done, key=lambda o: -o.seconds)[:slowest]:
            rows.append(f"  {o.seconds:8.1f} s {o.frames or 0:>7,} frames  {o.item.output}"
                        + (f" ({o.attempts} attempts)" if o.attempts > 1 else ""))
    failed = [report.outcomes[i] for i in sorted(report.outcomes) if report.outcomes[i].status == "failed"]
    if failed:
        rows.append("failed:")
        rows += [f"  {o.item.output}: {o.code}: {o.error}" for o in failed[:failures]]
        if len(failed) > failures:
            rows.append(f"  ... and {len(failed) - failures} more")
    rows.append(f"results: {dest.path(RESULTS) if dest.local else dest.url.rstrip('/') + '/' + RESULTS}")
    return "\n".join(rows)
