"""Several concepts, exemplar boxes and a prompt frame over real HTTP (the scripted stand-in):
the answer is the truth's masks in presentation order, the job JSON echoes what was sent, and an
async job's progress counts the frames of both passes."""

import json
import time

import httpx

from serve_app import synthetic
from serve_app.client import multipart_job
from testkit.video import mask_iou
from tests.conftest import SHAPES_FPS, SHAPES_H, SHAPES_N, SHAPES_W
from tests.e2e.test_async import submit, wait
from tests.serving import parse_multipart

JOB = "inference.sam3.segment.video.v1"


def box_of(shape: int, frame: int) -> list[float]:
    import numpy as np

    mask = synthetic.truth(frame, SHAPES_N, SHAPES_W, SHAPES_H)[shape]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def test_concepts_boxes_and_a_prompt_frame_through_v2_job(graph, shapes):
    # "red" finds the red circle (the pale square scores under 0.5); a box adds the yellow circle
    config = {"prompts": ["red", "blue"], "boxes": [{"box": box_of(3, 25), "label": True}], "prompt_frame": 25}
    body, ctype = multipart_job({"type": JOB, "config": config}, shapes.read_bytes())
    r = httpx.post(f"{graph}/v2/job", content=body, timeout=120,
                   headers={"Content-Type": ctype, "Accept": "multipart/form-data"})
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.content, r.headers["content-type"])
    assert mask_iou(parts["output"], {"red", "blue", "yellow"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
    echoed = json.loads(parts["job"])["config"]
    assert echoed["prompts"] == ["red", "blue"] and echoed["prompt_frame"] == 25 and "prompt" not in echoed


def test_a_box_outside_the_picture_is_400_naming_it_before_any_work(graph, shapes):
    config = {"prompt": "red", "boxes": [{"box": [SHAPES_W - 5, 0, 10, 10]}]}
    body, ctype = multipart_job({"type": JOB, "config": config}, shapes.read_bytes())
    r = httpx.post(f"{graph}/v2/job", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_job")
    assert r.json()["error"] == (f"config.boxes[0].box is [{SHAPES_W - 5}.0, 0.0, 10.0, 10.0]; it must lie within the "
                                 f"{SHAPES_W}x{SHAPES_H} picture")
    r = submit(graph, shapes.read_bytes(), {"prompt": "red", "prompt_frame": SHAPES_N})
    assert r.status_code == 400 and "config.prompt_frame is 40" in r.json()["error"]


def test_an_async_jobs_progress_counts_the_frames_of_both_passes(jobs, shapes):
    base, *_ = jobs
    job = submit(base, shapes.read_bytes(), {"prompt": "slow red", "prompt_frame": SHAPES_N // 2}).json()
    seen = []
    while (state := httpx.get(f"{base}/v2/job/async/{job['id']}/job.state.current").text) not in ("processed", "failed"):
        seen.append(httpx.get(f"{base}/v2/job/async/{job['id']}/job.json").json()["progress"]["frames_done"])
        time.sleep(0.3)
    assert state == "processed"
    assert seen == sorted(seen) and len({s for s in seen if 0 < s < SHAPES_N}) >= 2  # live, through both passes
    done = wait(base, job["id"])
    assert done["progress"]["frames_done"] == SHAPES_N
    mp4 = httpx.get(f"{base}/v2/job/async/{job['id']}/output/output.mp4").content
    assert mask_iou(mp4, {"red"}, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS) > 0.9
