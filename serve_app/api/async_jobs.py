"""The async job API, shaped like the hosted API's: a job outlives its request.

    POST   /v2/job/async[?webhook=URL]                the /v2/job body (and a `webhook` field) -> 201 + the job JSON
    GET    /v2/job/async/{id}/job.state.current       queued | processing | processed | failed
    GET    /v2/job/async/{id}/job.json                the job JSON, with progress (and error, code)
    GET    /v2/job/async/{id}/output                  the output file names (once processed)
    GET    /v2/job/async/{id}/output/{filename}       the file; Range requests answer 206
    DELETE /v2/job/async/{id}                         cancels it and deletes its files -> 204

Everything /v2/job checks (auth, limits, the probe's refusals) is checked before the 201, and
so is the webhook's URL (jobs/webhooks.py: http(s), a host the operator allows).
"""

from __future__ import annotations

import asyncio
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from serve_app.api.answers import JobRecord, async_job_json
from serve_app.api.upload import MULTIPART_SLACK, read_multipart, receive
from serve_app.contract import parse_job
from serve_app.errors import InvalidJob, JobNotDone, NotFound, Overloaded
from serve_app.jobs.service import ANYONE

RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 1 << 20


async def submit(request: Request, job: JobRecord):
    service, jobs = request.app.state.service, request.app.state.jobs
    given = request.query_params.getlist("webhook")
    if len(given) > 1:
        raise InvalidJob("webhook is given more than once in the query; send one URL")
    webhook = given[0] if given else None
    if webhook is not None:  # refused before a byte of the upload is read
        jobs.check_webhook(webhook)
    with await receive(request, read_multipart(request.stream(), request.headers.get("content-type", ""),
                                               service.limits.max_bytes, service.pace), MULTIPART_SLACK,
                       wait=True) as upload:
        job.config = parse_job(upload.job).config
        if upload.webhook is not None:
            if webhook is not None and upload.webhook != webhook:
                raise InvalidJob("webhook is given both in the query and as a form field, differently; send one")
            webhook = upload.webhook
        owner = request.state.owner
        row = await jobs.enqueue(upload.path, job.config, None if owner is ANYONE else owner, webhook=webhook)
    return JSONResponse(async_job_json(row, job.config), status_code=201)


async def _row(request: Request):
    return await request.app.state.jobs.get(request.path_params["id"], request.state.owner)


async def state(request: Request, job: JobRecord):
    return PlainTextResponse((await _row(request)).state)


async def job_json(request: Request, job: JobRecord):
    return JSONResponse(async_job_json(await _row(request)))


async def _processed(request: Request):
    row = await _row(request)
    if row.state != "processed":
        raise JobNotDone(f"job {row.id} is {row.state}{': ' + row.error if row.error else ''}; "
                         "its outputs come once it is processed")
    return row


async def outputs(request: Request, job: JobRecord):
    return JSONResponse((await _processed(request)).outputs)


async def output(request: Request, job: JobRecord):
    row, name = await _processed(request), request.path_params["filename"]
    if name not in row.outputs:
        raise NotFound(f"job {row.id} has no output {name[:64]!r}; it has {row.outputs}")
    store = request.app.state.jobs.store
    size = await store.size(row.id, name)
    if size is None:  # deleted or expired since the row was read
        raise NotFound(f"job {row.id}'s {name} is gone")
    headers = {"Accept-Ranges": "bytes"}
    start, end, status = 0, size, 200
    wanted = RANGE.fullmatch(request.headers.get("range", "").strip())
    if wanted and wanted.groups() != ("", ""):
        first, last = wanted.groups()
        if max(len(first), len(last)) > 18:  # past any file's size (and int()'s digit limit)
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        start = int(first) if first else max(size - int(last), 0)  # "bytes=-N": the last N bytes
        end = min(int(last) + 1 if first and last else size, size)
        if start >= size or start >= end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
    downloads = request.app.state.service.downloads
    if not downloads.acquire():
        raise Overloaded(f"this replica is sending {downloads.used} downloads, the most it takes; retry later",
                         downloads.retry_after_s)
    try:
        file = await store.open(row.id, name)
    except BaseException:
        downloads.release()
        raise
    return Download(file, start, end, downloads.release, status_code=status, headers=headers,
                    media_type="video/mp4" if name.endswith(".mp4") else "application/json")


class Download(StreamingResponse):
    """A file's bytes [start, end) read from the store one chunk at a time (a download costs the
    ingress one chunk of memory, whatever the file's size); `release` once it has been sent, cut
    off or never started."""

    def __init__(self, file, start: int, end: int, release, **kwargs) -> None:
        self.file, self.release = file, release
        super().__init__(self._chunks(start, end), **kwargs)
        self.headers["content-length"] = str(end - start)

    async def _chunks(self, start: int, end: int):
        await asyncio.to_thread(self.file.seek, start)
        while start < end:
            data = await asyncio.to_thread(self.file.read, min(CHUNK, end - start))
            if not data:
                return
            start += len(data)
            yield data

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            await asyncio.to_thread(self.file.close)


async def cancel(request: Request, job: JobRecord):
    await request.app.state.jobs.delete(request.path_params["id"], request.state.owner)
    return Response(status_code=204)


# (path under /v2/job/async, endpoint, method): api/routes.py wraps each as a job route.
ROUTES = (("", submit, "POST"), ("/{id}", cancel, "DELETE"), ("/{id}/job.state.current", state, "GET"),
          ("/{id}/job.json", job_json, "GET"), ("/{id}/output", outputs, "GET"),
          ("/{id}/output/{filename}", output, "GET"))
