"""Reading an upload from an HTTP body without ever holding more than the limit.

The body is streamed into a temporary file while bytes are counted; past the limit reading
stops with UploadTooLarge. Multipart bodies are parsed as they stream (python-multipart): the
`input` part goes to disk, the `job` part (small JSON) to memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serve_app.contract import size
from serve_app.errors import InvalidJob, UploadTooLarge

JOB_PART_LIMIT = 64 * 1024
MULTIPART_SLACK = 64 * 1024  # part headers and the job JSON beside a video at the limit


@dataclass
class Upload:
    path: str           # the video, on local disk; the caller removes it
    job: Any = None     # the decoded `job` part (multipart only)


def _too_large(nbytes: int, limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"video is over the limit of {size(limit)}; reading stopped at {size(nbytes)}")


def check_content_length(header: str | None, limit: int, slack: int = 0) -> None:
    """Refuse a declared body over the video limit (plus `slack` for multipart framing) before
    reading any of it."""
    if header and header.isdigit() and int(header) > limit + slack:
        raise UploadTooLarge(f"upload is {size(int(header))}; the limit is {size(limit)}")


class _Spool:
    """The upload's bytes in a temporary file, counted against `limit` as they come. The file
    is removed on leaving the block, whatever failed, unless `keep()` handed it over."""

    def __init__(self, limit: int) -> None:
        fd, self.path = tempfile.mkstemp(suffix=".mp4")
        self.file, self.size, self.limit, self.kept = os.fdopen(fd, "wb"), 0, limit, False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise _too_large(self.size, self.limit)
        self.file.write(data)

    def keep(self, job: Any = None) -> Upload:
        self.kept = True
        return Upload(path=self.path, job=job)

    def __enter__(self) -> "_Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if not self.kept:
            os.unlink(self.path)


async def read_raw(stream: AsyncIterator[bytes], limit: int) -> Upload:
    with _Spool(limit) as video:
        async for chunk in stream:
            video.write(chunk)
        return video.keep()


async def read_multipart(stream: AsyncIterator[bytes], content_type: str, limit: int) -> Upload:
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidJob("body must be multipart/form-data with a 'job' part and an 'input' part")
    state: dict[str, Any] = {"name": None, "header": b"", "value": b"", "headers": {}, "inputs": 0}
    job_bytes = bytearray()

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished():
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = opts.get(b"name", b"").decode("latin-1")
        state["headers"] = {}
        if state["name"] == "input":
            state["inputs"] += 1
            if state["inputs"] > 1:
                raise InvalidJob("job has more than one 'input' part; send one video")

    with _Spool(limit) as video:

        def on_part_data(data, start, end):
            if state["name"] == "input":
                video.write(data[start:end])
            elif state["name"] == "job":
                job_bytes.extend(data[start:end])
                if len(job_bytes) > JOB_PART_LIMIT:
                    raise InvalidJob(f"job part is over {JOB_PART_LIMIT // 1024} KB")

        parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        })
        total = 0
        async for chunk in stream:
            total += len(chunk)
            if total > limit + MULTIPART_SLACK:
                raise _too_large(total, limit)
            parser.write(chunk)
        parser.finalize()
        if state["inputs"] == 0:
            raise InvalidJob("job has no 'input' part; send the mp4 as a part named 'input'")
        if not job_bytes:
            raise InvalidJob("job has no 'job' part; send the job JSON as a part named 'job'")
        try:
            job = json.loads(job_bytes)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidJob(f"job part is not valid JSON ({exc})") from None
        return video.keep(job)
