"""The body cap Serve's HTTP proxy runs (serve_app/api/proxy.py), as a plain ASGI middleware."""

import asyncio

from serve_app.api.proxy import BodyLimit


def run_capped(max_bytes: int, chunks: list[bytes], reads: int) -> tuple[list[bytes], bool]:
    """An app that calls receive() `reads` times behind the cap; returns what it got and
    whether its last read was held (did not return within 0.2 s)."""
    pending = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    pulled = []

    async def receive():
        message = pending.pop(0)
        pulled.append(message["body"])
        return message

    got, held = [], False

    async def app(scope, receive, send):
        nonlocal held
        for _ in range(reads):
            try:
                got.append((await asyncio.wait_for(receive(), 0.2))["body"])
            except asyncio.TimeoutError:
                held = True
                return

    asyncio.run(BodyLimit(app, max_bytes)({"type": "http"}, receive, None))
    assert pulled == got, "the cap must not read ahead of the app"
    return got, held


def test_a_body_within_the_cap_passes_whole():
    got, held = run_capped(12, [b"abcd"] * 3, reads=3)
    assert got == [b"abcd"] * 3 and not held


def test_reading_stops_once_the_cap_is_passed():
    # The app sees the chunk that crosses the cap (so the ingress can answer 413), then the
    # proxy reads no more: the client's own socket holds the rest.
    got, held = run_capped(10, [b"abcd"] * 6, reads=6)
    assert got == [b"abcd"] * 3 and held


def test_a_body_declared_over_the_cap_is_refused_without_reading_it():
    # uvicorn answers `Expect: 100-continue` on the first receive(): none may happen.
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"", "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not see a body over the cap")

    headers = [(b"content-length", str(200 << 20).encode()), (b"expect", b"100-continue")]
    asyncio.run(BodyLimit(app, (100 << 20) + (64 << 10))({"type": "http", "headers": headers}, receive, send))
    assert sent[0]["status"] == 413 and not reads
    assert b"upload is 200 MB; the limit is 100 MB" in sent[1]["body"] and b"upload_too_large" in sent[1]["body"]


def test_only_a_short_plain_request_id_is_passed_on():
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))

    for given in (b"trace-1234", b"x" * 8192, b"a b<script>"):
        asyncio.run(BodyLimit(app)({"type": "http", "headers": [(b"x-request-id", given)]}, None, None))
    assert seen == [b"trace-1234", None, None]


# -- downloads pulled a chunk at a time ----------------------------------------------------------
def ranged_file_app(data: bytes, log: list):
    """A small real ASGI app answering Range requests on one file as the ingress does (206 and
    Content-Range; 416 past the end; 404 elsewhere), logging each request's range."""

    async def app(scope, receive, send):
        import re

        asked = dict(scope["headers"]).get(b"range", b"").decode()
        log.append(asked)
        if not scope["path"].endswith("/output/output.mp4"):
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": b'{"code": "not_found"}'})
        first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", asked).groups())
        if first >= len(data):
            await send({"type": "http.response.start", "status": 416, "headers": []})
            return await send({"type": "http.response.body", "body": b""})
        last = min(last, len(data) - 1)
        headers = [(b"content-range", f"bytes {first}-{last}/{len(data)}".encode()), (b"x-content-type-options", b"nosniff")]
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        await send({"type": "http.response.body", "body": data[first:last + 1]})

    return app


def pull(data: bytes, path: str = "/v2/job/async/j/output/output.mp4", asked: bytes = b""):
    """(status, headers, body, the ranges the app was asked for, the most bytes the middleware
    held that the client had not taken yet) of one GET through PulledDownloads."""
    from serve_app.api.proxy import PulledDownloads

    log, sent, state = [], [], {"asked_after_send": True, "start": None}

    async def receive():
        await asyncio.Event().wait()  # the client never hangs up

    async def send(message):
        if message["type"] == "http.response.start":
            state["start"] = message
        else:
            sent.append(message.get("body", b""))
            log.append(f"sent {len(sent[-1])}")
        await asyncio.sleep(0)  # a client reading at its own pace

    headers = [(b"range", asked)] if asked else []
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
    asyncio.run(PulledDownloads(ranged_file_app(data, log))(scope, receive, send))
    return state["start"]["status"], dict(state["start"]["headers"]), b"".join(sent), log, max(map(len, sent))


def asks(log: list) -> list:
    return [entry for entry in log if entry.startswith("bytes")]


def test_a_download_is_pulled_in_chunks_each_after_the_client_took_the_last():
    from serve_app.api.proxy import CHUNK

    data = bytes(range(256)) * (CHUNK * 5 // 256 + 7)  # five chunks and a bit
    status, headers, body, ranges, most = pull(data)
    assert status == 200 and body == data and headers[b"content-length"] == str(len(data)).encode()
    assert b"content-range" not in headers and headers[b"x-content-type-options"] == b"nosniff"
    starts = range(0, len(data), CHUNK)
    assert asks(ranges) == [f"bytes={i}-{i + CHUNK - 1 if i == 0 else min(i + CHUNK, len(data)) - 1}" for i in starts]
    # each chunk is asked for only once the client has taken the one before: one chunk in hand
    assert ranges == [entry for i in starts for entry in (ranges[2 * (i // CHUNK)], f"sent {min(CHUNK, len(data) - i)}")]
    assert most <= CHUNK


def test_a_range_from_a_byte_is_pulled_too_and_other_answers_pass_as_they_are():
    from serve_app.api.proxy import CHUNK

    data = b"x" * (3 * CHUNK)
    status, headers, body, _, _ = pull(data, asked=b"bytes=100-" + str(2 * CHUNK).encode())
    assert status == 206 and body == data[100:2 * CHUNK + 1]
    assert headers[b"content-range"] == f"bytes 100-{2 * CHUNK}/{len(data)}".encode()
    assert pull(data, asked=f"bytes={len(data)}-".encode())[0] == 416
    assert pull(data, path="/v2/job/async/j/output/other.mp4")[:3] == (404, {b"content-type": b"application/json"},
                                                                        b'{"code": "not_found"}')
