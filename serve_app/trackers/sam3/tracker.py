"""Sam3Tracker: the real SAM 3 video model as the pipeline's tracker stage."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

from serve_app.contract import JobConfig
from serve_app.errors import ModelError, ModelUnavailable, ServiceError
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.loading import WeightsSource, build_model, pick_device, resolve_weights, use_device
from serve_app.trackers.worker import DONE, Feed, ModelWorker, stream

log = logging.getLogger(__name__)

WARM_PROMPT = "coloured shapes"
# Warm-up clips read every memory frame the window holds, as a trained model on a clear scene
# does: memory selection (frame_filter, sam3_tracker_base.py:518-558) keeps a frame whose score
# passes mf_threshold, and an untrained or unsure model would keep only the previous one. So
# the memory attention meets every memory length a job can give it before the replica is ready.
FULL_MEMORY = {"tracker.mf_threshold": float("-inf")}


def forced_objects(count: int) -> dict[str, Any]:
    """Session settings under which SAM 3 tracks exactly `count` objects from frame 0 whatever
    the weights: every proposal passes (no NMS), the `count` best are kept, none is removed."""
    return {"score_threshold_detection": 0.0, "new_det_thresh": 0.0, "det_nms_thresh": 0.0,
            "max_num_objects": count, "hotstart_unmatch_thresh": 1 << 30, "hotstart_dup_thresh": 1 << 30}


class Sam3Hooks:
    """What tests and benchmarks attach to a Sam3Tracker (testkit/sam3.py): options for
    compile.Compiled (a CPU backend), and calls on the model thread once the model is built
    and after each emitted frame (the session trimmed). The defaults do nothing."""

    compile_options: Mapping[str, Any] = {}

    def on_build(self, model) -> None: ...

    def after_frame(self, session, outputs: dict) -> None: ...


class Sam3Tracker:
    """SAM 3 (PyPI sam3 0.1.4) turning decoded frames and a text prompt into detections,
    configured by a Sam3Config (trackers/sam3/config.py); `weights` overrides where the
    weights come from and `hooks` instrument it (tests and benchmarks: testkit/sam3.py).

    Output: one Detections per frame, in order, lagging the input by SAM 3's hotstart delay
    (15 frames). `scores` are SAM 3's `out_probs`: the detector's score for the object on the
    frame it was first found, fixed for the object's life. A job's confidence_threshold and
    max_objects are SAM 3's own detection settings for its session (session.detection_settings).
    """

    def __init__(self, config: Sam3Config = Sam3Config(), weights: WeightsSource | None = None,
                 hooks: Sam3Hooks = Sam3Hooks()) -> None:
        weights = weights or resolve_weights(config.checkpoint)  # fails before any thread starts
        self.config = config
        self.hooks = hooks
        self.device = pick_device(config.device)
        self.compile = self.device.type == "cuda" if config.compile is None else config.compile
        if self.compile and self.device.type != "cuda" and "backend" not in hooks.compile_options:
            raise ModelUnavailable("compile=True needs CUDA (sam3 compiles with CUDA graphs); use compile=False on CPU")
        if self.compile and config.compile_cache_dir:
            from serve_app.trackers.sam3.compile import use_cache_dir

            log.info("SAM 3 compile cache: %s", use_cache_dir(config.compile_cache_dir))
        self.warm_sizes = config.all_warm_sizes
        self.warm_up_seconds: dict[str, float] = {}
        self.compiled = None  # trackers.sam3.compile.Compiled when compiling
        self.last_job: dict[str, int] = {}
        overrides = dict(config.model_overrides)

        def build():
            use_device(self.device)  # on the model thread, which makes every call
            model = build_model(weights, self.device, self.compile)
            apply_overrides(model, overrides)
            if self.compile:
                from serve_app.trackers.sam3.compile import Compiled

                self.compiled = Compiled(config.max_objects, **{"autotune": config.compile_autotune,
                                                                **hooks.compile_options})
                self.compiled.install(model)
            hooks.on_build(model)
            return model

        self._worker = ModelWorker(build, max_pending=config.max_pending, name="sam3-model", label="SAM 3",
                                   max_sessions=config.sessions)
        self.hotstart_delay = int(self._worker.model.hotstart_delay)
        self.warm_frames = config.warm_frames or self.hotstart_delay + 2
        if self.compile if config.warm_up is None else config.warm_up:
            self.warm_up_seconds = self.warm_up()

    # -- the Tracker protocol --------------------------------------------------------------
    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        """Yield one Detections per frame, in the order they are tracked: forward from the
        job's prompt frame, then backward from the frame before it. Closing the generator
        cancels the job at the next frame boundary and returns once the session's memory is freed."""
        from serve_app.trackers.sam3.session import state_prompts

        width, height = info.display_size
        scale = (width, height, width, height)  # boxes are in the pixels a player shows
        boxes = [(tuple(min(max(v / s, 0.0), 1.0) for v, s in zip(b.box, scale)), b.label) for b in config.boxes]
        prompts = state_prompts(config.concepts, boxes)
        yield from self._track(chunks, info, prompts, self.job_settings(config), config.prompt_frame)

    def job_settings(self, config: JobConfig) -> dict[str, Any]:
        """SAM 3's settings for this job's session; max_objects is held to this replica's."""
        from serve_app.trackers.sam3.session import detection_settings

        most = min(config.max_objects, self.config.max_objects)
        if most < config.max_objects:
            log.info("job asks for up to %d objects; this replica tracks at most %d", config.max_objects, most)
        return detection_settings(config.confidence_threshold, most)

    def _track(self, chunks: Iterable[FrameChunk], info: VideoInfo, prompts: str | Sequence[Any],
               settings: Mapping[str, Any], prompt_frame: int = 0) -> Iterator[Detections]:
        """`prompts`: a text, or session.StatePrompt per SAM 3 inference state."""
        width, height = info.display_size
        if info.num_frames <= 0:
            return
        yield from stream(
            self._worker,
            lambda model, job: self._run(model, job, info.num_frames, height, width, prompts, settings, prompt_frame),
            chunks,
        )

    # -- on the model thread ----------------------------------------------------------------
    def _run(self, model, job: Feed, num_frames: int, height: int, width: int, prompts: str | Sequence[Any],
             settings: Mapping[str, Any], prompt_frame: int = 0) -> Iterator[None]:
        """One job's session, a step per emitted frame: the worker interleaves it with the
        replica's other sessions (worker.ModelWorker)."""
        from serve_app.trackers.sam3.convert import to_detections
        from serve_app.trackers.sam3.frames import LazyFrames
        from serve_app.trackers.sam3.session import Session

        several = not isinstance(prompts, str) and len(prompts) > 1
        frames = LazyFrames(num_frames, job.pull, model.device, expected_size=(height, width),
                            prompt_frame=prompt_frame, keep_behind=self.hotstart_delay + 2 if several else 0)
        job.holding = frames.holding
        session = None
        last: list[dict] = [{}]
        stats = {"tracked": 0, "dropped": 0, "recompiles": 0}

        def emit(index: int, outputs: dict) -> None:
            last[0] = outputs
            frame_stats = outputs.get("frame_stats") or {}
            stats["tracked"] = max(stats["tracked"], int(frame_stats.get("num_obj_tracked", 0)))
            stats["dropped"] += int(frame_stats.get("num_obj_dropped", 0))
            job.emit(to_detections(index, outputs, height, width))

        recompiles_before = self.compiled.total_recompiles if self.compiled else 0
        try:
            session = Session(model, frames, num_frames, height, width, trim=self.config.trim_memory,
                              prompt_frame=prompt_frame)
            around = self.compiled.serving if self.compiled else contextlib.nullcontext
            for _ in session.steps(prompts, emit, settings, around):
                self.hooks.after_frame(session, last[0])  # the frame was emitted and the session trimmed
                job.checkpoint()
                yield
            if session.count != num_frames:
                raise ModelError(f"SAM 3 emitted {session.count} frames of {num_frames}")
            job.emit(DONE)
        except ServiceError:
            raise
        except Exception:
            if not job.cancelled.is_set():
                log.exception("SAM 3 failed on a %d-frame %dx%d video", num_frames, width, height)
            raise
        finally:
            if session is not None:
                session.close()
            else:
                frames.close()
            stats["recompiles"] = (self.compiled.total_recompiles if self.compiled else 0) - recompiles_before
            self.last_job = stats
            if stats["dropped"]:
                log.info("SAM 3 tracked at most %d objects (max_objects); %d detections were turned away",
                         stats["tracked"], stats["dropped"])

    # -- lifecycle --------------------------------------------------------------------------
    def warm_up(self, sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, float]:
        """Run synthetic clips through the full path before the replica takes requests; returns
        seconds per clip. A default job at each warm size, then, when compiling, a clip with
        each object-batch bucket forced (compile.buckets), after which nothing may compile."""
        seconds = {}
        job = {**self.job_settings(JobConfig(prompt=WARM_PROMPT)), **FULL_MEMORY}
        for width, height in sizes or self.warm_sizes:
            label = f"{width}x{height}"
            seconds[label] = self._warm_clip(label, width, height, self.warm_frames, job)
        if self.compiled is not None and not self.compiled.locked:
            width, height = (sizes or self.warm_sizes)[0]
            for count in self.compiled.buckets:
                label = f"{count} objects"
                seconds[label] = self._warm_clip(label, width, height, self.warm_frames,
                                                 {**forced_objects(count), **FULL_MEMORY})
                if self.last_job.get("tracked") != count:
                    log.warning("SAM 3 warm-up asked for %d objects and tracked %d: that bucket may compile "
                                "at request time (it would run eager)", count, self.last_job.get("tracked"))
            self.compiled.lock()
            from serve_app.trackers.sam3.compile import cache_counts

            log.info("SAM 3 compiled and warmed (%d object buckets %s) in %.1f s; nothing compiles from now on "
                     "(inductor's graph cache: %s)", len(self.compiled.buckets), self.compiled.buckets,
                     sum(seconds.values()), cache_counts() or "not counted")
        return seconds

    def _warm_clip(self, label: str, width: int, height: int, n: int, settings: Mapping[str, Any]) -> float:
        import numpy as np

        from serve_app import synthetic

        # One still frame: compiled shapes do not depend on the pixels.
        clip = np.repeat(synthetic.render(0, 1, width, height)[None], n, axis=0)
        info = VideoInfo(width=width, height=height, num_frames=n, pts=tuple(range(n)),
                         time_base=Fraction(1, 25), avg_fps=Fraction(25))
        start = time.perf_counter()
        for _ in self._track([FrameChunk(0, clip)], info, WARM_PROMPT, settings):
            pass
        seconds = time.perf_counter() - start
        log.info("SAM 3 warm-up %s: %dx%d, %d frames, %d objects tracked, %.1f s (compile=%s)", label, width, height,
                 n, self.last_job.get("tracked", 0), seconds, self.compile)
        return seconds

    def check_health(self) -> None:
        """Raise if the model thread has died (the replica must be replaced)."""
        self._worker.check()

    def close(self) -> None:
        self._worker.stop()


def apply_overrides(model: Any, overrides: Mapping[str, Any]) -> None:
    for path, value in overrides.items():
        *parents, name = path.split(".")
        target = model
        for part in parents:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, name):
            raise ValueError(f"model_overrides names {path!r}, which the SAM 3 model does not have")
        setattr(target, name, value)
        log.info("SAM 3 override: %s = %r", path, value)
