"""SAM 3 on one GPU, proved in one run: compile and warm-up time, tracker fps by size and object
count against stock sam3, recompiles after warm-up, GPU memory against video length, trimmed
vs untrimmed outputs, and the end-to-end estimate. Random weights (no checkpoint): the same
architecture and compute per frame; the detections mean nothing, so object counts are forced.

Here (needs the network and this repo's venv; writes .whl/: the wheels the GPU machine lacks,
sam3's BPE vocabulary, and the CPU stages' throughput measured on this machine):

    .venv/bin/python benchmarks/gpu_check.py --prepare

There (Python 3.12 with torch and CUDA, no network, no Ray/PyAV/decord/sam3; the exact
command, with `.whl` carried, is printed by --prepare):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site SAM3_BPE_PATH=.whl/bpe_simple_vocab_16e6.txt.gz
    python3 benchmarks/gpu_check.py --cpu-stages .whl/cpu_stages.json

On a CPU, the same code paths in a few minutes (tiny sizes, a few frames, the detector
memoized on repeated frames, a CPU compile backend); its figures mean nothing for speed:

    .venv/bin/python benchmarks/gpu_check.py --cpu --quick

Targets (GPU): >= 25 fps end to end at 1280x720 with <= 5 objects; the tracker >= 2x stock sam3
eager on the same clip; 0 recompiles after warm-up; GPU memory at 400 frames <= 1.05x at 100.
The last line is `recompiles after warm-up: N`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import synthetic_chunks  # noqa: E402

WHEELS = REPO / ".whl"
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CPU_STAGES = "cpu_stages.json"
PROMPT = "coloured shapes"
TRACKER_PARTS = ("tracker.maskmem_backbone", "tracker.transformer.encoder", "tracker.sam_mask_decoder")
# What the GPU machine lacks (its image has torch, numpy, opencv, timm, huggingface_hub, regex,
# pillow, tqdm, einops, psutil, scikit-image, portalocker, typing-extensions): sam3 and its
# undeclared-elsewhere needs, and pydantic for serve_app's configs.
CARRIED = ("sam3", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "ftfy", "wcwidth",
           "iopath", "pycocotools")
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64")
LIMIT_MIB = 64


# -- the run -----------------------------------------------------------------------------------
class Plan:
    """Sizes, object counts and lengths: the GPU's, or tiny ones for --cpu --quick."""

    def __init__(self, args) -> None:
        gpu = not args.cpu
        self.device = "cuda" if gpu else "cpu"
        self.sizes = [(832, 480), (1280, 720)] if gpu else [(64, 36), (96, 54)]
        self.objects = [1, 5, 16] if gpu else [1, 2]
        self.max_objects = max(self.objects)
        self.frames = args.frames or (90 if gpu and not args.quick else 2 if not gpu else 30)
        self.memory_frames = (100, 400) if gpu and not args.quick else (2, 4) if not gpu else (50, 200)
        self.trim_frames = 64 if gpu and not args.quick else 6 if not gpu else 32
        self.stock_objects = 5 if gpu else 2
        self.pool = 30 if gpu else 1          # distinct frames a clip cycles (CPU: one, memoized)
        self.warm_frames = None if gpu else 2  # None: SAM 3's hotstart + 2
        self.gpu = gpu
        self.e2e_size = self.sizes[-1]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_check(args) -> dict:
    import torch

    from testkit.sam3 import InstrumentedSam3Tracker
    from serve_app.trackers.sam3.config import Sam3Config

    plan = Plan(args)
    if plan.gpu and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (torch sees none); on a CPU: --cpu --quick")
    where = torch.cuda.get_device_name() if plan.gpu else f"CPU ({os.cpu_count()} cores)"
    results: dict = {"device": where, "torch": torch.__version__, "python": platform.python_version(),
                     "sam3": _version("sam3"), "random_weights": True, "rows": []}
    say(f"device: {where}; torch {torch.__version__}; Python {platform.python_version()}; sam3 {results['sam3']}")
    rows = results["rows"]

    # 1. build, compile, warm up (what a replica does before it reports ready)
    torch.manual_seed(0)
    start = time.perf_counter()
    config = Sam3Config(device=plan.device, compile=True, max_objects=plan.max_objects,
                        warm_frames=plan.warm_frames, warm_up=plan.gpu, model_overrides={"det_nms_thresh": 0.0})
    tracker = InstrumentedSam3Tracker(config, random_weights=True,
                                      compile_backend=None if plan.gpu else "eager",
                                      compile_parts=None if plan.gpu else TRACKER_PARTS, memo_detector=not plan.gpu)
    if not plan.gpu:  # one tiny size: every warm-up clip costs a detector pass on a CPU
        tracker.warm_up_seconds = tracker.warm_up([plan.sizes[0]])
    ready_s = time.perf_counter() - start
    compiled = tracker.compiled
    warm = ", ".join(f"{k} {v:.0f} s" for k, v in tracker.warm_up_seconds.items())
    rows.append(row("model build + compile + warm-up", f"{ready_s:.0f} s", "", detail=warm))
    say(f"ready in {ready_s:.1f} s (warm-up clips: {warm}); compile failures: {compiled.failed or 'none'}")

    # 2. tracker fps by size and object count
    fps = {}
    for width, height in plan.sizes:
        for k in plan.objects:
            info, chunks = synthetic_chunks(width, height, plan.frames, plan.pool)
            synchronize()
            t = time.perf_counter()
            n = sum(1 for _ in tracker.track_forced(chunks, info, k))
            synchronize()
            seconds = time.perf_counter() - t
            tracked = max(r.objects_tracked for r in tracker.frame_log)
            fps[(width, height, k)] = n / seconds
            rows.append(row(f"tracker fps {width}x{height}, {k} objects", f"{n / seconds:.1f}", "",
                            detail=f"{n} frames, {tracked} tracked, {tracker.last_job['recompiles']} recompiles"))
            say(rows[-1]["line"])

    # 3. GPU memory against length
    lo, hi = plan.memory_frames
    width, height = plan.e2e_size
    info, chunks = synthetic_chunks(width, height, hi, plan.pool)
    _free()
    weights = torch.cuda.memory_allocated() if plan.gpu else 0  # the model, its CUDA graph pools
    list(tracker.track_forced(chunks, info, plan.max_objects))
    at = {r.frame + 1: r for r in tracker.frame_log}
    if plan.gpu:  # the job's own memory: what is allocated above the model's
        a, b = (at[lo].cuda_allocated - weights) / 2**20, (at[hi].cuda_allocated - weights) / 2**20
        total = f"{at[lo].cuda_allocated / 2**20:.0f} / {at[hi].cuda_allocated / 2**20:.0f} MiB with the model"
    else:
        a, b = at[lo].held_bytes / 2**20, at[hi].held_bytes / 2**20
        total = "CPU: what the session holds"
    rows.append(row(f"GPU memory after {lo} / {hi} frames ({width}x{height}, {plan.max_objects} objects)",
                    f"{a:.0f} / {b:.0f} MiB", "", detail=f"{total}; the session holds "
                    f"{at[lo].held_bytes / 2**20:.0f} / {at[hi].held_bytes / 2**20:.0f} MiB"))
    rows.append(row(f"memory ratio {hi} / {lo} frames (above the model)", f"{b / a:.3f}", "<= 1.05",
                    ok=b / a <= 1.05))
    per_frame = (at[hi].held_bytes - at[lo].held_bytes) / (hi - lo)  # tensors and Python bookkeeping
    rows.append(row("session growth per frame, extrapolated to 18,000 frames",
                    f"{per_frame:.0f} B -> {per_frame * 18_000 / 2**20:.1f} MiB", "",
                    detail=f"everything the session holds, frames {lo}-{hi}"))
    say(rows[-3]["line"])
    say(rows[-1]["line"])

    recompiles = compiled.total_recompiles
    rows.append(row("recompiles after warm-up", str(recompiles), "0", ok=recompiles == 0,
                    detail=", ".join(f"{p}: {n}" for p, n in compiled.recompiles.items()) or "none"))

    # 4. stock sam3 (eager) on the same clip, from the same weights; then trimmed vs untrimmed
    checkpoint = Path(tempfile.gettempdir()) / "gpu_check_sam3_random.pt"
    torch.save({"model": tracker.model.state_dict()}, checkpoint)  # the model thread is idle between jobs
    tracker.close()
    del tracker
    _free()
    width, height = plan.e2e_size
    k = plan.stock_objects
    stock_fps, stock_model = run_stock(plan, checkpoint, width, height, k)
    checkpoint.unlink(missing_ok=True)
    ours = fps[(width, height, k)]
    rows.append(row(f"stock sam3 eager fps {width}x{height}, {k} objects", f"{stock_fps:.1f}", ""))
    rows.append(row("tracker / stock sam3", f"{ours / stock_fps:.2f}x", ">= 2x", ok=ours / stock_fps >= 2))
    say(rows[-2]["line"])

    equal, detail = trimmed_vs_untrimmed(plan, stock_model)
    rows.append(row(f"trimmed vs untrimmed, {plan.trim_frames} frames, compile off", "bitwise equal" if equal
                    else "DIFFERENT", "equal", ok=equal, detail=detail))
    say(rows[-1]["line"])
    del stock_model
    _free()

    # 5. end to end at 1280x720: the stages overlap, so the slowest one sets the pace
    stages = None
    if args.cpu_stages and Path(args.cpu_stages).is_file():
        stages = json.loads(Path(args.cpu_stages).read_text())
    width, height = plan.e2e_size
    k = min(5, plan.max_objects)
    gpu_fps = fps[(width, height, k)]
    if stages:
        for mode, cpu_fps in stages["fps"].items():
            e2e = min(gpu_fps, cpu_fps)
            rows.append(row(f"end to end {width}x{height}, {k} objects, {mode}", f"{e2e:.1f} fps", ">= 25",
                            ok=e2e >= 25, detail=f"min(tracker {gpu_fps:.1f}, CPU stages {cpu_fps:.1f} on "
                                                 f"{stages['machine']})"))
    else:
        rows.append(row(f"end to end {width}x{height}, {k} objects", "not estimated", ">= 25",
                        detail="no --cpu-stages file (gpu_check --prepare measures one)"))
    results["recompiles_after_warm_up"] = recompiles
    results["imported"] = sorted(m for m in ("ray", "av", "decord", "open_clip") if m in sys.modules)
    return results


