"""A run of phases inside a time budget, each one's results written down as soon as it ends.

For checks run on a lent machine with a hard limit (benchmarks/gpu_check.py): phases run in
order of value; one predicted not to fit is skipped with a reason; each phase's end rewrites the
JSON file, so a run killed from outside still leaves what it measured; and a watchdog ends the
process just inside the budget if a phase overruns its prediction (or had none), saying which.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OUT_OF_TIME = 3


class Budget:
    """`seconds` from now for `phases` (their names, in order). `results` is the JSON written
    to `json_path` after every phase: `results["phases"][name]` says how each one went."""

    def __init__(self, seconds: float, phases: Sequence[str], results: dict, json_path: str | Path | None = None,
                 say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 exit_margin_s: float = 2.0, start: float | None = None) -> None:
        self.seconds = seconds
        self.names = list(phases)
        self.results = results
        self.json_path = Path(json_path) if json_path else None
        self.say = say
        self.clock = clock
        self.start = clock() if start is None else start  # a process's own start: its imports count too
        self.deadline = self.start + seconds
        self.exit_margin_s = exit_margin_s  # what ending the process takes, kept out of the budget
        self.current: str | None = None
        self.current_start = 0.0
        self.children: list = []           # subprocesses to end with the run (Popen)
        self.on_out_of_time: Callable[[], None] | None = None  # last words (print the table)
        self._lock = threading.Lock()
        self._watchdog: threading.Timer | None = None
        results.setdefault("budget_s", seconds)
        results.setdefault("phases", {})

    # -- time --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left for work: the deadline less what ending the process takes."""
        return self.deadline - self.exit_margin_s - self.clock()

    def fits(self, predicted_s: float) -> bool:
        return predicted_s <= self.left()

    # -- phases ------------------------------------------------------------------------------
    def run(self, name: str, fn: Callable[[dict], Any], predicted_s: float | None = None,
            needs: Sequence[str] = ()) -> Any:
        """Run `fn(record)` as phase `name` unless its prediction does not fit or a phase it
        needs did not end well; `record` is the phase's entry in the JSON (fn adds to it).
        Returns fn's value, or None if skipped or failed (a failure is reported, not raised:
        the phases after it still run)."""
        for before in needs:
            state = self.results["phases"].get(before, {})
            if "seconds" not in state or "failed" in state:
                return self.skip(name, f"it needs {before}, which did not run to its end")
        if predicted_s is not None and not self.fits(predicted_s):
            return self.skip(name, f"predicted {predicted_s:.0f} s, {max(self.left(), 0):.0f} s left")
        record: dict = {}
        start = self.clock()
        with self._lock:
            self.current, self.current_start = name, start
            self.results["phases"][name] = record
        try:
            value = fn(record)
        except Exception as exc:  # the check goes on; the failure is in the log and the JSON
            traceback.print_exc()
            record["failed"] = f"{type(exc).__name__}: {exc}"[:500]
            self.say(f"phase {name} failed after {self.clock() - start:.1f} s: {record['failed']}")
            value = None
        else:
            self.say(f"phase {name}: {self.clock() - start:.1f} s")
        record["seconds"] = round(self.clock() - start, 2)
        if predicted_s is not None:
            record["predicted_s"] = round(predicted_s, 1)
        with self._lock:
            self.current = None
        self.save()
        return value

    def skip(self, name: str, why: str) -> None:
        self.say(f"skipped {name}: {why}")
        self.results["phases"][name] = {"skipped": why}
        self.save()

    # -- the record --------------------------------------------------------------------------
    def save(self) -> None:
        """Rewrite the JSON file whole (written aside, then renamed: never half a file)."""
        if self.json_path is None:
            return
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path.with_name(self.json_path.name + ".part")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.json_path)

    # -- the watchdog ------------------------------------------------------------------------
    def start_watchdog(self) -> None:
        """End the process at the deadline (less the exit margin) if the run is still going."""
        delay = max(self.deadline - self.exit_margin_s - self.clock(), 0.0)
        self._watchdog = threading.Timer(delay, self.out_of_time)
        self._watchdog.daemon = True
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def out_of_time(self) -> None:
        """The budget is spent in the middle of a phase: say so, mark it and the phases not
        reached, save, and end the process now (its threads cannot be stopped otherwise)."""
        with self._lock:
            name, start = self.current, self.current_start
        done = set(self.results["phases"])
        if name is not None:
            record = self.results["phases"][name]
            record["cut"] = f"out of time after {self.elapsed():.0f} s of {self.seconds:.0f} s"
            record["seconds"] = round(self.clock() - start, 2)
            self.say(f"budget: out of time in phase {name} after {self.elapsed():.0f} s; ending")
        for later in self.names:
            if later not in done:
                self.skip(later, f"the budget ran out in {name}")
        self._end_children()
        self.results["out_of_time"] = name
        self.save()
        if self.on_out_of_time is not None:
            try:
                self.on_out_of_time()
            except Exception:  # the record is saved; a failing table must not keep us running
                traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OUT_OF_TIME)

    def _end_children(self) -> None:
        """The subprocesses given, and every other process this one started (inductor's compile
        workers): left running, they would hold the log's pipe open (`| tee` waits for them)."""
        try:
            import psutil

            others = psutil.Process().children(recursive=True)
        except Exception:  # no psutil: the ones given are ended all the same
            others = []
        for process in [*self.children, *others]:
            try:
                process.kill()
            except Exception:  # gone already
                pass
