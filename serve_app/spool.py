"""The service's temporary files: one name pattern (`sam3-video-<pid>-*` in the temp directory)
and one way to make and remove them, so that none outlives the job it was made for. A process
killed outright removes nothing: `sweep` at a replica's start removes what dead processes left."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

PREFIX = "sam3-video-"
OWNED = re.compile(PREFIX + r"(\d+)-")


class Spool:
    """A temporary file, written as bytes come (`size` counts them). Leaving its `with` block
    removes it, whatever failed, unless `keep()` handed it to an owner, who calls `remove()`."""

    def __init__(self, suffix: str = ".mp4") -> None:
        fd, self.path = tempfile.mkstemp(prefix=_prefix(), suffix=suffix)
        self.file, self.size, self.kept = os.fdopen(fd, "wb"), 0, False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.file.write(data)

    def done(self) -> str:
        """Closed for writing (readers may open it now); its path."""
        self.file.close()
        return self.path

    def keep(self) -> Spool:
        self.done()
        self.kept = True
        return self

    def remove(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        if not self.kept:
            self.remove()


@contextlib.contextmanager
def spooled(data: bytes) -> Iterator[str]:
    """`data` as a temporary file while the block runs (decord and PyAV read paths best)."""
    with Spool() as spool:
        spool.write(data)
        yield spool.done()


def spool_dir() -> tempfile.TemporaryDirectory:
    """A temporary folder, removed with everything in it on leaving its `with` block."""
    return tempfile.TemporaryDirectory(prefix=_prefix())


def sweep(older_than_s: float = 86400.0) -> int:
    """Removes the temporary files and folders whose process is gone (or, named by no process,
    older than `older_than_s`), as a replica starts: a process killed outright removed none."""
    gone = 0
    for entry in os.scandir(tempfile.gettempdir()):
        if not entry.name.startswith(PREFIX):
            continue
        owner = OWNED.match(entry.name)
        with contextlib.suppress(OSError):  # another replica's sweep took it first
            if not (_dead(int(owner.group(1))) if owner else entry.stat().st_mtime < time.time() - older_than_s):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            gone += 1
    return gone


def _prefix() -> str:
    return f"{PREFIX}{os.getpid()}-"


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False
