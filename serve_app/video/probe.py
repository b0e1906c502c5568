"""Judge an upload by its content before any frame is decoded for real.

`probe` demuxes the video packets (cheap: no decoding but the first frame), and from them learns
what a player will present: the frames that survive the edit list, in presentation order, with
their timestamps. It refuses what the service cannot answer faithfully, with a typed error whose
one-line message names the problem, and picks the decoder (decord or PyAV).
"""

from __future__ import annotations

import os
from fractions import Fraction

from serve_app.errors import UnsupportedMedia, UploadTooLarge, VideoLimitExceeded
from serve_app.contract import Limits, size
from serve_app.media import AudioInfo, VideoInfo
from serve_app.video.mp4scan import scan

# What PyAV calls the ISO-BMFF demuxer; webm/mkv/ts/avi renamed .mp4 report another name.
MP4_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"

# Audio the mp4 muxer takes as is; anything else (PCM in .mov, ...) is transcoded to AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"})

# decord (0.6.0, FFmpeg 4.1) takes only what it decodes exactly as PyAV does, and only videos
# whose every frame, decoded, fits its unbounded read-ahead (docs/design.md, Decoders).
DECORD_CODECS = frozenset({"h264", "hevc", "mpeg4"})
DECORD_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"})
DECORD_MAX_BUFFER_BYTES = 256 * 1024 * 1024


def probe(path: str | os.PathLike, limits: Limits = Limits()) -> VideoInfo:
    """Validate the upload at `path` and describe it.

    Raises UploadTooLarge (over limits.max_bytes), UnsupportedMedia (empty, not mp4/mov, no
    decodable video stream, truncated) or VideoLimitExceeded (picture size, frame count, fps).
    """
    import av

    path = os.fspath(path)
    nbytes = os.path.getsize(path)
    if nbytes == 0:
        raise UnsupportedMedia("upload is empty (0 bytes); send an MP4 video")
    if nbytes > limits.max_bytes:
        raise UploadTooLarge(f"video is {size(nbytes)}; the limit is {size(limits.max_bytes)}")
    # Before any demuxer opens it: FFmpeg sizes its index from the counts the file declares.
    scan(path, max_video_samples=limits.max_frames, max_other_samples=limits.max_track_samples)
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UnsupportedMedia(f"not a readable MP4 video ({_why(exc)})") from None
    with container:
        fmt = container.format.name
        if fmt != MP4_FAMILY:
            raise UnsupportedMedia(f"container is {fmt!r}; only MP4/MOV is accepted")
        if not container.streams.video:
            what = "audio only" if container.streams.audio else "no streams"
            raise UnsupportedMedia(f"no video stream in the file ({what})")
        stream = container.streams.video[0]
        cc = stream.codec_context
        width, height = int(cc.width), int(cc.height)
        if width <= 0 or height <= 0:
            raise UnsupportedMedia(f"video stream has no picture size ({width}x{height})")
        _check_picture(width, height, limits)
        entries = stream.index_entries
        if len(entries) > limits.max_frames:
            raise VideoLimitExceeded(f"video has {len(entries):,} frames; the limit is {limits.max_frames:,}")
        if len(entries):
            end = max(e.pos + e.size for e in entries)
            if end > nbytes:
                raise UnsupportedMedia(
                    f"file is truncated: its index points to byte {end} but it has {nbytes} bytes"
                )
        pts, n_packets = _presented_pts(container, stream)
        if n_packets < len(entries):
            raise UnsupportedMedia(
                f"file is truncated: {n_packets} of {len(entries)} video frames are present"
            )
        if not pts:
            raise UnsupportedMedia("video stream has no frames")
        if len(pts) > limits.max_frames:
            raise VideoLimitExceeded(f"video has {len(pts):,} frames; the limit is {limits.max_frames:,}")
        if width * height * len(pts) > limits.max_pixel_frames:
            raise VideoLimitExceeded(
                f"video is {width}x{height} with {len(pts):,} frames: {width * height * len(pts):,} pixels to "
                f"decode; the limit is {limits.max_pixel_frames:,} (10 minutes of 1080p at 30 fps by default)")
        time_base = stream.time_base
        avg_fps = _avg_fps(stream, pts, time_base)
        if avg_fps > limits.max_fps:
            raise VideoLimitExceeded(f"video is {float(avg_fps):.1f} fps; the limit is {limits.max_fps:g} fps")
        first = _first_frame(container, stream)
        rotation = _rotation(first)
        pix_fmt = cc.pix_fmt or first.format.name
        codec = cc.codec.canonical_name  # "av1", not the decoder's name "libdav1d"
        audio = None
        if container.streams.audio:
            acodec = container.streams.audio[0].codec_context.codec.canonical_name
            audio = AudioInfo(codec=acodec, copyable=acodec in MP4_AUDIO_CODECS)
    decoder = _choose_decoder(codec, pix_fmt, rotation, width, height, len(pts), n_packets)
    return VideoInfo(
        width=width,
        height=height,
        num_frames=len(pts),
        pts=tuple(pts),
        time_base=Fraction(time_base),
        avg_fps=avg_fps,
        rotation=rotation,
        codec=codec,
        pix_fmt=pix_fmt,
        decoder=decoder,
        audio=audio,
    )


