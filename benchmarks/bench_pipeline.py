"""The non-model path (probe -> decode -> composite -> encode) vs an ffmpeg transcode.

    python benchmarks/bench_pipeline.py [--quick] [--only speed|rss]

- speed: `run_local` with a zero-cost replay tracker (detections computed before the clock
  starts, handed out as the frames arrive), so the figures are the service's own path, not a
  tracker's; synthetic clips at 720p and 1080p, mask and overlay, vs `ffmpeg -i in.mp4 -c:v
  libx264 -preset veryfast -an` on the same clip in the same run (target: within 1.3x). Ends
  with the line `non-model path vs ffmpeg: mask 720p X.XX, overlay 720p X.XX, ...`.
- rss: peak RSS of the whole path with the stand-in tracker on a 10 s and a 60 s 1080p clip,
  each in a fresh process (target: 60 s within 1.2x of 10 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, CLIP_FPS, children_cpu_s, peak_rss_of, require_ffmpeg, run_ffmpeg, shapes_clip, table, timed  # noqa: E402,E501
from serve_app.contract import JobConfig  # noqa: E402
from serve_app.pipeline import DEFAULT_PRESETS, run_local  # noqa: E402

PROMPT = "red blue green yellow"
RSS_CODE = """
from serve_app.contract import JobConfig, Limits
from serve_app.pipeline import run_local
from serve_app.trackers.fake import ColorShapeTracker
t = run_local({src!r}, {dst!r}, JobConfig(prompt={prompt!r}, mode={mode!r}), ColorShapeTracker(),
              limits=Limits(max_bytes=2**31))
result = {{'total_s': t.total_ms / 1e3}}
"""


class ReplayTracker:
    """A tracker that costs nothing: it hands out detections computed beforehand, one per frame
    it is given. Not a model; it isolates the rest of the path."""

    def __init__(self, detections) -> None:
        self.detections = detections

    def track(self, chunks, info, config):
        for chunk in chunks:
            for i in range(len(chunk)):
                yield self.detections[chunk.start + i]


def precompute(clip: Path):
    """The stand-in tracker's detections for every frame of `clip` (untimed)."""
    from serve_app.pipeline import LocalFrames
    from serve_app.trackers.fake import ColorShapeTracker
    from serve_app.video.probe import probe

    info = probe(clip)
    frames = LocalFrames(clip, info)
    try:
        return list(ColorShapeTracker().track(frames, info, JobConfig(prompt=PROMPT)))
    finally:
        frames.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["speed", "rss"])
    args = ap.parse_args()
    secs, repeats = (3, 1) if args.quick else (10, 3)
    ffmpeg = require_ffmpeg()
    out = BENCH_DIR / "out"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    clips = {"720p": shapes_clip(1280, 720, secs), "1080p": shapes_clip(1920, 1080, secs)}
    print(f"clips ready in {time.perf_counter() - t:.1f} s ({BENCH_DIR})", flush=True)
    if args.only != "rss":
        rows, ratios = [], []
        for name, clip in clips.items():
            frames = secs * CLIP_FPS
            base = base_cpu = None
            if ffmpeg:
                c0 = children_cpu_s()
                base, _ = timed(lambda: run_ffmpeg("-i", str(clip), "-c:v", "libx264", "-preset", DEFAULT_PRESETS["overlay"],
                                                   "-an", str(out / "ffmpeg.mp4")), repeats)
                base_cpu = (children_cpu_s() - c0) / (repeats + 1)
                rows.append({"what": f"ffmpeg transcode {name}", "fps": frames / base.p50, "p50_s": base.p50,
                             "p90_s": base.p90, "ratio": 1.0, "cpu_s": base_cpu, "cpu_ratio": 1.0})
            replay = ReplayTracker(precompute(clip))
            for mode in ("mask", "overlay"):
                cfg = JobConfig(prompt=PROMPT, mode=mode)
                stages = {}

                def job():
                    stages["t"] = run_local(clip, out / f"{mode}.mp4", cfg, replay)

                c0 = time.process_time()
                run, warm = timed(job, repeats)
                cpu = (time.process_time() - c0) / (repeats + 1)
                st = stages["t"]
                ratio = run.p50 / base.p50 if base else None
                ratios.append(f"{mode} {name} {ratio:.2f}" if ratio else f"{mode} {name} -")
                rows.append({"what": f"{mode} {name}", "fps": frames / run.p50, "p50_s": run.p50,
                             "p90_s": run.p90, "ratio": ratio or "", "cpu_s": cpu,
                             "cpu_ratio": cpu / base_cpu if base_cpu else "", "warmup_s": warm,
                             "decode_s": st.decode_ms / 1e3, "composite_s": st.composite_ms / 1e3,
                             "encode_s": st.encode_ms / 1e3})
                if ffmpeg and mode == "overlay":
                    # The same transcode of the overlay's own pictures: coloured masks, boxes and
                    # antialiased labels cost libx264 more than the input's plain shapes do.
                    c0 = children_cpu_s()
                    same, _ = timed(lambda: run_ffmpeg("-i", str(out / "overlay.mp4"), "-c:v", "libx264", "-preset",
                                                       DEFAULT_PRESETS["overlay"], "-an", str(out / "ffmpeg2.mp4")),
                                    repeats)
                    rows.append({"what": f"ffmpeg transcode of the overlay {name}", "fps": frames / same.p50,
                                 "p50_s": same.p50, "p90_s": same.p90, "ratio": same.p50 / base.p50,
                                 "cpu_s": (children_cpu_s() - c0) / (repeats + 1),
                                 "cpu_ratio": (children_cpu_s() - c0) / (repeats + 1) / base_cpu})
            del replay
        print("\nthe non-model path, replay tracker (ratio = seconds / ffmpeg transcode seconds; target <= 1.3;"
              f" cpu_s = CPU seconds per run, all threads; masks are encoded at {DEFAULT_PRESETS['mask']},"
              f" overlays and ffmpeg at {DEFAULT_PRESETS['overlay']})")
        print(table(rows, ["what", "fps", "p50_s", "p90_s", "ratio", "cpu_s", "cpu_ratio", "warmup_s", "decode_s",
                           "composite_s", "encode_s"]))
        print("non-model path vs ffmpeg: " + ", ".join(ratios))
    if args.only != "speed":
        long_clip = shapes_clip(1920, 1080, 6 * secs)
        rows = []
        for name, clip in ((f"1080p {secs}s", clips["1080p"]), (f"1080p {6 * secs}s", long_clip)):
            for mode in ("mask", "overlay"):
                r = peak_rss_of(RSS_CODE.format(src=str(clip), dst=str(out / "rss.mp4"), mode=mode, prompt=PROMPT))
                rows.append({"what": f"{mode} {name}", **r})
        for row in rows:
            short = next(r for r in rows if r["what"].startswith(row["what"].split()[0]))
            row["ratio"] = row["peak_rss_mb"] / short["peak_rss_mb"]
        print("\npeak RSS of the whole path with the stand-in tracker, fresh process each"
              " (ratio = vs the short clip, same mode; target <= 1.2)")
        print(table(rows, ["what", "peak_rss_mb", "ratio", "total_s"]))


if __name__ == "__main__":
    main()
