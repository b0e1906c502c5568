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
- `memory_attention_layers`, `backbone_blocks`, `text_layers`: keep only the first N layers of the
  tracker's memory attention, blocks of the detector's ViT, or layers of the text encoder (the
  same code at a smaller depth, `shrink`; its cost on a CPU is per layer);
- `memo_detector`: the detector (backbone, encoder, decoder, heads) is a pure function of the
  frame's pixels and the prompt (text and boxes), so its output is memoized by their content: a clip that
  cycles a few distinct frames costs a few detector passes on a CPU, and every tracker step
  still runs. Exact, not an approximation: the same input gives the same output;
- `record_tracker`: keep, per tracker step of the latest job, the tracker's mask logits and
  object score logits before anything is decided on them (`tracker_log`): what the memory it
  read gives;
- `present_objects`: the tracker's object-score and IoU heads answer as a trained model's do on
  a clear scene (as `Pins` sets them, without pinning the detector): every tracked object is
  present on every frame and every frame's memory score passes memory selection's threshold, so
  memory attention reads the full window. Untrained, the tracker scores every object absent and
  `frame_filter` keeps only the previous frame: a third of the memory keys, and fps overstated.
  Cost is what this is for: the heads' matrices are zeroed, not skipped;
- `count_memory`: record, per frame, how many earlier frames memory selection chose and how far
  back the oldest lies (`memory_frames`, `memory_read()`); a dict write per frame, no device work;
- `measure_frames`: the emitted frames after which the session is walked for `frame_log` (None,
  the default: every frame; empty: none, for timed clips, where the walk is what would be timed);
- `pins` (`Pins`): what SAM 3 decides by, set exactly. Random weights score differently on
  different CPUs (bf16 kernels round differently on AVX2 and AVX-512), so a test that depends
  on which proposals pass a threshold, which objects are born or removed, or which frames
  memory selection keeps, pins those quantities instead of hoping where random weights land.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import time
