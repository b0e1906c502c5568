"""SAM 3 on one GPU, proved inside one device loan: cold and warm start, tracker fps with a full
memory bank against stock sam3 on the same clip, the memory attention's kernel, recompiles after
warm-up, GPU memory against video length, trimmed vs untrimmed outputs. Random weights (no
checkpoint): the same architecture and compute per frame, made to cost what a trained model
costs where cost depends on the weights (objects forced, present on every frame and passing
memory selection, so memory attention reads the full window); its detections mean nothing.

Phases, in order of value, inside --budget-s (default 540): ready (build, compile, warm-up),
fps (1 and 5 objects at 1280x720, then 16 if time allows), attention (SDPA's kernel for the
memory attention), stock (sam3's own predictor, eager, on the same clip), memory (100 vs 400
frames), trim (trimmed vs untrimmed with memory selection reaching back past the window),
warm-start (a new process, the compile cache of the first). Each prints `phase NAME: S s` and
rewrites the --json file when it ends; one predicted not to fit prints `skipped NAME: why`; a
phase still running at the deadline is cut there and the run ends inside the budget.

Here (needs the network and this repo's venv; writes .whl/: the wheels the GPU machine lacks,
sam3's BPE vocabulary, and the CPU stages' throughput measured on this machine), then the
printed command there (with `.whl` carried):

    .venv/bin/python benchmarks/gpu_check.py --prepare

On a CPU, every phase in a few minutes (tiny sizes, a shallower model, a short memory window,
the detector memoized on repeated frames, the tracker's parts compiled by inductor in C++); its
figures mean nothing for speed:

    .venv/bin/python benchmarks/gpu_check.py --cpu --quick [--budget-s 90]

Targets (GPU): ready within 300 s cold, 60 s warm; >= 25 fps at 1280x720 with 5 objects and a
full memory bank; >= 1.5x stock sam3 on the same clip; 0 recompiles after warm-up; GPU memory
at 400 frames <= 1.05x at 100. The last line is `recompiles after warm-up: N`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here: importing numpy, torch and sam3 takes seconds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import synthetic_chunks  # noqa: E402
from testkit.budget import Budget  # noqa: E402

WHEELS = REPO / ".whl"
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CPU_STAGES = "cpu_stages.json"
PROMPT = "coloured shapes"
PHASES = ("ready", "fps", "attention", "stock", "memory", "trim", "warm-start")
TRACKER_PARTS = ("tracker.maskmem_backbone", "tracker.transformer.encoder", "tracker.sam_mask_decoder")
# On a CPU: a 4-frame memory window (3 memory frames, 3 pointer frames) and a 3-frame hotstart,
# so a clip of 8 frames fills the window; NMS off (it compares every proposal pair at full size).
CPU_OVERRIDES = {"det_nms_thresh": 0.0, "hotstart_delay": 3, "hotstart_unmatch_thresh": 2, "hotstart_dup_thresh": 2,
                 "tracker.num_maskmem": 4, "tracker.max_obj_ptrs_in_encoder": 4}
CPU_SHRINK = {"backbone_blocks": 2, "memory_attention_layers": 1, "text_layers": 1}
# For predicting the stock phase only (what it measures is its own): eager sam3 taken as this
# many times slower per frame than ours; a prediction too high skips it, one too low is cut.
STOCK_SLOWER = 3.0
# What the GPU machine lacks (its image has torch, numpy, opencv, timm, huggingface_hub, regex,
# pillow, tqdm, einops, psutil, scikit-image, portalocker, typing-extensions): sam3 and its
# undeclared-elsewhere needs, and pydantic for serve_app's configs.
CARRIED = ("sam3", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "ftfy", "wcwidth",
           "iopath", "pycocotools")
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64")
LIMIT_MIB = 64
LOAN_COMMAND_S = 600   # the device's limit on one command
DEVICE_BUDGET_S = 540  # gpu_check's own budget inside it: the wheels' install and the exit fit around it
CPU_BUDGET_S = 1800    # the CPU rehearsal of every phase, on 2 shared cores


class Plan:
    """Sizes, object counts and lengths: the GPU's, or tiny ones for --cpu."""

    def __init__(self, args) -> None:
        self.gpu = not args.cpu
        quick = args.quick
        self.device = "cuda" if self.gpu else "cpu"
        if self.gpu:
            self.size, self.trim_size = (1280, 720), (832, 480)
            self.fps_objects, self.more_objects, self.max_objects = (1, 5), 16, 16
            self.frames = args.frames or (60 if quick else 90)
            self.memory_frames = (50, 200) if quick else (100, 400)
            self.trim_frames, self.occluded = 64, range(24, 44)  # 20 frames: selection reaches past the 16
            self.pool = 30            # distinct frames a clip cycles
            self.warm_frames = None   # SAM 3's hotstart + 2
            self.overrides, self.shrink = {}, {}
        else:
            self.size = self.trim_size = (96, 54)
            self.fps_objects, self.more_objects, self.max_objects = (1, 2), None, 2
            self.frames = args.frames or 10
            self.memory_frames = (8, 16)
            self.trim_frames, self.occluded = 10, range(3, 6)
            self.pool = 1             # one still frame: the memoized detector runs once
            self.warm_frames = 5      # fills the 4-frame window
            self.overrides, self.shrink = dict(CPU_OVERRIDES), dict(CPU_SHRINK)
        self.stock_objects = self.memory_objects = self.fps_objects[-1]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quiet_progress() -> None:
    """sam3's per-clip tqdm bars (it passes `disable=` itself, so TQDM_DISABLE does not reach
    them) would fill the loan's log; the same for our runs and stock sam3's."""
    import importlib

    for name in ("sam3.model.sam3_video_inference", "sam3.model.sam3_tracking_predictor", "sam3.model.io_utils"):
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):
            module.tqdm = lambda iterable=None, *args, **kwargs: iterable


