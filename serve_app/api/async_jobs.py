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

import asyncio
import os
import re
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from serve_app.api.job import JobRecord, async_job_json
from serve_app.api.routes import job_route, receive
from serve_app.api.upload import MULTIPART_SLACK, read_multipart
from serve_app.contract import JobConfig, parse_job
from serve_app.errors import NotFound, Overloaded

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def routes() -> list[Route]:
    base = "/v2/job/async"
    return [
        Route(base, job_route(submit), methods=["POST"]),
        Route(base + "/{id}", job_route(cancel), methods=["DELETE"]),
        Route(base + "/{id}/job.state.current", job_route(state), methods=["GET"]),
        Route(base + "/{id}/job.json", job_route(job_json), methods=["GET"]),
        Route(base + "/{id}/output", job_route(outputs), methods=["GET"]),
        Route(base + "/{id}/output/{filename}", job_route(output), methods=["GET"]),
    ]


async def submit(request: Request, job: JobRecord):
    service = request.app.state.service
    upload = await receive(request, read_multipart(request.stream(), request.headers.get("content-type", ""),
                                                    service.limits.max_bytes, service.pace), MULTIPART_SLACK,
                            wait=True)
    try:
        job.config = parse_job(upload.job).config
        row = await enqueue(service, upload.path, job.config)
    finally:
        os.unlink(upload.path)
    return JSONResponse(async_job_json(row, job.config), status_code=201)


async def enqueue(service, path: str, config: JobConfig):
    """Queue an async job for the upload at `path`, refused now, not in job.json later, when
    the queue is full or the probe refuses the video. Its id is new, never the caller's
    X-Request-ID: it names the job's files in the store."""
    store = service.store
    if await asyncio.to_thread(store.count, "queued") >= service.max_queued_jobs:
        raise Overloaded(f"{service.max_queued_jobs} jobs are waiting already; retry later",
                         service.jobs.retry_after_s)
    info = await service.probe(path)
    job_id = uuid.uuid4().hex
    await asyncio.to_thread(store.put_file, job_id, "input.mp4", path)
    try:
        row = await asyncio.to_thread(store.create, config.model_dump(exclude_unset=True), info.num_frames, job_id)
    except BaseException:
        await asyncio.to_thread(store.remove_files, job_id)
        raise
    service.runner.probed_here(job_id, info)
    return row


async def _row(request: Request):
    return await _get(request.app.state.service, request.path_params["id"])


async def _get(service, job_id: str):
    row = await asyncio.to_thread(service.store.get, job_id)
    if row is None:
        raise NotFound(f"no job {job_id[:64]!r}; it never was, was deleted or has expired")
    return row


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
    store = request.app.state.service.store
    size = await asyncio.to_thread(store.size, row.id, name)
    if size is None:  # deleted or expired since the row was read
        raise NotFound(f"job {row.id}'s {name} is gone")
    media = "video/mp4" if name.endswith(".mp4") else "application/json"
    wanted = RANGE.fullmatch(request.headers.get("range", "").strip())
    if not wanted or wanted.groups() == ("", ""):
        data = await asyncio.to_thread(store.read, row.id, name)
        return Response(data, media_type=media, headers={"Accept-Ranges": "bytes"})
    first, last = wanted.groups()
    start = int(first) if first else max(size - int(last), 0)  # "bytes=-N": the last N bytes
    end = min(int(last) + 1 if first and last else size, size)
    if start >= size or start >= end:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    data = await asyncio.to_thread(store.read, row.id, name, start, end)
    return Response(data, status_code=206, media_type=media,
                    headers={"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{size}"})


async def cancel(request: Request, job: JobRecord):
    row = await _row(request)
    if not await asyncio.to_thread(request.app.state.service.store.delete, row.id):
        raise NotFound(f"no job {row.id!r}; it was deleted or expired meanwhile")
    return Response(status_code=204)


# -- the handle API's side ------------------------------------------------------------------------
async def submit_job(service, video, config) -> str:
    from serve_app.contract import parse_config

    cfg = config if isinstance(config, JobConfig) else parse_config(config)
    async with service.bytes_on_disk(video) as (path, _):
        return (await enqueue(service, path, cfg)).id


async def job_status(service, job_id: str) -> dict:
    return async_job_json(await _get(service, job_id))


async def job_result(service, job_id: str) -> dict[str, bytes]:
    from serve_app.errors import JobNotDone, error_from_code

    row = await _get(service, job_id)
    if row.state == "failed":
        raise error_from_code(row.code, row.error or "the job failed")
    if row.state != "processed":
        raise JobNotDone(f"job {job_id} is {row.state} ({row.frames_done} of {row.frames_total} frames); "
                         "ask again later")
    return {name: await asyncio.to_thread(service.store.read, row.id, name) for name in row.outputs}
