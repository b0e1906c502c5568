"""The HTTP face: exact routes, and one exception handler that renders the error table.

    POST /v2/job      multipart/form-data: a `job` part (JSON) and an `input` part (the mp4)
    POST /v2/segment  the mp4 as the body, the config as query parameters
    GET  /healthz, GET /v2/health

The routes read the request and answer it; what a job does (auth, slots, probe, the graph)
is the SegmentService's (api/ingress.py), which the handle API calls too.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

from serve_app.api import answers, async_jobs
from serve_app.api.answers import JobRecord
from serve_app.api.proxy import REQUEST_ID
from serve_app.api.upload import MULTIPART_SLACK, Upload, read_multipart, read_raw, receive
from serve_app.contract import JobConfig, parse_config, parse_job, rule
from serve_app.errors import ClientGone, InvalidJob, MethodNotAllowed, NotFound, ServiceError, http_status

log = logging.getLogger("ray.serve")

PAGE = Path(__file__).with_name("page.html")
FLOATS = {name for name, field in JobConfig.model_fields.items() if field.annotation is float}


def make_app(service, jobs) -> Starlette:
    """The ASGI app of one ingress replica, answering for `service` (api/ingress.SegmentService)
    and `jobs` (jobs/service.AsyncJobs)."""
    app = Starlette(
        routes=[
            Route("/v2/job", post_job, methods=["POST"]),
            Route("/v2/segment", post_segment, methods=["POST"]),
            *(Route("/v2/job/async" + path, job_route(endpoint), methods=[method])
              for path, endpoint, method in async_jobs.ROUTES),
            Route("/healthz", health, methods=["GET"]),
            Route("/v2/health", health, methods=["GET"]),
            Route("/", page, methods=["GET"]),
        ],
        exception_handlers={ServiceError: render_error, HTTPException: render_error},
        middleware=[Middleware(Headers)],
    )
    app.router.redirect_slashes = False  # exact routes: a trailing slash is a 404, not a redirect
    app.state.service, app.state.jobs = service, jobs
    return app


class Headers:
    """On every answer: no content sniffing, and nothing cached (job JSON changes, files are
    deleted at their TTL, a 404 may not stay one)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        extra = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]

        async def send_with(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def page(request: Request) -> HTMLResponse:
    """A page to try the service in a browser (api/page.html): no build step, nothing external."""
    return HTMLResponse(PAGE.read_text(), headers={"Content-Security-Policy": "frame-ancestors 'none'"})


def job_route(endpoint):
    """A job endpoint: the request's JobRecord made first (its id is the caller's
    X-Request-ID, which Serve's proxy sets to a new one when the caller sent none), auth
    checked, and any failure turned into a ServiceError for the one exception handler."""

    async def run(request: Request):
        request.state.job = job = record(request)
        try:
            request.state.owner = request.app.state.service.check_auth(request.headers.get("authorization"))
            return await endpoint(request, job)
        except ServiceError:
            raise
        except ClientDisconnect:
            raise ClientGone("the client closed the connection before its answer") from None
        except asyncio.CancelledError:  # Serve cancels a request whose client hung up
            request.app.state.service.finished(job.id, 499, None, ClientGone("the client closed the connection"))
            raise
        except Exception as exc:  # our bug: the client gets the request id, the log the traceback
            raise ServiceError(f"internal error; quote request id {job.id}") from exc

    return run


def record(request: Request) -> JobRecord:
    """The request's JobRecord, its id the caller's X-Request-ID when that is a plain token."""
    given = request.headers.get("x-request-id", "")
    return JobRecord(id=given) if REQUEST_ID.fullmatch(given.encode()) else JobRecord()


def _echo(request: Request, job: JobRecord) -> dict[str, str]:
    """x-request-id only where no proxy adds it: two would reach the client joined by a comma."""
    return {} if request.headers.get("x-request-id") else {"x-request-id": job.id}


@job_route
async def post_job(request: Request, job: JobRecord):
    service = request.app.state.service
    with await receive(request, read_multipart(request.stream(), request.headers.get("content-type", ""),
                                               service.limits.max_bytes, service.pace), MULTIPART_SLACK) as upload:
        job.config = parse_job(upload.job).config
        return await _run(request, job, upload)


@job_route
async def post_segment(request: Request, job: JobRecord):
    service = request.app.state.service
    job.config = _query_config(request.query_params)
    with await receive(request, read_raw(request.stream(), service.limits.max_bytes, service.pace)) as upload:
        return await _run(request, job, upload)


async def _run(request: Request, job: JobRecord, upload: Upload):
    service = request.app.state.service
    with service.jobs.take():
        result = await service.run(upload.path, job.config)
    service.finished(job.id, 200, result)
    return answers.success(job, result, request.headers.get("accept"), _echo(request, job))


def _query_config(params) -> JobConfig:
    raw: dict[str, Any] = {}
    for key, value in params.multi_items():
        if key in raw:
            raise InvalidJob(f"config.{key[:60]} is given more than once in the query")
        if key in FLOATS:  # a query has only strings; the config's numbers are its own to judge
            try:
                raw[key] = float(value)
            except ValueError:
                raise InvalidJob(f"config.{key} is {value[:60]!r}; it must be {rule(key, typed=True)}") from None
        else:
            raw[key] = value
    return parse_config(raw)


async def render_error(request: Request, exc: Exception):
    """The one exception handler: any error becomes its error-table answer."""
    job: JobRecord = getattr(request.state, "job", None) or record(request)
    headers = _echo(request, job)
    if isinstance(exc, HTTPException):  # the router's: no such route, or not with this method
        headers |= exc.headers or {}
        where = f"{request.method} {request.url.path}"
        exc = (MethodNotAllowed(f"{where} is not allowed; use {exc.headers['Allow']}") if exc.status_code == 405
               else NotFound(f"no route {where}; POST /v2/job or /v2/segment"))
    request.app.state.service.finished(job.id, http_status(exc), None, exc)
    return answers.failure(job, exc, request.headers.get("accept"), headers)
