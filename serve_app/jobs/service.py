"""Async jobs as a service of their own: the store, the queue's bound, the runner that claims
jobs in this replica, and the webhooks sent when they end. The routes (api/async_jobs.py) and
the handle API both call it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable

from serve_app.contract import JobConfig
from serve_app.errors import JobNotDone, NotFound, Overloaded, error_from_code
from serve_app.jobs.runner import OUTPUT_ROOM, JobHost, JobRunner
from serve_app.jobs.store import QUEUED, AsyncJobStore, JobRow, JobStore
from serve_app.jobs.webhooks import HostGuard, WebhookSender, WebhookSettings

ANYONE = object()  # the owner to look jobs up for when every job may be seen (no auth, an admin)


class AsyncJobs:
    def __init__(self, store: JobStore, host: JobHost, *, max_queued: int = 100, stale_s: float = 60.0,
                 ttl_s: float = 86400.0, webhooks: WebhookSettings = WebhookSettings(),
                 render: Callable[[JobRow], dict] | None = None) -> None:
        """`render(row)`: the job JSON a webhook POSTs (api/answers.async_job_json)."""
        self.store, self.host, self.max_queued = AsyncJobStore(store), host, max_queued
        self.guard = HostGuard(webhooks.hosts)
        sender = WebhookSender(self.store, webhooks, render, store.clock) if self.guard and render else None
        self.runner = JobRunner(self.store, host, stale_s=stale_s, ttl_s=ttl_s, webhooks=sender)
        self._loop: asyncio.Task | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self.runner.loop())

    async def stop(self) -> None:
        """Claims end, and the jobs running here go back to the queue (JobRunner.stop)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        await self.runner.stop()

    def check_webhook(self, url: str) -> None:
        """InvalidJob (400) unless webhooks may go to `url` (http(s), an allowed host)."""
        self.guard.check(url)

    async def enqueue(self, path: str, config: JobConfig, owner: str | None = None,
                      webhook: str | None = None) -> JobRow:
        """Queue a job for the upload at `path`, refused now, not in job.json later, when the
        queue is full, the store has no room, the probe refuses the video or the webhook's host
        is not allowed. Its id is new, never the caller's X-Request-ID: it names the job's files
        in the store."""
        if webhook is not None:
            self.check_webhook(webhook)
        full = Overloaded(f"{self.max_queued} jobs are waiting already; retry later", self.host.jobs.retry_after_s)
        if await self.store.count(QUEUED) >= self.max_queued:
            raise full
        await self.store.room(os.path.getsize(path) * (1 + OUTPUT_ROOM))
        info = await self.host.probe(path)
        config.check_video(info)
        job_id = uuid.uuid4().hex
        try:
            await self.store.put_file(job_id, "input.mp4", path)
            row = await self.store.create(config.model_dump(exclude_unset=True), info.num_frames, job_id, owner,
                                          most_queued=self.max_queued, webhook=webhook)
            if row is None:
                raise full
        except BaseException:
            await self.store.remove_files(job_id)
            raise
        self.runner.probed_here(job_id, info)
        return row

    async def get(self, job_id: str, owner: object = ANYONE) -> JobRow:
        """The job, for `owner` (a token's SHA-256, or None for handle calls): another's is 404."""
        row = await self.store.get(job_id)
        if row is None or (owner is not ANYONE and row.owner != owner):
            raise NotFound(f"no job {job_id[:64]!r}; it never was, was deleted or has expired")
        return row

    async def delete(self, job_id: str, owner: object = ANYONE) -> None:
        """Cancels the job (its runner sees the record gone) and deletes its files."""
        row = await self.get(job_id, owner)
        if not await self.store.delete(row.id):
            raise NotFound(f"no job {row.id!r}; it was deleted or expired meanwhile")

    async def result(self, job_id: str) -> dict[str, bytes]:
        """The processed job's files by name; its own error if it failed, JobNotDone before."""
        row = await self.get(job_id)
        if row.state == "failed":
            raise error_from_code(row.code, row.error or "the job failed")
        if row.state != "processed":
            raise JobNotDone(f"job {job_id} is {row.state} ({row.frames_done} of {row.frames_total} frames); "
                             "ask again later")
        return {name: await self.store.read(row.id, name) for name in row.outputs}
