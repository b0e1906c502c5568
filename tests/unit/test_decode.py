"""iter_chunks(): exactly the frames a player shows, in order, display orientation, either decoder."""

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from serve_app.errors import UnsupportedMedia
from serve_app.video.decode import iter_chunks
from serve_app.video.probe import probe
from tests.videofactory import frame_index_of, make_video, truncate

VFR_MS = [0, 40, 80, 200, 230, 300, 420, 430, 440, 600, 700, 760]


def decode_all(path, info, chunk_frames=4):
    chunks = list(iter_chunks(path, info, chunk_frames=chunk_frames))
    frames = np.concatenate([c.frames for c in chunks]) if chunks else np.zeros((0,))
    return chunks, frames


def as_decoder(info, name):
    return dataclasses.replace(info, decoder=name)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_plain_clip_in_order_and_in_chunks(tmp_path, decoder):
    path = make_video(tmp_path / "p.mp4", width=64, height=48, num_frames=10)
    info = as_decoder(probe(path), decoder)
    chunks, frames = decode_all(path, info, chunk_frames=4)
    assert [c.start for c in chunks] == [0, 4, 8] and [len(c) for c in chunks] == [4, 4, 2]
    assert frames.shape == (10, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_index_of(f) for f in frames] == list(range(10))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_variable_frame_rate(tmp_path, decoder):
    # B-frames reorder these irregular timestamps in the file; both decoders present them in order.
    path = make_video(tmp_path / "vfr.mp4", pts=VFR_MS, time_base=Fraction(1, 1000))
    info = as_decoder(probe(path), decoder)
    _, frames = decode_all(path, info)
    assert [frame_index_of(f) for f in frames] == list(range(len(VFR_MS)))


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_phone_video_comes_out_upright(tmp_path, rotation):
    path = make_video(tmp_path / "rot.mp4", width=64, height=48, num_frames=6, rotation=rotation)
    info = probe(path)
    _, frames = decode_all(path, info)
    disp_w, disp_h = info.display_size
    assert frames.shape == (6, disp_h, disp_w, 3)
    # The index blocks were drawn upright; they read back only if the turn is right.
    assert [frame_index_of(f) for f in frames] == list(range(6))


def test_pyav_and_decord_agree_on_half_turns(tmp_path):
    path = make_video(tmp_path / "rot.mp4", width=64, height=48, num_frames=4, rotation=180)
    info = probe(path)
    _, a = decode_all(path, as_decoder(info, "decord"))
    _, b = decode_all(path, as_decoder(info, "pyav"))
    assert np.array_equal(a, b)


def test_edit_list_shows_only_presented_frames(tmp_path):
    path = make_video(tmp_path / "el.mp4", pts=[i - 5 for i in range(20)])
    info = probe(path)
    _, frames = decode_all(path, info)
    assert [frame_index_of(f) for f in frames] == list(range(5, 20))


def test_decord_gets_edit_lists_wrong(tmp_path):
    """Why the edit-list rule exists. If this starts failing, decord was fixed: revisit the rule."""
    import decord

    path = make_video(tmp_path / "el.mp4", pts=[i - 5 for i in range(20)])
    reader = decord.VideoReader(str(path))
    got = [frame_index_of(reader[i].asnumpy()) for i in range(len(reader))]
    assert got != list(range(5, 20))


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_both_decoders_give_the_same_pixels(tmp_path, pix_fmt):
    path = make_video(tmp_path / "p.mp4", width=96, height=64, num_frames=8, pix_fmt=pix_fmt)
    info = probe(path)
    _, a = decode_all(path, as_decoder(info, "decord"))
    _, b = decode_all(path, as_decoder(info, "pyav"))
    # Measured: identical, no tolerance needed (same for the real clips below).
    assert np.array_equal(a, b)


def test_both_decoders_agree_on_a_real_clip(bikes):
    info = probe(bikes)
    a = [c.frames for c in iter_chunks(bikes, as_decoder(info, "decord"), chunk_frames=50)]
    b = [c.frames for c in iter_chunks(bikes, as_decoder(info, "pyav"), chunk_frames=50)]
    assert sum(len(x) for x in a) == 250
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_fewer_frames_than_probed_is_an_error(tmp_path, decoder):
    path = make_video(tmp_path / "long.mp4", width=128, height=96, num_frames=60, faststart=True)
    info = as_decoder(probe(path), decoder)
    cut = truncate(path, tmp_path / "cut.mp4", keep=0.5)
    with pytest.raises(UnsupportedMedia, match="of 60 frames decode|damaged|cannot be opened"):
        for _ in iter_chunks(cut, info):
            pass


def test_real_clip_frame_count(cockatoo):
    info = probe(cockatoo)
    n = sum(len(c) for c in iter_chunks(cockatoo, info, chunk_frames=64))
    assert n == 280


