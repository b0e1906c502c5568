import numpy as np
import pytest

from serve_app.video.composite import Compositor, render_mask, render_overlay
from serve_app.video.palette import COLORS
from serve_app.media import Detections
from testkit.video import blobs


def sam3_render(frame, dets, alpha):
    vis = pytest.importorskip("sam3.visualization_utils")
    outputs = {
        "out_obj_ids": dets.obj_ids,
        "out_probs": dets.scores,
        "out_boxes_xywh": dets.boxes_xywh,
        "out_binary_masks": dets.masks,
    }
    return vis.render_masklet_frame(frame, outputs, frame_idx=None, alpha=alpha)


def test_palette_is_sam3s_palette():
    """sam3 makes its palette at import with k-means, whose last bits depend on the CPU's
    arithmetic (2e-15 apart on an AVX2 machine from the AVX-512 one ours was taken on): equal
    far below what moves a pixel."""
    vis = pytest.importorskip("sam3.visualization_utils")
    np.testing.assert_allclose(COLORS, vis.COLORS, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.37])
def test_overlay_is_pixel_identical_to_sam3s_rendering(alpha):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (181, 323, 3), dtype=np.uint8)  # odd size, textured
    dets = blobs(181, 323, 5, seed=2, ids=[0, 3, 7, 130, 255])  # ids wrap the 128-colour palette
    ours = render_overlay(frame, dets, alpha)
    assert ours.dtype == np.uint8 and ours.shape == frame.shape
    assert np.array_equal(ours, sam3_render(frame, dets, alpha))


def test_overlay_on_a_real_720p_frame_matches_sam3(cockatoo):
    import av

    with av.open(str(cockatoo)) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    dets = blobs(720, 1280, 5, seed=3)
    assert np.array_equal(render_overlay(frame, dets, 0.5), sam3_render(frame, dets, 0.5))


def test_overlay_leaves_pixels_outside_mask_box_and_label_untouched():
    import cv2

    frame = np.full((100, 160, 3), 40, np.uint8)
    dets = blobs(100, 160, 1, seed=4)
    out = render_overlay(frame, dets, 0.5)
    x, y, w, h = dets.boxes_xywh[0]
    x1, y1, x2, y2 = int(x * 160), int(y * 100), int((x + w) * 160), int((y + h) * 100)
    (tw, th), _ = cv2.getTextSize(f"id=0, p={dets.scores[0]:.2f}", cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    drawn = np.zeros((100, 160), bool)
    drawn[max(y1 - 10 - th - 2, 0) : y2 + 2, max(x1 - 2, 0) : max(x2, x1 + tw) + 2] = True
    assert np.array_equal(out[~drawn], frame[~drawn])
    assert (out[dets.masks[0]] != frame[dets.masks[0]]).any(axis=1).all()


def test_no_detections_gives_the_frame_back_and_a_black_mask():
    frame = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    empty = Detections.empty(0, 48, 64)
    assert np.array_equal(render_overlay(frame, empty, 0.5), frame)
    assert not render_mask(empty, 48, 64).any()


def test_mask_is_the_pure_union_of_objects():
    dets = blobs(90, 160, 4, seed=6)
    out = render_mask(dets, 90, 160)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}
    assert np.array_equal(out == 255, dets.masks.any(axis=0))


def test_compositor_picks_the_mode_and_keeps_the_input_frame_intact():
    frame = np.zeros((48, 64, 3), np.uint8)
    dets = blobs(48, 64, 2, seed=7)
    assert Compositor("mask", 0.5, 48, 64)(None, dets).shape == (48, 64)
    out = Compositor("overlay", 0.5, 48, 64)(frame, dets)
    assert out.shape == (48, 64, 3) and out.any() and not frame.any()
    with pytest.raises(ValueError, match="needs the frame"):
        Compositor("overlay", 0.5, 48, 64)(None, dets)


def test_drawing_in_place_gives_the_same_picture_without_a_copy():
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    dets = blobs(90, 160, 3, seed=8)
    copied = Compositor("overlay", 0.4, 90, 160)(frame, dets)
    assert not np.shares_memory(copied, frame)
    drawn = Compositor("overlay", 0.4, 90, 160, in_place=True)(frame, dets)
    assert drawn is frame and np.array_equal(drawn, copied)
