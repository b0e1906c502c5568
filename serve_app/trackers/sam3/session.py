"""One video through SAM 3, streamed from the prompts on one frame, as SAM 3's predictor runs it.

Direction. SAM 3's predictor propagates "both" ways by default (sam3_video_predictor.py:
183-225): forward from the prompted frame k to the end, then backward from k - 1 to frame 0,
the second pass continuing the state the first left. With the prompt on frame 0 the backward
pass covers no frames (range(-1, -1, -1), sam3_video_inference.py:242), so a default job is
exactly the forward pass. Frames arrive in that order (frames.LazyFrames.position), one at a
time, and objects that appear later are still found: the detector runs on every frame and
new detections become new objects (allow_new_detections, sam3_video_inference.py:393).

Prompts. SAM 3 holds one text per inference state, so a job's concepts get a state each
(`state_prompts`), stepped in lockstep over the same frames, their outputs merged per frame
with ids made unique (`Merged`). The detector's vision backbone, most of a frame's cost, runs
once per frame for all of them (`SharedBackbone`); the text and detection heads run per
concept. The objects share one max_objects (`Session.cap_settings`). Exemplar boxes are SAM 3's
geometric prompt on the prompt frame (`add_prompt`'s boxes_xywh/box_labels); sam3 0.1.4 takes
one box there (its visual prompt), and several go into the same Prompt the image model gives
its detector for several boxes (`_boxes_prompt`).

Lag. SAM 3 holds each frame's output back until `hotstart_delay` frames (15) have been
processed, to drop objects that turn out to be spurious, and flushes the rest at the last
frame (sam3_video_inference.py:294-314). So the output for frame i leaves once frame
i + hotstart_delay - 1 has been processed, and the detector has already read one frame
beyond it: the tracker's input runs up to hotstart_delay + 1 frames (plus a decoder chunk)
ahead of its output. The pipeline's FrameBuffer keeps those frames for overlays; a video
shorter than the delay comes out all at its end.

The session state is built here rather than by `model.init_state`, which wants a file path
and decodes the whole video onto the device; `_new_state` mirrors it
(sam3_video_inference.py:54-88 and 113-177) with two lazy parts: the frames (LazyFrames)
and the per-frame detector queries (one FindStage per frame, made on demand instead of
num_frames small device tensors allocated up front).

Per-session settings. SAM 3's detection thresholds and object limit are attributes of the
model, which serves many sessions in turn; each step of a session sets them and puts the
previous values back however it ends (`model_settings`). `detection_settings` says
what a job's confidence_threshold and max_objects become.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ContextManager

from serve_app.trackers.sam3 import compat
from serve_app.trackers.sam3.frames import LazyFrames
from serve_app.trackers.sam3.trim import trim_session

log = logging.getLogger(__name__)

# SAM 3 asks more of an object that appears once others are tracked (new_det_thresh 0.7) than
# of the first ones (score_threshold_detection 0.5): it closes 60% of the gap to 1. A job's
# threshold keeps that proportion: 0.5 -> 0.7 (SAM 3's own pair), 0.3 -> 0.58, 0.9 -> 0.94.
NEW_OBJECT_GAP = (1.0 - 0.7) / (1.0 - 0.5)


def detection_settings(threshold: float, max_objects: int) -> dict[str, Any]:
    """SAM 3's model attributes for a session with this confidence threshold and object cap."""
    return {
        "score_threshold_detection": threshold,
        "new_det_thresh": 1.0 - NEW_OBJECT_GAP * (1.0 - threshold),
        "max_num_objects": max_objects,
    }


@contextlib.contextmanager
def model_settings(model: Any, settings: Mapping[str, Any]) -> Iterator[None]:
    """Set model attributes ("name" or "part.name") for the duration of a session; the old
    values always come back."""
    targets = {name: _owner(model, name) for name in settings}
    saved = {name: getattr(owner, attr) for name, (owner, attr) in targets.items()}
    try:
        for name, value in settings.items():
            owner, attr = targets[name]
            setattr(owner, attr, value)
        yield
    finally:
        for name, value in saved.items():
            owner, attr = targets[name]
            setattr(owner, attr, value)


def _owner(model: Any, name: str) -> tuple[Any, str]:
    *parents, attr = name.split(".")
    for part in parents:
        model = getattr(model, part)
    return model, attr


