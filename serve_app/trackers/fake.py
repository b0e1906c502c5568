"""ColorShapeTracker: a deterministic CPU stand-in for SAM 3. A test double, not a model.

It finds solid coloured shapes by the colour words in the prompt ("red", "green", "blue",
"yellow"; a prompt without one finds nothing), so the right answer is known on the clips of
`serve_app.synthetic`. It behaves like SAM 3 where the service depends on it: one Detections
per frame in order, ids stable across frames and new ids for shapes that appear later, a score
fixed at the object's birth (its colour saturation, so pale shapes score low), boxes as
normalised xywh derived from the masks, masks at video resolution. It lets the whole service
run, and be tested, without a GPU or weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from serve_app.contract import JobConfig
from serve_app.types import Detections, FrameChunk, VideoInfo

# OpenCV hue (0-180) of each colour word's pure colour in serve_app.synthetic.PURE_RGB.
HUES = {"red": 0, "yellow": 26, "green": 66, "blue": 116}


class ColorShapeTracker:
    """Options: `min_area` (pixels; smaller blobs are noise), `hue_tolerance` (OpenCV hue
    units), `min_saturation` and `min_value` (0-255) for a pixel to count as coloured,
    `match_iou` (overlap with the previous frame's object that keeps its id)."""

    def __init__(self, min_area: int = 64, hue_tolerance: int = 12, min_saturation: int = 60,
                 min_value: int = 60, match_iou: float = 0.3) -> None:
        self.min_area = min_area
        self.hue_tolerance = hue_tolerance
        self.min_saturation = min_saturation
        self.min_value = min_value
        self.match_iou = match_iou

    def colours(self, prompt: str) -> list[str]:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        return [c for c in HUES if c in words]

    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]:
        colours = self.colours(config.prompt)
        previous: list[tuple[int, str, float, np.ndarray]] = []  # (id, colour, score, mask)
        next_id = 0
        for chunk in chunks:
            for offset, frame in enumerate(chunk.frames):
                height, width = frame.shape[:2]
                found = [(c, s, m) for c in colours for s, m in self._find(frame, c)]
                current = []
                for colour, saturation, mask in found:
                    match = self._match(colour, mask, previous)
                    if match is None:
                        current.append((next_id, colour, saturation, mask))
                        next_id += 1
                    else:
                        current.append((match[0], colour, match[2], mask))  # score fixed at birth
                previous = current
                yield _detections(chunk.start + offset, current, height, width)

    def _find(self, frame: np.ndarray, colour: str) -> list[tuple[float, np.ndarray]]:
        import cv2

        hsv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2HSV)
        hue, sat, val = hsv[..., 0].astype(np.int16), hsv[..., 1], hsv[..., 2]
        distance = np.abs(hue - HUES[colour])
        distance = np.minimum(distance, 180 - distance)  # hue wraps around at red
        member = (distance <= self.hue_tolerance) & (sat >= self.min_saturation) & (val >= self.min_value)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(member.astype(np.uint8), connectivity=8)
        out = []
        for label in range(1, n):
            if stats[label, cv2.CC_STAT_AREA] < self.min_area:
                continue
            mask = labels == label
            out.append((float(np.median(sat[mask])) / 255.0, mask))
        return out

    def _match(self, colour, mask, previous):
        best, best_iou = None, self.match_iou
        for prev in previous:
            if prev[1] != colour:
                continue
            inter = np.count_nonzero(mask & prev[3])
            iou = inter / max(np.count_nonzero(mask | prev[3]), 1)
            if iou >= best_iou:
                best, best_iou = prev, iou
        return best


def _detections(index: int, objects, height: int, width: int) -> Detections:
    if not objects:
        return Detections.empty(index, height, width)
    masks = np.stack([o[3] for o in objects])
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # SAM 3 derives boxes from masks the same way (torchvision masks_to_boxes, inclusive).
        x1, y1, x2, y2 = cols[0], rows[0], cols[-1], rows[-1]
        boxes.append((x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height))
    return Detections(
        frame_index=index,
        obj_ids=np.array([o[0] for o in objects], np.int64),
        scores=np.array([o[2] for o in objects], np.float32),
        boxes_xywh=np.array(boxes, np.float32),
        masks=masks,
    )
