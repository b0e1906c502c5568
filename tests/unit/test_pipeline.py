"""The whole CPU path in one process: decode -> stand-in tracker -> composite -> encode."""

import av
import numpy as np
import pytest

from serve_app import synthetic as S
from serve_app.contract import JobConfig
from serve_app.errors import ModelError, UnsupportedMedia
from serve_app.pipeline import run_local
from serve_app.trackers.fake import ColorShapeTracker
from serve_app.video.probe import probe

N, W, H = 40, 480, 272


def read_frames(path, fmt):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format=fmt) for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    S.write_clip(path, W, H, N, 25)
    return path


def test_mask_mode_gives_the_known_segmentation(clip, tmp_path):
    out = tmp_path / "mask.mp4"
    timings = run_local(clip, out, JobConfig(prompt="red"), ColorShapeTracker())
    masks = read_frames(out, "gray")
    assert len(masks) == N and masks[0].shape == (H, W)
    for i, picture in enumerate(masks):
        truth = S.truth(i, N, W, H)
        # threshold 0.5 keeps the bright red circle and drops the pale red square
        want = truth[0]
        got = picture >= 128
        assert (got & want).sum() / (got | want).sum() > 0.9
        assert not (got & truth[4]).any()
    assert timings.total_ms > 0 and timings.encode_ms > 0


def test_threshold_zero_keeps_the_pale_shape(clip, tmp_path):
    out = tmp_path / "mask0.mp4"
    run_local(clip, out, JobConfig(prompt="red", confidence_threshold=0.0), ColorShapeTracker())
    got = read_frames(out, "gray")[0] >= 128
    pale = S.truth(0, N, W, H)[4]
    assert (got & pale).sum() / pale.sum() > 0.9


