"""One video through SAM 3, streamed forward from a text prompt on frame 0.

Direction. SAM 3's predictor propagates "both" ways by default: forward from the prompted
frame, then backward from it. With the prompt on frame 0 the backward pass covers no frames
(its processing order is range(-1, -1, -1), sam3_video_inference.py:242), so "both" from
frame 0 is exactly the forward pass. That is what runs here, one frame at a time as frames
arrive, and objects that appear later are still found: the detector runs on every frame and
new detections become new objects (allow_new_detections, sam3_video_inference.py:393).

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


class Session:
    """A SAM 3 inference session over one video. Created, run and closed on the model thread."""

    def __init__(self, model, frames: LazyFrames, num_frames: int, height: int, width: int,
                 trim: bool = True) -> None:
        self.model = model
        self.frames = frames
        self.num_frames = num_frames
        self.trim = trim
        self.emitted = -1
        self._propagation = None               # SAM 3's propagate_in_video generator, while it runs
        self._removed_seen: dict[int, int] = {}  # removed object id -> newest frame processed when seen
        with compat.model_context(model.device):
            self.state: dict | None = _new_state(model, frames, num_frames, height, width)

    def steps(self, prompt: str, emit: Emit, settings: Mapping[str, Any] | None = None,
              around: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[int]:
        """Prompt frame 0 with `prompt` and propagate forward, calling `emit` once per frame in
        order; yields each emitted frame's index. `settings` are model attributes for this
        session only (`detection_settings`), `around` a context for each step.

        Between two steps the model is free for other sessions (the model thread interleaves
        them): the settings and contexts are entered for one step at a time, never held
        across a yield, so no session sees another's thresholds."""
        model, state = self.model, self.state
        if state is None:
            raise RuntimeError("session is closed")

        @contextlib.contextmanager
        def step() -> Iterator[None]:
            with compat.model_context(model.device), model_settings(model, settings or {}), around():
                yield

        with step():
            # The prompt runs frame 0 once; propagation then runs every frame from 0, as
            # Sam3VideoPredictor.add_prompt + propagate_in_video do.
            model.add_prompt(state, frame_idx=0, text_str=prompt)
            self._propagation = model.propagate_in_video(
                state, start_frame_idx=0, max_frame_num_to_track=self.num_frames, reverse=False
            )
        try:
            while True:
                with step():
                    item = next(self._propagation, None)
                    if item is None:
                        break
                    frame_idx, outputs = item
                    if frame_idx != self.emitted + 1:
                        raise RuntimeError(f"SAM 3 emitted frame {frame_idx} after frame {self.emitted}")
                    emit(frame_idx, outputs)
                    self.emitted = frame_idx
                    if self.trim:
                        trim_session(state, model, frame_idx, self.propagation_locals(), self._removed_seen)
                yield frame_idx
        finally:
            with compat.model_context(model.device):
                self._propagation.close()  # its buffers go now, inside the model's context
            self._propagation = None

    def propagation_locals(self) -> dict[str, Any]:
        """The variables of SAM 3's running propagate_in_video (sam3_video_inference.py:249-356):
        its 15-frame `hotstart_buffer` of outputs (masks on the device) and per-frame
        bookkeeping live there, not in the session state. Empty when not running."""
        gen, seen = self._propagation, 0
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
        return {"state": self.state, "propagation": self.propagation_locals(), "frames": self.frames}

    def close(self) -> None:
        """Drop every reference to the session's tensors and give the memory back."""
        if self.state is None:
            return
        self.state.clear()
        self.state = None
        self.frames.close()
        gc.collect()  # the state is full of reference cycles (per-object views of batched tensors)
        if self.model.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
