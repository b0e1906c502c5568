"""Durable jobs: their records and queue in a database, their files under an fsspec URL.

Records live in one table through SQLAlchemy: a SQLite file by default, PostgreSQL on a cluster
(`job_db`), where several ingress replicas claim queued jobs with row locks (`FOR UPDATE SKIP
LOCKED`), so no job runs twice. Files (`<job_store>/<id>/input.mp4`, its outputs) live on a
local directory or `s3://`/`gs://`: a file is written under a temporary name and moved into
place (a failed write leaves no part), and a job is marked processed only after its files are
there. A full store is InsufficientStorage (507), a database that cannot be written
StoreUnavailable (503). With bearer auth on, a job belongs to the token that submitted it (its
SHA-256 is kept, never the token).

A job is queued -> processing -> processed | failed. A processing job whose runner stops
sending heartbeats (its replica died) is queued again once, then failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from serve_app.contract import size
from serve_app.errors import InsufficientStorage, StoreUnavailable

QUEUED, PROCESSING, PROCESSED, FAILED = "queued", "processing", "processed", "failed"
WAITING = "waiting"  # claimed, waiting for the graph (an encoder slot); its frames have not started
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
    sa.Column("owner", sa.String(64)),  # SHA-256 of the submitting bearer token; None: auth off, or a handle call
    # Webhook (jobs/webhooks.py): where to POST the ended job, the attempts so far, the last
    # answer, and when the next attempt is due (None: none is, or not yet: the job runs).
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_attempts", sa.Integer),
    sa.Column("webhook_status", sa.Integer),
    sa.Column("webhook_error", sa.Text),
    sa.Column("webhook_next_at", sa.Float, index=True),  # each runner asks for the due ones twice a second
)
ORPHAN_S = 600.0  # a job's folder or part this old with no record is left over (an upload takes seconds)


def write_whole(fs: Any, final: str, put: Callable[[str], None], full: str, unwritable: str) -> None:
    """`put(part)` writes a hidden temporary name beside `final`, moved into place once whole:
    never seen half-written, and a write that fails (a full disk) leaves no part behind. `full`
    and `unwritable` are the errors' messages ({name}: the file, {reason}: the OS's words)."""
    folder, name = final.rsplit("/", 1)
    part = f"{folder}/.{name}.part-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(folder, exist_ok=True)  # object stores have no folders: a no-op
        put(part)
        fs.mv(part, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            fs.rm(part)
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(_say(full, name, reason)) from None
        raise StoreUnavailable(_say(unwritable, name, reason)) from None


def _say(message: str, name: str, reason: str) -> str:
    return message.replace("{name}", name).replace("{reason}", reason)  # not format: a URL may hold braces


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
    owner: str | None = None
    webhook_url: str | None = None
    webhook_attempts: int = 0
    webhook_status: int | None = None
    webhook_error: str | None = None
    webhook_next_at: float | None = None

    @classmethod
    def of(cls, row: Any) -> "JobRow":
        m = {k: v for k, v in row._mapping.items() if k in cls.__dataclass_fields__}
        return cls(**{**m, "config": json.loads(m["config"]), "outputs": json.loads(m["outputs"]),
                      "webhook_attempts": m.get("webhook_attempts") or 0})  # rows older than the column: None


class JobStore:
    """One job database and file store; every replica of every node may open the same one.
    `clock` (time.time) stamps the records: jobs are judged stale or expired by it."""

    def __init__(self, store_url: str, db_url: str | None = None, clock: Callable[[], float] = time.time,
                 min_free_bytes: int = 0) -> None:
        import fsspec

        self.clock, self.min_free_bytes = clock, min_free_bytes
        try:
            self.fs, self.root = fsspec.core.url_to_fs(store_url)
            self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
            if self.local:
                self.fs.makedirs(self.root, exist_ok=True)
            self._write(f"{self.root}/.write-check", lambda part: self.fs.pipe_file(part, b"ok"))  # fail now, not later
            db_url = db_url or (f"sqlite:///{self.root}/jobs.sqlite" if self.local else None)
            if db_url is None:
                raise ValueError("a job_store that is not a local directory needs a job_db URL")
            sqlite = db_url.startswith("sqlite")
            self.engine = sa.create_engine(db_url, connect_args={"timeout": 30} if sqlite else {},
                                           pool_pre_ping=not sqlite)
            if sqlite:  # readers beside one writer across processes
                sa.event.listen(self.engine, "connect", _sqlite_wal)
            METADATA.create_all(self.engine)
            _add_new_columns(self.engine)
            self.postgres = self.engine.dialect.name == "postgresql"
        except Exception as exc:  # whatever the URL, driver or permissions say
            raise StoreUnavailable(f"the job store {store_url!r} (database {_shown(db_url)!r}) cannot be used: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None

    # -- files ----------------------------------------------------------------------------------
    def path(self, job_id: str, name: str) -> str:
        return f"{self.root}/{job_id}/{name}"

    def _write(self, final: str, put: Callable[[str], None]) -> None:
        write_whole(self.fs, final, put, "the job store is full: {name} could not be written ({reason})",
                    "the job store cannot write {name}: {reason}")

    def put_file(self, job_id: str, name: str, local_path: str) -> None:
        self._write(self.path(job_id, name), lambda part: self.fs.put_file(local_path, part))

    def put_bytes(self, job_id: str, name: str, data: bytes) -> None:
        self._write(self.path(job_id, name), lambda part: self.fs.pipe_file(part, data))

    def room(self, need: int) -> None:
        """Refuse (InsufficientStorage) unless `need` bytes fit with min_free_bytes to spare
        (a local store; an object store has no fixed size)."""
        if self.local:
            free = shutil.disk_usage(self.root).free
            if free - need < self.min_free_bytes:
                raise InsufficientStorage(f"the job store has {size(free)} free; this job needs {size(need)} for its "
                                          f"input and outputs, and {size(self.min_free_bytes)} are kept free")

    def get_file(self, job_id: str, name: str, local_path: str) -> None:
        self.fs.get_file(self.path(job_id, name), local_path)

    def size(self, job_id: str, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(job_id, name)))
        except FileNotFoundError:
            return None

    def open(self, job_id: str, name: str):
        """The file, open for reading (the caller closes it)."""
        return self.fs.open(self.path(job_id, name), "rb")

    def read(self, job_id: str, name: str, start: int = 0, end: int | None = None) -> bytes:
        with self.fs.open(self.path(job_id, name), "rb") as f:
            f.seek(start)
            return f.read(-1 if end is None else end - start)

    def remove(self, job_id: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(job_id, name))

    def remove_files(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.root}/{job_id}", recursive=True)

    def sweep(self, older_than_s: float = ORPHAN_S) -> int:
        """Removes what no record owns (a local store): job folders without a row, and parts left
        by writes that were cut off. Younger ones may be an upload on its way to its row."""
        if not self.local:
            return 0
        with self._db() as db:
            known = {r[0] for r in db.execute(sa.select(JOBS.c.id))}
        old, gone = self.clock() - older_than_s, 0
        for entry in self.fs.ls(self.root, detail=True):
            name = entry["name"].rsplit("/", 1)[-1]
            if entry["type"] == "directory" and name not in known and self.fs.modified(entry["name"]).timestamp() < old:
                self.fs.rm(entry["name"], recursive=True)
                gone += 1
            elif entry["type"] == "directory" or ".part-" in name:
                parts = [p for p in self.fs.ls(entry["name"]) if ".part-" in p] if entry["type"] == "directory" else [entry["name"]]
                for part in parts:
                    if self.fs.modified(part).timestamp() < old:
                        self.fs.rm(part)
                        gone += 1
        return gone

    @contextlib.contextmanager
    def _db(self):
        """One transaction; a database that cannot be used now (a full disk, a lost server) is
        StoreUnavailable (503), never a bare driver error."""
        try:
            with self.engine.begin() as db:
                yield db
        except sa.exc.DBAPIError as exc:
            raise StoreUnavailable(f"the job database cannot be used now: {str(exc.orig).splitlines()[0][:200]}") from None

    # -- records --------------------------------------------------------------------------------
    def create(self, config: dict[str, Any], frames: int, job_id: str | None = None, owner: str | None = None,
               most_queued: int | None = None, webhook: str | None = None) -> JobRow | None:
        """A queued job; None if `most_queued` are queued already (counted and inserted under one
        lock, so simultaneous submissions cannot pass the bound together). `webhook`: a URL the
        guard allowed, POSTed to when the job ends."""
        now = self.clock()
        job_id = job_id or uuid.uuid4().hex
        with self._db() as db:
            if self.postgres:  # absent rows cannot be locked: one lock for the queue's tail
                db.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('sam3_video_jobs queue'))"))
            else:
                db.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite: the write lock before the count
            queued = sa.select(sa.func.count()).where(JOBS.c.state == QUEUED)
            if most_queued is not None and db.execute(queued).scalar() >= most_queued:
                return None
            db.execute(JOBS.insert().values(id=job_id, state=QUEUED, config=json.dumps(config), created_at=now,
                                            updated_at=now, frames_done=0, frames_total=frames, stage=QUEUED,
                                            outputs="[]", attempts=0, owner=owner, webhook_url=webhook,
                                            webhook_attempts=0))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRow | None:
        with self._db() as db:
            row = db.execute(JOBS.select().where(JOBS.c.id == job_id)).first()
        return JobRow.of(row) if row else None

    def count(self, state: str) -> int:
        with self._db() as db:
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
                    state=PROCESSING, stage=WAITING, worker=worker, heartbeat_at=now,
                    updated_at=now, attempts=JOBS.c.attempts + 1)).rowcount
        except sa.exc.OperationalError:  # SQLite: another process's claim won the write lock
            return None
        return self.get(job_id) if claimed == 1 else None

    def update(self, job_id: str, **values: Any) -> bool:
        """Set `values` (frames_done, stage, ...) and the heartbeat; False if the job is gone."""
        now = self.clock()
        with self._db() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.state == PROCESSING).values(
                updated_at=now, heartbeat_at=now, **values)).rowcount == 1

    def finish(self, job_id: str, outputs: list[str], frames: int) -> bool:
        now = self.clock()
        return self.update(job_id, state=PROCESSED, stage=PROCESSED, outputs=json.dumps(outputs),
                           frames_done=frames, finished_at=now, webhook_next_at=_webhook_due(now))

    def fail(self, job_id: str, error: str, code: str) -> bool:
        now = self.clock()
        return self.update(job_id, state=FAILED, stage=FAILED, error=error, code=code, finished_at=now,
                           webhook_next_at=_webhook_due(now))

    # -- webhooks (jobs/webhooks.py) ------------------------------------------------------------
    def due_webhooks(self, limit: int) -> list[JobRow]:
        """Ended jobs whose webhook attempt is due, the longest due first."""
        with self._db() as db:
            rows = db.execute(JOBS.select().where(JOBS.c.webhook_next_at <= self.clock())
                              .order_by(JOBS.c.webhook_next_at).limit(limit)).all()
        return [JobRow.of(r) for r in rows]

    def claim_webhook(self, job_id: str, due_at: float, lease_s: float) -> bool:
        """Take the attempt due at `due_at` for this runner: it is due again after `lease_s` unless
        recorded first (a runner that dies mid-attempt loses nothing). False: another took it."""
        with self._db() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.webhook_next_at == due_at).values(
                webhook_next_at=self.clock() + lease_s)).rowcount == 1

    def webhook_attempted(self, job_id: str, attempts: int, status: int | None, error: str | None,
                          next_at: float | None) -> bool:
        """Record an attempt; `next_at` is when the next one is due (None: delivered, or given up)."""
        with self._db() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id).values(
                webhook_attempts=attempts, webhook_status=status, webhook_error=error,
                webhook_next_at=next_at)).rowcount == 1

    def delete(self, job_id: str) -> bool:
        with self._db() as db:
            gone = db.execute(JOBS.delete().where(JOBS.c.id == job_id)).rowcount == 1
        try:
            self.remove_files(job_id)
        except OSError:  # the record is gone: sweep() takes what is left
            pass
        return gone

    def requeue(self, job_id: str) -> bool:
        """Back to the queue, as if never claimed (the graph was full, or its replica stopped
        gracefully: not the job's fault)."""
        with self._db() as db:
            return db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.state == PROCESSING).values(
                state=QUEUED, stage=QUEUED, worker=None, frames_done=0, started_at=None,
                attempts=JOBS.c.attempts - 1, updated_at=self.clock())).rowcount == 1

    def recover(self, stale_s: float, retries: int = 1) -> int:
        """Jobs whose runner went silent for `stale_s`: queued again once, then failed."""
        cutoff, now = self.clock() - stale_s, self.clock()
        stale = (JOBS.c.state == PROCESSING) & (JOBS.c.heartbeat_at < cutoff)
        with self._db() as db:
            again = db.execute(JOBS.update().where(stale, JOBS.c.attempts <= retries).values(
                state=QUEUED, stage=QUEUED, worker=None, frames_done=0, started_at=None, updated_at=now)).rowcount
            failed = db.execute(JOBS.update().where(stale).values(
                state=FAILED, stage=FAILED, finished_at=now, updated_at=now, webhook_next_at=_webhook_due(now),
                code="model_error",
                error="the replica running this job stopped, twice; submit it again")).rowcount
        return again + failed

    def expire(self, ttl_s: float) -> int:
        """Deletes jobs (and their files) created more than `ttl_s` ago."""
        with self._db() as db:
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


def _webhook_due(now: float):
    """An ended job's first webhook attempt: due now when it has a webhook."""
    return sa.case((JOBS.c.webhook_url.is_not(None), now), else_=sa.null())


def _add_new_columns(engine: sa.Engine) -> None:
    """Columns added since a store's table was made (nullable: its old rows have none), and their
    indexes."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(JOBS.name)}
    for column in (c for c in JOBS.columns if c.name not in have):
        with contextlib.suppress(sa.exc.DBAPIError), engine.begin() as db:  # another replica added it first
            db.execute(sa.text(f"ALTER TABLE {JOBS.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"))
    for index in JOBS.indexes:
        with contextlib.suppress(sa.exc.DBAPIError):
            index.create(engine, checkfirst=True)


def _sqlite_wal(connection, _record) -> None:
    connection.execute("PRAGMA journal_mode=WAL")


def _shown(db_url: str | None) -> str | None:
    """A database URL fit for a message: its password starred (it ends up in logs and status)."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(db_url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it to hide, and it says what is wrong
        return db_url
