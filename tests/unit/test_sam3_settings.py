"""What a job's confidence_threshold and max_objects become inside SAM 3, and that a session's
settings never outlive it. No model is built (the real model: test_sam3_model.py)."""

import pytest
from pydantic import ValidationError

from serve_app.trackers.sam3.config import Sam3Config
from serve_app.trackers.sam3.session import detection_settings, model_settings


def test_the_default_threshold_is_sam3s_own_pair():
    assert detection_settings(0.5, 16) == pytest.approx(
        {"score_threshold_detection": 0.5, "new_det_thresh": 0.7, "max_num_objects": 16})


@pytest.mark.parametrize("threshold, new_objects", [(0.0, 0.4), (0.3, 0.58), (0.9, 0.94), (1.0, 1.0)])
def test_objects_appearing_later_need_more_in_sams_proportion(threshold, new_objects):
    settings = detection_settings(threshold, 4)
    assert settings["score_threshold_detection"] == threshold
    assert settings["new_det_thresh"] == pytest.approx(new_objects)


def test_lowering_the_threshold_lowers_both_bars():
    pairs = [detection_settings(t / 20, 16) for t in range(21)]
    for low, high in zip(pairs, pairs[1:]):
        assert low["score_threshold_detection"] < high["score_threshold_detection"]
        assert low["new_det_thresh"] < high["new_det_thresh"]
        assert high["new_det_thresh"] >= high["score_threshold_detection"]


class Model:
    score_threshold_detection = 0.5
    new_det_thresh = 0.7
    max_num_objects = 10000


def test_a_sessions_settings_are_put_back_however_it_ends():
    model = Model()
    with model_settings(model, detection_settings(0.2, 3)):
        assert (model.score_threshold_detection, model.max_num_objects) == (0.2, 3)
    assert vars(model) == {"score_threshold_detection": 0.5, "new_det_thresh": 0.7, "max_num_objects": 10000}
    with pytest.raises(KeyError), model_settings(model, detection_settings(0.9, 1)):
        raise KeyError("the job failed")
    assert (model.score_threshold_detection, model.new_det_thresh, model.max_num_objects) == (0.5, 0.7, 10000)


def test_per_job_settings_cannot_be_overridden_for_the_replica():
    for name, field in (("score_threshold_detection", "confidence_threshold"),
                        ("new_det_thresh", "confidence_threshold"), ("max_num_objects", "max_objects")):
        with pytest.raises(ValidationError, match=field):
            Sam3Config(model_overrides={name: 0.0})
    assert Sam3Config(model_overrides={"det_nms_thresh": 0.0}).model_overrides == {"det_nms_thresh": 0.0}


def test_the_replicas_object_limit_is_1_to_64_default_16():
    assert Sam3Config().max_objects == 16  # 5 object buckets to compile at start, not 7
    assert Sam3Config(max_objects=64).max_objects == 64
    for bad in (0, 65, 2.5):
        with pytest.raises(ValidationError, match="max_objects"):
            Sam3Config(max_objects=bad)


class Tracker:
    mf_threshold = 0.01


def test_a_sessions_settings_reach_into_the_models_parts():
    """The warm-up reads every memory frame (tracker.mf_threshold for its sessions only)."""
    from serve_app.trackers.sam3.tracker import FULL_MEMORY

    model = Model()
    model.tracker = Tracker()
    with model_settings(model, {**detection_settings(0.2, 3), **FULL_MEMORY}):
        assert model.tracker.mf_threshold == float("-inf") and model.max_num_objects == 3
    assert model.tracker.mf_threshold == 0.01 and model.max_num_objects == 10000


def test_the_compile_settings_are_validated():
    assert Sam3Config().compile_autotune == "bounded" and Sam3Config().compile_cache_dir is None
    assert Sam3Config(compile_autotune="full", compile_cache_dir="/var/cache/sam3").compile_cache_dir == "/var/cache/sam3"
    with pytest.raises(ValidationError, match="compile_autotune"):
        Sam3Config(compile_autotune="exhaustive")
    assert Sam3Config(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="device"):
        Sam3Config(device="cuda1")
