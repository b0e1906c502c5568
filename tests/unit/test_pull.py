"""The pull between tracker and decoder (serve_app/graph/pull.py), without Ray: the decoder's per-job
readers give the right chunk whatever order and replica the calls come in, are closed when done
or abandoned, and the tracker's end keeps only a few chunks in flight."""

import tempfile
import threading
import time

import numpy as np
import pytest

from serve_app.errors import UnsupportedMedia
from serve_app.graph.pull import OpenReaders, RemoteDecoder, decode_lead
from serve_app.video.decode import iter_chunks
from serve_app.video.probe import probe
from serve_app.graph.wire import VideoRef
from tests.videofactory import frame_index_of, make_video, truncate

CF = 4  # frames per chunk
N = 30  # frames: 8 chunks, the last of 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = make_video(tmp_path_factory.mktemp("pull") / "p.mp4", num_frames=N, options={"g": "8", "bf": "2"})
    info = probe(path)
    full = np.concatenate([c.frames for c in iter_chunks(path, info, CF)])
    return VideoRef(data=path.read_bytes()), info, full


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    """Where the readers spool videos: an open reader is a file here."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return lambda: sorted(spool.glob("*.mp4"))


def check(pulled, index, full):
    assert pulled.chunk.start == index * CF
    assert np.array_equal(pulled.chunk.frames, full[index * CF:(index + 1) * CF])


def test_in_order_calls_reuse_one_reader_and_it_closes_after_the_last_chunk(clip, spool_dir):
    video, info, full = clip
    readers = OpenReaders(CF)
    pulled = [readers.chunk(video, info, "job", i) for i in range(8)]
    for i, p in enumerate(pulled):
        check(p, i, full)
    assert [p.opened for p in pulled] == [True] + [False] * 7
    assert sum(p.wasted_frames for p in pulled) == 0
    assert len(pulled[-1].chunk) == 2
    assert readers.jobs() == [] and spool_dir() == []


def test_a_replica_without_the_reader_decodes_up_to_the_chunk_and_keeps_going(clip):
    video, info, full = clip
    readers = OpenReaders(CF)  # another replica served chunks 0-4
    first = readers.chunk(video, info, "job", 5)
    check(first, 5, full)
    assert first.opened and first.wasted_frames == 5 * CF
    after = readers.chunk(video, info, "job", 6)
    check(after, 6, full)
    assert not after.opened and after.wasted_frames == 0


def test_out_of_order_and_repeated_calls_are_still_right(clip):
    video, info, full = clip
    readers = OpenReaders(CF, max_stash=2)
    check(readers.chunk(video, info, "job", 0), 0, full)
    later = readers.chunk(video, info, "job", 2)  # prefetch calls crossed: 2 came before 1
    earlier = readers.chunk(video, info, "job", 1)
    check(later, 2, full), check(earlier, 1, full)
    assert not earlier.opened and later.wasted_frames == earlier.wasted_frames == 0
    again = readers.chunk(video, info, "job", 1)  # behind the reader: decoded on the side
    check(again, 1, full)
    assert again.opened
    nxt = readers.chunk(video, info, "job", 3)  # the reader stayed where it was
    check(nxt, 3, full)
    assert not nxt.opened


def test_a_gap_past_the_stash_skips_forward_and_counts_the_frames(clip):
    video, info, full = clip
    readers = OpenReaders(CF, max_stash=1)
    readers.chunk(video, info, "job", 0)
    far = readers.chunk(video, info, "job", 4)  # chunks 1-3 went to another replica
    check(far, 4, full)
    assert not far.opened and far.wasted_frames == 3 * CF


def test_idle_readers_are_closed_and_a_late_call_is_still_served(clip, spool_dir):
    video, info, full = clip
    now = [0.0]
    readers = OpenReaders(CF, idle_s=10, clock=lambda: now[0])
    readers.chunk(video, info, "gone", 0)
    readers.chunk(video, info, "alive", 0)
    now[0] = 8.0
    readers.chunk(video, info, "alive", 1)
    now[0] = 12.0
    readers.sweep()
    assert readers.jobs() == ["alive"] and len(spool_dir()) == 1
    late = readers.chunk(video, info, "gone", 1)  # its tracker came back after all
    check(late, 1, full)
    assert late.opened


def test_the_reaper_closes_readers_whose_tracker_vanished(clip, spool_dir):
    video, info, _ = clip
    readers = OpenReaders(CF, idle_s=0.2)
    readers.start_reaper(interval_s=0.05)
    try:
        readers.chunk(video, info, "job", 0)
        assert readers.jobs() == ["job"]
        deadline = time.monotonic() + 5
        while (readers.jobs() or spool_dir()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reaper drops the job, then closes its reader
        assert readers.jobs() == [] and spool_dir() == []
    finally:
        readers.shutdown()


def test_least_recently_used_reader_is_evicted_past_capacity(clip, spool_dir):
    video, info, full = clip
    readers = OpenReaders(CF, capacity=2)
    for job in ("a", "b", "c"):
        readers.chunk(video, info, job, 0)
    assert readers.jobs() == ["b", "c"] and len(spool_dir()) == 2
    back = readers.chunk(video, info, "a", 1)
    check(back, 1, full)
    assert back.opened and readers.jobs() == ["c", "a"]


def test_concurrent_calls_for_one_job_each_get_their_chunk(clip, spool_dir):
    video, info, full = clip
    readers = OpenReaders(CF, max_stash=3)
    got = {}

    def call(i):
        got[i] = readers.chunk(video, info, "job", i)

    for start in range(0, 8, 4):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(start, start + 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(8):
        check(got[i], i, full)
    assert readers.jobs() == [] and spool_dir() == []


def test_bad_calls_raise_and_keep_nothing(clip, tmp_path, spool_dir):
    video, info, _ = clip
    readers = OpenReaders(CF)
    with pytest.raises(ValueError, match="chunk 8 asked for; the video has 8"):
        readers.chunk(video, info, "job", 8)
    long = make_video(tmp_path / "long.mp4", width=128, height=96, num_frames=60, faststart=True)
    cut = VideoRef(data=truncate(long, tmp_path / "cut.mp4", keep=0.5).read_bytes())
    with pytest.raises(UnsupportedMedia):
        readers.chunk(cut, probe(long), "cut", 10)
    assert readers.jobs() == [] and spool_dir() == []


# -- the tracker's end ---------------------------------------------------------------------
class InProcessDecoders:
    """A test double for the Decoder deployment's handle: calls go to `replicas` OpenReaders
    in turn (no affinity at all), and are answered when the puller asks for the result."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = [OpenReaders(CF) for _ in range(replicas)]
        self.calls = 0
        self.in_flight = self.most_in_flight = 0
        self.closed: list[str] = []
        self.cancelled = 0

    def options(self, multiplexed_model_id=None):
        return self

    @property
    def chunk(self):
        return self

    @property
    def close_job(self):
        return _Call(lambda job_id: self.closed.append(job_id))

    def remote(self, video, info, job_id, index, chunk_frames, prompt_frame=0):
        replica = self.replicas[self.calls % len(self.replicas)]
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return _Response(self, lambda: replica.chunk(video, info, job_id, index, chunk_frames, prompt_frame))


