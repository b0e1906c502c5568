"""Several jobs per tracker replica: throughput and latency with 1, 2 and 4 sessions interleaved
frame by frame on the replica's one model.

    python benchmarks/bench_sessions.py [--quick] [--frame-ms 30]

One tracker replica of the stand-in tracker, whose per-frame wait on its one model thread
mimics a GPU model (one device, jobs taking turns a frame each) without using CPU; the whole
graph on this machine, jobs through the handle API. Eight clients each send a few jobs, short
(1 s) and long (3 s) clips in turn; for each `tracker_max_ongoing_requests` (= sessions per
replica) it prints frames tracked per second from the first job to the last answer, the model
thread's busy share, and p50/p99 latency of short and long jobs, and ends with
`sessions per replica: 1 1.00x, 2 X.XXx, 4 X.XXx` (throughput against one session, measured in
the same run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timing, shapes_clip, table  # noqa: E402

APP = "sessions"
CLIENTS = 8


def app_args(sessions: int, frame_s: float) -> dict:
    return {"tracker": {"kind": "fake", "frame_delay_s": frame_s}, "tracker_num_cpus": 0,
            "tracker_min_replicas": 1, "tracker_max_replicas": 1, "tracker_max_ongoing_requests": sessions,
            "decoder_num_cpus": 0.25, "encoder_num_cpus": 0.25, "encoder_max_ongoing_requests": CLIENTS,
            "max_queued_requests": 4 * CLIENTS, "job_store": tempfile.mkdtemp(prefix="bench-sessions-"),
            "graceful_shutdown_timeout_s": 2, "tracker_drain_timeout_s": 2}


def measure(handle, clips: dict[str, tuple[bytes, int]], jobs_per_client: int) -> dict:
    """CLIENTS clients, each sending `jobs_per_client` jobs one after another, alternating short
    and long; throughput is every frame over the time from the first job to the last answer."""
    done: list[tuple[str, float, int]] = []  # (kind, seconds, frames)
    failures: list[str] = []
    start = time.monotonic()

    def client(index: int) -> None:
        kinds = ["short", "long"] if index % 2 else ["long", "short"]
        for k in range(jobs_per_client):
            kind = kinds[k % 2]
            data, frames = clips[kind]
            t = time.monotonic()
            try:
                handle.segment.remote(data, {"prompt": "red blue"}).result()
                done.append((kind, time.monotonic() - t, frames))
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    seconds = time.monotonic() - start
    return {"frames_per_s": sum(d[2] for d in done) / seconds, "jobs": len(done), "seconds": seconds,
            "failures": failures, "short": Timing([d[1] for d in done if d[0] == "short"] or [0.0]),
            "long": Timing([d[1] for d in done if d[0] == "long"] or [0.0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 jobs per client instead of 4")
    ap.add_argument("--frame-ms", type=float, default=30.0, help="the stand-in's model time per frame")
    ap.add_argument("--sessions", default="1,2,4")
    args = ap.parse_args()
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.video.probe import probe

    frame_s = args.frame_ms / 1e3
    per_client = 2 if args.quick else 4
    clips = {}
    for kind, length in (("short", 1), ("long", 3)):
        path = shapes_clip(256, 144, length)
        clips[kind] = (path.read_bytes(), probe(path).num_frames)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    serve.start()
    rows, rate = [], {}
    try:
        for sessions in [int(s) for s in args.sessions.split(",")]:
            handle = serve.run(build_app(app_args(sessions, frame_s)), name=APP, route_prefix=None)
            handle.segment.remote(clips["short"][0], {"prompt": "red"}).result()  # every replica up
            print(f"{sessions} session(s) per replica, {CLIENTS} clients x {per_client} jobs ...", flush=True)
            m = measure(handle, clips, per_client)
            rate[sessions] = m["frames_per_s"]
            rows.append({"sessions": sessions, "frames_per_s": m["frames_per_s"],
                         "model_busy": m["frames_per_s"] * frame_s, "jobs": m["jobs"], "seconds": m["seconds"],
                         "short_p50_s": m["short"].p50, "short_p99_s": m["short"].p99,
                         "long_p50_s": m["long"].p50, "long_p99_s": m["long"].p99, "failed": len(m["failures"])})
            if m["failures"]:
                print(f"  failures: {m['failures'][:3]}", flush=True)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\none tracker replica, stand-in model {args.frame_ms:.0f} ms a frame; clips 256x144: "
          f"short {clips['short'][1]} frames, long {clips['long'][1]} frames")
    print(table(rows, ["sessions", "frames_per_s", "model_busy", "jobs", "seconds", "short_p50_s", "short_p99_s",
                       "long_p50_s", "long_p99_s", "failed"]))
    base = rate.get(1) or next(iter(rate.values()))
    print("sessions per replica: " + ", ".join(f"{s} {r / base:.2f}x" for s, r in rate.items()))


if __name__ == "__main__":
    main()
