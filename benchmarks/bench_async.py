"""The async job API's cost: the same clip through POST /v2/job and through /v2/job/async
(submit, follow job.json, fetch the output), on one local graph, in the same run.

    python benchmarks/bench_async.py [--quick]

The stand-in tracker waits `--frame-ms` a frame (a GPU model's pace, no CPU). Prints p50 wall
times, the async path's added time (target <= 5%), and how long after the 201 the first
progress shows in job.json. Ends with the line `async vs sync: X.XX; first progress: N.N s`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timing, shapes_clip, table  # noqa: E402
from testkit.net import free_port  # noqa: E402

JOB = "inference.sam3.segment.video.v1"


def main() -> None:
    import httpx

    from serve_app.app import start_app
    from serve_app.client import multipart_job

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frame-ms", type=float, default=20.0)
    args = ap.parse_args()
    seconds, repeats = (3, 3) if args.quick else (10, 5)
    clip = shapes_clip(1280, 720, seconds).read_bytes()
    port = free_port()
    start_app({"tracker": {"kind": "fake", "frame_delay_s": args.frame_ms / 1e3},
               "job_store": tempfile.mkdtemp(prefix="bench-jobs-"), "graceful_shutdown_timeout_s": 0.5,
               "tracker_drain_timeout_s": 0.5},
              http=("127.0.0.1", port))
    base = f"http://127.0.0.1:{port}"
    body, ctype = multipart_job({"type": JOB, "config": {"prompt": "red blue"}}, clip)
    headers = {"Content-Type": ctype, "Accept": "video/mp4"}

    def sync() -> None:
        r = httpx.post(f"{base}/v2/job", content=body, headers=headers, timeout=600)
        assert r.status_code == 200, r.text

    first_progress: list[float] = []

    def async_job() -> None:
        start = time.perf_counter()
        job = httpx.post(f"{base}/v2/job/async", content=body, headers=headers, timeout=600).json()
        accepted, seen = time.perf_counter(), None
        while job["state"]["current"] not in ("processed", "failed"):
            time.sleep(0.2)  # each poll is a request the ingress serves beside the job: keep it real
            job = httpx.get(f"{base}/v2/job/async/{job['id']}/job.json", timeout=60).json()
            if seen is None and job["progress"]["frames_done"] > 0:
                seen = time.perf_counter() - accepted
        assert job["state"]["current"] == "processed", job
        assert httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4", timeout=60).status_code == 200
        first_progress.append(seen if seen is not None else time.perf_counter() - start)

    sync(), async_job()  # warm-up: replicas, caches
    first_progress.clear()
    runs = {"sync": [], "async": []}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, fn in (("sync", sync), ("async", async_job)):
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    s, a, f = Timing(runs["sync"]), Timing(runs["async"]), Timing(first_progress)
    print(f"\n{seconds} s of 1280x720 ({seconds * 30} frames), stand-in tracker at {args.frame_ms:g} ms a frame, "
          f"{repeats} runs each")
    print(table([{"path": "POST /v2/job", "p50_s": s.p50, "p90_s": s.p90},
                 {"path": "/v2/job/async (submit, poll, fetch)", "p50_s": a.p50, "p90_s": a.p90,
                  "first_progress_s": f.p50}], ["path", "p50_s", "p90_s", "first_progress_s"]))
    print(f"async vs sync: {a.p50 / s.p50:.2f}; first progress: {f.p50:.1f} s")


if __name__ == "__main__":
    main()
