import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_ADMIN_ENV, TEST_TOKENS_ENV

E2E = Path(__file__).resolve().parent
PRODIA_VERSION = "1.6.0"


class OfficialClient:
    """The API's official JavaScript client (npm prodia, pinned in package.json), run by node."""

    def __init__(self, node: str, tmp: Path) -> None:
        self.node = node
        self.tmp = tmp
        self.runs = 0

    def job(self, base_url: str, config: dict, video: Path | bytes, *, token: str = "any-token",
            job_type: str = "inference.sam3.segment.video.v1", timeout_s: float = 120) -> dict:
        """One prodia.job(...) call. Returns {ok, job, output (bytes)} or {ok: False, error:
        {name, message}}, with `responses`: each HTTP answer the client got ({status, retryAfter})."""
        self.runs += 1
        run = self.tmp / f"run{self.runs}"
        run.mkdir()
        if isinstance(video, bytes):
            (run / "input.mp4").write_bytes(video)
            video = run / "input.mp4"
        spec = {"baseUrl": f"{base_url}/v2", "token": token, "job": {"type": job_type, "config": config},
                "input": str(video), "output": str(run / "output.mp4")}
        result = node_script(self.node, "prodia_job.js", spec, run, timeout_s)
        if result["ok"]:
            result["output"] = (run / "output.mp4").read_bytes()
        return result


def node_script(node: str, script: str, spec: dict, run: Path, timeout_s: float) -> dict:
    """Runs tests/e2e/`script` on a spec file in `run`; returns the JSON of its last line."""
    (run / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([node, str(E2E / script), str(run / "spec.json")], cwd=E2E, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_package(name: str, why: str) -> tuple[str, Path]:
    """(node, the package's package.json), installing tests/e2e's pinned packages if needed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not installed, so {why}")
    package = E2E / "node_modules" / name / "package.json"
    if not package.exists():
        npm = shutil.which("npm")
        assert npm, f"node is installed but npm is not: cannot install {name}"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=E2E, check=True, timeout=300)
    return node, package


@pytest.fixture(scope="session")
def official_client(tmp_path_factory) -> OfficialClient:
    node, package = node_package("prodia", "the official JavaScript client (npm prodia) cannot run")
    installed = json.loads(package.read_text())["version"]
    assert installed == PRODIA_VERSION, f"tests/e2e/node_modules holds prodia {installed}, not {PRODIA_VERSION}"
    return OfficialClient(node, tmp_path_factory.mktemp("prodia"))


# The "strict" app: bearer auth on, a small upload limit, two job slots (four requests inside
# the ingress) and two more queued in the proxy, so limits and backpressure are cheap to reach.
STRICT_MAX_BYTES = 2 * 1024 * 1024
STRICT_ARGS = {
    "auth_tokens_env": TEST_TOKENS_ENV, "admin_tokens_env": TEST_ADMIN_ENV,
    "limits": {"max_bytes": STRICT_MAX_BYTES},
    "max_inflight_per_ingress": 2,
    "ingress_max_queued_requests": 2,
    "retry_after_s": 1,
}


@pytest.fixture(scope="session")
def strict(cluster) -> str:
    return cluster.deploy("strict", "/strict", **STRICT_ARGS)


# The "hostile" app: short upload pacing and job deadline, two job slots and a pixel budget of
# exactly the shapes clip, so hostile clients are cheap to play.
HOSTILE_IDLE_S = 2
HOSTILE_TIMEOUT_S = 4


@pytest.fixture(scope="session")
def hostile(cluster) -> str:
    from tests.conftest import SHAPES_H, SHAPES_N, SHAPES_W
    from testkit.doubles import SCRIPTED_TRACKER

    return cluster.deploy("hostile", "/hostile", **{
        "upload_idle_s": HOSTILE_IDLE_S, "upload_min_bytes_per_s": 64 * 1024, "job_timeout_s": HOSTILE_TIMEOUT_S,
        "max_inflight_per_ingress": 2, "max_uploads_per_ingress": 24, "retry_after_s": 1,
        "limits": {"max_pixel_frames": SHAPES_W * SHAPES_H * SHAPES_N},
        # "slow" jobs take 10 s: past the deadline
        "tracker": {"kind": "import", "path": SCRIPTED_TRACKER, "options": {"delay_s": 0.25}},
    })


# The async job apps: the same suite runs on each job database. A scripted tracker that takes
# 0.2 s a frame on "slow" prompts, one job at a time per tracker replica, on its one model thread
# as SAM 3 is (a frame_delay_s puts the stand-in there: so a job that did not free the tracker
# would hold the next one back), and a runner declared dead after 3 s of silence.
JOBS_STALE_S = 3
JOBS_ARGS = {"tracker": {"kind": "import", "path": "testkit.doubles:ScriptedTracker",
                         "options": {"delay_s": 0.2, "frame_delay_s": 0.001}},
             "tracker_max_ongoing_requests": 1, "job_stale_s": JOBS_STALE_S}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def jobs(request, cluster):
    """(base URL, app name, its job_store, its job_db) of an async job app on each database."""
    db = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    name = f"jobs-{request.param}"
    base = cluster.deploy(name, f"/{name}", **JOBS_ARGS, **({"job_db": db} if db else {}))
    return base, name, cluster.stores[name], db
