"""The threads that let decode, track and encode overlap in one process."""

import threading
import time

import pytest

from serve_app.video.threads import ReadAhead, WriteBehind


def test_read_ahead_yields_everything_in_order():
    assert list(ReadAhead(iter(range(100)), depth=3)) == list(range(100))


def test_read_ahead_stays_within_its_depth():
    produced = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    items = iter(ReadAhead(source(), depth=2))
    assert next(items) == 0
    time.sleep(0.3)
    # One taken, two queued, one more made and waiting for room: memory does not run ahead.
    assert len(produced) <= 4
    items.close()


def test_read_ahead_raises_the_producers_error_where_it_happened():
    def source():
        yield 1
        yield 2
        raise ValueError("frame 2 is damaged")

    got = []
    with pytest.raises(ValueError, match="frame 2 is damaged"):
        for item in ReadAhead(source()):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_closes_the_source_in_its_thread():
    closed = threading.Event()

    def source():
        try:
            for i in range(10**6):
                yield i
        finally:
            closed.set()

    reader = ReadAhead(source(), depth=2)
    for item in reader:
        if item == 5:
            break
    reader.close()
    assert closed.is_set()
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())


def test_write_behind_consumes_in_order_and_close_waits_for_all():
    seen = []
    sink = WriteBehind(lambda x: (time.sleep(0.001), seen.append(x)), depth=2)
    for i in range(50):
        sink.put(i)
    sink.close()
    assert seen == list(range(50))


def test_write_behind_blocks_a_fast_producer():
    release = threading.Event()
    sink = WriteBehind(lambda x: release.wait(), depth=2)
    sink.put(0)  # taken by the consumer, which then waits
    sink.put(1)
    sink.put(2)  # the queue is full now
    blocked = threading.Thread(target=sink.put, args=(3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()
    release.set()
    blocked.join(5)
    sink.close()


def test_write_behind_reports_the_consumers_failure():
    def consume(x):
        if x == 3:
            raise OSError("disk full")

    sink = WriteBehind(consume, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            sink.put(i)
    with pytest.raises(OSError, match="disk full"):
        sink.close()
    sink.close(raise_failure=False)  # idempotent, and quiet when asked
