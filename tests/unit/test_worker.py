"""The model-owner thread and its queues, driven by a small test double instead of SAM 3:
one job at a time, or several interleaved frame by frame."""

import threading
import time

import numpy as np
import pytest

from serve_app.errors import ModelError, ModelUnavailable, Overloaded, UnsupportedMedia
from serve_app.trackers.worker import DONE, Cancelled, Feed, ModelWorker, stream
from serve_app.media import FrameChunk


class EchoModel:
    """Test double for the SAM 3 model: records the thread it was built on, how many jobs run
    at once, and which jobs cleaned up (as Session.close does)."""

    def __init__(self):
        self.built_on = threading.current_thread()
        self.running = 0
        self.most_running = 0
        self.cleaned: list[str] = []


def echo_frames(model, job, name, delay=0.0, log=None):
    """What Sam3Tracker._run does, minus SAM 3: pull frames, emit one result per frame,
    yielding after each (a session the worker can interleave with others)."""
    model.running += 1
    model.most_running = max(model.most_running, model.running)
    try:
        while (chunk := job.pull()) is not None:
            for i, frame in enumerate(chunk.frames):
                time.sleep(delay)
                if log is not None:
                    log.append((name, chunk.start + i))
                job.emit((name, chunk.start + i, int(frame.mean()), threading.current_thread()))
                yield
            job.checkpoint()
        job.emit(DONE)
    finally:
        model.running -= 1
        model.cleaned.append(name)


def echo_job(name, delay=0.0):
    """A job that runs to its end when its turn comes (a plain function task)."""

    def run(model, job):
        for _ in echo_frames(model, job, name, delay):
            pass

    return run


def chunks(n, size=2, taken=None, fail_at=None):
    for start in range(0, n, size):
        if fail_at is not None and start >= fail_at:
            raise UnsupportedMedia("the decoder failed")
        if taken is not None:
            taken.append(start)
        count = min(size, n - start)
        yield FrameChunk(start, np.stack([np.full((4, 4, 3), start + i, np.uint8) for i in range(count)]))


@pytest.fixture
def worker():
    w = ModelWorker(EchoModel, max_pending=2)
    yield w
    w.stop()


def test_results_come_back_in_order_from_the_thread_that_built_the_model(worker):
    out = list(stream(worker, echo_job("a"), chunks(7)))
    assert [(r[1], r[2]) for r in out] == [(i, i) for i in range(7)]
    assert all(r[3] is worker.model.built_on for r in out)
    assert worker.model.built_on is not threading.current_thread()


