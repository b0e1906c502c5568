"""Webhooks over real HTTP against `sam3-video serve --arg webhook_hosts=127.0.0.1` with its
secret in the environment: a job's end is delivered signed, tried again after the receiver's
500 (within 10 s), shown in job.json; a host not allowed is a 400 before the 201; and with
webhook_hosts but no secret the service does not start."""

import json
import time

import httpx
import pytest

from serve_app.jobs.webhooks import sign
from tests.e2e.test_async import wait
from tests.e2e.test_batch import Server
from tests.serving import wait_until
from tests.unit.test_webhooks import Receiver

SECRET = "e2e-webhook-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("webhook-serve"), "--arg", "webhook_hosts=127.0.0.1,hooks.example.com",
               env={"SAM3_VIDEO_WEBHOOK_SECRET": SECRET})
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture
def receiver():
    r = Receiver(500, 200)
    yield r
    r.close()


def test_a_jobs_end_is_delivered_signed_and_again_after_a_500(server, receiver, shapes):
    r = post_job(server.base, shapes.read_bytes(), {"prompt": "red"}, query=receiver.url)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["webhook"] == {"attempts": 0, "last_status": None, "state": "waiting"}
    assert wait(server.base, job_id)["state"]["current"] == "processed"
    assert wait_until(lambda: len(receiver.seen) >= 2, timeout_s=30), receiver.seen
    stamps = []
    for n, (path, headers, body) in enumerate(receiver.seen[:2], 1):
        assert path == "/hook?from=sam3" and headers["Content-Type"] == "application/json"
        assert headers["X-Sam3-Signature"] == sign(body, SECRET)
        assert (headers["X-Sam3-Job-Id"], headers["X-Sam3-Attempt"]) == (job_id, str(n))
        job = json.loads(body)
        assert (job["id"], job["state"]["current"], job["delivery"]["attempt"]) == (job_id, "processed", n)
        stamps.append(job["delivery"]["timestamp"])
    assert 0 < stamps[1] - stamps[0] <= 10  # the first retry within 10 s
    shown = wait_until(lambda: (j := httpx.get(f"{server.base}/v2/job/async/{job_id}/job.json").json())
                       ["webhook"]["state"] == "delivered" and j, timeout_s=10)
    assert shown["webhook"] == {"attempts": 2, "last_status": 200, "state": "delivered"}
    time.sleep(1)
    assert len(receiver.seen) == 2  # delivered: no more


def test_a_failed_job_is_delivered_too_and_the_form_field_works(server, shapes):
    receiver = Receiver(204)
    try:
        r = post_job(server.base, shapes.read_bytes(), {"prompt": "refuse red"}, field=receiver.url)
        assert r.status_code == 201, r.text
        assert wait(server.base, r.json()["id"])["state"]["current"] == "failed"
        assert wait_until(lambda: receiver.seen, timeout_s=20)
        job = json.loads(receiver.seen[0][2])
        assert (job["state"]["current"], job["code"]) == ("failed", "unsupported_media")
    finally:
        receiver.close()


@pytest.mark.parametrize("where", ["query", "field"])
def test_a_host_not_allowed_is_400_before_the_201(server, shapes, where):
    url = "http://169.254.169.254/latest/meta-data"
    r = post_job(server.base, shapes.read_bytes(), {"prompt": "red"}, **{where: url})
    assert r.status_code == 400 and r.json()["code"] == "invalid_job", r.text
    assert "webhook host '169.254.169.254' is not allowed; this service sends webhooks to hooks.example.com, " \
           "127.0.0.1" in r.json()["error"]


def test_webhook_hosts_without_a_secret_does_not_start(tmp_path):
    s = Server(tmp_path, "--arg", "webhook_hosts=127.0.0.1", env={"SAM3_VIDEO_WEBHOOK_SECRET": ""})
    try:
        assert s.process.wait(180) == 2
        last = s.log.read_text().strip().splitlines()[-1]
        assert last.startswith("error: ") and "SAM3_VIDEO_WEBHOOK_SECRET is empty" in last, last
    finally:
        s.stop()


def post_job(base: str, video: bytes, config: dict, *, query: str | None = None, field: str | None = None):
    """POST /v2/job/async with the webhook in the query or as a form field."""
    from serve_app.api.answers import multipart_body

    parts = [("job", "job.json", "application/json", json.dumps({"config": config}).encode()),
             ("input", "input.mp4", "video/mp4", video)]
    if field is not None:
        parts.append(("webhook", "", "text/plain", field.encode()))
    body, ctype = multipart_body(parts)
    return httpx.post(f"{base}/v2/job/async", params={"webhook": query} if query else None, content=body,
                      headers={"Content-Type": ctype}, timeout=60)
