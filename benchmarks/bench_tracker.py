"""The SAM 3 tracker stage on a GPU: fps by resolution and object count, compiled vs eager,
warm-up time, and peak GPU memory vs the video's length.

    python benchmarks/bench_tracker.py                   # needs CUDA
    python benchmarks/bench_tracker.py --cpu --frames 3  # smoke run of this script on a CPU

- fps: synthetic clips (coloured shapes) of --frames frames at 832x480, 1280x720 and 1920x1080
  through Sam3Tracker.track, for each object count, eager then compiled; the whole clip is
  timed (text prompt on frame 0 included), after one untimed run at the same size and count.
  Target on one H100: >= 20 fps at 1280x720 with up to 5 objects, compiled. The baseline in
  the same run is eager at each size and count; `x eager` is the compiled speed-up over it.
- objects are set, not hoped for: every detector proposal passes (thresholds 0, NMS off), the
  K best are kept and none is removed (`tracker.forced_objects`, what warm-up uses), so the
  tracker carries K objects from frame 0 (`tracked` reports SAM 3's own count). With the real
  thresholds NMS also runs on the few proposals above 0.5; that cost is not in these figures.
- warm-up: seconds to build the model, and to warm each size at start (compiled: the
  compile time).
- memory: peak torch.cuda.max_memory_allocated for clips of 1x, 2x and 4x --frames frames at
  1280x720 with the largest object count, compiled; target: flat in length.

benchmarks/gpu_check.py is the one-run check of the targets; this is the wider sweep.

Weights: $SAM3_CHECKPOINT or $HF_TOKEN if set, else random weights (same architecture and
compute per frame; the detections mean nothing). GPU figures are printed with the GPU's name.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, synthetic_chunks, table  # noqa: E402

SIZES = [(832, 480), (1280, 720), (1920, 1080)]


def run(tracker, width: int, height: int, n: int, objects: int) -> dict:
    import torch

    info, chunks = synthetic_chunks(width, height, n)
    cuda = tracker.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    emitted = sum(1 for _ in tracker.track_forced(chunks, info, objects))
    seconds = time.perf_counter() - start
    assert emitted == n, (emitted, n)
    log = tracker.frame_log
    return {
        "seconds": seconds,
        "fps": n / seconds,
        "tracked": max((r.objects_tracked for r in log), default=0),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "session_mib": max((r.held_bytes for r in log), default=0) / 2**20,
    }


def build(device: str, compile: bool, warm_sizes, random_weights: bool, objects: int):
    from serve_app.trackers.sam3.config import Sam3Config
    from testkit.sam3 import InstrumentedSam3Tracker

    start = time.perf_counter()
    config = Sam3Config(device=device, compile=compile, warm_sizes=warm_sizes, warm_up=compile, max_objects=objects,
                        model_overrides={"det_nms_thresh": 0.0})
    tracker = InstrumentedSam3Tracker(config, random_weights=random_weights)
    return tracker, time.perf_counter() - start


def release(tracker) -> None:
    import torch

    tracker.close()
    del tracker
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke-run on the CPU: eager, 832x480, 1 object")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (GPU default 120)")
    ap.add_argument("--objects", default="1,5", help="object counts, comma-separated")
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES))
    ap.add_argument("--skip-compiled", action="store_true")
    args = ap.parse_args()

    import importlib
    import logging

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("bench_tracker needs a CUDA GPU (torch sees none here). For a smoke run of the script "
              "on the CPU: python benchmarks/bench_tracker.py --cpu --frames 3", file=sys.stderr)
        return 2
    # Forced objects make SAM 3 warn on every frame that it hit max_num_objects.
    importlib.import_module("sam3.model.sam3_video_base")  # its logger is set up on import
    logging.getLogger("sam3.model.sam3_video_base").setLevel(logging.ERROR)
    from serve_app.errors import ModelUnavailable
    from serve_app.trackers.sam3.loading import resolve_weights

    try:
        resolve_weights()
        random_weights = False
    except ModelUnavailable:
        random_weights = True
        print("NOTE: no SAM 3 weights configured; random weights (same compute, meaningless detections)")
    device = "cpu" if args.cpu else "cuda"
    n = args.frames or (3 if args.cpu else 120)
    sizes = [(832, 480)] if args.cpu else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    counts = [1] if args.cpu else [int(k) for k in args.objects.split(",")]
    modes = [False] if args.cpu or args.skip_compiled else [False, True]
    where = "CPU" if args.cpu else torch.cuda.get_device_name()
    print(f"device: {where}; torch {torch.__version__}; {n} frames per clip; weights: "
          f"{'random' if random_weights else 'SAM 3'}", flush=True)

    rows, warm_rows, memory_rows, eager = [], [], [], {}
    for compiled in modes:
        extra = [s for s in sizes if s not in ((832, 480), (1280, 720))]
        tracker, build_s = build(device, compiled, extra, random_weights, max(counts))
        mode = "compiled" if compiled else "eager"
        warm_rows.append({"mode": mode, "build+warm_s": build_s,
                          **{f"warm {label}_s": s for label, s in tracker.warm_up_seconds.items()}})
        print(f"{mode}: built (and warmed) in {build_s:.1f} s", flush=True)
        for width, height in sizes:
            for k in counts:
                if not args.cpu:
                    run(tracker, width, height, min(n, 30), k)  # untimed: new shapes compile here
                r = run(tracker, width, height, n, k)
                key = (width, height, k)
                if not compiled:
                    eager[key] = r["fps"]
                rows.append({"mode": mode, "size": f"{width}x{height}", "objects": k, "tracked": r["tracked"],
                             "fps": r["fps"], "x eager": r["fps"] / eager[key], "peak_gpu_MiB": r["peak_gpu_mib"],
                             "session_MiB": r["session_mib"]})
                print(table(rows[-1:], list(rows[-1])), flush=True)
        if compiled or len(modes) == 1:
            w, h = (1280, 720) if not args.cpu else sizes[0]
            for length in ((n, 2 * n, 4 * n) if not args.cpu else ()):
                r = run(tracker, w, h, length, max(counts))
                memory_rows.append({"mode": mode, "size": f"{w}x{h}", "objects": max(counts), "frames": length,
                                    "peak_gpu_MiB": r["peak_gpu_mib"], "session_MiB": r["session_mib"],
                                    "x shortest": r["peak_gpu_mib"] / memory_rows[0]["peak_gpu_MiB"]
                                    if memory_rows else 1.0})
        if tracker.compiled:
            warm_rows[-1]["recompiles after warm-up"] = tracker.compiled.total_recompiles
        release(tracker)

    print(f"\n== tracker fps ({where}) ==")
    print(table(rows, ["mode", "size", "objects", "tracked", "fps", "x eager", "peak_gpu_MiB", "session_MiB"]))
    print(f"\n== start-up ({where}) ==")
    print(table(warm_rows, sorted({k for r in warm_rows for k in r}, key=lambda c: (c != "mode", c))))
    if memory_rows:
        print(f"\n== peak GPU memory vs length ({where}) ==")
        print(table(memory_rows, list(memory_rows[0])))
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    out = BENCH_DIR / "bench_tracker.json"
    out.write_text(json.dumps({"device": where, "frames": n, "fps": rows, "warm": warm_rows,
                               "memory": memory_rows, "random_weights": random_weights,
                               "host": os.uname().nodename}, indent=1, default=str))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
