"""The async jobs' store (serve_app/jobs/store.py), the same suite on SQLite and on a real
PostgreSQL server: claims never hand one job to two runners, files appear whole, a silent
runner's job is retried once then failed, old jobs expire, a bad store fails at once."""

import threading

import pytest

from serve_app.errors import StoreUnavailable
from serve_app.jobs.store import FAILED, PROCESSED, PROCESSING, QUEUED, JobStore


class Clock:
    """The store's clock, moved on by the test: staleness and expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, clock):
    if request.param == "sqlite":
        yield JobStore(str(tmp_path / "jobs"), clock=clock)
        return
    url = request.getfixturevalue("postgres_url")
    store = JobStore(str(tmp_path / "jobs"), url, clock=clock)
    with store.engine.begin() as db:  # one server for the session: each test starts empty
        db.execute(store_table().delete())
    yield store


def store_table():
    from serve_app.jobs.store import JOBS

    return JOBS


def test_a_job_goes_queued_processing_processed_with_its_files(store, tmp_path):
    row = store.create({"prompt": "fish"}, frames=40)
    assert (row.state, row.frames_total, row.outputs) == (QUEUED, 40, [])
    claimed = store.claim("w1")
    assert (claimed.id, claimed.state, claimed.attempts) == (row.id, PROCESSING, 1)
    assert store.claim("w2") is None  # nothing else queued
    assert store.update(row.id, frames_done=10) and store.get(row.id).frames_done == 10
    store.put_bytes(row.id, "output.mp4", b"mp4 bytes")
    assert store.finish(row.id, ["output.mp4"], 40)
    done = store.get(row.id)
    assert (done.state, done.outputs, done.frames_done) == (PROCESSED, ["output.mp4"], 40)
    assert store.read(row.id, "output.mp4") == b"mp4 bytes" and store.read(row.id, "output.mp4", 4, 9) == b"bytes"
    assert not store.update(row.id, frames_done=1)  # finished: no more updates


def test_jobs_are_claimed_oldest_first_and_never_twice(store):
    ids = [store.create({"prompt": str(i)}, frames=1).id for i in range(30)]
    claimed, lock = [], threading.Lock()

    def worker(name):
        while (row := store.claim(name)) is not None or store.count(QUEUED):
            if row is not None:
                with lock:
                    claimed.append(row.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == 30


def test_a_deleted_job_stops_updating_and_loses_its_files(store):
    row = store.create({"prompt": "fish"}, frames=1)
    store.put_bytes(row.id, "output.mp4", b"x")
    store.claim("w")
    assert store.delete(row.id)
    assert store.get(row.id) is None and store.size(row.id, "output.mp4") is None
    assert not store.update(row.id, frames_done=1) and not store.finish(row.id, ["output.mp4"], 1)


def test_a_silent_runners_job_is_retried_once_then_failed(store, clock):
    row = store.create({"prompt": "fish"}, frames=1)
    store.claim("dead-1")
    clock.advance(59)
    assert store.recover(stale_s=60) == 0  # it beat 59 s ago
    assert store.update(row.id, frames_done=1)  # a heartbeat: silent for 0 s again
    clock.advance(59)
    assert store.recover(stale_s=60) == 0
    clock.advance(2)
    assert store.recover(stale_s=60) == 1 and store.get(row.id).state == QUEUED
    assert store.claim("alive").attempts == 2
    clock.advance(61)
    store.recover(stale_s=60)
    failed = store.get(row.id)
    assert failed.state == FAILED and "stopped, twice" in failed.error and failed.code == "model_error"


def test_old_jobs_expire_with_their_files(store, clock):
    old = store.create({"prompt": "old"}, frames=1)
    store.put_bytes(old.id, "output.mp4", b"x")
    clock.advance(3600)
    new = store.create({"prompt": "new"}, frames=1)
    assert store.expire(ttl_s=3601) == 0
    clock.advance(2)
    assert store.expire(ttl_s=3601) == 1
    assert store.get(old.id) is None and store.size(old.id, "output.mp4") is None
    assert store.get(new.id) is not None


def test_files_are_never_seen_half_written(store, tmp_path):
    row = store.create({"prompt": "fish"}, frames=1)
    (tmp_path / "big.mp4").write_bytes(b"\1" * (8 << 20))
    seen = []
    stop, found = threading.Event(), threading.Event()

    def watch():
        while not stop.is_set():
            size = store.size(row.id, "input.mp4")
            if size is not None:
                seen.append(size)
                found.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    store.put_file(row.id, "input.mp4", str(tmp_path / "big.mp4"))
    assert found.wait(10)  # the watcher has read the file in place at least once
    stop.set()
    watcher.join()
    assert seen and set(seen) == {8 << 20}


def test_a_store_that_cannot_be_written_fails_at_once_with_one_clear_message(tmp_path):
    with pytest.raises(StoreUnavailable, match="the job store '/proc/nowhere' .* cannot be used"):
        JobStore("/proc/nowhere")
    with pytest.raises(StoreUnavailable, match="cannot be used"):
        JobStore(str(tmp_path / "ok"), "postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_a_database_that_cannot_be_reached_is_named_without_its_password(tmp_path):
    with pytest.raises(StoreUnavailable) as refused:
        JobStore(str(tmp_path / "store"), "postgresql+psycopg://jobs:s3cret@127.0.0.1:1/jobs")
    assert "s3cret" not in str(refused.value) and "jobs:***@127.0.0.1:1/jobs" in str(refused.value)


def test_a_write_cut_off_by_a_full_disk_is_insufficient_storage_and_leaves_no_part(tmp_path):
    import subprocess

    from serve_app.errors import InsufficientStorage

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("a tmpfs cannot be mounted here: this test needs root, as CI has")
    try:
        store = JobStore(str(disk / "jobs"), f"sqlite:///{tmp_path}/jobs.sqlite")
        row = store.create({"prompt": "fish"}, frames=1)
        with pytest.raises(InsufficientStorage, match="the job store is full: output.mp4 could not be written"):
            store.put_bytes(row.id, "output.mp4", b"\x01" * (2 << 20))
        assert [p.name for p in (disk / "jobs" / row.id).iterdir()] == []  # no part left
        store.put_bytes(row.id, "objects.json", b"{}")  # what fits is still written
        with pytest.raises(InsufficientStorage, match="this job needs 2 MB"):
            store.room(2 << 20)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