# Decoding from a start index (the decoder's pull API reopens a video mid-way): the clips each
# decoder is given in service. Edit lists and quarter turns go to PyAV only (probe.py).
START_CLIPS = {
    "plain": (dict(width=64, height=48, num_frames=30, options={"g": "8", "bf": "2"}), ["decord", "pyav"]),
    "vfr": (dict(pts=VFR_MS, time_base=Fraction(1, 1000), options={"g": "4"}), ["decord", "pyav"]),
    "edit_list": (dict(pts=[i - 5 for i in range(20)]), ["pyav"]),
    "rotated_90": (dict(width=64, height=48, num_frames=12, rotation=90), ["pyav"]),
    "rotated_180": (dict(width=64, height=48, num_frames=12, rotation=180), ["decord", "pyav"]),
}


@pytest.mark.parametrize("clip, decoder", [(c, d) for c, (_, ds) in START_CLIPS.items() for d in ds])
def test_decoding_from_a_start_index_gives_the_full_decodes_frames_from_there(tmp_path, clip, decoder):
    path = make_video(tmp_path / f"{clip}.mp4", **START_CLIPS[clip][0])
    info = as_decoder(probe(path), decoder)
    _, full = decode_all(path, info, chunk_frames=4)
    n = info.num_frames
    assert len(full) == n
    for start in sorted({1, 3, 4, 5, n // 2, n - 1, n}):
        chunks = list(iter_chunks(path, info, chunk_frames=4, start=start))
        assert [c.start for c in chunks] == list(range(start, n, 4)), (start, [c.start for c in chunks])
        got = np.concatenate([c.frames for c in chunks]) if chunks else full[:0]
        assert np.array_equal(got, full[start:]), f"{clip}/{decoder} from frame {start}"


def test_a_reader_skips_forward_only_and_reads_nothing_past_the_end(tmp_path):
    from serve_app.video.decode import ChunkReader

    path = make_video(tmp_path / "p.mp4", num_frames=10)
    reader = ChunkReader(path, probe(path), chunk_frames=4)
    try:
        with pytest.raises(ValueError, match="only moves forward"):
            reader.skip(-1)
        reader.skip(7)
        chunk = reader.read()
        assert chunk.start == 7 and [frame_index_of(f) for f in chunk.frames] == [7, 8, 9]
        assert reader.read() is None and reader.position == 10
    finally:
        reader.close()


def test_a_truncated_file_fails_from_a_start_index_too(tmp_path):
    path = make_video(tmp_path / "long.mp4", width=128, height=96, num_frames=60, faststart=True)
    info = as_decoder(probe(path), "pyav")
    cut = truncate(path, tmp_path / "cut.mp4", keep=0.5)
    with pytest.raises(UnsupportedMedia, match="of 60 frames decode|damaged"):
        for _ in iter_chunks(cut, info, start=40):
            pass


@pytest.mark.parametrize("clip, decoder", [(c, d) for c, (_, ds) in START_CLIPS.items() for d in ds])
def test_a_backward_pass_reads_the_same_frames_chunk_by_chunk_in_reverse(tmp_path, clip, decoder):
    """What a prompt on a later frame needs: chunks read in reverse, each by seeking back (from
    the keyframe before it, with PyAV), give the full decode's very pixels."""
    from serve_app.media import chunk_plan
    from serve_app.video.decode import ChunkReader

    path = make_video(tmp_path / f"{clip}.mp4", **START_CLIPS[clip][0])
    info = as_decoder(probe(path), decoder)
    _, full = decode_all(path, info, chunk_frames=4)
    for prompt_frame in sorted({1, info.num_frames // 2, info.num_frames - 1}):
        reader = ChunkReader(path, info, chunk_frames=4)
        try:
            for first, count, step in chunk_plan(info.num_frames, 4, prompt_frame):
                reader.seek(first if step == 1 else first - count + 1)
                chunk = reader.read(count)
                want = full[first:first + count] if step == 1 else full[first - count + 1:first + 1]
                assert np.array_equal(chunk.frames, want), f"{clip}/{decoder} {first} {count} {step}"
        finally:
            reader.close()


def test_a_backward_pass_survives_keyframes_ffmpeg_cannot_decode_from(cockatoo):
    """The cockatoo clip's later IDR frames decode corrupt after a seek (FFmpeg flags them): the
    reader goes back further rather than hand the tracker broken frames."""
    from serve_app.media import chunk_plan
    from serve_app.video.decode import ChunkReader

    info = as_decoder(probe(cockatoo), "pyav")
    _, full = decode_all(cockatoo, info, chunk_frames=32)
    reader = ChunkReader(cockatoo, info, chunk_frames=32)
    try:
        for first, count, step in chunk_plan(info.num_frames, 32, 200)[2:]:  # the backward chunks
            reader.seek(first - count + 1)
            assert np.array_equal(reader.read(count).frames, full[first - count + 1:first + 1]), first
    finally:
        reader.close()
