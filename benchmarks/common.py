"""Helpers shared by the benchmark scripts (and the tests that reuse them): timing, percentiles,
peak RSS, the ffmpeg baseline, synthetic detections."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", REPO / ".bench"))


@dataclass
class Timing:
    seconds: list[float]

    @property
    def p50(self) -> float:
        return float(np.percentile(self.seconds, 50))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.seconds, 90))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.seconds, 99))


def timed(fn, repeats: int = 3, warmup: int = 1) -> tuple[Timing, float]:
    """Runs fn `warmup` times (reported apart, as the first call's seconds) then `repeats` times."""
    first = 0.0
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return Timing(runs), first


def ffmpeg_path() -> str | None:
    return shutil.which("ffmpeg")


def require_ffmpeg() -> str | None:
    path = ffmpeg_path()
    if path is None:
        print(
            "NOTE: the ffmpeg command line is not installed, so no baseline and no ratios "
            "(apt-get install -y ffmpeg).",
            file=sys.stderr,
        )
    return path


def run_ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


CLIP_FPS = 30


def shapes_clip(width: int, height: int, seconds: int) -> Path:
    """The synthetic shapes clip at this size and length, made once into BENCH_DIR."""
    from serve_app import synthetic

    path = BENCH_DIR / f"shapes_{height}p_{seconds}s.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        synthetic.write_clip(tmp, width, height, seconds * CLIP_FPS, CLIP_FPS)
        tmp.replace(path)
    return path


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far, e.g. ffmpeg runs."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peak_rss_of(code: str) -> dict:
    """Runs `code` in a fresh Python (this repo importable); it must print one JSON line.

    Adds `peak_rss_mb`: the child's VmHWM. Not getrusage's ru_maxrss: Linux carries that across
    exec, so a child forked from a large benchmark process would report the parent's peak.
    """
    wrapper = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        + code
        + "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "result['peak_rss_mb'] = int(hwm.split()[1]) / 1024\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def synthetic_chunks(width: int, height: int, n: int, pool: int = 30, chunk: int = 16):
    """(VideoInfo, chunks) of n frames of moving shapes at width x height, 30 fps, cycling `pool`
    rendered frames (one still frame if 1). Rendering is done here, untimed; each chunk is
    assembled as it is read (one copy, as a decoder makes)."""
    from fractions import Fraction

    from serve_app import synthetic
    from serve_app.media import FrameChunk, VideoInfo

    frames = np.stack(list(synthetic.frames(pool, width, height))) if pool > 1 else \
        synthetic.render(0, 1, width, height)[None]
    info = VideoInfo(width=width, height=height, num_frames=n, pts=tuple(range(n)),
                     time_base=Fraction(1, 30), avg_fps=Fraction(30))
    chunks = (FrameChunk(s, frames[[i % len(frames) for i in range(s, min(s + chunk, n))]])
              for s in range(0, n, chunk))
    return info, chunks
