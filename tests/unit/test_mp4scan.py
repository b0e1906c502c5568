"""scan(): an MP4's declared sample counts are judged from its box headers before FFmpeg opens it.

Hostile files are real small clips with one field rewritten in place (sizes unchanged), so each
test shows exactly which claim the scanner must catch.
"""

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from serve_app.errors import UnsupportedMedia, VideoLimitExceeded
from serve_app.video.mp4scan import scan
from tests.videofactory import box_anywhere, box_in_track, make_video, pattern, rewrite, top_level_boxes, truncate

LIMIT = 18_000  # the service's frame limit


# -- making and rewriting files ---------------------------------------------------------------


def write(path, *, frames=10, fmt=None, options=None, audio=None, rate=48000, seconds=None,
          extra_audio=0, gop=None) -> Path:
    """A 64x48 h264 clip at 25 fps, optionally with `audio` (a tone) and more audio tracks."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        if gop:
            vs.codec_context.gop_size = gop
        streams = [out.add_stream(audio, rate=rate) for _ in range(1 + extra_audio)] if audio else []
        for s in streams:
            s.layout = "mono"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, 48, 64), format="rgb24")
            frame.pts = i
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        n = int(rate * (seconds if seconds is not None else frames / 25))
        pcm = (np.sin(np.arange(n) * 2 * np.pi * 440 / rate) * 8000).astype(np.int16)
        for s in streams:
            for at in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(pcm[None, at:at + 1024], format="s16", layout="mono")
                af.sample_rate, af.pts, af.time_base = rate, at, Fraction(1, rate)
                out.mux(s.encode(af))
            out.mux(s.encode())
    return Path(path)


def u32(path: Path, offset: int) -> int:
    return struct.unpack(">I", path.read_bytes()[offset:offset + 4])[0]


def refused(path, err=VideoLimitExceeded, **limits):
    limits.setdefault("max_video_samples", LIMIT)
    t = time.perf_counter()
    with pytest.raises(err) as info:
        scan(path, **limits)
    assert time.perf_counter() - t < 1.0
    return str(info.value)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp4scan")
    return {
        "small": write(d / "small.mp4"),  # moov after mdat: boxes may grow without moving data
        "aac": write(d / "aac.mp4", frames=25, audio="aac"),
        "faststart": write(d / "fast.mp4", frames=25, audio="aac", options={"movflags": "+faststart"}),
        "fragmented": write(d / "frag.mp4", frames=30, gop=5, audio="aac",
                            options={"movflags": "frag_keyframe+empty_moov"}),
        "pcm": write(d / "pcm.mov", frames=50, audio="pcm_s16le", seconds=2.0),
        "three": write(d / "three.mp4", audio="aac", extra_audio=1),
    }


# -- real files pass ---------------------------------------------------------------------------


def test_real_clips_pass(cockatoo, bikes):
    for path in (cockatoo, bikes):
        scan(path, max_video_samples=LIMIT)


@pytest.mark.parametrize("name", ["small", "aac", "faststart", "fragmented", "pcm", "three"])
def test_made_files_pass(made, name):
    tops = top_level_boxes(made[name])
    assert name != "faststart" or tops.index("moov") < tops.index("mdat")
    assert name != "fragmented" or tops.count("moof") >= 6  # 30 frames, a keyframe every 5
    scan(made[name], max_video_samples=LIMIT)


def test_the_frame_limit_is_exact(made):
    scan(made["small"], max_video_samples=10)
    assert refused(made["small"], max_video_samples=9) == (
        "the file declares 10 video frames; the limit is 9")


def test_fragments_are_summed_per_track(made):
    scan(made["fragmented"], max_video_samples=30)
    assert refused(made["fragmented"], max_video_samples=29) == (
        "the file declares 30 video frames; the limit is 29")


def test_uncompressed_audio_is_judged_by_its_chunks(made, tmp_path):
    pcm = made["pcm"]
    data = pcm.read_bytes()
    stsz, stts = box_in_track(data, b"soun", b"stsz"), box_in_track(data, b"soun", b"stts")
    assert u32(pcm, stsz + 16) == 96_000  # one stsz sample per PCM sample: 2 s at 48 kHz
    assert (u32(pcm, stts + 12), u32(pcm, stts + 20)) == (1, 1)  # FFmpeg's per-chunk case
    scan(pcm, max_video_samples=LIMIT, max_other_samples=1000)
    # The same table with a sample_delta of 2 is indexed per sample: then 96,000 is the claim.
    per_sample = rewrite(pcm, tmp_path / "delta2.mov", [(stts + 20, 2)])
    assert refused(per_sample, max_other_samples=1000) == (
        "an audio track declares 96,000 samples; the limit is 1,000")


@pytest.mark.parametrize("fmt,codec", [("webm", "libvpx"), ("matroska", "libx264"), ("mpegts", "libx264")])
def test_other_containers_pass_through(tmp_path, fmt, codec):
    scan(make_video(tmp_path / "renamed.mp4", fmt=fmt, codec=codec, num_frames=3), max_video_samples=1)


def test_random_empty_and_tiny_files_pass_through(tmp_path):
    rng = np.random.default_rng(7)
    for i in range(20):
        (tmp_path / "r.mp4").write_bytes(rng.bytes(int(rng.integers(1, 50_000))))
        scan(tmp_path / "r.mp4", max_video_samples=1)
    for data in (b"", b"\0", b"\0\0\0\x08ftyp", b"\0\0\0\x01moov\0\0"):
        (tmp_path / "t.mp4").write_bytes(data)
        scan(tmp_path / "t.mp4", max_video_samples=1)


def test_truncated_files_and_trailing_garbage_pass(made, tmp_path):
    for name in ("small", "faststart"):
        for keep in (0.02, 0.3, 0.5, 0.9, 0.995):
            scan(truncate(made[name], tmp_path / "cut.mp4", keep=keep), max_video_samples=LIMIT)
    (tmp_path / "tail.mp4").write_bytes(made["small"].read_bytes() + os.urandom(999))
    scan(tmp_path / "tail.mp4", max_video_samples=LIMIT)


def test_a_cut_moov_is_judged_on_what_is_there(made, tmp_path):
    fast = made["faststart"]
    stsz = box_in_track(fast.read_bytes(), b"vide", b"stsz")
    hostile = rewrite(fast, tmp_path / "h.mp4", [(stsz + 12, 1000), (stsz + 16, 80_000_000)])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(hostile.read_bytes()[:stsz + 40])  # the file ends just past the video stsz
    assert "80,000,000 video frames" in refused(cut)


def test_a_100_mb_mdat_is_seeked_over(made, tmp_path):
    """A 64-bit mdat of 100 MB (sparse) costs neither reading time nor memory."""
    data = made["small"].read_bytes()
    moov = box_anywhere(data, b"moov")
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.write(data[:box_anywhere(data, b"free")] + struct.pack(">I4sQ", 1, b"mdat", 16 + 100_000_000))
        f.seek(100_000_000, os.SEEK_CUR)
        f.write(data[moov:])
    tracemalloc.start()
    t = time.perf_counter()
    scan(big, max_video_samples=10)
    elapsed, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.2 and peak < 2_000_000
    assert "10 video frames" in refused(big, max_video_samples=9)


# -- hostile claims are refused ----------------------------------------------------------------


def test_stsz_count_of_80_million_is_refused(made, tmp_path):
    stsz = box_in_track(made["small"].read_bytes(), b"vide", b"stsz")
    assert u32(made["small"], stsz + 16) == 10
    count_only = rewrite(made["small"], tmp_path / "a.mp4", [(stsz + 16, 80_000_000)])
    constant = rewrite(made["small"], tmp_path / "b.mp4", [(stsz + 12, 1000), (stsz + 16, 80_000_000)])
    for path in (count_only, constant):
        assert refused(path) == "the file declares 80,000,000 video frames; the limit is 18,000"


def test_stts_count_of_80_million_is_refused(made, tmp_path):
    stts = box_in_track(made["small"].read_bytes(), b"vide", b"stts")
    assert (u32(made["small"], stts + 12), u32(made["small"], stts + 16)) == (1, 10)
    path = rewrite(made["small"], tmp_path / "stts.mp4", [(stts + 16, 80_000_000)])
    assert refused(path) == "the file declares 80,000,000 video frames; the limit is 18,000"


def test_an_audio_claim_is_refused_by_its_own_limit(made, tmp_path):
    stsz = box_in_track(made["aac"].read_bytes(), b"soun", b"stsz")
    path = rewrite(made["aac"], tmp_path / "a.mp4", [(stsz + 12, 100), (stsz + 16, 5_000_000)])
    assert refused(path) == "an audio track declares 5,000,000 samples; the limit is 1,000,000"


def test_uncompressed_audio_with_huge_chunks_is_refused(made, tmp_path):
    stsc = box_in_track(made["pcm"].read_bytes(), b"soun", b"stsc")
    first_spc = stsc + 20  # samples_per_chunk of the first entry
    path = rewrite(made["pcm"], tmp_path / "spc.mov", [(first_spc, 4_000_000_000)])
    message = refused(path)
    assert message.startswith("an audio track declares") and message.endswith(
        " packets; the limit is 1,000,000")


@pytest.mark.parametrize("kind", [b"stts", b"ctts", b"stsc", b"stco", b"stss"])
def test_a_table_claiming_more_entries_than_its_box_holds_is_malformed(made, tmp_path, kind):
    data = made["small"].read_bytes()
    at = box_in_track(data, b"vide", kind)
    size = u32(made["small"], at)
    path = rewrite(made["small"], tmp_path / "lie.mp4", [(at + 12, 5_000_000)])
    assert refused(path, UnsupportedMedia) == (
        f"not a readable MP4 video ({kind.decode()} box declares 5,000,000 entries in {size} bytes)")


def test_a_fragment_claiming_too_many_samples_is_refused(made, tmp_path):
    frag = made["fragmented"]
    trun = box_anywhere(frag.read_bytes(), b"trun")
    # Without per-sample fields the count costs nothing to write and everything to index.
    no_fields = rewrite(frag, tmp_path / "f1.mp4", [(trun + 8, 0), (trun + 12, 80_000_000)])
    assert refused(no_fields) == "the file declares 80,000,000 video frames; the limit is 18,000"
    with_fields = rewrite(frag, tmp_path / "f2.mp4", [(trun + 12, 80_000_000)])
    assert "trun box declares 80,000,000 entries" in refused(with_fields, UnsupportedMedia)


def test_too_many_tracks(made):
    scan(made["three"], max_video_samples=LIMIT, max_tracks=3)
    assert refused(made["three"], max_tracks=2) == (
        "the file declares more than 2 tracks; the limit is 2")


def append_to_video_trak(src: Path, dst: Path, box: bytes) -> Path:
    """`src` (moov after mdat, so no offset moves) with `box` as the video trak's last child."""
    data = bytearray(src.read_bytes())
    trak = box_in_track(data, b"vide", b"tkhd") - 8  # the trak's first child is its tkhd
    end = trak + u32(src, trak)
    data[end:end] = box
    for at in (box_anywhere(data, b"moov"), trak):
        data[at:at + 4] = struct.pack(">I", struct.unpack(">I", data[at:at + 4])[0] + len(box))
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("wrapper", [b"udta", b"tref", b"dinf"])
def test_a_table_hidden_where_ffmpeg_still_reads_it_is_refused(made, tmp_path, wrapper):
    """FFmpeg parses these (and sample descriptions) as containers and gives an stsz inside
    them to the track: 20 M frames then cost ~250 MB at open, as below."""
    stsz = struct.pack(">I4sIII", 20, b"stsz", 0, 1000, 20_000_000)
    path = append_to_video_trak(made["small"], tmp_path / "hidden.mp4",
                                struct.pack(">I4s", 28, wrapper) + stsz)
    assert refused(path, UnsupportedMedia) == (
        "not a readable MP4 video (stsz box outside a sample table)")
    # FFmpeg never looks inside free space, so neither does the scan.
    ignored = append_to_video_trak(made["small"], tmp_path / "free.mp4",
                                   struct.pack(">I4s", 28, b"free") + stsz)
    scan(ignored, max_video_samples=LIMIT)


