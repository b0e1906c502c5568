"""Sam3Tracker: the real SAM 3 video model as the pipeline's tracker stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

from serve_app.contract import JobConfig
from serve_app.errors import ModelError, ModelUnavailable, ServiceError
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.loading import WeightsSource, build_model, pick_device, resolve_weights
from serve_app.trackers.sam3.worker import DONE, ModelWorker, Feed, stream

log = logging.getLogger(__name__)


class Sam3Tracker:
    """SAM 3 (PyPI sam3 0.1.4) turning decoded frames and a text prompt into detections,
    configured by a Sam3Config (trackers/sam3/config.py); `weights` overrides where the
    weights come from (tests and benchmarks build random ones: benchmarks/instrumented.py).

    Output: one Detections per frame, in order, lagging the input by SAM 3's hotstart delay
    (15 frames). `scores` are SAM 3's `out_probs`: the detector's score for the object on the
    frame it was first found, fixed for the object's life.
    """

    def __init__(self, config: Sam3Config = Sam3Config(), weights: WeightsSource | None = None) -> None:
        weights = weights or resolve_weights(config.checkpoint)  # fails before any thread starts
        self.config = config
        self.device = pick_device(config.device)
        self.compile = self.device.type == "cuda" if config.compile is None else config.compile
        if self.compile and self.device.type != "cuda":
            raise ModelUnavailable("compile=True needs CUDA (sam3 compiles with CUDA graphs); use compile=False on CPU")
        self.warm_sizes = config.all_warm_sizes
        self.warm_up_seconds: dict[tuple[int, int], float] = {}
        overrides = dict(config.model_overrides)

        def build():
            model = build_model(weights, self.device, self.compile)
            _apply_overrides(model, overrides)
            return model

        self._worker = ModelWorker(build, max_pending=config.max_pending)
        self.hotstart_delay = int(self._worker.model.hotstart_delay)
        self.warm_frames = config.warm_frames or self.hotstart_delay + 2
        if self.compile:
            import torch

            torch._logging.set_logs(recompiles=True)  # every recompile is logged with its reason
        if self.compile if config.warm_up is None else config.warm_up:
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
    def _run(self, model, job: Feed, num_frames: int, height: int, width: int, prompt: str) -> None:
        from serve_app.trackers.sam3.convert import to_detections
        from serve_app.trackers.sam3.frames import LazyFrames
        from serve_app.trackers.sam3.session import Session

        graphs_before = _compiled_graphs()
        frames = LazyFrames(num_frames, job.pull, model.device, expected_size=(height, width))
        session = Session(model, frames, num_frames, height, width, trim=self.config.trim_memory)
        last: list[dict] = [{}]

        def emit(index: int, outputs: dict) -> None:
            last[0] = outputs
            job.emit(to_detections(index, outputs, height, width))

        def between_frames() -> None:  # after the frame was emitted and the session trimmed
            self._after_frame(session, last[0])
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

    def _after_frame(self, session, outputs: dict) -> None:
        """Called on the model thread after each emitted frame (benchmarks/instrumented.py records)."""

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


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # torch internals moved: counting is a nicety, not a requirement
        return 0

