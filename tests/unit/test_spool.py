"""The service's temporary files (serve_app/spool.py): made and removed one way, and what a
killed process left is swept when a replica starts."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serve_app import spool


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_spool_is_removed_whatever_failed_unless_it_was_handed_over():
    with pytest.raises(RuntimeError):
        with spool.Spool() as s:
            s.write(b"abc")
            path = s.path
            raise RuntimeError("the upload broke")
    assert not os.path.exists(path)
    with spool.Spool() as s:
        s.write(b"abc")
        kept = s.keep()
    assert Path(kept.path).read_bytes() == b"abc" and Path(kept.path).name.startswith(f"sam3-video-{os.getpid()}-")
    kept.remove()
    assert not os.path.exists(kept.path)
    with spool.spooled(b"xyz") as path:
        assert Path(path).read_bytes() == b"xyz"
    assert not os.path.exists(path)


def test_a_sweep_takes_what_dead_processes_left_and_nothing_of_the_living():
    tmp = Path(tempfile.gettempdir())
    pid = dead_pid()
    left_file = tmp / f"sam3-video-{pid}-abc.mp4"
    left_dir = tmp / f"sam3-video-{pid}-def"
    left_file.write_bytes(b"x")
    left_dir.mkdir()
    (left_dir / "out.mp4").write_bytes(b"x")
    old_unnamed, young_unnamed = tmp / "sam3-video-oldstyle.mp4", tmp / "sam3-video-newstyle.mp4"
    for p in (old_unnamed, young_unnamed):
        p.write_bytes(b"x")
    os.utime(old_unnamed, (time.time() - 2 * 86400,) * 2)
    with spool.Spool() as mine, spool.spool_dir() as my_dir:
        assert spool.sweep() >= 3
        assert not left_file.exists() and not left_dir.exists() and not old_unnamed.exists()
        assert os.path.exists(mine.path) and os.path.isdir(my_dir) and young_unnamed.exists()
    young_unnamed.unlink()
