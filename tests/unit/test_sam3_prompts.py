"""Several concepts, exemplar boxes and a prompt frame through the real SAM 3 architecture
(random weights, CPU), each proven against SAM 3's own predictor.

The reference is sam3's `Sam3VideoPredictor`: its add_prompt and its propagate_in_video "both"
(forward from the prompt frame, then backward), one session per concept as sam3 asks of a
user with several, on the same model, the same frames (converted as the tracker converts them,
all held: no trimming) and the same settings. The tracker under test takes the job as the
service gives it: the decoder's chunks in tracking order, boxes in pixels, all concepts in one
session with one backbone pass per frame, trimmed as it goes. Every frame's ids (one-to-one,
the same for the whole video), concepts, boxes, scores and masks must be equal, and so must
the tracker's logits on every step (what the memory it read gives).

What SAM 3 decides by is pinned where a test depends on it (testkit.sam3.Pins): per concept,
the detector's objects; the tracker's masks are the ones objects were born with and every
object is present. The boxes tests unpin the detector for their jobs: a box must change what
the real detector sees, which pinned outputs would hide; there, threshold 0 and a cap of two
make two objects from the prompt frame whatever the weights, and none is removed.
Built once per module; `pytest -m slow -k "prompts or boxes or prompt_frame"`.
"""

import contextlib
import uuid
from fractions import Fraction

import numpy as np
import pytest

from serve_app import synthetic as S
from serve_app.contract import Box, JobConfig
from serve_app.media import FrameChunk, VideoInfo, chunk_plan
from testkit.sam3 import Detection, InstrumentedSam3Tracker, Pins

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

W, H = 96, 54
N = 12
OVERRIDES = {
    "det_nms_thresh": 0.0,
    "hotstart_delay": 3, "hotstart_unmatch_thresh": 2, "hotstart_dup_thresh": 2,
    "tracker.max_obj_ptrs_in_encoder": 3, "tracker.num_maskmem": 2,
}
DISTINCT = np.stack(list(S.frames(2, W, H)))
FISH, BIRD = "fish", "bird"
DETECTIONS = (
    Detection(1.0, (0.05, 0.05, 0.45, 0.45), texts=frozenset({FISH})),                          # 0.73
    Detection(0.5, (0.55, 0.05, 0.95, 0.45), texts=frozenset({FISH}), absent=frozenset(range(4, N))),
    Detection(0.8, (0.05, 0.55, 0.45, 0.95), texts=frozenset({BIRD})),                          # 0.69
    Detection(1.5, (0.55, 0.55, 0.95, 0.95), texts=frozenset({BIRD}), absent=frozenset(range(0, 8))),
)


@pytest.fixture(scope="module")
def tracker():
    from serve_app.trackers.sam3.config import Sam3Config

    torch.manual_seed(0)
    config = Sam3Config(device="cpu", compile=False, warm_up=False, max_objects=8, model_overrides=OVERRIDES)
    t = InstrumentedSam3Tracker(config, random_weights=True, memo_detector=True, record_tracker=True,
                                memory_attention_layers=1, backbone_blocks=2, text_layers=2,
                                pins=Pins(DETECTIONS))
    yield t
    t.close()


def clip(n: int = N):
    frames = DISTINCT[[i % len(DISTINCT) for i in range(n)]]
    info = VideoInfo(width=W, height=H, num_frames=n, pts=tuple(range(n)), time_base=Fraction(1, 25),
                     avg_fps=Fraction(25))
    return frames, info


def chunks_in_plan(frames: np.ndarray, prompt_frame: int, size: int = 2) -> list[FrameChunk]:
    """The decoder's chunks in the order the tracker takes them (media.chunk_plan)."""
    out = []
    for first, count, step in chunk_plan(len(frames), size, prompt_frame):
        index = [first + i * step for i in range(count)]
        out.append(FrameChunk(first, frames[index], step))
    return out


