"""Thin Ray Serve deployments around the stages. Options (replicas, GPUs, queues) are set in
serve_app/app.py, the one place the graph is bound."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Any

from ray import serve

from serve_app.contract import JobConfig, parse_config, parse_job
from serve_app.errors import ModelError, Overloaded, ServiceError, Unauthorized, http_status
from serve_app.stages import EncodeStage, TrackStage
from serve_app.types import Limits, VideoInfo
from serve_app.upload import check_size
from serve_app.wire import PulledChunk, SegmentResult, VideoRef, job_json, new_request_id

log = logging.getLogger("ray.serve")


@serve.deployment
class Decoder:
    """CPU: decodes the chunks trackers ask for (serve_app/pull.py), keeping each job's reader
    open between its calls."""

    def __init__(self, chunk_frames: int, sessions: int, idle_s: float, ahead: int) -> None:
        from ray.serve.exceptions import RayServeException

        from serve_app.pull import DecodeSessions

        self.sessions = DecodeSessions(chunk_frames, capacity=sessions, idle_s=idle_s, max_stash=ahead)
        self.sessions.start_reaper()
        try:
            serve.get_replica_context()
            self.routed = True
        except RayServeException:  # local testing mode: one replica and no multiplexing support
            self.routed = False

    # Serve's model multiplexing with the job id as model id: the replica that serves a job's
    # first chunk tells Serve's router so, and the router sends the job's later calls there
    # first. Only routing: a replica without a job's reader serves its chunk all the same
    # (serve_app/pull.py). Only chunk 0 registers a job: a job registered on two replicas (a
    # call sent elsewhere before the router learnt of the first) has its calls alternate
    # between them, each decoding the whole video (measured: 256 of 300 frames decoded twice).
    # An id stays after its job ends and draws no more calls; 16 cover the readers kept.
    @serve.multiplexed(max_num_models_per_replica=16)
    async def _register(self, job_id: str) -> str:
        return job_id

    async def chunk(self, video: VideoRef, info: VideoInfo, job_id: str, index: int) -> PulledChunk:
        if self.routed and index == 0:
            await self._register(job_id)
        return await asyncio.to_thread(self.sessions.chunk, video, info, job_id, index)

    def close_job(self, job_id: str) -> None:
        self.sessions.close(job_id)

    def __del__(self) -> None:
        if hasattr(self, "sessions"):
            self.sessions.shutdown()


@serve.deployment
class Tracker:
    """GPU: holds the (compiled) model; streams detections to the encoder."""

    def __init__(self, decoder: Any, tracker: str, tracker_options: dict[str, Any]) -> None:
        from serve_app.trackers import load_tracker

        # Builds the model and, for SAM 3 with compile, warms it up: the replica only reports
        # ready (and takes requests) once that is done.
        self.stage = TrackStage(load_tracker(tracker, **tracker_options), decoder)

    def track(self, video, info, config):
        yield from self.stage.track(video, info, config)

    def check_health(self) -> None:
        # SAM 3 runs on one model thread per replica; if it died, every request would fail,
        # so Serve should replace the replica.
        check = getattr(self.stage.tracker, "check_health", None)
        if check is not None:
            check()


@serve.deployment
class Encoder(EncodeStage):
    """CPU: composites each frame's kept objects and encodes the mp4."""


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while not isinstance(exc, ServiceError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def _replica_died(exc: BaseException) -> ModelError:
    """Names the stage whose replica died (Ray's ActorDiedError quotes its actor class,
    ServeReplica:<app>:<Deployment>), not Ray's wrapper types."""
    import re

    found = re.search(r"ServeReplica:[^:\s]+:(\w+)", str(_unwrap(exc)))
    who = f"the {found.group(1).lower()} replica" if found else "a replica"
    return ModelError(f"{who} died while working on this job; retry")


@serve.deployment
class Ingress:
    """HTTP and handle entry point. Spools and probes the upload, then awaits the encoder.

    Handle API for other Ray jobs (see `segment`):
        handle = serve.get_app_handle("sam3-video")
        mp4: bytes = handle.segment.remote(video_bytes_or_ObjectRef, {"prompt": "fish"}).result()
    """

    def __init__(self, encoder: Any, limits: dict | Limits, auth_tokens_env: str,
                 max_inflight: int, retry_after_s: int) -> None:
        from serve_app.metrics import StageMetrics

        self.encoder = encoder
        self.limits = Limits.model_validate(limits)
        self.tokens = {t for t in os.environ.get(auth_tokens_env, "").split(",") if t.strip()}
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self.metrics = StageMetrics()

    # -- handle API -------------------------------------------------------------------------
    async def segment(self, video: Any, config: JobConfig | dict) -> bytes:
        """Segment one mp4; returns the output mp4's bytes.

        `video`: the mp4's bytes, or an ObjectRef of them (`ray.put(mp4_bytes)`), which the
        stages read from the object store themselves. `config`: the job config as a dict or a
        JobConfig, e.g. {"prompt": "fish", "mode": "overlay"}.

        Raises the serve_app.errors types the HTTP API maps to statuses: InvalidJob (400),
        UploadTooLarge and VideoLimitExceeded (413), UnsupportedMedia (415), Overloaded (429,
        `.retry_after_s`), ModelError (500). Ray delivers each as RayTaskError(<type>), an
        instance of that type, so `except UnsupportedMedia as e` works and `e.message` is the
        message alone. Past the ingress's queue Ray Serve raises its own BackPressureError.
        """
        return (await self.segment_result(video, config)).mp4

    async def segment_result(self, video: Any, config: JobConfig | dict) -> SegmentResult:
        """As `segment`, with the per-stage timings (`.timings`) and frame count."""
        import ray

        cfg = config if isinstance(config, JobConfig) else parse_config(config)
        with self.job_slot():
            if isinstance(video, ray.ObjectRef):
                data, ref = await video, VideoRef(ref=video)  # the stages read the caller's object
            else:
                data, ref = bytes(video), None
            check_size(len(data), self.limits.max_bytes)
            ref = ref or VideoRef.put(data)  # put only once the size is known to be acceptable
            fd, path = tempfile.mkstemp(suffix=".mp4")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            del data
            try:
                return await self._run(path, cfg, new_request_id(), ref)
            finally:
                os.unlink(path)

    # -- HTTP -------------------------------------------------------------------------------
    async def __call__(self, request):
        from serve_app.ingress_http import handle_http

        return await handle_http(self, request)

    @contextmanager
    def job_slot(self):
        """Holds one of this replica's `max_inflight` job slots from before the upload is read
        until the answer is ready; with none free, Overloaded (429 + Retry-After) at once."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"this replica is running {self.inflight} jobs, the most it takes; retry later",
                             self.retry_after_s)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def check_auth(self, header: str | None) -> None:
        if not self.tokens:
            return
        import hmac

        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), t) for t in self.tokens):
            raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")

    async def _run(self, path: str, config: JobConfig, request_id: str, video: VideoRef | None = None) -> SegmentResult:
        """Probe the upload at `path`, then run the graph on it (`video`: the same bytes already
        in the object store, else put from `path` once the probe accepts them)."""
        from ray.exceptions import RayActorError
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
        except RayActorError as exc:
            raise _replica_died(exc) from None
        except Exception as exc:
            inner = _unwrap(exc)
            if inner is exc:
                raise
            raise inner from None
        result.timings.probe_ms = probe_ms
        result.timings.total_ms = (time.perf_counter() - start) * 1e3
        self.metrics.observe(result.timings)
        return result

    def log_request(self, request_id: str, status: int, result: SegmentResult | None, exc: BaseException | None) -> None:
        self.metrics.count(status)
        if result is not None:
            t = result.timings
            log.info("job %s %d frames=%d decoder=%s probe=%.0fms decode=%.0fms track=%.0fms composite=%.0fms "
                     "encode=%.0fms total=%.0fms", request_id, status, result.num_frames, result.decoder,
                     t.probe_ms, t.decode_ms, t.track_ms, t.composite_ms, t.encode_ms, t.total_ms)
        elif status >= 500:
            log.error("job %s %d: %r", request_id, status, exc, exc_info=exc)
        else:
            log.info("job %s %d: %s", request_id, status, exc)


__all__ = ["Decoder", "Tracker", "Encoder", "Ingress", "job_json", "parse_job", "http_status"]
