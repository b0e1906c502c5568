"""SAM 3's per-frame output dict -> the project's typed `Detections`, at the tracker's edge.

SAM 3 (`Sam3VideoInference._postprocess_output`) gives, per frame:
- `out_obj_ids`      int64 (N,)        stable ids, new ids for objects found later;
- `out_probs`        float32 (N,)      the detector's score for the object on the frame where it
                                       was first found; it stays fixed for the object's life.
                                       This is the score `confidence_threshold` applies to;
- `out_boxes_xywh`   float32 (N, 4)    normalised to [0, 1], derived from the masks;
- `out_binary_masks` bool (N, H, W)    at the video's resolution;
and the session adds `out_concepts` int16 (N,), each object's concept (session.Merged).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from serve_app.errors import ModelError
from serve_app.media import Detections


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, should SAM 3 ever stop converting
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def to_detections(frame_index: int, outputs: Mapping[str, Any], height: int, width: int) -> Detections:
    """Check and convert one frame's outputs; `height` x `width` is the decoded frame size."""
    try:
        ids = _array(outputs["out_obj_ids"]).astype(np.int64, copy=False).reshape(-1)
        scores = _array(outputs["out_probs"]).astype(np.float32, copy=False).reshape(-1)
        boxes = _array(outputs["out_boxes_xywh"]).astype(np.float32, copy=False)
        masks = _array(outputs["out_binary_masks"])
    except KeyError as exc:
        raise ModelError(f"SAM 3 output for frame {frame_index} lacks {exc.args[0]!r}") from None
    n = ids.shape[0]
    if n == 0:
        return Detections.empty(frame_index, height, width)
    if masks.dtype != bool:
        masks = masks > 0
    if masks.ndim == 4 and masks.shape[1] == 1:  # (N, 1, H, W) from some sam3 code paths
        masks = masks[:, 0]
    expected = {"out_probs": (scores.shape, (n,)), "out_boxes_xywh": (boxes.shape, (n, 4)),
                "out_binary_masks": (masks.shape, (n, height, width))}
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ModelError(f"SAM 3 output {name} for frame {frame_index} has shape {tuple(got)}; "
                             f"expected {want} for {n} objects on a {width}x{height} video")
    if len(np.unique(ids)) != n:
        raise ModelError(f"SAM 3 output for frame {frame_index} repeats object ids {ids.tolist()}")
    concepts = outputs.get("out_concepts")
    if concepts is not None:
        concepts = _array(concepts).astype(np.int16, copy=False).reshape(-1)
        if concepts.shape != (n,):
            raise ModelError(f"SAM 3 output for frame {frame_index} names {concepts.shape[0]} concepts for {n} objects")
    return Detections(
        frame_index=frame_index,
        obj_ids=np.ascontiguousarray(ids),
        scores=np.ascontiguousarray(scores),
        boxes_xywh=np.ascontiguousarray(np.clip(boxes, 0.0, 1.0)),
        masks=np.ascontiguousarray(masks),
        concepts=None if concepts is None else np.ascontiguousarray(concepts),
    )
