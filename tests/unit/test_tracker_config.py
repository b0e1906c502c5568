"""A tracker is a typed config chosen by `kind`, built by `trackers.build`; its names work the
same in the app's args, `serve run ... tracker=...` and the CLI."""

import pytest
from pydantic import ValidationError

from serve_app.app import AppArgs
from serve_app.trackers import KINDS, Tracker, build, tracker_config
from serve_app.trackers.fake import ColorShapeTracker, FakeConfig
from serve_app.trackers.sam3.config import Sam3Config
from testkit.doubles import SCRIPTED_TRACKER, ScriptedTracker


def test_the_kinds_are_the_configs_in_the_union():
    assert all(tracker_config(kind if kind != "import" else "pkg.mod:Name").kind == kind for kind in KINDS)


def test_a_name_stands_for_its_config_with_defaults_everywhere():
    for given in ("fake", {"kind": "fake"}, FakeConfig()):
        assert AppArgs.model_validate({"tracker": given}).tracker == FakeConfig()
    assert tracker_config("fake") == FakeConfig()
    assert AppArgs().tracker == Sam3Config()  # the default is SAM 3


def test_each_kind_builds_its_tracker_with_its_fields():
    fake = build(tracker_config("fake", min_area=10))
    assert isinstance(fake, ColorShapeTracker) and isinstance(fake, Tracker) and fake.config.min_area == 10
    scripted = build(tracker_config(SCRIPTED_TRACKER, delay_s=0.25))
    assert isinstance(scripted, ScriptedTracker) and scripted.delay_s == 0.25


@pytest.mark.parametrize("tracker, words", [
    ("sam4", "'sam4'"),
    ({"kind": "fake", "min_aera": 3}, "min_aera"),
    ({"kind": "sam3", "device": "tpu"}, "device"),
    ({"kind": "sam3", "warm_sizes": [[0, 10]]}, "warm_sizes"),
    ({"kind": "import", "path": "no colon here"}, "path"),
])
def test_bad_tracker_configs_are_refused_naming_the_field(tracker, words):
    with pytest.raises(ValidationError, match=words):
        AppArgs.model_validate({"tracker": tracker})


def test_gpus_follow_the_tracker_unless_set():
    assert AppArgs(tracker="sam3").gpus_per_tracker == 1
    assert AppArgs(tracker={"kind": "sam3", "device": "cpu"}).gpus_per_tracker == 0
    assert AppArgs(tracker="fake").gpus_per_tracker == 0
    assert AppArgs(tracker="fake", tracker_num_gpus=0.5).gpus_per_tracker == 0.5


def test_a_class_that_is_not_a_tracker_is_refused_when_built():
    with pytest.raises(TypeError, match="no track"):
        build(tracker_config("serve_app.trackers.fake:FakeConfig"))
