"""The async job API, shaped like the hosted API's: a job outlives its request.

    POST   /v2/job/async                              the /v2/job body -> 201 + the job JSON
    GET    /v2/job/async/{id}/job.state.current       queued | processing | processed | failed
    GET    /v2/job/async/{id}/job.json                the job JSON, with progress (and error, code)
    GET    /v2/job/async/{id}/output                  the output file names (once processed)
    GET    /v2/job/async/{id}/output/{filename}       the file; Range requests answer 206
    DELETE /v2/job/async/{id}                         cancels it and deletes its files -> 204

Everything /v2/job checks (auth, limits, the probe's refusals) is checked before the 201.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from serve_app.api.answers import JobRecord, async_job_json
from serve_app.api.upload import MULTIPART_SLACK, read_multipart, receive
from serve_app.contract import parse_job
from serve_app.errors import NotFound

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


async def submit(request: Request, job: JobRecord):
    service, jobs = request.app.state.service, request.app.state.jobs
    with await receive(request, read_multipart(request.stream(), request.headers.get("content-type", ""),
                                               service.limits.max_bytes, service.pace), MULTIPART_SLACK,
                       wait=True) as upload:
        job.config = parse_job(upload.job).config
        row = await jobs.enqueue(upload.path, job.config)
    return JSONResponse(async_job_json(row, job.config), status_code=201)


async def _row(request: Request):
    return await request.app.state.jobs.get(request.path_params["id"])


async def state(request: Request, job: JobRecord):
    return PlainTextResponse((await _row(request)).state)


async def job_json(request: Request, job: JobRecord):
    return JSONResponse(async_job_json(await _row(request)))


async def outputs(request: Request, job: JobRecord):
    return JSONResponse((await _row(request)).outputs)


async def output(request: Request, job: JobRecord):
    row, name = await _row(request), request.path_params["filename"]
    if name not in row.outputs:
        raise NotFound(f"job {row.id} has no output {name[:64]!r}; it has {row.outputs}")
    store = request.app.state.jobs.store
    size = await store.size(row.id, name)
    if size is None:  # deleted or expired since the row was read
        raise NotFound(f"job {row.id}'s {name} is gone")
    media = "video/mp4" if name.endswith(".mp4") else "application/json"
    wanted = RANGE.fullmatch(request.headers.get("range", "").strip())
    if not wanted or wanted.groups() == ("", ""):
        return Response(await store.read(row.id, name), media_type=media, headers={"Accept-Ranges": "bytes"})
    first, last = wanted.groups()
    start = int(first) if first else max(size - int(last), 0)  # "bytes=-N": the last N bytes
    end = min(int(last) + 1 if first and last else size, size)
    if start >= size or start >= end:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    return Response(await store.read(row.id, name, start, end), status_code=206, media_type=media,
                    headers={"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{size}"})


async def cancel(request: Request, job: JobRecord):
    await request.app.state.jobs.delete(request.path_params["id"])
    return Response(status_code=204)


# (path under /v2/job/async, endpoint, method): api/routes.py wraps each as a job route.
ROUTES = (("", submit, "POST"), ("/{id}", cancel, "DELETE"), ("/{id}/job.state.current", state, "GET"),
          ("/{id}/job.json", job_json, "GET"), ("/{id}/output", outputs, "GET"),
          ("/{id}/output/{filename}", output, "GET"))
