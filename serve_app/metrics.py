"""Prometheus metrics, exported through Ray's metrics endpoint on each node: time per stage,
answers by status, and the async jobs: the store's queue as each ingress replica sees it (take
the max over replicas), the jobs each one runs (sum them), and how long jobs took."""

from __future__ import annotations

from serve_app.media import STAGES, StageTimings

# Milliseconds: a short clip's composite step to a long video's tracking.
BOUNDARIES = [10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000]


class StageMetrics:
    def __init__(self) -> None:
        try:
            from ray.serve.metrics import Counter, Gauge, Histogram

            self.latency = Histogram("sam3_video_stage_ms", description="Time per pipeline stage per job.",
                                     boundaries=BOUNDARIES, tag_keys=("stage",))
            self.requests = Counter("sam3_video_requests", description="Jobs answered, by HTTP status.",
                                    tag_keys=("status",))
            self.queued = Gauge("sam3_video_jobs_queued", description="Async jobs waiting in the store.")
            self.processing = Gauge("sam3_video_jobs_processing", description="Async jobs this replica runs.")
            self.job_s = Histogram("sam3_video_job_seconds", description="Async jobs, submit to done, by state.",
                                   boundaries=[s / 1000 for s in BOUNDARIES], tag_keys=("state",))
        except Exception:  # outside a Ray worker (local testing mode): no exporter to report to
            self.latency = self.requests = self.queued = self.processing = self.job_s = None

    def jobs(self, queued: int, processing: int) -> None:
        if self.queued is not None:
            self.queued.set(queued)
            self.processing.set(processing)

    def job_done(self, state: str, seconds: float) -> None:
        if self.job_s is not None:
            self.job_s.observe(seconds, tags={"state": state})

    def observe(self, timings: StageTimings) -> None:
        if self.latency is None:
            return
        for stage in STAGES:
            self.latency.observe(getattr(timings, f"{stage}_ms"), tags={"stage": stage})

    def count(self, status: int) -> None:
        if self.requests is not None:
            self.requests.inc(tags={"status": str(status)})
