"""An async job's file through the ingress's own routes (the ASGI app, no Ray): sent in chunks,
Range requests answered, and downloads past the replica's cap refused with 429."""

import asyncio
import json

from serve_app.api.ingress import SegmentService, Slots
from serve_app.api.routes import make_app
from serve_app.api.upload import Pace
from serve_app.contract import Limits
from serve_app.jobs.service import AsyncJobs
from serve_app.jobs.store import JobStore


def app_with_a_file(tmp_path, data: bytes, downloads: int = 1):
    store = JobStore(str(tmp_path / "jobs"))
    row = store.create({"prompt": "fish"}, frames=1)
    store.claim("w")
    store.put_bytes(row.id, "output.mp4", data)
    store.finish(row.id, ["output.mp4"], 1)
    service = SegmentService(None, Limits(), set(), Slots(1, "jobs running", 1), Slots(4, "uploads arriving", 1),
                             Slots(downloads, "downloads", 1), Pace(), 60.0)
    return make_app(service, AsyncJobs(store, service)), f"/v2/job/async/{row.id}/output/output.mp4"


async def get(app, path: str, headers=(), hold: asyncio.Event | None = None) -> tuple[int, dict, bytes, int]:
    """(status, headers, body, body messages) of a GET; with `hold`, the client takes no body
    until it is set."""
    start, parts, asked = {}, [], []

    async def receive():  # the empty body, then a client that stays
        if not asked:
            asked.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message.get("body"):
            parts.append(message["body"])
            if hold is not None:
                await hold.wait()

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers], "root_path": "", "scheme": "http",
             "server": ("test", 80), "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(parts), len(parts)


def test_a_file_is_sent_in_chunks_and_ranges_are_answered(tmp_path):
    from serve_app.api.async_jobs import CHUNK

    data = bytes(range(256)) * (CHUNK * 3 // 256 + 5)
    app, path = app_with_a_file(tmp_path, data)
    status, headers, body, messages = asyncio.run(get(app, path))
    assert (status, body, headers["content-length"]) == (200, data, str(len(data)))
    assert messages == 4  # three whole chunks and the rest: never the file in one piece
    status, headers, body, _ = asyncio.run(get(app, path, [("range", "bytes=10-19")]))
    assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")


def test_downloads_past_the_cap_are_429_until_one_ends(tmp_path):
    app, path = app_with_a_file(tmp_path, b"x" * (3 << 20), downloads=1)

    async def scenario():
        hold = asyncio.Event()
        first = asyncio.create_task(get(app, path, hold=hold))  # takes the one download slot
        while not app.state.service.downloads.used:  # the first is sending
            await asyncio.sleep(0.01)
        refused = await get(app, path)
        hold.set()
        return await first, refused, await get(app, path)

    first, refused, after = asyncio.run(scenario())
    assert first[0] == 200 and len(first[2]) == 3 << 20
    assert refused[0] == 429 and refused[1]["retry-after"] == "1"
    assert "1 downloads, the most it takes" in json.loads(refused[2])["error"]
    assert after[0] == 200 and app.state.service.downloads.used == 0
