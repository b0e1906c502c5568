"""Durable jobs: their records and queue in a database, their files under an fsspec URL.

Records live in one table through SQLAlchemy: a SQLite file by default, PostgreSQL on a cluster
(`job_db`), where several ingress replicas claim queued jobs with row locks (`FOR UPDATE SKIP
LOCKED`), so no job runs twice. Files (`<job_store>/<id>/input.mp4`, its outputs) live on a
local directory or `s3://`/`gs://`: an output is written under a temporary name and moved into
place, and a job is marked processed only after its files are there.

A job is queued -> processing -> processed | failed. A processing job whose runner stops
sending heartbeats (its replica died) is queued again once, then failed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from serve_app.errors import StoreUnavailable

QUEUED, PROCESSING, PROCESSED, FAILED = "queued", "processing", "processed", "failed"
METADATA = sa.MetaData()
JOBS = sa.Table(
    "sam3_video_jobs", METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("frames_done", sa.Integer, nullable=False, default=0),
    sa.Column("frames_total", sa.Integer, nullable=False, default=0),
    sa.Column("stage", sa.String(32), nullable=False, default=QUEUED),
    sa.Column("outputs", sa.Text, nullable=False, default="[]"),
    sa.Column("error", sa.Text),
    sa.Column("code", sa.String(64)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(64)),
)


@dataclass
class JobRow:
    id: str
    state: str
    config: dict[str, Any]
    created_at: float
    updated_at: float
    frames_done: int = 0
    frames_total: int = 0
    stage: str = QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    code: str | None = None
    attempts: int = 0

    @classmethod
    def of(cls, row: Any) -> "JobRow":
        m = row._mapping
        return cls(id=m["id"], state=m["state"], config=json.loads(m["config"]), created_at=m["created_at"],
                   updated_at=m["updated_at"], frames_done=m["frames_done"], frames_total=m["frames_total"],
                   stage=m["stage"], started_at=m["started_at"], finished_at=m["finished_at"],
                   outputs=json.loads(m["outputs"]), error=m["error"], code=m["code"], attempts=m["attempts"])


class JobStore:
    """One job database and file store; every replica of every node may open the same one.
    `clock` (time.time) stamps the records: jobs are judged stale or expired by it."""

    def __init__(self, store_url: str, db_url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        import fsspec

        self.clock = clock
        try:
            self.fs, self.root = fsspec.core.url_to_fs(store_url)
            self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
            if self.local:
                self.fs.makedirs(self.root, exist_ok=True)
            self._put(".write-check", b"ok")  # fail at start, not at the first job
            db_url = db_url or (f"sqlite:///{self.root}/jobs.sqlite" if self.local else None)
            if db_url is None:
                raise ValueError("a job_store that is not a local directory needs a job_db URL")
            sqlite = db_url.startswith("sqlite")
            self.engine = sa.create_engine(db_url, connect_args={"timeout": 30} if sqlite else {},
                                           pool_pre_ping=not sqlite)
            if sqlite:  # readers beside one writer across processes
                sa.event.listen(self.engine, "connect", _sqlite_wal)
            METADATA.create_all(self.engine)
            self.postgres = self.engine.dialect.name == "postgresql"
        except Exception as exc:  # whatever the URL, driver or permissions say
            raise StoreUnavailable(f"the job store {store_url!r} (database {_shown(db_url)!r}) cannot be used: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None

    # -- files ----------------------------------------------------------------------------------
    def path(self, job_id: str, name: str) -> str:
        return f"{self.root}/{job_id}/{name}"

    def _put(self, name: str, data: bytes) -> None:
        """Write `name` under a temporary name and move it into place: never seen half-written."""
        part = f"{self.root}/{name}.part-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders: a no-op
        self.fs.pipe_file(part, data)
        self.fs.mv(part, f"{self.root}/{name}")

    def put_file(self, job_id: str, name: str, local_path: str) -> None:
        part = self.path(job_id, f".{name}.part-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(f"{self.root}/{job_id}", exist_ok=True)
        self.fs.put_file(local_path, part)
        self.fs.mv(part, self.path(job_id, name))

    def put_bytes(self, job_id: str, name: str, data: bytes) -> None:
        self._put(f"{job_id}/{name}", data)

    def get_file(self, job_id: str, name: str, local_path: str) -> None:
        self.fs.get_file(self.path(job_id, name), local_path)

    def size(self, job_id: str, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(job_id, name)))
        except FileNotFoundError:
            return None

    def read(self, job_id: str, name: str, start: int = 0, end: int | None = None) -> bytes:
        with self.fs.open(self.path(job_id, name), "rb") as f:
            f.seek(start)
            return f.read(-1 if end is None else end - start)

    def remove_files(self, job_id: str) -> None:
        try:
            self.fs.rm(f"{self.root}/{job_id}", recursive=True)
        except FileNotFoundError:
            pass

    # -- records --------------------------------------------------------------------------------
    def create(self, config: dict[str, Any], frames: int, job_id: str | None = None) -> JobRow:
        now = self.clock()
        job_id = job_id or uuid.uuid4().hex
        with self.engine.begin() as db:
            db.execute(JOBS.insert().values(id=job_id, state=QUEUED, config=json.dumps(config), created_at=now,
                                            updated_at=now, frames_done=0, frames_total=frames, stage=QUEUED,
                                            outputs="[]", attempts=0))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as db:
            row = db.execute(JOBS.select().where(JOBS.c.id == job_id)).first()
        return JobRow.of(row) if row else None

    def count(self, state: str) -> int:
        with self.engine.connect() as db:
            return int(db.execute(sa.select(sa.func.count()).where(JOBS.c.state == state)).scalar())

    def claim(self, worker: str) -> JobRow | None:
        """The oldest queued job, now processing by `worker`; None when none is queued."""
        now = self.clock()
        try:
            with self.engine.begin() as db:
                pick = sa.select(JOBS.c.id).where(JOBS.c.state == QUEUED).order_by(JOBS.c.created_at).limit(1)
                if self.postgres:
                    pick = pick.with_for_update(skip_locked=True)  # another replica's claim is skipped
                job_id = db.execute(pick).scalar()
                if job_id is None:
                    return None
                claimed = db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.state == QUEUED).values(
                    state=PROCESSING, stage="starting", worker=worker, started_at=now, heartbeat_at=now,
                    updated_at=now, attempts=JOBS.c.attempts + 1)).rowcount
        except sa.exc.OperationalError:  # SQLite: another process's claim won the write lock
            return None
        return self.get(job_id) if claimed == 1 else None

    def update(self, job_id: str, **values: Any) -> bool:
        """Set `values` (frames_done, stage, ...) and the heartbeat; False if the job is gone."""
        now = self.clock()
        with self.engine.begin() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.state == PROCESSING).values(
                updated_at=now, heartbeat_at=now, **values)).rowcount == 1

    def finish(self, job_id: str, outputs: list[str], frames: int) -> bool:
        return self.update(job_id, state=PROCESSED, stage=PROCESSED, outputs=json.dumps(outputs),
                           frames_done=frames, finished_at=self.clock())

    def fail(self, job_id: str, error: str, code: str) -> bool:
        return self.update(job_id, state=FAILED, stage=FAILED, error=error, code=code, finished_at=self.clock())

    def delete(self, job_id: str) -> bool:
        with self.engine.begin() as db:
            gone = db.execute(JOBS.delete().where(JOBS.c.id == job_id)).rowcount == 1
        self.remove_files(job_id)
        return gone

    def requeue(self, job_id: str) -> bool:
        """Back to the queue, as if never claimed (the graph was full: not the job's fault)."""
        with self.engine.begin() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.state == PROCESSING).values(
                state=QUEUED, stage=QUEUED, worker=None, frames_done=0, started_at=None,
                attempts=JOBS.c.attempts - 1, updated_at=self.clock())).rowcount == 1

    def recover(self, stale_s: float, retries: int = 1) -> int:
        """Jobs whose runner went silent for `stale_s`: queued again once, then failed."""
        cutoff, now = self.clock() - stale_s, self.clock()
        stale = (JOBS.c.state == PROCESSING) & (JOBS.c.heartbeat_at < cutoff)
        with self.engine.begin() as db:
            again = db.execute(JOBS.update().where(stale, JOBS.c.attempts <= retries).values(
                state=QUEUED, stage=QUEUED, worker=None, frames_done=0, updated_at=now)).rowcount
            failed = db.execute(JOBS.update().where(stale).values(
                state=FAILED, stage=FAILED, finished_at=now, updated_at=now, code="model_error",
                error="the replica running this job stopped, twice; submit it again")).rowcount
        return again + failed

    def expire(self, ttl_s: float) -> int:
        """Deletes jobs (and their files) created more than `ttl_s` ago."""
        with self.engine.connect() as db:
            old = [r[0] for r in db.execute(sa.select(JOBS.c.id).where(JOBS.c.created_at < self.clock() - ttl_s))]
        for job_id in old:
            self.delete(job_id)
        return len(old)


class AsyncJobStore:
    """A JobStore's methods as coroutines, each run in a worker thread: the event loop never
    waits for the disk or the database."""

    def __init__(self, store: JobStore) -> None:
        self.sync = store

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)
        return lambda *args, **kwargs: asyncio.to_thread(method, *args, **kwargs)


def _sqlite_wal(connection, _record) -> None:
    connection.execute("PRAGMA journal_mode=WAL")


def _shown(db_url: str | None) -> str | None:
    """A database URL fit for a message: its password starred (it ends up in logs and status)."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(db_url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it to hide, and it says what is wrong
        return db_url
