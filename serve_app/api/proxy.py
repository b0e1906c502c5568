"""Bounds inside Ray Serve's HTTP proxy, which has no flow control of its own in either direction.

- `BodyLimit`: Serve's proxy reads every request body as fast as the client sends it, whatever
  the ingress reads (docs/design.md, Memory bounds). This stops it reading once a request has
  sent more than the cap: the connection's own flow control then holds the client back until
  the ingress's 413 ends the request.
- `PulledDownloads`: a replica streams a response to the proxy as fast as it can make it, so a
  slow client's download of an async job's file would sit in memory whole. This asks the
  ingress for the file one chunk (a Range sub-request) at a time, each once the client has
  taken the one before: a download costs the proxy and the ingress one chunk.

The proxy loads it when Ray starts with
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.proxy:middlewares
(`sam3-video serve` sets it; on a cluster, set it in every node's environment). The cap is
SAM3_VIDEO_PROXY_MAX_BODY_BYTES, default the 100 MB upload limit plus multipart slack; each
app's ingress still enforces its own `limits.max_bytes`.
"""

from __future__ import annotations

import asyncio
import os
import re

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.api.proxy:middlewares"
MAX_BODY_ENV = "SAM3_VIDEO_PROXY_MAX_BODY_BYTES"
SLACK = 64 * 1024  # multipart framing beside a video at the limit (api/upload.py)
DEFAULT_MAX_BODY = 100 * 1024 * 1024 + SLACK


REQUEST_ID = re.compile(rb"[\w.:-]{1,128}")  # what a caller's X-Request-ID may be to be kept


class BodyLimit:
    """Pure ASGI middleware: passes body messages on until more than `max_bytes` have passed
    (so the ingress sees the limit crossed and answers 413), then reads no further. A body
    declared over the cap is refused before a byte is read (and before `Expect: 100-continue`
    is answered); a caller's X-Request-ID that is not a short plain token is dropped, so
    Serve's proxy makes a new one rather than echo it."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", [])
                            if k != b"x-request-id" or REQUEST_ID.fullmatch(v)]
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            from starlette.responses import JSONResponse

            from serve_app.contract import size

            error = f"upload is {size(int(declared))}; the limit is {size(max(self.max_bytes - SLACK, 0))}"
            return await JSONResponse({"state": {"current": "failed"}, "error": error, "code": "upload_too_large"},
                                      status_code=413, headers={"Connection": "close"})(scope, receive, send)
        passed = 0

        async def capped_receive():
            nonlocal passed
            if passed > self.max_bytes:
                # Never returns: the proxy cancels this read when the ingress's answer ends the
                # request, and until then the unread body stays in the client's socket.
                await asyncio.Event().wait()
            message = await receive()
            if message["type"] == "http.request":
                passed += len(message.get("body", b""))
            return message

        await self.app(scope, capped_receive, send)


DOWNLOAD = re.compile(r"/v2/job/async/[^/]+/output/[^/]+$")
PULL_RANGE = re.compile(rb"bytes=(\d{1,18})-(\d{0,18})")
CHUNK = 1 << 20


class PulledDownloads:
    """Pure ASGI middleware: a GET of an async job's file (whole, or from a byte on) becomes
    Range sub-requests of CHUNK bytes, each sent on to the client before the next is asked for.
    Anything else, and every refusal (404, 409, 416, 401), passes as the ingress answers it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        asked = dict(scope.get("headers", [])).get(b"range", b"").strip()
        wanted = PULL_RANGE.fullmatch(asked)
        if scope["type"] != "http" or scope["method"] != "GET" or not DOWNLOAD.search(scope["path"]) or (
                asked and not wanted):  # a suffix range ("bytes=-N") the ingress answers itself
            return await self.app(scope, receive, send)
        start = int(wanted.group(1)) if wanted else 0
        last = int(wanted.group(2)) if wanted and wanted.group(2) else None
        status, headers, body = await self._piece(scope, receive, start, last)
        total = _total(headers) if status == 206 else None
        if total is None:  # a refusal, or not ranged after all: as it is
            await send({"type": "http.response.start", "status": status, "headers": headers})
            return await send({"type": "http.response.body", "body": body})
        end = min(total - 1, last if last is not None else total)
        headers = [(k, v) for k, v in headers if k not in (b"content-length", b"content-range")]
        headers.append((b"content-length", str(end - start + 1).encode()))
        if wanted:
            headers.append((b"content-range", f"bytes {start}-{end}/{total}".encode()))
        await send({"type": "http.response.start", "status": 206 if wanted else 200, "headers": headers})
        position = start + len(body)
        await send({"type": "http.response.body", "body": body, "more_body": position <= end})
        while position <= end:  # send() returns once the client's socket has taken the chunk
            status, _, body = await self._piece(scope, receive, position, end)
            if status != 206 or not body:  # gone meanwhile: the client sees the body cut short
                raise RuntimeError(f"{scope['path']} stopped at byte {position}: the ingress answered {status}")
            position += len(body)
            await send({"type": "http.response.body", "body": body, "more_body": position <= end})

    async def _piece(self, scope, receive, start: int, last: int | None) -> tuple[int, list, bytes]:
        """One Range sub-request of at most CHUNK bytes from `start`: (status, headers, body)."""
        end = start + CHUNK - 1 if last is None else min(last, start + CHUNK - 1)
        headers = [(k, v) for k, v in scope["headers"] if k != b"range"]
        sub = {**scope, "headers": [*headers, (b"range", f"bytes={start}-{end}".encode())]}
        started, parts, first = {}, [], True

        async def sub_receive():
            nonlocal first
            if first:  # the (empty) GET body; then the client's own receive, for its disconnect
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()

        async def collect(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(sub, sub_receive, collect)
        return started.get("status", 500), list(started.get("headers", [])), b"".join(parts)


def _total(headers: list) -> int | None:
    found = re.fullmatch(rb"bytes \d+-\d+/(\d+)", dict(headers).get(b"content-range", b""))
    return int(found.group(1)) if found else None


def middlewares() -> list:
    """The proxy callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimit, max_bytes=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY))),
            Middleware(PulledDownloads)]


def install_env() -> None:
    """Make proxies started from this process's Ray (ray.init after this) load the cap."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
