"""The SAM 3 tracker for tests and benchmarks: random weights, pinned decisions, records.

`InstrumentedSam3Tracker` is a Sam3Tracker that can be built with random weights (the real
architecture, meaningless outputs: no checkpoint needed), instrumented through the tracker's
hooks (`Instruments`, a trackers.sam3.tracker.Sam3Hooks). After every emitted frame of its
latest job it records everything the session holds (tensors on any device, the hotstart buffer
inside SAM 3's generator, and the Python bookkeeping), the objects SAM 3 tracks and the GPU
memory allocated (`frame_log`); `sessions_alive()` counts SAM 3 sessions in memory; `model` is
the model, for reading its settings while no job runs.

Options:
- `compile_backend`, `compile_parts`, `pad_objects`: compile on a CPU with any torch.compile
  backend (a counting one), only some parts, or without padding object batches;
- `memory_attention_layers`: keep only the first N layers of the tracker's memory attention
  (the same code at a smaller depth; its cost on a CPU is per layer);
- `memo_detector`: the detector (backbone, encoder, decoder, heads) is a pure function of the
  frame's pixels and the prompt, so its output is memoized by their content: a clip that
  cycles a few distinct frames costs a few detector passes on a CPU, and every tracker step
  still runs. Exact, not an approximation: the same input gives the same output;
- `record_tracker`: keep, per tracker step of the latest job, the tracker's mask logits and
  object score logits before anything is decided on them (`tracker_log`): what the memory it
  read gives;
- `pins` (`Pins`): what SAM 3 decides by, set exactly. Random weights score differently on
  different CPUs (bf16 kernels round differently on AVX2 and AVX-512), so a test that depends
  on which proposals pass a threshold, which objects are born or removed, or which frames
  memory selection keeps, pins those quantities instead of hoping where random weights land.
"""

from __future__ import annotations

import gc
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.loading import WeightsSource
from serve_app.trackers.sam3.tracker import Sam3Hooks, Sam3Tracker

ABSENT_LOGIT = -8.0  # a query that sees nothing: p 0.0003, below every threshold but 0
MASK_LOGIT = 8.0     # inside a pinned mask (and minus it outside): far from the 0 every mask is cut at
_BIRTH_MASKS = "testkit_birth_masks"  # on each SAM 3 tracker state: obj id -> the mask it was born with


@dataclass(frozen=True)
class FrameRecord:
    frame: int
    held_bytes: int          # everything the session holds (trim.held_bytes of Session.held())
    tensor_bytes: int        # of which tensor/array data
    objects_tracked: int     # SAM 3's frame_stats["num_obj_tracked"] (before hiding any)
    cuda_allocated: int      # torch.cuda.memory_allocated() on a GPU, else 0
    buffered: int            # frames in SAM 3's hotstart buffer (processed, not yet emitted)


@dataclass(frozen=True)
class Detection:
    """One detector query, pinned: its score logit on every frame but the `absent` ones (there:
    ABSENT_LOGIT), and its mask on every frame, a box (x0, y0, x1, y1) in fractions of the mask."""

    logit: float
    box: tuple[float, float, float, float]
    absent: frozenset[int] = frozenset()

    @property
    def probability(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.logit))


@dataclass(frozen=True)
class Pins:
    """What SAM 3 decides by, set exactly (choose bf16-exact values well away from thresholds):

    - the detector's output: query i is `detections[i]`, the others score ABSENT_LOGIT with empty
      masks. So which proposals pass a threshold, which become objects (best first, up to
      max_num_objects) and their scores (`out_probs`) are the declared ones;
    - each track's mask, on every frame, is the mask it was born with (the detection's). SAM 3
      associates detections with tracks by mask IoU (sam3_video_base.py `_associate_det_trk`,
      against assoc_iou_thresh and trk_assoc_iou_thresh), so with disjoint boxes a present
      detection matches its own object and nothing else, and an object whose detection is
      absent is unmatched: hotstart removals (`_process_hotstart`) and births follow from the
      detections alone;
    - the tracker's object-score head gives `object_score` and its IoU head sigmoid(`iou_logit`)
      for every object (weights zeroed, biases set): every object is present, so its mask is kept
      and every frame's eff_iou_score (sam3_tracker_base.py `cal_mem_score`) passes mf_threshold:
      memory selection (`frame_filter`) reaches back as far as it may, and ties in the IoU pick
      the first mask.
    The tracker's own mask logits are still computed from the memory it read (and recorded by
    `record_tracker`); only what SAM 3 decides from them is pinned.
    """

    detections: tuple[Detection, ...]
    object_score: float = 2.0
    iou_logit: float = 0.0


