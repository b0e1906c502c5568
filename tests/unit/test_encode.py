"""Mp4Writer: decode -> encode -> probe gives back the input's shape, timing, rotation and audio."""

from fractions import Fraction

import av
import numpy as np
import pytest

from serve_app.video.decode import iter_chunks
from serve_app.video.encode import Mp4Writer
from serve_app.video.probe import probe
from tests.videofactory import blob_mask, frame_index_of, make_video, seconds, top_level_boxes

VFR_MS = [0, 40, 80, 200, 230, 300, 420, 430, 440, 600, 700, 760]


def round_trip(src, dst, *, audio=True, **kw):
    info = probe(src)
    with Mp4Writer(dst, info, audio_source=src if audio else None, **kw) as writer:
        for chunk in iter_chunks(src, info):
            for frame in chunk.frames:
                writer.write(frame)
    return info, probe(dst)


def assert_same_video(a, b):
    assert (b.width, b.height, b.num_frames, b.rotation) == (a.width, a.height, a.num_frames, a.rotation)
    assert seconds(b) == pytest.approx(seconds(a), abs=1e-6)
    assert b.avg_fps == pytest.approx(a.avg_fps, rel=1e-3)


def audio_seconds(path):
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return float(s.duration * s.time_base)


def test_plain_round_trip_is_faststart(tmp_path):
    src = make_video(tmp_path / "in.mp4", width=64, height=48, num_frames=12)
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert_same_video(a, b)
    assert b.pix_fmt == "yuv420p"
    boxes = top_level_boxes(tmp_path / "out.mp4")
    assert boxes.index("moov") < boxes.index("mdat")


def test_variable_frame_rate_survives(tmp_path):
    src = make_video(tmp_path / "vfr.mp4", pts=VFR_MS, time_base=Fraction(1, 1000))
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert_same_video(a, b)
    assert seconds(b) == pytest.approx([ms / 1000 for ms in VFR_MS], abs=1e-6)


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotation_metadata_and_pixels_survive(tmp_path, rotation):
    src = make_video(tmp_path / "rot.mp4", width=64, height=48, num_frames=6, rotation=rotation)
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert_same_video(a, b)
    frames = np.concatenate([c.frames for c in iter_chunks(tmp_path / "out.mp4", b)])
    assert [frame_index_of(f) for f in frames] == list(range(6))


def test_edit_list_input_gives_presented_frames_only(tmp_path):
    src = make_video(tmp_path / "el.mp4", pts=[i - 5 for i in range(20)])
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert b.num_frames == 15
    assert_same_video(a, b)
    frames = np.concatenate([c.frames for c in iter_chunks(tmp_path / "out.mp4", b)])
    assert [frame_index_of(f) for f in frames] == list(range(5, 20))


def test_odd_size_keeps_its_size(tmp_path):
    src = make_video(tmp_path / "odd.mp4", width=641, height=361, num_frames=3, pix_fmt="yuv444p")
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert_same_video(a, b)
    assert b.pix_fmt == "yuv444p"  # 4:2:0 cannot hold an odd size


def test_pcm_audio_in_mov_is_transcoded_to_aac(tmp_path):
    src = make_video(tmp_path / "pcm.mov", fmt="mov", num_frames=25, audio="pcm_s16le")
    a, b = round_trip(src, tmp_path / "out.mp4")
    assert_same_video(a, b)
    assert b.audio.codec == "aac"
    assert audio_seconds(tmp_path / "out.mp4") == pytest.approx(audio_seconds(src), abs=0.05)


def test_aac_audio_is_copied_unchanged(tmp_path):
    src = make_video(tmp_path / "aac.mp4", num_frames=25, audio="aac")
    round_trip(src, tmp_path / "out.mp4")
    with av.open(str(src)) as i, av.open(str(tmp_path / "out.mp4")) as o:
        before = [bytes(p) for p in i.demux(i.streams.audio[0]) if p.size]
        after = [bytes(p) for p in o.demux(o.streams.audio[0]) if p.size]
    assert after == before


def test_no_audio_source_means_no_audio(tmp_path):
    src = make_video(tmp_path / "aac.mp4", num_frames=5, audio="aac")
    _, b = round_trip(src, tmp_path / "out.mp4", audio=False)
    assert b.audio is None


@pytest.mark.parametrize("preset", ["ultrafast", "veryfast"])  # mask mode's and overlay's
@pytest.mark.parametrize("size", [(96, 64), (97, 63), (640, 360)])
def test_mask_video_thresholds_back_exactly(tmp_path, size, preset):
    width, height = size
    src = make_video(tmp_path / "in.mp4", width=width, height=height, num_frames=8, pix_fmt="yuv444p")
    info = probe(src)
    masks = [blob_mask(i, height, width) for i in range(8)]
    with Mp4Writer(tmp_path / "mask.mp4", info, preset=preset) as writer:
        for m in masks:
            writer.write(m)
    out = probe(tmp_path / "mask.mp4")
    frames = np.concatenate([c.frames for c in iter_chunks(tmp_path / "mask.mp4", out)])
    for got, want in zip(frames, masks, strict=True):
        assert np.array_equal(np.where(got[..., 0] >= 128, 255, 0), want)


def test_wrong_frames_are_refused(tmp_path):
    src = make_video(tmp_path / "in.mp4", width=64, height=48, num_frames=2)
    info = probe(src)
    with Mp4Writer(tmp_path / "out.mp4", info) as writer:
        with pytest.raises(ValueError, match=r"expected \(48, 64, 3\)"):
            writer.write(np.zeros((64, 48, 3), np.uint8))
        writer.write(np.zeros((48, 64, 3), np.uint8))
        writer.write(np.zeros((48, 64), np.uint8))
        with pytest.raises(ValueError, match="past the video's 2 frames"):
            writer.write(np.zeros((48, 64, 3), np.uint8))


def test_real_clip_with_mp3_audio(cockatoo, tmp_path):
    a, b = round_trip(cockatoo, tmp_path / "out.mp4", preset="ultrafast")
    assert (b.width, b.height, b.num_frames, b.avg_fps) == (1280, 720, 280, 20)
    assert_same_video(a, b)
    assert b.audio.codec == "mp3"
    assert audio_seconds(tmp_path / "out.mp4") == pytest.approx(audio_seconds(cockatoo), abs=0.01)
    boxes = top_level_boxes(tmp_path / "out.mp4")
    assert boxes.index("moov") < boxes.index("mdat")
