"""Makes small, odd test videos with PyAV only (CI has no ffmpeg command line).

Every frame carries its own index as a row of black/white blocks across the top, so a test can
read back which source frame a decoder returned, through lossy coding and rotation
(`frame_index_of`). The rest of the picture is a smooth gradient that moves with the index.
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np

INDEX_BITS = 8  # up to 255 frames; blocks stay >= 6 px wide on 48-px clips


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) RGB uint8 frame number `i`: gradient body, index blocks in the top band."""
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = ((x * 255) // max(width - 1, 1) + 7 * i) % 256
    img[..., 1] = ((y * 255) // max(height - 1, 1) + 3 * i) % 256
    img[..., 2] = 128
    band = max(height // 6, 8)
    block = width // INDEX_BITS
    for b in range(INDEX_BITS):
        img[:band, b * block:(b + 1) * block] = 255 if (i >> b) & 1 else 0
    return img


def frame_index_of(frame: np.ndarray) -> int:
    """Reads back the index `pattern` wrote into a display-orientation frame."""
    height, width = frame.shape[:2]
    band = max(height // 6, 8)
    block = width // INDEX_BITS
    gray = frame[..., :3].mean(axis=-1) if frame.ndim == 3 else frame
    value = 0
    for b in range(INDEX_BITS):
        m = max(block // 4, 1)
        cell = gray[m:band - m, b * block + m:(b + 1) * block - m]
        if cell.mean() > 127:
            value |= 1 << b
    return value


def rotate_display(frame: np.ndarray, rotation: int) -> np.ndarray:
    """What a player shows for a coded frame with `rotation` degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(frame, k=(rotation // 90) % 4))


def make_video(
    path: str | os.PathLike,
    *,
    width: int = 64,
    height: int = 48,
    num_frames: int = 10,
    fps: int = 25,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    fmt: str | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
    audio: str | None = None,
    audio_seconds: float | None = None,
    faststart: bool = False,
    options: dict[str, str] | None = None,
    frame_fn: Callable[[int, int, int], np.ndarray] | None = None,
) -> Path:
    """Writes a clip whose *display* frame i is `frame_fn(i, H, W)` (default `pattern`).

    `pts` sets per-frame timestamps in `time_base` (variable frame rate; negative values make the
    mp4 muxer write an edit list that hides those frames). `rotation` writes a display matrix:
    frames are stored rotated back so a player shows `frame_fn`'s picture. `audio` is an FFmpeg
    encoder name ("aac", "libmp3lame"/"mp3", "pcm_s16le", "libopus"...).
    """
    path = Path(path)
    frame_fn = frame_fn or pattern
    time_base = time_base or Fraction(1, fps)
    if pts is None:
        step = int(round(1 / (time_base * fps)))
        pts = [i * step for i in range(num_frames)]
    num_frames = len(pts)
    disp_w, disp_h = (height, width) if rotation % 180 == 90 else (width, height)
    container_opts = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=container_opts) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height = width, height
        vs.pix_fmt = pix_fmt or ("yuv420p" if codec != "libvpx-vp9" else "yuv420p")
        vs.time_base = time_base
        vs.codec_context.time_base = time_base
        if options:
            vs.options = dict(options)
        if rotation:
            vs.set_display_rotation(rotation)
        astream = None
        if audio:
            astream = out.add_stream(audio, rate=44100 if "opus" not in audio else 48000)
            try:
                astream.layout = "mono"
            except Exception:
                pass
        for i, t in enumerate(pts):
            disp = frame_fn(i, disp_h, disp_w)
            coded = np.ascontiguousarray(np.rot90(disp, k=-(rotation // 90) % 4)) if rotation else disp
            if coded.ndim == 2:
                frame = av.VideoFrame.from_ndarray(coded, format="gray")
            else:
                frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts = int(t)
            frame.time_base = time_base
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if astream is not None:
            seconds = audio_seconds if audio_seconds is not None else float((pts[-1] + 1) * time_base)
            _write_tone(out, astream, seconds)
    return path


def _write_tone(out, astream, seconds: float) -> None:
    rate = astream.codec_context.sample_rate
    n = int(rate * seconds)
    t = np.arange(n) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    step = 1024
    for s in range(0, n, step):
        chunk = pcm[None, s:s + step]
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = s
        frame.time_base = Fraction(1, rate)
        for packet in astream.encode(frame):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def make_audio_only(path: str | os.PathLike, seconds: float = 1.0, codec: str = "aac") -> Path:
    path = Path(path)
    with av.open(str(path), "w") as out:
        astream = out.add_stream(codec, rate=44100)
        astream.layout = "mono"
        _write_tone(out, astream, seconds)
    return path


def truncate(src: str | os.PathLike, dst: str | os.PathLike, keep: float = 0.5) -> Path:
    """Copies the first `keep` share of the bytes: a download cut short."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def blob_mask(i: int, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/255: an irregular moving blob with a ragged edge (mask-mode test)."""
    rng = np.random.default_rng(1000 + i)
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    cy, cx = height * (0.3 + 0.02 * i), width * (0.4 + 0.03 * i)
    r = min(height, width) * 0.25
    angle = np.arctan2(y - cy, x - cx)
    radius = r * (1 + 0.3 * np.sin(5 * angle + i))
    inside = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    speckle = rng.random((height, width)) < 0.002
    return np.where(inside ^ speckle, 255, 0).astype(np.uint8)


def top_level_boxes(path: str | os.PathLike) -> list[str]:
    """The mp4's top-level box types in file order ("ftyp", "moov", "mdat", ...)."""
    import struct

    data = Path(path).read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        boxes.append(kind.decode("latin-1"))
        pos += size
    return boxes


def seconds(info) -> list[float]:
    """A VideoInfo's presentation times in seconds from its first frame."""
    return [float((p - info.pts[0]) * info.time_base) for p in info.pts]


# -- ISO-BMFF boxes, to make files that claim what they do not hold -------------------------
BOX_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf"}


def boxes(data, pos=0, end=None, path=()):
    """Yields (types from the top, offset, size) of every box, descending into the tables' parents."""
    end = len(data) if end is None else end
    while end - pos >= 8:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        size = size or end - pos
        yield path + (kind,), pos, size
        if kind in BOX_CONTAINERS:
            yield from boxes(data, pos + 8, pos + size, path + (kind,))
        pos += size


def box_in_track(data, handler: bytes, kind: bytes, nth: int = 0) -> int:
    """Offset of the `nth` `kind` box inside the trak whose hdlr is `handler`."""
    for p, pos, size in boxes(data):
        if p[-1] == b"trak" and handler in data[pos:pos + size]:
            found = [q for path, q, _ in boxes(data, pos + 8, pos + size) if path[-1] == kind]
            return found[nth]
    raise LookupError(kind)


def box_anywhere(data, kind: bytes, nth: int = 0) -> int:
    return [pos for p, pos, _ in boxes(data) if p[-1] == kind][nth]


def rewrite(src: Path, dst: Path, edits) -> Path:
    """Copies `src` with big-endian u32 `edits` [(offset, value)] applied in place."""
    data = bytearray(src.read_bytes())
    for offset, value in edits:
        data[offset:offset + 4] = struct.pack(">I", value)
    dst.write_bytes(data)
    return dst


def claims_frames(src: Path, dst: Path, frames: int) -> Path:
    """`src` with its video stsz rewritten to declare `frames` samples (the file is unchanged
    in size: what a hostile client sends to make a demuxer allocate an index of that size)."""
    stsz = box_in_track(src.read_bytes(), b"vide", b"stsz")
    return rewrite(src, dst, [(stsz + 12, 1000), (stsz + 16, frames)])  # a constant size, so no table
