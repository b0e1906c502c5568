"""ColorShapeTracker: a deterministic CPU stand-in for SAM 3. A test double, not a model.

It finds solid coloured shapes by the colour words in each concept of the job ("red", "green",
"blue", "yellow"; a concept without one finds nothing), so the right answer is known on the
clips of `serve_app.synthetic`. It behaves like SAM 3 where the service depends on it: one
Detections per frame in the order it takes them (forward from the prompt frame, then backward
from it), ids stable across frames and new ids for shapes that appear later, a score fixed at
the object's birth (its colour saturation, so pale shapes score low), each object's concept,
boxes as normalised xywh derived from the masks, masks at video resolution. Exemplar boxes on
the prompt frame select the shapes they overlap (their colour becomes a concept: the job's
one concept, or -1 beside several) or, negative, drop them for good. It lets the whole service run, and be tested, without a
GPU or weights.

With `frame_delay_s` set (standing in for a GPU's time per frame) it runs as SAM 3 does: on
one model thread per tracker (trackers/worker.py), jobs interleaved frame by frame up to
`max_sessions`, one device shared by the replica's jobs. Without, each job runs in its
request's thread.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.contract import JobConfig
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.worker import DONE, Feed, ModelWorker, stream

# OpenCV hue (0-180) of each colour word's pure colour in serve_app.synthetic.PURE_RGB.
HUES = {"red": 0, "yellow": 26, "green": 66, "blue": 116}


class FakeConfig(BaseModel):
    """`{"kind": "fake", ...}`: the stand-in tracker, ColorShapeTracker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fake"] = "fake"
    min_area: int = Field(64, ge=1, description="Pixels; smaller blobs are noise.")
    hue_tolerance: int = Field(12, ge=0, le=90, description="OpenCV hue units (0-180 a turn).")
    min_saturation: int = Field(60, ge=0, le=255, description="For a pixel to count as coloured.")
    min_value: int = Field(60, ge=0, le=255, description="For a pixel to count as coloured.")
    match_iou: float = Field(0.3, ge=0, le=1, description="Overlap with the previous frame's object that keeps its id.")
    # Benchmarks stand it in for a GPU model: a wait per frame that costs no CPU.
    frame_delay_s: float = Field(0.0, ge=0, le=10, description="Seconds slept per frame.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs a replica of it needs (none).")
    max_sessions: int | None = Field(None, ge=1, le=64, description="Jobs interleaved frame by frame on its one "
                                     "thread; default: the tracker deployment's max_ongoing_requests (1 outside Serve).")


