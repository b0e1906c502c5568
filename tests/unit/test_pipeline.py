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