Emit = Callable[[int, dict], None]  # (frame index, SAM 3's post-processed outputs)


class _Stages(Sequence):
    """`input_batch.find_inputs`: the detector query for frame t, made when asked for.

    Every frame's query is the same but for `img_ids`; `text_ids` is one tensor shared by all
    of them, so SAM 3's per-frame writes (`find_inputs[t].text_ids[...] = id` in add_prompt and
    reset_state) keep meaning what they mean. Each `img_ids` is a view of one index tensor made
    on the device at the start: sam3 reads a frame's query several times a frame, and a tensor
    built from a Python list each time was a blocking host-to-device copy each time."""

    def __init__(self, num_frames: int, device) -> None:
        import torch
        from sam3.model.data_misc import FindStage, convert_my_tensors
        from sam3.model.utils.misc import copy_data_to_device

        # The same query sam3_video_inference.py:126-137 builds for each frame.
        template = FindStage(
            img_ids=[0], text_ids=[0], input_boxes=[torch.zeros(258)],
            input_boxes_mask=[torch.empty(0, dtype=torch.bool)], input_boxes_label=[torch.empty(0, dtype=torch.long)],
            input_points=[torch.empty(0, 257)], input_points_mask=[torch.empty(0)], object_ids=[],
        )
        self._template = copy_data_to_device(convert_my_tensors(template), device, non_blocking=True)
        self._num_frames = num_frames
        self._ids = torch.arange(num_frames, dtype=torch.long, device=device)  # made there: no copy

    def __len__(self) -> int:
        return self._num_frames

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self._num_frames))]
        if not -self._num_frames <= t < self._num_frames:
            raise IndexError(t)
        t %= self._num_frames
        return dataclasses.replace(self._template, img_ids=self._ids[t:t + 1])


def _new_state(model, frames: LazyFrames, num_frames: int, height: int, width: int) -> dict:
    import torch
    from sam3.model.data_misc import BatchedDatapoint
    from sam3.model.geometry_encoders import Prompt

    device = model.device
    state: dict[str, Any] = {
        "image_size": model.image_size,
        "num_frames": num_frames,
        "orig_height": height,
        "orig_width": width,
        "constants": {},
        "input_batch": BatchedDatapoint(
            img_batch=frames,
            find_text_batch=["<text placeholder>", "visual"],
            find_inputs=_Stages(num_frames, device),
            find_targets=[None] * num_frames,
            find_metadatas=[None] * num_frames,
        ),
        "previous_stages_out": [None] * num_frames,
        "text_prompt": None,
        "per_frame_raw_point_input": [None] * num_frames,
        "per_frame_raw_box_input": [None] * num_frames,
        "per_frame_visual_prompt": [None] * num_frames,
        "per_frame_geometric_prompt": [None] * num_frames,
        "per_frame_cur_step": [0] * num_frames,
        "visual_prompt_embed": None,
        "visual_prompt_mask": None,
        "tracker_inference_states": [],
        "tracker_metadata": {},
        "feature_cache": {},
        "cached_frame_outputs": {},
        "action_history": [],
        "is_image_only": num_frames == 1,
    }
    state["constants"]["empty_geometric_prompt"] = Prompt(
        box_embeddings=torch.zeros(0, 1, 4, device=device),
        box_mask=torch.zeros(1, 0, device=device, dtype=torch.bool),
        box_labels=torch.zeros(0, 1, device=device, dtype=torch.long),
        point_embeddings=torch.zeros(0, 1, 2, device=device),
        point_mask=torch.zeros(1, 0, device=device, dtype=torch.bool),
        point_labels=torch.zeros(0, 1, device=device, dtype=torch.long),
    )
    return state


@dataclasses.dataclass(frozen=True)
class StatePrompt:
    """What one SAM 3 inference state is prompted with on the prompt frame."""

    concept: int                  # the index of its objects' concept in the job's; -1: boxes alone
    text: str | None              # None: boxes alone (SAM 3's "visual" prompt)
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # x, y, w, h in [0, 1] of the picture
    labels: tuple[bool, ...] = ()  # per box: positive or negative


