"""Keep a SAM 3 session's memory to what future frames can still read.

sam3 0.1.4 keeps every frame's tracker outputs, video-resolution masks and per-frame metadata
until the session closes (about 1 MiB per object per frame plus H x W bytes of masks; users
report running out of an 80 GB card at 3,000 frames, upstream #481 and #169). Streaming
forward, most of it can never be read again. After each emitted frame this drops:

- per-frame caches of frames already emitted: `cached_frame_outputs` (video-resolution masks,
  kept for interactive refinement, which a text-prompted job never does) and the per-frame
  entries of `obj_id_to_tracker_score_frame_wise` and `suppressed_obj_ids` (each frame's
  outputs hold their own reference to what they need);
- hotstart bookkeeping beyond its thresholds: `unmatched_frame_inds` and
  `overlap_pair_to_frame_inds` are only ever compared as `len(...) >= threshold`, so each list
  keeps its last `threshold` entries;
- tracker memory outside the window the tracker can still attend to (sam3_tracker_base.py
  `_prepare_memory_conditioned_features`, 560-795, and `frame_filter`, 518-558):
  * non-conditioning frames: the last `max(max_obj_ptrs_in_encoder, r * num_maskmem)` frames
    by index (16: object pointers reach 15 frames back, spatial memory 6), and, with memory
    selection (SAM 3's default), the last `max_obj_ptrs_in_encoder - 1` frames whose
    `eff_iou_score` passes `mf_threshold`: those are all `frame_filter` can pick, since a
    frame's score does not change once written;
  * conditioning frames (where an object was added or re-conditioned on a detection, every
    16 frames): the first one and the `max_cond_frames_in_attn` (4) most recent, which is all
    `select_closest_cond_frames` can choose for a later frame, plus any inside the window
    above (read there as unselected conditioning frames). Keeping the first one also keeps
    more than `max_cond_frames_in_attn` frames, so sam3 still orders its choice by distance
    (with at most that many it takes them all in insertion order, a different memory order).

One case differs from keeping everything: when an object is removed from a tracker state
that holds several objects, SAM 3 re-scores that state's past frames (sam3_tracking_predictor
`remove_object`, `_slice_state`), and a frame dropped earlier cannot come back into the
selection. Everything else a later frame reads is kept.
"""

from __future__ import annotations

from typing import Any


def trim_session(state: dict, model: Any, emitted: int) -> None:
    """Trim `state` (a SAM 3 video inference state) after frame `emitted` was emitted."""
    trim_frame_caches(state, emitted, model.hotstart_unmatch_thresh, model.hotstart_dup_thresh)
    for tracker_state in state.get("tracker_inference_states", ()):
        trim_tracker_state(tracker_state, model.tracker)


def _drop_keys_upto(mapping: dict | None, last: int) -> None:
    if mapping:
        for key in [k for k in mapping if k <= last]:
            del mapping[key]


def _keep_last(lists: dict | None, count: int) -> None:
    for frames in (lists or {}).values():
        if count > 0:
            del frames[:-count]
        else:
            frames.clear()  # `len(x) >= 0` holds for an empty list too


def trim_frame_caches(state: dict, emitted: int, unmatch_thresh: int, dup_thresh: int) -> None:
    _drop_keys_upto(state.get("cached_frame_outputs"), emitted)
    metadata = state.get("tracker_metadata") or {}
    _drop_keys_upto(metadata.get("obj_id_to_tracker_score_frame_wise"), emitted)
    rank0 = metadata.get("rank0_metadata") or {}
    _drop_keys_upto(rank0.get("suppressed_obj_ids"), emitted)
    _keep_last(rank0.get("unmatched_frame_inds"), unmatch_thresh)
    _keep_last(rank0.get("overlap_pair_to_frame_inds"), dup_thresh)


def _window(tracker: Any) -> int:
    stride = max(1, int(getattr(tracker, "memory_temporal_stride_for_eval", 1)))
    return max(int(tracker.max_obj_ptrs_in_encoder), stride * int(tracker.num_maskmem))


def non_cond_frames_to_keep(non_cond: dict, newest: int, tracker: Any) -> set[int]:
    keep = {t for t in non_cond if t > newest - _window(tracker)}
    if getattr(tracker, "use_memory_selection", False):
        wanted = int(tracker.max_obj_ptrs_in_encoder) - 1
        picked = 0
        for t in sorted(non_cond, reverse=True):
            if picked >= wanted:
                break
            score = non_cond[t].get("eff_iou_score")
            if score is not None and float(score) > tracker.mf_threshold:
                keep.add(t)
                picked += 1
    return keep


def cond_frames_to_keep(cond: dict, newest: int, tracker: Any) -> set[int]:
    limit = int(tracker.max_cond_frames_in_attn)
    if limit < 0 or len(cond) <= limit + 1:
        return set(cond)
    ordered = sorted(cond)
    keep = {ordered[0], *ordered[-limit:]}
    keep.update(t for t in ordered if t > newest - _window(tracker))
    return keep


def trim_tracker_state(ts: dict, tracker: Any) -> None:
    """Drop a tracker state's outputs on frames no later frame can attend to."""
    outputs = ts["output_dict"]
    non_cond, cond = outputs["non_cond_frame_outputs"], outputs["cond_frame_outputs"]
    if not non_cond and not cond:
        return
    newest = max(max(non_cond, default=-1), max(cond, default=-1))
    per_obj = ts.get("output_dict_per_obj", {}).values()

    keep = non_cond_frames_to_keep(non_cond, newest, tracker)
    for t in [t for t in non_cond if t not in keep]:
        del non_cond[t]
        for obj in per_obj:  # per-object views share storage with the batched tensors
            obj["non_cond_frame_outputs"].pop(t, None)
        ts["consolidated_frame_inds"]["non_cond_frame_outputs"].discard(t)

    keep = cond_frames_to_keep(cond, newest, tracker)
    for t in [t for t in cond if t not in keep]:
        del cond[t]
        for obj in per_obj:
            obj["cond_frame_outputs"].pop(t, None)
        # propagate_in_video_preflight asserts that consolidated frames and input frames agree
        ts["consolidated_frame_inds"]["cond_frame_outputs"].discard(t)
        for inputs in (*ts["mask_inputs_per_obj"].values(), *ts["point_inputs_per_obj"].values()):
            inputs.pop(t, None)

    already = ts.get("frames_already_tracked")
    if already:
        # read only for the frame being re-conditioned, which is always the newest
        for t in [t for t in already if t < newest]:
            del already[t]


def held_bytes(root: Any) -> int:
    """Bytes of tensor and array data reachable from `root` (a session state), each storage
    counted once. Python bookkeeping (dicts of floats, lists of ints) is not counted."""
    import dataclasses

    import numpy as np
    import torch

    seen_objects: set[int] = set()
    seen_storage: set[tuple[str, int]] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)) or id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen_storage:
                seen_storage.add(key)
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if isinstance(base, np.ndarray) and id(base) not in seen_objects:
                seen_objects.add(id(base))
                total += base.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "nbytes") and not isinstance(obj, type):  # a LazyFrames
            total += int(obj.nbytes)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            if isinstance(obj, torch.nn.Module):
                continue  # the model's weights are not the session's
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__iter__") and hasattr(obj, "__len__"):
            stack.extend(obj)  # deques
    return total
