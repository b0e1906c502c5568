"""`sam3-video batch` without Ray (`--local`, or serve_app.batch.run.Batch on the in-process
segmenter with the scripted stand-in tracker): faithful outputs for good clips and the bad
uploads recorded with their codes (exit 1), a rerun that skips what is done, a stopped run that
resumes with no partial file, retries for 5xx and none for 4xx, the in-flight bound, and one
line with exit 2 for a batch that cannot run."""

import _thread
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve_app.batch.dest import Dest, config_hash
from serve_app.batch.manifest import load
from serve_app.batch.run import Batch
from serve_app.batch.segmenters import LocalSegmenter
from serve_app.cli import main
from serve_app.contract import JobConfig
from serve_app.errors import ModelError, ModelUnavailable
from testkit.doubles import ScriptedTracker
from testkit.video import mask_iou
from tests.conftest import REPO, SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W

LOCAL = ["--local", "--tracker", "testkit.doubles:ScriptedTracker"]
BAD = {"truncated mp4": "unsupported_media", "webm named .mp4": "unsupported_media", "8K": "video_limit_exceeded"}


@pytest.fixture
def mixed(tmp_path, shapes, bad_uploads):
    """(manifest, DEST): two good clips, three bad uploads, one missing file."""
    lines = [{"input": str(shapes), "config": {"prompt": "red"}, "output": "red"},
             {"input": str(shapes), "config": {"prompt": "yellow", "outputs": ["video", "objects"]},
              "output": "yellow"}]
    for name in BAD:
        path = tmp_path / "in" / (name.replace(" ", "_") + ".mp4")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bad_uploads[name][0])
        lines.append({"input": f"in/{path.name}", "config": {"prompt": "red"}})
    lines.append({"input": "in/gone.mp4", "config": {"prompt": "red"}})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(manifest), tmp_path / "out"


def results(dest: Path) -> dict[str, dict]:
    return {line["output"]: line for line in map(json.loads, (dest / "results.jsonl").read_text().splitlines())}


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*") if ".part-" in p.name)


def test_a_mixed_manifest_writes_faithful_outputs_records_the_bad_with_their_codes_and_exits_1(mixed, capsys):
    manifest, dest = mixed
    assert main(["batch", manifest, "--out", str(dest), *LOCAL]) == 1
    got = results(dest)
    assert [got[k]["status"] for k in ("red", "yellow")] == ["done", "done"]
    assert got["red"]["frames"] == SHAPES_N and got["red"]["attempts"] == 1
    for colour in ("red", "yellow"):
        assert mask_iou((dest / f"{colour}.mp4").read_bytes(), {colour}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    objects = json.loads((dest / "yellow.objects.json").read_bytes())
    assert len(objects["frames"]) == SHAPES_N and not (dest / "red.objects.json").exists()
    for name, code in BAD.items():
        line = got[name.replace(" ", "_")]
        assert (line["status"], line["code"], line["attempts"]) == ("failed", code, 1), line  # 4xx: not retried
        assert line["error"] and not (dest / f"{line['output']}.mp4").exists()
    assert (got["gone"]["status"], got["gone"]["code"]) == ("failed", "input_unreadable")
    assert "does not exist" in got["gone"]["error"]
    assert list(got) == ["red", "yellow", *[n.replace(" ", "_") for n in BAD], "gone"]  # manifest order
    err = capsys.readouterr().err
    assert "Traceback" not in err and "batch: 6 of 6 inputs" in err and "webm_named_.mp4: unsupported_media" in err
    assert leftovers(dest) == []


def test_a_rerun_skips_everything_done_and_rewrites_nothing(mixed):
    manifest, dest = mixed
    main(["batch", manifest, "--out", str(dest), *LOCAL, "-q"])
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir() if not p.name.startswith(".")}
    assert main(["batch", manifest, "--out", str(dest), *LOCAL, "-q"]) == 1  # the bad ones fail again
    got = results(dest)
    assert (got["red"]["status"], got["yellow"]["status"], got["red"]["frames"]) == ("skipped", "skipped", SHAPES_N)
    after = {p.name: p.stat().st_mtime_ns for p in dest.iterdir() if not p.name.startswith(".")}
    assert {n: t for n, t in after.items() if n != "results.jsonl"} == \
        {n: t for n, t in before.items() if n != "results.jsonl"}


