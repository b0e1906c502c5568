"""Compositing: each frame's kept detections become the picture the encoder writes.

`render_overlay` draws the same picture as `sam3.visualization_utils.render_masklet_frame`
(without its "Frame N" stamp), pixel for pixel, but faster:
- sam3 blends by boolean-indexing the whole frame three times per object; we blend inside each
  mask's bounding box only, through a 256-entry lookup table per channel (cv2.LUT) that holds exactly the
  float64 result sam3 computes (`alpha * colour + (1 - alpha) * value`, truncated to uint8);
- objects are still blended one after another, so overlaps come out as sam3 draws them;
- boxes and labels use the very cv2 calls sam3 makes, in the same order.
"""

from __future__ import annotations

import numpy as np

from serve_app.video.palette import COLORS
from serve_app.media import Detections

_FONT_SCALE = 0.5
_BOX_THICKNESS = 2


def render_mask(dets: Detections, height: int, width: int) -> np.ndarray:
    """(H, W) uint8: 255 wherever any object's mask is, 0 elsewhere."""
    if len(dets) == 0:
        return np.zeros((height, width), np.uint8)
    union = np.any(dets.masks, axis=0) if len(dets) > 1 else dets.masks[0]
    return union.astype(np.uint8) * np.uint8(255)


def _blend_table(color255: np.ndarray, alpha: float) -> np.ndarray:
    """(256, 1, 3) uint8 for cv2.LUT: the blended value of every input value, per channel,
    exactly as sam3 computes it."""
    values = np.arange(256, dtype=np.uint8)
    table = np.stack([(alpha * color255[c] + (1 - alpha) * values).astype(np.uint8) for c in range(3)], axis=-1)
    return np.ascontiguousarray(table[:, None, :])


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def render_overlay(frame: np.ndarray, dets: Detections, alpha: float, in_place: bool = False,
                   concepts: list[str] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: `frame` with each object's mask, box and `id=<N>, p=<score>` label
    (`<concept> id=<N>, p=<score>` with the job's `concepts`); drawn on `frame` itself with
    `in_place` (a C-contiguous uint8 RGB frame)."""
    import cv2

    overlay = frame if in_place else np.array(frame[..., :3], dtype=np.uint8, order="C", copy=True)
    height, width = overlay.shape[:2]
    for i in range(len(dets)):
        mask = dets.masks[i]
        if mask.shape != (height, width):
            raise ValueError(f"mask {i} is {mask.shape[1]}x{mask.shape[0]}; the frame is {width}x{height}")
        box = _bbox(mask)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        color255 = (COLORS[int(dets.obj_ids[i]) % len(COLORS)] * 255).astype(np.uint8)
        crop = overlay[y0:y1, x0:x1]
        blended = cv2.LUT(crop, _blend_table(color255, alpha))
        np.copyto(crop, blended, where=mask[y0:y1, x0:x1, None])

    for i in range(len(dets)):
        obj_id = int(dets.obj_ids[i])
        color255 = tuple(int(x * 255) for x in COLORS[obj_id % len(COLORS)])
        # float32 arithmetic, as sam3 does it: float64 would round some edges one pixel over.
        x, y, w, h = dets.boxes_xywh[i].astype(np.float32)
        x1, y1 = int(x * width), int(y * height)
        x2, y2 = int((x + w) * width), int((y + h) * height)
        cv2.rectangle(overlay, (x1, y1), (x2, y2), color255, _BOX_THICKNESS)
        label = f"id={obj_id}, p={dets.scores[i]:.2f}"
        concept = -1 if concepts is None or dets.concepts is None else int(dets.concepts[i])
        if concept >= 0:
            label = f"{concepts[concept]} {label}"
        cv2.putText(overlay, label, (x1, max(y1 - 10, 0)), cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE,
                    color255, 1, cv2.LINE_AA)
    return overlay


class Compositor:
    """Renders one output picture per frame for a job's `mode` and `alpha`.

    `Compositor(mode, alpha, height, width)(frame, dets)`: in mask mode `frame` may be None
    (the mask needs no pixels) and the result is (H, W) gray; in overlay mode it is (H, W, 3) RGB,
    drawn on `frame` itself when `in_place` (a frame nothing reads afterwards: a copy per frame
    cost more than the drawing).
    """

    def __init__(self, mode: str, alpha: float, height: int, width: int, in_place: bool = False,
                 concepts: list[str] | None = None) -> None:
        if mode not in ("mask", "overlay"):
            raise ValueError(f"mode is {mode!r}; it must be 'mask' or 'overlay'")
        self.mode, self.alpha, self.height, self.width = mode, float(alpha), height, width
        self.in_place, self.concepts = in_place, concepts

    def __call__(self, frame: np.ndarray | None, dets: Detections) -> np.ndarray:
        if self.mode == "mask":
            return render_mask(dets, self.height, self.width)
        if frame is None:
            raise ValueError("overlay mode needs the frame's pixels")
        return render_overlay(frame, dets, self.alpha, self.in_place, self.concepts)