def test_boxes_that_do_not_nest_are_malformed(made, tmp_path):
    data = made["small"].read_bytes()
    stbl = box_in_track(data, b"vide", b"stbl")
    over = rewrite(made["small"], tmp_path / "over.mp4", [(stbl, u32(made["small"], stbl) + 9)])
    assert "overruns its minf box" in refused(over, UnsupportedMedia)
    small = rewrite(made["small"], tmp_path / "small.mp4", [(stbl, 4)])
    assert "stbl box in minf has an impossible size" in refused(small, UnsupportedMedia)


def test_a_compressed_moov_is_refused(made, tmp_path):
    """Its tables are zlib-packed: FFmpeg unpacks them, the scan cannot judge them."""
    cmov = struct.pack(">I4sI4s4s", 20, b"cmov", 12, b"dcom", b"zlib")
    path = append_to_video_trak(made["small"], tmp_path / "cmov.mp4", cmov)
    assert "compressed movie header" in refused(path, UnsupportedMedia)


def test_a_flood_of_boxes_is_refused(made, tmp_path, monkeypatch):
    from serve_app.video import mp4scan

    monkeypatch.setattr(mp4scan, "MAX_BOXES", 1000)
    (tmp_path / "flood.mp4").write_bytes(made["small"].read_bytes() + b"\0\0\0\x08free" * 1000)
    assert "more than 1,000 boxes" in refused(tmp_path / "flood.mp4", UnsupportedMedia)


