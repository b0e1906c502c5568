"""The served graph over HTTP vs the in-process pipeline, on the same clip, in the same run.

    python benchmarks/bench_graph.py [--quick] [--only speed|memory|flow]

- speed: POST /v2/segment (mask mode, stand-in tracker on CPU) against `sam3-video serve`'s
  graph (embedded Ray, HTTP proxy), at 1, 2 and 4 concurrent clients, vs
  serve_app.pipeline.run_local on a synthetic 720p 10 s clip. Reports p50/p90/p99 latency,
  throughput, the overhead ratio (graph p50 at one client / in-process p50; target <= 1.25),
  how the stages overlap (total vs the sum and the slowest of the x-<stage>-ms headers), and
  checks every answer: none lost, each the right mask for its own prompt.
- memory: peak RSS growth of the ingress replica and of Serve's HTTP proxy while a ~95 MB mp4
  is uploaded and segmented, and while a 600 MB chunked upload is refused at the 100 MB limit.
- flow: decoded frames in flight between decoder and tracker vs the video's length, with a
  tracker slowed to 10 ms a frame (the scripted test double): the most chunks decoded and not
  yet taken by the tracker (serve_app/graph/pull.py measures it per job), and those chunks in MB.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CLIP_FPS, shapes_clip, BENCH_DIR, Timing, table, timed  # noqa: E402
from testkit.net import free_port  # noqa: E402
from testkit.video import masks, truth_iou  # noqa: E402
from serve_app.contract import JobConfig  # noqa: E402

FPS = CLIP_FPS
PROMPTS = ("red", "blue", "green", "yellow")  # one per client: a mixed-up answer shows at once
STAGES = ("probe", "decode", "track", "composite", "encode")


def big_clip(target_bytes: int) -> Path:
    """A valid 720p mp4 just under `target_bytes`: noise coded losslessly (~1.3 MB a frame)."""
    import av
    import numpy as np

    path = BENCH_DIR / f"noise_{target_bytes // 2**20}MB.mp4"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        written = 0
        while written < target_bytes * 0.93:
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (720, 1280, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                written += packet.size
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert tmp.stat().st_size < target_bytes
    tmp.replace(path)
    return path


def start_graph(port: int):
    from serve_app.app import start_app

    t = time.perf_counter()
    start_app({"tracker": "fake", "graceful_shutdown_timeout_s": 0.5, "tracker_drain_timeout_s": 0.5},
              http=("127.0.0.1", port))
    return time.perf_counter() - t


def post(client, base: str, clip: bytes, prompt: str):
    t = time.perf_counter()
    r = client.post(f"{base}/v2/segment", params={"prompt": prompt}, content=clip,
                    headers={"Accept": "video/mp4"}, timeout=600)
    return r, time.perf_counter() - t


def speed(base: str, clip_path: Path, seconds: int, repeats: int) -> None:
    import httpx

    from serve_app.pipeline import run_local
    from serve_app.trackers.fake import ColorShapeTracker

    clip = clip_path.read_bytes()
    out = BENCH_DIR / "out"
    out.mkdir(parents=True, exist_ok=True)
    width, height, frames = 1280, 720, seconds * FPS

    local, local_warm = timed(lambda: run_local(clip_path, out / "local.mp4", JobConfig(prompt="red"),
                                                ColorShapeTracker()), repeats)
    rows = [{"what": "in-process run_local", "clients": 1, "jobs": repeats, "p50_s": local.p50,
             "p90_s": local.p90, "p99_s": local.p99, "jobs_per_s": 1 / local.p50, "ratio": 1.0,
             "warmup_s": local_warm}]

    # The answer to each prompt, alone; every later answer must decode to the same masks.
    reference, stage_rows = {}, []
    with httpx.Client() as client:
        first = None
        for prompt in PROMPTS:
            r, s = post(client, base, clip, prompt)
            first = first or s
            assert r.status_code == 200, r.text
            reference[prompt] = masks(r.content)
            assert len(reference[prompt]) == frames
            assert truth_iou(reference[prompt], {prompt}, width, height) > 0.9, prompt

    for clients in (1, 2, 4):
        per_client = repeats if clients == 1 else max(2, repeats // 2)
        answers: list = []
        lock = threading.Lock()

        def client_loop(k: int) -> None:
            prompt = PROMPTS[k % len(PROMPTS)]
            with httpx.Client() as c:
                for _ in range(per_client):
                    r, s = post(c, base, clip, prompt)
                    with lock:
                        answers.append((prompt, r, s))

        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_loop, range(clients)))
        wall = time.perf_counter() - t
        assert len(answers) == clients * per_client, "lost answers"
        lat = Timing([s for _, _, s in answers])
        for prompt, r, _ in answers:  # checked after timing: decoding competes for the 2 cores
            assert r.status_code == 200, r.text
            got = masks(r.content)
            assert len(got) == frames and all((a == b).all() for a, b in zip(got, reference[prompt])), \
                f"answer for {prompt!r} differs from that prompt's answer alone"
        rows.append({"what": "graph over HTTP", "clients": clients, "jobs": len(answers), "p50_s": lat.p50,
                     "p90_s": lat.p90, "p99_s": lat.p99, "jobs_per_s": len(answers) / wall,
                     "ratio": lat.p50 / local.p50, "warmup_s": first if clients == 1 else ""})
        if clients == 1:
            for _, r, s in answers:
                ms = {k: float(r.headers[f"x-{k}-ms"]) for k in (*STAGES, "total")}
                stage_rows.append(ms)
    print(f"\nlatency and throughput, 720p {seconds} s clip, mask mode, stand-in tracker "
          "(ratio = p50 / in-process p50; target at 1 client <= 1.25; every answer checked)")
    print(table(rows, ["what", "clients", "jobs", "p50_s", "p90_s", "p99_s", "jobs_per_s", "ratio", "warmup_s"]))

    n = len(stage_rows)
    mean = {k: sum(r[k] for r in stage_rows) / n for k in (*STAGES, "total")}
    busy = sum(mean[k] for k in STAGES)
    slowest = max(STAGES, key=lambda k: mean[k])
    print("\nstage overlap at 1 client (mean ms from the x-<stage>-ms headers)")
    print(table([{**{k: mean[k] for k in (*STAGES, "total")}, "sum": busy,
                  "total/sum": mean["total"] / busy, "total/slowest": mean["total"] / mean[slowest],
                  "slowest": slowest}],
                [*STAGES, "total", "sum", "total/sum", "total/slowest", "slowest"]))


def flow(seconds_list: tuple[int, ...]) -> None:
    from ray import serve

    from serve_app.app import APP_NAME, AppArgs, build_app

    serve.delete(APP_NAME)  # the local cluster has CPUs for one app (run last for this reason)
    args = AppArgs(tracker={"kind": "fake", "frame_delay_s": 0.01}, graceful_shutdown_timeout_s=0.5,
                   tracker_drain_timeout_s=0.5)
    handle = serve.run(build_app(args), name="flow", route_prefix=None)
    width, height = 640, 360
    rows = []
    for seconds in seconds_list:
        clip = shapes_clip(width, height, seconds).read_bytes()
        t = time.perf_counter()
        result = handle.segment_result.remote(clip, {"prompt": "red"}).result()
        wall = time.perf_counter() - t
        x, frames = result.timings, result.num_frames
        lead = x.decode_lead_chunks
        rows.append({"frames": frames, "chunks": -(-frames // args.chunk_frames), "lead_chunks": lead,
                     "in_flight_mb": lead * args.chunk_frames * width * height * 3 / 2**20,
                     "all_frames_mb": frames * width * height * 3 / 2**20, "decode_opens": x.decode_opens,
                     "wasted_frames": x.decode_wasted_frames, "seconds": wall})
    serve.delete("flow")
    print(f"\ndecoded frames in flight vs length, {width}x{height}, tracker at 10 ms/frame, chunk_frames="
          f"{args.chunk_frames}, decode_ahead_chunks={args.decode_ahead_chunks} (bound: ahead + 1 chunks)")
    print(table(rows, ["frames", "chunks", "lead_chunks", "in_flight_mb", "all_frames_mb", "decode_opens",
                       "wasted_frames", "seconds"]))


def serve_pids() -> dict[str, int]:
    import psutil

    pids = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:sam3-video:Ingress" in cmd:
            pids["ingress"] = p.pid
        elif "ProxyActor" in cmd:
            pids["proxy"] = p.pid
    return pids


def rss_mb(pid: int, field: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory(base: str, port: int) -> None:
    import httpx

    pids = serve_pids()
    big = big_clip(96 * 2**20)
    rows = []

    def measure(what: str, send) -> None:
        before = {}
        for name, pid in pids.items():
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before[name] = rss_mb(pid, "VmRSS")
        t = time.perf_counter()
        status = send()
        row = {"what": what, "status": status, "seconds": time.perf_counter() - t}
        for name, pid in pids.items():
            row[f"{name}_rss_mb"] = before[name]
            row[f"{name}_peak_growth_mb"] = rss_mb(pid, "VmHWM") - before[name]
        rows.append(row)

    def upload_big() -> int:
        r = httpx.post(f"{base}/v2/segment", params={"prompt": "red"}, content=big.read_bytes(),
                       headers={"Accept": "video/mp4"}, timeout=600)
        return r.status_code

    def refuse_600() -> int:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v2/segment?prompt=red HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n")
            s.settimeout(0.001)
            chunk, head = b"\0" * 2**20, b""
            for _ in range(600):
                try:
                    head += s.recv(4096)
                except (TimeoutError, BlockingIOError):
                    pass
                if head:
                    break
                s.settimeout(30)
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                s.settimeout(0.001)
            s.settimeout(30)
            while b"\r\n" not in head:
                head += s.recv(4096)
            return int(head.split()[1])

    measure(f"{big.stat().st_size / 2**20:.0f} MB mp4 segmented", upload_big)
    measure("600 MB chunked, refused", refuse_600)
    print("\npeak RSS growth while uploading (VmHWM reset before each; MB = 2**20 bytes)")
    print(table(rows, ["what", "status", "seconds", "ingress_rss_mb", "ingress_peak_growth_mb",
                       "proxy_rss_mb", "proxy_peak_growth_mb"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["speed", "memory", "flow"])
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The replicas import serve_app from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH")]))
    repeats = 2 if args.quick else 5
    print(f"machine: {os.cpu_count()} cores (shared with other work: figures are noisy; ratios are "
          "taken within this run)", flush=True)
    seconds = 3 if args.quick else 10
    clip = shapes_clip(1280, 720, seconds)
    port = free_port()
    print(f"graph started in {start_graph(port):.1f} s", flush=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if args.only in (None, "speed"):
            speed(base, clip, seconds, repeats)
        if args.only in (None, "memory"):
            memory(base, port)
        if args.only in (None, "flow"):
            flow((5, 10) if args.quick else (5, 10, 20))
    finally:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
