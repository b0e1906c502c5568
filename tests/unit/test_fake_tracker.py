import numpy as np
import pytest

from serve_app import synthetic as S
from serve_app.contract import JobConfig
from serve_app.trackers.fake import ColorShapeTracker
from serve_app.media import FrameChunk

N, W, H = 30, 480, 272


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """The default synthetic clip, encoded to H.264 and decoded back (real compression noise)."""
    import av

    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    S.write_clip(path, W, H, N, 25)
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def run(frames, prompt, chunk=8):
    chunks = (FrameChunk(s, frames[s : s + chunk]) for s in range(0, len(frames), chunk))
    return list(ColorShapeTracker().track(chunks, None, JobConfig(prompt=prompt)))


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_finds_every_shape_of_the_prompted_colours_with_the_right_masks(decoded):
    dets = run(decoded, "red, blue, green and yellow shapes")
    assert [d.frame_index for d in dets] == list(range(N))
    for i, d in enumerate(dets):
        truth = S.truth(i, N, W, H)
        assert len(d) == len(truth)
        for mask in truth.values():
            assert max(iou(mask, m) for m in d.masks) > 0.9
        assert d.masks.shape == (len(d), H, W) and d.masks.dtype == bool


def test_only_the_prompted_colour_is_found(decoded):
    dets = run(decoded, "the blue one")
    truth_blue = [k for k, s in enumerate(S.DEFAULT_SHAPES) if s.color == "blue"]
    assert all(len(d) == len(truth_blue) for d in dets)
    assert all(len(d) == 0 for d in run(decoded, "a fish"))


def test_scores_are_the_colour_saturation_so_pale_shapes_fall_below_the_default_threshold(decoded):
    first = run(decoded, "red")[0]
    assert sorted(np.round(first.scores, 1)) == sorted(
        round(s.saturation, 1) for s in S.DEFAULT_SHAPES if s.color == "red"
    )
    kept = first.keep(0.5)
    assert len(kept) == 1 and kept.scores[0] > 0.8
    assert len(first.keep(0.0)) == 2


def test_ids_are_stable_and_a_shape_that_enters_later_gets_a_new_id(decoded):
    dets = run(decoded, "red green")
    ids_before = set(dets[0].obj_ids.tolist())
    assert all(set(d.obj_ids.tolist()) == ids_before for d in dets[: int(0.35 * N)])
    later = dets[int(0.35 * N) + 1]
    new = set(later.obj_ids.tolist()) - ids_before
    assert len(new) == 1
    (new_id,) = new
    assert all(new_id in d.obj_ids for d in dets[int(0.35 * N) + 1 : int(0.8 * N)])
    # a score is fixed at the object's birth
    scores = {int(i): float(s) for d in dets for i, s in zip(d.obj_ids, d.scores)}
    for d in dets:
        for i, s in zip(d.obj_ids, d.scores):
            assert float(s) == scores[int(i)]


def test_boxes_are_normalised_xywh_around_the_mask(decoded):
    d = run(decoded, "blue")[0]
    x, y, w, h = d.boxes_xywh[0]
    rows, cols = np.nonzero(d.masks[0])
    assert x == pytest.approx(cols.min() / W) and y == pytest.approx(rows.min() / H)
    assert x + w == pytest.approx(cols.max() / W) and y + h == pytest.approx(rows.max() / H)


def test_at_most_max_objects_are_tracked_the_highest_scoring_first(decoded):
    from serve_app.contract import parse_config

    every = run(decoded, "red, blue, green and yellow shapes")
    capped = [d for d in ColorShapeTracker().track(
        (FrameChunk(s, decoded[s:s + 8]) for s in range(0, N, 8)), None,
        parse_config({"prompt": "red, blue, green and yellow shapes", "max_objects": 2}))]
    assert max(len(d) for d in every) > 2
    assert all(len(d) <= 2 for d in capped)
    # the two born on frame 0 are the two highest-scoring of frame 0, and they keep their ids
    top = sorted(zip(every[0].scores, every[0].obj_ids), key=lambda s: -s[0])[:2]
    assert sorted(capped[0].scores) == sorted(s for s, _ in top)
    assert all(set(d.obj_ids) <= set(capped[0].obj_ids) for d in capped)


# -- several concepts, exemplar boxes, a prompt frame: the stand-in does what SAM 3 is asked ------
def plan_chunks(frames, prompt_frame, chunk=8):
    """The chunks in the tracker's order (media.chunk_plan): forward from the prompt frame, then
    backward, as the decoder sends them."""
    from serve_app.media import chunk_plan

    out = []
    for first, count, step in chunk_plan(len(frames), chunk, prompt_frame):
        piece = FrameChunk(first if step == 1 else first - count + 1,
                           frames[first:first + count] if step == 1 else frames[first - count + 1:first + 1])
        out.append(piece if step == 1 else piece.backward())
    return out


def track(frames, prompt_frame=0, **config):
    return list(ColorShapeTracker().track(plan_chunks(frames, prompt_frame), None,
                                          JobConfig(prompt_frame=prompt_frame, **config)))


def box_of(mask) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def test_each_object_carries_the_concept_it_was_found_for(decoded):
    dets = track(decoded, prompts=["blue square", "the red one", "purple"])
    for d in dets:
        blue = [c for c, m in zip(d.concepts, d.masks) if iou(m, S.truth(d.frame_index, N, W, H)[1]) > 0.9]
        assert blue == [0]  # the blue square, found for "blue square"
        assert set(d.concepts.tolist()) <= {0, 1}  # "purple" names no shape colour: nothing for it
        assert (d.concepts == 1).sum() == 2  # both red shapes (the pale one scores low, still found)


def test_a_positive_box_selects_its_shape_with_no_text_and_a_negative_one_drops_its_shape(decoded):
    truth = S.truth(0, N, W, H)
    yellow = {"box": box_of(truth[3]), "label": True}
    dets = track(decoded, boxes=[yellow])
    assert all(len(d) == 1 and iou(d.masks[0], S.truth(d.frame_index, N, W, H)[3]) > 0.9 for d in dets)
    assert all(d.concepts.tolist() == [-1] for d in dets)  # a concept of the box's own
    pale = {"box": box_of(truth[4]), "label": False}  # the pale red square
    dets = track(decoded, prompt="red", boxes=[pale])
    assert all(len(d) == 1 and iou(d.masks[0], S.truth(d.frame_index, N, W, H)[0]) > 0.9 for d in dets)


def test_a_prompt_frame_finds_its_shapes_there_and_follows_them_both_ways(decoded):
    k = N // 2  # the green circle is visible from frame 10.5 to 24: born on the prompt frame here
    dets = track(decoded, prompt_frame=k, prompt="green and yellow")
    assert [d.frame_index for d in dets] == list(range(k, N)) + list(range(k - 1, -1, -1))
    by_frame = {d.frame_index: d for d in dets}
    green_id = next(int(i) for i, m in zip(by_frame[k].obj_ids, by_frame[k].masks)
                    if iou(m, S.truth(k, N, W, H)[2]) > 0.9)
    for i in range(N):
        truth = S.truth(i, N, W, H)
        d = by_frame[i]
        assert len(d) == sum(1 for s in (2, 3) if s in truth)
        if 2 in truth:  # one object, the same id, forward and backward from the prompt frame
            (found,) = [int(o) for o, m in zip(d.obj_ids, d.masks) if iou(m, truth[2]) > 0.9]
            assert found == green_id