def build_tracker(plan: Plan, cache_dir: str, on_warm_clip=None):
    """What a replica does before it reports ready: build, compile (lazily, in the first clip
    of each shape) and warm up. Returns (tracker, build seconds, ready seconds)."""
    import torch

    from serve_app.trackers.sam3.config import Sam3Config
    from testkit.sam3 import InstrumentedSam3Tracker

    quiet_progress()
    torch.manual_seed(0)
    config = Sam3Config(device=plan.device, compile=True, max_objects=plan.max_objects, warm_frames=plan.warm_frames,
                        warm_up=plan.gpu, model_overrides=plan.overrides, compile_cache_dir=cache_dir)
    options = {"present_objects": True, "count_memory": True, "measure_frames": (), "on_warm_clip": on_warm_clip}
    if not plan.gpu:  # inductor in C++ for the tracker's parts; the detector is memoized instead
        options.update(compile_backend="inductor", compile_parts=TRACKER_PARTS, memo_detector=True, **plan.shrink)
    start = time.perf_counter()
    tracker = InstrumentedSam3Tracker(config, random_weights=True, **options)
    if not plan.gpu:  # one tiny size: every warm size costs a detector pass on a CPU
        tracker.warm_up_seconds = tracker.warm_up([plan.size])
    ready_s = time.perf_counter() - start
    return tracker, tracker.instruments.built_at - start, ready_s


def clip(plan: Plan, n: int, size=None, preload: bool = True):
    width, height = size or plan.size
    info, chunks = synthetic_chunks(width, height, n, plan.pool)
    return info, (list(chunks) if preload else chunks)  # preloaded: assembling frames is not tracking


