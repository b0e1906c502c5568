"""One progress bar over a whole batch: videos finished of all, frames done, frames per second,
and an ETA from the inputs that ran (skipped ones cost nothing and would flatter it)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="video", desc="batch", disable=not enabled, file=sys.stderr,
                        mininterval=0.5, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} videos [{elapsed}{postfix}]")
        self.total, self.start = total, time.monotonic()
        self.frames = self.ran = self.failed = 0

    def add(self, outcome) -> None:
        if outcome.status != "skipped":
            self.ran += 1
        if outcome.status == "done":
            self.frames += outcome.frames or 0
        self.failed += outcome.status == "failed"
        self.bar.update(1)
        elapsed = time.monotonic() - self.start
        left = self.total - self.bar.n
        eta = elapsed / self.ran * left if self.ran else None
        self.bar.set_postfix_str(f"{self.frames:,} frames, {self.frames / elapsed if elapsed else 0:.1f} frames/s"
                                 + (f", {self.failed} failed" if self.failed else "")
                                 + (f", ETA {_clock(eta)}" if eta is not None and left else ""), refresh=False)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