def ours(tracker, config: JobConfig, n: int = N):
    frames, info = clip(n)
    dets = list(tracker.track(chunks_in_plan(frames, config.prompt_frame), info, config))
    k = config.prompt_frame
    assert [d.frame_index for d in dets] == [*range(k, n), *range(k - 1, -1, -1)]
    return {d.frame_index: d for d in dets}, tracker.tracker_log


def predictor_runs(tracker, config: JobConfig, n: int = N, fetch_quirk: bool = True) -> tuple[list[dict], list]:
    """sam3's Sam3VideoPredictor, one session per concept (and one for boxes alone beside
    several concepts), untrimmed: per session, frame -> outputs; and the tracker's log.
    `fetch_quirk=False`: its forward pass, then its backward pass with the action history it
    keeps between them cleared (see the last-frame test)."""
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    from serve_app.trackers.sam3 import compat
    from serve_app.trackers.sam3.frames import to_model_input
    from serve_app.trackers.sam3.session import _new_state, model_settings, state_prompts

    model = tracker.model
    frames, _ = clip(n)
    with compat.model_context(model.device):
        held = [to_model_input(f, model.device) for f in frames]
    predictor = object.__new__(Sam3VideoPredictor)
    predictor.model = model
    boxes = [((x / W, y / H, w / W, h / H), b.label) for b, (x, y, w, h) in ((b, b.box) for b in config.boxes)]
    settings = tracker.job_settings(config)
    tracker.instruments.tracker_log = []
    runs = []
    for prompt in state_prompts(config.concepts, boxes):
        session_id = str(uuid.uuid4())
        with compat.model_context(model.device):
            state = _new_state(model, held, n, H, W)
        predictor._ALL_INFERENCE_STATES[session_id] = {"state": state, "session_id": session_id, "start_time": 0}
        try:
            with compat.model_context(model.device), model_settings(model, settings):
                predictor.add_prompt(session_id, frame_idx=config.prompt_frame, text=prompt.text,
                                     bounding_boxes=[list(b) for b in prompt.boxes] or None,
                                     bounding_box_labels=[int(v) for v in prompt.labels] or None)
                if fetch_quirk:
                    results = list(predictor.propagate_in_video(session_id, "both", config.prompt_frame, None))
                else:
                    results = list(predictor.propagate_in_video(session_id, "forward", config.prompt_frame, None))
                    state["action_history"].clear()
                    results += predictor.propagate_in_video(session_id, "backward", config.prompt_frame, None)
                runs.append((prompt.concept, {r["frame_index"]: r["outputs"] for r in results}))
        finally:
            predictor._ALL_INFERENCE_STATES.pop(session_id, None)
    return runs, tracker.tracker_log


def assert_same(got: dict, runs: list, n: int = N) -> dict[tuple[int, int], int]:
    """Every frame: our objects of each concept are the predictor's for it, one to one with
    the same pairing all video long, and the same boxes, scores and masks."""
    pairing: dict[tuple[int, int], int] = {}
    assert sorted(got) == list(range(n))
    for f in range(n):
        d = got[f]
        concepts = np.zeros(len(d), np.int16) if d.concepts is None else d.concepts
        mine = set(range(len(d)))
        for concept, outputs in runs:
            out = outputs[f]
            for j, local in enumerate(np.asarray(out["out_obj_ids"]).tolist()):
                pair = (concept, local)
                ours_id = pairing.setdefault(pair, None)
                rows = [i for i in mine if concepts[i] == concept and (ours_id is None or d.obj_ids[i] == ours_id)
                        and np.array_equal(d.masks[i], out["out_binary_masks"][j])]
                assert rows, f"frame {f}: concept {concept}'s object {local} is missing"
                i = rows[0]
                if ours_id is None:
                    assert int(d.obj_ids[i]) not in pairing.values(), f"frame {f}: id {d.obj_ids[i]} pairs twice"
                    pairing[pair] = int(d.obj_ids[i])
                assert d.scores[i] == np.float32(out["out_probs"][j]), f"frame {f}, object {local}"
                assert np.array_equal(d.boxes_xywh[i], np.clip(np.asarray(out["out_boxes_xywh"][j], np.float32), 0, 1))
                mine.discard(i)
        assert not mine, f"frame {f}: objects {d.obj_ids[sorted(mine)]} the predictor does not have"
    return pairing


