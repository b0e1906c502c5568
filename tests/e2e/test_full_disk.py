"""A job store on a small disk (a 20 MB tmpfs): what does not fit is refused with 507 before the
201, a database that cannot be written is 503 (never 500), and nothing is left without a record
or a living process."""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_async import submit, wait
from tests.serving import wait_until


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A fresh 20 MB tmpfs (mounting needs root, as CI has; skipped, saying why, without)."""
    mounts = []

    def mount(size: str = "20m") -> Path:
        path = tmp_path_factory.mktemp("small-disk")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a tmpfs cannot be mounted here ({done.stderr.strip()}): the full-disk tests need root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leftovers(store: Path) -> list[str]:
    """What the store holds besides its database and its records' own folders."""
    return sorted(p.name for p in store.iterdir() if not p.name.startswith(("jobs.sqlite", ".write-check")))


def test_an_upload_that_does_not_fit_is_507_naming_the_need_and_leaves_nothing(cluster, small_disk, shapes):
    store = small_disk()
    with cluster.one_off("small-disk", "/small-disk", job_store=str(store), job_min_free_bytes=1 << 20) as base:
        big = os.urandom(8 << 20)  # 8 MB, and room for its outputs: more than the 20 MB disk has
        for _ in range(3):
            r = submit(base, big, {"prompt": "red"})
            assert (r.status_code, r.json()["code"]) == (507, "insufficient_storage"), r.text
            assert "this job needs 24 MB for its input and outputs" in r.json()["error"]
        assert leftovers(store) == []
        ok = submit(base, shapes.read_bytes(), {"prompt": "red"})  # a job that fits still runs
        assert ok.status_code == 201 and wait(base, ok.json()["id"])["state"]["current"] == "processed"


def test_a_database_that_cannot_be_written_is_503_and_delete_is_never_500(cluster, small_disk, shapes, tmp_path):
    db_disk = small_disk("2m")
    with cluster.one_off("full-db", "/full-db", job_store=str(tmp_path / "files"),
                         job_db=f"sqlite:///{db_disk}/jobs.sqlite") as base:
        kept = submit(base, shapes.read_bytes(), {"prompt": "red"}).json()["id"]
        wait(base, kept)
        ballast = db_disk / "ballast"
        with open(ballast, "wb") as f:  # the database's disk fills up
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        try:
            r = submit(base, shapes.read_bytes(), {"prompt": "red"})
            assert (r.status_code, r.json()["code"]) == (503, "store_unavailable"), r.text
            assert "the job database cannot be used now" in r.json()["error"]
            d = httpx.delete(f"{base}/v2/job/async/{kept}")
            assert d.status_code in (204, 503), d.text
            assert not list((tmp_path / "files").glob("*/.*part-*"))
        finally:
            ballast.unlink()
        assert submit(base, shapes.read_bytes(), {"prompt": "red"}).status_code == 201  # room again: served


def test_folders_and_parts_with_no_record_are_swept_at_start(cluster, small_disk, shapes):
    store = small_disk()
    orphan = store / uuid.uuid4().hex
    orphan.mkdir()
    (orphan / "input.mp4").write_bytes(b"x" * 1000)
    part = store / f".{uuid.uuid4().hex}.part-1234abcd"
    part.write_bytes(b"x" * 1000)
    fresh = store / uuid.uuid4().hex  # may be an upload on its way to its record: kept
    fresh.mkdir()
    hour_ago = time.time() - 3600
    for p in (orphan / "input.mp4", orphan, part):
        os.utime(p, (hour_ago, hour_ago))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process killed mid-job: what it spooled stays in the node's temp folder
    spooled = [Path(tempfile.gettempdir()) / f"sam3-video-{dead.pid}-{name}" for name in ("in.mp4", "out")]
    spooled[0].write_bytes(b"x")
    spooled[1].mkdir()
    with cluster.one_off("swept", "/swept", job_store=str(store)) as base:
        assert wait_until(lambda: not orphan.exists() and not part.exists(), timeout_s=30), leftovers(store)
        assert fresh.exists() and not any(p.exists() for p in spooled)  # the new replicas swept them
        assert httpx.get(f"{base}/healthz").status_code == 200