class _Call:
    def __init__(self, fn):
        self.remote = fn


class _Response:
    def __init__(self, owner, fn):
        self.owner, self.fn = owner, fn

    def result(self):
        self.owner.in_flight -= 1
        return self.fn()

    def cancel(self):
        self.owner.in_flight -= 1
        self.owner.cancelled += 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_tracker_gets_every_frame_with_few_chunks_in_flight(clip, replicas):
    video, info, full = clip
    decoders = InProcessDecoders(replicas)
    frames = RemoteDecoder(decoders, CF, ahead=2).frames(video, info)
    chunks = list(frames)
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), full)
    assert [frame_index_of(f) for f in full] == list(range(N))
    assert decoders.most_in_flight <= 3 and decoders.calls == 8
    assert frames.timings.decode_ms > 0 and frames.timings.decode_lead_chunks <= 3
    assert frames.timings.decode_opens == replicas
    assert not decoders.closed


def test_a_tracker_that_stops_early_frees_the_reader_and_cancels_its_calls(clip):
    video, info, _ = clip
    decoders = InProcessDecoders()
    chunks = iter(RemoteDecoder(decoders, CF, ahead=2).frames(video, info))
    next(chunks), next(chunks)
    chunks.close()
    assert decoders.cancelled == 2 and decoders.in_flight == 0 and len(decoders.closed) == 1
    assert decoders.calls == 4  # chunk 0 alone, then up to 1 + 2 ahead


