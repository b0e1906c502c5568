"""Judge an MP4/MOV's declared sample tables before any demuxer opens it.

FFmpeg's mov demuxer sizes its index from the counts the sample tables declare while it opens the
file: a 2 KB moov can claim tens of millions of samples and cost gigabytes in every process that
opens it. `scan` reads box headers and the fixed fields of the tables, seeking past the rest.
What is not ISO-BMFF passes through for the demuxer open to refuse with its own message.
"""

from __future__ import annotations

import os
import struct

from serve_app.errors import UnsupportedMedia, VideoLimitExceeded

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"mvex", b"moof", b"traf",
              b"mfra"}
MAX_DEPTH = 10  # FFmpeg refuses atoms nested deeper too
# Bounds the walk's time on a flood of empty boxes; a file fragmented at every packet, with the
# frame limit's worth of video and its audio, stays well below.
MAX_BOXES = 1_000_000
# Tables of version/flags, entry_count, then entries of this many bytes.
FIXED = {b"stts": 8, b"ctts": 8, b"stsc": 12, b"stco": 4, b"co64": 8, b"stss": 4, b"stps": 4}
# Where the field read (entry_count; hdlr's type, tkhd's and tfhd's track_ID) sits in a payload.
AT = {**dict.fromkeys(FIXED, 4), b"elst": 4, b"trun": 4, b"tfhd": 4, b"stsz": 8, b"stz2": 8,
      b"sbgp": 8, b"hdlr": 8, b"tkhd": 12, b"tfra": 12}
# FFmpeg reads tables inside any box it parses as a container (udta, tref, dinf, a sample
# description...) and gives them to the last track, so the other boxes' payloads are searched for
# them; FFmpeg never looks inside these.
HIDDEN = (b"stsz", b"stz2", b"stts", b"ctts", b"stsc", b"stco", b"co64", b"stss", b"stps", b"elst",
          b"sbgp", b"trun")
OPAQUE = {b"mdat", b"free", b"skip", b"mfhd", b"tfdt"}
MAX_STRAYS = 1000  # table names with no plausible box around them: by chance a legit file has none
CHUNK = 8192  # table entries read at a time: memory stays flat whatever a table's size
# FFmpeg indexes uncompressed audio in runs of 1024 samples, or of the description's
# samples_per_frame when that is >= 160: runs of 160 bound both without parsing the description.
PCM_RUN = 160


def _malformed(what: str) -> UnsupportedMedia:
    return UnsupportedMedia(f"not a readable MP4 video ({what})")


def _entries(kind: bytes, head: bytes, at: int) -> tuple[int, float]:
    """(offset of the first entry, bytes per entry) of a table whose entry_count ends at `at`."""
    if kind == b"stsz":  # entries only when there is no constant sample_size
        return at, 4 * (head[4:8] == b"\0\0\0\0")
    if kind == b"stz2":
        if head[7] not in (4, 8, 16):
            raise _malformed(f"stz2 box has field size {head[7]}")
        return at, head[7] / 8
    if kind == b"trun":  # optional data_offset and first_sample_flags, then 0-4 fields a sample
        flags = struct.unpack_from(">I", head)[0]
        return at + 4 * bin(flags & 0x5).count("1"), 4 * bin(flags & 0xF00).count("1")
    if kind == b"tfra":  # time and moof offset (64-bit in version 1), then fields of 1-4 bytes
        return at, (16 if head[0] == 1 else 8) + 3 + sum(head[11] >> s & 3 for s in (0, 2, 4))
    return at, FIXED.get(kind) or (8 if kind == b"sbgp" else 20 if head[0] == 1 else 12)  # elst


class _Cut(Exception):
    """The file ends inside a box: what was read is judged, the rest is the demuxer's call."""


class _Track:
    def __init__(self, handlers: list[bytes] | None = None) -> None:
        self.handlers = handlers or []
        self.stsz = self.stts_sum = self.chunks = self.frag = self.base = 0
        self.stts_partial = False  # summing stopped once past every limit
        self.stts_first = (0, 0)   # (entry_count, first sample_delta): spots uncompressed audio
        self.stsc = (0, 0)         # (offset of its entries, entry_count), read when judged

    @property
    def kind(self) -> bytes:
        # A vide hdlr anywhere makes FFmpeg's stream video, and one without hdlr may become video
        # from its sample description: the stricter limit applies to both.
        if b"vide" in self.handlers or not self.handlers:
            return b"vide"
        return b"soun" if b"soun" in self.handlers else self.handlers[0]


