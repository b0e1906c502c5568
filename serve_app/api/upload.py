"""Reading an upload from an HTTP body without ever holding more than the limit.

The body is streamed into a temporary file while bytes are counted; past the limit reading
stops with UploadTooLarge. A body that stalls, or trickles in below a minimum rate, is dropped
with UploadTimeout (408), so idle connections cannot hold the ingress. Multipart bodies are
parsed as they stream (python-multipart): the `input` part goes to disk, the `job` part (small
JSON) to memory; what breaks multipart or JSON is the client's InvalidJob (400). Nothing is
left on disk after a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serve_app.api.proxy import SLACK
from serve_app.contract import size
from serve_app.errors import InvalidJob, UploadTimeout, UploadTooLarge
from serve_app.graph.wire import SPOOL_PREFIX

JOB_PART_LIMIT = 64 * 1024
MULTIPART_SLACK = SLACK      # part headers and the job JSON beside a video at the limit
MAX_BOUNDARY = 70            # RFC 2046
MAX_PART_HEADERS = 4 * 1024  # bytes of headers one part may carry
MAX_PARTS = 8


@dataclass
class Upload:
    path: str           # the video, on local disk; the caller removes it
    job: Any = None     # the decoded `job` part (multipart only)


@dataclass(frozen=True)
class Pace:
    """How slowly a body may arrive: at most `idle_s` without a byte, and from then on at least
    `min_bytes_per_s` on average."""

    idle_s: float = 15.0
    min_bytes_per_s: float = 32 * 1024


async def paced(stream: AsyncIterator[bytes], pace: Pace) -> AsyncIterator[bytes]:
    """The body's chunks, or UploadTimeout once it arrives slower than `pace` allows."""
    chunks, start, received = stream.__aiter__(), time.monotonic(), 0
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), pace.idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadTimeout(f"the upload stalled: no data for {pace.idle_s:g} s after "
                                f"{size(received)}") from None
        received += len(chunk)
        elapsed = time.monotonic() - start
        if elapsed > pace.idle_s and received < pace.min_bytes_per_s * elapsed:
            raise UploadTimeout(f"the upload arrives at {size(int(received / elapsed))}/s; the minimum is "
                                f"{size(int(pace.min_bytes_per_s))}/s")
        yield chunk


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
        fd, self.path = tempfile.mkstemp(prefix=SPOOL_PREFIX, suffix=".mp4")
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


async def read_raw(stream: AsyncIterator[bytes], limit: int, pace: Pace = Pace()) -> Upload:
    with _Spool(limit) as video:
        async for chunk in paced(stream, pace):
            video.write(chunk)
        return video.keep()


class _Parts:
    """The multipart parser's callbacks: which part is being read, and its headers, bounded."""

    def __init__(self, video: _Spool) -> None:
        self.video, self.job, self.name, self.parts, self.inputs = video, bytearray(), "", 0, 0
        self.field, self.headers, self.header_bytes = b"", {}, 0

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidJob(f"body has more than {MAX_PARTS} parts; send a 'job' part and an 'input' part")
        self.headers, self.header_bytes = {}, 0

    def _header(self, data: bytes, start: int, end: int) -> bytes:
        self.header_bytes += end - start
        if self.header_bytes > MAX_PART_HEADERS:
            raise InvalidJob(f"a part's headers are over {MAX_PART_HEADERS // 1024} KB")
        return data[start:end]

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += self._header(data, start, end)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.headers[self.field.lower()] = self.headers.get(self.field.lower(), b"") + self._header(data, start, end)

    def on_header_end(self) -> None:
        self.field = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, opts = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = opts.get(b"name", b"").decode("latin-1")
        if self.name == "input":
            self.inputs += 1
            if self.inputs > 1:
                raise InvalidJob("job has more than one 'input' part; send one video")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.name == "input":
            self.video.write(data[start:end])
        elif self.name == "job":
            self.job.extend(data[start:end])
            if len(self.job) > JOB_PART_LIMIT:
                raise InvalidJob(f"job part is over {JOB_PART_LIMIT // 1024} KB")


async def read_multipart(stream: AsyncIterator[bytes], content_type: str, limit: int, pace: Pace = Pace()) -> Upload:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidJob("body must be multipart/form-data with a 'job' part and an 'input' part")
    if len(boundary) > MAX_BOUNDARY:
        raise InvalidJob(f"multipart boundary is {len(boundary)} characters; the limit is {MAX_BOUNDARY}")
    with _Spool(limit) as video:
        parts = _Parts(video)
        names = ("part_begin", "header_field", "header_value", "header_end", "headers_finished", "part_data")
        parser = MultipartParser(boundary, {f"on_{n}": getattr(parts, f"on_{n}") for n in names})
        total = 0
        try:
            async for chunk in paced(stream, pace):
                total += len(chunk)
                if total > limit + MULTIPART_SLACK:
                    raise _too_large(total, limit)
                parser.write(chunk)
            parser.finalize()
        except FormParserError as exc:
            raise InvalidJob(f"body is not valid multipart/form-data ({str(exc).splitlines()[0][:120]})") from None
        if parts.inputs == 0:
            raise InvalidJob("job has no 'input' part; send the mp4 as a part named 'input'")
        if not parts.job:
            raise InvalidJob("job has no 'job' part; send the job JSON as a part named 'job'")
        try:
            job = json.loads(parts.job)
        except RecursionError:
            raise InvalidJob("job part is nested too deeply to be a job") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidJob(f"job part is not valid JSON ({exc})") from None
        return video.keep(job)
