"""How fast and how lean is the video path, against the ffmpeg command line in the same run?

    python benchmarks/bench_video_io.py [--quick]

- decode fps: probe + iter_chunks (RGB frames) vs `ffmpeg -i in.mp4 -f rawvideo -pix_fmt rgb24`
- encode fps: Mp4Writer fed frames from memory (no decode) and
  transcode fps: iter_chunks -> Mp4Writer vs `ffmpeg -i in.mp4 -c:v libx264 -preset <same>`
- peak RSS of decoding a 10 s and a 60 s 1080p clip, each in a fresh process (target: 60 s
  within 1.2x of 10 s: memory must not grow with length).
Synthetic clips are generated once into .bench/ (BENCH_DIR overrides).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, peak_rss_of, require_ffmpeg, run_ffmpeg, table, timed  # noqa: E402
from serve_app.video.decode import iter_chunks  # noqa: E402
from serve_app.video.encode import Mp4Writer  # noqa: E402
from serve_app.video.probe import probe  # noqa: E402

PRESET = "veryfast"


def make_clip(path: Path, width: int, height: int, seconds: int, fps: int = 30) -> Path:
    """A moving-gradient clip with texture (so the encoder has work), made once and reused."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    noise = np.random.default_rng(0).integers(0, 24, (height, width), dtype=np.int32)
    frame = np.empty((height, width, 3), np.uint8)
    with av.open(str(tmp), "w", options={"movflags": "+faststart"}) as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(seconds * fps):
            frame[..., 0] = (x + 4 * i + noise) % 256
            frame[..., 1] = (y + 2 * i) % 256
            frame[..., 2] = ((x + y) // 4 + i + noise) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    os.replace(tmp, path)
    return path


def bench_decode(clip: Path, has_ffmpeg: bool, repeats: int) -> dict:
    info = probe(clip)

    def ours():
        for _ in iter_chunks(clip, info):
            pass

    t, first = timed(ours, repeats=repeats)
    row = {"what": f"decode {info.width}x{info.height}", "frames": info.num_frames,
           "ours_fps": info.num_frames / t.p50, "p90_s": t.p90, "warmup_s": first, "decoder": info.decoder}
    if has_ffmpeg:
        b, _ = timed(lambda: run_ffmpeg("-i", str(clip), "-f", "rawvideo", "-pix_fmt", "rgb24", os.devnull),
                     repeats=repeats)
        row["ffmpeg_fps"] = info.num_frames / b.p50
        row["ratio"] = row["ours_fps"] / row["ffmpeg_fps"]
    return row


def bench_encode(clip: Path, has_ffmpeg: bool, repeats: int, tmp: Path) -> list[dict]:
    info = probe(clip)
    # 32 decoded frames cycled: the encoder sees real pictures, the figure excludes decoding.
    pool = np.concatenate([c.frames for c in itertools.islice(iter_chunks(clip, info), 2)])
    dst = tmp / "ours.mp4"

    def encode_only():
        with Mp4Writer(dst, info, preset=PRESET) as w:
            for i in range(info.num_frames):
                w.write(pool[i % len(pool)])

    def transcode():
        with Mp4Writer(dst, info, audio_source=clip, preset=PRESET) as w:
            for chunk in iter_chunks(clip, info):
                for f in chunk.frames:
                    w.write(f)

    e, e_first = timed(encode_only, repeats=repeats)
    t, t_first = timed(transcode, repeats=repeats)
    size = f"{info.width}x{info.height}"
    rows = [
        {"what": f"encode {size} {PRESET}", "frames": info.num_frames, "ours_fps": info.num_frames / e.p50,
         "p90_s": e.p90, "warmup_s": e_first},
        {"what": f"transcode {size} {PRESET}", "frames": info.num_frames, "ours_fps": info.num_frames / t.p50,
         "p90_s": t.p90, "warmup_s": t_first},
    ]
    if has_ffmpeg:
        b, _ = timed(lambda: run_ffmpeg("-i", str(clip), "-c:v", "libx264", "-preset", PRESET,
                                        str(tmp / "ffmpeg.mp4")), repeats=repeats)
        for row in rows:
            row["ffmpeg_fps"] = info.num_frames / b.p50
            row["ratio"] = row["ours_fps"] / row["ffmpeg_fps"]
    return rows


RSS_CODE = """
from serve_app.contract import Limits
from serve_app.video.decode import iter_chunks
from serve_app.video.probe import probe
import time
# The noisy 60 s clip is over the 100 MB upload limit; memory, not the limit, is measured here.
info = probe({path!r}, Limits(max_bytes=1 << 40))
t = time.perf_counter()
n = 0
for chunk in iter_chunks({path!r}, info):
    n += len(chunk)
    time.sleep({sleep} * len(chunk))  # a consumer slower than the decoder, like the tracker
result = {{'frames': n, 'fps': n / (time.perf_counter() - t), 'decoder': info.decoder}}
"""


def bench_rss(clips: dict[str, Path], sleep: float) -> list[dict]:
    rows = [
        {"what": f"decode RSS {name}", **peak_rss_of(RSS_CODE.format(path=str(p), sleep=sleep))}
        for name, p in clips.items()
    ]
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["ratio"] = r["peak_rss_mb"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, shorter clips (smoke run)")
    ap.add_argument("--only", choices=["speed", "rss"], help="run one half")
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    has_ffmpeg = require_ffmpeg() is not None
    secs = 3 if args.quick else 10
    t = time.perf_counter()
    c720 = make_clip(BENCH_DIR / f"720p_{secs}s.mp4", 1280, 720, secs)
    c1080 = make_clip(BENCH_DIR / f"1080p_{secs}s.mp4", 1920, 1080, secs)
    c1080_long = make_clip(BENCH_DIR / f"1080p_{6 * secs}s.mp4", 1920, 1080, 6 * secs)
    print(f"clips ready in {time.perf_counter() - t:.1f} s ({BENCH_DIR})", flush=True)
    if args.only != "rss":
        speed_table(c720, c1080, has_ffmpeg, repeats)
    if args.only != "speed":
        rss_table(secs, c1080, c1080_long)


def speed_table(c720, c1080, has_ffmpeg, repeats) -> None:
    tmp = BENCH_DIR / "out"
    tmp.mkdir(exist_ok=True)
    speed = []
    for clip in (c720, c1080):
        speed.append(bench_decode(clip, has_ffmpeg, repeats))
        speed.extend(bench_encode(clip, has_ffmpeg, repeats, tmp))
    print("\nspeed (ratio = ours / ffmpeg CLI, same machine, same run; p50 of runs after a warm-up)")
    print(table(speed, ["what", "frames", "ours_fps", "ffmpeg_fps", "ratio", "p90_s", "warmup_s", "decoder"]))


def rss_table(secs, c1080, c1080_long) -> None:
    rss = bench_rss({f"1080p {secs}s": c1080, f"1080p {6 * secs}s": c1080_long}, sleep=0.0)
    rss += bench_rss({f"1080p {secs}s slow": c1080, f"1080p {6 * secs}s slow": c1080_long}, sleep=0.005)
    print("\npeak RSS, fresh process each (ratio = vs the 10 s clip of its group; target <= 1.2)")
    print(table(rss, ["what", "frames", "peak_rss_mb", "ratio", "fps", "decoder"]))


if __name__ == "__main__":
    main()
