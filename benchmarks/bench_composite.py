"""Compositing speed: ours vs sam3's own render_masklet_frame, in the same run.

    python benchmarks/bench_composite.py [--repeats 30]

5 objects on 720p and 1080p frames; overlay (ours vs sam3, the same picture) and mask mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table  # noqa: E402
from serve_app.video.composite import render_mask, render_overlay  # noqa: E402
from testkit.video import blobs  # noqa: E402


def per_frame_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (cv2 font cache, allocator)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(runs, 50)), float(np.percentile(runs, 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    t = time.perf_counter()
    from sam3.visualization_utils import render_masklet_frame

    print(f"import sam3.visualization_utils: {time.perf_counter() - t:.1f} s (serve_app never imports it)")
    rows = []
    for name, (w, h) in {"720p": (1280, 720), "1080p": (1920, 1080)}.items():
        frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        dets = blobs(h, w, 5, seed=1)
        outputs = {"out_obj_ids": dets.obj_ids, "out_probs": dets.scores,
                   "out_boxes_xywh": dets.boxes_xywh, "out_binary_masks": dets.masks}
        assert np.array_equal(render_overlay(frame, dets, 0.5), render_masklet_frame(frame, outputs, None, 0.5))
        ours, ours90 = per_frame_ms(lambda: render_overlay(frame, dets, 0.5), args.repeats)
        theirs, theirs90 = per_frame_ms(lambda: render_masklet_frame(frame, outputs, None, 0.5), args.repeats)
        mask, mask90 = per_frame_ms(lambda: render_mask(dets, h, w), args.repeats)
        rows.append({"what": f"overlay {name} 5 obj", "ours_ms": ours, "ours_p90": ours90, "sam3_ms": theirs,
                     "sam3_p90": theirs90, "speedup": theirs / ours, "ours_fps": 1e3 / ours})
        rows.append({"what": f"mask {name} 5 obj", "ours_ms": mask, "ours_p90": mask90, "ours_fps": 1e3 / mask})
    print("\nper frame, p50 over runs after a warm-up (speedup = sam3 ms / ours ms; identical pictures)")
    print(table(rows, ["what", "ours_ms", "ours_p90", "sam3_ms", "sam3_p90", "speedup", "ours_fps"]))


if __name__ == "__main__":
    main()
