"""Trimming a SAM 3 session keeps exactly what later frames read.

The tracker-state structure below is sam3 0.1.4's (sam3_tracking_predictor.init_state), and
which memory frames a frame reads is decided by sam3's own `frame_filter` and
`select_closest_cond_frames`; only the index arithmetic of `_prepare_memory_conditioned_features`
(sam3_tracker_base.py:589-735) is restated here. No model is built.
"""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sam3.model.sam3_tracker_base import Sam3TrackerBase  # noqa: E402
from sam3.model.sam3_tracker_utils import select_closest_cond_frames  # noqa: E402

from serve_app.trackers.sam3.trim import (  # noqa: E402
    forget_removed, held, held_bytes, trim_frame_caches, trim_tracker_state)


def sam3_tracker(**changes):
    """The memory settings of sam3's video tracker (model_builder.build_tracker), as a stand-in."""
    settings = dict(num_maskmem=7, max_cond_frames_in_attn=4, max_obj_ptrs_in_encoder=16,
                    use_memory_selection=True, keep_first_cond_frame=False,
                    memory_temporal_stride_for_eval=1, mf_threshold=0.01)
    settings.update(changes)
    return SimpleNamespace(**settings)


def frames_read(tracker, output_dict, f, num_frames):
    """(kind, frame, id of the output object) for every memory entry frame f reads."""
    cond, non_cond = output_dict["cond_frame_outputs"], output_dict["non_cond_frame_outputs"]
    selected, unselected = select_closest_cond_frames(
        f, cond, tracker.max_cond_frames_in_attn, keep_first_cond_frame=tracker.keep_first_cond_frame)
    reads = [("cond", t, id(out)) for t, out in selected.items()]
    r = tracker.memory_temporal_stride_for_eval
    valid = []
    if tracker.use_memory_selection:
        valid = Sam3TrackerBase.frame_filter(tracker, output_dict, False, f, num_frames, r)

    def lookup(t):
        out = non_cond.get(t, unselected.get(t))
        return None if out is None else id(out)

    for t_pos in range(1, tracker.num_maskmem):
        t_rel = tracker.num_maskmem - t_pos
        if tracker.use_memory_selection:
            if t_rel > len(valid):
                continue
            prev = valid[-t_rel]
        else:
            prev = f - 1 if t_rel == 1 else ((f - 2) // r) * r - (t_rel - 2) * r
        reads.append(("memory", prev, lookup(prev)))
    for t_diff in range(1, min(num_frames, tracker.max_obj_ptrs_in_encoder)):
        if tracker.use_memory_selection:
            if -t_diff <= -len(valid):
                break
            t = valid[-t_diff]
        else:
            t = f - t_diff
            if t < 0:
                break
        reads.append(("pointer", t, lookup(t)))
    return reads


def new_tracker_state(num_objects):
    return {
        "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
        "output_dict_per_obj": {i: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}} for i in range(num_objects)},
        "consolidated_frame_inds": {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()},
        "mask_inputs_per_obj": {i: {} for i in range(num_objects)},
        "point_inputs_per_obj": {i: {} for i in range(num_objects)},
        "frames_already_tracked": {},
    }


def frame_output(score, num_objects=2):
    return {"maskmem_features": torch.zeros(num_objects, 4, 6, 6), "obj_ptr": torch.zeros(num_objects, 8),
            "pred_masks": torch.zeros(num_objects, 1, 12, 12), "eff_iou_score": torch.tensor(score)}


def add_frame(state, f, out, cond):
    key = "cond_frame_outputs" if cond else "non_cond_frame_outputs"
    state["output_dict"][key][f] = out
    for i, per_obj in state["output_dict_per_obj"].items():
        per_obj[key][f] = {k: v[i:i + 1] for k, v in out.items() if k != "eff_iou_score"}
    state["frames_already_tracked"][f] = {"reverse": False}
    if cond:  # a detector mask conditions the tracker on this frame (birth or re-conditioning)
        state["consolidated_frame_inds"]["cond_frame_outputs"].add(f)
        for inputs in state["mask_inputs_per_obj"].values():
            inputs[f] = torch.ones(1, 1, 18, 32, dtype=torch.bool)


def scores(num_frames, seed):
    """Eff. IoU scores with long stretches under mf_threshold (an occluded object), so
    frame_filter has to reach far back for frames that pass."""
    rng = np.random.default_rng(seed)
    out = rng.uniform(0.02, 1.0, num_frames)
    for start in rng.choice(num_frames, 6, replace=False):
        out[start:start + rng.integers(5, 40)] = 0.0
    return out


