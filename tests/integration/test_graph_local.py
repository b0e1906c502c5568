"""The whole graph in one process (Serve's local testing mode): streaming handles between the
stages and handles passed into constructors work there, so the graph's answers are checked
without starting Ray."""

import numpy as np
import pytest

from serve_app.app import build_app
from serve_app.contract import JobConfig
from serve_app.errors import InvalidJob, ServiceError
from serve_app.graph.wire import SegmentResult
from testkit.video import expected_mask, mask_iou, read_video
from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    from ray import serve

    return serve.run(build_app({"tracker": "fake", "chunk_frames": 7, "job_store": str(tmp_path_factory.mktemp("jobs"))}),
                     name="sam3-video-local", _local_testing_mode=True)


@pytest.fixture(scope="module")
def clip(shapes) -> bytes:
    return shapes.read_bytes()


@pytest.mark.parametrize("colours", [{"red"}, {"blue", "green"}])
def test_mask_is_the_known_segmentation_at_the_input_geometry(handle, clip, colours):
    mp4 = handle.segment.remote(clip, {"prompt": " and ".join(sorted(colours))}).result()
    # chunk_frames=7 does not divide 40 frames: the last short chunk must arrive too.
    assert mask_iou(mp4, colours, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def test_overlay_draws_on_the_input(handle, clip, shapes):
    mp4 = handle.segment.remote(clip, JobConfig(prompt="blue", mode="overlay", alpha=0.6)).result()
    out, src = read_video(mp4, "rgb24"), read_video(clip, "rgb24")
    assert len(out.frames) == SHAPES_N and (out.width, out.height) == (SHAPES_W, SHAPES_H)
    blue = expected_mask({"blue"}, 0, SHAPES_N, SHAPES_W, SHAPES_H)
    diff = np.abs(out.frames[0].astype(int) - src.frames[0].astype(int)).mean(axis=2)
    far = np.zeros_like(blue)
    far[: SHAPES_H // 4, : SHAPES_W // 5] = True  # top-left corner: no shape, box or label
    assert diff[blue].mean() > 20 and diff[far].mean() < 4


def test_segment_result_carries_every_stage_timing(handle, clip):
    result = handle.segment_result.remote(clip, {"prompt": "yellow"}).result()
    assert isinstance(result, SegmentResult) and result.num_frames == SHAPES_N
    t = result.timings
    assert min(t.probe_ms, t.decode_ms, t.track_ms, t.encode_ms) > 0
    assert t.total_ms >= max(t.decode_ms, t.track_ms, t.encode_ms)


def test_bad_uploads_raise_their_typed_error(handle, bad_uploads):
    for name, (data, _, words, error) in bad_uploads.items():
        with pytest.raises(error) as caught:
            handle.segment.remote(data, {"prompt": "red"}).result()
        assert all(w in str(caught.value) for w in words), (name, str(caught.value))


@pytest.mark.parametrize("config, words", [
    ({"prompt": ""}, "config.prompt"),
    ({"prompt": "red", "confidence_treshold": 0.2}, "config.confidence_treshold is not a known field"),
    ({"prompt": "red", "mode": "outline"}, "config.mode is 'outline'"),
])
def test_invalid_config_raises_invalid_job_before_any_work(handle, config, words):
    with pytest.raises(InvalidJob, match=words):
        handle.segment.remote(b"not even a video", config).result()


def test_bytes_over_the_limit_are_refused_naming_it(clip, tmp_path):
    from ray import serve

    from serve_app.errors import UploadTooLarge

    small = serve.run(build_app({"tracker": "fake", "limits": {"max_bytes": 1024}, "job_store": str(tmp_path)}),
                      name="sam3-video-small", _local_testing_mode=True)
    with pytest.raises(UploadTooLarge, match=r"upload is \d+ KB; the limit is 1 KB"):
        small.segment.remote(clip, {"prompt": "red"}).result()


def test_the_service_keeps_answering_after_errors(handle, clip):
    for _ in range(2):
        with pytest.raises(ServiceError):
            handle.segment.remote(b"", {"prompt": "red"}).result()
    assert read_video(handle.segment.remote(clip, {"prompt": "red"}).result()).frames


def test_concepts_and_a_prompt_frame_through_the_graph(handle, clip):
    """Two concepts prompted on frame 30 of 40: the decoder serves the chunks forward then
    backward, the encoder puts the detections back in order; the masks are the truth's."""
    import json

    config = {"prompts": ["red", "blue and green"], "prompt_frame": 30, "outputs": ["video", "objects"]}
    result = handle.segment_result.remote(clip, config).result()
    assert mask_iou(result.mp4, {"red", "blue", "green"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    objects = json.loads(result.objects)
    assert objects["prompts"] == ["red", "blue and green"]
    assert {o["prompt"] for frame in objects["frames"] for o in frame} == {"red", "blue and green"}


def test_a_prompt_frame_past_the_video_is_refused_before_any_work(handle, clip):
    with pytest.raises(InvalidJob, match=f"config.prompt_frame is {SHAPES_N}; the video has {SHAPES_N} frames"):
        handle.segment.remote(clip, {"prompt": "red", "prompt_frame": SHAPES_N}).result()