class Check:
    """The phases, sharing what they measured (for the next ones' predictions) and the models."""

    def __init__(self, args, plan: Plan, budget: Budget) -> None:
        self.args, self.plan, self.budget = args, plan, budget
        self.results = budget.results
        self.rows: list[dict] = self.results.setdefault("rows", [])
        self.own_cache = args.cache_dir is None  # made here, so removed at the end
        self.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sam3_compile_cache_")
        self.tracker = None
        self.predictor = None           # stock sam3
        self.build_s = self.ready_s = None
        self.per_frame: dict[int, float] = {}  # objects -> our seconds per frame (full memory)
        self.stock_per_frame = None

    def row(self, what: str, value: str, target: str = "", ok: bool | None = None, detail: str = "") -> None:
        if not self.plan.gpu and ok is not None:
            ok = None  # a CPU's figures are not measured against a GPU's targets
        mark = "" if ok is None else ("yes" if ok else "NO")
        line = f"{what}: {value}" + (f" (target {target}: {mark})" if target and mark else "")
        self.rows.append({"what": what, "value": value, "target": target, "ok": mark, "detail": detail})
        say(line + (f"; {detail}" if detail else ""))

    # -- ready ---------------------------------------------------------------------------------
    def ready(self, record: dict) -> None:
        record["cache_dir"] = self.cache_dir
        record["warm_up"] = warm = {}

        def on_clip(label, seconds, tracked):  # a cut run still says how far the warm-up got
            warm[label] = {"seconds": round(seconds, 1), "objects": tracked}
            self.budget.save()

        self.tracker, self.build_s, self.ready_s = build_tracker(self.plan, self.cache_dir, on_clip)
        compiled = self.tracker.compiled
        record.update(build_s=round(self.build_s, 1), ready_s=round(self.ready_s, 1), buckets=compiled.buckets,
                      autotune=compiled.autotune, compile_failures=compiled.failed or None)
        clips = ", ".join(f"{k} {v:.0f} s" for k, v in self.tracker.warm_up_seconds.items())
        say(f"ready in {self.ready_s:.1f} s (build {self.build_s:.1f} s; warm-up clips: {clips}); "
            f"autotune {compiled.autotune}; compile failures: {compiled.failed or 'none'}")
        cold = self.own_cache  # an empty cache: everything compiled here
        self.row(f"ready (build + compile + warm-up), {'cold' if cold else 'with the cache given'}",
                 f"{self.ready_s:.0f} s", "<= 300 s" if cold else "", self.ready_s <= 300 if cold else None,
                 detail=f"{len(compiled.buckets)} object buckets {compiled.buckets}; {clips}")

    # -- fps -----------------------------------------------------------------------------------
    def fps(self, record: dict) -> None:
        plan = self.plan
        for k in plan.fps_objects:
            record[f"{k} objects"] = self.clip_fps(k)
        k = plan.more_objects
        if k:
            one, last = plan.fps_objects[0], plan.fps_objects[-1]  # seconds per frame grow about linearly
            slope = (self.per_frame[last] - self.per_frame[one]) / (last - one)
            predicted = plan.frames * (self.per_frame[last] + slope * (k - last)) + 5
            if self.budget.fits(predicted + self.min_after()):
                record[f"{k} objects"] = self.clip_fps(k)
            else:
                self.budget.skip(f"fps {k} objects", f"predicted {predicted:.0f} s, kept for the phases after")
        k = plan.fps_objects[-1]
        self.end_to_end(1 / self.per_frame[k], k)

    def min_after(self) -> float:
        """What the next phases need at the least (the stock phase's build): kept in hand."""
        return (self.build_s or 0) + 10

    def clip_fps(self, k: int) -> dict:
        plan, tracker = self.plan, self.tracker
        info, chunks = clip(plan, plan.frames)
        hotstart, window = tracker.hotstart_delay, int(tracker.model.tracker.max_obj_ptrs_in_encoder)
        times, cut = timed(tracker.track_forced(chunks, info, k), self.budget, least=window + hotstart)
        overall, steady = rates(times, hotstart, window, cut)
        self.per_frame[k] = 1 / (steady or overall)
        read, most = tracker.memory_read()
        reach = max((r for _, r in tracker.instruments.memory_frames.values()), default=0)
        width, height = plan.size
        detail = (f"{len(times) - 1} frames{' (cut: out of time)' if cut else ''}, {tracker.last_job['tracked']} "
                  f"tracked, whole clip {overall:.2f} fps, {tracker.last_job['recompiles']} recompiles")
        target = k == plan.fps_objects[-1]  # the target is 5 objects' (a CPU: its last count's)
        self.row(f"tracker fps {width}x{height}, {k} objects", f"{steady or overall:.2f}", ">= 25" if target else "",
                 (steady or overall) >= 25 if target else None,
                 detail=("steady, memory full; " if steady else "whole clip; ") + detail)
        say(f"memory frames attended: {read} of {most} ({k} objects; memory selection reached {reach} frames back)")
        return {"fps": steady or overall, "whole_clip_fps": overall, "frames": len(times) - 1, "cut": cut,
                "memory_frames": [read, most], "tracked": tracker.last_job["tracked"],
                "recompiles": tracker.last_job["recompiles"]}

    def end_to_end(self, gpu_fps: float, k: int) -> None:
        """The stages overlap, so the slowest one sets the pace: min(tracker, CPU stages)."""
        width, height = self.plan.size
        path = self.args.cpu_stages
        if not (path and Path(path).is_file()):
            return
        stages = json.loads(Path(path).read_text())
        for mode, cpu_fps in stages["fps"].items():
            e2e = min(gpu_fps, cpu_fps)
            self.row(f"end to end {width}x{height}, {k} objects, {mode}", f"{e2e:.1f} fps", ">= 25", e2e >= 25,
                     detail=f"min(tracker {gpu_fps:.1f}, CPU stages {cpu_fps:.1f} on {stages['machine']})")

    # -- attention -----------------------------------------------------------------------------
    def probe_frames(self) -> int:
        tracker = self.tracker
        return int(tracker.model.tracker.max_obj_ptrs_in_encoder) + tracker.hotstart_delay + 2

    def predict_attention(self) -> float:
        return self.probe_frames() * self.per_frame[self.plan.memory_objects] * 1.5 + 10

    def attention(self, record: dict) -> None:
        from testkit.sam3 import memory_attention_kernels

        info, chunks = clip(self.plan, self.probe_frames())
        found = memory_attention_kernels(self.tracker, chunks, info, self.plan.memory_objects)
        record.update({k: v for k, v in found.items() if k != "detail"})
        self.row("memory attention: SDPA's kernel", found["backend"], "fused", found["fused"], detail=found["detail"])

    # -- stock sam3 ----------------------------------------------------------------------------
    def predict_stock(self) -> float:
        return (self.build_s or 30) + 5 + self.plan.frames * STOCK_SLOWER * self.per_frame[self.plan.stock_objects]

    def stock(self, record: dict) -> None:
        import torch
        from PIL import Image

        from serve_app.trackers.sam3 import compat

        plan, k = self.plan, self.plan.stock_objects
        self.predictor = stock_predictor(plan, self.tracker.model)
        model = self.predictor.model
        _, chunks = clip(plan, plan.frames)
        images = [Image.fromarray(f) for c in chunks for f in c.frames]  # the same frames as ours
        # sam3's loader puts every frame on the device before its clock starts, as ours are in
        # memory before theirs, outside the context
        with compat.on_device(model.device):
            session = self.predictor.handle_request({"type": "start_session", "resource_path": images})["session_id"]
        if not plan.gpu:  # its loader's float16 frames: a CPU model runs in float32 (compat)
            batch = self.predictor._ALL_INFERENCE_STATES[session]["state"]["input_batch"]
            batch.img_batch = batch.img_batch.float()
        hotstart, window = int(model.hotstart_delay), int(model.tracker.max_obj_ptrs_in_encoder)
        # on a GPU sam3 runs as it is (its build entered the bf16 autocast on this thread); a CPU
        # needs the compatibility layer's context
        context = contextlib.nullcontext() if plan.gpu else compat.model_context(model.device)

        def frames():
            self.predictor.handle_request({"type": "add_prompt", "session_id": session, "frame_index": 0,
                                           "text": PROMPT})
            yield
            yield from self.predictor.handle_stream_request({"type": "propagate_in_video", "session_id": session})

        for name, value in forced(k).items():
            setattr(model, name, value)
        with context, torch.inference_mode():
            try:
                times, cut = timed(frames(), self.budget, least=window + hotstart + 1)
            finally:
                self.predictor.handle_request({"type": "close_session", "session_id": session})
        times = times[:1] + times[2:]  # the prompt's own mark out: the clock starts before it, as ours
        overall, steady = rates(times, hotstart, window, cut)
        stock_fps = steady or overall
        self.stock_per_frame = 1 / stock_fps
        ours = 1 / self.per_frame[k]
        width, height = plan.size
        record.update(fps=stock_fps, whole_clip_fps=overall, frames=len(times) - 1, cut=cut, ours=ours)
        self.row(f"stock sam3 eager fps {width}x{height}, {k} objects", f"{stock_fps:.2f}",
                 detail=f"{'steady' if steady else 'whole clip'}; {len(times) - 1} frames; frames on the device "
                        f"before the clock, as sam3 loads them")
        self.row("tracker / stock sam3", f"{ours / stock_fps:.2f}x", ">= 1.5x", ours / stock_fps >= 1.5)

    # -- memory against length -----------------------------------------------------------------
    def predict_memory(self) -> float:
        frames = self.plan.memory_frames[1] + (self.tracker.hotstart_delay if self.tracker else 0)
        return frames * self.per_frame[self.plan.memory_objects] * 1.3 + 5

    def memory(self, record: dict) -> None:
        import torch

        plan, tracker, k = self.plan, self.tracker, self.plan.memory_objects
        lo, hi = plan.memory_frames
        # frames past hi so that hi comes out in step, not in the flush at the end (which
        # happens once the last frame is tracked and its features are gone)
        info, chunks = clip(plan, hi + tracker.hotstart_delay, preload=False)
        _free()
        weights = torch.cuda.memory_allocated() if plan.gpu else 0  # the model, its CUDA graph pools
        tracker.instruments.measure_frames = {lo - 1, hi - 1}
        try:
            times, cut = timed(tracker.track_forced(chunks, info, k), self.budget, least=hi)
        finally:
            tracker.instruments.measure_frames = ()
        at = {r.frame + 1: r for r in tracker.frame_log}
        if cut or hi not in at:
            raise RuntimeError(f"cut after {len(times)} frames of {hi}")
        if plan.gpu:  # the job's own memory: what is allocated above the model's
            a, b = (at[lo].cuda_allocated - weights) / 2**20, (at[hi].cuda_allocated - weights) / 2**20
            what = "GPU memory above the model"
        else:
            a, b = at[lo].held_bytes / 2**20, at[hi].held_bytes / 2**20
            what = "what the session holds (CPU)"
        record.update(lo=lo, hi=hi, mib=[round(a, 1), round(b, 1)], held_mib=[round(at[lo].held_bytes / 2**20, 1),
                      round(at[hi].held_bytes / 2**20, 1)], recompiles=tracker.last_job["recompiles"])
        width, height = plan.size
        self.row(f"{what} after {lo} / {hi} frames ({width}x{height}, {k} objects)", f"{a:.1f} / {b:.1f} MiB",
                 detail=f"the session holds {at[lo].held_bytes / 2**20:.1f} / {at[hi].held_bytes / 2**20:.1f} MiB")
        self.row(f"memory ratio {hi} / {lo} frames", f"{b / a:.3f}", "<= 1.05", b / a <= 1.05)

    # -- trimmed vs untrimmed ------------------------------------------------------------------
    def predict_trim(self) -> float:
        per_frame = self.stock_per_frame or STOCK_SLOWER * self.per_frame[self.plan.stock_objects]
        build = 0 if self.predictor else (self.build_s or 30)
        return build + 2 * self.plan.trim_frames * per_frame + 5

    def trim(self, record: dict) -> None:
        from testkit.sam3 import count_memory, occlude_memory

        if self.predictor is None:
            self.predictor = stock_predictor(self.plan, self.tracker.model)
        model = self.predictor.model
        reach: dict = {}
        count_memory(model, reach)
        occlude_memory(model, set(self.plan.occluded))
        equal, detail = trimmed_vs_untrimmed(self.plan, model)
        farthest = max((r for _, r in reach.values()), default=0)
        window = int(model.tracker.max_obj_ptrs_in_encoder)
        record.update(equal=equal, reached_back=farthest, window=window)
        self.row(f"trimmed vs untrimmed, {self.plan.trim_frames} frames, eager", "bitwise equal" if equal
                 else "DIFFERENT", "equal", equal, detail=f"{detail}; memory selection reached {farthest} frames "
                 f"back (window {window}; frames {self.plan.occluded.start}-{self.plan.occluded.stop - 1} "
                 f"scored 0 for it)")
        if farthest <= window:
            raise RuntimeError(f"memory selection reached only {farthest} frames back, not past the window ({window})")

    # -- warm start ----------------------------------------------------------------------------
    def predict_warm(self) -> float:
        return 10 + (self.build_s or 0) + 0.6 * (self.ready_s - (self.build_s or 0))

    def release(self) -> None:
        """Give the models back before a second process builds its own."""
        if self.tracker is not None:
            self.results["recompiles_after_warm_up"] = self.tracker.compiled.total_recompiles
            self.results["recompiles_by_part"] = dict(self.tracker.compiled.recompiles)
            self.tracker.close()
        self.tracker = self.predictor = None
        _free()

    def warm_start(self, record: dict) -> None:
        self.release()
        command = [sys.executable, __file__, "--warm-start-child", "--cache-dir", self.cache_dir]
        command += ["--cpu"] * (not self.plan.gpu) + ["--quick"] * bool(self.args.quick)
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.budget.children.append(child)
        try:
            out, _ = child.communicate(timeout=max(self.budget.left() - 1, 1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise RuntimeError(f"the warm start was still running after {time.perf_counter() - started:.0f} s")
        lines = [line for line in out.splitlines() if line.startswith("WARM-START ")]
        if child.returncode or not lines:
            raise RuntimeError(f"the warm start exited {child.returncode}: {out[-500:]}")
        warm = json.loads(lines[-1].removeprefix("WARM-START "))
        record.update(warm, process_s=round(time.perf_counter() - started, 1), cold_ready_s=round(self.ready_s, 1))
        say(f"cold start: {self.ready_s:.1f} s, warm start: {warm['ready_s']:.1f} s "
            f"(build {self.build_s:.1f} / {warm['build_s']:.1f} s; inductor's graph cache {warm['cache']}; "
            f"the new process took {record['process_s']:.0f} s with its imports)")
        self.row("ready, warm (a new process, the compile cache of the first)", f"{warm['ready_s']:.0f} s", "<= 60 s",
                 warm["ready_s"] <= 60, detail=f"cold {self.ready_s:.0f} s: {warm['ready_s'] / self.ready_s:.2f} of it")


def forced(k: int) -> dict:
    from serve_app.trackers.sam3.tracker import forced_objects

    return forced_objects(k)


def timed(frames, budget: Budget, least: int, reserve_s: float = 3.0) -> tuple[list[float], bool]:
    """The clock before the first step and at every frame out; stops early (cut) once `least`
    frames are out and the budget is nearly spent."""
    synchronize()
    times = [time.perf_counter()]
    cut = False
    for _ in frames:
        times.append(time.perf_counter())
        if len(times) > least and budget.left() < reserve_s:
            cut = True
            frames.close()
            break
    synchronize()
    return times, cut


def rates(times: list[float], hotstart: int, window: int, cut: bool) -> tuple[float, float | None]:
    """(whole-clip fps, steady fps with the memory full or None). Output i comes out once frame
    i + hotstart - 1 has been tracked, and the last hotstart - 1 outputs all at the end, so
    between outputs a and b exactly b - a frames were tracked; from output `window` on, every
    one of them read a full memory."""
    n = len(times) - 1
    overall = n / (times[-1] - times[0])
    a, b = window, n - (0 if cut else hotstart)  # times[i + 1] is output i's
    if b - a < 2:
        return overall, None
    return overall, (b - a) / (times[b + 1] - times[a + 1])


def stock_predictor(plan: Plan, ours):
    """sam3's own video predictor around a model sam3 builds (eager), holding our model's weights:
    Sam3VideoPredictor's constructor builds from a checkpoint file and calls .cuda(); the same
    object is made around build_sam3_video_model, which loads nothing (no 3.2 GiB file)."""
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor
    from sam3.model_builder import build_sam3_video_model

    from serve_app.trackers.sam3 import compat
    from serve_app.trackers.sam3.loading import bpe_path
    from serve_app.trackers.sam3.tracker import apply_overrides
    from testkit.sam3 import memoize_detector, shrink

    compat.install()
    with compat.on_device(plan.device):
        model = build_sam3_video_model(checkpoint_path=None, load_from_HF=False, bpe_path=bpe_path(),
                                       device=plan.device).eval()
    shrink(model, **plan.shrink)
    model.load_state_dict(ours.state_dict())  # ours's compiled parts wrap forwards, not weights
    apply_overrides(model, plan.overrides)
    if not plan.gpu:
        memoize_detector(model, type("Memo", (), {"detector_passes": 0})())
    predictor = Sam3VideoPredictor.__new__(Sam3VideoPredictor)
    predictor.model, predictor.async_loading_frames, predictor.video_loader_type = model, False, "cv2"
    if not plan.gpu:  # its logging reads torch.cuda
        predictor._get_session_stats = predictor._get_torch_and_gpu_properties = lambda: "(cpu)"
    return predictor


def trimmed_vs_untrimmed(plan: Plan, model) -> tuple[bool, str]:
    """The same clip through serve_app's Session with and without trimming, on the eager model:
    every frame's outputs and the tracker's mask logits (before thresholding) compared bitwise."""
    import torch

    from serve_app.trackers.sam3.frames import LazyFrames
    from serve_app.trackers.sam3.session import Session

    width, height = plan.trim_size
    n = plan.trim_frames
    runs = []
    for trim in (True, False):
        _, chunks = clip(plan, n, plan.trim_size, preload=False)
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
                for _ in session.steps(PROMPT, lambda i, out: outputs.append(out), forced(plan.stock_objects)):
                    pass
            finally:
                session.close()
        finally:
            del model.run_tracker_propagation
        runs.append((outputs, logits))
    (out_a, log_a), (out_b, log_b) = runs
    for f, ((m1, s1), (m2, s2)) in enumerate(zip(log_a, log_b, strict=True)):
        if not (torch.equal(m1, m2) and torch.equal(s1, s2)):
            return False, f"tracker logits differ at step {f} (largest {float((m1 - m2).abs().max()):.3g})"
    for f, (a, b) in enumerate(zip(out_a, out_b, strict=True)):
        for key in ("out_obj_ids", "out_probs", "out_boxes_xywh", "out_binary_masks"):
            if not np.array_equal(a[key], b[key]):
                return False, f"{key} differs at frame {f}"
    tracked = max(int(o["frame_stats"]["num_obj_tracked"]) for o in out_a)
    return True, f"{len(log_a)} tracker steps and {len(out_a)} frames, {tracked} objects"


def warm_start_child(args) -> int:
    """The warm start: a new process builds and warms the same tracker from the compile cache
    the first one filled; prints one WARM-START line of JSON."""
    from serve_app.trackers.sam3.compile import cache_counts

    plan = Plan(args)
    tracker, build_s, ready_s = build_tracker(plan, args.cache_dir)
    try:
        out = {"ready_s": round(ready_s, 1), "build_s": round(build_s, 1), "cache": cache_counts(),
               "recompiles": tracker.compiled.total_recompiles, "compile_failures": tracker.compiled.failed}
    finally:
        tracker.close()
    print("WARM-START " + json.dumps(out), flush=True)
    return 0


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
          f"random weights, budget {results['budget_s']:.0f} s, {results.get('elapsed_s', 0):.0f} s used ==")
    phases = results.get("phases", {})
    print("phases: " + "; ".join(f"{name} " + (f"{p['seconds']:.0f} s" if "seconds" in p else "skipped")
                                 + (" (cut)" if p.get("cut") else " (failed)" if p.get("failed") else "")
                                 for name, p in phases.items()))
    if results.get("rows"):
        print(table(results["rows"], ["what", "value", "target", "ok", "detail"]))
    print(f"imported on this path: {', '.join(results.get('imported', [])) or 'none of ray, av, decord, open_clip'}")
    print(f"recompiles after warm-up: {results.get('recompiles_after_warm_up', 'not measured')}")


def run_check(args) -> dict:
    import torch

    plan = Plan(args)
    if plan.gpu and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (torch sees none); on a CPU: --cpu --quick")
    where = torch.cuda.get_device_name() if plan.gpu else f"CPU ({os.cpu_count()} cores)"
    results: dict = {"device": where, "torch": torch.__version__, "python": platform.python_version(),
                     "sam3": _version("sam3"), "random_weights": True, "rows": []}
    # 5 s to end the process: freeing a 4 GB model's memory, or a CUDA context, takes seconds
    budget = Budget(args.budget_s, PHASES, results, args.json, say=say, start=STARTED, exit_margin_s=5)
    say(f"device: {where}; torch {torch.__version__}; Python {platform.python_version()}; sam3 {results['sam3']}; "
        f"budget {args.budget_s:.0f} s")
    check = Check(args, plan, budget)

    def last_words() -> None:
        if check.own_cache:
            shutil.rmtree(check.cache_dir, ignore_errors=True)
        print_table(_imported(results))

    budget.on_out_of_time = last_words
    budget.start_watchdog()
    try:
        budget.run("ready", check.ready)
        budget.run("fps", check.fps, needs=["ready"])
        if check.per_frame:
            budget.run("attention", check.attention, check.predict_attention(), needs=["ready"])
            budget.run("stock", check.stock, check.predict_stock(), needs=["fps"])
            budget.run("memory", check.memory, check.predict_memory(), needs=["fps"])
            budget.run("trim", check.trim, check.predict_trim(), needs=["fps"])
        for name in ("attention", "stock", "memory", "trim"):
            if name not in results["phases"]:
                budget.skip(name, "no fps was measured to predict it by")
        if check.ready_s is not None:
            results["recompiles_after_warm_up"] = check.tracker.compiled.total_recompiles
            budget.run("warm-start", check.warm_start, check.predict_warm(), needs=["ready"])
        else:
            budget.skip("warm-start", "no cold start to compare it with")
    finally:
        budget.stop_watchdog()
        check.release()
        if check.own_cache:
            shutil.rmtree(check.cache_dir, ignore_errors=True)
        _imported(results)
        budget.save()
    return results


def _imported(results: dict) -> dict:
    results["imported"] = sorted(m for m in ("ray", "av", "decord", "open_clip") if m in sys.modules)
    return results


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
    say(f"device command (carry: .whl; timeout_s {LOAN_COMMAND_S}):\n" + device_command())
    return 0 if total <= LIMIT_MIB else 1


def device_command(budget_s: int = DEVICE_BUDGET_S, python: str = "python3", install: bool = True,
                   extra: str = "") -> str:
    """The command for the loan. `timeout` ends gpu_check 20 s after its budget if its own
    watchdog has not, so the JSON and the log still come back inside the command's limit;
    inductor's autotune tables stay out of the log. (`python`, `install` and `extra` let the
    same command be rehearsed here: `--rehearse`.)"""
    setup = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
             "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && " if install else "")
    env = f"export SAM3_BPE_PATH=.whl/{BPE_NAME} PYTHONUNBUFFERED=1 TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=0 && "
    out = "${OUT:-/tmp}"
    return (f"set -o pipefail; {setup}{env}timeout -k 5 {budget_s + 20} {python} benchmarks/gpu_check.py "
            f"--budget-s {budget_s} --cpu-stages .whl/{CPU_STAGES} --json {out}/gpu_check.json{extra} 2>&1 "
            f"| tee {out}/gpu_check.log")


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
    ap.add_argument("--quick", action="store_true", help="shorter clips")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"end inside this many seconds (default {DEVICE_BUDGET_S}; with --cpu {CPU_BUDGET_S})")
    ap.add_argument("--frames", type=int, default=None, help="frames per fps clip (GPU default 90)")
    ap.add_argument("--cache-dir", default=None, help="inductor's cache (default: a new, empty folder)")
    ap.add_argument("--cpu-stages", default=None, help="CPU-stage throughput JSON from --prepare")
    ap.add_argument("--json", default=None, help="write the results here, again after every phase")
    ap.add_argument("--rehearse", action="store_true",
                    help="print the device command as it runs here: this venv, no install, --cpu --quick")
    ap.add_argument("--warm-start-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        return prepare(args)
    if args.rehearse:
        budget = int(args.budget_s or DEVICE_BUDGET_S)
        print(device_command(budget, sys.executable, install=False, extra=" --cpu --quick"))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("serve_app.trackers.sam3").setLevel(logging.INFO)
    if args.budget_s is None:
        args.budget_s = CPU_BUDGET_S if args.cpu else DEVICE_BUDGET_S
    if args.warm_start_child:
        return warm_start_child(args)
    print_table(run_check(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
