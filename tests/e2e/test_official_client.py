"""The official JavaScript client of the API we follow (npm prodia 1.6.0), unchanged, against
the service over real HTTP: it must get answers it understands."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from testkit.video import mask_iou, read_video
from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W, TEST_TOKEN


def test_mask_mode(official_client, graph, shapes):
    result = official_client.job(graph, {"prompt": "red"}, shapes)
    assert result["ok"], result
    assert mask_iou(result["output"], {"red"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    job = result["job"]
    assert job["state"]["current"] == "completed" and job["type"] == "inference.sam3.segment.video.v1"
    assert job["id"] and job["metrics"]["track_ms"] > 0
    assert [r["status"] for r in result["responses"]] == [200]


def test_overlay_mode(official_client, graph, shapes):
    result = official_client.job(graph, {"prompt": "blue", "mode": "overlay", "alpha": 0.7}, shapes)
    assert result["ok"], result
    out, src = read_video(result["output"], "rgb24"), read_video(shapes.read_bytes(), "rgb24")
    assert (out.width, out.height, len(out.frames), out.fps) == (src.width, src.height, len(src.frames), src.fps)
    assert result["job"]["config"] == {"prompt": "blue", "mode": "overlay", "alpha": 0.7, "confidence_threshold": 0.5}


def test_invalid_config_throws_its_user_error_with_our_message(official_client, graph, shapes):
    result = official_client.job(graph, {"prompt": "red", "confidence_treshold": 0.3}, shapes)
    assert result["error"]["name"] == "ProdiaUserError"
    assert "config.confidence_treshold is not a known field" in result["error"]["message"]
    assert [r["status"] for r in result["responses"]] == [400]  # 400: the client does not resend it


def test_unknown_job_type_is_a_user_error(official_client, graph, shapes):
    result = official_client.job(graph, {"prompt": "red"}, shapes, job_type="inference.flux.dev.txt2img.v1")
    assert result["error"]["name"] == "ProdiaUserError"
    assert "inference.flux.dev.txt2img.v1" in result["error"]["message"]


def test_not_a_video_is_a_user_error_naming_the_problem(official_client, graph):
    result = official_client.job(graph, {"prompt": "red"}, b"\xff\xd8\xff\xe0 a jpeg, say")
    assert result["error"]["name"] == "ProdiaUserError"
    assert "only MP4/MOV is accepted" in result["error"]["message"]
    # The client resends every failure but 400/401/403 once, so a 415 is seen twice.
    assert [r["status"] for r in result["responses"]] == [415, 415]


def test_bearer_token_is_required_when_configured(official_client, strict, shapes):
    refused = official_client.job(strict, {"prompt": "red"}, shapes, token="wrong-token")
    assert refused["error"]["name"] == "ProdiaUserError"
    assert "bearer token" in refused["error"]["message"]
    assert [r["status"] for r in refused["responses"]] == [401]
    accepted = official_client.job(strict, {"prompt": "red"}, shapes, token=TEST_TOKEN)
    assert accepted["ok"], accepted


def test_full_queue_answers_429_and_the_client_retries_until_served(official_client, strict, shapes):
    clip = shapes.read_bytes()
    headers = {"Authorization": f"Bearer {TEST_TOKEN}", "Accept": "video/mp4"}

    def slow_job():
        # ~2 s each in the tracker: the two hold both of the strict app's job slots.
        return httpx.post(f"{strict}/v2/segment", params={"prompt": "slow red"}, content=clip,
                          headers=headers, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(slow_job) for _ in range(2)]
        time.sleep(0.5)
        result = official_client.job(strict, {"prompt": "red"}, shapes, token=TEST_TOKEN)
        assert [h.result().status_code for h in holders] == [200, 200], [h.result().text for h in holders]
    statuses = [r["status"] for r in result["responses"]]
    assert result["ok"], result
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    assert all(r["retryAfter"] == "1" for r in result["responses"] if r["status"] == 429)