def run_stock(plan: Plan, checkpoint: Path, width: int, height: int, k: int):
    """sam3's own predictor (`build_sam3_video_predictor` + `handle_request`, eager) on the clip,
    the same objects forced. On a CPU its CUDA-only predictor runs inside serve_app's
    compatibility layer; timed: the prompt and the propagation, not loading the frames."""
    import contextlib

    from PIL import Image

    from serve_app.trackers.sam3 import compat
    from serve_app.trackers.sam3.loading import bpe_path
    from serve_app.trackers.sam3.tracker import forced_objects

    compat.install()
    if plan.gpu:
        from sam3.model_builder import build_sam3_video_predictor

        predictor = build_sam3_video_predictor(checkpoint_path=str(checkpoint), bpe_path=bpe_path())
        context = contextlib.nullcontext
    else:
        predictor = _cpu_predictor(checkpoint)
        context = lambda: compat.model_context("cpu")  # noqa: E731
    model = predictor.model
    for name, value in forced_objects(k).items():
        setattr(model, name, value)
    info, chunks = synthetic_chunks(width, height, plan.frames, plan.pool)
    images = [Image.fromarray(f) for c in chunks for f in c.frames]
    # sam3 stacks float16 frames on the CPU, which CPU autocast refuses (CUDA autocast leaves CPU
    # tensors alone): on a CPU the session starts outside the model's context.
    with context() if plan.gpu else compat.on_device("cpu"):
        session = predictor.handle_request({"type": "start_session", "resource_path": images})["session_id"]
    with context():
        synchronize()
        t = time.perf_counter()
        predictor.handle_request({"type": "add_prompt", "session_id": session, "frame_index": 0, "text": PROMPT})
        n = sum(1 for _ in predictor.handle_stream_request({"type": "propagate_in_video", "session_id": session}))
        synchronize()
        seconds = time.perf_counter() - t
        predictor.handle_request({"type": "close_session", "session_id": session})
    if n != plan.frames:
        raise RuntimeError(f"stock sam3 gave {n} frames of {plan.frames}")
    say(f"stock sam3: {n} frames in {seconds:.1f} s")
    return n / seconds, model