from collections.abc import Callable, Container, Iterable, Iterator
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
    ABSENT_LOGIT), and its mask on every frame, a box (x0, y0, x1, y1) in fractions of the mask;
    with `texts`, only for those prompts (so several concepts find different objects)."""

    logit: float
    box: tuple[float, float, float, float]
    absent: frozenset[int] = frozenset()
    texts: frozenset[str] | None = None  # the text prompts it answers ("visual": boxes alone); None: all

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
                 memory_attention_layers: int | None = None, backbone_blocks: int | None = None,
                 text_layers: int | None = None, pins: Pins | None = None, present_objects: bool = False, count_memory: bool = False,
                 measure_frames: Container[int] | None = None) -> None:
        self.compile_options: dict[str, Any] = {}
        if compile_backend is not None:
            self.compile_options["backend"] = compile_backend
        if compile_parts is not None:
            self.compile_options["parts"] = compile_parts
        if not pad_objects:
            self.compile_options["pad"] = False
        self.memo_detector, self.record_tracker, self.pins = memo_detector, record_tracker, pins
        self.pin_detector = True  # False: the pinned model's detector gives its own outputs (for a job)
        self.shrink = {"backbone_blocks": backbone_blocks, "memory_attention_layers": memory_attention_layers,
                       "text_layers": text_layers}
        self.present_objects, self.count_memory, self.measure_frames = present_objects, count_memory, measure_frames
        self.model: Any = None
        self.detector_passes = 0
        self.frame_log: list[FrameRecord] = []
        self.tracker_log: list[tuple[int, Any, Any]] = []  # (frame, mask logits, object score logits)
        self.memory_frames: dict[int, tuple[int, int]] = {}  # frame -> (frames chosen, oldest's distance)

    def on_build(self, model) -> None:
        self.model = model
        self.built_at = time.perf_counter()  # the model is built; compiling comes with the first clip
        if self.memo_detector:
            memoize_detector(model, self)
        if self.pins:
            _pin_detector(model, self.pins.detections, self)
            _pin_tracker_heads(model, self.pins.object_score, self.pins.iou_logit)
            _keep_birth_masks(model)
        elif self.present_objects:
            _pin_tracker_heads(model, Pins.object_score, Pins.iou_logit)
        if self.count_memory:
            count_memory(model, self.memory_frames)
        if self.record_tracker or self.pins:
            _wrap_tracker_propagation(model, self)
        shrink(model, **self.shrink)

    def after_frame(self, session, outputs: dict) -> None:
        if self.measure_frames is not None and session.emitted not in self.measure_frames:
            return
        from serve_app.trackers.sam3.trim import held

        roots = session.held()
        tensors, python = held(roots)
        tracked = int((outputs.get("frame_stats") or {}).get("num_obj_tracked", 0))
        buffered = max((len(p.get("hotstart_buffer") or ()) for p in roots["propagation"]), default=0)
        self.frame_log.append(FrameRecord(session.emitted, tensors + python, tensors, tracked,
                                          _cuda_allocated(session.model.device), buffered))


class InstrumentedSam3Tracker(Sam3Tracker):
    """`on_warm_clip(label, seconds, objects tracked)` is called after each warm-up clip (the
    warm-up runs inside the constructor when the config says so)."""

    def __init__(self, config: Sam3Config = Sam3Config(), random_weights: bool = False,
                 on_warm_clip: Callable[[str, float, int], None] | None = None, **options: Any) -> None:
        self.instruments = Instruments(**options)
        self.warm_up_objects: dict[str, int] = {}  # objects each warm-up clip tracked
        self.on_warm_clip = on_warm_clip
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
        if self.on_warm_clip is not None:
            self.on_warm_clip(label, seconds, self.warm_up_objects[label])
        return seconds

    def _track(self, chunks, info, prompts, settings, prompt_frame=0) -> Iterator[Detections]:
        self.instruments.frame_log, self.instruments.tracker_log = [], []
        self.instruments.memory_frames.clear()
        yield from super()._track(chunks, info, prompts, settings, prompt_frame)

    def memory_read(self) -> tuple[int, int]:
        """(frames the latest job's last tracked frame read from memory, the most it could): the
        non-conditioning memory frames (num_maskmem - 1 at most; SAM 3: 6). With count_memory."""
        most = int(self.model.tracker.num_maskmem) - 1
        frames = self.instruments.memory_frames
        if not frames:
            return 0, most
        return min(frames[max(frames)][0], most), most

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
    pixels, the prompt's text features and its boxes, keeping only what sam3 reads of its output
    (sam3_image.py:820-866), cloned, so no session's state is held. `owner.detector_passes`
    counts the passes that ran."""
    from sam3.perflib.compile import recursive_clone

    detector = model.detector
    original = detector.forward_grounding
    cache: dict[tuple[str, ...], dict] = {}

    def forward_grounding(backbone_out, find_input, find_target, geometric_prompt):
        frame = backbone_out["img_batch_all_stages"][int(find_input.img_ids.reshape(-1)[0])]
        text = tuple(_digest(v) for k, v in sorted(backbone_out.items()) if k.startswith("language_"))
        boxes = tuple(_digest(v) for v in (getattr(geometric_prompt, "box_embeddings", None),
                                           getattr(geometric_prompt, "box_labels", None))
                      if v is not None and v.numel())
        key = (_digest(frame), *text, *boxes)
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


def _pin_detector(model, detections: tuple[Detection, ...], owner: Any) -> None:
    """Replace the scores and masks `detector.forward_grounding` gives (Pins), while
    `owner.pin_detector` says so."""
    import torch

    detector = model.detector
    original = detector.forward_grounding
    made: dict[frozenset[int], tuple[Any, Any]] = {}  # absent queries -> (logits, masks)
    captions = _captions(detector)

    def forward_grounding(backbone_out, find_input, find_target, geometric_prompt):
        out = original(backbone_out, find_input, find_target, geometric_prompt)
        if not owner.pin_detector:
            return out
        frame = int(find_input.img_ids.reshape(-1)[0])
        text = captions(backbone_out, find_input)
        absent = frozenset(i for i, d in enumerate(detections)
                           if frame in d.absent or (d.texts is not None and text not in d.texts))
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


def _captions(detector) -> Callable[[dict, Any], str]:
    """The text a detector query is for: the text encoder's outputs are recorded by their
    features, and a query picks its caption by `text_ids` (SAM 3 encodes [text, "visual"])."""
    encode_text = detector.backbone.forward_text
    seen: dict[str, list[str]] = {}

    def forward_text(captions, *args, **kwargs):
        out = encode_text(captions, *args, **kwargs)
        seen[_digest(out["language_features"])] = list(captions)
        return out

    detector.backbone.forward_text = forward_text

    def caption(backbone_out, find_input) -> str:
        texts = seen.get(_digest(backbone_out["language_features"]), [])
        i = int(find_input.text_ids.reshape(-1)[0])
        return texts[i] if i < len(texts) else ""

    return caption


def _pin_tracker_heads(model, object_score: float, iou_logit: float) -> None:
    import torch

    decoder = model.tracker.sam_mask_decoder
    with torch.no_grad():
        for layer, value in ((decoder.pred_obj_score_head.layers[-1], object_score),
                             (decoder.iou_prediction_head.layers[-1], iou_logit)):
            layer.weight.zero_()
            layer.bias.fill_(value)


def shrink(model, backbone_blocks: int | None = None, memory_attention_layers: int | None = None,
           text_layers: int | None = None) -> None:
    """The same code at a smaller depth (for a CPU): the first `backbone_blocks` blocks of the
    detector's ViT, its last one's output taken as the ViT's (vitdet.py:836-858), the first
    `memory_attention_layers` layers of the tracker's memory attention and `text_layers` of the
    text encoder's. Shrink a model before loading another's weights into it (the weights of the
    dropped layers go)."""
    if text_layers:
        text = model.detector.backbone.language_backbone.encoder.transformer
        text.resblocks = text.resblocks[:text_layers]
    if memory_attention_layers:
        encoder = model.tracker.transformer.encoder
        encoder.layers = encoder.layers[:memory_attention_layers]
        encoder.num_layers = len(encoder.layers)
    if backbone_blocks:
        trunk = model.detector.backbone.vision_backbone.trunk
        if trunk.return_interm_layers:
            raise ValueError("shrink expects a ViT that returns its last block's output only")
        trunk.blocks = trunk.blocks[:backbone_blocks]
        trunk.full_attn_ids = [len(trunk.blocks) - 1]


def count_memory(model, memory_frames: dict[int, tuple[int, int]]) -> None:
    """Record, for each frame, how many earlier frames memory selection (`frame_filter`)
    returns and how far back the oldest of them lies (the fewest and the farthest over the
    frame's tracker states). SAM 3 reads the last num_maskmem - 1 of them as spatial memory and
    up to max_obj_ptrs_in_encoder - 1 as object pointers."""
    tracker = model.tracker
    original = tracker.frame_filter

    def frame_filter(output_dict, track_in_reverse, frame_idx, num_frames, r):
        valid = original(output_dict, track_in_reverse, frame_idx, num_frames, r)
        reach = max((abs(frame_idx - t) for t in valid), default=0)
        count, farthest = memory_frames.get(frame_idx, (len(valid), reach))
        memory_frames[frame_idx] = (min(count, len(valid)), max(farthest, reach))
        return valid

    tracker.frame_filter = frame_filter


def occlude_memory(model, frames: Container[int]) -> None:
    """Score `frames` 0 for memory selection (their `eff_iou_score`), as an object hidden there
    would be, leaving everything else as it was: selection then skips them and reaches back
    past them, beyond the last `max_obj_ptrs_in_encoder` frames once the stretch is longer."""
    import torch

    tracker = model.tracker
    original = tracker.track_step

    def track_step(frame_idx, *args, **kwargs):
        out = original(frame_idx, *args, **kwargs)
        if frame_idx in frames and "eff_iou_score" in out:
            out["eff_iou_score"] = torch.zeros_like(out["eff_iou_score"])
        return out

    tracker.track_step = track_step


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


def memory_attention_kernels(tracker: InstrumentedSam3Tracker, chunks: list[FrameChunk], info: VideoInfo,
                             objects: int) -> dict:
    """Which attention kernel the tracker's memory attention (1 head x 256, bf16) runs, on the
    inputs a job gives it: a job of `objects` forced objects runs on `chunks` (long enough to fill
    the memory window) and its last call into the memory attention is kept; then, on this thread,
    - the compiled part is called on those inputs under the profiler (in the serving stance, so
      a shape it was not warmed for would run eager and be counted), and the scaled-dot-product
      ops it ran are counted (`compiled_ops`): inductor calls the fused kernels as ATen ops;
    - the eager part is called too, with F.scaled_dot_product_attention watched, and the kernel
      SDPA's dispatcher picks for the largest call (the cross-attention to the memory) is named
      (`backend`, torch._fused_sdp_choice), with that call timed as dispatched and math-only."""
    import torch
    import torch.nn.functional as F
    from sam3.perflib.compile import recursive_clone
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from serve_app.trackers.sam3 import compat

    model = tracker.model
    encoder = model.tracker.transformer.encoder
    compiled = encoder.__dict__.get("forward")  # compile.Compiled's wrapper, if compiled
    called = compiled or encoder.forward
    kept: dict = {}

    def keep(*args, **kwargs):
        kept["call"] = recursive_clone((args, kwargs))
        return called(*args, **kwargs)

    encoder.forward = keep
    try:
        for _ in tracker.track_forced(chunks, info, objects):
            pass
    finally:
        if compiled is None:
            del encoder.forward
        else:
            encoder.forward = compiled
    args, kwargs = kept["call"]
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    compiled_ops: dict[str, int] = {}
    if compiled is not None:
        with compat.model_context(device), tracker.compiled.serving(), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled(*recursive_clone(args), **recursive_clone(kwargs))
            sync()
        for event in prof.events():
            if "dot_product" in event.name or "attention_forward" in event.name:
                compiled_ops[event.name] = compiled_ops.get(event.name, 0) + 1

    calls = []
    sdpa = F.scaled_dot_product_attention

    def watch(q, k, v, *a, **kw):
        calls.append((q, k, v, a, kw))
        return sdpa(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = watch
    try:
        with compat.model_context(device):
            type(encoder).forward(encoder, *recursive_clone(args), **recursive_clone(kwargs))
    finally:
        F.scaled_dot_product_attention = sdpa
    q, k, v, a, kw = max(calls, key=lambda c: c[1].shape[-2])
    mask = kw.get("attn_mask", a[0] if a else None)
    dropout = kw.get("dropout_p", a[1] if len(a) > 1 else 0.0)
    backend = SDPBackend(int(torch._fused_sdp_choice(q, k, v, mask, dropout, False))).name

    def seconds(context) -> float:
        reps = 3 if device.type == "cuda" else 1  # a CPU's call takes seconds
        with compat.model_context(device), context:
            if reps > 1:
                sdpa(q, k, v, *a, **kw)  # once to warm
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                sdpa(q, k, v, *a, **kw)
            sync()
            return (time.perf_counter() - start) / reps

    dispatched, math = seconds(contextlib.nullcontext()), seconds(sdpa_kernel([SDPBackend.MATH]))
    return {
        "backend": backend, "fused": backend != "MATH", "compiled_ops": compiled_ops,
        "dtype": str(q.dtype).removeprefix("torch."), "q": list(q.shape), "k": list(k.shape),
        "sdpa_ms": round(dispatched * 1e3, 2), "math_ms": round(math * 1e3, 2), "calls": len(calls),
        "detail": (f"{len(calls)} SDPA calls a frame; the memory cross-attention: q {tuple(q.shape)} k {tuple(k.shape)} "
                   f"{str(q.dtype).removeprefix('torch.')}, {dispatched * 1e3:.1f} ms dispatched vs {math * 1e3:.1f} ms "
                   f"math-only; compiled part ran {compiled_ops or 'no SDPA op (decomposed)'}"),
    }
