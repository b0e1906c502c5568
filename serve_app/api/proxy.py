"""A request-body cap inside Ray Serve's HTTP proxy.

Serve's proxy reads every request body as fast as the client sends it, whatever the ingress
reads (docs/design.md, Memory bounds). This middleware stops it reading once a request has sent
more than the cap: the connection's own flow control then holds the client back until the
ingress's 413 ends the request.

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


def middlewares() -> list:
    """The proxy callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimit, max_bytes=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY)))]


def install_env() -> None:
    """Make proxies started from this process's Ray (ray.init after this) load the cap."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
