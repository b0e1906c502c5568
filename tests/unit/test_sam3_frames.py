"""The lazy frame source SAM 3 reads as `img_batch` (no model)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serve_app.errors import ModelError  # noqa: E402
from serve_app.trackers.sam3.frames import LazyFrames, to_model_input  # noqa: E402
from serve_app.media import FrameChunk  # noqa: E402

H, W = 36, 64


def clip(n):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)


class CountingDecoder:
    """A test double for the decoder stream: hands out chunks and counts the pulls."""

    def __init__(self, frames, chunk=3):
        self.chunks = [FrameChunk(s, frames[s:s + chunk]) for s in range(0, len(frames), chunk)]
        self.pulled = 0

    def __call__(self):
        if self.pulled == len(self.chunks):
            return None
        self.pulled += 1
        return self.chunks[self.pulled - 1]


def test_frames_are_pulled_only_when_the_model_asks_for_them():
    frames = clip(12)
    decoder = CountingDecoder(frames)
    source = LazyFrames(12, decoder, "cpu", expected_size=(H, W))
    assert len(source) == 12 and decoder.pulled == 0
    source[0]
    assert decoder.pulled == 1
    source[1], source[2]
    assert decoder.pulled == 1
    source[3]  # the detector's one-frame look-ahead reaches into the next chunk
    assert decoder.pulled == 2


def test_conversion_matches_sam3s_own_loader():
    """SAM 3's list-of-PIL-images loader (io_utils.py:42-66): resize to 1008, /255, mean/std."""
    from PIL import Image
    from sam3.model.io_utils import load_resource_as_video_frames

    frames = clip(2)
    ours = torch.stack([to_model_input(f, "cpu") for f in frames])
    theirs, h, w = load_resource_as_video_frames([Image.fromarray(f) for f in frames], 1008, offload_video_to_cpu=True)
    assert (h, w) == (H, W) and ours.shape == theirs.shape == (2, 3, 1008, 1008)
    assert ours.dtype == torch.float32 and float(ours.min()) >= -1.0 and float(ours.max()) <= 1.0
    diff = (ours - theirs.float()).abs()
    assert float(diff.mean()) < 0.01  # in units of the normalised range [-1, 1]
    assert float(diff.quantile(0.99)) < 0.05


def test_only_the_frames_in_use_are_held():
    frames = clip(20)
    source = LazyFrames(20, CountingDecoder(frames), "cpu")
    one_converted = to_model_input(frames[0], "cpu").untyped_storage().nbytes()
    for i in range(20):
        source[i]
        if i:
            source[i - 1]  # SAM 3 reads the current frame again after looking ahead
        assert source.nbytes <= 2 * one_converted + 2 * 3 * frames[0].nbytes
    with pytest.raises(ModelError, match="frame 10 after it was released"):
        source[10]
    source.close()
    assert source.nbytes == 0


def test_a_decoder_that_ends_early_is_a_model_error_naming_both_counts():
    source = LazyFrames(10, CountingDecoder(clip(4)), "cpu")
    source[3]
    with pytest.raises(ModelError, match="ended after 4 frames; the probe counted 10"):
        source[4]


def test_frames_of_the_wrong_size_or_type_are_refused():
    wrong = LazyFrames(3, CountingDecoder(clip(3)), "cpu", expected_size=(H + 2, W))
    with pytest.raises(ModelError, match=f"{W}x{H} frames where {W}x{H + 2}"):
        wrong[0]
    grey = LazyFrames(1, lambda: FrameChunk(0, np.zeros((1, H, W), np.uint8)), "cpu")
    with pytest.raises(ModelError, match="uint8 RGB"):
        grey[0]


def test_indices_outside_the_video_are_index_errors():
    source = LazyFrames(3, CountingDecoder(clip(3)), "cpu")
    with pytest.raises(IndexError):
        source[3]
    assert source[np.int64(2)].shape == (3, 1008, 1008)  # sam3 indexes with numpy/tensor ints too


def test_the_normalisation_constants_are_made_once(monkeypatch):
    """A tensor made from Python numbers on a GPU is a blocking copy: not once per frame."""
    frame = clip(1)[0]
    first = to_model_input(frame, "cpu")
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    again = to_model_input(frame, "cpu")
    assert made == [] and torch.equal(first, again)


@pytest.mark.gpu
def test_a_frame_goes_to_the_gpu_without_waiting_for_it():
    """Pinned staging and a non-blocking copy: torch reports any synchronising call as an error."""
    frame = clip(1)[0]
    want = to_model_input(frame, "cpu")
    to_model_input(frame, "cuda")  # the constants, made once
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_model_input(frame, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(got.cpu(), want, atol=1e-4)
