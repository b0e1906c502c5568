"""The async job API over real HTTP, on SQLite and on PostgreSQL: the flow, progress, Range
requests, cancelling, many jobs at once, restarts, a replica killed mid-job, expiry."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_app.client import multipart_job
from testkit.video import masks
from tests.conftest import SHAPES_N, TEST_TOKEN
from tests.e2e.conftest import JOBS_ARGS, JOBS_STALE_S

JOB = "inference.sam3.segment.video.v1"


def submit(base: str, clip: bytes, config: dict, headers: dict | None = None) -> httpx.Response:
    body, ctype = multipart_job({"type": JOB, "config": config}, clip)
    return httpx.post(f"{base}/v2/job/async", content=body, headers={"Content-Type": ctype, **(headers or {})},
                      timeout=60)


def wait(base: str, job_id: str, until=("processed", "failed"), timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v2/job/async/{job_id}/job.json", timeout=30).json()
        if job["state"]["current"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {until} in {timeout_s} s: {job}")


def sync_answer(base: str, clip: bytes, prompt: str) -> bytes:
    r = httpx.post(f"{base}/v2/segment", params={"prompt": prompt}, content=clip, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def test_a_job_from_submit_to_its_files(jobs, shapes):
    base, *_ = jobs
    clip = shapes.read_bytes()
    r = submit(base, clip, {"prompt": "slow red", "outputs": ["video", "objects"]})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"]["current"] in ("queued", "processing") and job["config"]["outputs"] == ["video", "objects"]
    seen, states = [], set()
    while (state := httpx.get(f"{base}/v2/job/async/{job['id']}/job.state.current").text) not in ("processed", "failed"):
        states.add(state)
        seen.append(httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").json()["progress"]["frames_done"])
        time.sleep(0.3)
    assert state == "processed" and "processing" in states
    assert seen == sorted(seen) and len({s for s in seen if 0 < s < SHAPES_N}) >= 2  # live progress
    done = httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").json()
    assert done["progress"]["frames_done"] == done["progress"]["frames_total"] == SHAPES_N
    assert httpx.get(f"{base}/v2/job/async/{job['id']}/output").json() == ["output.mp4", "objects.json"]

    mp4 = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4")
    assert mp4.status_code == 200 and mp4.headers["accept-ranges"] == "bytes"
    assert [m.tolist() for m in masks(mp4.content)] == [m.tolist() for m in masks(sync_answer(base, clip, "red"))]
    part = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == mp4.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(mp4.content)}"
    tail = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == mp4.content[-10:]

    from pycocotools import mask as rle

    objects = httpx.get(f"{base}/v2/job/async/{job['id']}/output/objects.json").json()
    assert (objects["width"], objects["height"], len(objects["frames"])) == (384, 216, SHAPES_N)
    for picture, frame in zip(masks(mp4.content), objects["frames"]):
        union = np.zeros((216, 384), bool)
        for obj in frame:
            union |= rle.decode({"size": obj["mask"]["size"], "counts": obj["mask"]["counts"].encode()}).astype(bool)
        assert np.array_equal(union, picture)  # the same masks the video shows
    assert httpx.delete(f"{base}/v2/job/async/{job['id']}").status_code == 204
    assert httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").status_code == 404


def test_every_refusal_of_v2_job_comes_before_the_201(jobs, strict, shapes):
    base, *_ = jobs
    r = submit(base, shapes.read_bytes(), {"prompt": "red", "alpha": 2})
    assert r.status_code == 400 and r.json()["code"] == "invalid_job"
    r = submit(base, b"\0" * 1000, {"prompt": "red"})
    assert r.status_code == 415 and "not a readable MP4" in r.json()["error"]
    r = submit(strict, shapes.read_bytes(), {"prompt": "red"})
    assert r.status_code == 401
    r = submit(strict, shapes.read_bytes(), {"prompt": "red"}, {"Authorization": f"Bearer {TEST_TOKEN}"})
    assert r.status_code == 201
    assert httpx.get(f"{strict}/v2/job/async/{r.json()['id']}/job.json").status_code == 401  # reading needs it too


@pytest.mark.parametrize("method, path", [
    ("GET", "/job.json"), ("GET", "/job.state.current"), ("GET", "/output"), ("GET", "/output/output.mp4"),
    ("DELETE", ""),
])
def test_unknown_ids_are_404_json(jobs, method, path):
    base, *_ = jobs
    r = httpx.request(method, f"{base}/v2/job/async/no-such-job{path}")
    assert r.status_code == 404 and r.json()["code"] == "not_found" and "no-such-job" in r.json()["error"]


def test_a_jobs_id_is_its_own_never_the_callers_request_id(jobs, shapes):
    """The id names the job's files in the store: a caller's X-Request-ID of ".." must not."""
    base, _, store, _ = jobs
    outside = Path(store).parent / "input.mp4"  # where a job named ".." would keep its input

    def written() -> int | None:
        return outside.stat().st_mtime_ns if outside.exists() else None

    before = written()
    r = submit(base, shapes.read_bytes(), {"prompt": "red"}, {"X-Request-ID": ".."})
    assert r.status_code == 201 and re.fullmatch(r"[0-9a-f]{32}", r.json()["id"]), r.text
    assert wait(base, r.json()["id"])["state"]["current"] == "processed"
    assert httpx.delete(f"{base}/v2/job/async/%2E%2E").status_code == 404  # ".." itself is no job
    assert written() == before and any(Path(store).iterdir())
    assert httpx.delete(f"{base}/v2/job/async/{r.json()['id']}").status_code == 204


def test_cancelling_a_running_job_frees_the_tracker_at_once(jobs, shapes):
    base, *_ = jobs
    clip = shapes.read_bytes()
    job = submit(base, clip, {"prompt": "slow red"}).json()  # 8 s of tracking
    wait(base, job["id"], until=("processing",))
    while httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").json()["progress"]["frames_done"] < 2:
        time.sleep(0.1)
    assert httpx.delete(f"{base}/v2/job/async/{job['id']}").status_code == 204
    started = time.monotonic()
    sync_answer(base, clip, "red")  # the tracker takes one job at a time: it must be free
    assert time.monotonic() - started < 5
    assert httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4").status_code == 404


def test_fifty_jobs_at_once_are_none_lost_or_mixed(jobs, tmp_path):
    from serve_app import synthetic

    base, *_ = jobs
    small = tmp_path / "small.mp4"
    synthetic.write_clip(small, 128, 72, 8, 25)
    clip = small.read_bytes()
    prompts = ["red", "blue", "green", "yellow"]
    alone = {p: masks(sync_answer(base, clip, p)) for p in prompts}
    with ThreadPoolExecutor(8) as pool:  # the most uploads one client may have arriving at once
        submitted = list(pool.map(lambda i: (prompts[i % 4], submit(base, clip, {"prompt": prompts[i % 4]})), range(50)))
    assert all(r.status_code == 201 for _, r in submitted), [r.text for _, r in submitted if r.status_code != 201]
    for prompt, r in submitted:
        done = wait(base, r.json()["id"], timeout_s=180)
        assert done["state"]["current"] == "processed", json.dumps(done)
        got = masks(httpx.get(f"{base}/v2/job/async/{r.json()['id']}/output/output.mp4").content)
        assert len(got) == 8 and all(np.array_equal(a, b) for a, b in zip(got, alone[prompt])), prompt


def test_a_new_process_on_the_same_store_serves_the_old_job(cluster, jobs, shapes):
    from ray import serve

    base, name, store, db = jobs
    job = submit(base, shapes.read_bytes(), {"prompt": "yellow"}).json()
    wait(base, job["id"])
    first = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4").content
    again = cluster.deploy(f"{name}-again", f"/{name}-again", **JOBS_ARGS, job_store=store,
                           **({"job_db": db} if db else {}))
    try:
        assert httpx.get(f"{again}/v2/job/async/{job['id']}/job.state.current").text == "processed"
        assert httpx.get(f"{again}/v2/job/async/{job['id']}/output/output.mp4").content == first
    finally:
        serve.delete(f"{name}-again")
        cluster.apps.pop(f"{name}-again")


def test_a_job_survives_the_ingress_replica_that_was_running_it(jobs, shapes):
    import ray

    base, name, *_ = jobs
    job = submit(base, shapes.read_bytes(), {"prompt": "slow blue"}).json()
    wait(base, job["id"], until=("processing",))
    (ingress,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{name}#Ingress#")]
    ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)
    # Serve starts a new ingress; its runner finds the job silent and runs it again.
    done = wait(base, job["id"], timeout_s=JOBS_STALE_S + 90)
    assert done["state"]["current"] == "processed", done


def test_jobs_expire_with_their_files(cluster, shapes, tmp_path):
    from ray import serve

    store = tmp_path / "ttl"
    base = cluster.deploy("jobs-ttl", "/jobs-ttl", **JOBS_ARGS, job_store=str(store), job_ttl_s=3)
    try:
        job = submit(base, shapes.read_bytes(), {"prompt": "red"}).json()
        wait(base, job["id"])
        assert (store / job["id"] / "output.mp4").exists()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").status_code != 404:
            assert time.monotonic() < deadline, "the job outlived its TTL"
            time.sleep(0.5)
        assert not (store / job["id"]).exists()
    finally:
        serve.delete("jobs-ttl")
        cluster.apps.pop("jobs-ttl")


def test_prometheus_sees_the_queue_and_how_long_jobs_take(cluster, jobs, shapes):
    import re

    from tests.serving import wait_until

    base, *_ = jobs
    wait(base, submit(base, shapes.read_bytes(), {"prompt": "red"}).json()["id"])

    def scrape():
        text = httpx.get(cluster.metrics_url, timeout=10).text
        done = re.search(r'^ray_sam3_video_job_seconds_count\{[^}]*state="processed"[^}]*\} ([0-9.]+)', text, re.M)
        gauges = re.search(r"^ray_sam3_video_jobs_queued\{", text, re.M) and re.search(
            r"^ray_sam3_video_jobs_processing\{", text, re.M)
        return done and float(done.group(1)) >= 1 and gauges

    assert wait_until(scrape, timeout_s=30, interval_s=1), "no async job metrics in " + cluster.metrics_url
