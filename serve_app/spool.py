"""The service's temporary files: one name pattern (`sam3-video-*` in the temp directory) and one
way to make and remove them, so that none outlives the job it was made for."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

PREFIX = "sam3-video-"


class Spool:
    """A temporary file, written as bytes come (`size` counts them). Leaving its `with` block
    removes it, whatever failed, unless `keep()` handed it to an owner, who calls `remove()`."""

    def __init__(self, suffix: str = ".mp4") -> None:
        fd, self.path = tempfile.mkstemp(prefix=PREFIX, suffix=suffix)
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
    return tempfile.TemporaryDirectory(prefix=PREFIX)
