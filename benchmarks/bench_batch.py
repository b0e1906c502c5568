"""A batch on a simulated multi-node cluster: does a batch driver keep N tracker replicas as busy
as one, so that videos/s grows N-fold?

    python benchmarks/bench_batch.py [--quick]

`ray.cluster_utils.Cluster` starts a head (0 CPUs) and three worker nodes with one logical GPU
each, as bench_scale does; the tracker is the stand-in waiting 30 ms a frame (a GPU's pace, no
CPU), one job at a time per replica, a decoder on every worker. For N = 1, 2, 3 tracker replicas
the app is redeployed and serve_app.batch runs a manifest of 60-frame 256x144 clips through its
handle, as `sam3-video batch --address auto` does, with its default in flight (what the graph
runs at once: N). Warm-up (a first batch of N videos on the new replicas) is excluded and
reported apart. Prints videos/s, frames/s, seconds per video (p50/p90) and how busy the
trackers were (tracking time / (N x wall)), and ends with
`batch efficiency: N=2 X.XX, N=3 Y.YY` (videos/s with N replicas / (N x videos/s with one)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_scale import APP  # noqa: E402
from benchmarks.common import Timing, shapes_clip, table  # noqa: E402

FRAMES = 60  # shapes_clip(..., 2): 2 s at 30 fps


def app_args(frame_s: float, replicas: int, workers: int) -> dict:
    return {"tracker": {"kind": "fake", "frame_delay_s": frame_s}, "tracker_num_gpus": 1, "tracker_num_cpus": 0,
            "tracker_min_replicas": replicas, "tracker_max_replicas": replicas, "tracker_max_ongoing_requests": 1,
            "decoder_replicas": workers, "decoder_max_replicas_per_node": 1, "decoder_num_cpus": 0.25,
            "encoder_replicas": 2, "encoder_num_cpus": 0.25, "max_queued_requests": 32,
            "job_store": tempfile.mkdtemp(prefix="bench-batch-"), "graceful_shutdown_timeout_s": 1,
            "tracker_drain_timeout_s": 1}


def run_batch(handle, clip: Path, videos: int, tag: str, plus: int = 0):
    """(report, its Batch) of `videos` copies of the clip through the handle into a new DEST."""
    from serve_app.batch.dest import Dest
    from serve_app.batch.manifest import load
    from serve_app.batch.run import Batch
    from serve_app.batch.segmenters import HandleSegmenter

    folder = Path(tempfile.mkdtemp(prefix=f"bench-batch-{tag}-"))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"input": str(clip), "config": {"prompt": "red blue"}, "output": f"v{i}"})
                                + "\n" for i in range(videos)))
    segmenter = HandleSegmenter(handle)
    batch = Batch(load(str(manifest), {}), Dest(str(folder / "out")), segmenter,
                  inflight=segmenter.jobs_at_once + plus, show_progress=False)
    return batch.run(), batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frame-ms", type=float, default=30.0)
    ap.add_argument("--inflight-plus", type=int, default=0, help="jobs in flight beyond the default (a comparison)")
    args = ap.parse_args()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import build_app

    per_replica = 6 if args.quick else 16
    frame_s, workers = args.frame_ms / 1e3, 3
    clip = shapes_clip(256, 144, 2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start()
    print(f"cluster up in {time.monotonic() - t0:.0f} s; {per_replica} videos per replica, "
          f"{FRAMES} frames each at {args.frame_ms:g} ms a frame", flush=True)
    rows, rate = [], {}
    try:
        for n in (1, 2, 3):
            t = time.monotonic()
            handle = serve.run(build_app(app_args(frame_s, n, workers)), name=APP, route_prefix=None)
            deployed = time.monotonic() - t
            warm, _ = run_batch(handle, clip, n, f"warm{n}")
            report, batch = run_batch(handle, clip, per_replica * n, f"n{n}", args.inflight_plus)
            assert report.count("done") == per_replica * n, [o.line() for o in report.outcomes.values()
                                                              if o.status != "done"][:3]
            rate[n] = report.count("done") / report.seconds
            lat = Timing([o.seconds for o in report.outcomes.values()])
            rows.append({"replicas": n, "inflight": batch.inflight, "videos": report.count("done"),
                         "seconds": report.seconds, "videos_per_s": rate[n], "frames_per_s": rate[n] * FRAMES,
                         "p50_s": lat.p50, "p90_s": lat.p90,
                         "tracker_busy": rate[n] * FRAMES * frame_s / n, "warmup_s": warm.seconds,
                         "deploy_s": deployed})
            print(f"N={n}: {rate[n]:.2f} videos/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print("\nbatch through the app's handle, by tracker replicas (warm-up and deploy excluded)")
    print(table(rows, ["replicas", "inflight", "videos", "seconds", "videos_per_s", "frames_per_s", "p50_s", "p90_s",
                       "tracker_busy", "warmup_s", "deploy_s"]))
    eff = {n: rate[n] / (n * rate[1]) for n in (2, 3)}
    print(f"batch efficiency: N=2 {eff[2]:.2f}, N=3 {eff[3]:.2f}")


if __name__ == "__main__":
    main()
