"""The whole CPU path (probe -> decode -> stand-in tracker -> composite -> encode) vs the ffmpeg CLI.

    python benchmarks/bench_pipeline.py [--quick] [--only speed|rss]

- speed: run_local with ColorShapeTracker on synthetic 10 s clips at 720p and 1080p, mask and
  overlay, vs `ffmpeg -i in.mp4 -c:v libx264 -preset veryfast` on the same clip in the same run
  (target: within 1.3x of the ffmpeg transcode);
- rss: peak RSS of the whole path on a 10 s and a 60 s 1080p clip, each in a fresh process
  (target: 60 s within 1.2x of 10 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CLIP_FPS, shapes_clip, BENCH_DIR, children_cpu_s, peak_rss_of, require_ffmpeg, run_ffmpeg, table, timed  # noqa: E402
from serve_app.contract import JobConfig  # noqa: E402
from serve_app.pipeline import DEFAULT_PRESETS, run_local  # noqa: E402
from serve_app.trackers.fake import ColorShapeTracker  # noqa: E402

PRESET = DEFAULT_PRESETS["overlay"]
FPS = CLIP_FPS


RSS_CODE = """
from serve_app.contract import JobConfig
from serve_app.pipeline import run_local
from serve_app.trackers.fake import ColorShapeTracker
from serve_app.types import Limits
t = run_local({src!r}, {dst!r}, JobConfig(prompt='red blue green yellow', mode={mode!r}), ColorShapeTracker(),
              limits=Limits(max_bytes=2**31))
result = {{'total_s': t.total_ms / 1e3}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["speed", "rss"])
    args = ap.parse_args()
    secs, repeats = (3, 1) if args.quick else (10, 3)
    has_ffmpeg = require_ffmpeg() is not None
    out = BENCH_DIR / "out"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    clips = {"720p": shapes_clip(1280, 720, secs), "1080p": shapes_clip(1920, 1080, secs)}
    print(f"clips ready in {time.perf_counter() - t:.1f} s ({BENCH_DIR})", flush=True)
    if args.only != "rss":
        rows = []
        for name, clip in clips.items():
            frames = secs * FPS
            base = None
            if has_ffmpeg:
                c0 = children_cpu_s()
                base, _ = timed(lambda: run_ffmpeg("-i", str(clip), "-c:v", "libx264", "-preset", PRESET,
                                                   "-an", str(out / "ffmpeg.mp4")), repeats)
                base_cpu = (children_cpu_s() - c0) / (repeats + 1)
                rows.append({"what": f"ffmpeg transcode {name}", "fps": frames / base.p50, "p50_s": base.p50,
                             "p90_s": base.p90, "ratio": 1.0, "cpu_s": base_cpu, "cpu_ratio": 1.0})
            for mode in ("mask", "overlay"):
                cfg = JobConfig(prompt="red blue green yellow", mode=mode)
                stages = {}

                def job():
                    stages["t"] = run_local(clip, out / f"{mode}.mp4", cfg, ColorShapeTracker())

                c0 = time.process_time()
                run, warm = timed(job, repeats)
                cpu = (time.process_time() - c0) / (repeats + 1)
                st = stages["t"]
                rows.append({"what": f"pipeline {mode} {name}", "fps": frames / run.p50, "p50_s": run.p50,
                             "p90_s": run.p90, "ratio": run.p50 / base.p50 if base else "",
                             "cpu_s": cpu, "cpu_ratio": cpu / base_cpu if base else "",
                             "warmup_s": warm, "decode_s": st.decode_ms / 1e3, "track_s": st.track_ms / 1e3,
                             "composite_s": st.composite_ms / 1e3, "encode_s": st.encode_ms / 1e3})
        print("\nwhole CPU path (ratio = pipeline seconds / ffmpeg transcode seconds; target <= 1.3;"
              f" cpu_s = CPU seconds per run, all threads; mask videos are encoded at {DEFAULT_PRESETS['mask']},"
              f" overlay and ffmpeg at {PRESET})")
        print(table(rows, ["what", "fps", "p50_s", "p90_s", "ratio", "cpu_s", "cpu_ratio", "warmup_s", "decode_s", "track_s",
                           "composite_s", "encode_s"]))
    if args.only != "speed":
        long_clip = shapes_clip(1920, 1080, 6 * secs)
        rows = []
        for name, clip in ((f"1080p {secs}s", clips["1080p"]), (f"1080p {6 * secs}s", long_clip)):
            for mode in ("mask", "overlay"):
                r = peak_rss_of(RSS_CODE.format(src=str(clip), dst=str(out / "rss.mp4"), mode=mode))
                rows.append({"what": f"{mode} {name}", **r})
        for row in rows:
            short = next(r for r in rows if r["what"].startswith(row["what"].split()[0]))
            row["ratio"] = row["peak_rss_mb"] / short["peak_rss_mb"]
        print("\npeak RSS of the whole path, fresh process each (ratio = vs the short clip, same mode; target <= 1.2)")
        print(table(rows, ["what", "peak_rss_mb", "ratio", "total_s"]))


if __name__ == "__main__":
    main()