def test_decode_lead_counts_chunks_decoded_and_not_yet_taken():
    # a decoder that ran ahead: all four decoded before the tracker took the first
    assert decode_lead(decoded=[0, 0.1, 0.2, 0.3], taken=[1, 2, 3, 4]) == 4
    # pulled: each decoded just before it was taken
    assert decode_lead(decoded=[0.9, 1.9, 2.9, 3.9], taken=[1, 2, 3, 4]) == 1
    assert decode_lead(decoded=[], taken=[]) == 0


def test_a_reader_that_passed_chunks_asked_for_later_stays_open_until_they_are_served(clip, spool_dir):
    video, info, full = clip
    readers = OpenReaders(CF, max_stash=2)
    for i in range(6):
        readers.chunk(video, info, "job", i)
    last = readers.chunk(video, info, "job", 7)  # prefetch calls crossed at the end: 7 before 6
    assert readers.jobs() == ["job"]
    six = readers.chunk(video, info, "job", 6)
    check(last, 7, full), check(six, 6, full)
    assert not six.opened and readers.jobs() == [] and spool_dir() == []


def test_chunks_of_large_pictures_hold_fewer_frames():
    from fractions import Fraction

    from serve_app.media import VideoInfo
    from serve_app.media import CHUNK_BYTES, chunk_frames_for

    def info(width, height):
        return VideoInfo(width, height, 100, tuple(range(100)), Fraction(1, 25), Fraction(25))

    assert chunk_frames_for(info(1280, 720)) == 16
    assert chunk_frames_for(info(1920, 1080)) == 10
    assert chunk_frames_for(info(3840, 2160)) == 2
    assert chunk_frames_for(info(7680, 4320)) == 1  # never none
    for width, height in ((1920, 1080), (3840, 2160)):
        assert chunk_frames_for(info(width, height)) * width * height * 3 <= CHUNK_BYTES


@pytest.mark.parametrize("prompt_frame, replicas", [(13, 1), (13, 2), (N - 1, 1), (1, 2)])
def test_a_prompt_frame_is_pulled_forward_then_backward_every_frame_once(clip, prompt_frame, replicas):
    """What a prompt on a later frame asks of the decoder: the frames from it to the last, then
    from the one before it back to the first, each the full decode's very pixels, and the job's
    reader closed once its last backward chunk is served."""
    video, info, full = clip
    decoders = InProcessDecoders(replicas)
    frames = RemoteDecoder(decoders, CF, ahead=2).frames(video, info, prompt_frame)
    chunks = list(frames)
    order = [i for c in chunks for i in c.indices()]
    assert order == list(range(prompt_frame, N)) + list(range(prompt_frame - 1, -1, -1))
    for chunk in chunks:
        assert all(np.array_equal(f, full[i]) for f, i in zip(chunk.frames, chunk.indices()))
    assert decoders.most_in_flight <= 3 and not decoders.closed
    # The replica that served the last chunk closes the job's reader (another one's idles out).
    assert any(replica.jobs() == [] for replica in decoders.replicas)