def test_a_rerun_redoes_what_changed_and_skips_a_copy_of_the_same_bytes(tmp_path, shapes):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(shapes.read_bytes())
    manifest, dest = tmp_path / "m.jsonl", tmp_path / "out"

    def run(config: dict) -> dict:
        manifest.write_text(json.dumps({"input": "clip.mp4", "config": config}) + "\n")
        assert main(["batch", str(manifest), "--out", str(dest), *LOCAL, "-q"]) == 0
        return results(dest)["clip"]

    assert run({"prompt": "red", "outputs": ["video", "objects"]})["status"] == "done"
    assert run({"prompt": "red", "outputs": ["video", "objects"], "mode": "mask"})["status"] == "skipped"  # a default
    os.utime(clip, (1, 1))  # copied or touched: new fingerprint, same bytes
    assert run({"prompt": "red", "outputs": ["video", "objects"]})["status"] == "skipped"
    assert run({"prompt": "red"})["status"] == "done"  # another config
    assert not (dest / "clip.objects.json").exists()  # what this config does not make is gone
    clip.write_bytes(shapes.read_bytes()[:-1] + b"\0")  # other bytes, same size
    os.utime(clip, (2, 2))
    assert run({"prompt": "red"})["status"] == "done"
    assert run({"prompt": "red"})["status"] == "skipped"


def test_a_configs_hash_is_of_the_fields_it_sets_away_from_their_defaults():
    # A marker written now must match after a release adds a config field (with its default).
    assert config_hash(JobConfig(prompt="red", mode="mask")) == hashlib.sha256(b'{"prompt": "red"}').hexdigest()
    assert config_hash(JobConfig(prompt="red", alpha=0.3)) != config_hash(JobConfig(prompt="red"))


class FlakyGraph(LocalSegmenter):
    """The in-process graph, except that each input's first job dies as a lost replica does
    (the ingress's ModelError, a 500)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[bytes] = set()

    def run(self, data, config):
        key = data[:64] + config.prompt.encode()
        if key not in self.seen:
            self.seen.add(key)
            raise ModelError("the tracker replica died while working on this job; retry")
        return super().run(data, config)


def test_a_5xx_or_lost_replica_is_retried_and_a_failure_that_stays_fails_its_input_only(tmp_path, shapes):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": p}, "output": o}) + "\n"
                                for p, o in (("red", "a"), ("raise red", "b"), ("blue", "c"))))
    dest = Dest(str(tmp_path / "out"))
    batch = Batch(load(str(manifest), {}), dest, FlakyGraph(ScriptedTracker(crash_after=3)), retries=2,
                  backoff_s=0.01, show_progress=False)
    report = batch.run()
    got = results(tmp_path / "out")
    assert (got["a"]["status"], got["a"]["attempts"], got["c"]["status"], got["c"]["attempts"]) == ("done", 2, "done", 2)
    assert (got["b"]["status"], got["b"]["code"], got["b"]["attempts"]) == ("failed", "internal_error", 3)
    assert "scripted tracker failure (after 3 attempts)" in got["b"]["error"]
    assert report.exit_code == 1


class Counting(LocalSegmenter):
    """Counts the jobs the batch has handed over and not yet got back (its in flight)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.now = self.most = 0
        self.count = threading.Lock()

    def run(self, data, config):
        with self.count:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.1)  # long enough for the other workers to pile up, were they allowed
            return super().run(data, config)
        finally:
            with self.count:
                self.now -= 1


@pytest.mark.parametrize("inflight", [1, 2])
def test_jobs_in_flight_never_exceed_the_bound(tmp_path, shapes, inflight):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": "red"}, "output": f"o{i}"})
                                + "\n" for i in range(6)))
    graph = Counting(ScriptedTracker())
    report = Batch(load(str(manifest), {}), Dest(str(tmp_path / "out")), graph, inflight=inflight, read_ahead=3,
                   show_progress=False).run()
    assert report.count("done") == 6 and graph.most == inflight


