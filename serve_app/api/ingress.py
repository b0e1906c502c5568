"""The ingress: the one HTTP and handle entry point, and the job service behind both.

`SegmentService` is what the ingress does for a job, without HTTP: auth, the replica's job
slots, the probe, then the graph (the Encoder deployment, which pulls the rest). The routes
(api/routes.py) and the handle API below both call it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from serve_app.api.metrics import StageMetrics
from serve_app.contract import JobConfig, Limits, parse_config, size
from serve_app.errors import ModelError, Overloaded, ServiceError, Unauthorized, UploadTooLarge
from serve_app.graph.wire import SegmentResult, VideoRef

log = logging.getLogger("ray.serve")


@dataclass
class SegmentService:
    encoder: Any                    # the Encoder deployment's handle
    limits: Limits
    tokens: set[str]                # bearer tokens; empty: no auth
    max_inflight: int               # job slots of this replica
    retry_after_s: int
    inflight: int = 0
    metrics: StageMetrics = field(default_factory=StageMetrics)

    def check_auth(self, header: str | None) -> None:
        if not self.tokens:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), t) for t in self.tokens):
            raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")

    @contextmanager
    def job_slot(self):
        """Holds one of this replica's `max_inflight` job slots; with none free, Overloaded
        (429 + Retry-After) at once."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"this replica is running {self.inflight} jobs, the most it takes; retry later",
                             self.retry_after_s)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def run(self, path: str, config: JobConfig, video: VideoRef | None = None) -> SegmentResult:
        """Probe the upload at `path`, then run the graph on it (`video`: the same bytes already
        in the object store, else put from `path` once the probe accepts them)."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        from serve_app.video.probe import probe

        start = time.perf_counter()
        info = await asyncio.to_thread(probe, path, self.limits)
        probe_ms = (time.perf_counter() - start) * 1e3
        if video is None:
            with open(path, "rb") as f:
                video = VideoRef.put(f.read())
        try:
            result: SegmentResult = await self.encoder.segment.remote(video, info, config)
        except BackPressureError:
            raise Overloaded("the segmentation queue is full; retry later", self.retry_after_s) from None
        except (RayActorError, RayTaskError) as exc:
            # What a replica raised, out of Ray's wrappers (whose str() is the remote traceback).
            inner = exc
            while isinstance(inner, RayTaskError) and inner.cause is not None:
                inner = inner.cause
            if isinstance(inner, RayActorError):
                raise _replica_died(inner) from exc
            if isinstance(inner, ServiceError):
                raise type(inner)(*inner.args) from exc
            raise
        result.timings.probe_ms = probe_ms
        result.timings.total_ms = (time.perf_counter() - start) * 1e3
        return result

    async def segment(self, video: Any, config: JobConfig | dict) -> SegmentResult:
        """The handle API's job: `video` is the mp4's bytes or an ObjectRef of them."""
        import ray

        cfg = config if isinstance(config, JobConfig) else parse_config(config)
        with self.job_slot():
            if isinstance(video, ray.ObjectRef):
                data, ref = await video, VideoRef(ref=video)  # the stages read the caller's object
            else:
                data, ref = bytes(video), None
            if len(data) > self.limits.max_bytes:
                raise UploadTooLarge(f"upload is {size(len(data))}; the limit is {size(self.limits.max_bytes)}")
            ref = ref or VideoRef.put(data)  # put only once the size is known to be acceptable
            fd, path = tempfile.mkstemp(suffix=".mp4")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            del data
            try:
                result = await self.run(path, cfg, ref)
            finally:
                os.unlink(path)
        self.finished("handle", 200, result)
        return result

    def finished(self, job_id: str, status: int, result: SegmentResult | None, exc: BaseException | None = None) -> None:
        """The job's one log line and its metrics."""
        self.metrics.count(status)
        if result is not None:
            self.metrics.observe(result.timings)
            t = result.timings
            log.info("job %s %d frames=%d decoder=%s probe=%.0fms decode=%.0fms track=%.0fms composite=%.0fms "
                     "encode=%.0fms total=%.0fms", job_id, status, result.num_frames, result.decoder,
                     t.probe_ms, t.decode_ms, t.track_ms, t.composite_ms, t.encode_ms, t.total_ms)
        elif status >= 500:
            log.error("job %s %d: %s", job_id, status, exc, exc_info=exc)
        else:
            log.info("job %s %d: %s", job_id, status, exc)


def _replica_died(exc: BaseException) -> ModelError:
    """Names the stage whose replica died (Ray's ActorDiedError quotes its actor class,
    ServeReplica:<app>:<Deployment>), not Ray's wrapper types."""
    found = re.search(r"ServeReplica:[^:\s]+:(\w+)", str(exc))
    who = f"the {found.group(1).lower()} replica" if found else "a replica"
    return ModelError(f"{who} died while working on this job; retry")


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    """HTTP (api/routes.py) and the handle API for other Ray jobs:

        handle = serve.get_app_handle("sam3-video")
        mp4: bytes = handle.segment.remote(video_bytes_or_ObjectRef, {"prompt": "fish"}).result()
    """

    def __init__(self, encoder: Any, limits: Limits, auth_tokens_env: str, max_inflight: int,
                 retry_after_s: int) -> None:
        tokens = {t.strip() for t in os.environ.get(auth_tokens_env, "").split(",") if t.strip()}
        self.service = SegmentService(encoder, limits, tokens, max_inflight, retry_after_s)

    def __serve_build_asgi_app__(self):
        from serve_app.api.routes import make_app

        return make_app(self.service)

    async def segment(self, video: Any, config: JobConfig | dict) -> bytes:
        """Segment one mp4 (its bytes, or an ObjectRef of them, which the stages read from the
        object store themselves) with a config (a dict or a JobConfig); returns the output mp4.

        Raises the serve_app.errors types of the HTTP API's statuses, as Ray delivers them
        (RayTaskError(<type>), an instance of <type>: `except UnsupportedMedia as e` works and
        `e.message` is the message alone); past the ingress's queue, Serve's BackPressureError.
        """
        return (await self.service.segment(video, config)).mp4

    async def segment_result(self, video: Any, config: JobConfig | dict) -> SegmentResult:
        """As `segment`, with the per-stage timings (`.timings`) and frame count."""
        return await self.service.segment(video, config)