def _cpu_predictor(checkpoint: Path):
    """Sam3VideoPredictor calls .cuda() in its constructor and torch.cuda in its logging: on a
    CPU, the same object around a model built by build_sam3_video_model."""
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor
    from sam3.model_builder import build_sam3_video_model

    from testkit.sam3 import memoize_detector
    from serve_app.trackers.sam3 import compat
    from serve_app.trackers.sam3.loading import bpe_path

    with compat.on_device("cpu"):
        model = build_sam3_video_model(checkpoint_path=str(checkpoint), load_from_HF=False, bpe_path=bpe_path(),
                                       device="cpu").eval()
    memo = type("Memo", (), {"detector_passes": 0})()
    memoize_detector(model, memo)
    predictor = Sam3VideoPredictor.__new__(Sam3VideoPredictor)
    predictor.model, predictor.async_loading_frames, predictor.video_loader_type = model, False, "cv2"
    predictor._get_session_stats = predictor._get_torch_and_gpu_properties = lambda: "(cpu)"
    return predictor


def trimmed_vs_untrimmed(plan: Plan, model) -> tuple[bool, str]:
    """The same clip through serve_app's Session with and without trimming, on the eager model:
    every frame's outputs and the tracker's mask logits (before thresholding) compared bitwise."""
    from serve_app.trackers.sam3.frames import LazyFrames
    from serve_app.trackers.sam3.session import Session
    from serve_app.trackers.sam3.tracker import forced_objects

    width, height = plan.sizes[0]
    n = plan.trim_frames
    runs = []
    for trim in (True, False):
        info, chunks = synthetic_chunks(width, height, n, plan.pool)
        pending = iter(chunks)
        logits, outputs = [], []
        original = model.run_tracker_propagation

        def record(*a, **kw):
            masks, scores = original(*a, **kw)
            logits.append((masks.detach().float().cpu(), scores.detach().float().cpu()))
            return masks, scores

        model.run_tracker_propagation = record
        try:
            frames = LazyFrames(n, lambda: next(pending, None), model.device, expected_size=(height, width))
            session = Session(model, frames, n, height, width, trim=trim)
            try:
                for _ in session.steps(PROMPT, lambda i, out: outputs.append(out), forced_objects(plan.stock_objects)):
                    pass
            finally:
                session.close()
        finally:
            del model.run_tracker_propagation
        runs.append((outputs, logits))
    (out_a, log_a), (out_b, log_b) = runs
    import torch

    for f, ((m1, s1), (m2, s2)) in enumerate(zip(log_a, log_b, strict=True)):
        if not (torch.equal(m1, m2) and torch.equal(s1, s2)):
            return False, f"tracker logits differ at step {f}"
    for f, (a, b) in enumerate(zip(out_a, out_b, strict=True)):
        for key in ("out_obj_ids", "out_probs", "out_boxes_xywh", "out_binary_masks"):
            if not np.array_equal(a[key], b[key]):
                return False, f"{key} differs at frame {f}"
    tracked = max(int(o["frame_stats"]["num_obj_tracked"]) for o in out_a)
    return True, f"{len(log_a)} tracker steps and {len(out_a)} frames, {tracked} objects"