def _why(exc: BaseException) -> str:
    """FFmpeg's reason, without the errno and the server-side temporary path it names."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def _check_picture(width: int, height: int, limits: Limits) -> None:
    long_side, short_side = max(width, height), min(width, height)
    if long_side > limits.max_long_side:
        raise VideoLimitExceeded(
            f"video is {width}x{height}; the longest side may be at most {limits.max_long_side}"
        )
    if short_side > limits.max_short_side:
        raise VideoLimitExceeded(
            f"video is {width}x{height}; the shortest side may be at most {limits.max_short_side}"
        )


def _presented_pts(container, stream) -> tuple[list[int], int]:
    """Timestamps of the presented frames (sorted) and the number of video packets.

    Packets the edit list hides carry the discard flag; the decoder drops them, so does this.
    """
    import av

    pts: list[int] = []
    n_packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            n_packets += 1
            if packet.is_discard:
                continue
            if packet.pts is None:
                raise UnsupportedMedia(f"video frame {n_packets - 1} has no timestamp")
            pts.append(int(packet.pts))
    except av.error.FFmpegError as exc:
        raise UnsupportedMedia(f"video stream is damaged after {n_packets} frames ({_why(exc)})") from None
    pts.sort()
    return pts, n_packets


def _avg_fps(stream, pts: list[int], time_base: Fraction) -> Fraction:
    rate = stream.average_rate
    if rate:
        return Fraction(rate)
    if len(pts) > 1 and pts[-1] > pts[0]:
        return Fraction(len(pts) - 1) / ((pts[-1] - pts[0]) * Fraction(time_base))
    rate = stream.guessed_rate or stream.base_rate
    if rate:
        return Fraction(rate)
    raise UnsupportedMedia("video stream has no frame rate")


def _first_frame(container, stream):
    """Decodes the first frame: proof that the stream decodes, and its display matrix."""
    import av

    container.seek(0, stream=stream)
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as exc:
        raise UnsupportedMedia(
            f"video stream ({stream.codec_context.name}) does not decode: {_why(exc)}"
        ) from None
    raise UnsupportedMedia(f"video stream ({stream.codec_context.name}) decodes to no frames")


def _rotation(frame) -> int:
    """Display rotation in degrees counter-clockwise, snapped to a quarter turn."""
    degrees = float(getattr(frame, "rotation", 0) or 0)
    return int(round(degrees / 90.0)) % 4 * 90


def _choose_decoder(codec: str, pix_fmt: str, rotation: int, width: int, height: int, n_presented: int,
                    n_packets: int) -> str:
    """decord for small plain videos; PyAV for the rest. Each rule answers a measured decord
    failure (docs/design.md, Decoders)."""
    if n_packets != n_presented:
        return "pyav"  # an edit list hides frames: decord decodes them too
    if codec not in DECORD_CODECS or pix_fmt not in DECORD_PIX_FMTS:
        return "pyav"
    if rotation in (90, 270) or min(width, height) < 32:
        return "pyav"  # decord returns wrongly shaped arrays for quarter turns and tiny pictures
    if n_presented * width * height * 3 > DECORD_MAX_BUFFER_BYTES:
        return "pyav"  # decord's read-ahead is unbounded: only videos that fit its budget whole
    return "decord"
