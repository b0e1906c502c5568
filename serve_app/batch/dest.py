"""Where a batch's outputs go (DEST: a directory or an fsspec URL), and how a rerun knows an
input is done.

    DEST/NAME.mp4            the output video
    DEST/NAME.objects.json   when the config's `outputs` asks for it
    DEST/NAME.done.json      written last: the input (URL, size, fingerprint, SHA-256), the config
                             and its hash, each file's size, frames, seconds
    DEST/results.jsonl       one line per input of the latest run, in manifest order

Every file is written under a hidden temporary name (`.NAME.mp4.part-<hex>`) and moved into
place, so a final name only ever holds a whole file; the marker comes last, so outputs without
it are redone. A local DEST is locked for one batch at a time, and the parts a killed run left
are removed when the next one starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from serve_app.batch.manifest import Item
from serve_app.contract import JobConfig, size
from serve_app.errors import InputUnreadable, InvalidBatch, UploadTooLarge
from serve_app.jobs.store import write_whole

MARKER, RESULTS, LOCK = ".done.json", "results.jsonl", ".sam3-batch.lock"
PART = re.compile(r"\..+\.part-[0-9a-f]{8}")
# Keys of fsspec's info() that change when a file does, by filesystem (local, S3, GCS, HTTP, ...).
FINGERPRINTS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated")


@dataclass(frozen=True)
class Source:
    """An input as its filesystem describes it, without reading it."""

    url: str
    size: int
    fingerprint: str

    @classmethod
    def of(cls, url: str) -> "Source":
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url)
            info = fs.info(path)
        except FileNotFoundError:
            raise InputUnreadable(f"input {url} does not exist") from None
        except (OSError, ValueError) as exc:
            raise InputUnreadable(f"input {url} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if info.get("type") == "directory":
            raise InputUnreadable(f"input {url} is a folder, not a video")
        found = next((str(info[k]) for k in FINGERPRINTS if info.get(k) is not None), "")
        return cls(url, int(info.get("size") or 0), found)

    def read(self, max_bytes: int) -> tuple[bytes, str]:
        """(its bytes, their SHA-256), read straight into memory (never a local copy); refused
        unread when larger than the service takes."""
        import fsspec

        if self.size > max_bytes:
            raise UploadTooLarge(f"input is {size(self.size)}; the limit is {size(max_bytes)}")
        try:
            with fsspec.open(self.url, "rb") as f:
                data = f.read(max_bytes + 1)  # a file that grew since: still bounded
        except (OSError, ValueError) as exc:
            raise InputUnreadable(f"input {self.url} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if len(data) > max_bytes:
            raise UploadTooLarge(f"input is over the limit of {size(max_bytes)}")
        return data, hashlib.sha256(data).hexdigest()


def config_hash(config: JobConfig) -> str:
    """Fields at their defaults left out: a release that adds a field redoes nothing."""
    return hashlib.sha256(json.dumps(config.model_dump(mode="json", exclude_defaults=True),
                                     sort_keys=True).encode()).hexdigest()


class Dest:
    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
            self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
            if self.local:
                self.fs.makedirs(self.root, exist_ok=True)
        except (OSError, ValueError, ImportError) as exc:
            raise InvalidBatch(f"--out {url!r} cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
        self.root = self.root.rstrip("/")
        self._lock: Any = None

    def start(self) -> int:
        """Lock a local DEST for this batch, and remove the parts killed runs left; returns how many."""
        if not self.local:  # an object store: writes land whole, nothing to lock or sweep
            return 0
        import fcntl

        try:
            self._lock = open(os.path.join(self.root, LOCK), "a+")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            raise InvalidBatch(f"another batch (pid {self._lock.read().strip() or '?'}) is writing to {self.url}; "
                               "wait for it or choose another --out") from None
        except OSError as exc:
            raise InvalidBatch(f"--out {self.url!r} cannot be written: {exc.strerror or exc}") from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        gone = 0
        for folder, _, files in os.walk(self.root):
            for name in filter(PART.fullmatch, files):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    gone += 1
        return gone

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def files(self, item: Item) -> list[str]:
        return [f"{item.output}.mp4"] + ([f"{item.output}.objects.json"] if "objects" in item.config.outputs else [])

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def done(self, item: Item, source: Source, content_hash) -> dict[str, Any] | None:
        """The marker that says `item` is done for this input and config with its files whole;
        None if it must run. `content_hash()` is called only when the input's size matches and its
        fingerprint does not (a copy, a touch): same bytes still count as done."""
        marker = self.marker(item.output)
        if (marker is None or marker.get("config_sha256") != config_hash(item.config)
                or marker.get("input_size") != source.size
                or set(marker.get("files", {})) != set(self.files(item))
                or any(self._size(name) != n for name, n in marker["files"].items())):
            return None
        if marker.get("input_fingerprint") != source.fingerprint:
            if marker.get("input_sha256") != content_hash():
                return None
            marker = {**marker, "input": source.url, "input_fingerprint": source.fingerprint}
            self.write(item.output + MARKER, json.dumps(marker, indent=1).encode())  # the next check is cheap
        return marker

    def marker(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path(name + MARKER), "rb") as f:
                marker = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None

    def _size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(name)))
        except (OSError, ValueError):
            return None

    def forget(self, item: Item) -> None:
        """Before an input is redone: its marker goes first (outputs without one are redone), then
        files this config no longer makes."""
        for name in (item.output + MARKER, f"{item.output}.objects.json"):
            if name == item.output + MARKER or name not in self.files(item):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path(name))

    def write(self, name: str, data: bytes) -> None:
        """`data` under a hidden temporary name, moved into place once whole. A DEST that cannot
        be written stops the batch (every input after would fail the same way)."""
        write_whole(self.fs, self.path(name), lambda part: self.fs.pipe_file(part, data),
                    f"--out {self.url} is full: {{name}} could not be written",
                    f"--out {self.url} cannot be written: {{name}}: {{reason}}")

    def finish(self, item: Item, source: Source, sha256: str, files: dict[str, bytes], frames: int,
               seconds: float) -> None:
        """Write the outputs, then the marker that makes them done."""
        for name, data in files.items():
            self.write(name, data)
        marker = {"input": source.url, "input_size": source.size, "input_fingerprint": source.fingerprint,
                  "input_sha256": sha256, "config": item.config.model_dump(mode="json", exclude_defaults=True),
                  "config_sha256": config_hash(item.config), "files": {n: len(d) for n, d in files.items()},
                  "frames": frames, "seconds": round(seconds, 3)}
        self.write(item.output + MARKER, json.dumps(marker, indent=1).encode())

    def results(self, lines: list[dict[str, Any]]) -> None:
        self.write(RESULTS, "".join(json.dumps(line) + "\n" for line in lines).encode())