def row(what: str, value: str, target: str, ok: bool | None = None, detail: str = "") -> dict:
    mark = "" if ok is None else ("yes" if ok else "NO")
    line = f"{what}: {value}" + (f" (target {target}: {mark})" if target else "") + (f"; {detail}" if detail else "")
    return {"what": what, "value": value, "target": target, "ok": mark, "detail": detail, "line": line}


def say(text: str) -> None:
    print(text, flush=True)


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_table(results: dict) -> None:
    from benchmarks.common import table

    print(f"\n== SAM 3 GPU check: {results['device']}, torch {results['torch']}, sam3 {results['sam3']}, "
          f"random weights ==")
    print(table(results["rows"], ["what", "value", "target", "ok", "detail"]))
    print(f"imported on this path: {', '.join(results['imported']) or 'none of ray, av, decord, open_clip'}")
    print(f"recompiles after warm-up: {results['recompiles_after_warm_up']}")


# -- preparing the run ----------------------------------------------------------------------------
def prepare(args) -> int:
    """Wheels, vocabulary and CPU-stage throughput into .whl/; prints the size and the command."""
    wheels = Path(args.wheels)
    wheels.mkdir(exist_ok=True)
    for old in wheels.glob("*.whl"):
        old.unlink()
    python = args.python_version
    pins = [f"{name}=={_version(name)}" for name in CARRIED]
    binary = [p for p in pins if not p.startswith("iopath")]
    platforms = [x for p in PIP_PLATFORMS for x in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *platforms, "-d", str(wheels), *binary], check=True)
    # iopath publishes only a source archive; it is pure Python, so a wheel built here works there
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), *[p for p in pins if p.startswith("iopath")]],
                   check=True)
    import open_clip

    bpe = Path(open_clip.__file__).parent / BPE_NAME
    (wheels / BPE_NAME).write_bytes(bpe.read_bytes())
    if not args.skip_cpu_stages:
        stages = measure_cpu_stages()
        (wheels / CPU_STAGES).write_text(json.dumps(stages, indent=1))
        say(f"CPU stages at 1280x720 on this machine: {stages['fps']}")

    carried = sum(p.stat().st_size for p in wheels.iterdir())
    repo = sum((REPO / f).stat().st_size for f in _travelling_files() if (REPO / f).is_file())
    total = (carried + repo) / 2**20
    say(f"{wheels}: {carried / 2**20:.1f} MiB ({', '.join(sorted(p.name for p in wheels.iterdir()))}); "
        f"the repo's travelling files: {repo / 2**20:.1f} MiB; together {total:.1f} MiB "
        f"(limit {LIMIT_MIB} MiB): {'ok' if total <= LIMIT_MIB else 'TOO LARGE'}")
    say("device command (carry: .whl):\n" + device_command())
    return 0 if total <= LIMIT_MIB else 1


