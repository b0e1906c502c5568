"""What tests and benchmarks measure on the SAM 3 tracker, kept out of the serving class.

`InstrumentedSam3Tracker` is a Sam3Tracker that can be built with random weights (the real
architecture, meaningless outputs: no checkpoint needed) and records, after every emitted
frame of its latest job, everything the session holds (tensors on any device, the hotstart
buffer inside SAM 3's generator, and the Python bookkeeping), the objects SAM 3 tracks and
the GPU memory allocated (`frame_log`); `sessions_alive()` counts SAM 3 sessions in memory.

Test-only options:
- `compile_backend`, `compile_parts`, `pad_objects`: compile on a CPU with any torch.compile
  backend (a counting one), only some parts, or without padding object batches;
- `memory_attention_layers`: keep only the first N layers of the tracker's memory attention
  (the same code at a smaller depth; its cost on a CPU is per layer);
- `memo_detector`: the detector (backbone, encoder, decoder, heads) is a pure function of the
  frame's pixels and the prompt, so its output is memoized by their content: a clip that
  cycles a few distinct frames costs a few detector passes on a CPU, and every tracker step
  still runs. Exact, not an approximation: the same input gives the same output;
- `spread_scores`: untrained, the detector scores every proposal 0.13-0.15; this rescales its
  scoring projection (random weights still) so that the first frame it sees scores its
  proposals around `spread_scores` = (mean logit, standard deviation), and pins the presence
  score near 1: thresholds then find different objects;
- `present_objects`: added to the tracker's object-score logit. Untrained, the tracker finds
  no object present on any frame after the first (empty masks, so nothing is ever unmatched
  or removed); raised, its masks are not empty and SAM 3's hotstart removes objects and new
  ones are born: the bookkeeping of a busy scene;
- `session_overrides`: SAM 3 model attributes set for each job's session on top of the job's;
- `record_tracker`: keep, per frame of the latest job, the tracker's mask logits and object
  scores before any thresholding (`tracker_log`): what memory a frame read shows there even
  when random weights binarise every mask to empty. `detector_log` has, per frame, the
  probabilities the detector gave its proposals (with `memo_detector`).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.contract import JobConfig
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.loading import WeightsSource
from serve_app.trackers.sam3.tracker import Sam3Tracker


@dataclass(frozen=True)
class FrameRecord:
    frame: int
    held_bytes: int          # everything the session holds (trim.held_bytes of Session.held())
    tensor_bytes: int        # of which tensor/array data
    objects_tracked: int     # SAM 3's frame_stats["num_obj_tracked"] (before hiding any)
    cuda_allocated: int      # torch.cuda.memory_allocated() on a GPU, else 0
    buffered: int            # frames in SAM 3's hotstart buffer (processed, not yet emitted)


class InstrumentedSam3Tracker(Sam3Tracker):
    def __init__(self, config: Sam3Config = Sam3Config(), random_weights: bool = False, *,
                 compile_backend: Any = None, compile_parts: tuple[str, ...] | None = None,
                 pad_objects: bool = True, memo_detector: bool = False, record_tracker: bool = False,
                 memory_attention_layers: int | None = None, spread_scores: tuple[float, float] | None = None,
                 present_objects: float | None = None,
                 session_overrides: Mapping[str, Any] | None = None) -> None:
        self.frame_log: list[FrameRecord] = []
        self.tracker_log: list[tuple[int, Any, Any]] = []   # (frame, mask logits, object score logits)
        self.detector_log: dict[int, Any] = {}              # frame -> proposal probabilities
        self.record_tracker = record_tracker
        self.memory_attention_layers = memory_attention_layers
        self.spread_scores = spread_scores
        self.present_objects = present_objects
        self.warm_up_objects: dict[str, int] = {}
        self.session_overrides = dict(session_overrides or {})
        self.memo_detector = memo_detector
        self.detector_passes = 0
        self.compile_options = {}
        if compile_backend is not None:
            self.compile_options["backend"] = compile_backend
        if compile_parts is not None:
            self.compile_options["parts"] = compile_parts
        if not pad_objects:
            self.compile_options["pad"] = False
        super().__init__(config, WeightsSource(random=True) if random_weights else None)

    def _on_build(self, model) -> None:
        if self.memo_detector:
            memoize_detector(model, self)
        if self.record_tracker:
            _record_tracker(model, self)
        if self.spread_scores:
            _spread_scores(model, *self.spread_scores)
        if self.present_objects:
            import torch

            with torch.no_grad():
                model.tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(self.present_objects)
        if self.memory_attention_layers:
            encoder = model.tracker.transformer.encoder
            encoder.layers = encoder.layers[:self.memory_attention_layers]
            encoder.num_layers = len(encoder.layers)

    def _warm_clip(self, label, width, height, n, settings) -> float:
        seconds = super()._warm_clip(label, width, height, n, settings)
        self.warm_up_objects[label] = self.last_job.get("tracked", 0)  # objects each warm-up clip tracked
        return seconds

    def job_settings(self, config: JobConfig) -> dict[str, Any]:
        return {**super().job_settings(config), **self.session_overrides}

    def _track(self, chunks, info, prompt, settings) -> Iterator[Detections]:
        self.frame_log, self.tracker_log, self.detector_log = [], [], {}
        yield from super()._track(chunks, info, prompt, settings)

    def track_forced(self, chunks: Iterable[FrameChunk], info: VideoInfo, objects: int,
                     prompt: str = "coloured shapes") -> Iterator[Detections]:
        """Track with exactly `objects` objects from frame 0 whatever the weights (the
        warm-up's settings: every proposal passes, the best are kept, none is removed)."""
        from serve_app.trackers.sam3.tracker import forced_objects

        yield from self._track(chunks, info, prompt, forced_objects(objects))

    def _after_frame(self, session, outputs: dict) -> None:
        from serve_app.trackers.sam3.trim import held

        roots = session.held()
        tensors, python = held(roots)
        tracked = int((outputs.get("frame_stats") or {}).get("num_obj_tracked", 0))
        buffered = len(roots["propagation"].get("hotstart_buffer") or ())
        self.frame_log.append(FrameRecord(session.emitted, tensors + python, tensors, tracked,
                                          _cuda_allocated(session.model.device), buffered))

    @staticmethod
    def sessions_alive() -> int:
        """SAM 3 sessions still reachable anywhere in the process (0 between jobs)."""
        from serve_app.trackers.sam3.session import Session

        gc.collect()
        return sum(isinstance(o, Session) for o in gc.get_objects())


def _digest(tensor) -> str:
    return hashlib.sha1(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def memoize_detector(model, owner: InstrumentedSam3Tracker) -> None:
    """Memoize `detector.forward_grounding` (one frame through the detector) by the frame's
    pixels and the prompt's text features, keeping only what sam3 reads of its output
    (sam3_image.py:820-866), cloned, so no session's state is held."""
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
        # as sam3_video_base.py:366 turns them into scores
        frame_index = int(find_input.img_ids.reshape(-1)[0])
        owner.detector_log[frame_index] = cache[key]["pred_logits"].squeeze(-1).sigmoid().float().flatten()
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


def _spread_scores(model, mean: float, std: float) -> None:
    """Set the detector's scoring projection, on its first call, so that the query scores of
    that frame and prompt have this mean and standard deviation (logits); presence near 1."""
    import torch

    scoring = model.detector.dot_prod_scoring
    presence = model.detector.transformer.decoder.presence_token_head.layers[-1]
    with torch.no_grad():
        presence.weight.zero_()
        presence.bias.fill_(8.0)
    original = scoring.forward
    done = []

    def forward(hs, prompt, prompt_mask):
        if not done:
            done.append(True)
            with torch.no_grad():
                text = scoring.prompt_mlp(prompt) if scoring.prompt_mlp is not None else prompt
                pooled = scoring.prompt_proj(scoring.mean_pool_text(text, prompt_mask))[0].float()
                last = hs[-1, 0].float()                                    # (queries, d_model)
                weight, bias = scoring.hs_proj.weight, scoring.hs_proj.bias
                centred = (last - last.mean(0)) @ weight.float().t() @ pooled * scoring.scale
                k = std / float(centred.std())
                along = pooled / (pooled.norm() ** 2 * scoring.scale)      # a bias along it adds 1 to every score
                bias.data.copy_(-k * (weight.float() @ last.mean(0)) + mean * along)
                weight.data.mul_(k)
        return original(hs, prompt, prompt_mask)

    scoring.forward = forward


def _record_tracker(model, owner: InstrumentedSam3Tracker) -> None:
    original = model.run_tracker_propagation

    def run_tracker_propagation(*args, **kwargs):
        masks, scores = original(*args, **kwargs)
        owner.tracker_log.append((kwargs.get("frame_idx"), masks.detach().float().cpu().clone(),
                                  scores.detach().float().cpu().clone()))
        return masks, scores

    model.run_tracker_propagation = run_tracker_propagation


def _cuda_allocated(device) -> int:
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated(device))
