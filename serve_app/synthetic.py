"""Synthetic clips of coloured shapes whose right segmentation is known exactly.

Used by the tests, the benchmarks and `sam3-video synth` (dry runs without a GPU or weights).
Positions and sizes are fractions of the picture, so one layout serves every resolution; a
shape moves linearly from `start` to `end` over the clip and is visible from `appear` to
`vanish` (fractions of the clip's length). `purity` blends a shape's colour toward grey: the
stand-in tracker scores a shape by its colour saturation, so pale shapes score low and the
confidence threshold can be tested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

PURE_RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}
_GREY = np.array([128.0, 128.0, 128.0])


@dataclass(frozen=True)
class Shape:
    color: str                           # a key of PURE_RGB
    kind: str                            # "circle" | "square"
    size: float                          # radius / half side, as a fraction of the height
    start: tuple[float, float]           # centre (x of width, y of height) on the first frame
    end: tuple[float, float] | None = None
    appear: float = 0.0                  # visible on frames [appear * n, vanish * n)
    vanish: float = 1.0
    purity: float = 1.0                  # 1: the pure colour; lower: toward grey

    @property
    def rgb(self) -> tuple[int, int, int]:
        mixed = _GREY * (1 - self.purity) + np.array(PURE_RGB[self.color]) * self.purity
        return tuple(int(round(v)) for v in mixed)

    @property
    def saturation(self) -> float:
        """HSV saturation of the drawn colour: the score a correct stand-in tracker gives."""
        r, g, b = self.rgb
        return (max(r, g, b) - min(r, g, b)) / max(r, g, b)

    def visible(self, index: int, num_frames: int) -> bool:
        return self.appear * num_frames <= index < self.vanish * num_frames


# Five shapes that never touch: a pale red square that scores below 0.5, and a green circle
# that enters a third of the way in and leaves at 80%.
DEFAULT_SHAPES: tuple[Shape, ...] = (
    Shape("red", "circle", 0.11, (0.15, 0.25), (0.45, 0.25)),
    Shape("blue", "square", 0.10, (0.45, 0.72), (0.15, 0.72)),
    Shape("green", "circle", 0.09, (0.75, 0.25), (0.75, 0.30), appear=0.35, vanish=0.8),
    Shape("yellow", "circle", 0.08, (0.62, 0.75)),
    Shape("red", "square", 0.09, (0.82, 0.72), purity=0.4),
)


def _geometry(shape: Shape, index: int, num_frames: int, width: int, height: int):
    t = index / max(num_frames - 1, 1)
    x0, y0 = shape.start
    x1, y1 = shape.end or shape.start
    cx, cy = (x0 + (x1 - x0) * t) * width, (y0 + (y1 - y0) * t) * height
    return int(round(cx)), int(round(cy)), max(int(round(shape.size * height)), 1)


def _draw(canvas: np.ndarray, shape: Shape, geometry, color) -> None:
    import cv2

    cx, cy, r = geometry
    if shape.kind == "circle":
        cv2.circle(canvas, (cx, cy), r, color, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.rectangle(canvas, (cx - r, cy - r), (cx + r, cy + r), color, thickness=-1)


def background(width: int, height: int) -> np.ndarray:
    """A low-saturation textured grey: nothing in it reads as a colour."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(70, 150, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    tint = np.array([1.0, 1.0, 1.04], np.float32)
    return np.clip((ramp + noise) * tint, 0, 255).astype(np.uint8)


def render(index: int, num_frames: int, width: int, height: int, shapes: Sequence[Shape] = DEFAULT_SHAPES,
           base: np.ndarray | None = None) -> np.ndarray:
    """Frame `index` of the clip, (H, W, 3) RGB uint8."""
    frame = (background(width, height) if base is None else base).copy()
    for shape in shapes:
        if shape.visible(index, num_frames):
            _draw(frame, shape, _geometry(shape, index, num_frames, width, height), shape.rgb)
    return frame


def truth(index: int, num_frames: int, width: int, height: int,
          shapes: Sequence[Shape] = DEFAULT_SHAPES) -> dict[int, np.ndarray]:
    """{shape index: (H, W) bool mask} of the shapes visible on frame `index`, occlusion applied."""
    masks: dict[int, np.ndarray] = {}
    for i, shape in enumerate(shapes):
        if not shape.visible(index, num_frames):
            continue
        canvas = np.zeros((height, width), np.uint8)
        _draw(canvas, shape, _geometry(shape, index, num_frames, width, height), 1)
        mask = canvas.astype(bool)
        for earlier in masks.values():  # a later shape is drawn over the earlier ones
            earlier &= ~mask
        masks[i] = mask
    return masks


def frames(num_frames: int, width: int, height: int, shapes: Sequence[Shape] = DEFAULT_SHAPES) -> Iterator[np.ndarray]:
    base = background(width, height)
    for i in range(num_frames):
        yield render(i, num_frames, width, height, shapes, base)


def write_clip(path: str | os.PathLike, width: int = 640, height: int = 360, num_frames: int = 60,
               fps: int = 25, shapes: Sequence[Shape] = DEFAULT_SHAPES, crf: int = 18) -> None:
    """Encode the clip as H.264 mp4 (yuv420p; yuv444p for odd sizes), streaming frame by frame."""
    import av

    with av.open(os.fspath(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for picture in frames(num_frames, width, height, shapes):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)

