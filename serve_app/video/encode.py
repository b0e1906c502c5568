"""Write the answer mp4: the input's coded size, frame count, timestamps, rotation and audio.

Frames arrive one at a time in display orientation and go straight to libx264, so memory does
not grow with the video's length. Audio from the source is interleaved as the video advances:
copied unchanged when mp4 can hold it, else transcoded to AAC.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from serve_app.media import VideoInfo

# Audio is muxed up to this far ahead of the last video frame written, so the muxer's
# interleaving queue never has to hold more than about this much of either stream.
_AUDIO_LEAD_S = 0.5


class Mp4Writer:
    """`Mp4Writer(dst, info, audio_source)`; `.write(frame)` per frame; `.close()` (or `with`).

    frame: (H, W, 3) RGB uint8 or (H, W) uint8 gray, H x W the display size of `info`.
    Even coded sizes are written as yuv420p (plays in browsers); odd sizes as yuv444p, since
    4:2:0 cannot hold an odd width or height. The moov atom goes first (faststart).
    """

    def __init__(
        self,
        dst_path: str | os.PathLike,
        info: VideoInfo,
        audio_source: str | os.PathLike | None = None,
        *,
        preset: str = "veryfast",
        crf: int = 18,
    ) -> None:
        import av

        self.info = info
        self.frames_written = 0
        self._length = _stream_length(info)
        self._first_dts = None
        self._held = None
        self._closed = False
        self._out = av.open(os.fspath(dst_path), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._video = self._add_video(preset, crf)
            self._audio = _AudioCarrier(self._out, audio_source) if audio_source is not None else None
        except BaseException:
            self._out.close()
            raise

    def _add_video(self, preset: str, crf: int):
        info = self.info
        stream = self._out.add_stream("libx264", rate=info.avg_fps)
        stream.width, stream.height = info.width, info.height
        self._even = even = info.width % 2 == 0 and info.height % 2 == 0
        stream.pix_fmt = "yuv420p" if even else "yuv444p"
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        # threads=0: libx264 picks its own count from the cores.
        stream.codec_context.thread_count = 0
        stream.options = {"preset": preset, "crf": str(crf)}
        if info.rotation:
            # Must precede the first mux: the display matrix is written with the header.
            stream.set_display_rotation(info.rotation)
        return stream

    def write(self, frame: np.ndarray) -> None:
        import av

        if self._closed:
            raise ValueError("write() after close()")
        i = self.frames_written
        if i >= self.info.num_frames:
            raise ValueError(f"frame {i} is past the video's {self.info.num_frames} frames")
        disp_w, disp_h = self.info.display_size
        if frame.dtype != np.uint8 or frame.shape[:2] != (disp_h, disp_w) or frame.ndim not in (2, 3) or (
            frame.ndim == 3 and frame.shape[2] != 3
        ):
            raise ValueError(
                f"frame {i} is {frame.shape} {frame.dtype}; expected ({disp_h}, {disp_w}, 3) "
                f"or ({disp_h}, {disp_w}) uint8"
            )
        if self.info.rotation:
            # Back to coded orientation; the display matrix turns it again on playback.
            frame = np.rot90(frame, k=-(self.info.rotation // 90))
        frame = np.ascontiguousarray(frame)
        if self._even:
            vf = av.VideoFrame.from_ndarray(_to_yuv420p(frame), format="yuv420p")
        else:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24" if frame.ndim == 3 else "gray")
        vf.pts = self.info.pts[i]
        vf.time_base = self.info.time_base
        self._mux_video(self._video.encode(vf))
        self.frames_written += 1
        if self._audio is not None:
            self._audio.pump(float((self.info.pts[i] - self.info.pts[0]) * self.info.time_base) + _AUDIO_LEAD_S)

    def _mux_video(self, packets, final: bool = False) -> None:
        # The mp4 muxer makes each sample last until the next one's decode timestamp, and the
        # stream end the last packet's dts + duration; the demuxer's average frame rate is
        # frames / that length. So the last packet (in decode order) is held back and given
        # the duration that makes the stream exactly as long as the input's.
        for packet in packets:
            if self._first_dts is None:
                self._first_dts = packet.dts
            if self._held is not None:
                self._out.mux(self._held)
            self._held = packet
        if final and self._held is not None:
            rest = self._length - (self._held.dts - self._first_dts)
            # Only a complete video gets the input's length; a short one ends where it ends.
            if rest > 0 and self.frames_written == self.info.num_frames:
                self._held.duration = rest
            self._out.mux(self._held)
            self._held = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._mux_video(self._video.encode(), final=True)
            if self._audio is not None:
                self._audio.pump(float("inf"))
                self._audio.close()
        finally:
            self._out.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What FFmpeg's swscale makes of 8-bit gray in yuv420p: limited range, 0 -> 16, 255 -> 235.
_GRAY_TO_Y = np.round(16 + 219 * np.arange(256) / 255).astype(np.uint8)


def _to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H * 3 / 2, W) uint8 planes for libx264, from RGB or gray of even size.

    OpenCV's SIMD conversion, faster than swscale's with the same BT.601 limited range
    (docs/design.md, Encoding); a gray mask's luma is a lookup and its chroma neutral.
    """
    import cv2

    if frame.ndim == 3:
        return cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
    height, width = frame.shape
    planes = np.empty((height * 3 // 2, width), np.uint8)
    cv2.LUT(frame, _GRAY_TO_Y, dst=planes[:height])
    planes[height:] = 128
    return planes


def _stream_length(info: VideoInfo) -> int:
    """The input stream's length in its time base: num_frames / avg_fps."""
    return round(Fraction(info.num_frames) / Fraction(info.avg_fps) / Fraction(info.time_base))


class _AudioCarrier:
    """Moves the source's first audio stream into the output, in step with the video."""

    def __init__(self, out, source: str | os.PathLike) -> None:
        import av

        from serve_app.video.probe import MP4_AUDIO_CODECS

        self._out = out
        self._src = av.open(os.fspath(source), metadata_errors="ignore")
        self._done = not self._src.streams.audio
        if self._done:
            return
        self._in = self._src.streams.audio[0]
        self._copy = self._in.codec_context.codec.canonical_name in MP4_AUDIO_CODECS
        if self._copy:
            self._stream = out.add_stream_from_template(self._in)
        else:
            cc = self._in.codec_context
            rate = cc.sample_rate or 48000
            self._stream = out.add_stream("aac", rate=rate)
            self._stream.layout = cc.layout.name if cc.layout.nb_channels <= 2 else "stereo"
            self._resampler = av.AudioResampler(
                format="fltp", layout=self._stream.layout.name, rate=rate, frame_size=1024
            )
        self._packets = self._src.demux(self._in)

    def pump(self, until_s: float) -> None:
        """Mux source audio up to `until_s` seconds from its start."""
        if self._done:
            return
        tb = self._in.time_base
        start = self._in.start_time or 0
        for packet in self._packets:
            if self._copy:
                if packet.size == 0:  # the demuxer's end marker; nothing to copy
                    continue
                packet.stream = self._stream
                self._out.mux(packet)
            else:
                # The empty end packet flushes the decoder, so it goes through too.
                for frame in packet.decode():
                    self._encode(frame)
            if packet.pts is not None and float((packet.pts - start) * tb) >= until_s:
                return
        self._done = True
        if not self._copy:
            self._encode(None)

    def _encode(self, frame) -> None:
        for rs in self._resampler.resample(frame):
            for packet in self._stream.encode(rs):
                self._out.mux(packet)
        if frame is None:
            for packet in self._stream.encode(None):
                self._out.mux(packet)

    def close(self) -> None:
        if not self._done:
            self._done = True
        self._src.close()
