"""What the prompt extensions cost, each against a plain job in the same run.

    python benchmarks/bench_prompts.py [--quick] [--only memory|concepts]

- memory: the whole CPU path (`run_local`, the stand-in tracker) on a long clip prompted on its
  last frame vs on its first: peak RSS (a fresh process each), the detections kept on disk while
  the backward pass runs, and the time. A prompt frame must not make memory grow with the
  video's length.
- concepts: SAM 3's real architecture with random weights on this CPU, nothing memoized: the
  vision backbone runs once per frame for all concepts (session.SharedBackbone, counted), the
  text encoder and detection heads once per concept. 1, 2 and 4 concepts on one model in one
  process, 4 objects in all each time (pinned detections, testkit.sam3.Pins, split evenly
  between the concepts), timed per frame as the model thread emits them, the prompt frame and
  the first propagated one left out. CPU seconds (the machine is shared, wall clock is printed
  beside them) per frame over one concept's. Shrunk to fit a CPU: the text encoder to 1 of 24
  layers (it runs on the prompt frame only, untimed); with --quick also the ViT to 8 of 32 blocks
  and the memory attention to 1 of 4 layers (both make the ratios worse: less cost that is
  not per concept), with what the full ViT would give added as arithmetic. SAM 3's hotstart
  is 1 frame, so its states step one frame at a time as after the first 15 frames of a job.
  Ends with `concepts vs one: 2 X.XX, 4 Y.YY`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, peak_rss_of, shapes_clip, table

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
    from serve_app.contract import Limits
    from serve_app.video.probe import probe

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


CONCEPTS = ("red shapes", "blue shapes", "green shapes", "yellow shapes")
OBJECTS = 4  # in all, whatever the number of concepts
# Four disjoint pinned detections on every frame, well above the default threshold (0.5, new
# objects 0.7), so the real thresholds and NMS run on 4 proposals, as on a clear scene; the
# detector itself still runs in full (Pins replaces its scores and masks after it).
DETECTIONS_PINNED = ((3.0, (0.05, 0.05, 0.45, 0.45)), (2.5, (0.55, 0.05, 0.95, 0.45)),
                     (2.0, (0.05, 0.55, 0.45, 0.95)), (1.5, (0.55, 0.55, 0.95, 0.95)))
SKIPPED = 2  # frames not timed: the prompt frame and the first propagated one (its features came with the prompt)


@contextlib.contextmanager
def objects_split_evenly():
    """Each of a job's k concepts may track OBJECTS / k. The service shares max_objects first
    come, first served (Session.cap_settings): every concept sees the same pinned detections,
    so the first would take all 4 and the others track nothing, which hides the per-concept
    tracker work a job with objects of each concept has. The total stays 4."""
    from serve_app.trackers.sam3.session import Session

    shared = Session.cap_settings
    Session.cap_settings = lambda self, run, settings: {
        **settings, "max_num_objects": int(settings["max_num_objects"]) // len(self.runs)}
    try:
        yield
    finally:
        Session.cap_settings = shared


def concepts(quick: bool) -> None:
    import importlib
    import logging
    import warnings

    import torch

    from benchmarks.common import synthetic_chunks

    warnings.filterwarnings("ignore", message=".*(autocast|torch.jit.script).*")
    from serve_app.trackers.sam3.config import Sam3Config
    from serve_app.trackers.sam3.frames import IMAGE_SIZE
    from serve_app.trackers.sam3.session import detection_settings, state_prompts
    from testkit.sam3 import Detection, InstrumentedSam3Tracker, Pins, shrink

    for name in ("sam3.model.sam3_video_inference", "sam3.model.sam3_video_base"):
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):  # a progress bar per state and clip
            module.tqdm = lambda iterable=None, *args, **kwargs: iterable
    logging.getLogger("serve_app.trackers.sam3.loading").setLevel(logging.ERROR)  # "random weights": said below

    n = 6 if quick else 9
    blocks, memory_layers = (8, 1) if quick else (None, None)
    torch.manual_seed(0)
    # hotstart 1: SAM 3 yields each frame once processed, so the states step one frame at a
    # time, as a job's do once its first hotstart_delay (15) frames are out.
    config = Sam3Config(device="cpu", compile=False, warm_up=False, max_objects=OBJECTS,
                        model_overrides={"hotstart_delay": 1})
    tracker = InstrumentedSam3Tracker(
        config, random_weights=True, pins=Pins(tuple(Detection(logit, box) for logit, box in DETECTIONS_PINNED)),
        text_layers=1, memory_attention_layers=memory_layers, measure_frames=())
    model = tracker.model
    backbone = model.detector.backbone
    vit = len(backbone.vision_backbone.trunk.blocks)
    full_pass = shrunk_pass = None
    if blocks:
        # One pass each of the full ViT and the shrunk one on the same input: what the full
        # ViT would add per frame, once per frame whatever the number of concepts.
        picture = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        full_pass = _cpu_timed(lambda: backbone.forward_image(picture))
        shrink(model, backbone_blocks=blocks)
        shrunk_pass = _cpu_timed(lambda: backbone.forward_image(picture))

    passes: list[float] = []   # when each backbone pass started (wall)
    marks: list[tuple[float, float]] = []  # (wall, CPU) when each frame was emitted
    forward_image = backbone.forward_image

    def counted(samples):  # SharedBackbone calls what the instance had: only real passes come here
        passes.append(time.perf_counter())
        return forward_image(samples)

    backbone.forward_image = counted
    after_frame = tracker.instruments.after_frame

    def mark(session, outputs) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        after_frame(session, outputs)

    tracker.instruments.after_frame = mark

    info, _ = synthetic_chunks(96, 54, n)
    print(f"\nSAM 3, random weights, CPU ({torch.get_num_threads()} threads), nothing memoized; {n} frames "
          f"{info.width}x{info.height} (resized to {IMAGE_SIZE}x{IMAGE_SIZE}), {OBJECTS} objects in all; "
          f"ViT {len(backbone.vision_backbone.trunk.blocks)} of {vit} blocks, memory attention "
          f"{len(model.tracker.transformer.encoder.layers)} of 4 layers, text encoder 1 of 24 layers (prompt only); "
          f"timed: frames {SKIPPED}..{n - 2} (the last has no next frame's detector to run)", flush=True)
    rows = []
    with objects_split_evenly():
        for k in (1, 2, 4):
            passes.clear()
            marks.clear()
            _, chunks = synthetic_chunks(96, 54, n)
            dets = list(tracker._track(chunks, info, state_prompts(CONCEPTS[:k]), detection_settings(0.5, OBJECTS)))
            assert len(dets) == len(marks) == n, (len(dets), len(marks), n)
            # frame f's time: from frame f - 1's emission to its own; the last frame is left
            # out too, as it has no next frame's detector pass to run (SAM 3 reads one ahead)
            start, end = marks[SKIPPED - 1], marks[n - 2]
            timed = n - 1 - SKIPPED
            per_concept = [int((d.concepts == c).sum()) for d in dets[SKIPPED:n - 1] for c in range(k)]
            counts = {tuple(per_concept[i:i + k]) for i in range(0, len(per_concept), k)}
            rows.append({
                "concepts": k,
                "objects": " / ".join("+".join(map(str, c)) for c in sorted(counts)),
                "tracked": tracker.last_job.get("tracked", 0),
                "frames": timed,
                "s/frame": (end[0] - start[0]) / timed,
                "cpu_s/frame": (end[1] - start[1]) / timed,
                "backbone/frame": sum(start[0] <= t < end[0] for t in passes) / timed,
                "backbone/clip": f"{len(passes)}/{n}",
            })
            print(f"  {k} concept(s): {rows[-1]['cpu_s/frame']:.1f} CPU s/frame", flush=True)
    tracker.close()
    one = rows[0]
    for r in rows:
        r["ratio"] = r["cpu_s/frame"] / one["cpu_s/frame"]
        r["wall_ratio"] = r["s/frame"] / one["s/frame"]
    print("objects: tracked per concept on each timed frame; tracked: SAM 3's own count, all concepts; "
          "ratio: CPU s/frame over 1 concept's")
    print(table(rows, ["concepts", "objects", "tracked", "frames", "s/frame", "cpu_s/frame", "ratio", "wall_ratio",
                       "backbone/frame", "backbone/clip"]))
    if full_pass is not None:
        extra = full_pass - shrunk_pass
        full = [(r["cpu_s/frame"] + extra) / (one["cpu_s/frame"] + extra) for r in rows]
        print(f"one ViT pass: {full_pass:.1f} CPU s with all {vit} blocks, {shrunk_pass:.1f} with {blocks}; "
              f"adding the difference once per frame, the full model would give: 2 {full[1]:.2f}, 4 {full[2]:.2f}")
    print(f"concepts vs one: 2 {rows[1]['ratio']:.2f}, 4 {rows[2]['ratio']:.2f}")


def _cpu_timed(fn) -> float:
    """CPU seconds of one call, under inference mode as SAM 3 runs."""
    import torch

    with torch.inference_mode():
        start = time.process_time()
        fn()
        return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["memory", "concepts"])
    args = ap.parse_args()
    if args.only in (None, "memory"):
        memory(args.quick)
    if args.only in (None, "concepts"):
        concepts(args.quick)


if __name__ == "__main__":
    main()
