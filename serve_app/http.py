"""HTTP for the ingress: the wire format of the API we follow, so its official client works.

POST /v2/job      multipart/form-data: a `job` part (JSON) and an `input` part (the mp4).
                  Answer: multipart/form-data (`job` JSON + `output` mp4) when Accept names
                  multipart/form-data, else the bare mp4.
POST /v2/segment  the mp4 as the body, the config as query parameters, the mp4 back.
GET  /healthz     200 "ok".

Errors: 4xx carry the job JSON with `error` (multipart when the client asked for multipart, so
the official client raises its user error with our message; JSON otherwise). 5xx are always
JSON: the official client returns a multipart 5xx as if it were a result, while a JSON one
makes it raise.
"""

from __future__ import annotations

import json
import uuid

from serve_app.errors import Overloaded, ServiceError, http_status
from serve_app.wire import SegmentResult

MULTIPART = "multipart/form-data"


def wants_multipart(accept: str | None) -> bool:
    # The official client sends "multipart/form-data; video/mp4" (joined with "; ").
    return MULTIPART in (accept or "")


def multipart_body(job: dict, output: bytes | None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"job\"; filename=\"job.json\"\r\n"
        f"Content-Type: application/json\r\n\r\n".encode() + json.dumps(job).encode() + b"\r\n"
    ]
    if output is not None:
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"output\"; filename=\"output.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n".encode() + output + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"{MULTIPART}; boundary={boundary}"


def timing_headers(request_id: str | None, result: SegmentResult | None = None) -> dict[str, str]:
    """x-<stage>-ms for each stage, and x-request-id when given. Behind Serve's proxy it is not:
    the proxy adds x-request-id itself (the caller's own, or one it made), and a second one from
    us would reach the client as two ids joined by a comma."""
    headers = {"x-request-id": request_id} if request_id else {}
    if result is not None:
        t = result.timings
        for name in ("probe", "decode", "track", "composite", "encode", "total"):
            headers[f"x-{name}-ms"] = f"{getattr(t, name + '_ms'):.1f}"
        headers["x-frames"] = str(result.num_frames)
        headers["x-decoder"] = result.decoder
    return headers


def success_response(job: dict, result: SegmentResult, accept: str | None, request_id: str | None):
    from starlette.responses import Response

    headers = timing_headers(request_id, result)
    if wants_multipart(accept):
        body, ctype = multipart_body(job, result.mp4)
        return Response(body, status_code=200, media_type=ctype, headers=headers)
    return Response(result.mp4, status_code=200, media_type="video/mp4", headers=headers)


def error_response(exc: BaseException, job: dict, accept: str | None, request_id: str,
                   echo_id: bool = False):
    """The failed job (`error` set, state failed) as JSON, or multipart for a multipart client.
    `echo_id`: send x-request-id (only when no proxy does; see timing_headers)."""
    from starlette.responses import JSONResponse, Response

    status = http_status(exc)
    headers = timing_headers(request_id if echo_id else None)
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    job["state"] = {"current": "failed"}
    if isinstance(exc, ServiceError) and status < 500 or status == 429:
        job["error"] = str(exc)
    else:
        job["error"] = f"internal error; quote request id {request_id}" if not isinstance(exc, ServiceError) \
            else f"{exc} (request id {request_id})"
    if status < 500 and wants_multipart(accept):
        body, ctype = multipart_body(job, None)
        return Response(body, status_code=status, media_type=ctype, headers=headers)
    return JSONResponse(job, status_code=status, headers=headers)
