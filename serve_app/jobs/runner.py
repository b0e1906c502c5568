"""The async jobs' runner: a task in each ingress replica that claims queued jobs from the
shared store while the replica has job slots free, runs them through the same graph as
/v2/job, and writes their progress, outputs and errors back.

While a job runs, its record is updated every `beat_s` (frames done: job.json follows within a
second; and a heartbeat), until its outputs are written. A record no longer processing (DELETE,
or taken back by another replica's recover()) stops the job at once: its graph call is
cancelled, so the tracker frees its session at the next frame; a deleted job's files go, a
taken-back job's stay for its next run. Every `sweep_s` it also
puts back jobs whose runner went silent and deletes jobs past their TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict

from serve_app.contract import JobConfig
from serve_app.errors import Overloaded, ServiceError, http_status
from serve_app.graph.wire import SPOOL_PREFIX, JobProgress
from serve_app.jobs.store import JobRow, JobStore

log = logging.getLogger("ray.serve")
PROBES_KEPT = 256


class JobRunner:
    def __init__(self, store: JobStore, service, *, stale_s: float = 60.0, ttl_s: float = 86400.0,
                 poll_s: float = 0.5, beat_s: float = 0.5) -> None:
        self.store, self.service = store, service
        self.stale_s, self.ttl_s, self.poll_s, self.beat_s = stale_s, ttl_s, poll_s, beat_s
        self.sweep_s = min(10.0, stale_s / 2, ttl_s / 2)
        self.worker = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.running: dict[str, asyncio.Task] = {}
        self.swept = self.backoff_until = 0.0
        self.wake = asyncio.Event()  # a job was submitted here: claim now, not at the next poll
        # VideoInfo of jobs submitted here, so the runner need not probe them again; bounded,
        # as a job may be deleted, expire or run on another replica first (then it is probed).
        self.probed: OrderedDict[str, object] = OrderedDict()

    def probed_here(self, job_id: str, info: object) -> None:
        """A job submitted here: remember its probe, and claim now rather than at the next poll."""
        self.probed[job_id] = info
        while len(self.probed) > PROBES_KEPT:
            self.probed.popitem(last=False)
        self.wake.set()

    async def loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the store was unreachable for a moment: try again next time
                log.exception("async job runner")
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    async def tick(self) -> None:
        if time.monotonic() - self.swept > self.sweep_s:
            self.swept = time.monotonic()
            await asyncio.to_thread(self.store.recover, self.stale_s)
            await asyncio.to_thread(self.store.expire, self.ttl_s)
        self.service.metrics.jobs(await asyncio.to_thread(self.store.count, "queued"), len(self.running))
        jobs = self.service.jobs
        while time.monotonic() > self.backoff_until and jobs.acquire():  # a slot first: a claimed job never waits
            try:
                row = await asyncio.to_thread(self.store.claim, self.worker)
            except BaseException:
                jobs.release()
                raise
            if row is None:
                jobs.release()
                return
            self.running[row.id] = asyncio.create_task(self.run(row))

    async def run(self, row: JobRow) -> None:
        progress, stage = JobProgress(0, row.frames_total), "tracking"
        task = asyncio.current_task()

        def seen(p: JobProgress) -> None:
            nonlocal progress
            progress = p

        async def beat() -> None:  # progress and heartbeat; a deleted job is stopped
            while True:
                await asyncio.sleep(self.beat_s)
                alive = await asyncio.to_thread(self.store.update, row.id, frames_done=progress.frames_done,
                                                frames_total=progress.frames_total, stage=stage)
                if not alive:
                    task.cancel()
                    return

        local = None
        beating = asyncio.create_task(beat())
        try:
            try:
                fd, local = tempfile.mkstemp(prefix=SPOOL_PREFIX, suffix=".mp4")
                os.close(fd)
                await asyncio.to_thread(self.store.get_file, row.id, "input.mp4", local)
                config = JobConfig.model_validate(row.config)
                result = await self.service.run(local, config, info=self.probed.pop(row.id, None), on_progress=seen)
            finally:
                self.service.jobs.release()
            progress, stage = JobProgress(result.num_frames, row.frames_total), "writing"  # still beating
            await asyncio.to_thread(self.store.update, row.id, stage=stage, frames_done=result.num_frames)
            outputs = {"output.mp4": result.mp4, **({"objects.json": result.objects} if result.objects else {})}
            for name, data in outputs.items():
                await asyncio.to_thread(self.store.put_bytes, row.id, name, data)
            beating.cancel()
            finished = await asyncio.to_thread(self.store.finish, row.id, list(outputs), result.num_frames)
            if not finished and await asyncio.to_thread(self.store.get, row.id) is None:
                await asyncio.to_thread(self.store.remove_files, row.id)  # deleted meanwhile: its outputs too
            self.service.finished(row.id, 200, result)
            self.service.metrics.job_done("processed", time.time() - row.created_at)
        except asyncio.CancelledError:  # deleted, or taken back by another replica's recover()
            log.info("async job %s cancelled", row.id)
            if await asyncio.to_thread(self.store.get, row.id) is None:  # deleted: none of its files stay
                await asyncio.to_thread(self.store.remove_files, row.id)
            raise
        except Overloaded:  # the graph's queues are full: the job waits in ours instead
            self.backoff_until = time.monotonic() + self.service.jobs.retry_after_s
            await asyncio.to_thread(self.store.requeue, row.id)
        except Exception as exc:
            error = exc if isinstance(exc, ServiceError) else ServiceError(f"internal error; quote job id {row.id}")
            self.service.finished(row.id, http_status(error), None, exc)
            await asyncio.to_thread(self.store.fail, row.id, str(error), error.code)
            self.service.metrics.job_done("failed", time.time() - row.created_at)
        finally:
            beating.cancel()
            if local is not None:
                os.unlink(local)
            self.running.pop(row.id, None)
