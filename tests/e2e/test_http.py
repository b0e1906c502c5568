"""The HTTP contract over real HTTP: the plain endpoint, headers, health, metrics, error shapes."""

import json
import re

import httpx
import pytest

from testkit.video import mask_iou, read_video
from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W, TEST_TOKEN
from tests.serving import parse_multipart, wait_until

STAGES = ("probe", "decode", "track", "composite", "encode", "total")


def multipart_job(job: dict, video: bytes) -> tuple[bytes, str]:
    from serve_app.client import multipart_job as _multipart

    return _multipart(job, video)


def test_plain_endpoint_takes_the_body_and_query_and_answers_a_bare_mp4(graph, shapes):
    r = httpx.post(f"{graph}/v2/segment", params={"prompt": "red", "confidence_threshold": "0.5"},
                   content=shapes.read_bytes(), headers={"Accept": "video/mp4"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert mask_iou(r.content, {"red"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def test_timing_and_request_id_headers(graph, shapes):
    r = httpx.post(f"{graph}/v2/segment", params={"prompt": "blue"}, content=shapes.read_bytes(), timeout=60)
    assert r.status_code == 200
    ms = {stage: float(r.headers[f"x-{stage}-ms"]) for stage in STAGES}
    assert all(v > 0 for v in ms.values()), ms
    assert ms["total"] >= max(ms["decode"], ms["track"], ms["encode"])
    assert r.headers["x-frames"] == str(SHAPES_N)
    assert re.fullmatch(r"[0-9a-f-]{32,36}", r.headers["x-request-id"]), r.headers.get_list("x-request-id")


def test_a_callers_request_id_is_the_job_id(graph, shapes):
    body, ctype = multipart_job({"type": "inference.sam3.segment.video.v1", "config": {"prompt": "red"}},
                                shapes.read_bytes())
    r = httpx.post(f"{graph}/v2/job", content=body, timeout=60, headers={
        "Content-Type": ctype, "Accept": "multipart/form-data", "X-Request-ID": "trace-1234"})
    assert r.status_code == 200
    parts = parse_multipart(r.content, r.headers["content-type"])
    assert json.loads(parts["job"])["id"] == "trace-1234"
    assert r.headers.get_list("x-request-id") == ["trace-1234"]
    assert len(read_video(parts["output"]).frames) == SHAPES_N


def test_job_endpoint_answers_a_bare_mp4_to_accept_video_mp4(graph, shapes):
    body, ctype = multipart_job({"type": "inference.sam3.segment.video.v1", "config": {"prompt": "yellow"}},
                                shapes.read_bytes())
    r = httpx.post(f"{graph}/v2/job", content=body, headers={"Content-Type": ctype, "Accept": "video/mp4"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert mask_iou(r.content, {"yellow"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


@pytest.mark.parametrize("params, words", [
    ({"prompt": "red", "alpha": "lots"}, "config.alpha is 'lots'"),
    ({"prompt": "red", "colour": "red"}, "config.colour is not a known field"),
    ({}, "config.prompt is required"),
])
def test_plain_endpoint_bad_query_is_400_json_naming_the_field(graph, params, words):
    r = httpx.post(f"{graph}/v2/segment", params=params, content=b"\0" * 10, timeout=30)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert words in body["error"] and body["state"]["current"] == "failed" and body["id"]


def test_errors_are_multipart_for_clients_that_ask_for_it(graph):
    body, ctype = multipart_job({"type": "inference.sam3.segment.video.v1", "config": {"prompt": ""}}, b"x")
    r = httpx.post(f"{graph}/v2/job", content=body, timeout=30,
                   headers={"Content-Type": ctype, "Accept": "multipart/form-data; video/mp4"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("multipart/form-data")
    job = json.loads(parse_multipart(r.content, r.headers["content-type"])["job"])
    assert "config.prompt" in job["error"]


@pytest.mark.parametrize("body, words", [
    (b"not multipart", "multipart/form-data"),
    (None, "no 'input' part"),
])
def test_malformed_job_requests_are_400(graph, body, words):
    if body is None:
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"job\"\r\n\r\n"
                f"{{\"config\": {{\"prompt\": \"red\"}}}}\r\n--{boundary}--\r\n").encode()
        ctype = f"multipart/form-data; boundary={boundary}"
    else:
        ctype = "text/plain"
    r = httpx.post(f"{graph}/v2/job", content=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]


def test_health_and_unknown_routes(graph):
    assert httpx.get(f"{graph}/healthz").text == "ok"
    assert httpx.get(f"{graph}/v2/health").text == "ok"
    for path in ("/v2/nothing", "/anything/v2/segment", "/v2/job/extra"):  # routes match exactly
        r = httpx.post(f"{graph}{path}", content=b"x")
        assert r.status_code == 404 and r.json()["code"] == "not_found", path
        assert "POST /v2/job" in r.json()["error"]


def test_a_wrong_method_is_405_naming_the_allowed_one(graph):
    r = httpx.get(f"{graph}/v2/job")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["code"] == "method_not_allowed" and "GET /v2/job" in r.json()["error"]
    r = httpx.delete(f"{graph}/healthz")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_every_error_carries_a_stable_code_beside_its_message(graph, strict):
    big = httpx.post(f"{strict}/v2/segment?prompt=red", content=b"\0" * (3 << 20),
                     headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    assert (big.status_code, big.json()["code"]) == (413, "upload_too_large")
    r = httpx.post(f"{graph}/v2/segment", params={"prompt": "red", "alpha": "2"}, content=b"x")
    assert (r.status_code, r.json()["code"]) == (400, "invalid_job")
    r = httpx.post(f"{graph}/v2/segment", params={"prompt": "red"}, content=b"\0" * 100)
    assert (r.status_code, r.json()["code"]) == (415, "unsupported_media")
    r = httpx.post(f"{strict}/v2/segment", params={"prompt": "red"}, content=b"x")
    assert (r.status_code, r.json()["code"]) == (401, "unauthorized")


def test_prometheus_metrics_per_stage(cluster, graph, shapes):
    def scrape() -> tuple[set[str], float]:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        stages = set(re.findall(r'^ray_sam3_video_stage_ms_count\{[^}]*stage="(\w+)"', text, re.M))
        ok = re.findall(r'^ray_sam3_video_requests_total\{[^}]*status="200"[^}]*\} ([0-9.]+)', text, re.M)
        return stages, sum(float(v) for v in ok)

    _, ok_before = scrape()
    r = httpx.post(f"{graph}/v2/segment", params={"prompt": "red"}, content=shapes.read_bytes(), timeout=60)
    assert r.status_code == 200

    def exported():
        stages, ok = scrape()
        return stages >= set(STAGES) and ok >= ok_before + 1

    # Ray exports custom metrics every few seconds, from each node's metrics agent.
    assert wait_until(exported, timeout_s=30, interval_s=1), "no per-stage metrics in " + cluster.metrics_url


def test_cli_segments_through_a_running_service(graph, shapes, tmp_path, capsys):
    from serve_app.cli import main

    out = tmp_path / "out.mp4"
    assert main(["segment", str(shapes), "-o", str(out), "--prompt", "slow yellow", "--url", graph, "--objects"]) == 0
    assert mask_iou(out.read_bytes(), {"yellow"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    assert len(json.loads((tmp_path / "out.objects.json").read_text())["frames"]) == SHAPES_N
    bar = capsys.readouterr().err
    # a bar that counts frames as the job goes (the job takes ~2 s), not one tick at the end
    counts = {int(n) for n in re.findall(rf"(\d+)/{SHAPES_N} ", bar)}
    assert max(counts) == SHAPES_N and len(counts - {0, SHAPES_N}) >= 1, bar
    (tmp_path / "bad.mp4").write_bytes(b"\0" * 1000)
    assert main(["segment", str(tmp_path / "bad.mp4"), "-o", str(out), "--prompt", "red", "--url", graph, "-q"]) == 2
    assert "HTTP 415: not a readable MP4 video" in capsys.readouterr().err


def test_the_job_endpoint_adds_objects_json_when_asked(graph, shapes):
    from pycocotools import mask as rle

    body, ctype = multipart_job({"type": "inference.sam3.segment.video.v1",
                                 "config": {"prompt": "blue", "outputs": ["video", "objects"]}}, shapes.read_bytes())
    r = httpx.post(f"{graph}/v2/job", content=body, timeout=60,
                   headers={"Content-Type": ctype, "Accept": "multipart/form-data"})
    parts = parse_multipart(r.content, r.headers["content-type"])
    assert r.status_code == 200 and set(parts) == {"job", "output", "objects"}
    objects = json.loads(parts["objects"])
    first = read_video(parts["output"]).frames[0] >= 128
    (blue,) = objects["frames"][0]
    assert rle.decode({"size": blue["mask"]["size"], "counts": blue["mask"]["counts"].encode()}).astype(bool).tolist() \
        == first.tolist()
    assert len(parts["objects"]) < 40 * SHAPES_W * SHAPES_H // 50  # RLE: far smaller than the bitmaps
