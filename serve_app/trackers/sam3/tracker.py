"""Sam3Tracker: the real SAM 3 video model as the pipeline's tracker stage."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from serve_app.contract import JobConfig
from serve_app.errors import ModelError, ModelUnavailable, ServiceError
from serve_app.trackers.sam3.loading import build_model, pick_device, resolve_weights
from serve_app.trackers.sam3.worker import DONE, Job, ModelWorker, stream
from serve_app.types import Detections, FrameChunk, VideoInfo

log = logging.getLogger(__name__)

DEFAULT_WARM_SIZES: tuple[tuple[int, int], ...] = ((832, 480), (1280, 720))


@dataclass(frozen=True)
class FrameRecord:
    """What `measure=True` records after each emitted frame."""

    frame: int
    held_bytes: int          # tensor/array bytes the session holds (trim.held_bytes)
    objects_tracked: int     # SAM 3's frame_stats["num_obj_tracked"] (before hiding any)
    cuda_allocated: int      # torch.cuda.memory_allocated() on a GPU, else 0


class Sam3Tracker:
    """SAM 3 (PyPI sam3 0.1.4) turning decoded frames and a text prompt into detections.

    Options (the app's `checkpoint`, `device`, `compile`, `warm_sizes` arguments, then
    `tracker_options`):
    - checkpoint: a local sam3.pt; else $SAM3_CHECKPOINT; else the hub with $HF_TOKEN.
    - device: "cuda" or "cpu"; default CUDA when present.
    - compile: torch.compile the detector and tracker (sam3's own `compile_model`); default on
      with CUDA. Needs CUDA.
    - warm_sizes: extra WxH sizes to warm up at start, after 832x480 and 1280x720.
    - warm_up: run the warm-up at start; default: when compiling (warm-up fills the compile
      cache; without compile it only costs start-up time).
    - warm_frames: frames per warm-up clip; default hotstart_delay + 2, so outputs come out.
    - model_overrides: {"attribute.path": value} set on the built model, e.g.
      {"new_det_thresh": 0.8} or {"tracker.max_obj_ptrs_in_encoder": 8}; unknown paths are an
      error. For experiments and tests; the defaults are SAM 3's.
    - random_weights: build the architecture without weights (tests; outputs are meaningless).
    - trim_memory: keep each session's memory to the tracker's window (default; see trim.py).
    - max_pending: jobs that may wait for the model thread before new ones are refused.
    - measure: record, after every emitted frame of a job, the bytes its session holds, the
      objects SAM 3 tracks and the GPU memory allocated (`frame_log`; benchmarks and tests).

    Output: one Detections per frame, in order, lagging the input by SAM 3's hotstart delay
    (15 frames). `scores` are SAM 3's `out_probs`: the detector's score for the object on the
    frame it was first found, fixed for the object's life; the pipeline drops objects scoring
    below the job's confidence_threshold.
    """

    def __init__(self, checkpoint: str | None = None, device: str | None = None, compile: bool | None = None,
                 warm_sizes: Sequence[Sequence[int]] = (), *, warm_up: bool | None = None,
                 warm_frames: int | None = None, model_overrides: Mapping[str, Any] | None = None,
                 random_weights: bool = False, trim_memory: bool = True, max_pending: int = 4,
                 measure: bool = False) -> None:
        weights = resolve_weights(checkpoint, random_weights)  # fails before any thread starts
        self.device = pick_device(device)
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        if self.compile and self.device.type != "cuda":
            raise ModelUnavailable("compile=True needs CUDA (sam3 compiles with CUDA graphs); use compile=False on CPU")
        self.warm_sizes = _sizes([*DEFAULT_WARM_SIZES, *warm_sizes])
        self.trim_memory = trim_memory
        self.measure = measure
        self.frame_log: list[FrameRecord] = []  # the last job's, when `measure`
        self.warm_up_seconds: dict[tuple[int, int], float] = {}
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        overrides = dict(model_overrides or {})

        def build():
            model = build_model(weights, self.device, self.compile)
            _apply_overrides(model, overrides)
            return model

        self._worker = ModelWorker(build, max_pending=max_pending)
        self.hotstart_delay = int(self._worker.model.hotstart_delay)
        self.warm_frames = warm_frames or self.hotstart_delay + 2
        if self.compile:
            import torch

            torch._logging.set_logs(recompiles=True)  # every recompile is logged with its reason
        if self.compile if warm_up is None else warm_up:
            self.warm_up_seconds = self.warm_up()

    # -- the Tracker protocol --------------------------------------------------------------
    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        """Yield one Detections per frame. Closing the generator cancels the job at the next
        frame boundary and returns once the session's memory is freed."""
        width, height = info.display_size
        if info.num_frames <= 0:
            return
        yield from stream(
            self._worker, lambda model, job: self._run(model, job, info.num_frames, height, width, config.prompt), chunks
        )

    # -- on the model thread ----------------------------------------------------------------
    def _run(self, model, job: Job, num_frames: int, height: int, width: int, prompt: str) -> None:
        from serve_app.trackers.sam3.convert import to_detections
        from serve_app.trackers.sam3.frames import FrameSource
        from serve_app.trackers.sam3.session import Session
        from serve_app.trackers.sam3.trim import held_bytes

        graphs_before = _compiled_graphs()
        frames = FrameSource(num_frames, job.pull, model.device, expected_size=(height, width))
        session = Session(model, frames, num_frames, height, width, trim=self.trim_memory)
        self._sessions.add(session)
        self.frame_log = []
        tracked = [0]

        def emit(index: int, outputs: dict) -> None:
            tracked[0] = int((outputs.get("frame_stats") or {}).get("num_obj_tracked", 0))
            job.emit(to_detections(index, outputs, height, width))

        def between_frames() -> None:  # after the frame was emitted and the session trimmed
            if self.measure:
                self.frame_log.append(FrameRecord(session.emitted, held_bytes(session.state), tracked[0],
                                                  _cuda_allocated(model.device)))
            job.checkpoint()

        try:
            session.run(prompt, emit, between_frames)
            if session.emitted != num_frames - 1:
                raise ModelError(f"SAM 3 emitted {session.emitted + 1} frames of {num_frames}")
            job.emit(DONE)
        except ServiceError:
            raise
        except Exception:
            if not job.cancelled.is_set():
                log.exception("SAM 3 failed on a %d-frame %dx%d video", num_frames, width, height)
            raise
        finally:
            session.close()
            new_graphs = _compiled_graphs() - graphs_before
            if new_graphs:
                log.info("torch.compile built %d new graph(s) during this job (new shapes)", new_graphs)

    def sessions_alive(self) -> int:
        """SAM 3 sessions still reachable anywhere in the process (0 between jobs)."""
        import gc

        gc.collect()
        return len(self._sessions)

    # -- lifecycle --------------------------------------------------------------------------
    def warm_up(self, sizes: Sequence[tuple[int, int]] | None = None) -> dict[tuple[int, int], float]:
        """Run a synthetic clip through the full path at each size; returns seconds per size."""
        import numpy as np

        from serve_app import synthetic

        seconds = {}
        for width, height in sizes or self.warm_sizes:
            n = self.warm_frames
            clip = np.stack(list(synthetic.frames(n, width, height)))
            info = VideoInfo(width=width, height=height, num_frames=n, pts=tuple(range(n)),
                             time_base=Fraction(1, 25), avg_fps=Fraction(25))
            start = time.perf_counter()
            for _ in self.track([FrameChunk(0, clip)], info, JobConfig(prompt="coloured shapes")):
                pass
            seconds[(width, height)] = time.perf_counter() - start
            log.info("SAM 3 warm-up %dx%d, %d frames: %.1f s (compile=%s)", width, height, n,
                     seconds[(width, height)], self.compile)
        if self.compile:
            encoder = getattr(self._worker.model.tracker.transformer.encoder, "forward", None)
            if hasattr(encoder, "set_logging"):
                encoder.set_logging(True)  # sam3's own log of new tracker-encoder shapes
        return seconds

    def check_health(self) -> None:
        """Raise if the model thread has died (the replica must be replaced)."""
        self._worker.check()

    def call(self, fn, timeout: float | None = None):
        """Run `fn(model)` on the model thread (benchmarks and tests read model state so)."""
        return self._worker.call(fn, timeout)

    def close(self) -> None:
        self._worker.stop()


def _sizes(sizes: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for size in sizes:
        if len(size) != 2 or not all(isinstance(v, int) and 0 < v <= 8192 for v in size):
            raise ValueError(f"warm size is {size!r}; it must be [width, height] in pixels")
        if tuple(size) not in out:
            out.append((int(size[0]), int(size[1])))
    return tuple(out)


def _apply_overrides(model: Any, overrides: Mapping[str, Any]) -> None:
    for path, value in overrides.items():
        *parents, name = path.split(".")
        target = model
        for part in parents:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, name):
            raise ValueError(f"model_overrides names {path!r}, which the SAM 3 model does not have")
        setattr(target, name, value)
        log.info("SAM 3 override: %s = %r", path, value)


def _cuda_allocated(device) -> int:
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated(device))


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # torch internals moved: counting is a nicety, not a requirement
        return 0

