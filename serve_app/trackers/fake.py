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
from typing import NamedTuple

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
        import cv2

        colours = self.colours(config.prompt)
        previous: list[_Blob] = []
        next_id = 0
        for chunk in chunks:
            for offset, frame in enumerate(chunk.frames):
                height, width = frame.shape[:2]
                # One colour conversion per frame, whatever the number of colours asked for.
                hsv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2HSV) if colours else None
                current = []
                for colour in colours:
                    for score, mask, box, area in self._find(hsv, colour):
                        match = self._match(colour, mask, box, area, previous)
                        if match is None:
                            current.append(_Blob(next_id, colour, score, mask, box, area))
                            next_id += 1
                        else:  # the score is fixed at the object's birth
                            current.append(_Blob(match.id, colour, match.score, mask, box, area))
                previous = current
                yield _detections(chunk.start + offset, current, height, width)

    def _hue_ranges(self, colour: str) -> list[tuple[int, int]]:
        # Hue wraps around at red: a circular distance <= tolerance is one or two ranges of 0-179.
        lo, hi = HUES[colour] - self.hue_tolerance, HUES[colour] + self.hue_tolerance
        ranges = [(max(lo, 0), min(hi, 179))]
        if lo < 0:
            ranges.append((180 + lo, 179))
        if hi > 179:
            ranges.append((0, hi - 180))
        return ranges

    def _find(self, hsv: np.ndarray, colour: str):
        """(score, full-frame mask, box (y0, y1, x0, x1), area) of each blob of `colour`."""
        import cv2

        member = None
        for lo, hi in self._hue_ranges(colour):
            inside = cv2.inRange(hsv, (lo, self.min_saturation, self.min_value), (hi, 255, 255))
            member = inside if member is None else cv2.bitwise_or(member, inside)
        # Label only the rectangle that holds this colour: most of a frame is background.
        x, y, w, h = cv2.boundingRect(member)
        if w == 0 or h == 0:
            return []
        n, labels, stats, _ = cv2.connectedComponentsWithStats(member[y : y + h, x : x + w], connectivity=8)
        out = []
        for label in range(1, n):
            area = int(stats[label, cv2.CC_STAT_AREA])
            if area < self.min_area:
                continue
            bx, by, bw, bh = (int(v) for v in stats[label, :4])
            crop = labels[by : by + bh, bx : bx + bw] == label
            y0, x0 = y + by, x + bx
            mask = np.zeros(hsv.shape[:2], bool)
            mask[y0 : y0 + bh, x0 : x0 + bw] = crop
            saturation = hsv[y0 : y0 + bh, x0 : x0 + bw, 1][crop]
            out.append((float(np.median(saturation)) / 255.0, mask, (y0, y0 + bh, x0, x0 + bw), area))
        return out

    def _match(self, colour, mask, box, area, previous):
        best, best_iou = None, self.match_iou
        for prev in previous:
            if prev.colour != colour:
                continue
            y0, y1 = max(box[0], prev.box[0]), min(box[1], prev.box[1])
            x0, x1 = max(box[2], prev.box[2]), min(box[3], prev.box[3])
            inter = np.count_nonzero(mask[y0:y1, x0:x1] & prev.mask[y0:y1, x0:x1]) if y1 > y0 and x1 > x0 else 0
            iou = inter / max(area + prev.area - inter, 1)
            if iou >= best_iou:
                best, best_iou = prev, iou
        return best


class _Blob(NamedTuple):
    id: int
    colour: str
    score: float
    mask: np.ndarray                     # (H, W) bool
    box: tuple[int, int, int, int]       # y0, y1, x0, x1 (end-exclusive)
    area: int


def _detections(index: int, objects: list[_Blob], height: int, width: int) -> Detections:
    if not objects:
        return Detections.empty(index, height, width)
    boxes = []
    for o in objects:
        # SAM 3 derives boxes from masks the same way (torchvision masks_to_boxes, inclusive).
        y1, y2, x1, x2 = o.box[0], o.box[1] - 1, o.box[2], o.box[3] - 1
        boxes.append((x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height))
    return Detections(
        frame_index=index,
        obj_ids=np.array([o.id for o in objects], np.int64),
        scores=np.array([o.score for o in objects], np.float32),
        boxes_xywh=np.array(boxes, np.float32),
        masks=np.stack([o.mask for o in objects]),
    )
