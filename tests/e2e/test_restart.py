"""`sam3-video serve` stopped gracefully (SIGTERM, then Ctrl-C) with a job running, twice in a
row: each stop hands the job back to the queue at once without counting an attempt, leaves no
temporary file, and the next start runs it to the end. Each server is a Ray cluster of its own."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from serve_app.jobs.store import JobStore
from testkit.net import free_port
from tests.conftest import REPO, SHAPES_N
from tests.e2e.test_async import submit
from tests.serving import wait_until


def start(store: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "serve_app.cli", "serve", "--port", str(port),
               "--tracker", "testkit.doubles:ScriptedTracker", "--tracker-option", "delay_s=0.2",
               "--arg", f"job_store={store}", "--arg", "tracker_max_ongoing_requests=1",
               "--arg", "job_min_free_bytes=0", "--arg", "graceful_shutdown_timeout_s=10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # its replicas import the scripted tracker
    # SIGINT's default back in the server even where the tests run with it ignored (a shell's
    # background job passes that on, and the Ctrl-C stop below would never arrive)
    server = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    up = wait_until(lambda: server.poll() is not None or _healthy(port), timeout_s=120, interval_s=0.5)
    assert up and server.poll() is None, log.read_text()[-3000:]
    return server


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def spools() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sam3-video-*")}


def test_a_graceful_stop_twice_in_a_row_loses_no_job_and_counts_no_attempt(tmp_path, shapes):
    store, log = tmp_path / "jobs", tmp_path / "serve.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    job = None
    for stop in (signal.SIGTERM, signal.SIGINT):
        before = spools()
        server = start(store, port, log)
        try:
            if job is None:  # 40 frames at 0.2 s: 8 s of tracking
                job = submit(base, shapes.read_bytes(), {"prompt": "slow red"}).json()["id"]
            assert wait_until(lambda: httpx.get(f"{base}/v2/job/async/{job}/job.json").json()["progress"]
                              ["frames_done"] > 0, timeout_s=60, interval_s=0.2), "the job never started"
            server.send_signal(stop)
            try:
                code = server.wait(120)
            except subprocess.TimeoutExpired:
                code = "still running 120 s after the signal"
            assert code == 0, log.read_text()[-3000:]
        finally:
            if server.poll() is None:
                server.kill()
        row = JobStore(str(store)).get(job)
        assert (row.state, row.attempts, row.frames_done) == ("queued", 0, 0), (stop, row)
        assert spools() <= before, spools() - before  # the runner's input copy went with it
    server = start(store, port, log)
    try:
        assert wait_until(lambda: httpx.get(f"{base}/v2/job/async/{job}/job.state.current").text == "processed",
                          timeout_s=120, interval_s=0.5)
        done = httpx.get(f"{base}/v2/job/async/{job}/job.json").json()
        assert done["progress"]["frames_done"] == SHAPES_N
        assert JobStore(str(store)).get(job).attempts == 1  # the one run that finished
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