class ColorShapeTracker:
    def __init__(self, config: FakeConfig = FakeConfig()) -> None:
        self.config = config
        self._worker = None
        if config.frame_delay_s:  # standing in for a GPU model: one model thread, as SAM 3's
            self._worker = ModelWorker(lambda: None, max_pending=MAX_PENDING, name="stand-in-model",
                                       max_sessions=config.max_sessions or 1, label="stand-in")
            weakref.finalize(self, self._worker.stop, 0.0)  # its thread goes with the tracker

    def colours(self, prompt: str) -> list[str]:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        return [c for c in HUES if c in words]

    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        if self._worker is not None:
            yield from stream(self._worker, lambda model, feed: self._session(feed, config), chunks)
            return
        inline = _Inline(chunks)  # in the request's thread
        for _ in self._session(inline, config):
            yield from inline.take()
        yield from inline.take()

    def _session(self, feed: Feed, config: JobConfig) -> Iterator[None]:
        """One job on the model thread, a step per frame (worker.ModelWorker interleaves them)."""
        wanted = [(colour, k) for k, concept in enumerate(config.concepts) for colour in self.colours(concept)]
        previous: list[_Blob] = []
        dropped: list[_Blob] = []  # shapes a negative box dropped, followed so they stay dropped
        at_prompt: tuple[list[_Blob], list[_Blob]] = ([], [])
        next_id = 0
        left = [0]  # frames of the current chunk still to do: the next step needs no new chunk
        feed.holding = lambda: left[0] > 0
        while (chunk := feed.pull()) is not None:
            for offset, (index, frame) in enumerate(zip(chunk.indices(), chunk.frames)):
                left[0] = len(chunk) - offset - 1
                height, width = frame.shape[:2]
                if index == config.prompt_frame:
                    wanted, dropped = self._exemplars(frame, config, wanted)
                elif index == config.prompt_frame - 1:  # the backward pass starts from the prompt frame
                    previous, dropped = at_prompt
                current, newborn, still_dropped = [], [], []
                for colour, concept in wanted:
                    for score, box, crop in self._find(frame, colour):
                        if (gone := self._match(colour, box, crop, dropped)) is not None:
                            still_dropped.append(gone._replace(box=box, crop=crop))
                        elif (match := self._match(colour, box, crop, previous)) is None:
                            newborn.append((score, colour, concept, box, crop))
                        else:  # the score is fixed at the object's birth
                            current.append(match._replace(box=box, crop=crop))
                # As SAM 3 does: at most max_objects tracked, new ones born highest score first.
                for score, colour, concept, box, crop in sorted(newborn, key=lambda b: -b[0])[
                        :config.max_objects - len(current)]:
                    current.append(_Blob(next_id, colour, score, box, crop, concept))
                    next_id += 1
                previous, dropped = current, still_dropped
                if index == config.prompt_frame:
                    at_prompt = (current, still_dropped)
                if self.config.frame_delay_s:
                    time.sleep(self.config.frame_delay_s)
                feed.emit(_detections(index, current, height, width))
                yield
        feed.emit(DONE)

    def _exemplars(self, frame: np.ndarray, config: JobConfig,
                   wanted: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[_Blob]]:
        """On the prompt frame: a positive box's shapes make their colour a concept unless a text
        names it (the job's one concept, as SAM 3 prompts one text with its boxes; -1, a
        visual one, beside several); a negative box's shapes are dropped."""
        wanted, dropped = list(wanted), []
        for b in config.boxes:
            x, y, w, h = b.box
            for colour in HUES:
                for score, box, crop in self._find(frame, colour):
                    y0, y1, x0, x1 = box
                    if not (x0 < x + w and x < x1 and y0 < y + h and y < y1):
                        continue
                    if not b.label:
                        dropped.append(_Blob(-1, colour, score, box, crop, -1))
                    elif all(c != colour for c, _ in wanted):
                        wanted.append((colour, 0 if len(config.concepts) == 1 else -1))
        return wanted, dropped

    def _member(self, rgb: np.ndarray, colour: str) -> np.ndarray:
        """uint8 (h, w), 255 where a pixel of `rgb` counts as `colour`."""
        import cv2

        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
        # Hue wraps around at red: a circular distance <= tolerance is one or two ranges of 0-179.
        lo, hi = HUES[colour] - self.config.hue_tolerance, HUES[colour] + self.config.hue_tolerance
        ranges = [(max(lo, 0), min(hi, 179))] + ([(180 + lo, 179)] if lo < 0 else []) + (
            [(0, hi - 180)] if hi > 179 else [])
        member = None
        for a, b in ranges:
            inside = cv2.inRange(hsv, (a, self.config.min_saturation, self.config.min_value), (b, 255, 255))
            member = inside if member is None else cv2.bitwise_or(member, inside)
        return member

    def _find(self, frame: np.ndarray, colour: str) -> list[tuple[float, tuple[int, int, int, int], np.ndarray]]:
        """(score, box (y0, y1, x0, x1), mask inside the box) of each blob of `colour`.

        Blobs are looked for on every `_STRIDE`th pixel, then segmented at full resolution
        inside each one's rectangle (widened by a stride): most of a frame is background, and
        the full-resolution work is only where a shape is.
        """
        import cv2

        height, width = frame.shape[:2]
        coarse = self._member(frame[::_STRIDE, ::_STRIDE], colour)
        n, _, stats, _ = cv2.connectedComponentsWithStats(coarse, connectivity=8)
        rects = [
            (max((y - 1) * _STRIDE, 0), min((y + h + 1) * _STRIDE, height),
             max((x - 1) * _STRIDE, 0), min((x + w + 1) * _STRIDE, width))
            for x, y, w, h in (stats[k, :4].tolist() for k in range(1, n))
        ]
        out = []
        for y0, y1, x0, x1 in _merge(rects):
            member = self._member(frame[y0:y1, x0:x1], colour)
            m, labels, stats, _ = cv2.connectedComponentsWithStats(member, connectivity=8)
            for label in range(1, m):
                if stats[label, cv2.CC_STAT_AREA] < self.config.min_area:
                    continue
                bx, by, bw, bh = stats[label, :4].tolist()
                crop = labels[by : by + bh, bx : bx + bw] == label
                window = frame[y0 + by : y0 + by + bh, x0 + bx : x0 + bx + bw]
                sat = cv2.cvtColor(np.ascontiguousarray(window), cv2.COLOR_RGB2HSV)[..., 1][crop]
                box = (y0 + by, y0 + by + bh, x0 + bx, x0 + bx + bw)
                out.append((float(np.median(sat)) / 255.0, box, crop))
        return out

    def _match(self, colour, box, crop, previous):
        best, best_iou = None, self.config.match_iou
        area = int(np.count_nonzero(crop))
        for prev in previous:
            if prev.colour != colour:
                continue
            y0, y1 = max(box[0], prev.box[0]), min(box[1], prev.box[1])
            x0, x1 = max(box[2], prev.box[2]), min(box[3], prev.box[3])
            inter = 0
            if y1 > y0 and x1 > x0:
                a = crop[y0 - box[0] : y1 - box[0], x0 - box[2] : x1 - box[2]]
                b = prev.crop[y0 - prev.box[0] : y1 - prev.box[0], x0 - prev.box[2] : x1 - prev.box[2]]
                inter = int(np.count_nonzero(a & b))
            iou = inter / max(area + int(np.count_nonzero(prev.crop)) - inter, 1)
            if iou >= best_iou:
                best, best_iou = prev, iou
        return best


