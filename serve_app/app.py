"""The one place the graph is bound: `build_app(args) -> Application`.

    serve run serve_app.app:build_app tracker=serve_app.trackers.fake:ColorShapeTracker tracker_num_gpus=0
    serve deploy serve_config.yaml          # args: as below, validated by AppArgs
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.trackers import SAM3_TRACKER
from serve_app.types import Limits

APP_NAME = "sam3-video"


class AppArgs(BaseModel):
    """Everything the graph can be told. Unknown keys are an error (Serve ignores them silently)."""

    model_config = ConfigDict(extra="forbid")

    tracker: str = Field(SAM3_TRACKER, description="Tracker import path, module:Name.")
    tracker_options: dict[str, Any] = Field(default_factory=dict, description="Tracker constructor options.")
    # SAM 3 options, passed to the tracker when it is SAM 3.
    checkpoint: str | None = Field(None, description="Local sam3.pt; else SAM3_CHECKPOINT, else the hub (HF_TOKEN).")
    device: str | None = Field(None, description="cuda or cpu; default cuda when present.")
    compile: bool | None = Field(None, description="torch.compile; default on with CUDA.")
    warm_sizes: list[tuple[int, int]] = Field(default_factory=list, description="Extra WxH sizes to warm up.")

    tracker_num_gpus: float = Field(1.0, ge=0, description="GPUs per tracker replica (0 for CPU trackers).")
    tracker_num_cpus: float = Field(1.0, ge=0)
    decoder_num_cpus: float = Field(1.0, ge=0, description="CPUs per decoder replica.")
    encoder_num_cpus: float = Field(1.0, ge=0, description="CPUs per encoder replica (libx264 uses more if free).")
    tracker_min_replicas: int = Field(1, ge=0)
    tracker_max_replicas: int = Field(1, ge=1)
    # One SAM 3 session runs at a time per replica; a second request waits on the replica so
    # its start-up overlaps the first one's tail.
    tracker_max_ongoing_requests: int = Field(2, ge=1)
    tracker_target_ongoing_requests: float = Field(1.0, gt=0, description="Autoscaling target per replica.")

    decoder_replicas: int = Field(1, ge=1)
    encoder_replicas: int = Field(1, ge=1)
    encoder_max_ongoing_requests: int = Field(4, ge=1)
    # Jobs waiting for an encoder beyond this are refused with 429 + Retry-After rather than
    # queued without bound.
    max_queued_requests: int = Field(8, ge=0)
    max_inflight_per_ingress: int = Field(16, ge=1, description="Jobs one ingress replica holds at once.")
    # Requests Serve's proxy holds for a busy ingress; past it the proxy answers 429 +
    # Retry-After. Serve counts a request as queued until a replica is picked, even one with
    # room, so this must exceed the largest burst of simultaneous arrivals to refuse only floods.
    ingress_max_queued_requests: int = Field(64, ge=1)
    retry_after_s: int = Field(5, ge=1)

    chunk_frames: int = Field(16, ge=1, le=256, description="Frames per decoder chunk.")
    # The tracker pulls chunks from the decoder; this bounds the decoded frames of one job to
    # (decode_ahead_chunks + 1) chunks in flight whatever the video's length.
    decode_ahead_chunks: int = Field(2, ge=1, le=16, description="Chunks asked for beyond the one being tracked.")
    # At most the 16 job ids a decoder replica registers with Serve's router (deployments.Decoder).
    decoder_sessions: int = Field(8, ge=1, le=16, description="Jobs whose open reader a decoder replica keeps between calls.")
    decoder_idle_s: float = Field(60.0, gt=0, description="A reader not asked for a chunk this long is closed.")
    encoder_preset: str = Field("veryfast", description="libx264 preset for overlay videos.")
    mask_encoder_preset: str = Field("ultrafast", description="libx264 preset for mask videos (see pipeline.DEFAULT_PRESETS).")
    limits: Limits = Field(default_factory=Limits)
    auth_tokens_env: str = Field("SAM3_VIDEO_TOKENS", description="Env var with comma-separated bearer tokens; unset = no auth.")
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)

    def resolved_tracker_options(self) -> dict[str, Any]:
        options = dict(self.tracker_options)
        if self.tracker == SAM3_TRACKER:
            for key in ("checkpoint", "device", "compile"):
                if getattr(self, key) is not None:
                    options.setdefault(key, getattr(self, key))
            if self.warm_sizes:
                options.setdefault("warm_sizes", [tuple(s) for s in self.warm_sizes])
        return options


def build_app(args: dict[str, Any] | AppArgs | None = None):
    from serve_app.deployments import Decoder, Encoder, Ingress, Tracker
    from serve_app.pull import RemoteDecoder

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    quick_stop = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
    # Room for every call the jobs it keeps readers for may have in flight: a call refused here
    # would go to another replica, which has to decode the video up to that chunk.
    decoder = Decoder.options(
        num_replicas=a.decoder_replicas, ray_actor_options={"num_cpus": a.decoder_num_cpus},
        max_ongoing_requests=a.decoder_sessions * (a.decode_ahead_chunks + 1), **quick_stop
    ).bind(a.chunk_frames, a.decoder_sessions, a.decoder_idle_s, a.decode_ahead_chunks)
    tracker = Tracker.options(
        ray_actor_options={"num_gpus": a.tracker_num_gpus, "num_cpus": a.tracker_num_cpus},
        max_ongoing_requests=a.tracker_max_ongoing_requests,
        autoscaling_config={
            "min_replicas": a.tracker_min_replicas,
            "initial_replicas": max(a.tracker_min_replicas, 1),
            "max_replicas": max(a.tracker_max_replicas, a.tracker_min_replicas, 1),
            "target_ongoing_requests": a.tracker_target_ongoing_requests,
            "upscale_delay_s": 10,
            "downscale_delay_s": 300,  # a GPU replica costs minutes to start and warm
        },
        # A model replica takes minutes to build, download and warm up.
        health_check_timeout_s=120,
        **quick_stop,
    ).bind(RemoteDecoder(decoder, a.chunk_frames, a.decode_ahead_chunks), a.tracker, a.resolved_tracker_options())
    encoder = Encoder.options(
        num_replicas=a.encoder_replicas, ray_actor_options={"num_cpus": a.encoder_num_cpus},
        max_ongoing_requests=a.encoder_max_ongoing_requests, max_queued_requests=a.max_queued_requests,
        **quick_stop,
    ).bind(tracker, {"overlay": a.encoder_preset, "mask": a.mask_encoder_preset})
    # The ingress answers over-capacity jobs itself (429 + Retry-After, before reading the body)
    # up to twice its job slots; past that the proxy queues a bounded number more.
    return Ingress.options(
        ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=a.max_inflight_per_ingress * 2,
        max_queued_requests=a.ingress_max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": a.retry_after_s}, **quick_stop
    ).bind(encoder, a.limits.model_dump(), a.auth_tokens_env, a.max_inflight_per_ingress, a.retry_after_s)