def state_prompts(concepts: Sequence[str], boxes: Sequence[tuple[tuple[float, float, float, float], bool]] = ()
                  ) -> list[StatePrompt]:
    """A job's concepts and exemplar boxes as SAM 3 inference states. One concept takes every
    box with its text (the exemplars are of it). With several, each concept's state takes the
    negative boxes (what none of them is), and positive boxes get a state of their own with the
    negatives (exemplars of something no text names; concept -1). No concept: one such state."""
    positives = any(label for _, label in boxes)
    everything = (tuple(b for b, _ in boxes), tuple(label for _, label in boxes))
    if len(concepts) <= 1:
        return [StatePrompt(0 if concepts else -1, concepts[0] if concepts else None, *everything)]
    negatives = [b for b, label in boxes if not label]
    states = [StatePrompt(i, text, tuple(negatives), (False,) * len(negatives)) for i, text in enumerate(concepts)]
    if positives:
        states.append(StatePrompt(-1, None, *everything))
    return states


class SharedBackbone:
    """The detector's vision backbone (`detector.backbone.forward_image`) once per frame for all
    of a session's states: installed around each state's step, it keeps the frame's features
    until every state has read them (`users` reads), and at most `most` frames' worth. The
    frame is the one SAM 3 took from the frames last (sam3_image.py:148-163 indexes the frames
    and passes that one picture on), and the same picture gives the same features."""

    def __init__(self, frames: LazyFrames, users: int, most: int = 4) -> None:
        self.frames, self.users, self.most = frames, users, most
        self._memo: OrderedDict[int, list] = OrderedDict()  # frame -> [features, reads left]
        self.passes = 0                                     # backbone passes run

    @contextlib.contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        backbone = model.detector.backbone
        own = vars(backbone).get("forward_image")  # a wrapper already set on the instance, if any
        original = backbone.forward_image

        def forward_image(samples):
            index = self.frames.last_index
            if getattr(samples, "shape", (0,))[0] != 1 or index < 0:
                return original(samples)
            entry = self._memo.get(index)
            if entry is None:
                self.passes += 1
                entry = self._memo[index] = [original(samples), self.users]
                while len(self._memo) > self.most:
                    self._memo.popitem(last=False)
            entry[1] -= 1
            if entry[1] <= 0:
                del self._memo[index]
            return _fresh(entry[0])

        backbone.forward_image = forward_image
        try:
            yield
        finally:
            if own is None:
                del backbone.forward_image
            else:
                backbone.forward_image = own

    def clear(self) -> None:
        self._memo.clear()


def _fresh(value: Any) -> Any:
    """New containers around the same tensors: a state that rearranges what it was given does
    not rearrange another state's."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    return value


@contextlib.contextmanager
def _boxes_prompt(model: Any, count: int) -> Iterator[None]:
    """sam3 0.1.4's add_prompt makes the first box on a fresh frame the frame's visual prompt
    and refuses more than one there (sam3_video_inference.py:178-219). For several, the same
    Prompt carries them all, as the image model's geometric prompt carries several boxes."""
    if count <= 1:
        yield
        return
    from sam3.model.geometry_encoders import Prompt

    def visual_prompt(inference_state, frame_idx, boxes_cxcywh, box_labels):
        prompt = Prompt(box_embeddings=boxes_cxcywh[:, None, :].to(model.device), box_mask=None,
                        box_labels=box_labels[:, None].to(model.device),
                        point_embeddings=None, point_mask=None, point_labels=None)
        inference_state["per_frame_visual_prompt"][frame_idx] = prompt
        return boxes_cxcywh[:0], box_labels[:0], prompt

    model._get_visual_prompt = visual_prompt
    try:
        yield
    finally:
        del model._get_visual_prompt


def _propagation(model: Any, state: dict, start: int, reverse: bool):
    """SAM 3's full propagation from `start` one way. Not through the interactive subclass's
    propagate_in_video: after a first pass that started on the first or the last frame, it
    fetches cached outputs for the second instead of tracking (parse_action_history_for_
    propagation, sam3_video_inference.py:1248-1257), so a prompt on the last frame would leave
    every frame before it empty. The full propagation is what it runs otherwise."""
    from sam3.model.sam3_video_inference import Sam3VideoInference

    return Sam3VideoInference.propagate_in_video(model, state, start_frame_idx=start, max_frame_num_to_track=None,
                                                 reverse=reverse)


