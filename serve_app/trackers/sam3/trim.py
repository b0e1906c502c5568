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

Removing an object from a tracker state that holds several re-scores that state's past frames
(sam3_tracking_predictor `remove_object`, `_slice_state`), which could bring a dropped frame
back into the selection; but SAM 3 removes only objects younger than `hotstart_delay` (15),
and a state holds objects born on the same frame, so all its frames lie inside the window
(16): nothing dropped is ever read.

Memory selection reads each frame's `eff_iou_score`, a scalar on the model's device, and so
does this. Compared where it lies, every comparison is a host sync (up to 15 per tracker state
per frame, in sam3's frame_filter and here alike). So each score is brought to the host once, a
step after it is written (`host_scores`: one batched copy per state per step, not waited for),
and put back in place as a 0-dim CPU tensor of the same dtype, which both compare exactly as
before without waiting for the GPU. Until its copy has landed a frame is kept and not counted.

Objects removed during hotstart are also forgotten once every frame that could show them has
been emitted (`forget_removed`): SAM 3 keeps their ids and per-object bookkeeping for the
session's life and deep-copies that bookkeeping on every frame (sam3_video_base.py:586). And
SAM 3's generator keeps one entry per frame in `unconfirmed_obj_ids_per_frame`; entries of
emitted frames are never read again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PENDING = "serve_app_pending_scores"  # on each tracker state: score copies to the host under way
Position = Callable[[int], int]  # a frame's place in the order a session emits frames


def trim_session(state: dict, model: Any, emitted: int, propagation: dict | None = None,
                 removed_seen: dict[int, int] | None = None, *, position: Position = int,
                 reverse: bool = False, backward_from: int | None = None) -> None:
    """Trim `state` (a SAM 3 video inference state) after frame `emitted` was emitted.
    `propagation` is the running propagate_in_video's variables (Session.propagation_locals),
    `removed_seen` this session's record for `forget_removed`. `position` places a frame in the
    order the session emits them (frames.LazyFrames.position; a forward-only session's is the
    index itself), `reverse` says the running pass goes backward, and `backward_from` is the
    prompt frame while a forward pass runs that a backward pass will follow."""
    done = position(emitted)
    trim_frame_caches(state, emitted, model.hotstart_unmatch_thresh, model.hotstart_dup_thresh, position)
    for tracker_state in state.get("tracker_inference_states", ()):
        trim_tracker_state(tracker_state, model.tracker, reverse, backward_from)
    if propagation:
        _drop_done(propagation.get("unconfirmed_obj_ids_per_frame"), done, position)
        if removed_seen is not None:
            forget_removed(state, propagation, emitted, removed_seen, position)


def forget_removed(state: dict, propagation: dict, emitted: int, removed_seen: dict[int, int],
                   position: Position = int) -> None:
    """Drop what SAM 3 keeps about objects it removed, once the frame where each was removed
    has been emitted: later frames do not hold them, and no check reads them again
    (`_process_hotstart` skips removed ids; new objects get new ids)."""
    metadata = state.get("tracker_metadata") or {}
    rank0 = metadata.get("rank0_metadata")
    if not rank0:
        return
    pending = [f for f, _ in propagation.get("hotstart_buffer") or ()]
    pending += [f for f, _ in propagation.get("yield_list") or ()]
    newest = max(map(position, [emitted, *pending]))  # the furthest frame processed so far
    for obj_id in rank0.get("removed_obj_ids", ()):
        removed_seen.setdefault(obj_id, newest)
    for obj_id in [o for o, seen in removed_seen.items() if seen <= position(emitted)]:
        del removed_seen[obj_id]
        rank0["removed_obj_ids"].discard(obj_id)
        for key in ("obj_first_frame_idx", "unmatched_frame_inds", "trk_keep_alive"):
            rank0.get(key, {}).pop(obj_id, None)
        pairs = rank0.get("overlap_pair_to_frame_inds", {})
        for pair in [p for p in pairs if obj_id in p]:
            del pairs[pair]  # a pair with a removed object gets no new frames, so it decides nothing
        metadata.get("obj_id_to_score", {}).pop(obj_id, None)
        hidden = propagation.get("hotstart_removed_obj_ids")
        if hidden is not None:
            hidden.discard(obj_id)


def _drop_done(mapping: dict | None, done: int, position: Position) -> None:
    """Drop the entries of frames at or before position `done` (frames emitted)."""
    if mapping:
        for key in [k for k in mapping if position(k) <= done]:
            del mapping[key]


def _keep_last(lists: dict | None, count: int) -> None:
    for frames in (lists or {}).values():
        if count > 0:
            del frames[:-count]
        else:
            frames.clear()  # `len(x) >= 0` holds for an empty list too


def trim_frame_caches(state: dict, emitted: int, unmatch_thresh: int, dup_thresh: int,
                      position: Position = int) -> None:
    done = position(emitted)
    _drop_done(state.get("cached_frame_outputs"), done, position)
    metadata = state.get("tracker_metadata") or {}
    _drop_done(metadata.get("obj_id_to_tracker_score_frame_wise"), done, position)
    rank0 = metadata.get("rank0_metadata") or {}
    _drop_done(rank0.get("suppressed_obj_ids"), done, position)
    _keep_last(rank0.get("unmatched_frame_inds"), unmatch_thresh)
    _keep_last(rank0.get("overlap_pair_to_frame_inds"), dup_thresh)


def _window(tracker: Any) -> int:
    stride = max(1, int(getattr(tracker, "memory_temporal_stride_for_eval", 1)))
    return max(int(tracker.max_obj_ptrs_in_encoder), stride * int(tracker.num_maskmem))


def _forward(t: int) -> int:
    return t


def _backward(t: int) -> int:
    return -t


def non_cond_frames_to_keep(non_cond: dict, newest: int, tracker: Any, key: Position = _forward) -> set[int]:
    """The non-conditioning frames a frame after `newest` can read, tracking in the direction
    `key` orders by (`_forward`: by index; `_backward`: index descending), `newest` in its terms."""
    keep = {t for t in non_cond if newest - _window(tracker) < key(t) <= newest}
    if getattr(tracker, "use_memory_selection", False):
        wanted = int(tracker.max_obj_ptrs_in_encoder) - 1
        picked = 0
        for t in sorted((t for t in non_cond if key(t) <= newest), key=key, reverse=True):
            if picked >= wanted:
                break
            score = non_cond[t].get("eff_iou_score")
            if score is None:
                continue
            if _on_device(score):  # not on the host yet (host_scores): keep it, decide later
                keep.add(t)
            elif bool(score > tracker.mf_threshold):  # frame_filter's comparison, in the score's dtype
                keep.add(t)
                picked += 1
    return keep


def host_scores(ts: dict) -> None:
    """Replace the device scores of a tracker state's non-conditioning frames by host copies:
    the copies started last time that have landed go in, and the scores still on the device
    are copied, batched and without waiting. A score sam3 recomputes (`_slice_state` after a
    removal) is a new device tensor and is copied again."""
    non_cond = ts["output_dict"]["non_cond_frame_outputs"]
    pending = ts.setdefault(PENDING, [])
    for entry in list(pending):
        frames, sources, host, ready = entry
        if not ready():
            continue
        pending.remove(entry)
        values = host.clone()  # out of pinned memory, which the allocator wants back
        for i, (t, source) in enumerate(zip(frames, sources)):
            out = non_cond.get(t)
            if out is not None and out.get("eff_iou_score") is source:
                out["eff_iou_score"] = values[i]
    under_way = {id(s) for _, sources, _, _ in pending for s in sources}
    frames = [t for t, out in non_cond.items()
              if _on_device(out.get("eff_iou_score")) and id(out["eff_iou_score"]) not in under_way]
    if frames:
        sources = [non_cond[t]["eff_iou_score"] for t in frames]
        pending.append((frames, sources, *_start_copy(sources)))


def _on_device(score: Any) -> bool:
    return getattr(getattr(score, "device", None), "type", "cpu") != "cpu"


def _start_copy(sources: list) -> tuple[Any, Callable[[], bool]]:
    """One copy of these scalars to pinned host memory, queued behind the work that makes them;
    returns the host tensor and whether the copy has landed."""
    import torch

    stacked = torch.stack([s.reshape(()) for s in sources])
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event.query


def cond_frames_to_keep(cond: dict, newest: int, tracker: Any, key: Position = _forward) -> set[int]:
    """The conditioning frames `select_closest_cond_frames` can choose for a frame after
    `newest` in the direction `key` orders by: the first in that order, the closest ones, and
    any inside the memory window (read there as unselected conditioning frames)."""
    limit = int(tracker.max_cond_frames_in_attn)
    if limit < 0 or len(cond) <= limit + 1:
        return set(cond)
    ordered = sorted(cond, key=key)
    keep = {ordered[0], *ordered[-limit:]}
    keep.update(t for t in ordered if newest - _window(tracker) < key(t) <= newest)
    return keep


def trim_tracker_state(ts: dict, tracker: Any, reverse: bool = False, backward_from: int | None = None) -> None:
    """Drop a tracker state's outputs on frames no later frame can attend to. A backward pass
    (`reverse`) reads the frames after the one it tracks; while a forward pass runs that a
    backward pass from `backward_from` (the prompt frame) will follow, what that pass's first
    frame will read (the first window after the prompt frame, its first conditioning frames)
    is kept too."""
    outputs = ts["output_dict"]
    non_cond, cond = outputs["non_cond_frame_outputs"], outputs["cond_frame_outputs"]
    if not non_cond and not cond:
        return
    key = _backward if reverse else _forward
    newest = max(map(key, (*non_cond, *cond)))
    readers = [(key, newest)]
    if backward_from is not None and not reverse:
        readers.append((_backward, -(backward_from - 1)))  # the backward pass's first frame
    per_obj = ts.get("output_dict_per_obj", {}).values()
    host_scores(ts)

    keep = set().union(*(non_cond_frames_to_keep(non_cond, n, tracker, k) for k, n in readers))
    for t in [t for t in non_cond if t not in keep]:
        del non_cond[t]
        for obj in per_obj:  # per-object views share storage with the batched tensors
            obj["non_cond_frame_outputs"].pop(t, None)
        ts["consolidated_frame_inds"]["non_cond_frame_outputs"].discard(t)

    keep = set().union(*(cond_frames_to_keep(cond, n, tracker, k) for k, n in readers))
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
        for t in [t for t in already if key(t) < newest]:
            del already[t]


def held_bytes(root: Any) -> int:
    """Bytes reachable from `root` (a session's `held()`): tensor and array data, each storage
    counted once, on whatever device, plus the Python objects around them (dicts, lists,
    sets, numbers, strings). The model's weights (nn.Modules) are not the session's."""
    tensors, python = held(root)
    return tensors + python


def held(root: Any) -> tuple[int, int]:
    """(tensor and array bytes, Python object bytes) reachable from `root`; see held_bytes."""
    import dataclasses
    import types

    import numpy as np
    import torch

    seen_objects: set[int] = set()
    seen_storage: set[tuple[str, int]] = set()
    tensors = python = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen_storage:
                seen_storage.add(key)
                tensors += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            python += sys.getsizeof(obj) - (obj.nbytes if obj.base is None else 0)
            if isinstance(base, np.ndarray) and (base is obj or id(base) not in seen_objects):
                seen_objects.add(id(base))
                tensors += base.nbytes
        elif isinstance(obj, (str, bytes, int, float, bool, range, np.generic, torch.device, torch.dtype)):
            python += sys.getsizeof(obj)
        elif isinstance(obj, dict):
            python += sys.getsizeof(obj)
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            python += sys.getsizeof(obj)
            stack.extend(obj)
        elif isinstance(obj, (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType,
                              types.BuiltinFunctionType)):
            continue  # the model and code are not the session's
        elif hasattr(obj, "nbytes") and not isinstance(obj, type):  # a LazyFrames
            tensors += int(obj.nbytes)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            python += sys.getsizeof(obj)
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__iter__") and hasattr(obj, "__len__"):
            python += sys.getsizeof(obj)
            stack.extend(obj)  # deques
    return tensors, python
