"""Reading uploads (serve_app/api/upload.py) from hostile bodies, without HTTP: every refusal
is the client's error naming the problem, and no temporary file outlives a request."""

import asyncio
import tempfile
from pathlib import Path

import pytest

from serve_app.api.upload import Pace, read_multipart, read_raw
from serve_app.errors import InvalidJob, UploadTimeout, UploadTooLarge


async def body(chunks, gap_s=0.0):
    for i, chunk in enumerate(chunks):
        if i and gap_s:
            await asyncio.sleep(gap_s)
        yield chunk


def spooled() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sam3-video-*"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = spooled()
    yield
    assert spooled() <= before


def multipart(job: bytes, video: bytes = b"\0" * 100, boundary: str = "b0undary", headers: str = "") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"job\"\r\n{headers}\r\n".encode() + job
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"input\"\r\n\r\n".encode() + video
            + f"\r\n--{boundary}--\r\n".encode())


def read(data: bytes, boundary: str = "b0undary", limit: int = 1 << 20):
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    return asyncio.run(read_multipart(body(chunks), f"multipart/form-data; boundary={boundary}", limit))


def test_a_good_body_is_spooled_and_handed_over():
    upload = read(multipart(b'{"config": {"prompt": "fish"}}', b"video bytes"))
    try:
        assert Path(upload.path).read_bytes() == b"video bytes" and upload.job == {"config": {"prompt": "fish"}}
    finally:
        Path(upload.path).unlink()


@pytest.mark.parametrize("data, boundary, words", [
    (multipart(b"{}", boundary="other"), "b0undary", "not valid multipart"),
    (multipart(b"{}", boundary="b" * 300), "b" * 300, "boundary is 300 characters; the limit is 70"),
    (multipart(b"{}", headers="X-Pad: " + "p" * 5000 + "\r\n"), "b0undary", "[Hh]eader"),
    (b"".join(multipart(b"{}").split(b"--b0undary--")[:1]) + b"".join(
        b"--b0undary\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n" for _ in range(10)) + b"--b0undary--\r\n",
     "b0undary", "more than 8 parts"),
    (multipart(b"[" * 30_000 + b"]" * 30_000), "b0undary", "nested too deeply"),
    (multipart(b"{not json"), "b0undary", "not valid JSON"),
    (multipart(b"{}").replace(b'name="input"', b'name="other"'), "b0undary", "no 'input' part"),
])
def test_malformed_bodies_are_the_clients_error(data, boundary, words):
    with pytest.raises(InvalidJob, match=words):
        read(data, boundary)


def test_a_video_over_the_limit_stops_the_reading():
    with pytest.raises(UploadTooLarge, match="over the limit of 1 KB"):
        read(multipart(b"{}", b"\0" * 5000), limit=1024)


def test_a_stalled_body_is_dropped():
    stalled = body([b"x" * 100, b"y"], gap_s=0.5)
    with pytest.raises(UploadTimeout, match="stalled: no data for 0.2 s after 100 bytes"):
        asyncio.run(read_raw(stalled, 1 << 20, Pace(idle_s=0.2, min_bytes_per_s=0)))


def test_a_trickling_body_is_dropped_once_below_the_minimum_rate():
    trickle = body([b"x"] * 40, gap_s=0.02)  # 50 bytes a second, never idle for 0.2 s
    with pytest.raises(UploadTimeout, match="arrives at .* the minimum is 1 KB/s"):
        asyncio.run(read_raw(trickle, 1 << 20, Pace(idle_s=0.2, min_bytes_per_s=1024)))


def test_a_body_arriving_at_pace_is_read():
    steady = body([b"x" * 1000] * 20, gap_s=0.01)
    upload = asyncio.run(read_raw(steady, 1 << 20, Pace(idle_s=0.2, min_bytes_per_s=1024)))
    assert Path(upload.path).stat().st_size == 20_000
    Path(upload.path).unlink()