class Interrupting(LocalSegmenter):
    """Presses Ctrl-C (in the main thread) once `after` jobs have finished."""

    def __init__(self, after: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.finished = after, 0

    def run(self, data, config):
        result = super().run(data, config)
        self.finished += 1
        if self.finished == self.after:
            _thread.interrupt_main()
        return result


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here even where the tests were started with SIGINT
    ignored (a shell's background job), where interrupt_main would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_keeps_what_finished_and_a_rerun_does_only_the_rest(tmp_path, shapes, sigint_raises):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": "red"}, "output": f"o{i}"})
                                + "\n" for i in range(6)))
    items, dest = load(str(manifest), {}), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        Batch(items, Dest(str(dest)), Interrupting(2, ScriptedTracker()), inflight=1, show_progress=False).run()
    first, outputs = results(dest), sorted(dest.glob("*.mp4"))
    time.sleep(1.0)  # a few jobs' time: nothing goes on after the batch has returned
    assert sorted(dest.glob("*.mp4")) == outputs and len(outputs) == len(first)
    assert 2 <= len(first) < 6 and all(line["status"] == "done" for line in first.values())
    assert leftovers(dest) == []
    report = Batch(items, Dest(str(dest)), LocalSegmenter(ScriptedTracker()), show_progress=False).run()
    again = results(dest)
    assert {o for o, line in again.items() if line["status"] == "skipped"} == set(first)
    assert report.count("done") == 6 - len(first) and len(again) == 6


