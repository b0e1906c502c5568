"""What a correct answer looks like: the output mp4 against the input and the synthetic truth."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from serve_app import synthetic


@dataclass
class Video:
    frames: list[np.ndarray]
    width: int
    height: int
    fps: Fraction


def read_video(data: bytes, fmt: str = "gray") -> Video:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format=fmt) for f in container.decode(stream)]
        return Video(frames, stream.codec_context.width, stream.codec_context.height, stream.average_rate)


def expected_mask(colours: set[str], index: int, num_frames: int, width: int, height: int,
                  threshold: float = 0.5) -> np.ndarray:
    """Where the stand-in tracker must find `colours` on frame `index` at `threshold`: each shape
    of those colours whose score (its saturation) passes the threshold."""
    shapes = synthetic.DEFAULT_SHAPES
    want = np.zeros((height, width), bool)
    for i, mask in synthetic.truth(index, num_frames, width, height).items():
        if shapes[i].color in colours and shapes[i].saturation >= threshold:
            want |= mask
    return want


def mask_iou(mp4: bytes, colours: set[str], width: int, height: int, num_frames: int, fps: int) -> float:
    """Checks the mask video's geometry, then returns its worst per-frame IoU against the truth
    (frames where nothing should be found must be black: IoU 1 if so, else 0)."""
    video = read_video(mp4)
    assert (video.width, video.height) == (width, height)
    assert len(video.frames) == num_frames
    assert video.fps == fps
    worst = 1.0
    for i, picture in enumerate(video.frames):
        got = picture >= 128
        want = expected_mask(colours, i, num_frames, width, height)
        union = np.count_nonzero(got | want)
        iou = np.count_nonzero(got & want) / union if union else 1.0
        worst = min(worst, iou)
    return worst
