"""The async jobs' runner: a task in each ingress replica that claims queued jobs from the
shared store while the replica has job slots free, runs them through the same graph as
/v2/job (its `JobHost`), and writes their progress, outputs and errors back.

A running job's record is updated every `beat_s` (its progress, and a heartbeat) until its
outputs are written. A record no longer processing (DELETE, or taken back by another replica's
recover()) stops the job at once: its graph call is cancelled and the tracker frees its session
at the next frame. Every `sweep_s` it puts back jobs whose runner went silent and deletes jobs
past their TTL. Each tick also starts the webhook attempts that are due (jobs/webhooks.py), which
run beside the jobs and never hold the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from serve_app.contract import JobConfig
from serve_app.errors import Overloaded, ServiceError, StoreUnavailable, http_status
from serve_app.graph.wire import JobProgress, SegmentResult
from serve_app.jobs.store import WAITING, AsyncJobStore, JobRow
from serve_app.jobs.webhooks import WebhookSender
from serve_app.media import VideoInfo
from serve_app.metrics import StageMetrics
from serve_app.spool import Spool

log = logging.getLogger("ray.serve")
PROBES_KEPT = 256
OUTPUT_ROOM = 2  # room kept for a job's outputs, in sizes of its input (an overlay mp4 is about one)


class SlotPool(Protocol):
    retry_after_s: int
    def acquire(self) -> bool: ...
    def release(self) -> None: ...


class JobHost(Protocol):
    """What runs the jobs: the sync job service (api/ingress.SegmentService), whose job slots
    async jobs share with /v2/job."""

    jobs: SlotPool
    metrics: StageMetrics
    async def probe(self, path: str) -> VideoInfo: ...
    async def run(self, path: str, config: JobConfig, *, info: VideoInfo | None = None,
                  on_progress: Callable[[JobProgress], None] | None = None) -> SegmentResult: ...
    def finished(self, job_id: str, status: int, result: SegmentResult | None, exc: BaseException | None = None) -> None: ...


class JobRunner:
    def __init__(self, store: AsyncJobStore, host: JobHost, *, stale_s: float = 60.0, ttl_s: float = 86400.0,
                 poll_s: float = 0.5, beat_s: float = 0.5, webhooks: WebhookSender | None = None) -> None:
        self.store, self.host, self.webhooks = store, host, webhooks
        self.stale_s, self.ttl_s, self.poll_s, self.beat_s = stale_s, ttl_s, poll_s, beat_s
        self.sweep_s = min(10.0, stale_s / 2, ttl_s / 2)
        self.worker = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.running: dict[str, asyncio.Task] = {}
        self.stopping = False
        self.swept = self.backoff_until = 0.0
        self.orphans_swept = False
        self.wake = asyncio.Event()  # a job was submitted here: claim now, not at the next poll
        # VideoInfo of jobs submitted here, so the runner need not probe them again; bounded,
        # as a job may be deleted, expire or run on another replica first (then it is probed).
        self.probed: OrderedDict[str, VideoInfo] = OrderedDict()

    def probed_here(self, job_id: str, info: VideoInfo) -> None:
        """A job submitted here: remember its probe, and claim now rather than at the next poll."""
        self.probed[job_id] = info
        while len(self.probed) > PROBES_KEPT:
            self.probed.popitem(last=False)
        self.wake.set()

    async def loop(self) -> None:
        while True:
            try:
                await self.tick()
            except RuntimeError as exc:
                if "cannot schedule new futures" in str(exc):  # the process is exiting: no thread pools
                    return
                log.exception("async job runner")
            except Exception:  # the store was unreachable for a moment: try again next time
                log.exception("async job runner")
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    async def stop(self) -> None:
        """A graceful stop: the jobs running here go back to the queue at once, no attempt
        counted, for another runner (their graph calls are cancelled); returns once they have."""
        self.stopping = True
        running = list(self.running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.stop()

    async def tick(self) -> None:
        store = self.store
        if time.monotonic() - self.swept > self.sweep_s:
            self.swept = time.monotonic()
            await store.recover(self.stale_s)
            await store.expire(self.ttl_s)
            if not self.orphans_swept:  # once a start: what dead writers left, with no record
                await store.sweep()
                self.orphans_swept = True
        self.host.metrics.jobs(await store.count("queued"), len(self.running))
        if self.webhooks is not None:
            await self.webhooks.tick()
        slots = self.host.jobs
        while time.monotonic() > self.backoff_until and slots.acquire():  # a slot first: a claimed job never waits
            try:
                row = await store.claim(self.worker)
            except BaseException:
                slots.release()
                raise
            if row is None:
                slots.release()
                return
            self.running[row.id] = asyncio.create_task(self.run(row))

    async def run(self, row: JobRow) -> None:
        progress, stage, started = JobProgress(0, row.frames_total), WAITING, None
        task, store, host = asyncio.current_task(), self.store, self.host

        def seen(p: JobProgress) -> None:  # the encoder's first report: it has started the job
            nonlocal progress, stage, started
            progress, stage, started = p, "tracking" if stage == WAITING else stage, started or time.time()

        async def beat() -> None:  # progress and heartbeat; a deleted job is stopped
            while True:
                await asyncio.sleep(self.beat_s)
                alive = await store.update(row.id, frames_done=progress.frames_done, started_at=started,
                                           frames_total=progress.frames_total, stage=stage)
                if not alive:
                    task.cancel()
                    return

        beating, written = asyncio.create_task(beat()), []
        try:
            with Spool() as local:
                try:
                    await store.get_file(row.id, "input.mp4", local.done())
                    await store.room(os.path.getsize(local.path) * OUTPUT_ROOM)  # no work whose outputs cannot fit
                    config = JobConfig.model_validate(row.config)
                    result = await host.run(local.path, config, info=self.probed.pop(row.id, None), on_progress=seen)
                finally:
                    host.jobs.release()
            progress, stage = JobProgress(result.num_frames, row.frames_total), "writing"  # still beating
            await store.update(row.id, stage=stage, frames_done=result.num_frames)
            outputs = {"output.mp4": result.mp4, **({"objects.json": result.objects} if result.objects else {})}
            for name, data in outputs.items():
                written.append(name)
                await store.put_bytes(row.id, name, data)
            beating.cancel()
            finished = await store.finish(row.id, list(outputs), result.num_frames)
            if not finished and await store.get(row.id) is None:
                await store.remove_files(row.id)  # deleted meanwhile: its outputs too
            host.finished(row.id, 200, result)
            host.metrics.job_done("processed", time.time() - row.created_at)
        except asyncio.CancelledError:  # deleted, taken back by another replica's recover(), or stop()
            log.info("async job %s cancelled", row.id)
            if self.stopping:
                await store.requeue(row.id)
            elif await store.get(row.id) is None:  # deleted: none of its files stay
                await store.remove_files(row.id)
            raise
        except Overloaded:  # the graph's queues are full: the job waits in ours instead
            self.backoff_until = time.monotonic() + host.jobs.retry_after_s
            await store.requeue(row.id)
        except Exception as exc:
            error = exc if isinstance(exc, ServiceError) else ServiceError(f"internal error; quote job id {row.id}")
            host.finished(row.id, http_status(error), None, exc)
            for name in written:  # a failed job keeps no outputs (a full disk cut one off)
                await store.remove(row.id, name)
            try:
                await store.fail(row.id, str(error), error.code)
            except StoreUnavailable:  # its record cannot be written now: recover() retries it, then fails it
                log.exception("async job %s failed and could not be marked so", row.id)
            host.metrics.job_done("failed", time.time() - row.created_at)
        finally:
            beating.cancel()
            self.running.pop(row.id, None)
            self.wake.set()  # its webhook, if any, is due now