def device_command() -> str:
    return ("set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
            "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site SAM3_BPE_PATH=.whl/" + BPE_NAME +
            " PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --cpu-stages .whl/" + CPU_STAGES +
            " --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log")


def _travelling_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what the device machine receives."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def measure_cpu_stages(seconds: int = 5) -> dict:
    """The service's non-model path (probe, decode, composite, encode; serve_app.pipeline.run_local)
    at 1280x720 with a tracker that costs nothing, in mask and overlay mode: the throughput
    the CPU stages give the GPU tracker. Needs PyAV, so it runs here, not on the GPU machine."""
    from benchmarks.bench_pipeline import PROMPT as STAGES_PROMPT, ReplayTracker, precompute
    from benchmarks.common import shapes_clip
    from serve_app.contract import JobConfig
    from serve_app.pipeline import run_local
    from serve_app.video.probe import probe

    src = shapes_clip(1280, 720, seconds)
    info = probe(src)
    replay = ReplayTracker(precompute(src))

    fps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("mask", "overlay"):
            config = JobConfig(prompt=STAGES_PROMPT, mode=mode)
            timings = run_local(src, Path(tmp) / f"{mode}.mp4", config, replay)
            fps[mode] = round(info.num_frames / (timings.total_ms / 1e3), 1)
    return {"fps": fps, "frames": info.num_frames,
            "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"}


# -- main --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="here: fill .whl/ and print the device command")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the Python the wheels are for")
    ap.add_argument("--wheels", default=str(WHEELS), help="--prepare: where (default .whl/, what travels)")
    ap.add_argument("--skip-cpu-stages", action="store_true", help="--prepare: do not measure the CPU stages")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (figures mean nothing for speed)")
    ap.add_argument("--quick", action="store_true", help="fewer frames (with --cpu: tiny sizes, a few frames)")
    ap.add_argument("--frames", type=int, default=None, help="frames per fps clip (GPU default 90)")
    ap.add_argument("--cpu-stages", default=None, help="CPU-stage throughput JSON from --prepare")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("serve_app.trackers.sam3").setLevel(logging.INFO)
    start = time.perf_counter()
    results = run_check(args)
    results["total_s"] = round(time.perf_counter() - start, 1)
    say(f"total {results['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