def test_sigterm_stops_the_command_with_130_and_a_rerun_finishes_with_no_part_left(tmp_path, shapes):
    manifest, dest = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": "slow red"}, "output": f"o{i}"})
                                + "\n" for i in range(5)))
    command = [sys.executable, "-m", "serve_app.cli", "batch", str(manifest), "--out", str(dest), *LOCAL,
               "--tracker-option", "delay_s=0.02"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(dest.glob("*.done.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130 and "Traceback" not in err and "run the same command again" in err, err
    finished = {o for o, line in results(dest).items() if line["status"] == "done"}
    assert 1 <= len(finished) < 5
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = results(dest)
    assert {o for o, line in again.items() if line["status"] == "skipped"} == finished
    assert sorted(p.name for p in dest.glob("*.mp4")) == [f"o{i}.mp4" for i in range(5)] and leftovers(dest) == []


def test_parts_a_killed_run_left_are_removed_and_never_taken_for_outputs(tmp_path, shapes):
    manifest, dest = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text(json.dumps({"input": str(shapes), "config": {"prompt": "red"}, "output": "cam/a"}) + "\n")
    (dest / "cam").mkdir(parents=True)
    (dest / "cam" / ".a.mp4.part-0123abcd").write_bytes(b"half an mp4")  # a write cut off by a kill -9
    (dest / "cam" / "a.mp4").write_bytes(b"an mp4 with no marker")        # moved in, then killed before its marker
    assert main(["batch", str(manifest), "--out", str(dest), *LOCAL, "-q"]) == 0
    assert results(dest)["cam/a"]["status"] == "done" and leftovers(dest) == []
    assert mask_iou((dest / "cam" / "a.mp4").read_bytes(), {"red"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("argv, words", [
    (["{manifest_bad}", "--out", "{dest}"], "m.jsonl line 1: config.alpha is 2"),
    (["{manifest}", "--out", "/proc/nowhere/out"], "--out '/proc/nowhere/out' cannot be used"),
    (["{manifest}", "--out", "{dest}", "--address", "auto", "--tracker", "fake"], "with --address the cluster's app"),
    (["{manifest}", "--out", "{dest}", "--config", "[1]"], "--config must be a JSON object"),
    (["{manifest}", "--out", "{dest}", "--inflight", "0"], "--inflight must be at least 1"),
])
def test_a_batch_that_cannot_run_is_one_line_and_exit_2(tmp_path, shapes, capsys, argv, words):
    manifest, bad = tmp_path / "m.jsonl", tmp_path / "bad" / "m.jsonl"
    manifest.write_text(json.dumps({"input": str(shapes), "config": {"prompt": "red"}}) + "\n")
    bad.parent.mkdir()
    bad.write_text(json.dumps({"input": str(shapes), "config": {"prompt": "red", "alpha": 2}}) + "\n")
    values = {"manifest": manifest, "manifest_bad": bad, "dest": tmp_path / "out"}
    # No --local: these are refused before the graph (Ray, which unit tests refuse) would start.
    assert main(["batch", *(a.format(**values) for a in argv)]) == 2
    assert words in one_line(capsys)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))


def test_a_cluster_address_that_answers_nothing_is_one_line_in_seconds(tmp_path, shapes, capsys):
    from testkit.net import free_port

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": str(shapes), "config": {"prompt": "red"}}) + "\n")
    address, started = f"127.0.0.1:{free_port()}", time.monotonic()
    assert main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--address", address]) == 2
    assert one_line(capsys) == f"error: cannot reach the Ray cluster at {address!r}: Connection refused"
    assert time.monotonic() - started < 15  # Ray's own client would retry for minutes


def test_a_dest_another_batch_is_writing_to_is_refused(tmp_path, shapes, capsys):
    manifest, dest = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text(json.dumps({"input": str(shapes), "config": {"prompt": "red"}}) + "\n")
    other = Dest(str(dest))
    other.start()
    try:
        assert main(["batch", str(manifest), "--out", str(dest), *LOCAL]) == 2
        assert f"another batch (pid {os.getpid()}) is writing to {dest}" in one_line(capsys)
    finally:
        other.close()
    assert main(["batch", str(manifest), "--out", str(dest), *LOCAL, "-q"]) == 0  # free once it is done


def test_a_full_dest_stops_the_batch_in_one_line_leaving_no_partial_file(tmp_path, shapes, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("a tmpfs cannot be mounted here: this test needs root, as CI has")
    try:
        with open(disk / "filler", "wb", buffering=0) as filler:  # the disk full but for 24 KB
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 4096)
        os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 24 * 1024)
        manifest, dest = tmp_path / "m.jsonl", disk / "out"
        manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": "red", "mode": "overlay"},
                                                "output": f"o{i}"}) + "\n" for i in range(3)))
        assert main(["batch", str(manifest), "--out", str(dest), *LOCAL]) == 2
        assert re.fullmatch(rf"error: --out {re.escape(str(dest))} is full: o\d\.mp4 could not be written",
                            one_line(capsys))
        assert list(dest.glob("*.mp4")) == [] and leftovers(dest) == []  # no part, nothing half-written
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


class DownGraph(LocalSegmenter):
    """A graph that went down at `after` jobs: every job since fails as a lost replica does."""

    def __init__(self, after: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.jobs = after, 0

    def run(self, data, config):
        self.jobs += 1
        if self.jobs > self.after:
            raise ModelError("the tracker replica died while working on this job; retry")
        return super().run(data, config)


def test_a_graph_that_goes_down_stops_the_batch_instead_of_failing_the_whole_manifest(tmp_path, shapes):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"input": str(shapes), "config": {"prompt": "red"}, "output": f"o{i}"})
                                + "\n" for i in range(30)))
    items, dest = load(str(manifest), {}), tmp_path / "out"
    with pytest.raises(ModelUnavailable, match=r"^5 inputs in a row failed every try \(the last: model_error: the "
                                               r"tracker replica died.*\(after 2 attempts\)\); the graph looks down"):
        Batch(items, Dest(str(dest)), DownGraph(3, ScriptedTracker()), retries=1, backoff_s=0.01,
              show_progress=False).run()
    got = results(dest)
    assert sum(line["status"] == "done" for line in got.values()) == 3  # whichever 3 ran before it went down
    assert 5 <= sum(line["status"] == "failed" for line in got.values()) < 10 and len(got) < 30  # the rest not run
    report = Batch(items, Dest(str(dest)), LocalSegmenter(ScriptedTracker()), show_progress=False).run()  # it is back
    assert report.count("skipped") == 3 and report.count("done") == 27