# -- the danger is real, and the scan avoids it ------------------------------------------------

CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import av
try:
    with av.open(sys.argv[1]) as c:
        result = {"index": len(c.streams.video[0].index_entries)}
except Exception as e:
    result = {"error": type(e).__name__}
result["hwm_mb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps(result))
"""


def open_in_child(path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
        "error": f"exit {out.returncode}"}


def rss_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def test_ffmpeg_pays_for_the_claim_and_the_scan_does_not(made, tmp_path):
    stsz = box_in_track(made["small"].read_bytes(), b"vide", b"stsz")
    claims = {n: rewrite(made["small"], tmp_path / f"{n}.mp4", [(stsz + 12, 1000), (stsz + 16, n)])
              for n in (20_000_000, 80_000_000)}
    honest = open_in_child(made["small"])
    assert honest["index"] == 10
    # 20 M claimed frames of a 10-frame file: FFmpeg touches ~12 bytes per claimed frame at open.
    twenty = open_in_child(claims[20_000_000])
    assert "error" in twenty or twenty["hwm_mb"] > honest["hwm_mb"] + 150, (honest, twenty)
    # 80 M: the index no longer fits a 1 GiB address space, and FFmpeg opens the file without it.
    eighty = open_in_child(claims[80_000_000])
    assert "error" in eighty or eighty["index"] != 10 or eighty["hwm_mb"] > 500, eighty

    before = rss_mb()
    for n, path in claims.items():
        assert f"{n:,} video frames" in refused(path)
    assert rss_mb() - before < 20
