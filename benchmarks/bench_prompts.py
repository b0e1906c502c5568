"""What the prompt extensions cost, each against a plain job in the same run.

    python benchmarks/bench_prompts.py [--quick] [--only memory|concepts]

- memory: the whole CPU path (`run_local`, the stand-in tracker) on a long clip prompted on its
  last frame vs on its first: peak RSS (a fresh process each), the detections kept on disk while
  the backward pass runs, and the time. A prompt frame must not make memory grow with the
  video's length.
- concepts: SAM 3's real architecture with random weights on this CPU (the detector memoized,
  as the slow tests do, so only what several concepts add is timed): seconds per frame with 2
  and 4 concepts over one, the same objects tracked. Ends with `concepts vs one: 2 X.XX, 4 Y.YY`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, peak_rss_of, shapes_clip, table  # noqa: E402

MEMORY_CODE = """
from serve_app.contract import JobConfig, Limits
from serve_app.pipeline import Reordered, run_local
from serve_app.trackers.fake import ColorShapeTracker
spilled = []
close = Reordered.close
Reordered.close = lambda self: (spilled.append(self.spill.size), close(self))
t = run_local({src!r}, {dst!r}, JobConfig(prompt="red blue green yellow", mode={mode!r}, prompt_frame={frame}),
              ColorShapeTracker(), limits=Limits(max_bytes=2**31))
result = {{'total_s': t.total_ms / 1e3, 'spilled_mb': (spilled[0] if spilled else 0) / 2**20}}
"""


def memory(quick: bool) -> None:
    from serve_app.video.probe import probe
    from serve_app.contract import Limits

    width, height, seconds = (1280, 720, 20) if quick else (1920, 1080, 60)
    clip = shapes_clip(width, height, seconds)
    frames = probe(clip, Limits(max_bytes=2**31)).num_frames
    out = BENCH_DIR / "prompts"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in ("mask", "overlay"):
        for frame in (0, frames - 1):
            r = peak_rss_of(MEMORY_CODE.format(src=str(clip), dst=str(out / "out.mp4"), mode=mode, frame=frame))
            rows.append({"what": f"{mode}, prompt on frame {frame}", **r})
    for first, last in zip(rows[::2], rows[1::2]):
        last["rss_ratio"] = last["peak_rss_mb"] / first["peak_rss_mb"]
        last["time_ratio"] = last["total_s"] / first["total_s"]
    print(f"\n{width}x{height}, {frames} frames, the stand-in tracker, one process each (ratios: vs frame 0)")
    print(table(rows, ["what", "peak_rss_mb", "rss_ratio", "spilled_mb", "total_s", "time_ratio"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["memory", "concepts"])
    args = ap.parse_args()
    if args.only in (None, "memory"):
        memory(args.quick)


if __name__ == "__main__":
    main()
