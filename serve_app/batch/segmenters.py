"""What runs a batch's jobs: the deployed app's handle (a driver on a running cluster, or the
embedded graph), or every stage in this process. Each answers the same two calls: `put` the
input's bytes where the jobs read them, and `submit` a job, whose call has `result()` and
`cancel()` (a Serve DeploymentResponse as it is)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from serve_app.contract import JobConfig, Limits
from serve_app.errors import ModelUnavailable
from serve_app.graph.wire import SegmentResult


class Call(Protocol):
    def result(self, timeout_s: float | None = None) -> SegmentResult: ...
    def cancel(self) -> None: ...


class Segmenter(Protocol):
    jobs_at_once: int   # the jobs it runs at once: the batch's default in flight
    max_bytes: int      # the largest input it takes: larger ones are refused unread
    def put(self, data: bytes) -> Any: ...
    def submit(self, video: Any, config: JobConfig) -> Call: ...


class HandleSegmenter:
    """The app's handle API (api/ingress.py): inputs go into the object store once (`ray.put`),
    and the stages read them from there."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        try:
            capacity = handle.capacity.remote().result(timeout_s=120)
        except AttributeError:  # an app from before `capacity`: its defaults
            capacity = {"jobs_at_once": 2, "max_bytes": Limits().max_bytes}
        self.jobs_at_once, self.max_bytes = int(capacity["jobs_at_once"]), int(capacity["max_bytes"])

    def put(self, data: bytes) -> Any:
        import ray

        return ray.put(data)

    def submit(self, video: Any, config: JobConfig) -> Call:
        return self.handle.segment_result.remote(video, config)


def connect(address: str, app: str) -> HandleSegmenter:
    """Join the Ray cluster at `address` ("auto": the one on this machine, or RAY_ADDRESS in a Ray
    job) as a driver, and take app `app`'s handle. ModelUnavailable, in one line, when either
    cannot be found."""
    import ray
    from ray import serve

    _reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:  # ConnectionError, or whatever a bad address makes Ray raise
        raise ModelUnavailable(f"cannot reach the Ray cluster at {address!r}: {_line(exc)}") from None
    try:
        handle = serve.get_app_handle(app)
    except Exception as exc:  # RayServeException: no such application; or no Serve at all
        raise ModelUnavailable(f"no app {app!r} runs on the Ray cluster at {address!r} ({_line(exc)}); start it "
                               "with `sam3-video serve` or `serve deploy`") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its router's start-up notes would cut into the bar
    return HandleSegmenter(handle)


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT that answers no connection fails here in seconds: Ray's own client retries
    an unreachable GCS for minutes before it gives up."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
    except OSError as exc:
        raise ModelUnavailable(f"cannot reach the Ray cluster at {address!r}: "
                               f"{exc.strerror or 'no answer within %g s' % timeout_s}") from None


def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


class LocalSegmenter:
    """Every stage in this process, no Ray (`--local`; the unit tests): one job at a time on the
    one tracker, the input spooled to a temporary file for the decoder."""

    def __init__(self, tracker: Any, limits: Limits = Limits()) -> None:
        self.tracker, self.limits = tracker, limits
        self.jobs_at_once, self.max_bytes = 1, limits.max_bytes
        self.lock = threading.Lock()  # one model: jobs take turns

    def put(self, data: bytes) -> Any:
        return data

    def submit(self, video: Any, config: JobConfig) -> Call:
        return _LocalCall(self, video, config)

    def run(self, data: bytes, config: JobConfig) -> SegmentResult:
        import os

        from serve_app.pipeline import run_local
        from serve_app.spool import spool_dir, spooled

        with self.lock, spooled(data) as src, spool_dir() as out:
            mp4, objects, frames = os.path.join(out, "out.mp4"), os.path.join(out, "objects.json"), [0]
            timings = run_local(src, mp4, config, self.tracker, self.limits, objects_path=objects
                                if "objects" in config.outputs else None,
                                progress=lambda done, total: frames.__setitem__(0, total))
            with open(mp4, "rb") as f:
                video = f.read()
            found = None
            if "objects" in config.outputs:
                with open(objects, "rb") as f:
                    found = f.read()
        return SegmentResult(video, timings, frames[0], objects=found)


class _LocalCall:
    def __init__(self, segmenter: LocalSegmenter, video: bytes, config: JobConfig) -> None:
        self.segmenter, self.video, self.config = segmenter, video, config

    def result(self, timeout_s: float | None = None) -> SegmentResult:
        return self.segmenter.run(self.video, self.config)

    def cancel(self) -> None:
        """A job in this process runs to its end: the batch stops after it."""
