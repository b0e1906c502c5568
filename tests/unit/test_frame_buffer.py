import numpy as np
import pytest

from serve_app.errors import ModelError
from serve_app.media import FrameChunk
from serve_app.pipeline import FrameBuffer


def chunks(n_chunks, size=4, taken=None):
    for c in range(n_chunks):
        frames = np.stack([np.full((2, 3, 3), c * size + i, np.uint8) for i in range(size)])
        if taken is not None:
            taken.append(c)
        yield FrameChunk(start=c * size, frames=frames)


def test_frames_come_back_by_index_while_the_tracker_reads_ahead_through_the_buffer():
    taken = []
    buf = FrameBuffer(chunks(3, taken=taken))
    pulled = iter(buf)
    next(pulled), next(pulled)  # the tracker has read frames 0..7
    assert buf.frame(0)[0, 0, 0] == 0
    assert buf.frame(6)[0, 0, 0] == 6
    next(pulled)
    assert buf.frame(11)[0, 0, 0] == 11
    assert taken == [0, 1, 2]  # each chunk decoded once, for both


def test_released_chunks_are_dropped_so_memory_follows_the_lag_not_the_length():
    buf = FrameBuffer(chunks(50))
    for chunk in buf:
        buf.frame(chunk.start)  # the compositor keeps pace
        assert len(buf._held) <= 1
    with pytest.raises(ModelError, match="frame 0 was asked for after it was released"):
        buf.frame(0)


def test_with_no_tracker_reading_it_the_buffer_reads_on_by_itself():
    taken = []
    buf = FrameBuffer(chunks(5, taken=taken))
    assert [int(buf.frame(i)[0, 0, 0]) for i in range(0, 20, 3)] == list(range(0, 20, 3))
    assert taken == [0, 1, 2, 3, 4] and len(buf._held) == 1
    with pytest.raises(ModelError, match="frame 20 was asked for past the video's end"):
        buf.frame(20)