class Merged:
    """Several states' outputs for one frame as one: ids made unique across states (an object
    keeps its id for the session; a single state's ids are SAM 3's own), each object's concept
    in `out_concepts`, frame_stats summed."""

    KEYS = ("out_obj_ids", "out_probs", "out_boxes_xywh", "out_binary_masks")

    def __init__(self, prompts: Sequence[StatePrompt]) -> None:
        self.prompts = prompts
        self._ids: dict[tuple[int, int], int] = {}

    def __call__(self, outputs: Sequence[dict]) -> dict:
        import numpy as np

        if len(outputs) == 1:
            out = dict(outputs[0])
            out["out_concepts"] = np.full(len(out["out_obj_ids"]), self.prompts[0].concept, np.int16)
            return out
        merged: dict[str, Any] = {}
        for key in self.KEYS:
            merged[key] = np.concatenate([np.asarray(out[key]) for out in outputs])
        ids = []
        for i, out in enumerate(outputs):
            for local in np.asarray(out["out_obj_ids"]).reshape(-1).tolist():
                ids.append(self._ids.setdefault((i, int(local)), len(self._ids)))
        merged["out_obj_ids"] = np.asarray(ids, np.int64)
        merged["out_concepts"] = np.concatenate(
            [np.full(len(out["out_obj_ids"]), p.concept, np.int16) for p, out in zip(self.prompts, outputs)])
        stats: dict[str, Any] = {}
        for out in outputs:
            for name, value in (out.get("frame_stats") or {}).items():
                if isinstance(value, (int, float, np.number)):
                    stats[name] = stats.get(name, 0) + value
        merged["frame_stats"] = stats
        return merged


class _Run:
    """One inference state of a session and its running propagation."""

    def __init__(self, prompt: StatePrompt, state: dict) -> None:
        self.prompt = prompt
        self.state = state
        self.propagation = None                   # SAM 3's propagate_in_video generator, while it runs
        self.removed_seen: dict[int, int] = {}    # removed object id -> furthest position processed when seen

    def tracked(self) -> int:
        counts = (self.state.get("tracker_metadata") or {}).get("num_obj_per_gpu")
        return 0 if counts is None else int(sum(counts))


