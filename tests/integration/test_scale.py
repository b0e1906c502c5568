"""Autoscaling across nodes: on a simulated cluster (a head and two workers with a GPU each), the
tracker scales up under load and back down after it, and no request fails or is lost on the way
down. It runs in a process of its own: the cluster is not the session's."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_tracker_scales_up_under_load_and_down_after_it_losing_nothing():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    replicas = result["replicas"]
    print(result)
    assert replicas[0] == 1 and 2 in replicas, "it never scaled up"
    assert replicas[-1] == 1, "it never scaled back down"
    assert result["failures"] == [] and result["jobs"] > 0