def assert_same_logits(log, reference):
    assert len(log) == len(reference) > 0
    assert sorted(f for f, _, _ in log) == sorted(f for f, _, _ in reference)
    by_frame = {}
    for f, masks, scores in reference:
        by_frame.setdefault(f, []).append((masks, scores))
    for f, masks, scores in log:
        assert any(torch.equal(masks, m) and torch.equal(scores, s) for m, s in by_frame[f]), f"frame {f}"


# -- prompts: several concepts in one pass -----------------------------------------------------
def test_prompts_two_concepts_in_one_pass_are_each_what_sam3s_predictor_finds(tracker):
    """Two concepts, one session: each concept's objects, every frame, are those sam3's
    predictor finds with that concept alone; ids are unique across concepts."""
    config = JobConfig(prompts=[FISH, BIRD], confidence_threshold=0.3)
    got, log = ours(tracker, config)
    runs, reference = predictor_runs(tracker, config)
    pairing = assert_same(got, runs)
    assert {c for c, _ in pairing} == {0, 1} and len(set(pairing.values())) == len(pairing) >= 3
    assert_same_logits(log, reference)
    # fish's second object is gone from frame 4 and bird's second comes on frame 8
    assert set(got[0].concepts.tolist()) == {0, 1} and len(got[9]) >= 3


def test_prompts_run_the_vision_backbone_once_per_frame(tracker):
    """With two concepts the detector's backbone runs once per frame, not once per concept."""
    backbone = tracker.model.detector.backbone
    calls = []
    original = backbone.forward_image

    def counting(samples):
        calls.append(1)
        return original(samples)

    backbone.forward_image = counting
    passes_before = tracker.instruments.detector_passes
    try:
        # new texts: the memoized detector runs for each (frame, text), so the backbone is asked
        ours(tracker, JobConfig(prompts=["red fish", "blue bird"], confidence_threshold=0.3))
    finally:
        del backbone.forward_image
    detector_passes = tracker.instruments.detector_passes - passes_before
    assert detector_passes >= 4 and len(calls) * 2 == detector_passes, (len(calls), detector_passes)


def test_prompts_share_max_objects(tracker):
    """max_objects counts every concept's objects: fish takes its two, bird the one left."""
    got, _ = ours(tracker, JobConfig(prompts=[FISH, BIRD], confidence_threshold=0.3, max_objects=3))
    assert all(len(d) <= 3 for d in got.values())
    assert sorted(got[0].concepts.tolist()) == [0, 0, 1]


# -- prompt_frame: tracking both ways -----------------------------------------------------------
def test_prompt_frame_mid_clip_tracks_both_ways_as_sam3s_predictor(tracker):
    """Prompted on frame 5 of 12: forward to the end, then backward to frame 0; an object
    absent on the prompt frame is found by the backward pass; the trimmed session reads what
    the predictor's untrimmed one reads on every step, both passes."""
    config = JobConfig(prompts=[FISH, BIRD], confidence_threshold=0.3, prompt_frame=5)
    got, log = ours(tracker, config)
    runs, reference = predictor_runs(tracker, config)
    assert_same(got, runs)
    assert_same_logits(log, reference)
    assert len(got[0]) > len(got[5])  # fish's second object, absent from frame 4 on, is found going back


