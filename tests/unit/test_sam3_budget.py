"""The GPU check's budget (testkit/budget.py): phases in order, a phase predicted not to fit is
skipped with its reason, the JSON is whole after every phase, a failing phase does not stop the
run, and a phase that overruns is cut at the deadline with the process ending inside it."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testkit.budget import EXIT_OUT_OF_TIME, Budget

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clocked(tmp_path):
    clock, said = Clock(), []
    results: dict = {}
    budget = Budget(100, ["a", "b", "c"], results, tmp_path / "check.json", say=said.append, clock=clock,
                    exit_margin_s=2)
    return budget, clock, said, tmp_path / "check.json"


def test_a_phase_predicted_not_to_fit_is_skipped_saying_why(clocked):
    budget, clock, said, path = clocked

    def a(record):
        clock.now += 60
        record["fps"] = 30.0
        return "measured"

    assert budget.run("a", a) == "measured"
    ran = []
    assert budget.run("b", ran.append, predicted_s=50) is None  # 38 s left: 100 - 60 - 2
    assert not ran
    assert said == ["phase a: 60.0 s", "skipped b: predicted 50 s, 38 s left"]
    assert budget.run("c", lambda record: clock.__setattr__("now", clock.now + 30), predicted_s=30) is None
    assert said[-1] == "phase c: 30.0 s"
    phases = json.loads(path.read_text())["phases"]
    assert phases == {"a": {"fps": 30.0, "seconds": 60.0}, "b": {"skipped": "predicted 50 s, 38 s left"},
                      "c": {"seconds": 30.0, "predicted_s": 30.0}}


def test_the_json_is_rewritten_whole_when_each_phase_ends(clocked):
    budget, clock, said, path = clocked
    seen = []

    def phase(name):
        def run(record):
            # while a phase runs, the file holds what the phases before it measured
            seen.append(sorted(json.loads(path.read_text())["phases"]) if path.exists() else [])
            clock.now += 1
            record["value"] = name

        return run

    for name in ("a", "b", "c"):
        budget.run(name, phase(name))
        on_disk = json.loads(path.read_text())
        assert on_disk["phases"][name]["value"] == name and on_disk["budget_s"] == 100
    assert seen == [[], ["a"], ["a", "b"]]
    assert not list(path.parent.glob("*.part"))


def test_a_failing_phase_is_recorded_and_the_next_ones_run_or_are_skipped_if_they_need_it(clocked, capsys):
    budget, clock, said, path = clocked

    def a(record):
        raise RuntimeError("the compile fell over")

    assert budget.run("a", a) is None
    assert said[-1].startswith("phase a failed after 0.0 s: RuntimeError: the compile fell over")
    assert budget.run("b", lambda record: "ran") == "ran"
    assert budget.run("c", lambda record: "ran", needs=["a"]) is None
    assert said[-1] == "skipped c: it needs a, which did not run to its end"
    phases = json.loads(path.read_text())["phases"]
    assert phases["a"]["failed"] == "RuntimeError: the compile fell over" and "seconds" in phases["b"]
    assert "the compile fell over" in capsys.readouterr().err  # the traceback, for the log


def test_a_phase_that_overruns_is_cut_at_the_deadline_and_the_rest_are_marked(tmp_path):
    """A real process: the watchdog ends it inside the budget, wherever the main thread is."""
    path = tmp_path / "check.json"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from testkit.budget import Budget
        results = {{}}
        budget = Budget(2.0, ["ready", "fps", "stock"], results, {str(path)!r}, exit_margin_s=0.5)
        budget.on_out_of_time = lambda: print("table printed")
        budget.start_watchdog()
        budget.run("ready", lambda record: record.update(built=True))
        budget.run("fps", lambda record: time.sleep(30))
        print("never")
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    took = time.monotonic() - start
    assert done.returncode == EXIT_OUT_OF_TIME, done.stderr
    assert took < 2.0 + 1.5  # the budget, plus the interpreter's start
    lines = done.stdout.splitlines()
    assert lines[0].startswith("phase ready: ")
    assert lines[1].startswith("budget: out of time in phase fps after ")
    assert lines[2:] == ["skipped stock: the budget ran out in fps", "table printed"]
    saved = json.loads(path.read_text())
    assert saved["phases"]["ready"]["built"] and saved["phases"]["fps"]["cut"].startswith("out of time after")
    assert saved["phases"]["stock"] == {"skipped": "the budget ran out in fps"}
    assert saved["out_of_time"] == "fps" and "never" not in done.stdout


def test_the_watchdog_ends_the_subprocesses_it_was_given(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from testkit.budget import Budget
        budget = Budget(1.0, ["warm-start"], {{}}, None, exit_margin_s=0.2)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        budget.children.append(child)
        print(child.pid, flush=True)
        budget.start_watchdog()
        budget.run("warm-start", lambda record: child.wait())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.returncode == EXIT_OUT_OF_TIME
    pid = int(done.stdout.split()[0])
    for _ in range(50):  # killed, then reaped by init once its parent is gone
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child {pid} outlived the watchdog")