@pytest.mark.parametrize("changes", [
    {},                                                   # SAM 3's settings: memory selection on
    {"use_memory_selection": False},
    {"keep_first_cond_frame": True, "max_cond_frames_in_attn": 2},
    {"memory_temporal_stride_for_eval": 3, "use_memory_selection": False},
])
def test_every_frame_reads_the_same_memory_after_trimming(changes):
    tracker = sam3_tracker(**changes)
    num_frames = 260
    full, trimmed = new_tracker_state(2), new_tracker_state(2)
    for f, score in enumerate(scores(num_frames, seed=len(changes))):
        if f:
            assert frames_read(tracker, trimmed["output_dict"], f, num_frames) == \
                frames_read(tracker, full["output_dict"], f, num_frames), f"frame {f}"
        out = frame_output(score)
        cond = f == 0 or f % 16 == 0  # birth, then re-conditioning every 16 frames
        add_frame(full, f, out, cond)
        add_frame(trimmed, f, out, cond)
        trim_tracker_state(trimmed, tracker)

        kept = trimmed["output_dict"]
        for per_obj in trimmed["output_dict_per_obj"].values():
            assert per_obj["cond_frame_outputs"].keys() == kept["cond_frame_outputs"].keys()
            assert per_obj["non_cond_frame_outputs"].keys() == kept["non_cond_frame_outputs"].keys()
        # propagate_in_video_preflight asserts this equality on every re-conditioning
        inputs = set().union(*(m.keys() for m in trimmed["mask_inputs_per_obj"].values()))
        assert trimmed["consolidated_frame_inds"]["cond_frame_outputs"] == inputs

    window = max(16, tracker.memory_temporal_stride_for_eval * 7)
    assert len(full["output_dict"]["non_cond_frame_outputs"]) > 230
    assert len(trimmed["output_dict"]["non_cond_frame_outputs"]) <= window + 15
    assert len(trimmed["output_dict"]["cond_frame_outputs"]) <= 1 + tracker.max_cond_frames_in_attn + window // 16 + 1
    assert len(trimmed["frames_already_tracked"]) == 1


def test_emitted_frames_per_frame_caches_are_dropped_and_hotstart_counts_kept():
    unmatched = defaultdict(list, {1: list(range(20)), 2: [3, 4], 3: list(range(8))})
    overlaps = defaultdict(list, {(1, 2): list(range(9)), (1, 3): [5]})
    state = {
        "cached_frame_outputs": {f: {1: np.zeros((4, 4), bool)} for f in range(10)},
        "tracker_metadata": {
            "obj_id_to_tracker_score_frame_wise": defaultdict(dict, {f: {1: 0.9} for f in range(10)}),
            "rank0_metadata": {
                "suppressed_obj_ids": defaultdict(set, {f: set() for f in range(10)}),
                "unmatched_frame_inds": unmatched,
                "overlap_pair_to_frame_inds": overlaps,
            },
        },
    }
    before = {k: len(v) >= 8 for k, v in unmatched.items()}, {k: len(v) >= 8 for k, v in overlaps.items()}
    trim_frame_caches(state, emitted=6, unmatch_thresh=8, dup_thresh=8)
    assert sorted(state["cached_frame_outputs"]) == [7, 8, 9]
    assert sorted(state["tracker_metadata"]["obj_id_to_tracker_score_frame_wise"]) == [7, 8, 9]
    assert sorted(state["tracker_metadata"]["rank0_metadata"]["suppressed_obj_ids"]) == [7, 8, 9]
    # SAM 3 only asks `len(frames) >= threshold` of these lists
    after = {k: len(v) >= 8 for k, v in unmatched.items()}, {k: len(v) >= 8 for k, v in overlaps.items()}
    assert after == before
    assert unmatched[1] == list(range(12, 20)) and unmatched[2] == [3, 4]


def test_an_empty_session_is_left_alone():
    state = new_tracker_state(0)
    trim_tracker_state(state, sam3_tracker())
    trim_frame_caches({"tracker_metadata": {}}, emitted=3, unmatch_thresh=8, dup_thresh=8)
    assert state == new_tracker_state(0)


