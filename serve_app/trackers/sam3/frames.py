"""Decoded frames as SAM 3 sees them: an indexable source, converted only when asked for.

SAM 3 reads `input_batch.img_batch[i]` for the frame it is working on and one frame ahead
(sam3_image.py:148-155 accepts any indexable with `len`; the detector prefetches the next
chunk at sam3_image.py:765-784). Its own loaders decode the whole video up front, on the model
device, at 1008x1008 (6-12 MiB a frame). Here frames stay the decoder's uint8 RGB until the
model asks for one; only the most recent are held converted, and frames the model has moved
past are released, so memory does not grow with the video's length. "Past" is in the order
the frames are tracked: forward from the prompt frame, then backward from the one before it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from serve_app.errors import ModelError
from serve_app.media import FrameChunk

IMAGE_SIZE = 1008
MEAN = (0.5, 0.5, 0.5)  # sam3_video_inference.py:36-37, the model's own normalisation
STD = (0.5, 0.5, 0.5)


def to_model_input(frame: np.ndarray, device, image_size: int = IMAGE_SIZE):
    """RGB uint8 (H, W, 3) -> normalised float32 (3, S, S) on `device`.

    The resize is bicubic with antialiasing, as PIL's resize in SAM 3's list-of-images loader
    (io_utils.py:54), done on the model device so only uint8 crosses the bus. Pixels are
    scaled to [0, 1] before the mean/std normalisation (SAM 3's mp4 loader forgets the /255:
    upstream facebookresearch/sam3#493).

    On CUDA nothing here waits for the GPU: the frame goes through pinned memory and is copied
    without blocking (torch's host allocator keeps that staging block until the copy is done),
    and the normalisation constants are made once per device. A pageable copy, or a tensor
    built from a Python tuple, waits for all the work queued before it.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    host = torch.from_numpy(np.ascontiguousarray(frame))
    if device.type == "cuda":
        staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        x = staged.to(device, non_blocking=True)
    else:
        x = host.to(device)
    x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp_(0.0, 1.0)
    mean, std = _normalisation(device)
    return ((x - mean) / std)[0]


_NORMALISATION: dict = {}  # device -> (mean, std), each (1, 3, 1, 1)


def _normalisation(device):
    import torch

    if device not in _NORMALISATION:
        _NORMALISATION[device] = (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                                  torch.tensor(STD, device=device).view(1, 3, 1, 1))
    return _NORMALISATION[device]


class LazyFrames:
    """`len()` and `[i]` over a video arriving as chunks from `pull` (None: the stream ended).

    `pull` is called on the model's thread and may block (it waits for the decoder) or raise
    (a cancelled job). Asking for a frame below the ones still held is a bug, reported as such.
    """

    def __init__(self, num_frames: int, pull: Callable[[], FrameChunk | None], device,
                 expected_size: tuple[int, int] | None = None, image_size: int = IMAGE_SIZE,
                 keep_converted: int = 2, prompt_frame: int = 0, keep_behind: int = 0) -> None:
        self.num_frames = num_frames
        self.prompt_frame = prompt_frame
        self._pull = pull
        self._device = device
        self._image_size = image_size
        self._keep_converted = keep_converted
        # uint8 frames kept behind the furthest one asked for: a session of several states reads
        # a frame once per state, up to SAM 3's hotstart delay apart (session.Session.steps)
        self._keep_uint8 = max(keep_converted, keep_behind)
        self._held: deque[FrameChunk] = deque()   # uint8 chunks, in the order they came
        self._received = 0                        # frames pulled so far
        self._converted: dict[int, object] = {}   # frame index -> model input tensor
        self._newest = -1                         # the furthest position asked for
        self.last_index = -1                      # the frame asked for last (session.SharedBackbone)
        self.size = expected_size                 # (height, width) every frame must have

    def __len__(self) -> int:
        return self.num_frames

    def position(self, index: int) -> int:
        """Where frame `index` comes in the tracking order: the prompt frame 0, the last frame
        num_frames - prompt_frame - 1, the frame before the prompt frame next, frame 0 last."""
        return index - self.prompt_frame if index >= self.prompt_frame else self.num_frames - 1 - index

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} of a {self.num_frames}-frame video")
        self.last_index = index
        self._newest = max(self._newest, self.position(index))
        tensor = self._converted.get(index)
        if tensor is None:
            tensor = to_model_input(self._uint8(index), self._device, self._image_size)
            self._converted[index] = tensor
            newest = max(map(self.position, self._converted))
            for old in [i for i in self._converted if self.position(i) <= newest - self._keep_converted]:
                del self._converted[old]
            self._release_before(newest - self._keep_uint8 + 1)
        return tensor

    def holding(self, ahead: int = 2) -> bool:
        """Whether the next `ahead` frames (SAM 3 reads one frame and prefetches the next) are
        already here, or every frame is: the model can step without pulling."""
        return self._received >= min(self._newest + 1 + ahead, self.num_frames)

    def _uint8(self, index: int) -> np.ndarray:
        while self.position(index) >= self._received:
            chunk = self._pull()
            if chunk is None:
                raise ModelError(f"the decoder ended after {self._received} frames; "
                                 f"the probe counted {self.num_frames}")
            if len(chunk) and self.position(chunk.start) != self._received:
                raise ModelError(f"the decoder sent frame {chunk.start} where the frame at position "
                                 f"{self._received} of the tracking order was due")
            if len(chunk):
                self._check_size(chunk.frames)
                self._held.append(chunk)
            self._received += len(chunk)
        for chunk in self._held:
            if index in chunk.indices():
                return chunk.frames[(index - chunk.start) * chunk.step]
        raise ModelError(f"SAM 3 asked for frame {index} after it was released")

    def _check_size(self, frames: np.ndarray) -> None:
        size = tuple(frames.shape[1:3])
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ModelError(f"frames must be uint8 RGB (n, H, W, 3); got {frames.dtype} {frames.shape}")
        if self.size is None:
            self.size = size
        elif size != tuple(self.size):
            raise ModelError(f"the decoder sent {size[1]}x{size[0]} frames where {self.size[1]}x{self.size[0]} was due")

    def _release_before(self, position: int) -> None:
        while self._held and self.position(self._held[0].indices()[-1]) < position:
            self._held.popleft()

    @property
    def nbytes(self) -> int:
        """Bytes held: uint8 frames not yet released plus converted model inputs."""
        held = sum(c.frames.nbytes for c in self._held)
        return held + sum(t.untyped_storage().nbytes() for t in self._converted.values())

    def close(self) -> None:
        self._held.clear()
        self._converted.clear()
