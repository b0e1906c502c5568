"""The one place the graph is bound: `build_app(args) -> Application`; `start_app` runs it on an
embedded or joined Ray (the CLI, benchmarks).

    serve run serve_app.app:build_app tracker=fake
    serve deploy serve_config.yaml          # args: as below, validated by AppArgs

    HTTP / handle ──► Ingress ──► Encoder ══stream══► Tracker ──pull──► Decoder

The ingress owns each request and calls the encoder, which consumes the tracker's stream of
detections; the tracker pulls frame chunks from the decoder a few at a time. Serve streams
have no backpressure and a stream cannot be handed from one deployment to another, so the
consumer of each stream holds its producer's handle (docs/design.md).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.contract import Limits
from serve_app.errors import ModelUnavailable
from serve_app.trackers import TrackerConfig, tracker_config

APP_NAME = "sam3-video"


class AppArgs(BaseModel):
    """Everything the graph can be told. Unknown keys are an error (Serve ignores them silently)."""

    model_config = ConfigDict(extra="forbid")

    tracker: TrackerConfig = Field(default_factory=lambda: tracker_config("sam3"),
                                   description="sam3, fake, or {kind: ..., <its fields>} (serve_app/trackers).")
    tracker_num_gpus: float | None = Field(None, ge=0, description="GPUs per tracker replica; default: the tracker's own.")
    # Logical CPUs, for placement: the defaults fit the graph on a 2-core machine.
    tracker_num_cpus: float = Field(0.5, ge=0)
    decoder_num_cpus: float = Field(0.5, ge=0, description="CPUs per decoder replica.")
    encoder_num_cpus: float = Field(0.5, ge=0, description="CPUs per encoder replica (libx264 uses more if free).")
    tracker_min_replicas: int = Field(1, ge=0)
    tracker_max_replicas: int = Field(1, ge=1)
    # Jobs a tracker replica runs at once, interleaved frame by frame on its one model (the
    # tracker's max_sessions, unless its config sets that itself).
    tracker_max_ongoing_requests: int = Field(2, ge=1)
    tracker_target_ongoing_requests: float = Field(1.0, gt=0, description="Autoscaling target per replica.")
    # A GPU replica costs minutes to start and warm: scale up on a sustained queue, down slowly.
    tracker_upscale_delay_s: float = Field(10.0, ge=0)
    tracker_downscale_delay_s: float = Field(300.0, ge=0)

    decoder_replicas: int = Field(1, ge=1)
    # With one decoder on each tracker node (e.g. decoder_replicas = tracker nodes and this 1),
    # a tracker's frames never cross the network: it asks its own node's decoder first.
    decoder_max_replicas_per_node: int | None = Field(None, ge=1, description="Spread decoders: at most this many a node.")
    encoder_replicas: int = Field(1, ge=1)
    encoder_max_ongoing_requests: int = Field(4, ge=1)
    # Jobs waiting for an encoder beyond this are refused with 429 + Retry-After.
    max_queued_requests: int = Field(8, ge=0)
    max_inflight_per_ingress: int = Field(16, ge=1, description="Jobs one ingress replica runs at once.")
    max_uploads_per_ingress: int = Field(32, ge=1, description="Bodies one ingress replica receives at once.")
    # Keyed by the peer address the proxy sees: behind a load balancer that is the balancer's,
    # so set 0 (no cap per client) there.
    max_uploads_per_client: int = Field(8, ge=0, description="Of those, from one client address; 0: no cap.")
    max_downloads_per_ingress: int = Field(32, ge=1, description="Async job files one ingress replica sends at once.")
    # An upload is dropped (408) after this long without a byte, or when, past this long, it
    # has averaged less than upload_min_bytes_per_s: idle connections cannot hold the ingress.
    upload_idle_s: float = Field(15.0, gt=0)
    upload_min_bytes_per_s: int = Field(32 * 1024, ge=0)
    job_timeout_s: float = Field(3600.0, gt=0, description="A job still running after this is stopped (504).")
    # Async jobs (POST /v2/job/async): records in job_db, files under job_store; both shared by
    # every ingress replica. A local directory alone keeps its SQLite file in it too.
    job_store: str = Field("~/.local/share/sam3-video/jobs", description="fsspec URL: a directory, s3://..., gs://...")
    job_db: str | None = Field(None, description="SQLAlchemy URL, e.g. postgresql+psycopg://...; default SQLite in job_store.")
    job_ttl_s: float = Field(24 * 3600.0, gt=0, description="Jobs and their files are deleted this long after submission.")
    # An upload is refused (507) unless it fits with room for its outputs and this to spare.
    job_min_free_bytes: int = Field(1 << 30, ge=0, description="Bytes a local job_store keeps free.")
    max_queued_jobs: int = Field(100, ge=1, description="Async jobs waiting beyond this are refused with 429.")
    job_stale_s: float = Field(60.0, gt=0, description="A running job silent this long is queued again once, then failed.")
    # Requests Serve's proxy holds for a busy ingress; past it the proxy answers 429 +
    # Retry-After. Serve counts a request as queued until a replica is picked, even one with
    # room, so this must exceed the largest burst of simultaneous arrivals to refuse only floods.
    ingress_max_queued_requests: int = Field(64, ge=1)
    retry_after_s: int = Field(5, ge=1)

    chunk_frames: int = Field(16, ge=1, le=256, description="Frames per decoder chunk.")
    # Bounds a job's decoded frames in flight to (decode_ahead_chunks + 1) chunks.
    decode_ahead_chunks: int = Field(2, ge=1, le=16, description="Chunks asked for beyond the one being tracked.")
    # At most the 16 job ids a decoder replica registers with Serve's router (graph/deployments.py).
    decoder_readers: int = Field(8, ge=1, le=16, description="Jobs whose open reader a decoder replica keeps between calls.")
    decoder_idle_s: float = Field(60.0, gt=0, description="A reader not asked for a chunk this long is closed.")
    encoder_preset: str = Field("veryfast", description="libx264 preset for overlay videos.")
    mask_encoder_preset: str = Field("ultrafast", description="libx264 preset for mask videos.")
    limits: Limits = Field(default_factory=Limits)
    auth_tokens_env: str = Field("SAM3_VIDEO_TOKENS", description="Env var with comma-separated bearer tokens; unset = no auth.")
    # A job belongs to the token that submitted it; these tokens see and delete every job.
    admin_tokens_env: str = Field("SAM3_VIDEO_ADMIN_TOKENS", description="Env var with comma-separated admin tokens.")
    # Async jobs' webhooks go only to these hosts (SSRF): none by default, so a webhook is a 400
    # until the operator names its receivers. `--arg webhook_hosts=a,b` on the command line.
    webhook_hosts: list[str] = Field(default_factory=list, description="Host names or IPs webhooks may be sent to.")
    webhook_secret_env: str = Field("SAM3_VIDEO_WEBHOOK_SECRET", description="Env var with the webhooks' HMAC "
                                    "secret; required when webhook_hosts is set.")
    webhook_max_attempts: int = Field(8, ge=1, le=20, description="Attempts per webhook (5 s, 15 s, 45 s, ... apart).")
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="A receiver silent this long fails the attempt.")
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, description="How long a stopping ingress or decoder "
                                               "replica waits for its requests.")
    # A tracker replica that autoscaling retires still runs jobs that take minutes on a GPU:
    # it stops taking new ones and finishes these, which end by their deadline in any case.
    tracker_drain_timeout_s: float | None = Field(None, ge=0, description="How long a stopping tracker or encoder "
                                                  "replica lets its running jobs finish; default job_timeout_s.")

    @field_validator("tracker", mode="before")
    @classmethod
    def _tracker_shorthand(cls, value: Any) -> Any:
        return tracker_config(value) if isinstance(value, str) else value

    @field_validator("webhook_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [h for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @field_validator("webhook_hosts")
    @classmethod
    def _bare_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host.strip() or any(c in host for c in "/@?#") or host.count(":") == 1:
                raise ValueError(f"{host!r} must be a host name or an IP address, without scheme, port or path")
        return [h.strip() for h in value]

    @property
    def gpus_per_tracker(self) -> float:
        return self.tracker.num_gpus if self.tracker_num_gpus is None else self.tracker_num_gpus


def build_app(args: dict[str, Any] | AppArgs | None = None):
    from serve_app.api.ingress import IngressDeployment, IngressSettings
    from serve_app.api.upload import Pace
    from serve_app.graph.deployments import DecoderDeployment, EncoderDeployment, TrackerDeployment
    from serve_app.graph.pull import RemoteDecoder

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    quick_stop = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
    drain_s = a.job_timeout_s if a.tracker_drain_timeout_s is None else a.tracker_drain_timeout_s
    drain = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": drain_s}
    # Room for every call the jobs it keeps readers for may have in flight: a call refused here
    # would go to another replica, which has to decode the video up to that chunk.
    spread = {"max_replicas_per_node": a.decoder_max_replicas_per_node} if a.decoder_max_replicas_per_node else {}
    decoder = DecoderDeployment.options(
        num_replicas=a.decoder_replicas, ray_actor_options={"num_cpus": a.decoder_num_cpus},
        max_ongoing_requests=a.decoder_readers * (a.decode_ahead_chunks + 1), **spread, **quick_stop
    ).bind(a.chunk_frames, a.decoder_readers, a.decoder_idle_s, a.decode_ahead_chunks)
    # The tracker pulls from the decoder (backpressure): it holds the decoder's handle.
    tracker = TrackerDeployment.options(
        ray_actor_options={"num_gpus": a.gpus_per_tracker, "num_cpus": a.tracker_num_cpus},
        max_ongoing_requests=a.tracker_max_ongoing_requests,
        autoscaling_config={
            "min_replicas": a.tracker_min_replicas,
            "initial_replicas": max(a.tracker_min_replicas, 1),
            "max_replicas": max(a.tracker_max_replicas, a.tracker_min_replicas, 1),
            "target_ongoing_requests": a.tracker_target_ongoing_requests,
            "upscale_delay_s": a.tracker_upscale_delay_s,
            "downscale_delay_s": a.tracker_downscale_delay_s,
        },
        health_check_timeout_s=120,  # a model replica takes minutes to build, download and warm up
        **drain,
    ).bind(RemoteDecoder(decoder, a.chunk_frames, a.decode_ahead_chunks), _with_sessions(a))
    # The encoder consumes the tracker's stream: it holds the tracker's handle.
    encoder = EncoderDeployment.options(
        num_replicas=a.encoder_replicas, ray_actor_options={"num_cpus": a.encoder_num_cpus},
        max_ongoing_requests=a.encoder_max_ongoing_requests, max_queued_requests=a.max_queued_requests,
        **drain,
    ).bind(tracker, {"overlay": a.encoder_preset, "mask": a.mask_encoder_preset})
    # The ingress answers over-capacity jobs itself (429 + Retry-After, before reading the body)
    # up to twice its upload and job slots; past that the proxy queues a bounded number more.
    slots = a.max_uploads_per_ingress + a.max_inflight_per_ingress + a.max_downloads_per_ingress
    return IngressDeployment.options(
        ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=slots * 2,
        max_queued_requests=a.ingress_max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": a.retry_after_s}, **quick_stop
    ).bind(encoder, IngressSettings(
        limits=a.limits, auth_tokens_env=a.auth_tokens_env, admin_tokens_env=a.admin_tokens_env,
        max_jobs=a.max_inflight_per_ingress, max_uploads=a.max_uploads_per_ingress,
        max_uploads_per_client=a.max_uploads_per_client, max_downloads=a.max_downloads_per_ingress,
        retry_after_s=a.retry_after_s,
        pace=Pace(a.upload_idle_s, a.upload_min_bytes_per_s), job_timeout_s=a.job_timeout_s, job_store=a.job_store,
        job_db=a.job_db, job_ttl_s=a.job_ttl_s, job_min_free_bytes=a.job_min_free_bytes,
        max_queued_jobs=a.max_queued_jobs, job_stale_s=a.job_stale_s,
        jobs_at_once=min(max(a.tracker_max_replicas, a.tracker_min_replicas, 1) * a.tracker_max_ongoing_requests,
                         a.max_inflight_per_ingress),
        webhook_hosts=tuple(a.webhook_hosts), webhook_secret_env=a.webhook_secret_env,
        webhook_max_attempts=a.webhook_max_attempts, webhook_timeout_s=a.webhook_timeout_s))


def _with_sessions(a: AppArgs) -> TrackerConfig:
    """The tracker's config with max_sessions = tracker_max_ongoing_requests where it has that
    field and leaves it unset: every request a replica accepts is a session it runs."""
    tracker = a.tracker
    if "max_sessions" in type(tracker).model_fields and tracker.max_sessions is None:
        tracker = tracker.model_copy(update={"max_sessions": a.tracker_max_ongoing_requests})
    return tracker


def start_app(app_args: dict[str, Any], address: str | None = None, http: tuple[str, int] | None = None):
    """Start (or join, with `address`) Ray and run the app; returns its handle. A graph that
    fails to start raises ModelUnavailable with the cause's last line."""
    import ray
    from ray import serve

    from serve_app.api.proxy import install_env

    install_env()  # the HTTP proxy's body cap; only proxies started after this load it
    if address is None:  # the replicas start here, with this environment: say what they would fail on, now
        a = AppArgs.model_validate(app_args)
        if a.webhook_hosts and not os.environ.get(a.webhook_secret_env):
            raise ModelUnavailable(f"the graph did not start: webhook_hosts is set but {a.webhook_secret_env} is "
                                   "empty; webhooks are signed with it")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    if http is not None:
        serve.start(http_options={"host": http[0], "port": http[1]})
    try:
        return serve.run(build_app(app_args), name=APP_NAME, route_prefix="/" if http else None)
    except RuntimeError as exc:  # Serve's "Deploying application ... failed", a traceback inside
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelUnavailable(f"the graph did not start: {lines[-1] if lines else exc}") from None
