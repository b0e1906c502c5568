"""Uploads the service must refuse, made with PyAV (tests/videofactory.py), and what it must say.

Each entry: (bytes, HTTP status, words the error message must all contain, the typed error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve_app.errors import ServiceError, UnsupportedMedia, VideoLimitExceeded
from tests import videofactory as vf


def _flat(i: int, height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 90, np.uint8)


NAMES = ("zero bytes", "random bytes", "truncated mp4", "truncated faststart mp4", "audio only",
         "webm named .mp4", "mkv named .mp4", "ts named .mp4", "8K")


def make_bad_uploads(tmp: Path) -> dict[str, tuple[bytes, int, tuple[str, ...], type[ServiceError]]]:
    good = vf.make_video(tmp / "good.mp4", width=96, height=64, num_frames=24)
    # The same picture in other containers, each saved under an .mp4 name as a user might.
    webm = vf.make_video(tmp / "webm.mp4", width=96, height=64, num_frames=8, codec="libvpx-vp9", fmt="webm")
    mkv = vf.make_video(tmp / "mkv.mp4", width=96, height=64, num_frames=8, fmt="matroska")
    ts = vf.make_video(tmp / "ts.mp4", width=96, height=64, num_frames=8, fmt="mpegts")
    audio = vf.make_audio_only(tmp / "audio.mp4", seconds=0.5)
    # 8K UHD, one flat frame: a few KB, refused by picture size before anything is decoded.
    eight_k = vf.make_video(tmp / "8k.mp4", width=7680, height=4320, num_frames=1, frame_fn=_flat,
                            options={"preset": "ultrafast"})
    truncated = vf.truncate(good, tmp / "truncated.mp4", keep=0.6)  # cut before its index (moov)
    faststart = vf.make_video(tmp / "faststart.mp4", width=96, height=64, num_frames=24, faststart=True)
    truncated_faststart = vf.truncate(faststart, tmp / "truncated_faststart.mp4", keep=0.6)
    rng = np.random.default_rng(7)
    return {
        "zero bytes": (b"", 415, ("empty", "0 bytes"), UnsupportedMedia),
        "random bytes": (rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(), 415, ("not a readable MP4",),
                         UnsupportedMedia),
        "truncated mp4": (truncated.read_bytes(), 415, ("not a readable MP4",), UnsupportedMedia),
        "truncated faststart mp4": (truncated_faststart.read_bytes(), 415, ("truncated",), UnsupportedMedia),
        "audio only": (audio.read_bytes(), 415, ("no video stream", "audio only"), UnsupportedMedia),
        "webm named .mp4": (webm.read_bytes(), 415, ("container", "webm", "only MP4/MOV"), UnsupportedMedia),
        "mkv named .mp4": (mkv.read_bytes(), 415, ("container", "matroska", "only MP4/MOV"), UnsupportedMedia),
        "ts named .mp4": (ts.read_bytes(), 415, ("container", "mpegts", "only MP4/MOV"), UnsupportedMedia),
        "8K": (eight_k.read_bytes(), 413, ("7680x4320", "3840"), VideoLimitExceeded),
    }