class Instruments(Sam3Hooks):
    """The hooks InstrumentedSam3Tracker gives its Sam3Tracker: pins, memo and records."""

    def __init__(self, *, compile_backend: Any = None, compile_parts: tuple[str, ...] | None = None,
                 pad_objects: bool = True, memo_detector: bool = False, record_tracker: bool = False,
                 memory_attention_layers: int | None = None, pins: Pins | None = None) -> None:
        self.compile_options: dict[str, Any] = {}
        if compile_backend is not None:
            self.compile_options["backend"] = compile_backend
        if compile_parts is not None:
            self.compile_options["parts"] = compile_parts
        if not pad_objects:
            self.compile_options["pad"] = False
        self.memo_detector, self.record_tracker, self.pins = memo_detector, record_tracker, pins
        self.memory_attention_layers = memory_attention_layers
        self.model: Any = None
        self.detector_passes = 0
        self.frame_log: list[FrameRecord] = []
        self.tracker_log: list[tuple[int, Any, Any]] = []  # (frame, mask logits, object score logits)

    def on_build(self, model) -> None:
        self.model = model
        if self.memo_detector:
            memoize_detector(model, self)
        if self.pins:
            _pin_detector(model, self.pins.detections)
            _pin_tracker_heads(model, self.pins)
            _keep_birth_masks(model)
        if self.record_tracker or self.pins:
            _wrap_tracker_propagation(model, self)
        if self.memory_attention_layers:
            encoder = model.tracker.transformer.encoder
            encoder.layers = encoder.layers[:self.memory_attention_layers]
            encoder.num_layers = len(encoder.layers)

    def after_frame(self, session, outputs: dict) -> None:
        from serve_app.trackers.sam3.trim import held

        roots = session.held()
        tensors, python = held(roots)
        tracked = int((outputs.get("frame_stats") or {}).get("num_obj_tracked", 0))
        buffered = len(roots["propagation"].get("hotstart_buffer") or ())
        self.frame_log.append(FrameRecord(session.emitted, tensors + python, tensors, tracked,
                                          _cuda_allocated(session.model.device), buffered))


class InstrumentedSam3Tracker(Sam3Tracker):
    def __init__(self, config: Sam3Config = Sam3Config(), random_weights: bool = False, **options: Any) -> None:
        self.instruments = Instruments(**options)
        self.warm_up_objects: dict[str, int] = {}  # objects each warm-up clip tracked
        super().__init__(config, WeightsSource(random=True) if random_weights else None, self.instruments)

    @property
    def model(self):
        return self.instruments.model

    @property
    def frame_log(self) -> list[FrameRecord]:
        return self.instruments.frame_log

    @property
    def tracker_log(self) -> list[tuple[int, Any, Any]]:
        return self.instruments.tracker_log

    def _warm_clip(self, label, width, height, n, settings) -> float:
        seconds = super()._warm_clip(label, width, height, n, settings)
        self.warm_up_objects[label] = self.last_job.get("tracked", 0)
        return seconds

    def _track(self, chunks, info, prompt, settings) -> Iterator[Detections]:
        self.instruments.frame_log, self.instruments.tracker_log = [], []
        yield from super()._track(chunks, info, prompt, settings)

    def track_forced(self, chunks: Iterable[FrameChunk], info: VideoInfo, objects: int,
                     prompt: str = "coloured shapes") -> Iterator[Detections]:
        """Track with exactly `objects` objects from frame 0 whatever the weights (the
        warm-up's settings: every proposal passes, the best are kept, none is removed)."""
        from serve_app.trackers.sam3.tracker import forced_objects

        yield from self._track(chunks, info, prompt, forced_objects(objects))

    @staticmethod
    def sessions_alive() -> int:
        """SAM 3 sessions still reachable anywhere in the process (0 between jobs)."""
        from serve_app.trackers.sam3.session import Session

        gc.collect()
        return sum(isinstance(o, Session) for o in gc.get_objects())


