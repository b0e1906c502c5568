"""What an operator of a durable job service expects, over real HTTP: the right status for odd
requests, safe headers on every answer, and job JSON that says what a job is doing."""

import json
import os
import time
from pathlib import Path

import httpx

from serve_app.client import multipart_job
from tests.conftest import SHAPES_N, TEST_TOKEN
from tests.e2e.test_async import submit, wait
from tests.serving import wait_until

JOB = "inference.sam3.segment.video.v1"


def test_a_raw_non_ascii_bearer_token_is_401_not_500(strict):
    r = httpx.post(f"{strict}/v2/segment", params={"prompt": "red"}, content=b"x",
                   headers={"Authorization": b"Bearer \xe9"})
    assert (r.status_code, r.json()["code"]) == (401, "unauthorized")


def test_a_trailing_slash_is_404_and_no_redirect_echoes_the_host(graph):
    for method, path in [("GET", "/healthz/"), ("POST", "/v2/job/"), ("GET", "/v2/job/async/x/output/output.mp4/")]:
        r = httpx.request(method, f"{graph}{path}", headers={"Host": "evil.example:666"}, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)
        assert r.json()["code"] == "not_found"


def test_a_key_given_twice_in_the_job_json_is_400_naming_it(graph, shapes):
    body, ctype = multipart_job({"type": JOB, "config": {"prompt": "red"}}, shapes.read_bytes())
    body = body.replace(b'"prompt": "red"', b'"prompt": "red", "mode": "overlay", "mode": "mask"')
    r = httpx.post(f"{graph}/v2/job", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_job")
    assert "'mode' more than once" in r.json()["error"]


def test_every_answer_is_nosniff_job_json_is_not_cached_the_page_is_not_framed(graph, shapes):
    answers = {
        "page": httpx.get(f"{graph}/"),
        "health": httpx.get(f"{graph}/healthz"),
        "404": httpx.get(f"{graph}/nowhere", headers={"X-Request-ID": "asked-for-1"}),
        "405": httpx.get(f"{graph}/v2/job"),
        "400": httpx.post(f"{graph}/v2/segment", params={"prompt": "red", "alpha": "x"}, content=b"x"),
        "200": httpx.post(f"{graph}/v2/segment", params={"prompt": "red"}, content=shapes.read_bytes(), timeout=60),
        "201": submit(graph, shapes.read_bytes(), {"prompt": "red"}),
    }
    for name, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name
    for name in ("404", "405", "400", "200", "201"):
        assert answers[name].headers.get("cache-control") == "no-store", name
    assert "frame-ancestors 'none'" in answers["page"].headers["content-security-policy"]
    for name in ("404", "405"):  # the id in the body is the one the headers name
        assert answers[name].json()["id"] == answers[name].headers["x-request-id"], name
    assert answers["404"].json()["id"] == "asked-for-1"
    job = answers["201"].json()["id"]
    assert httpx.get(f"{graph}/v2/job/async/{job}/job.json").headers["cache-control"] == "no-store"
    wait(graph, job)


def test_an_unfinished_jobs_outputs_are_409_with_its_state(jobs, shapes):
    base, *_ = jobs
    job = submit(base, shapes.read_bytes(), {"prompt": "slow red"}).json()  # 8 s of tracking
    for path in ("/output", "/output/output.mp4"):
        r = httpx.get(f"{base}/v2/job/async/{job['id']}{path}")
        assert (r.status_code, r.json()["code"]) == (409, "job_not_done"), path
        assert f"job {job['id']} is " in r.json()["error"]
    assert wait(base, job["id"])["state"]["current"] == "processed"
    assert httpx.get(f"{base}/v2/job/async/{job['id']}/output").json() == ["output.mp4"]
    huge = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4",
                     headers={"Range": "bytes=" + "9" * 4400 + "-"})
    assert huge.status_code == 416 and huge.headers["content-range"].startswith("bytes */")


def test_a_job_waiting_for_the_tracker_says_so_and_its_clock_has_not_started(jobs, shapes):
    base, *_ = jobs
    clip = shapes.read_bytes()
    first = submit(base, clip, {"prompt": "slow red"}).json()  # the tracker runs one job at a time
    while httpx.get(f"{base}/v2/job/async/{first['id']}/job.json").json()["progress"]["frames_done"] < 2:
        time.sleep(0.1)
    submitted = time.monotonic()
    second = submit(base, clip, {"prompt": "red"}).json()
    seen = []
    while httpx.get(f"{base}/v2/job/async/{first['id']}/job.state.current").text == "processing":
        seen.append(httpx.get(f"{base}/v2/job/async/{second['id']}/job.json").json())
        time.sleep(0.3)
    waited = time.monotonic() - submitted
    waiting = [j for j in seen if j["state"]["current"] == "processing"][:-1]  # the last may have started
    assert waiting and all(j["progress"]["stage"] == "waiting" for j in waiting), [j["progress"] for j in seen]
    assert all(j["progress"]["elapsed_s"] == 0 and j["progress"]["frames_done"] == 0 for j in waiting)
    done = wait(base, second["id"])
    assert done["state"]["current"] == "processed" and done["progress"]["frames_done"] == SHAPES_N
    assert done["progress"]["elapsed_s"] < time.monotonic() - submitted - waited + 1  # from its first frame


