"""The ingress: the one HTTP and handle entry point, and the job services behind both.

`SegmentService` is what the ingress does for a job, without HTTP: auth, the replica's job
slots, the probe, then the graph (the Encoder deployment, which pulls the rest). Async jobs are
`AsyncJobs` (serve_app/jobs), which run through it. The routes (api/routes.py) and the handle
API below call them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from serve_app import spool
from serve_app.api.answers import async_job_json
from serve_app.api.upload import Pace
from serve_app.contract import JobConfig, Limits, parse_config, size
from serve_app.errors import ModelError, Overloaded, ServiceError, Unauthorized, UploadTooLarge
from serve_app.graph.wire import JobProgress, SegmentResult, VideoRef
from serve_app.jobs.service import ANYONE, AsyncJobs
from serve_app.jobs.store import JobStore
from serve_app.jobs.webhooks import WebhookSettings
from serve_app.media import Deadline, VideoInfo
from serve_app.metrics import StageMetrics
from serve_app.spool import Spool

log = logging.getLogger("ray.serve")


class Slots:
    """At most `n` at once in this replica; one more is refused at once with Overloaded (429 +
    Retry-After) rather than queued."""

    def __init__(self, n: int, what: str, retry_after_s: int, per_client: int = 0) -> None:
        self.n, self.what, self.retry_after_s, self.used = n, what, retry_after_s, 0
        self.per_client, self.clients = per_client, Counter()  # 0: no cap per client

    def acquire(self) -> bool:
        """One slot, if one is free (the async runner's way in); `release` gives it back."""
        if self.used >= self.n:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1

    def check(self, client: str = "") -> None:
        if self.used >= self.n:
            raise Overloaded(f"this replica has {self.used} {self.what}, the most it takes; retry later",
                             self.retry_after_s)
        if self.per_client and self.clients[client] >= self.per_client:
            raise Overloaded(f"{client} has {self.clients[client]} {self.what}, the most one client may; "
                             "retry later", self.retry_after_s)

    @contextmanager
    def take(self, client: str = ""):
        self.check(client)
        self.used += 1
        self.clients[client] += 1
        try:
            yield
        finally:
            self.used -= 1
            self.clients[client] -= 1
            if not self.clients[client]:
                del self.clients[client]


@dataclass(frozen=True)
class IngressSettings:
    """What build_app tells the ingress, from AppArgs (serve_app/app.py: max_jobs is
    max_inflight_per_ingress, max_uploads max_uploads_per_ingress, pace the upload_* args)."""

    limits: Limits
    auth_tokens_env: str
    admin_tokens_env: str
    max_jobs: int
    max_uploads: int
    max_uploads_per_client: int
    max_downloads: int
    retry_after_s: int
    pace: Pace
    job_timeout_s: float
    job_store: str
    job_db: str | None
    job_min_free_bytes: int
    job_ttl_s: float
    max_queued_jobs: int
    job_stale_s: float
    # Jobs the graph runs at once (its trackers' sessions): what a batch keeps in flight.
    jobs_at_once: int = 1
    webhook_hosts: tuple[str, ...] = ()
    webhook_secret_env: str = "SAM3_VIDEO_WEBHOOK_SECRET"
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0


@dataclass
class SegmentService:
    encoder: Any                    # the Encoder deployment's handle
    limits: Limits
    tokens: set[str]                # bearer tokens; empty: no auth
    jobs: Slots                     # jobs whose input has arrived
    uploads: Slots                  # bodies being received; a stalled one is dropped (pace)
    downloads: Slots                # async jobs' files being sent
    pace: Pace
    job_timeout_s: float
    metrics: StageMetrics = field(default_factory=StageMetrics)
    admins: set[str] = field(default_factory=set)  # tokens that see every async job

    def check_auth(self, header: str | None) -> object:
        """The caller's owner of async jobs: its token's SHA-256, or ANYONE (auth off, an admin)."""
        if not self.tokens and not self.admins:
            return ANYONE
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")  # any byte a header may carry
        known = [t for t in self.tokens | self.admins if hmac.compare_digest(given, t.encode())]
        if scheme.lower() != "bearer" or not known:
            raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")
        return ANYONE if known[0] in self.admins else hashlib.sha256(given).hexdigest()

    async def probe(self, path: str) -> VideoInfo:
        from serve_app.video.probe import probe

        return await asyncio.to_thread(probe, path, self.limits)

    async def run(self, path: str, config: JobConfig, video: VideoRef | None = None, info: VideoInfo | None = None,
                  on_progress: Callable[[JobProgress], None] | None = None) -> SegmentResult:
        """Probe the upload at `path` (unless `info` says what it is), then run the graph on it
        (`video`: the same bytes already in the object store, else put from `path` once the
        probe accepts them), telling `on_progress` how far it has got as it goes."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        start = time.perf_counter()
        info = info or await self.probe(path)
        config.check_video(info)
        probe_ms = (time.perf_counter() - start) * 1e3
        if video is None:  # up to 100 MB read and put: not on the event loop
            video = await asyncio.to_thread(lambda: VideoRef.put(Path(path).read_bytes()))
        # The stages stop at the deadline, or within seconds of this replica's death (its owner).
        deadline = Deadline(time.time() + self.job_timeout_s, self.job_timeout_s, _this_actor())
        response = self.encoder.options(stream=True).segment.remote(video, info, config, deadline)
        try:
            # The stages stop themselves at the deadline; this answers even if one is stuck.
            result = await asyncio.wait_for(_last(response, on_progress), self.job_timeout_s + 30)
        except asyncio.TimeoutError:
            raise deadline.passed() from None
        except BackPressureError:
            raise Overloaded("the segmentation queue is full; retry later", self.jobs.retry_after_s) from None
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
        cfg = config if isinstance(config, JobConfig) else parse_config(config)
        with self.jobs.take():
            async with self.bytes_on_disk(video) as (path, ref):
                result = await self.run(path, cfg, ref)
        self.finished("handle", 200, result)
        return result

    @asynccontextmanager
    async def bytes_on_disk(self, video: Any):
        """(a temporary file, a VideoRef) of a handle call's video (bytes or an ObjectRef),
        refused over the byte limit before it is put anywhere."""
        import ray

        if isinstance(video, ray.ObjectRef):
            data, ref = await video, VideoRef(ref=video)  # the stages read the caller's object
        else:
            data, ref = bytes(video), None
        if len(data) > self.limits.max_bytes:
            raise UploadTooLarge(f"upload is {size(len(data))}; the limit is {size(self.limits.max_bytes)}")
        with Spool() as spool:
            await asyncio.to_thread(spool.write, data)
            yield spool.done(), ref  # None: run() puts the file once the probe accepts it

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


async def _last(stream, on_progress) -> SegmentResult:
    """The encoder's result at the end of its stream; its progress on the way. A stream left
    early (deadline, cancelled job, client gone) is cancelled, and the stages with it."""
    done = False
    try:
        async for item in stream:
            if isinstance(item, SegmentResult):
                done = True
                return item
            if on_progress is not None:
                on_progress(item)
        raise ModelError("the encoder's stream ended without a result")
    finally:
        if not done:
            stream.cancel()


def _this_actor() -> Any:
    """This replica's actor handle; None outside an actor (local testing mode, a driver)."""
    import ray

    try:
        return ray.get_runtime_context().current_actor if ray.is_initialized() else None
    except RuntimeError:
        return None


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

    async def __init__(self, encoder: Any, settings: IngressSettings) -> None:
        s = settings
        await asyncio.to_thread(spool.sweep)  # what replicas killed on this node left
        tokens, admins = ({t.strip() for t in os.environ.get(env, "").split(",") if t.strip()}
                          for env in (s.auth_tokens_env, s.admin_tokens_env))
        store = await asyncio.to_thread(JobStore, os.path.expanduser(s.job_store), s.job_db,  # fails the replica here
                                        min_free_bytes=s.job_min_free_bytes)
        self.service = SegmentService(
            encoder, s.limits, tokens, Slots(s.max_jobs, "jobs running", s.retry_after_s),
            Slots(s.max_uploads, "uploads arriving", s.retry_after_s, s.max_uploads_per_client),
            Slots(s.max_downloads, "downloads", s.retry_after_s), s.pace,
            s.job_timeout_s, admins=admins)
        secret = os.environ.get(s.webhook_secret_env, "")
        if s.webhook_hosts and not secret:  # never an unsigned webhook: a receiver could not tell ours
            raise ValueError(f"webhook_hosts is set but {s.webhook_secret_env} is empty in the replicas' environment; "
                             "webhooks are signed with it")
        webhooks = WebhookSettings(tuple(s.webhook_hosts), secret, s.webhook_max_attempts, s.webhook_timeout_s)
        self.jobs = AsyncJobs(store, self.service, max_queued=s.max_queued_jobs, stale_s=s.job_stale_s,
                              ttl_s=s.job_ttl_s, webhooks=webhooks, render=async_job_json)
        self.jobs_at_once = s.jobs_at_once
        self.jobs.start()

    async def __del__(self) -> None:
        """Serve stops the replica: its async jobs go back to the queue for another runner."""
        await self.jobs.stop()

    def __serve_build_asgi_app__(self):
        from serve_app.api.routes import make_app

        return make_app(self.service, self.jobs)

    async def segment(self, video: Any, config: JobConfig | dict) -> bytes:
        """Segment one mp4 (its bytes, or an ObjectRef of them, which the stages read from the
        object store themselves) with a config (a dict or a JobConfig); returns the output mp4.

        Raises the serve_app.errors types of the HTTP API's statuses, as Ray delivers them
        (RayTaskError(<type>), an instance of <type>: `except UnsupportedMedia as e` works and
        `e.message` is the message alone); past the ingress's queue, Serve's BackPressureError.
        """
        return (await self.service.segment(video, config)).mp4

    async def segment_result(self, video: Any, config: JobConfig | dict) -> SegmentResult:
        """As `segment`, with the per-stage timings (`.timings`), the frame count, and
        `.objects` (objects.json) when the config's outputs ask for it."""
        return await self.service.segment(video, config)

    async def capacity(self) -> dict[str, int]:
        """What a caller that sends many jobs should know: `jobs_at_once`, the jobs the graph runs
        at once (more only wait in its queues), and `max_bytes`, the largest video it takes."""
        return {"jobs_at_once": self.jobs_at_once, "max_bytes": self.service.limits.max_bytes}

    async def submit(self, video: Any, config: JobConfig | dict) -> str:
        """Queue an async job (as POST /v2/job/async); returns its id."""
        cfg = config if isinstance(config, JobConfig) else parse_config(config)
        async with self.service.bytes_on_disk(video) as (path, _):
            return (await self.jobs.enqueue(path, cfg)).id

    async def status(self, job_id: str) -> dict:
        """The async job's JSON (as GET /v2/job/async/{id}/job.json)."""
        return async_job_json(await self.jobs.get(job_id))

    async def result(self, job_id: str) -> dict[str, bytes]:
        """The finished job's files by name ({"output.mp4": ..., "objects.json": ...}); raises
        JobNotDone while it runs, and its own error type if it failed."""
        return await self.jobs.result(job_id)