class Session:
    """A SAM 3 inference session over one video: one inference state per prompted state
    (StatePrompt). Created, run and closed on the model thread."""

    def __init__(self, model, frames: LazyFrames, num_frames: int, height: int, width: int,
                 trim: bool = True, prompt_frame: int = 0) -> None:
        self.model = model
        self.frames = frames
        self.num_frames = num_frames
        self.height, self.width = height, width
        self.trim = trim
        self.prompt_frame = prompt_frame
        self.emitted = -1                         # the frame emitted last
        self.count = 0                            # frames emitted
        self.runs: list[_Run] = []
        self.shared: SharedBackbone | None = None
        self.state: dict | None = {}              # the first run's state (None once closed)

    def steps(self, prompts: str | Sequence[StatePrompt], emit: Emit, settings: Mapping[str, Any] | None = None,
              around: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[int]:
        """Prompt the prompt frame with `prompts` (a text, or states' prompts) and propagate
        forward, then backward, calling `emit` once per frame in that order with the states'
        outputs merged; yields each emitted frame's index. `settings` are model attributes for
        this session only (`detection_settings`), `around` a context for each step.

        Between two steps the model is free for other sessions (the model thread interleaves
        them): the settings and contexts are entered for one step at a time, never held
        across a yield, so no session sees another's thresholds."""
        if self.state is None:
            raise RuntimeError("session is closed")
        if isinstance(prompts, str):
            prompts = [StatePrompt(0, prompts)]
        model, k = self.model, self.prompt_frame
        settings = dict(settings or {})
        with compat.model_context(model.device):
            self.runs = [_Run(p, _new_state(model, self.frames, self.num_frames, self.height, self.width))
                         for p in prompts]
        self.state = self.runs[0].state
        if len(self.runs) > 1:
            self.shared = SharedBackbone(self.frames, len(self.runs))
        merge = Merged(prompts)

        @contextlib.contextmanager
        def step(run: _Run) -> Iterator[None]:
            shared = self.shared.installed(model) if self.shared else contextlib.nullcontext()
            with compat.model_context(model.device), model_settings(model, self.cap_settings(run, settings)), \
                    around(), shared:
                yield

        for run in self.runs:
            # The prompt runs frame k once; propagation then runs every frame from k, as
            # Sam3VideoPredictor.add_prompt + propagate_in_video do.
            p = run.prompt
            with step(run), _boxes_prompt(model, len(p.boxes)):
                model.add_prompt(run.state, frame_idx=k, text_str=p.text,
                                 boxes_xywh=[list(b) for b in p.boxes] if p.boxes else None,
                                 box_labels=[int(v) for v in p.labels] if p.boxes else None)
        try:
            for reverse in (False, True):
                if reverse and k == 0:
                    break
                for run in self.runs:
                    with step(run):
                        run.propagation = _propagation(model, run.state, k, reverse)
                while True:
                    items = []
                    for run in self.runs:
                        with step(run):
                            items.append(next(run.propagation, None))
                    if all(item is None for item in items):
                        break
                    frames = {None if item is None else item[0] for item in items}
                    if len(frames) != 1:
                        raise RuntimeError(f"SAM 3's states emitted frames {sorted(frames, key=str)} together")
                    frame_idx = items[0][0]
                    if self.frames.position(frame_idx) != self.count:
                        raise RuntimeError(f"SAM 3 emitted frame {frame_idx} after frame {self.emitted}")
                    emit(frame_idx, merge([outputs for _, outputs in items]))
                    self.emitted, self.count = frame_idx, self.count + 1
                    if self.trim:
                        for run in self.runs:
                            trim_session(run.state, model, frame_idx, self._locals(run), run.removed_seen,
                                         position=self.frames.position, reverse=reverse,
                                         backward_from=k if k > 0 else None)
                    yield frame_idx
                self._close_propagations()
        finally:
            self._close_propagations()

    def cap_settings(self, run: _Run, settings: dict[str, Any]) -> dict[str, Any]:
        """A state's settings: the job's max_objects is shared, so a state may add only what the
        others leave (they never exceed it together: each step keeps the sum within it)."""
        most = settings.get("max_num_objects")
        if most is None or len(self.runs) == 1:
            return settings
        others = sum(r.tracked() for r in self.runs if r is not run)
        return {**settings, "max_num_objects": max(0, int(most) - others)}

    def _close_propagations(self) -> None:
        with compat.model_context(self.model.device):
            for run in self.runs:
                if run.propagation is not None:
                    run.propagation.close()  # its buffers go now, inside the model's context
                    run.propagation = None
        if self.shared is not None:
            self.shared.clear()

    def propagation_locals(self) -> dict[str, Any]:
        """The first state's running propagate_in_video's variables (`_locals`)."""
        return self._locals(self.runs[0]) if self.runs else {}

    @staticmethod
    def _locals(run: _Run) -> dict[str, Any]:
        """The variables of SAM 3's running propagate_in_video (sam3_video_inference.py:249-356):
        its 15-frame `hotstart_buffer` of outputs (masks on the device) and per-frame
        bookkeeping live there, not in the session state. Empty when not running."""
        gen, seen = run.propagation, 0
        while gen is not None and seen < 8:  # torch's inference_mode wrapper, the subclass, the base
            frame = getattr(gen, "gi_frame", None)
            if frame is None:
                return {}
            variables = frame.f_locals
            if "hotstart_buffer" in variables:
                return {k: v for k, v in variables.items() if k != "self"}
            gen = getattr(gen, "gi_yieldfrom", None) or variables.get("gen")
            seen += 1
        return {}

    def held(self) -> dict[str, Any]:
        """Everything this session holds, for measuring it (trim.held_bytes)."""
        return {"states": [r.state for r in self.runs], "propagation": [self._locals(r) for r in self.runs],
                "frames": self.frames}

    def close(self) -> None:
        """Drop every reference to the session's tensors and give the memory back."""
        if self.state is None:
            return
        self._close_propagations()
        for run in self.runs:
            run.state.clear()
        self.runs = []
        self.state = None
        self.shared = None
        self.frames.close()
        gc.collect()  # the state is full of reference cycles (per-object views of batched tensors)
        if self.model.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