def test_held_bytes_counts_each_storage_once():
    base = torch.zeros(4, 256)                  # 4 KiB
    array = np.zeros(1000, np.uint8)

    class Frames:                               # stands in for a FrameSource
        nbytes = 500

    state = {"a": base, "views": [base[0], base[1:3]], "np": (array, array[10:]),
             "frames": Frames(), "model": torch.nn.Linear(1000, 1000), "n": 3, "s": "x"}
    tensors, python = held(state)
    assert tensors == 4096 + 1000 + 500
    assert 0 < python < 4096 and held_bytes(state) == tensors + python


def test_held_bytes_sees_python_bookkeeping_grow():
    """SAM 3 keeps per-object dicts and sets of ids that hold no tensor; they count too."""
    ids = {"removed_obj_ids": set(), "obj_first_frame_idx": {}}
    before = held_bytes(ids)
    for i in range(1000, 2000):
        ids["removed_obj_ids"].add(i)
        ids["obj_first_frame_idx"][i] = i
    assert held_bytes(ids) - before > 1000 * 40


def rank0_with_removed(removed):
    return {
        "obj_first_frame_idx": {1: 0, 2: 3, 3: 4},
        "unmatched_frame_inds": defaultdict(list, {2: [3, 4], 3: [4]}),
        "trk_keep_alive": defaultdict(int, {1: 5, 2: -1, 3: 0}),
        "overlap_pair_to_frame_inds": defaultdict(list, {(1, 2): [4], (1, 3): [4]}),
        "removed_obj_ids": set(removed),
        "suppressed_obj_ids": defaultdict(set),
    }


def test_removed_objects_are_forgotten_once_their_last_frame_is_emitted():
    """Object 2 is removed while frame 4 is the newest processed: frames up to 4 may still show
    it (and hide it), so it is kept until frame 4 is emitted, then forgotten everywhere."""
    state = {"tracker_metadata": {"obj_id_to_score": {1: 0.9, 2: -1e4, 3: 0.8},
                                  "rank0_metadata": rank0_with_removed({2})}}
    propagation = {"hotstart_buffer": [[3, {}], [4, {}]], "yield_list": [], "hotstart_removed_obj_ids": {2}}
    seen: dict[int, int] = {}
    forget_removed(state, propagation, emitted=2, removed_seen=seen)
    rank0 = state["tracker_metadata"]["rank0_metadata"]
    assert seen == {2: 4} and rank0["removed_obj_ids"] == {2} and propagation["hotstart_removed_obj_ids"] == {2}

    propagation["hotstart_buffer"] = [[5, {}], [6, {}]]
    forget_removed(state, propagation, emitted=4, removed_seen=seen)
    assert seen == {} and rank0["removed_obj_ids"] == set() and propagation["hotstart_removed_obj_ids"] == set()
    assert 2 not in rank0["obj_first_frame_idx"] and 2 not in rank0["unmatched_frame_inds"]
    assert 2 not in rank0["trk_keep_alive"] and list(rank0["overlap_pair_to_frame_inds"]) == [(1, 3)]
    assert state["tracker_metadata"]["obj_id_to_score"] == {1: 0.9, 3: 0.8}
    assert rank0["obj_first_frame_idx"] == {1: 0, 3: 4}


def test_the_last_frames_flushed_at_the_end_still_hide_a_removed_object():
    """At the video's end SAM 3 yields its whole buffer from `yield_list`: an object removed on
    the last frame stays hidden until that frame is out."""
    state = {"tracker_metadata": {"obj_id_to_score": {2: -1e4}, "rank0_metadata": rank0_with_removed({2})}}
    propagation = {"hotstart_buffer": [], "yield_list": [[8, {}], [9, {}]], "hotstart_removed_obj_ids": {2}}
    seen: dict[int, int] = {}
    forget_removed(state, propagation, emitted=8, removed_seen=seen)
    assert propagation["hotstart_removed_obj_ids"] == {2}
    forget_removed(state, propagation, emitted=9, removed_seen=seen)
    assert propagation["hotstart_removed_obj_ids"] == set()


class DeviceScore:
    """A memory score still on the GPU. Comparing it on the host would wait for the GPU: sam3's
    frame_filter does so (counted in `reads`), trimming must not."""

    device = SimpleNamespace(type="cuda")
    reads = 0

    def __init__(self, value):
        self.value = value

    def __gt__(self, other):
        DeviceScore.reads += 1
        return self.value > other

    def __bool__(self):
        raise AssertionError("a device score was read on the host")

    __float__ = __bool__


