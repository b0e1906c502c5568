"""The real SAM 3 architecture (random weights) through the tracker stage.

Random weights: the outputs mean nothing, so these tests check structure, threading, memory
and filtering, never segmentation quality. A few model thresholds are lowered so that the
untrained detector proposes objects at all (its scores sit around 0.15-0.35, below SAM 3's
0.5/0.7), two objects at most; NMS is off because it compares every proposal pair at full
mask size (gigabytes with 200 proposals). The memory window is shrunk so that "past the
window" is a few frames, affordable at ~15-40 s per frame on a CPU. Built once per module.
"""

import threading
from fractions import Fraction

import numpy as np
import pytest

from serve_app import synthetic as S
from serve_app.contract import JobConfig
from serve_app.media import FrameChunk, VideoInfo
from serve_app.pipeline import LocalFrames, track

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

TEST_OVERRIDES = {
    # let random weights propose objects: every proposal passes, the best two are tracked
    "score_threshold_detection": 0.0, "new_det_thresh": 0.0, "det_nms_thresh": 0.0, "max_num_objects": 2,
    # a short hotstart (outputs lag one frame) and a two-frame memory window
    "hotstart_delay": 2, "hotstart_unmatch_thresh": 2, "hotstart_dup_thresh": 2,
    "tracker.max_obj_ptrs_in_encoder": 2, "tracker.num_maskmem": 2,
}
W, H = 192, 108


@pytest.fixture(scope="module")
def tracker():
    from serve_app.trackers.sam3.config import Sam3Config
    from benchmarks.instrumented import InstrumentedSam3Tracker

    torch.manual_seed(0)  # random weights, but the same ones every run
    t = InstrumentedSam3Tracker(Sam3Config(device="cpu", compile=False, model_overrides=TEST_OVERRIDES),
                                random_weights=True)
    yield t
    t.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from serve_app.video.probe import probe

    path = tmp_path_factory.mktemp("sam3") / "two_frames.mp4"
    S.write_clip(path, W, H, num_frames=2, fps=25)
    return path, probe(path)


def test_a_clip_through_the_request_path_from_other_threads(tracker, clip):
    """Two requests at once, each on its own thread (neither built the model), through the
    tracker deployment's code path: decoded frames -> SAM 3 -> threshold -> batches."""
    path, info = clip
    results, reports, errors = {}, {}, []

    def request(threshold):
        try:
            config = JobConfig(prompt="coloured shapes", confidence_threshold=threshold)
            batches = list(track(tracker, LocalFrames(path, info, chunk_frames=1), info, config))
            reports[threshold] = batches[-1].timings
            results[threshold] = [d for b in batches for d in b.detections]
        except BaseException as exc:  # surfaced below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(thr,)) for thr in (0.0, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    for threshold, dets in results.items():
        assert [d.frame_index for d in dets] == [0, 1]
        for d in dets:
            assert d.masks.shape == (len(d), H, W) and d.masks.dtype == bool
            assert d.obj_ids.dtype == np.int64 and d.boxes_xywh.shape == (len(d), 4)
            assert np.all((d.boxes_xywh >= 0) & (d.boxes_xywh <= 1))
            assert np.all(d.scores >= threshold)
        assert reports[threshold].track_ms > 0 and reports[threshold].decode_ms > 0

    everything = [(d.frame_index, int(i), float(s)) for d in results[0.0] for i, s in zip(d.obj_ids, d.scores)]
    assert everything, "the random-weight model proposed no object; the threshold check needs one"
    assert any(len(d) and d.masks.any() for d in results[0.0])
    strict = [(d.frame_index, int(i), float(s)) for d in results[1.0] for i, s in zip(d.obj_ids, d.scores)]
    assert strict == [e for e in everything if e[2] >= 1.0]   # 1.0 keeps only a perfect score: none here
    assert tracker.sessions_alive() == 0


def test_session_memory_stays_flat_past_the_window(tracker):
    """Bytes held by the session after k and 2k emitted frames (k=2; the window is 2 frames):
    equal. The first frame shows the measure does see per-frame memory."""
    n = 6
    frames = np.stack(list(S.frames(n, W, H)))
    info = VideoInfo(width=W, height=H, num_frames=n, pts=tuple(range(n)), time_base=Fraction(1, 25),
                     avg_fps=Fraction(25))
    chunks = (FrameChunk(i, frames[i:i + 1]) for i in range(n))
    dets = list(tracker.track(chunks, info, JobConfig(prompt="coloured shapes")))
    assert [d.frame_index for d in dets] == list(range(n))

    held = {r.frame: r.held_bytes for r in tracker.frame_log}
    assert all(r.objects_tracked == 2 for r in tracker.frame_log)  # memory past the window holds objects
    k = 2
    # index k-1 and 2k-1 are both mid-video (the detector is still reading ahead)
    assert held[1] - held[0] > 1 << 20, "the window filling up must be visible to the measure"
    assert abs(held[2 * k - 1] - held[k - 1]) < 256 << 10, held
    assert tracker.sessions_alive() == 0


def test_warm_up_runs_the_full_path_at_each_size(tracker, caplog):
    """What a GPU replica runs at start (there with compile, at 832x480 and 1280x720)."""
    tracker.warm_frames = 2
    with caplog.at_level("INFO", logger="serve_app.trackers.sam3.tracker"):
        seconds = tracker.warm_up([(64, 36)])
    assert list(seconds) == [(64, 36)] and seconds[(64, 36)] > 0
    assert "warm-up 64x36, 2 frames" in caplog.text
    assert tracker.sessions_alive() == 0


@pytest.mark.gpu
def test_compiled_on_cuda_warm_up_and_flat_gpu_memory():
    """On a GPU: compile + warm-up at start, then peak GPU memory does not grow with length."""
    from serve_app.trackers.sam3.config import Sam3Config
    from benchmarks.instrumented import InstrumentedSam3Tracker

    torch.manual_seed(0)
    t = InstrumentedSam3Tracker(Sam3Config(device="cuda", compile=True, warm_sizes=[(W, H)],
                                           model_overrides=TEST_OVERRIDES), random_weights=True)
    try:
        peaks = []
        for n in (8, 16):
            frames = np.stack(list(S.frames(n, W, H)))
            info = VideoInfo(width=W, height=H, num_frames=n, pts=tuple(range(n)), time_base=Fraction(1, 25),
                             avg_fps=Fraction(25))
            torch.cuda.reset_peak_memory_stats()
            assert len(list(t.track([FrameChunk(0, frames)], info, JobConfig(prompt="shapes")))) == n
            peaks.append(torch.cuda.max_memory_allocated())
        assert peaks[1] <= peaks[0] * 1.02, peaks
    finally:
        t.close()