_STRIDE = 4
MAX_PENDING = 64  # jobs waiting for its thread: Serve sends a replica at most max_ongoing_requests


def _merge(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Rectangles (y0, y1, x0, x1) with every overlapping pair replaced by its union."""
    rects = list(rects)
    merged = True
    while merged:
        merged = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    rects[i] = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))
                    del rects[j]
                    merged = True
                    break
            if merged:
                break
    return rects


class _Inline:
    """What `_session` needs of a Feed, for running it in the request's thread."""

    def __init__(self, chunks: Iterable[FrameChunk]) -> None:
        self._chunks = iter(chunks)
        self._out: list[Detections] = []
        self.holding = lambda: False

    def pull(self) -> FrameChunk | None:
        return next(self._chunks, None)

    def emit(self, result) -> None:
        if result is not DONE:
            self._out.append(result)

    def take(self) -> list[Detections]:
        out, self._out = self._out, []
        return out


class _Blob(NamedTuple):
    id: int
    colour: str
    score: float
    box: tuple[int, int, int, int]       # y0, y1, x0, x1 (end-exclusive)
    crop: np.ndarray                     # bool mask inside the box
    concept: int = 0                     # its index in the job's concepts; -1 found by a box alone


def _detections(index: int, objects: list[_Blob], height: int, width: int) -> Detections:
    if not objects:
        return Detections.empty(index, height, width)
    masks = np.zeros((len(objects), height, width), bool)
    boxes = []
    for k, o in enumerate(objects):
        y0, y1, x0, x1 = o.box
        masks[k, y0:y1, x0:x1] = o.crop
        # SAM 3 derives boxes from masks the same way (torchvision masks_to_boxes, inclusive).
        boxes.append((x0 / width, y0 / height, (x1 - 1 - x0) / width, (y1 - 1 - y0) / height))
    return Detections(
        frame_index=index,
        obj_ids=np.array([o.id for o in objects], np.int64),
        scores=np.array([o.score for o in objects], np.float32),
        boxes_xywh=np.array(boxes, np.float32),
        masks=masks,
        concepts=np.array([o.concept for o in objects], np.int16),
    )