def test_prompt_frame_on_the_last_frame_tracks_every_frame_before_it(tracker):
    """sam3 0.1.4's predictor, prompted on the last frame, fetches cached outputs for its
    backward pass instead of tracking (a first pass from the first or last frame is taken to
    have covered the video): every earlier frame comes out empty. The tracker tracks them, as
    the predictor does once that bookkeeping is cleared between its two passes."""
    config = JobConfig(prompts=[FISH, BIRD], confidence_threshold=0.3, prompt_frame=N - 1)
    quirk, _ = predictor_runs(tracker, config)
    assert all(len(outputs[f]["out_obj_ids"]) == 0 for _, outputs in quirk for f in range(N - 1))
    got, log = ours(tracker, config)
    runs, reference = predictor_runs(tracker, config, fetch_quirk=False)
    assert_same(got, runs)
    assert_same_logits(log, reference)
    assert all(len(got[f]) for f in range(N - 1))


# -- boxes: exemplars, positive and negative ----------------------------------------------------
@contextlib.contextmanager
def unpinned(tracker):
    """The real detector's outputs for this job, two objects from the prompt frame and none
    removed (the tracker's masks and presence stay pinned)."""
    model = tracker.model
    saved = {name: getattr(model, name) for name in ("hotstart_unmatch_thresh", "hotstart_dup_thresh")}
    tracker.instruments.pin_detector = False
    try:
        for name in saved:
            setattr(model, name, 1 << 30)
        yield
    finally:
        tracker.instruments.pin_detector = True
        for name, value in saved.items():
            setattr(model, name, value)


BOX = Box(box=[10.0, 6.0, 40.0, 30.0])


@pytest.mark.parametrize("case", [
    dict(prompt=FISH, boxes=[BOX]),                                        # text and a positive box
    dict(boxes=[BOX]),                                                     # a positive box alone
    dict(prompt=FISH, boxes=[Box(box=[50.0, 20.0, 30.0, 30.0], label=False)]),  # text and a negative box
], ids=["text+positive", "positive alone", "text+negative"])
def test_boxes_reach_sam3_as_its_predictor_gives_them(tracker, case):
    config = JobConfig(confidence_threshold=0.0, max_objects=2, prompt_frame=3, **case)
    with unpinned(tracker):
        got, log = ours(tracker, config)
        runs, reference = predictor_runs(tracker, config)
        assert_same(got, runs)
        assert_same_logits(log, reference)
        assert all(len(d) == 2 for d in got.values())
        if config.prompt:  # the box changed what the detector found
            without, _ = ours(tracker, JobConfig(prompt=FISH, confidence_threshold=0.0, max_objects=2, prompt_frame=3))
            assert not np.array_equal(got[3].scores, without[3].scores)


def test_several_boxes_reach_the_detector_together(tracker):
    """sam3's add_prompt takes one box on a fresh frame; several go into the one Prompt the
    detector reads on the prompt frame, each with its label."""
    seen = []
    detector = tracker.model.detector
    original = detector.forward_grounding

    def watch(backbone_out, find_input, find_target, geometric_prompt):
        if geometric_prompt.box_embeddings is not None and geometric_prompt.box_embeddings.numel():
            seen.append((geometric_prompt.box_embeddings[:, 0].tolist(), geometric_prompt.box_labels[:, 0].tolist()))
        return original(backbone_out, find_input, find_target, geometric_prompt)

    boxes = [Box(box=[9.6, 5.4, 38.4, 27.0]), Box(box=[48.0, 27.0, 24.0, 21.6], label=False)]
    detector.forward_grounding = watch
    try:
        with unpinned(tracker):
            got, _ = ours(tracker, JobConfig(prompt=FISH, boxes=boxes, confidence_threshold=0.0, max_objects=2))
    finally:
        detector.forward_grounding = original
    # x, y, w, h in fractions of the picture -> SAM 3's centre form
    want = [[0.3, 0.35, 0.4, 0.5], [0.625, 0.7, 0.25, 0.4]]
    assert seen and all(np.allclose(b, want) and labels == [1, 0] for b, labels in seen)
    assert len(got) == N