def scan(path: str | os.PathLike, *, max_video_samples: int, max_other_samples: int = 1_000_000,
         max_tracks: int = 32) -> None:
    """Refuse an MP4/MOV whose boxes declare more samples or tracks than the limits allow.

    Raises VideoLimitExceeded (a track's declared samples, or the number of tracks, over its
    limit) or UnsupportedMedia (a table declaring more entries than its box holds, boxes that do
    not nest, a sample table hidden where only FFmpeg looks, a compressed moov, a flood of boxes).
    Anything that is not ISO-BMFF, or has no moov, returns silently.
    """
    with open(path, "rb") as f:
        _Scan(f, os.fstat(f.fileno()).st_size, max_video_samples, max_other_samples,
              max_tracks).run()


class _Scan:
    def __init__(self, f, size: int, max_video: int, max_other: int, max_tracks: int) -> None:
        self.f, self.size, self.boxes = f, size, 0
        self.max_video, self.max_other, self.max_tracks = max_video, max_other, max_tracks
        self.tracks: list[_Track] = []
        self.by_id: dict[int | None, _Track] = {}
        self.current: _Track | None = None  # FFmpeg gives a table to the last trak opened
        self.traf_id: int | None = None
        self.strays = 0

    def read(self, pos: int, n: int) -> bytes:
        self.f.seek(pos)
        return self.f.read(n)

    def header(self, pos: int, end: int) -> tuple[bytes, int, int]:
        """(type, payload start, box end or -1 when impossible) of the box at `pos`."""
        self.boxes += 1
        if self.boxes > MAX_BOXES:
            raise _malformed(f"more than {MAX_BOXES:,} boxes")
        head = self.read(pos, 16)
        if len(head) < 8 or (head[:4] == b"\0\0\0\1" and len(head) < 16):
            raise _Cut
        size, kind = struct.unpack(">I4s", head[:8])
        hdr = 16 if size == 1 else 8
        size = struct.unpack(">Q", head[8:])[0] if size == 1 else size or end - pos
        return kind, pos + hdr, (pos + size if size >= hdr else -1)

    def run(self) -> None:
        pos, moov = 0, False
        while pos + 8 <= self.size:
            try:
                kind, start, end = self.header(pos, self.size)
            except _Cut:
                break
            # Not ISO-BMFF (the first box) or trailing garbage (later): the demuxer decides.
            if end < 0 or not all(32 <= c < 127 for c in kind) or (pos == 0 and end > self.size):
                break
            if kind in (b"moof", b"mfra") or (kind == b"moov" and not moov):  # FFmpeg skips a
                try:                                                           # second moov
                    self.walk(kind, start, end, 1)
                except _Cut:
                    end = self.size
                if kind == b"moov":
                    moov, self.current = True, None
                    for t in self.tracks:  # tables after a trak still reach its track
                        self.judge(t)
            pos = end

    def walk(self, parent: bytes, pos: int, end: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _malformed(f"boxes nested more than {MAX_DEPTH} deep")
        while end - pos >= 8:  # FFmpeg ignores fewer than 8 bytes left in a container
            kind, start, box_end = self.header(pos, end)
            if box_end < 0 or start > end or box_end > end:
                name, where = kind.decode("latin-1"), parent.decode("latin-1")
                raise _malformed(f"{name} box in {where} has an impossible size" if box_end < 0
                                 or start > end else f"{name} box overruns its {where} box")
            if kind == b"cmov":  # a zlib-compressed moov: its tables cannot be judged packed
                raise _malformed("compressed movie header")
            if kind == b"trak":  # FFmpeg makes a stream of a trak wherever it is, even in a moof
                self.tracks.append(_Track())
                self.current = self.tracks[-1]
                if len(self.tracks) > self.max_tracks:
                    raise VideoLimitExceeded(f"the file declares more than {self.max_tracks:,} "
                                             f"tracks; the limit is {self.max_tracks:,}")
            if kind in CONTAINERS:
                track, self.traf_id = self.current, None if kind == b"traf" else self.traf_id
                self.walk(kind, start, box_end, depth + 1)
                if kind == b"trak":
                    self.judge(track)  # FFmpeg builds the track's index as its trak ends
            elif kind in AT:
                self.table(kind, start, box_end, self.current)
            elif kind not in OPAQUE:
                self.sweep(start, min(box_end, self.size))
            pos = box_end

    def table(self, kind: bytes, start: int, end: int, t: _Track | None) -> None:
        payload = end - start
        head = self.read(start, min(payload, 24))
        if len(head) < min(payload, 24):
            raise _Cut
        v1 = head[:1] == b"\1"
        at = AT[kind] + (8 if kind == b"tkhd" and v1 else 4 if kind == b"sbgp" and v1 else 0)
        if len(head) < at + 4:
            raise _malformed(f"{kind.decode()} box is too short")
        count = struct.unpack_from(">I", head, at)[0]
        if kind in (b"tfhd", b"hdlr", b"tkhd"):
            if kind == b"tfhd":
                self.traf_id = count
            elif t and kind == b"hdlr":
                t.handlers.append(head[8:12])
            elif t:
                self.by_id[count] = t
            return
        first, each = _entries(kind, head, at + 4)
        fits = first <= payload and count * each <= payload - first
        if t and kind in (b"stsz", b"stz2"):
            t.stsz = max(t.stsz, count)
            if not fits:
                self.judge(t)  # a count over the limit says more than "malformed" would
        if not fits:
            raise _malformed(f"{kind.decode()} box declares {count:,} entries "
                             f"in {payload + 8:,} bytes")
        if kind == b"trun":
            t = self.by_id.get(self.traf_id) or self.by_id.setdefault(  # FFmpeg skips strays
                self.traf_id, _Track([b"????"]))
            t.frag += count
            if t.base + t.frag > (self.max_video if t.kind == b"vide" else self.max_other):
                self.judge(t)
        elif t and kind in (b"stco", b"co64"):
            t.chunks = max(t.chunks, count)
        elif t and kind == b"stsc":
            t.stsc = (start + first, count)
        elif t and kind == b"stts":
            cap, total, t.stts_first = max(self.max_video, self.max_other), 0, (count, 0)
            for i in range(0, count, CHUNK):
                buf = self.read(start + first + 8 * i, 8 * min(CHUNK, count - i))
                values = struct.unpack(f">{len(buf) // 8 * 2}I", buf[: len(buf) // 8 * 8])
                t.stts_first = (count, values[1]) if i == 0 and values else t.stts_first
                total += sum(values[0::2])
                if total > cap and i + CHUNK < count:
                    t.stts_partial = True
                    break
            t.stts_sum = total

    def sweep(self, start: int, end: int) -> None:
        """Refuses a sample table inside the payload [start, end) of a box the walk skips."""
        pos = start
        while pos < end:
            buf = self.read(pos, min(1 << 20, end - pos))
            for name in HIDDEN:
                i = buf.find(name, 4)
                while i >= 0:
                    at, size = pos + i - 4, struct.unpack_from(">I", buf, i - 4)[0]
                    if size == 1 or 16 <= size <= end - at:
                        raise _malformed(f"{name.decode()} box outside a sample table")
                    self.strays += 1
                    if self.strays > MAX_STRAYS:
                        raise _malformed(f"more than {MAX_STRAYS:,} stray sample table names")
                    i = buf.find(name, i + 1)
            pos += len(buf) - 7 if len(buf) == 1 << 20 else len(buf)

    def judge(self, t: _Track) -> None:
        kind = t.kind
        limit = self.max_video if kind == b"vide" else self.max_other
        pcm = kind == b"soun" and t.stts_first == (1, 1)  # FFmpeg's test for uncompressed audio
        n = t.chunks if pcm else max(t.stsz, t.stts_sum, t.chunks)
        partial = not pcm and t.stts_partial and n == t.stts_sum
        if n <= limit:  # every chunk holds a sample, so this reads at most `limit` entries
            # Uncompressed audio is indexed per chunk (in runs), everything else per sample.
            n, partial = max((n, False), self.per_chunk(t, PCM_RUN if pcm else 1, limit))
        t.base, n = n, n + t.frag
        if n <= limit:
            return
        claim = f"{'at least ' if partial else ''}{n:,}"
        if kind == b"vide":
            raise VideoLimitExceeded(f"the file declares {claim} video frames; "
                                     f"the limit is {limit:,}")
        name = "an audio" if kind == b"soun" else f"a '{kind.decode('latin-1')}'"
        what = "packets" if pcm else "samples"
        raise VideoLimitExceeded(f"{name} track declares {claim} {what}; the limit is {limit:,}")

    def per_chunk(self, t: _Track, run: int, limit: int) -> tuple[int, bool]:
        """(entries the sample-to-chunk table makes of the chunks, runs of `run` samples each;
        whether counting stopped early, past `limit`)."""
        (pos, count), chunks = t.stsc, t.chunks
        count = min(count, chunks)  # entries past the last chunk are never used
        total, prev, prev_n, ordered, top = 0, 0, 0, True, 0
        for i in range(0, count, CHUNK):
            if total > limit:
                return total, True
            buf = self.read(pos + 12 * i, 12 * min(CHUNK, count - i))
            for first, spc, _ in struct.iter_unpack(">III", buf[: len(buf) // 12 * 12]):
                ordered = ordered and first > prev and (prev > 0 or first == 1)
                first = min(first, chunks + 1)
                total += max(first - prev, 0) * prev_n
                prev, prev_n = first, -(-spc // run)
                top = max(top, prev_n)
        total += max(chunks + 1 - prev, 0) * prev_n if prev else 0
        # FFmpeg repairs a disordered table; every chunk at the largest run bounds any repair.
        return (total if ordered else max(total, chunks * top)), False
