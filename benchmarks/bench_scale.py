"""Scale-out on a simulated multi-node cluster: does adding tracker replicas add throughput, and
does the graph shrink again without losing work?

    python benchmarks/bench_scale.py [--quick]

`ray.cluster_utils.Cluster` starts a head and three worker nodes on this machine, each worker
advertising one GPU (a logical resource: nothing runs on a GPU). The tracker is the stand-in
with a per-frame wait that mimics a GPU model without using CPU, one job at a time per replica,
autoscaled 1-3; a decoder sits on every worker (so frames never cross nodes). Clients ramp
1 -> 2 -> 4 -> 8 over small clips through the handle API, then one client stays while the
tracker scales back down. Prints replicas over time, throughput and p50/p99 latency per replica
count, the frame bytes that crossed nodes per job, and ends with
`scale efficiency: N=2 X.XX, N=3 X.XX` (throughput at N replicas / (N x at one replica)).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Timing, shapes_clip, table  # noqa: E402

APP = "scale"


def tracker_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["Tracker"]
    return status.replica_states.get("RUNNING", 0)


def app_args(frame_s: float, workers: int, spread: bool = True) -> dict:
    return {"tracker": {"kind": "fake", "frame_delay_s": frame_s}, "tracker_num_gpus": 1, "tracker_num_cpus": 0,
            "tracker_min_replicas": 1, "tracker_max_replicas": workers, "tracker_max_ongoing_requests": 1,
            # 1.5: one client's back-to-back jobs overlap a little and must not look like two
            "tracker_target_ongoing_requests": 1.5, "tracker_upscale_delay_s": 2, "tracker_downscale_delay_s": 10,
            "decoder_replicas": workers if spread else 1, "decoder_num_cpus": 0.25,
            **({"decoder_max_replicas_per_node": 1} if spread else {}),
            "encoder_replicas": 2, "encoder_num_cpus": 0.25, "max_queued_requests": 32,
            "job_store": tempfile.mkdtemp(prefix="bench-scale-"), "graceful_shutdown_timeout_s": 2,
            "tracker_drain_timeout_s": 30}  # a retired replica finishes its jobs (~2 s each)


def start(frame_s: float, workers: int = 3):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The head takes no stage (0 CPUs, as cluster.yaml's): every replica lands on a worker.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start()
    handle = serve.run(build_app(app_args(frame_s, workers)), name=APP, route_prefix=None)
    return cluster, handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frame-ms", type=float, default=30.0)
    ap.add_argument("--smoke", action="store_true", help="one scale-up and down on two workers; a JSON line")
    args = ap.parse_args()
    if args.smoke:
        return smoke(args.frame_ms / 1e3)
    step_s = 40 if args.quick else 90
    clip = shapes_clip(256, 144, 2).read_bytes()  # 60 frames: ~1.8 s of "GPU" a job at 30 ms a frame
    t0 = time.monotonic()
    cluster, handle = start(args.frame_ms / 1e3)
    print(f"cluster and app up in {time.monotonic() - t0:.0f} s", flush=True)

    done: list[tuple[float, float, int, int]] = []  # (finished at, seconds, replicas then, cross-node bytes)
    failures: list[str] = []
    clients = [0]
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    start_at = time.monotonic()

    def client(index: int) -> None:
        while not stop.is_set() and index < clients[0]:
            t = time.monotonic()
            try:
                result = handle.segment_result.remote(clip, {"prompt": "red blue"}).result()
                done.append((time.monotonic() - start_at, time.monotonic() - t, samples[-1][1] if samples else 1,
                             result.timings.decode_cross_node_bytes))
            except Exception as exc:  # counted: the drain must lose nothing
                failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - start_at, tracker_replicas(), clients[0]))
            time.sleep(1)

    threading.Thread(target=sample, daemon=True).start()
    threads: list[threading.Thread] = []
    for n in (1, 2, 4, 8):
        clients[0] = n
        while len(threads) < n:
            threads.append(threading.Thread(target=client, args=(len(threads),), daemon=True))
            threads[-1].start()
        print(f"{n} client(s) for {step_s} s ...", flush=True)
        time.sleep(step_s)
    clients[0] = 1  # the drain: one client goes on while the tracker shrinks back
    drain_from = time.monotonic() - start_at
    deadline = time.monotonic() + 60 + step_s
    while tracker_replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(60)

    # Throughput at N replicas: jobs finished while N ran with at least N clients (saturated),
    # over the time they ran so; latency of the jobs finished then.
    spans: dict[int, float] = defaultdict(float)
    finished: dict[int, list[float]] = defaultdict(list)
    for (t1, r1, c1), (t2, r2, _) in zip(samples, samples[1:]):
        if r1 == r2 and c1 >= r1 > 0:
            spans[r1] += t2 - t1
            finished[r1] += [s for at, s, *_ in done if t1 <= at < t2]
    rows, rate = [], {}
    for n in sorted(spans):
        rate[n] = len(finished[n]) / spans[n] if spans[n] else 0.0
        lat = Timing(finished[n] or [0.0])
        rows.append({"replicas": n, "seconds": spans[n], "jobs": len(finished[n]), "jobs_per_s": rate[n],
                     "p50_s": lat.p50, "p99_s": lat.p99})
    print("\ntracker replicas over time (seconds since the first client: replicas, clients)")
    print(", ".join(f"{at:.0f}: {r} ({c})" for at, r, c in samples[::5]))
    print("\nthroughput and latency by tracker replicas running, while the clients kept them busy")
    print(table(rows, ["replicas", "seconds", "jobs", "jobs_per_s", "p50_s", "p99_s"]))
    drained = [d for d in done if d[0] >= drain_from]
    print(f"\ndrain: {len(drained)} jobs finished while scaling down, {len(failures)} failed or lost "
          f"({failures[:3]}); replicas at the end: {tracker_replicas()}")
    spread = [b for *_, b in done]
    central = cross_node_with_one_decoder(clip, args.frame_ms / 1e3)
    print(f"frame bytes crossing nodes per job (of {60 * 256 * 144 * 3 / 2**20:.1f} MB decoded): "
          f"{sum(spread) / len(spread) / 2**20:.2f} MB with a decoder on each tracker node, "
          f"{sum(central) / len(central) / 2**20:.2f} MB with one decoder for all")
    eff = {n: rate.get(n, 0) / (n * rate[1]) if rate.get(1) else 0.0 for n in (2, 3)}
    print(f"scale efficiency: N=2 {eff[2]:.2f}, N=3 {eff[3]:.2f}")
    import ray

    ray.shutdown()
    cluster.shutdown()


def smoke(frame_s: float) -> None:
    """Two workers: three clients until a second tracker runs, then one until it is gone."""
    import json

    clip = shapes_clip(256, 144, 2).read_bytes()
    cluster, handle = start(frame_s, workers=2)
    clients, seen, failures, jobs = [3], [], [], [0]
    stop = threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            if index >= clients[0]:
                time.sleep(0.2)
                continue
            try:
                handle.segment.remote(clip, {"prompt": "red"}).result()
                jobs[0] += 1
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while (n := tracker_replicas()) < 2 and time.monotonic() < deadline:
        seen.append(n)
        time.sleep(1)
    seen.append(tracker_replicas())
    clients[0] = 1
    deadline = time.monotonic() + 150
    while (n := tracker_replicas()) > 1 and time.monotonic() < deadline:
        seen.append(n)
        time.sleep(1)
    seen.append(tracker_replicas())
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(60)
    print(json.dumps({"replicas": seen, "jobs": jobs[0], "failures": failures}))
    import ray

    ray.shutdown()
    cluster.shutdown()


def cross_node_with_one_decoder(clip: bytes, frame_s: float, workers: int = 3) -> list[int]:
    """The same jobs with the decoders not spread: one decoder serves every tracker."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from serve_app.app import build_app

    serve.delete(APP)
    args = app_args(frame_s, workers, spread=False) | {"tracker_min_replicas": workers}
    handle = serve.run(build_app(args), name="scale-central", route_prefix=None)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda _: handle.segment_result.remote(clip, {"prompt": "red"}).result(),
                                range(3 * workers)))
    serve.delete("scale-central")
    return [r.timings.decode_cross_node_bytes for r in results]


if __name__ == "__main__":
    main()