def test_concurrent_requests_from_other_threads_run_one_at_a_time(worker):
    results = {}

    def request(name):
        results[name] = [r[1] for r in stream(worker, echo_job(name, delay=0.01), chunks(6))]

    threads = [threading.Thread(target=request, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": list(range(6)), "b": list(range(6))}
    assert worker.model.most_running == 1


def test_input_is_read_only_as_fast_as_the_model_pulls_plus_one_chunk(worker):
    taken = []
    results = stream(worker, echo_job("a"), chunks(10, taken=taken))
    next(results)
    assert taken == [0, 2]  # the chunk being worked on and one queued ahead
    rest = list(results)
    assert len(rest) == 9 and taken == [0, 2, 4, 6, 8]


def test_the_input_is_read_to_its_end_so_a_trailing_report_arrives(worker):
    finished = []

    def decoder():
        yield from chunks(4)
        finished.append(True)  # the decoder stage sends its StageReport here

    assert len(list(stream(worker, echo_job("a"), decoder()))) == 4
    assert finished == [True]


def test_closing_cancels_between_frames_and_returns_after_cleanup(worker):
    taken = []
    results = stream(worker, echo_job("a", delay=0.05), chunks(100, taken=taken))
    next(results)
    results.close()
    assert worker.model.cleaned == ["a"] and worker.model.running == 0
    assert len(taken) <= 3
    assert list(stream(worker, echo_job("b"), chunks(3)))  # the worker serves the next job


def test_a_job_cancelled_while_queued_never_runs(worker):
    job = Feed()
    assert job.cancel() is False  # not started: nothing to wait for
    task = worker.submit(echo_job("late"), job)
    assert job.finished.wait(5) and task.done.is_set()
    assert worker.model.cleaned == []


def test_a_full_queue_is_refused_and_the_worker_keeps_serving(worker):
    running, gate = threading.Event(), threading.Event()

    def occupy(model):  # holds the model thread until the gate opens
        running.set()
        gate.wait(5)

    worker.submit(occupy)
    assert running.wait(5)  # off the queue: max_pending more fit in it
    waiting = [worker.submit(lambda model: None) for _ in range(2)]  # max_pending=2 now waiting
    with pytest.raises(Overloaded, match="2 jobs are already waiting"):
        worker.submit(lambda model: None)
    gate.set()
    assert all(task.done.wait(5) for task in waiting)
    assert worker.call(lambda model: "served", timeout=5) == "served"


def test_a_model_failure_reaches_the_caller_as_a_model_error(worker):
    def broken(model, job):
        job.pull()
        raise RuntimeError("Input type (c10::BFloat16) and bias type (float) should be the same")

    with pytest.raises(ModelError, match="tracker failed: RuntimeError: Input type"):
        list(stream(worker, broken, chunks(3)))
    assert [r[1] for r in stream(worker, echo_job("b"), chunks(2))] == [0, 1]


def test_an_input_failure_reaches_the_caller_after_the_job_cleaned_up(worker):
    with pytest.raises(UnsupportedMedia):
        list(stream(worker, echo_job("a"), chunks(10, fail_at=4)))
    assert worker.model.cleaned == ["a"]


def test_a_failed_build_is_raised_by_the_constructor():
    def build():
        raise ModelUnavailable("no SAM 3 weights configured")

    with pytest.raises(ModelUnavailable, match="no SAM 3 weights"):
        ModelWorker(build)


def test_a_stopped_model_thread_fails_health_checks_and_requests():
    w = ModelWorker(EchoModel)
    w.check()
    w.stop()
    with pytest.raises(ModelUnavailable, match="model thread has stopped"):
        w.check()
    with pytest.raises(ModelUnavailable):
        list(stream(w, echo_job("a"), chunks(2)))


def test_pull_raises_cancelled_once_the_request_cancels():
    job = Feed()
    assert job.start()
    job.cancel()
    with pytest.raises(Cancelled):
        job.pull()


# -- several sessions on one model thread ---------------------------------------------------------
def stepped_job(name, log, delay=0.0, running=None):
    """echo_job as a session: a step per frame, so the worker can interleave it with others.
    `running` (an Event) is set once its first frame is out."""

    def session(model, job):
        for step in echo_frames(model, job, name, delay, log):
            if running is not None:
                running.set()
            yield step

    return session


def run_in_threads(worker, jobs, log):
    """{name: (delay per frame, frames)} run as concurrent requests, in this order: each one
    is sent once the one before it has a frame out. Returns {name: (frame indices, seconds)}."""
    out = {}

    def request(name, delay, n, running):
        start = time.perf_counter()
        frames = [r[1] for r in stream(worker, stepped_job(name, log, delay, running), chunks(n))]
        out[name] = (frames, time.perf_counter() - start)

    threads = []
    for name, (delay, n) in jobs.items():
        running = threading.Event()
        threads.append(threading.Thread(target=request, args=(name, delay, n, running)))
        threads[-1].start()
        if len(threads) < len(jobs):
            assert running.wait(5)
    for t in threads:
        t.join(10)
    return out


@pytest.fixture
def shared():
    w = ModelWorker(EchoModel, max_pending=4, max_sessions=3)
    yield w
    w.stop()


def test_sessions_take_turns_frame_by_frame_on_the_model_thread(shared):
    log = []
    out = run_in_threads(shared, {n: (0.005, 12) for n in ("a", "b", "c")}, log)
    assert {name: frames for name, (frames, _) in out.items()} == {n: list(range(12)) for n in "abc"}
    assert shared.model.most_running == 3 and shared.most_sessions == 3
    # Once all three run, none does two frames in a row while another has frames left.
    middle = [name for name, _ in log[len(log) // 4: len(log) // 2]]
    assert all(a != b for a, b in zip(middle, middle[1:])), middle


def test_a_short_job_is_not_stuck_behind_a_long_one(shared):
    log = []
    out = run_in_threads(shared, {"long": (0.01, 200), "short": (0.01, 10)}, log)
    assert out["short"][0] == list(range(10)) and out["long"][0] == list(range(200))
    assert out["short"][1] < out["long"][1] / 5  # about 20 frames' time against 210
    done_at = log.index(("short", 9))
    assert sum(1 for name, _ in log[:done_at] if name == "long") <= 15


def test_sessions_beyond_the_limit_wait_their_turn():
    w = ModelWorker(EchoModel, max_pending=4, max_sessions=2)
    try:
        log = []
        out = run_in_threads(w, {n: (0.005, 30) for n in "abc"}, log)
        assert all(frames == list(range(30)) for frames, _ in out.values())
        assert w.model.most_running == 2
    finally:
        w.stop()


def test_a_cancelled_session_is_closed_on_the_model_thread_and_the_others_go_on(shared):
    log = []
    other = {}
    b_running = threading.Event()

    def request():
        other["frames"] = [r[1] for r in stream(shared, stepped_job("b", log, 0.005, b_running), chunks(40))]

    thread = threading.Thread(target=request)
    results = stream(shared, stepped_job("a", log, delay=0.005), chunks(1000))
    next(results)
    thread.start()
    assert b_running.wait(5)  # the two sessions share the model thread
    results.close()  # returns once "a" cleaned up
    assert "a" in shared.model.cleaned
    thread.join(10)
    assert other["frames"] == list(range(40))
    assert sum(1 for name, _ in log if name == "a") < 100


def test_a_failing_session_fails_alone(shared):
    log = []

    def broken(model, job):
        job.pull()
        yield
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    other = {}

    def request():
        other["frames"] = [r[1] for r in stream(shared, stepped_job("b", log, delay=0.005), chunks(20))]

    thread = threading.Thread(target=request)
    thread.start()
    with pytest.raises(ModelError, match="tracker failed: RuntimeError: CUDA error"):
        list(stream(shared, broken, chunks(4)))
    thread.join(10)
    assert other["frames"] == list(range(20))


def test_a_session_waiting_for_its_decoder_does_not_hold_up_the_others(shared):
    log = []

    def slow_input(n):
        for chunk in chunks(n):
            time.sleep(0.1)  # a decoder far slower than the model
            yield chunk

    out = {}

    def request(name, source, running=None):
        start = time.perf_counter()
        job = stepped_job(name, log, running=running)
        out[name] = ([r[1] for r in stream(shared, job, source)], time.perf_counter() - start)

    slow_running = threading.Event()
    slow = threading.Thread(target=request, args=("slow", slow_input(20), slow_running))
    slow.start()
    assert slow_running.wait(5)  # its first frame is out: from here on it waits for its decoder
    fast = threading.Thread(target=request, args=("fast", chunks(200)))
    fast.start()
    fast.join(10)
    slow.join(10)
    assert out["fast"][0] == list(range(200)) and out["slow"][0] == list(range(20))
    assert out["fast"][1] < 0.5  # not paced by the slow decoder's 0.1 s a chunk (~1 s in all)


def test_frames_past_what_the_model_asked_for_are_an_error_not_dropped(worker):
    """The chunk read ahead for a model that wanted no more (it asks for the probe's count)."""

    def takes_four(model, job):
        taken = 0
        while taken < 4:
            chunk = job.pull()
            for i in range(len(chunk)):
                job.emit(("a", chunk.start + i))
            taken += len(chunk)
            yield
        job.emit(DONE)

    with pytest.raises(ModelError, match="the decoder sent frames from 4 on; the probe counted fewer"):
        list(stream(worker, takes_four, chunks(6)))
    assert [r[1] for r in stream(worker, takes_four, chunks(4))] == [0, 1, 2, 3]
