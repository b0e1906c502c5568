"""The ingress's HTTP routes (see serve_app/http.py for the wire format)."""

from __future__ import annotations

import os
import time

from serve_app.contract import JobConfig, parse_config, parse_job
from serve_app.errors import InvalidJob, http_status
from serve_app.http import error_response, success_response
from serve_app.upload import MULTIPART_SLACK, check_content_length, read_multipart, read_raw
from serve_app.wire import job_json, new_request_id

_FLOATS = ("confidence_threshold", "alpha")


def _query_config(params) -> JobConfig:
    raw: dict = {}
    for key, value in params.items():
        if key in _FLOATS:
            try:
                raw[key] = float(value)
            except ValueError:
                raise InvalidJob(f"config.{key} is {value!r}; it must be a number between 0.0 and 1.0") from None
        else:
            raw[key] = value
    return parse_config(raw)


async def handle_http(ingress, request):
    from starlette.responses import JSONResponse, PlainTextResponse

    path, method = request.url.path.rstrip("/"), request.method
    if path.endswith("/healthz") or path.endswith("/v2/health"):
        return PlainTextResponse("ok")
    if method != "POST" or not (path.endswith("/v2/job") or path.endswith("/v2/segment")):
        return JSONResponse({"error": f"no route {method} {request.url.path}; POST /v2/job or /v2/segment"},
                            status_code=404)

    # Serve's proxy gives every request an id (the caller's X-Request-ID, else a new one) and
    # returns it as x-request-id; the job takes the same id so logs, headers and job JSON agree.
    request_id = request.headers.get("x-request-id")
    echo_id = request_id is None
    request_id, created = request_id or new_request_id(), time.time()
    accept = request.headers.get("accept")
    config, upload, result, status, failure = None, None, None, 500, None
    try:
        ingress.check_auth(request.headers.get("authorization"))
        limit, multipart = ingress.limits.max_bytes, path.endswith("/v2/job")
        if not multipart:
            config = _query_config(request.query_params)
        check_content_length(request.headers.get("content-length"), limit, MULTIPART_SLACK if multipart else 0)
        with ingress.job_slot():  # taken before reading: a full replica refuses without reading the body
            if multipart:
                upload = await read_multipart(request.stream(), request.headers.get("content-type", ""), limit)
                config = parse_job(upload.job).config
            else:
                upload = await read_raw(request.stream(), limit)
            result = await ingress._run(upload.path, config, request_id)
        status = 200
        job = job_json(request_id, config, created, timings=result.timings)
        return success_response(job, result, accept, request_id if echo_id else None)
    except Exception as exc:  # every failure becomes a response; the replica keeps serving
        failure = exc
        status = http_status(exc)
        return error_response(exc, job_json(request_id, config, created), accept, request_id, echo_id)
    finally:
        if upload is not None:
            os.unlink(upload.path)
        ingress.log_request(request_id, status, result, failure)