class Copies:
    """trim._start_copy's stand-in: a batch copied to the host lands one step after it starts."""

    def __init__(self):
        self.step = 0
        self.batches: list[list[float]] = []

    def __call__(self, sources):
        started = self.step
        self.batches.append([s.value for s in sources])
        host = torch.tensor([s.value for s in sources], dtype=torch.bfloat16)
        return host, lambda: self.step > started


def test_scores_cross_to_the_host_once_each_batched_and_never_waited_for(monkeypatch):
    """With every score on the device, trimming reads none of them there: each frame's score is
    copied once, in one batch per step, and put in place as a host tensor of the same dtype, and
    until it lands the frame is kept; every frame reads the same memory as without trimming."""
    from serve_app.trackers.sam3 import trim

    copies = Copies()
    monkeypatch.setattr(trim, "_start_copy", copies)
    tracker = sam3_tracker()
    num_frames = 200
    full, trimmed = new_tracker_state(2), new_tracker_state(2)
    for f, score in enumerate(scores(num_frames, seed=7)):
        copies.step = f
        if f:  # the same frames, each still there (the two states hold different objects)
            assert [(kind, t, i is not None) for kind, t, i in frames_read(tracker, trimmed["output_dict"], f, num_frames)] == \
                [(kind, t, i is not None) for kind, t, i in frames_read(tracker, full["output_dict"], f, num_frames)], f
        out = frame_output(float(torch.tensor(score, dtype=torch.bfloat16)))
        add_frame(full, f, out, cond=f % 16 == 0)
        add_frame(trimmed, f, {**out, "eff_iou_score": DeviceScore(float(out["eff_iou_score"]))}, cond=f % 16 == 0)
        DeviceScore.reads = 0
        trim_tracker_state(trimmed, tracker)
        assert DeviceScore.reads == 0, f"trimming compared a device score at frame {f}"
        assert len(copies.batches) <= f + 1  # at most one batch per step
    copied = sum(len(b) for b in copies.batches)
    non_cond = num_frames - len(range(0, num_frames, 16))
    assert copied == non_cond, "each non-conditioning frame's score crosses once"
    kept = trimmed["output_dict"]["non_cond_frame_outputs"]
    newest = max(kept)
    for t, out in kept.items():
        if t < newest:  # the newest one's copy lands next step
            assert isinstance(out["eff_iou_score"], torch.Tensor) and out["eff_iou_score"].dtype == torch.bfloat16
    assert len(kept) <= 16 + 15


def test_a_score_sam3_recomputes_is_copied_again(monkeypatch):
    """sam3 recomputes every frame's score when it removes an object from a state (_slice_state):
    the new device tensor replaces the host copy, and is copied in its turn."""
    from serve_app.trackers.sam3 import trim

    copies = Copies()
    monkeypatch.setattr(trim, "_start_copy", copies)
    state = new_tracker_state(1)
    for f in range(3):
        copies.step = f
        add_frame(state, f, {**frame_output(0.5, 1), "eff_iou_score": DeviceScore(0.5)}, cond=f == 0)
        trim_tracker_state(state, sam3_tracker())
    assert copies.batches == [[0.5], [0.5]]  # frames 1 and 2 (frame 0 conditions: no score)
    non_cond = state["output_dict"]["non_cond_frame_outputs"]
    assert isinstance(non_cond[1]["eff_iou_score"], torch.Tensor)  # landed at step 2
    non_cond[1]["eff_iou_score"] = DeviceScore(0.25)  # what _slice_state writes
    copies.step = 3
    trim_tracker_state(state, sam3_tracker())
    assert copies.batches[-1] == [0.25]
    assert isinstance(non_cond[2]["eff_iou_score"], torch.Tensor)


@pytest.mark.gpu
def test_trimming_on_a_gpu_waits_for_nothing():
    """The scores on the device, as sam3 writes them: trimming makes no synchronising call, and
    each score is on the host a step later."""
    tracker, state = sam3_tracker(), new_tracker_state(2)
    non_cond = state["output_dict"]["non_cond_frame_outputs"]
    for f, score in enumerate(scores(60, seed=3)):
        add_frame(state, f, {k: v.cuda() for k, v in frame_output(score).items()}, cond=f == 0)
        torch.cuda.synchronize()  # a step's own syncs (its outputs leave for the host)
        torch.cuda.set_sync_debug_mode("error")
        try:
            trim_tracker_state(state, tracker)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    newest = max(non_cond)
    assert all(out["eff_iou_score"].device.type == "cpu" for t, out in non_cond.items() if t < newest)
