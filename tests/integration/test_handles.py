"""The handle API other Ray jobs use, against a real local Ray cluster:

    handle = serve.get_app_handle("sam3-video")
    mp4 = handle.segment.remote(video_bytes_or_ObjectRef, {"prompt": "fish"}).result()
"""

import pytest

from serve_app.app import APP_NAME
from serve_app.errors import InvalidJob, ServiceError, UnsupportedMedia
from testkit.video import mask_iou
from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W


@pytest.fixture(scope="module")
def app(graph):
    from ray import serve

    return serve.get_app_handle(APP_NAME)


def test_segment_bytes_through_the_app_handle(app, shapes):
    mp4 = app.segment.remote(shapes.read_bytes(), {"prompt": "green"}).result()
    assert mask_iou(mp4, {"green"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def test_segment_an_object_ref(app, shapes):
    import ray

    ref = ray.put(shapes.read_bytes())
    mp4 = app.segment.remote(ref, {"prompt": "yellow", "mode": "mask"}).result()
    assert mask_iou(mp4, {"yellow"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def test_errors_arrive_as_the_service_types_with_their_message(app):
    with pytest.raises(UnsupportedMedia) as caught:
        app.segment.remote(b"", {"prompt": "red"}).result()
    err = caught.value
    print(type(err), err.args, getattr(err, "cause", None))
    assert isinstance(err, ServiceError)
    assert err.message == "upload is empty (0 bytes); send an MP4 video"

    with pytest.raises(InvalidJob) as caught:
        app.segment.remote(b"x", {"prompt": "red", "alpha": 2}).result()
    assert caught.value.message == "config.alpha is 2; it must be between 0.0 and 1.0"


def test_async_jobs_through_the_handle(app, shapes):
    import time

    from serve_app.errors import JobNotDone, NotFound

    job_id = app.submit.remote(shapes.read_bytes(), {"prompt": "slow green", "outputs": ["video", "objects"]}).result()
    with pytest.raises(JobNotDone, match="ask again later"):
        app.result.remote(job_id).result()
    deadline = time.monotonic() + 60
    while (status := app.status.remote(job_id).result())["state"]["current"] != "processed":
        assert status["state"]["current"] in ("queued", "processing") and time.monotonic() < deadline, status
        time.sleep(0.2)
    files = app.result.remote(job_id).result()
    assert sorted(files) == ["objects.json", "output.mp4"]
    assert mask_iou(files["output.mp4"], {"green"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    with pytest.raises(NotFound):
        app.status.remote("no-such-job").result()


def test_bad_media_is_refused_before_an_async_job_exists(app):
    with pytest.raises(UnsupportedMedia, match="not a readable MP4"):
        app.submit.remote(b"\0" * 100, {"prompt": "red"}).result()


def test_a_failed_async_job_raises_its_own_error_type(app, shapes):
    import time

    job_id = app.submit.remote(shapes.read_bytes(), {"prompt": "red refuse"}).result()
    deadline = time.monotonic() + 60
    while app.status.remote(job_id).result()["state"]["current"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(UnsupportedMedia, match="scripted refusal from the tracker replica"):
        app.result.remote(job_id).result()


def test_an_owner_that_died_is_told_from_one_that_lives(cluster):
    """What a job's Deadline asks of its owner (ray_compat.actor_alive, Ray's __ray_ready__)."""
    import ray

    from serve_app.ray_compat import actor_alive
    from tests.serving import wait_until

    @ray.remote(num_cpus=0)
    class Owner:
        pass

    owner = Owner.remote()
    assert actor_alive(owner)
    ray.kill(owner)
    assert wait_until(lambda: not actor_alive(owner, timeout_s=1), timeout_s=20)
