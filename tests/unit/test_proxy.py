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
