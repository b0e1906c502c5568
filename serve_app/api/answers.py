"""The job JSON and the answers the API gives, in the wire format of the API we follow.

A success is the mp4: bare (`video/mp4`), or multipart/form-data with a `job` part (the job
JSON) and an `output` part when the client's Accept names multipart/form-data, as the official
client asks. A failure is the job JSON with `state.current = "failed"`, `error` (the message)
and `code` (the error's stable type, serve_app.errors); 4xx come as multipart to a multipart
client (so the official client raises its user error with our message), 5xx always as JSON
(a multipart 5xx would be returned by that client as if it were a result).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve_app.contract import JOB_TYPE, JobConfig
from serve_app.errors import Overloaded, ServiceError, http_status
from serve_app.graph.wire import SegmentResult
from serve_app.media import STAGES

MULTIPART = "multipart/form-data"


@dataclass
class JobRecord:
    """One request's job as the API reports it: the id, when it came, its config once parsed."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    config: JobConfig | None = None

    def json(self, *, result: SegmentResult | None = None, error: ServiceError | None = None,
             message: str | None = None) -> dict[str, Any]:
        now = time.time()
        body: dict[str, Any] = {
            "id": self.id,
            "type": JOB_TYPE,
            "config": self.config.echo() if self.config else {},
            "state": {"current": "failed" if error else "completed"},
            "created_at": _iso(self.created),
            "updated_at": _iso(now),
            "metrics": {"elapsed": round(now - self.created, 3)},
        }
        if result is not None:
            body["metrics"].update({f"{s}_ms": round(getattr(result.timings, f"{s}_ms"), 1) for s in STAGES})
        if error is not None:
            body["error"], body["code"] = message or str(error), error.code
        return body


def async_job_json(row, config: JobConfig | None = None) -> dict[str, Any]:
    """An async job's JSON (serve_app/jobs/store.py JobRow): its state, progress and outcome."""
    now = time.time()
    elapsed = (row.finished_at or now) - row.started_at if row.started_at else 0.0  # waiting: not yet
    done, total = row.frames_done, row.frames_total
    body: dict[str, Any] = {
        "id": row.id, "type": JOB_TYPE,
        "config": (config or JobConfig.model_validate(row.config)).echo(),
        "state": {"current": row.state},
        "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
        "progress": {"stage": row.stage, "frames_done": done, "frames_total": total,
                     "elapsed_s": round(elapsed, 1),
                     "eta_s": round(elapsed / done * (total - done), 1) if 0 < done < total else None},
    }
    if row.error:
        body["error"], body["code"] = row.error, row.code
    if row.webhook_url:
        body["webhook"] = webhook_json(row)
    return body


def webhook_json(row) -> dict[str, Any]:
    """An async job's webhook deliveries: attempts so far, the last HTTP status (None: no answer),
    and `state`: waiting (the job runs), pending (an attempt is due), delivered, or failed (given
    up: `error` says why)."""
    delivered = row.webhook_status is not None and 200 <= row.webhook_status < 300
    if row.state not in ("processed", "failed"):
        state = "waiting"
    else:
        state = "delivered" if delivered else "pending" if row.webhook_next_at is not None else "failed"
    body: dict[str, Any] = {"attempts": row.webhook_attempts, "last_status": row.webhook_status, "state": state}
    if row.webhook_error and not delivered:
        body["error"] = row.webhook_error
    return body


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def wants_multipart(accept: str | None) -> bool:
    # The official client sends "multipart/form-data; video/mp4" (joined with "; ").
    return MULTIPART in (accept or "")


def multipart_body(parts: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """(name, filename, content type, bytes) parts -> (body, its Content-Type)."""
    boundary = uuid.uuid4().hex
    out = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
           f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for name, filename, ctype, data in parts]
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"{MULTIPART}; boundary={boundary}"


def timing_headers(result: SegmentResult) -> dict[str, str]:
    headers = {f"x-{s}-ms": f"{getattr(result.timings, f'{s}_ms'):.1f}" for s in STAGES}
    return headers | {"x-frames": str(result.num_frames), "x-decoder": result.decoder}


def success(job: JobRecord, result: SegmentResult, accept: str | None, headers: dict[str, str]):
    from starlette.responses import Response

    headers = headers | timing_headers(result)
    if wants_multipart(accept):
        objects = [("objects", "objects.json", "application/json", result.objects)] if result.objects else []
        body, ctype = multipart_body([("job", "job.json", "application/json", json.dumps(job.json(result=result)).encode()),
                                      ("output", "output.mp4", "video/mp4", result.mp4), *objects])
        return Response(body, status_code=200, media_type=ctype, headers=headers)
    return Response(result.mp4, status_code=200, media_type="video/mp4", headers=headers)


def failure(job: JobRecord, exc: ServiceError, accept: str | None, headers: dict[str, str]):
    """The failed job, rendered by the error table: status, message, code and headers."""
    from starlette.responses import JSONResponse, Response

    status = http_status(exc)
    if isinstance(exc, Overloaded):
        headers = headers | {"Retry-After": str(exc.retry_after_s)}
    if status == 401:
        headers = headers | {"WWW-Authenticate": "Bearer"}
    # Our own failures name the request id, so a user can quote it and we can find the log.
    message = str(exc) if status < 500 or job.id in str(exc) else f"{exc} (request id {job.id})"
    body = job.json(error=exc, message=message)
    if status < 500 and wants_multipart(accept):
        data, ctype = multipart_body([("job", "job.json", "application/json", json.dumps(body).encode())])
        return Response(data, status_code=status, media_type=ctype, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)
