"""Webhooks of async jobs (serve_app/jobs/webhooks.py), without Ray: real jobs run in this process
by a small JobHost (the pipeline and the stand-in tracker), real receivers on loopback. A job's
end is POSTed signed so that README's snippet verifies it, a 500 is tried again within 10 s, the
attempts are in the store (a new runner on the same store carries on), redirects are not
followed, a silent receiver costs its timeout, and only allowed hosts are ever sent to."""

import asyncio
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest

from serve_app.api.answers import async_job_json
from serve_app.contract import JobConfig, Limits
from serve_app.errors import InvalidJob
from serve_app.graph.wire import SegmentResult
from serve_app.jobs.service import AsyncJobs
from serve_app.jobs.store import JobStore
from serve_app.jobs.webhooks import HostGuard, Post, WebhookSettings, sign
from serve_app.metrics import StageMetrics
from serve_app.synthetic import write_clip

README = Path(__file__).resolve().parents[2] / "README.md"
SECRET = "test-webhook-secret"


class Receiver:
    """A real HTTP server on 127.0.0.1 answering POSTs with the scripted statuses in turn (the
    last one from then on); records each request's path, headers and body. A `drip` receiver
    sends its status line, then a header one byte every 0.3 s for 30 s: never silent long enough
    for a socket timeout, never done."""

    def __init__(self, *statuses: int, location: str = "", drip: bool = False) -> None:
        self.statuses, self.seen, receiver = list(statuses) or [200], [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.seen.append((self.path, self.headers, body))
                if drip:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    for _ in range(100):
                        self.wfile.write(b"a")
                        self.wfile.flush()
                        time.sleep(0.3)
                    return
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?from=sam3"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(*statuses, **kwargs) -> Receiver:
        made.append(Receiver(*statuses, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class LocalHost:
    """A JobHost that runs each job in this process: the whole pipeline with the stand-in tracker."""

    def __init__(self) -> None:
        from serve_app.api.ingress import Slots

        self.jobs, self.metrics = Slots(2, "jobs running", 1), StageMetrics()

    async def probe(self, path):
        from serve_app.video.probe import probe

        return await asyncio.to_thread(probe, path, Limits())

    async def run(self, path, config, *, info=None, on_progress=None):
        from serve_app.pipeline import run_local
        from serve_app.spool import spool_dir
        from serve_app.trackers.fake import ColorShapeTracker, FakeConfig

        def work():
            with spool_dir() as folder:
                out = Path(folder) / "out.mp4"
                timings = run_local(path, out, config, ColorShapeTracker(FakeConfig()))
                return SegmentResult(out.read_bytes(), timings, info.num_frames if info else 0)

        return await asyncio.to_thread(work)

    def finished(self, job_id, status, result, exc=None):
        pass


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path, 96, 64, 6, 25)
    return str(path)


def jobs_on(store, max_attempts=8, timeout_s=5.0, hosts=("127.0.0.1",)) -> AsyncJobs:
    return AsyncJobs(store, LocalHost(), webhooks=WebhookSettings(hosts, SECRET, max_attempts, timeout_s),
                     render=async_job_json)


async def until(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


def readme_receiver(monkeypatch):
    """README's verification snippet, run as written."""
    code = README.read_text().split("## Webhooks", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("SAM3_VIDEO_WEBHOOK_SECRET", SECRET)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["receive"]


def test_a_processed_job_is_posted_signed_and_readmes_snippet_verifies_it(tmp_path, clip, receivers, monkeypatch):
    receiver, store = receivers(200), JobStore(str(tmp_path / "jobs"))

    async def scenario():
        jobs = jobs_on(store)
        jobs.start()
        try:
            row = await jobs.enqueue(clip, JobConfig(prompt="red"), webhook=receiver.url)
            assert async_job_json(row)["webhook"] == {"attempts": 0, "last_status": None, "state": "waiting"}
            await until(lambda: receiver.seen)
            return row.id, await until(lambda: (r := store.get(row.id)).webhook_status and r)
        finally:
            await jobs.stop()

    job_id, row = asyncio.run(scenario())
    path, headers, body = receiver.seen[0]
    assert path == "/hook?from=sam3" and headers["Content-Type"] == "application/json"
    assert headers["X-Sam3-Signature"] == sign(body, SECRET) and headers["X-Sam3-Job-Id"] == job_id
    job = json.loads(body)
    assert (job["id"], job["state"]["current"], job["progress"]["frames_done"]) == (job_id, "processed", 6)
    assert job["delivery"] == {"attempt": 1, "timestamp": int(headers["X-Sam3-Timestamp"])}
    receive = readme_receiver(monkeypatch)
    assert receive(body, headers)["id"] == job_id
    assert receive(body, headers) is None  # delivered twice: the snippet drops the repeat
    with pytest.raises(PermissionError, match="not signed"):
        receive(body.replace(b"processed", b"PROCESSED"), headers)
    assert async_job_json(row)["webhook"] == {"attempts": 1, "last_status": 200, "state": "delivered"}
    assert len(receiver.seen) == 1


def test_a_500_is_tried_again_within_10_s_and_a_new_runner_on_the_store_carries_on(tmp_path, clip, receivers):
    receiver, clock = receivers(500, 200), Clock()
    store = JobStore(str(tmp_path / "jobs"), clock=clock)

    async def first_runner():
        jobs = jobs_on(store)
        jobs.start()
        try:
            row = await jobs.enqueue(clip, JobConfig(prompt="red"), webhook=receiver.url)
            return await until(lambda: (r := store.get(row.id)).webhook_attempts and r)
        finally:
            await jobs.stop()  # a restart: the retry is in the store, not in this runner

    row = asyncio.run(first_runner())
    assert async_job_json(row)["webhook"] == {"attempts": 1, "last_status": 500, "state": "pending",
                                              "error": "the receiver answered 500"}
    assert 0 < row.webhook_next_at - clock.now <= 10  # the first retry within 10 s
    assert store.due_webhooks(10) == []

    async def second_runner():
        jobs = jobs_on(JobStore(str(tmp_path / "jobs"), clock=clock))
        jobs.start()
        try:
            clock.now += 10
            return await until(lambda: (r := store.get(row.id)).webhook_attempts == 2 and r)
        finally:
            await jobs.stop()

    again = asyncio.run(second_runner())
    assert async_job_json(again)["webhook"] == {"attempts": 2, "last_status": 200, "state": "delivered"}
    assert [h["X-Sam3-Attempt"] for _, h, _ in receiver.seen] == ["1", "2"]
    assert {h["X-Sam3-Job-Id"] for _, h, _ in receiver.seen} == {row.id}


def test_a_receiver_that_keeps_failing_is_given_up_after_max_attempts(tmp_path, clip, receivers):
    receiver, clock = receivers(503), Clock()
    store = JobStore(str(tmp_path / "jobs"), clock=clock)

    async def scenario():
        jobs = jobs_on(store, max_attempts=3)
        jobs.start()
        try:
            row = await jobs.enqueue(clip, JobConfig(prompt="red"), webhook=receiver.url)
            for n in (1, 2, 3):
                await until(lambda: store.get(row.id).webhook_attempts == n)
                clock.now += 3600
            await asyncio.sleep(1.5)  # ticks enough for a fourth attempt, were one due
            return store.get(row.id)
        finally:
            await jobs.stop()

    row = asyncio.run(scenario())
    assert len(receiver.seen) == 3 and row.webhook_next_at is None
    assert async_job_json(row)["webhook"]["state"] == "failed"


def test_a_redirect_is_not_followed(receivers):
    elsewhere = receivers(200)
    redirecting = receivers(302, location=elsewhere.url)
    attempt = Post(redirecting.url, b"{}", {}, HostGuard(["127.0.0.1"]), 5).run()
    assert (attempt.status, attempt.delivered) == (302, False) and "not followed" in attempt.error
    assert elsewhere.seen == [] and len(redirecting.seen) == 1


def test_a_receiver_that_drips_its_answer_costs_the_timeout_and_holds_nothing(tmp_path, clip, receivers):
    silent, clock = receivers(drip=True), Clock()
    store = JobStore(str(tmp_path / "jobs"), clock=clock)

    async def scenario():
        jobs = jobs_on(store, timeout_s=1.0)
        jobs.start()
        try:
            row = await jobs.enqueue(clip, JobConfig(prompt="red"), webhook=silent.url)
            await until(lambda: silent.seen)
            started = time.monotonic()
            other = await jobs.enqueue(clip, JobConfig(prompt="blue"))  # the runner goes on meanwhile
            await until(lambda: store.get(other.id).state == "processed")
            done = await until(lambda: (r := store.get(row.id)).webhook_attempts and r)
            return done, time.monotonic() - started
        finally:
            await jobs.stop()

    row, seconds = asyncio.run(scenario())
    assert row.webhook_error == "no answer within 1 s" and row.webhook_status is None
    assert seconds < 4  # cut off at its timeout, not after the receiver's 30 s


@pytest.mark.parametrize("url, words", [
    ("ftp://127.0.0.1/x", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("http://evil.example/x", "'evil.example' is not allowed; this service sends webhooks to hooks.example.com, "
                              "127.0.0.1"),
    ("http://127.0.0.2/x", "'127.0.0.2' is not allowed"),
    ("http://user:pw@127.0.0.1/x", "user name or password"),
    ("http://127.0.0.1:99999/x", "is not a URL"),
    ("http:///x", "has no host"),
    ("http://127.0.0.1/x\r\nX-Injected: 1", "contains a space or a control character"),
    ("http://127.0.0.1/" + "x" * 3000, "3017 characters; the limit is 2048"),
])
def test_the_guard_refuses_what_the_operator_did_not_allow(url, words):
    guard = HostGuard(["Hooks.Example.com.", "127.0.0.1"])
    with pytest.raises(InvalidJob, match=re.escape(words)):
        guard.check(url)


def test_the_guard_allows_listed_hosts_however_written_and_refuses_all_when_none_are():
    guard = HostGuard(["hooks.example.com", "::1", "127.0.0.1"])
    for url in ("https://HOOKS.example.com./x", "http://[::1]:8080/", "http://127.0.0.1:1/a?b=c"):
        guard.check(url)
    with pytest.raises(InvalidJob, match=r"allows no hosts \(app arg webhook_hosts\)"):
        HostGuard([]).check("http://127.0.0.1/")


def test_a_listed_name_is_refused_at_delivery_when_it_resolves_to_a_private_address(receivers):
    receiver = receivers(200)
    url = f"http://localhost:{receiver.port}/hook"
    by_name = HostGuard(["localhost"])
    by_name.check(url)  # allowed at submission: the name is listed
    attempt = Post(url, b"{}", {}, by_name, 5).run()
    assert attempt.final and not attempt.delivered and receiver.seen == []
    assert "resolves to" in attempt.error and "127.0.0.1" in attempt.error and "not a public address" in attempt.error
    assert Post(url, b"{}", {}, HostGuard(["localhost", "127.0.0.1"]), 5).run().delivered  # its address listed too
    assert len(receiver.seen) == 1 and receiver.seen[0][1]["Host"] == f"localhost:{receiver.port}"


def test_a_host_taken_off_the_list_gets_nothing_more():
    attempt = Post("http://127.0.0.1:9/x", b"{}", {}, HostGuard(["10.1.2.3"]), 5).run()
    assert attempt.final and "127.0.0.1 is no longer in webhook_hosts" in attempt.error


async def post(app, path: str, parts: list[tuple[str, str, bytes]], read: list) -> tuple[int, dict]:
    """A multipart POST through the ASGI app; `read` records each body chunk the app asked for."""
    boundary = "b0undary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{f}"\r\n\r\n'.encode()
                    + data + b"\r\n" for n, f, data in parts) + f"--{boundary}--\r\n".encode()
    path, _, query = path.partition("?")
    start, chunks = {}, []

    async def receive():
        read.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message.get("body"):
            chunks.append(message["body"])

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                         (b"content-length", str(len(body)).encode())],
             "root_path": "", "scheme": "http", "server": ("test", 80), "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    return start["status"], json.loads(b"".join(chunks))


def test_submission_refuses_a_host_not_allowed_before_the_201_and_takes_an_allowed_one(tmp_path, clip):
    from serve_app.api.ingress import SegmentService, Slots
    from serve_app.api.routes import make_app
    from serve_app.api.upload import Pace

    store = JobStore(str(tmp_path / "jobs"))
    service = SegmentService(None, Limits(), set(), Slots(1, "jobs running", 1), Slots(4, "uploads arriving", 1),
                             Slots(1, "downloads", 1), Pace(), 60.0)
    app = make_app(service, AsyncJobs(store, service, webhooks=WebhookSettings(("127.0.0.1",), SECRET),
                                      render=async_job_json))
    video = Path(clip).read_bytes()
    job = json.dumps({"config": {"prompt": "red"}}).encode()
    parts = [("job", "job.json", job), ("input", "input.mp4", video)]

    read: list = []
    status, answer = asyncio.run(post(app, "/v2/job/async?webhook=http://169.254.169.254/latest", parts, read))
    assert status == 400 and "'169.254.169.254' is not allowed" in answer["error"] and answer["code"] == "invalid_job"
    assert read == []  # refused before a byte of the upload
    status, answer = asyncio.run(post(app, "/v2/job/async", [*parts, ("webhook", "", b"https://evil.example/")], []))
    assert status == 400 and "'evil.example' is not allowed" in answer["error"]
    status, answer = asyncio.run(post(app, "/v2/job/async?webhook=http://127.0.0.1/a&webhook=http://127.0.0.1/b",
                                      parts, []))
    assert status == 400 and "more than once" in answer["error"]
    with store.engine.begin() as db:  # none of them became a job
        assert db.exec_driver_sql("SELECT count(*) FROM sam3_video_jobs").scalar() == 0
    status, answer = asyncio.run(post(app, "/v2/job/async", [*parts, ("webhook", "", b"http://127.0.0.1:8/hook")], []))
    assert status == 201 and answer["webhook"] == {"attempts": 0, "last_status": None, "state": "waiting"}
    assert store.get(answer["id"]).webhook_url == "http://127.0.0.1:8/hook"


def test_a_store_made_before_webhooks_gets_their_columns_and_keeps_its_jobs(tmp_path):
    old = JobStore(str(tmp_path / "jobs"))
    row = old.create({"prompt": "fish"}, frames=1)
    with old.engine.begin() as db:  # the table as it was before webhooks
        db.exec_driver_sql("DROP INDEX ix_sam3_video_jobs_webhook_next_at")
        for column in ("webhook_url", "webhook_attempts", "webhook_status", "webhook_error", "webhook_next_at"):
            db.exec_driver_sql(f"ALTER TABLE sam3_video_jobs DROP COLUMN {column}")
    old.engine.dispose()
    store = JobStore(str(tmp_path / "jobs"))
    again = store.get(row.id)
    assert (again.webhook_url, again.webhook_attempts) == (None, 0) and "webhook" not in async_job_json(again)
    import sqlalchemy as sa

    assert "ix_sam3_video_jobs_webhook_next_at" in {i["name"] for i in sa.inspect(store.engine).get_indexes("sam3_video_jobs")}
    assert store.claim("w") and store.finish(row.id, [], 1) and store.due_webhooks(5) == []  # no webhook: none due



@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    clock = Clock()
    if request.param == "sqlite":
        return JobStore(str(tmp_path / "jobs"), clock=clock)
    store = JobStore(str(tmp_path / "jobs"), request.getfixturevalue("postgres_url"), clock=clock)
    with store.engine.begin() as db:  # one server for the session: each test starts empty
        db.exec_driver_sql("DELETE FROM sam3_video_jobs")
    return store


def test_an_ended_jobs_attempt_is_claimed_by_one_runner_and_due_again_when_recorded_so(any_store):
    store, clock = any_store, any_store.clock
    quiet = store.create({"prompt": "fish"}, frames=1)  # no webhook: never due
    row = store.create({"prompt": "fish"}, frames=1, webhook="http://127.0.0.1/hook")
    store.claim("w"), store.claim("w")
    assert store.due_webhooks(5) == []  # running: nothing to tell yet
    store.finish(quiet.id, [], 1)
    store.fail(row.id, "the tracker failed", "model_error")
    due = store.due_webhooks(5)
    assert [d.id for d in due] == [row.id]
    assert store.claim_webhook(row.id, due[0].webhook_next_at, 60)
    assert not store.claim_webhook(row.id, due[0].webhook_next_at, 60)  # another runner: already taken
    assert store.due_webhooks(5) == []
    clock.now += 61  # the runner that claimed it died: due again
    assert [d.id for d in store.due_webhooks(5)] == [row.id]
    store.webhook_attempted(row.id, 1, 500, "the receiver answered 500", clock.now + 5)
    assert store.due_webhooks(5) == []
    clock.now += 5
    again = store.due_webhooks(5)[0]
    assert (again.webhook_attempts, again.webhook_status, again.webhook_error) == (1, 500, "the receiver answered 500")
