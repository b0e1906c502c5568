import numpy as np
import pytest

from serve_app.errors import ModelError
from serve_app.pipeline import FrameBuffer
from serve_app.types import FrameChunk


def chunks(n_chunks, size=4):
    for c in range(n_chunks):
        frames = np.stack([np.full((2, 3, 3), c * size + i, np.uint8) for i in range(size)])
        yield FrameChunk(start=c * size, frames=frames)


def test_frames_come_back_by_index_while_the_tracker_runs_ahead():
    buf = FrameBuffer(chunks(3), keep=True)
    pulled = iter(buf)
    next(pulled), next(pulled)  # the tracker has read frames 0..7
    assert buf.frame(0)[0, 0, 0] == 0
    assert buf.frame(6)[0, 0, 0] == 6
    next(pulled)
    assert buf.frame(11)[0, 0, 0] == 11


def test_released_chunks_are_dropped_so_memory_follows_the_lag_not_the_length():
    buf = FrameBuffer(chunks(50), keep=True)
    for chunk in buf:
        buf.frame(chunk.start)  # the compositor keeps pace
        assert len(buf._held) <= 1
    with pytest.raises(ModelError, match="frame 0"):
        buf.frame(0)


def test_mask_mode_keeps_no_pixels():
    buf = FrameBuffer(chunks(3), keep=False)
    assert sum(len(c) for c in buf) == 12
    assert buf.frame(5) is None and not buf._held
