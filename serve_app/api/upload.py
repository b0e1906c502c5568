"""Reading an upload from an HTTP body without ever holding more than the limit.

The body is streamed into a temporary file while bytes are counted; past the limit reading
stops with UploadTooLarge. A body that stalls, or trickles in below a minimum rate, is dropped
with UploadTimeout (408), so idle connections cannot hold the ingress. Multipart bodies are
parsed as they stream (python-multipart): the `input` part goes to disk, the `job` part (small
JSON) and an async job's `webhook` field (a URL) to memory; what breaks multipart or JSON is the client's InvalidJob (400). Nothing is
left on disk after a failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from serve_app.api.proxy import SLACK
from serve_app.contract import size
from serve_app.errors import InvalidJob, UploadTimeout, UploadTooLarge
from serve_app.spool import Spool

JOB_PART_LIMIT = 64 * 1024
MULTIPART_SLACK = SLACK      # part headers and the job JSON beside a video at the limit
MAX_BOUNDARY = 70            # RFC 2046
MAX_PART_HEADERS = 4 * 1024  # bytes of headers one part may carry
MAX_PARTS = 8
WEBHOOK_PART_LIMIT = 4096    # a URL; the webhook guard names the real limit


@dataclass
class Upload:
    """An arrived body: the video on local disk, removed on leaving the owner's `with` block."""

    video: Spool
    job: Any = None     # the decoded `job` part (multipart only)
    webhook: str | None = None  # the `webhook` part (POST /v2/job/async)

    @property
    def path(self) -> str:
        return self.video.path

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc) -> None:
        self.video.remove()


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


def _write(video: Spool, data: bytes, limit: int) -> None:
    video.write(data)
    if video.size > limit:
        raise _too_large(video.size, limit)


async def read_raw(stream: AsyncIterator[bytes], limit: int, pace: Pace = Pace()) -> Upload:
    with Spool() as video:
        async for chunk in paced(stream, pace):
            _write(video, chunk, limit)
        return Upload(video.keep())


class _Parts:
    """The multipart parser's callbacks: which part is being read, and its headers, bounded."""

    def __init__(self, video: Spool, limit: int) -> None:
        self.video, self.limit, self.job, self.name, self.parts, self.inputs = video, limit, bytearray(), "", 0, 0
        self.webhook: bytearray | None = None
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
        elif self.name == "webhook":
            if self.webhook is not None:
                raise InvalidJob("job has more than one 'webhook' part; send one URL")
            self.webhook = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.name == "input":
            _write(self.video, data[start:end], self.limit)
        elif self.name == "job":
            self.job.extend(data[start:end])
            if len(self.job) > JOB_PART_LIMIT:
                raise InvalidJob(f"job part is over {JOB_PART_LIMIT // 1024} KB")
        elif self.name == "webhook":
            self.webhook.extend(data[start:end])
            if len(self.webhook) > WEBHOOK_PART_LIMIT:
                raise InvalidJob(f"webhook part is over {WEBHOOK_PART_LIMIT} bytes")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key once: with two, which one wins is a guess (400 instead)."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InvalidJob(f"job part names {twice[:60]!r} more than once; send each key once")
    return out


async def read_multipart(stream: AsyncIterator[bytes], content_type: str, limit: int, pace: Pace = Pace()) -> Upload:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidJob("body must be multipart/form-data with a 'job' part and an 'input' part")
    if len(boundary) > MAX_BOUNDARY:
        raise InvalidJob(f"multipart boundary is {len(boundary)} characters; the limit is {MAX_BOUNDARY}")
    with Spool() as video:
        parts = _Parts(video, limit)
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
            job = json.loads(parts.job, object_pairs_hook=_unique)
        except RecursionError:
            raise InvalidJob("job part is nested too deeply to be a job") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidJob(f"job part is not valid JSON ({exc})") from None
        try:
            webhook = None if parts.webhook is None else parts.webhook.decode().strip()
        except UnicodeDecodeError:
            raise InvalidJob("webhook part is not UTF-8 text") from None
        return Upload(video.keep(), job, webhook)


async def receive(request: Request, reading, slack: int = 0, wait: bool = False) -> Upload:
    """The body, read under an upload slot. Refused before a byte is read when it is declared
    too large or (unless the job will `wait` in the queue) when every job slot is taken by a
    running job; a job slot is taken only once the body has arrived, so slow or idle uploads
    never hold one."""
    service = request.app.state.service
    try:
        check_content_length(request.headers.get("content-length"), service.limits.max_bytes, slack)
        if not wait:
            service.jobs.check()
        with service.uploads.take(request.client.host if request.client else ""):
            return await reading
    finally:
        reading.close()  # not awaited when refused first