def test_strict_app_answers_json_with_the_same_headers(strict):
    r = httpx.get(f"{strict}/v2/job/async/none/job.json", headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    assert r.status_code == 404 and r.headers["cache-control"] == "no-store"
    assert json.loads(r.content)["code"] == "not_found"


def test_a_job_belongs_to_the_token_that_submitted_it(strict, shapes):
    from tests.conftest import TEST_ADMIN_TOKEN

    def auth(token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    r = submit(strict, shapes.read_bytes(), {"prompt": "red"}, auth(TEST_TOKEN))
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    for method, path in [("GET", "/job.json"), ("GET", "/job.state.current"), ("GET", "/output"),
                         ("GET", "/output/output.mp4"), ("DELETE", "")]:
        other = httpx.request(method, f"{strict}/v2/job/async/{job}{path}", headers=auth("test-token-2"))
        assert (other.status_code, other.json()["code"]) == (404, "not_found"), (method, path)
    assert httpx.get(f"{strict}/v2/job/async/{job}/job.json", headers=auth(TEST_TOKEN)).status_code == 200
    assert httpx.get(f"{strict}/v2/job/async/{job}/job.json", headers=auth(TEST_ADMIN_TOKEN)).status_code == 200
    assert httpx.delete(f"{strict}/v2/job/async/{job}", headers=auth(TEST_ADMIN_TOKEN)).status_code == 204


def test_simultaneous_submissions_never_pass_the_queue_bound(cluster, shapes):
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e.conftest import JOBS_ARGS

    bounded = {**JOBS_ARGS, "max_queued_jobs": 5, "max_inflight_per_ingress": 1}
    with cluster.one_off("bounded", "/bounded", **bounded) as base:
        clip = shapes.read_bytes()
        running = submit(base, clip, {"prompt": "slow red"}).json()["id"]  # holds the one job slot
        wait(base, running, until=("processing",))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: submit(base, clip, {"prompt": "red"}), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [201] * 5 + [429] * 3, [(r.status_code, r.text[:100]) for r in answers]
        assert all(r.headers["retry-after"] for r in answers if r.status_code == 429)
        for r in answers + [httpx.Response(201, json={"id": running})]:
            if r.status_code == 201:
                httpx.delete(f"{base}/v2/job/async/{r.json()['id']}")


def test_slow_downloads_cost_the_ingress_and_proxy_a_few_chunks_each_whatever_the_size(cluster, jobs, shapes):
    import threading

    import psutil

    base, name, store, _ = jobs
    job = submit(base, shapes.read_bytes(), {"prompt": "red"}).json()["id"]
    wait(base, job)
    big = os.urandom(25 << 20)
    (Path(store) / job / "output.mp4").write_bytes(big)  # a 25 MB output, as a long overlay's

    def processes() -> dict[str, psutil.Process]:
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if f"ServeReplica:{name}:Ingress" in cmd:
                found["ingress"] = p
            elif "ProxyActor" in cmd:
                found["proxy"] = p
        return found

    watched = processes()
    assert httpx.get(f"{base}/v2/job/async/{job}/output/output.mp4", timeout=60).content == big  # warm
    before = {k: p.memory_full_info().uss for k, p in watched.items()}
    peak = dict(before)
    stop, started = threading.Event(), []

    def slow_reader(i: int):
        with httpx.stream("GET", f"{base}/v2/job/async/{job}/output/output.mp4", timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(len(big))
            started.append(i)
            for _ in r.iter_raw(64 << 10):
                if stop.wait(0.25):  # 256 KB/s: the file would take 100 s
                    return

    readers = [threading.Thread(target=slow_reader, args=(i,)) for i in range(16)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for k, p in watched.items():
            peak[k] = max(peak[k], p.memory_full_info().uss)
        time.sleep(0.2)
    stop.set()
    for t in readers:
        t.join(30)
    grown = {k: (peak[k] - before[k]) / 2**20 for k in watched}
    print("peak growth while 16 slow downloads of 25 MB run (MB):", grown)
    assert len(started) == 16
    # A few 1 MB chunks each (the one being sent, the socket's buffer, Ray's copy), not 16 x 25 MB
    assert grown["ingress"] < 16 * 6 and grown["proxy"] < 16 * 6, grown
    whole = httpx.get(f"{base}/v2/job/async/{job}/output/output.mp4", timeout=60)
    assert whole.content == big  # and a download still gets every byte, in order


def test_the_stages_stop_within_seconds_when_the_ingress_that_asked_dies(cluster, shapes):
    import ray

    from testkit.doubles import SCRIPTED_TRACKER

    # One job at a time on the tracker, 20 s a job; the dead ingress's job is not requeued here.
    slow = {"kind": "import", "path": SCRIPTED_TRACKER, "options": {"delay_s": 0.5}}
    with cluster.one_off("orphans", "/orphans", tracker=slow, tracker_max_ongoing_requests=1, job_stale_s=600) as base:
        clip = shapes.read_bytes()
        job = submit(base, clip, {"prompt": "slow red"}).json()["id"]
        assert wait_until_frames(base, job, 2)
        (ingress,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("SERVE_REPLICA::orphans#Ingress#")]
        ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)

        def answered():
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(answered, timeout_s=60, interval_s=0.2)  # Serve's new ingress replica
        started = time.monotonic()
        r = httpx.post(f"{base}/v2/segment", params={"prompt": "red"}, content=clip, timeout=60)
        waited = time.monotonic() - started
        assert r.status_code == 200
        # The orphan had ~18 s of tracking left at the kill; a tracker still spending it would hold
        # this 2-second job until then.
        assert waited < 5, waited


def wait_until_frames(base: str, job: str, frames: int, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/v2/job/async/{job}/job.json").json()["progress"]["frames_done"] >= frames:
            return True
        time.sleep(0.1)
    return False