def test_overlay_mode_draws_on_the_input_and_keeps_the_rest(clip, tmp_path):
    out = tmp_path / "overlay.mp4"
    run_local(clip, out, JobConfig(prompt="blue", mode="overlay", alpha=0.6), ColorShapeTracker())
    src, dst = read_frames(clip, "rgb24"), read_frames(out, "rgb24")
    assert len(dst) == N and dst[0].shape == (H, W, 3)
    inside = S.truth(0, N, W, H)[1]
    far = np.zeros((H, W), bool)
    far[: H // 3, : W // 4] = True  # top-left: no blue square, box or label there
    diff = np.abs(dst[0].astype(int) - src[0].astype(int)).mean(axis=2)
    assert diff[inside].mean() > 20 and diff[far].mean() < 4


def test_real_clip_keeps_size_fps_frames_and_audio(cockatoo, tmp_path):
    out = tmp_path / "cockatoo_mask.mp4"
    run_local(cockatoo, out, JobConfig(prompt="white bird"), ColorShapeTracker())
    a, b = probe(cockatoo), probe(out)
    assert (b.width, b.height, b.num_frames) == (1280, 720, 280) == (a.width, a.height, a.num_frames)
    assert b.avg_fps == a.avg_fps == 20
    assert b.audio is not None and b.audio.codec == a.audio.codec == "mp3"


def test_progress_reports_every_frame(clip, tmp_path):
    seen = []
    run_local(clip, tmp_path / "p.mp4", JobConfig(prompt="red"), ColorShapeTracker(),
              progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (N, N) and len(seen) == N


class DropsLastFrameTracker(ColorShapeTracker):
    """A broken tracker (test double): it loses the last frame."""

    def track(self, chunks, info, config):
        dets = list(super().track(chunks, info, config))
        yield from dets[:-1]


def test_a_tracker_that_loses_frames_is_an_error_not_a_short_video(clip, tmp_path):
    with pytest.raises(ModelError, match=f"39 frames; the video has {N}"):
        run_local(clip, tmp_path / "short.mp4", JobConfig(prompt="red"), DropsLastFrameTracker())


def test_bad_upload_is_refused_before_tracking(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(UnsupportedMedia):
        run_local(bad, tmp_path / "o.mp4", JobConfig(prompt="red"), ColorShapeTracker())


class FailsMidwayTracker(ColorShapeTracker):
    """A broken tracker (test double): it fails on frame 10."""

    def track(self, chunks, info, config):
        for dets in super().track(chunks, info, config):
            if dets.frame_index == 10:
                raise ModelError("tracker failed on frame 10")
            yield dets


def test_a_failure_midway_is_reported_and_stops_the_decode_and_encode_threads(clip, tmp_path):
    import threading

    with pytest.raises(ModelError, match="frame 10"):
        run_local(clip, tmp_path / "f.mp4", JobConfig(prompt="red", mode="overlay"), FailsMidwayTracker())
    assert not [t.name for t in threading.enumerate() if t.name in ("decode", "encode")]


# -- track(): the tracker stage, wherever it runs ----------------------------------------------
class TimedFrames:
    """A FrameSource (test double) that takes `wait_s` to produce each chunk; `closed` once
    its iteration is closed."""

    def __init__(self, chunks, wait_s=0.0):
        from serve_app.media import StageTimings

        self.chunks, self.wait_s, self.timings, self.closed = list(chunks), wait_s, StageTimings(), False

    def __iter__(self):
        import time

        try:
            for chunk in self.chunks:
                time.sleep(self.wait_s)
                self.timings.decode_ms += self.wait_s * 1e3
                yield chunk
        finally:
            self.closed = True


def shape_chunks(n=12, size=4):
    from serve_app.media import FrameChunk

    frames = np.stack(list(S.frames(n, 96, 64)))
    return [FrameChunk(s, frames[s:s + size]) for s in range(0, n, size)]


def test_track_applies_the_threshold_once_and_batches_every_frame_in_order():
    from serve_app.pipeline import track

    info = None  # the stand-in tracker reads nothing from it
    batches = list(track(ColorShapeTracker(), TimedFrames(shape_chunks()), info,
                         JobConfig(prompt="red", confidence_threshold=0.5), batch_frames=5))
    dets = [d for b in batches for d in b.detections]
    assert [d.frame_index for d in dets] == list(range(12))
    assert [len(b.detections) for b in batches] == [5, 5, 2]
    assert all(len(d) == 1 and d.scores.min() >= 0.5 for d in dets)  # the pale red square is dropped
    everything = [d for b in track(ColorShapeTracker(), TimedFrames(shape_chunks()), info,
                                   JobConfig(prompt="red", confidence_threshold=0.0)) for d in b.detections]
    assert all(len(d) == 2 for d in everything)


def test_track_time_excludes_the_waits_for_frames():
    from serve_app.pipeline import track

    batches = list(track(ColorShapeTracker(), TimedFrames(shape_chunks(), wait_s=0.2), None, JobConfig(prompt="red")))
    final = batches[-1].timings
    assert final.decode_ms == pytest.approx(600)
    assert 0 < final.track_ms < 200  # three chunks of 96x64 frames; the 0.6 s of waiting is not tracking


def test_frames_past_the_probed_count_are_a_model_error():
    from serve_app.pipeline import track

    class FirstChunkOnly(ColorShapeTracker):
        """A tracker (test double) that stops after the first chunk, as SAM 3 does at num_frames."""

        def track(self, chunks, info, config):
            for chunk in chunks:
                yield from super().track([chunk], info, config)
                return

    with pytest.raises(ModelError, match="decoder sent frames from 4 on"):
        list(track(FirstChunkOnly(), TimedFrames(shape_chunks()), None, JobConfig(prompt="red")))


def test_closing_the_stage_closes_the_tracker_and_its_frames():
    from serve_app.pipeline import track

    closed = []

    class Recording(ColorShapeTracker):
        def track(self, chunks, info, config):
            try:
                yield from super().track(chunks, info, config)
            finally:
                closed.append("tracker")

    frames = TimedFrames(shape_chunks())
    stage = track(Recording(), frames, None, JobConfig(prompt="red"), batch_frames=1)
    next(stage)
    stage.close()
    assert closed == ["tracker"] and frames.closed


# -- a prompt on a later frame, several concepts, boxes ---------------------------------------------
def test_a_prompt_frame_gives_the_same_masks_in_presentation_order(clip, tmp_path):
    """The stand-in finds its shapes on every frame, so a prompt on frame 25, tracked forward then
    backward and put back in order, gives the very masks a prompt on frame 0 gives."""
    first, later = tmp_path / "first.mp4", tmp_path / "later.mp4"
    run_local(clip, first, JobConfig(prompt="red blue"), ColorShapeTracker())
    done = []
    run_local(clip, later, JobConfig(prompt="red blue", prompt_frame=25), ColorShapeTracker(),
              progress=lambda n, total: done.append(n))
    a, b = read_frames(first, "gray"), read_frames(later, "gray")
    assert len(b) == N and all(np.array_equal(x >= 128, y >= 128) for x, y in zip(a, b))
    assert done == sorted(done) and done[-1] == N  # the frames tracked in both passes, then written


def test_a_prompt_frame_overlay_draws_every_frame_on_its_own_pixels(clip, tmp_path):
    out = tmp_path / "overlay.mp4"
    run_local(clip, out, JobConfig(prompt="blue", mode="overlay", prompt_frame=N - 1), ColorShapeTracker())
    src, dst = read_frames(clip, "rgb24"), read_frames(out, "rgb24")
    assert len(dst) == N
    for i in (0, N // 2, N - 1):  # the blue square is drawn where it is on that frame, not elsewhere
        inside = S.truth(i, N, W, H)[1]
        diff = np.abs(dst[i].astype(int) - src[i].astype(int)).mean(axis=2)
        assert diff[inside].mean() > 20 and np.median(diff[:H // 3, :W // 4]) < 3


def test_several_concepts_objects_json_names_each_objects_prompt(clip, tmp_path):
    import json

    out, objects = tmp_path / "c.mp4", tmp_path / "c.objects.json"
    config = JobConfig(prompts=["blue square", "yellow circle"], outputs=["video", "objects"])
    run_local(clip, out, config, ColorShapeTracker(), objects_path=objects)
    data = json.loads(objects.read_text())
    assert data["prompts"] == ["blue square", "yellow circle"]
    assert all(sorted(o["prompt"] for o in frame) == ["blue square", "yellow circle"] for frame in data["frames"])


def test_what_only_the_video_can_refuse_is_refused_naming_it(clip, tmp_path):
    from serve_app.errors import InvalidJob

    with pytest.raises(InvalidJob, match=f"config.prompt_frame is {N}; the video has {N} frames, 0 to {N - 1}"):
        run_local(clip, tmp_path / "x.mp4", JobConfig(prompt="red", prompt_frame=N), ColorShapeTracker())
    with pytest.raises(InvalidJob, match=rf"config.boxes\[1\].box is .*; it must lie within the {W}x{H} picture"):
        run_local(clip, tmp_path / "x.mp4", JobConfig(prompt="red", boxes=[
            {"box": [0, 0, 10, 10]}, {"box": [W - 5, 0, 10, 10], "label": False}]), ColorShapeTracker())
