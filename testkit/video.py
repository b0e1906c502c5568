"""What a correct answer looks like: the output mp4 against the input and the synthetic truth, and
synthetic detections to composite without a tracker."""

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


def masks(mp4: bytes) -> list[np.ndarray]:
    """A mask video's frames as booleans (white where an object is)."""
    return [frame >= 128 for frame in read_video(mp4).frames]


def truth_iou(got: list[np.ndarray], colours: set[str], width: int, height: int, threshold: float = 0.5) -> float:
    """The worst per-frame IoU of `got` against the truth (frames where nothing should be found
    must be black: IoU 1 if so, else 0)."""
    worst = 1.0
    for i, mask in enumerate(got):
        want = expected_mask(colours, i, len(got), width, height, threshold)
        union = np.count_nonzero(mask | want)
        worst = min(worst, np.count_nonzero(mask & want) / union if union else 1.0)
    return worst


def mask_iou(mp4: bytes, colours: set[str], width: int, height: int, num_frames: int, fps: int) -> float:
    """Checks the mask video's geometry, then returns its worst per-frame IoU against the truth."""
    video = read_video(mp4)
    assert (video.width, video.height) == (width, height)
    assert len(video.frames) == num_frames
    assert video.fps == fps
    return truth_iou([picture >= 128 for picture in video.frames], colours, width, height)


def blobs(height: int, width: int, n: int, seed: int = 0, ids=None):
    """Detections of n overlapping elliptical objects, boxes derived from their masks as SAM 3
    derives them, random scores: compositing input without a tracker."""
    from serve_app.media import Detections

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    found, boxes = [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.08, 0.3) * width
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        r, c = np.nonzero(m)
        boxes.append([c.min() / width, r.min() / height, (c.max() - c.min()) / width, (r.max() - r.min()) / height])
        found.append(m)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    return Detections(frame_index=0, obj_ids=ids, scores=rng.uniform(0.3, 1.0, n).astype(np.float32),
                      boxes_xywh=np.asarray(boxes, np.float32), masks=np.stack(found))
