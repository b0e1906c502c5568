"""The page at GET / (serve_app/api/page.html), used in a real headless Chromium as a person would:
choose an mp4, type a prompt, submit, watch the progress, play the result; or read the error.

Driven by tests/e2e/page_check.js (playwright-core, pinned in package.json) with Debian's Chromium
(`apt-get install chromium`); skipped where node or Chromium is missing.
"""

import os
import re
from pathlib import Path

import pytest

from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W, TEST_TOKEN
from tests.e2e.conftest import node_script, node_package

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

E2E = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class Browser:
    def __init__(self, node: str, tmp: Path) -> None:
        self.node, self.tmp, self.runs = node, tmp, 0

    def use(self, url: str, file: Path, timeout_s: float = 60, seek_to: float | None = None, **form) -> dict:
        """Load `url`, fill the form (`form`: prompt, mode, threshold, alpha, maxObjects, token) with
        `file`, submit, and return what page_check.js saw (its one JSON line)."""
        self.runs += 1
        run = self.tmp / f"page{self.runs}"
        run.mkdir()
        spec = {"chromium": CHROMIUM, "userDataDir": str(run / "profile"), "url": url, "file": str(file),
                "form": form, "timeoutMs": int(timeout_s * 1000), "seekTo": seek_to}
        seen = node_script(self.node, "page_check.js", spec, run, timeout_s + 60)
        assert seen["outcome"] != "crash", seen["crash"]
        assert seen["console"] == [], seen["console"]
        return seen


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Browser:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    node, _ = node_package("playwright-core", "playwright-core cannot drive the page")
    return Browser(node, tmp_path_factory.mktemp("browser"))


def test_a_job_runs_to_the_end_and_plays(browser, graph, shapes):
    # "slow": the scripted tracker takes 0.05 s a frame, so progress can be seen moving (~2 s)
    seen = browser.use(f"{graph}/", shapes, prompt="slow red", mode="overlay", threshold=0.4, maxObjects=8,
                       seek_to=1.0)
    assert seen["outcome"] == "result", seen
    assert seen["error"] is None
    assert seen["stage"] == "processed"
    assert seen["progress"] == {"value": SHAPES_N, "max": SHAPES_N}
    values = {s["value"] for s in seen["seen"] if s["max"] == SHAPES_N}
    assert values & set(range(1, SHAPES_N)), f"no progress between 0 and {SHAPES_N} was shown: {seen['seen']}"
    video = seen["video"]
    assert video["videoWidth"] == SHAPES_W and video["videoHeight"] == SHAPES_H, video
    assert video["duration"] == pytest.approx(SHAPES_N / SHAPES_FPS, abs=0.05), video
    assert re.fullmatch(re.escape(graph) + r"/v2/job/async/[^/]+/output/output\.mp4", video["src"]), video
    assert seen["seeked"] == pytest.approx(1.0, abs=0.05)  # the <video> seeks: Range answered 206
    assert any(r["status"] == 206 and r["path"].endswith("/output/output.mp4") for r in seen["responses"])
    assert "output.mp4" in [d["text"] for d in seen["downloads"]]
    posts = [r for r in seen["responses"] if r["method"] == "POST"]
    assert [(r["path"], r["status"]) for r in posts] == [("/v2/job/async", 201)]
    assert seen["submitEnabled"]


def test_a_bad_upload_shows_the_services_message(browser, graph, tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"these are the notes I meant to keep, not a video\n" * 40)
    seen = browser.use(f"{graph}/", bad, prompt="red", timeout_s=30)
    assert seen["outcome"] == "error", seen
    assert "not a readable MP4 video" in seen["error"] and seen["errorVisible"], seen
    assert [r["status"] for r in seen["responses"] if r["method"] == "POST"] == [415]
    assert seen["submitEnabled"]

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    seen = browser.use(f"{graph}/", empty, prompt="red", timeout_s=30)
    assert seen["outcome"] == "error" and "upload is empty" in seen["error"], seen


def test_under_a_route_prefix_with_a_token(browser, strict, shapes):
    """The "strict" app at /strict/ with bearer auth: the page's URLs follow its prefix, a
    missing token shows the 401's message, and with one the result (fetched as a blob, since a
    <video> cannot send the header) plays."""
    seen = browser.use(f"{strict}/", shapes, prompt="red", timeout_s=30)
    assert seen["outcome"] == "error" and "bearer token" in seen["error"], seen
    posts = [(r["path"], r["status"]) for r in seen["responses"] if r["method"] == "POST"]
    assert posts == [("/strict/v2/job/async", 401)]

    seen = browser.use(f"{strict}/", shapes, prompt="red", token=TEST_TOKEN)
    assert seen["outcome"] == "result", seen
    assert seen["video"]["src"].startswith("blob:") and seen["video"]["videoWidth"] == SHAPES_W, seen
    assert all(r["path"].startswith("/strict/") for r in seen["responses"]), seen["responses"]


def test_concepts_a_prompt_frame_and_drawn_boxes(browser, graph, shapes):
    """Two concepts, frame 25 chosen on the scrubber, a box drawn around the yellow circle and a
    negative one around the pale red square: the job the page sends says all of it, and the
    result plays."""
    from tests.e2e.test_prompts import box_of

    seen = browser.use(f"{graph}/", shapes, prompt="red", concepts=["blue"], promptFrame=25,
                       boxes=[{"box": box_of(3, 25), "label": True}, {"box": box_of(4, 25), "label": False}])
    assert seen["outcome"] == "result", seen
    assert seen["scrubbed"] == 25
    (job,) = seen["posted"]
    config = job["config"]
    assert config["prompts"] == ["red", "blue"] and config["prompt_frame"] == 25 and "prompt" not in config
    assert [b["label"] for b in config["boxes"]] == [True, False]
    for drawn, want in zip(config["boxes"], (box_of(3, 25), box_of(4, 25))):
        assert all(abs(a - b) <= 2 for a, b in zip(drawn["box"], want)), (drawn, want)  # the mouse's pixels
    assert seen["video"]["videoWidth"] == SHAPES_W
