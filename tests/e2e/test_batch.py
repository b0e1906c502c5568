"""`sam3-video batch --address auto` as a second Ray driver against a `sam3-video serve` running
its own Ray (both with a private RAY_TMPDIR, so "auto" can only find that one): a mixed manifest
writes faithful outputs and records the bad uploads with their codes (exit 1), a replica lost
mid-job is retried, a rerun skips everything done, and a driver killed mid-way leaves no partial
file and a rerun finishes the rest."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from testkit.net import free_port
from testkit.video import mask_iou, read_video
from tests.conftest import REPO, SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W
from tests.serving import wait_until

BAD = {"truncated mp4": "unsupported_media", "mkv named .mp4": "unsupported_media", "8K": "video_limit_exceeded"}


class Server:
    """`sam3-video serve` with the scripted stand-in on a Ray of its own."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port, self.log = free_port(), tmp / "serve.log"
        # A short private Ray folder (its sockets' paths have a length limit): "auto" finds this Ray only.
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": tempfile.mkdtemp(prefix="rb", dir="/tmp"),
                    **(env or {})}
        command = [sys.executable, "-m", "serve_app.cli", "serve", "--port", str(self.port),
                   "--tracker", "testkit.doubles:ScriptedTracker", "--tracker-option", "delay_s=0.1",
                   "--arg", f"job_store={tmp / 'jobs'}", "--arg", "job_min_free_bytes=0",
                   "--arg", "graceful_shutdown_timeout_s=1", "--arg", "tracker_drain_timeout_s=1", *args]
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self) -> None:
        up = wait_until(lambda: self.process.poll() is not None or self._healthy(), timeout_s=180, interval_s=0.5)
        assert up and self.process.poll() is None, self.log.read_text()[-3000:]

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.env["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("batch-serve"))
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def batch(server: Server, manifest: Path, dest: Path, *args: str, timeout_s: float = 300):
    command = [sys.executable, "-m", "serve_app.cli", "batch", str(manifest), "--out", str(dest),
               "--address", "auto", *args]
    return subprocess.run(command, env=server.env, capture_output=True, text=True, timeout=timeout_s)


def results(dest: Path) -> dict[str, dict]:
    return {line["output"]: line for line in map(json.loads, (dest / "results.jsonl").read_text().splitlines())}


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_mixed_manifest_through_the_running_app_then_a_rerun_that_skips_all(server, tmp_path, shapes, bad_uploads):
    lines = [{"input": str(shapes), "config": {"prompt": "red"}, "output": "red"},
             {"input": str(shapes), "config": {"prompt": "yellow", "outputs": ["video", "objects"]}, "output": "yellow"}]
    for name in BAD:
        path = tmp_path / (name.replace(" ", "_") + ".mp4")
        path.write_bytes(bad_uploads[name][0])
        lines.append({"input": path.name, "config": {"prompt": "red"}})
    # The tracker replica dies on this one each time (a lost GPU): retried, then failed; the rest go on.
    lines.append({"input": str(shapes), "config": {"prompt": "crash blue"}, "output": "crash"})
    manifest, dest = write_manifest(tmp_path / "m.jsonl", lines), tmp_path / "out"

    done = batch(server, manifest, dest, "--retries", "1")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "batch: 6 of 6 inputs" in done.stderr
    got = results(dest)
    assert (got["red"]["status"], got["yellow"]["status"], got["red"]["frames"]) == ("done", "done", SHAPES_N)
    for colour in ("red", "yellow"):
        assert mask_iou((dest / f"{colour}.mp4").read_bytes(), {colour}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    assert len(json.loads((dest / "yellow.objects.json").read_bytes())["frames"]) == SHAPES_N
    for name, code in BAD.items():
        line = got[name.replace(" ", "_")]
        assert (line["status"], line["code"], line["attempts"]) == ("failed", code, 1), line
    crash = got["crash"]
    assert (crash["status"], crash["code"], crash["attempts"]) == ("failed", "model_error", 2), crash
    assert "tracker replica died" in crash["error"] and "(after 2 attempts)" in crash["error"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.mp4")}
    again = batch(server, manifest, dest, "--retries", "0")
    assert again.returncode == 1, again.stderr[-3000:]  # the bad ones fail again; nothing good is redone
    got = results(dest)
    assert (got["red"]["status"], got["yellow"]["status"]) == ("skipped", "skipped")
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.mp4")} == mtimes


def test_a_driver_killed_mid_way_leaves_no_partial_file_and_a_rerun_finishes(server, tmp_path, shapes):
    # 40 frames at 0.1 s: 4 s a job, two at a time (the graph's two tracker sessions).
    manifest = write_manifest(tmp_path / "m.jsonl", [{"input": str(shapes), "config": {"prompt": "slow red"},
                                                      "output": f"o{i}"} for i in range(6)])
    dest = tmp_path / "out"
    command = [sys.executable, "-m", "serve_app.cli", "batch", str(manifest), "--out", str(dest), "--address", "auto",
               "-q"]
    driver = subprocess.Popen(command, env=server.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_until(lambda: driver.poll() is not None or list(dest.glob("*.done.json")), timeout_s=120), \
        driver.stderr.read().decode()[-3000:]
    driver.kill()  # no chance to clean up
    driver.wait(30)
    for mp4 in dest.glob("*.mp4"):  # whatever is under a final name is whole
        assert len(read_video(mp4.read_bytes()).frames) == SHAPES_N, mp4
    first = {p.name.removesuffix(".done.json") for p in dest.glob("*.done.json")}
    assert 1 <= len(first) < 6

    done = batch(server, manifest, dest)
    assert done.returncode == 0, done.stderr[-3000:]
    got = results(dest)
    assert {o for o, line in got.items() if line["status"] == "skipped"} >= first
    assert all(line["status"] in ("done", "skipped") for line in got.values()) and len(got) == 6
    assert sorted(p.name for p in dest.glob("*.mp4")) == [f"o{i}.mp4" for i in range(6)]
    assert [p.name for p in dest.rglob("*") if ".part-" in p.name] == []
    for i in range(6):
        assert mask_iou((dest / f"o{i}.mp4").read_bytes(), {"red"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def test_a_cluster_or_app_that_is_not_there_is_one_line_and_exit_2(server, tmp_path, shapes):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"input": str(shapes), "config": {"prompt": "red"}}])
    started = time.monotonic()
    missing = batch(server, manifest, tmp_path / "out", "--app", "no-such-app")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "error: no app 'no-such-app' runs on the Ray cluster at 'auto'"), missing.stderr[-2000:]
    assert "Traceback" not in missing.stderr and time.monotonic() - started < 120
