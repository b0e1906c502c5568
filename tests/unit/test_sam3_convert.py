"""SAM 3's per-frame output dict -> Detections (no model: outputs shaped as
Sam3VideoInference._postprocess_output returns them)."""

import numpy as np
import pytest

from serve_app.errors import ModelError
from serve_app.trackers.sam3.convert import to_detections

H, W = 72, 128


def sam3_outputs(ids, probs, masks):
    """What sam3 0.1.4 yields per frame: numpy arrays, boxes normalised xywh from the masks."""
    masks = np.asarray(masks, bool)
    boxes = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append([cols[0] / W, rows[0] / H, (cols[-1] - cols[0]) / W, (rows[-1] - rows[0]) / H])
    return {
        "out_obj_ids": np.asarray(ids, np.int64),
        "out_probs": np.asarray(probs, np.float32),
        "out_boxes_xywh": np.asarray(boxes, np.float32).reshape(-1, 4),
        "out_binary_masks": masks.reshape(-1, H, W),
        "frame_stats": {"num_obj_tracked": 2, "num_obj_dropped": 0},
    }


def two_objects():
    masks = np.zeros((2, H, W), bool)
    masks[0, 10:20, 30:50] = True
    masks[1, 40:70, 0:10] = True
    return sam3_outputs([3, 7], [0.91, 0.55], masks)


def test_objects_keep_their_ids_scores_boxes_and_video_resolution_masks():
    out = two_objects()
    d = to_detections(12, out, H, W)
    assert d.frame_index == 12 and len(d) == 2
    assert d.obj_ids.dtype == np.int64 and d.obj_ids.tolist() == [3, 7]
    assert d.scores.dtype == np.float32 and np.allclose(d.scores, [0.91, 0.55])
    assert d.boxes_xywh.shape == (2, 4) and np.allclose(d.boxes_xywh, out["out_boxes_xywh"])
    assert d.masks.dtype == bool and d.masks.shape == (2, H, W)
    assert np.array_equal(d.masks, out["out_binary_masks"])


def test_no_objects_gives_empty_detections_at_video_resolution():
    d = to_detections(0, sam3_outputs([], [], np.zeros((0, H, W))), H, W)
    assert len(d) == 0 and d.masks.shape == (0, H, W) and d.boxes_xywh.shape == (0, 4)


def test_the_confidence_threshold_applies_to_sam3_out_probs():
    d = to_detections(0, two_objects(), H, W)
    assert d.keep(0.0).obj_ids.tolist() == [3, 7]
    assert d.keep(0.6).obj_ids.tolist() == [3]
    assert len(d.keep(1.0)) == 0


def test_torch_tensors_and_channel_dimension_masks_are_accepted():
    torch = pytest.importorskip("torch")
    out = two_objects()
    tensors = {k: torch.from_numpy(v) for k, v in out.items() if isinstance(v, np.ndarray)}
    tensors["out_binary_masks"] = tensors["out_binary_masks"][:, None]  # (N, 1, H, W)
    d = to_detections(1, tensors, H, W)
    assert d.masks.shape == (2, H, W) and d.obj_ids.tolist() == [3, 7]


def test_boxes_are_clipped_to_the_picture():
    out = two_objects()
    out["out_boxes_xywh"][0] = [-0.01, 0.2, 1.2, 0.1]
    d = to_detections(0, out, H, W)
    assert d.boxes_xywh.min() >= 0.0 and d.boxes_xywh.max() <= 1.0


@pytest.mark.parametrize("field, value, words", [
    ("out_binary_masks", np.zeros((2, H, W + 1), bool), ["out_binary_masks", "(2, 72, 129)", "128x72"]),
    ("out_probs", np.zeros(3, np.float32), ["out_probs", "(3,)", "2 objects"]),
    ("out_boxes_xywh", np.zeros((2, 2), np.float32), ["out_boxes_xywh", "(2, 2)"]),
    ("out_obj_ids", np.array([5, 5]), ["repeats", "[5, 5]"]),
])
def test_malformed_outputs_are_a_model_error_naming_the_field(field, value, words):
    out = two_objects()
    out[field] = value
    with pytest.raises(ModelError) as info:
        to_detections(4, out, H, W)
    assert "frame 4" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_missing_output_is_named():
    out = two_objects()
    del out["out_probs"]
    with pytest.raises(ModelError, match="out_probs"):
        to_detections(0, out, H, W)
