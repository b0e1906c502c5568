"""Prometheus metrics per stage, exported through Ray's metrics endpoint on each node."""

from __future__ import annotations

from serve_app.pipeline import STAGES, StageTimings

# Milliseconds: a short clip's composite step to a long video's tracking.
BOUNDARIES = [10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000]


class StageMetrics:
    def __init__(self) -> None:
        try:
            from ray.serve.metrics import Counter, Histogram

            self.latency = Histogram("sam3_video_stage_ms", description="Time per pipeline stage per job.",
                                     boundaries=BOUNDARIES, tag_keys=("stage",))
            self.requests = Counter("sam3_video_requests", description="Jobs answered, by HTTP status.",
                                    tag_keys=("status",))
        except Exception:  # outside a Ray worker (local testing mode): no exporter to report to
            self.latency = self.requests = None

    def observe(self, timings: StageTimings) -> None:
        if self.latency is None:
            return
        for stage in STAGES:
            self.latency.observe(getattr(timings, f"{stage}_ms"), tags={"stage": stage})

    def count(self, status: int) -> None:
        if self.requests is not None:
            self.requests.inc(tags={"status": str(status)})