def _digest(tensor) -> str:
    return hashlib.sha1(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def memoize_detector(model, owner: Any) -> None:
    """Memoize `detector.forward_grounding` (one frame through the detector) by the frame's
    pixels and the prompt's text features, keeping only what sam3 reads of its output
    (sam3_image.py:820-866), cloned, so no session's state is held. `owner.detector_passes`
    counts the passes that ran."""
    from sam3.perflib.compile import recursive_clone

    detector = model.detector
    original = detector.forward_grounding
    cache: dict[tuple[str, ...], dict] = {}

    def forward_grounding(backbone_out, find_input, find_target, geometric_prompt):
        frame = backbone_out["img_batch_all_stages"][int(find_input.img_ids.reshape(-1)[0])]
        text = tuple(_digest(v) for k, v in sorted(backbone_out.items()) if k.startswith("language_"))
        key = (_digest(frame), *text)
        if key not in cache:
            owner.detector_passes += 1
            out = original(backbone_out, find_input, find_target, geometric_prompt)
            tracker_feats = out["prev_encoder_out"]["backbone_out"]["sam2_backbone_out"]
            cache[key] = recursive_clone({
                **{k: out[k] for k in ("pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks")},
                "prev_encoder_out": {"backbone_out": {"sam2_backbone_out": {
                    "backbone_fpn": list(tracker_feats["backbone_fpn"]),
                    "vision_pos_enc": list(tracker_feats["vision_pos_enc"])}}},
            })
        return recursive_clone(cache[key])  # sam3 edits pred_logits in place (NMS)

    detector.forward_grounding = forward_grounding

    encode_text = detector.backbone.forward_text
    texts: dict[tuple[str, ...], dict] = {}

    def forward_text(captions, *args, **kwargs):  # the prompt alone decides it
        key = tuple(captions)
        if key not in texts:
            texts[key] = recursive_clone(encode_text(captions, *args, **kwargs))
        return recursive_clone(texts[key])

    detector.backbone.forward_text = forward_text


def _pin_detector(model, detections: tuple[Detection, ...]) -> None:
    """Replace the scores and masks `detector.forward_grounding` gives (Pins)."""
    import torch

    detector = model.detector
    original = detector.forward_grounding
    made: dict[frozenset[int], tuple[Any, Any]] = {}  # absent queries -> (logits, masks)

    def forward_grounding(backbone_out, find_input, find_target, geometric_prompt):
        out = original(backbone_out, find_input, find_target, geometric_prompt)
        frame = int(find_input.img_ids.reshape(-1)[0])
        absent = frozenset(i for i, d in enumerate(detections) if frame in d.absent)
        if absent not in made:
            logits = torch.full_like(out["pred_logits"], ABSENT_LOGIT)  # (1, queries, 1)
            masks = torch.full_like(out["pred_masks"], -MASK_LOGIT)     # (1, queries, h, w)
            height, width = masks.shape[-2:]
            for i, d in enumerate(detections):
                logits[0, i, 0] = ABSENT_LOGIT if i in absent else d.logit
                x0, y0, x1, y1 = d.box
                masks[0, i, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = MASK_LOGIT
            made[absent] = logits, masks
        logits, masks = made[absent]
        return {**out, "pred_logits": logits.clone(), "pred_masks": masks.clone()}  # sam3 edits in place

    detector.forward_grounding = forward_grounding


def _pin_tracker_heads(model, pins: Pins) -> None:
    import torch

    decoder = model.tracker.sam_mask_decoder
    with torch.no_grad():
        for layer, value in ((decoder.pred_obj_score_head.layers[-1], pins.object_score),
                             (decoder.iou_prediction_head.layers[-1], pins.iou_logit)):
            layer.weight.zero_()
            layer.bias.fill_(value)


def _keep_birth_masks(model) -> None:
    """Keep on each tracker state the mask each of its objects was born with."""
    original = model._tracker_add_new_objects

    def _tracker_add_new_objects(**kwargs):
        states = original(**kwargs)
        born = zip(kwargs["new_obj_ids"], kwargs["new_obj_masks"], strict=True)
        states[-1][_BIRTH_MASKS] = {int(obj_id): mask > 0 for obj_id, mask in born}
        return states

    model._tracker_add_new_objects = _tracker_add_new_objects


def _wrap_tracker_propagation(model, owner: Instruments) -> None:
    """Record the tracker's masks and scores for each step (record_tracker), then give SAM 3
    each object's birth mask instead of the tracker's (Pins)."""
    import torch

    original = model.run_tracker_propagation

    def run_tracker_propagation(*args, **kwargs):
        masks, scores = original(*args, **kwargs)
        if owner.record_tracker:
            owner.tracker_log.append((kwargs.get("frame_idx"), masks.detach().float().cpu().clone(),
                                      scores.detach().float().cpu().clone()))
        if owner.pins:  # rows in the order SAM 3 concatenates its states' objects
            born = [s[_BIRTH_MASKS][int(o)] for s in kwargs["tracker_states_local"] for o in s["obj_ids"]]
            if born:
                inside = torch.stack(born)
                assert inside.shape == masks.shape, (inside.shape, masks.shape)
                masks = torch.where(inside, MASK_LOGIT, -MASK_LOGIT).to(masks.dtype)
        return masks, scores

    model.run_tracker_propagation = run_tracker_propagation


def _cuda_allocated(device) -> int:
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated(device))
