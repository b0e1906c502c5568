import pickle

import pytest

from serve_app.contract import JOB_TYPE, JobConfig, parse_config, parse_job
from serve_app.errors import (
    HTTP_STATUS,
    InvalidJob,
    Overloaded,
    ServiceError,
    UnknownJobType,
    UnsupportedMedia,
    UploadTooLarge,
    http_status,
)


def test_defaults_match_the_documented_contract():
    cfg = parse_config({"prompt": "fish"})
    assert cfg == JobConfig(prompt="fish", confidence_threshold=0.5, mode="mask", alpha=0.5)


def test_full_job_envelope_parses():
    job = parse_job({"type": JOB_TYPE, "config": {"prompt": "fish", "mode": "overlay", "alpha": 0.3}})
    assert job.config.mode == "overlay" and job.config.alpha == 0.3


@pytest.mark.parametrize(
    "config, words",
    [
        ({}, ["config.prompt", "required"]),
        ({"prompt": ""}, ["config.prompt", "0 characters", "1 to 500"]),
        ({"prompt": "x" * 501}, ["config.prompt", "501 characters", "1 to 500"]),
        ({"prompt": "   "}, ["config.prompt", "no visible character"]),
        ({"prompt": "\u200b\u200b"}, ["config.prompt", "no visible character"]),
        ({"prompt": "fish\x00"}, ["config.prompt", "control character U+0000"]),
        ({"prompt": "a", "alpha": "0.5"}, ["config.alpha", "'0.5' (str)", "a number"]),
        ({"prompt": "a", "confidence_threshold": True}, ["config.confidence_threshold", "True (bool)"]),
        ({"prompt": "a", "max_objects": 0}, ["config.max_objects", "0", "between 1 and 64"]),
        ({"prompt": "a", "max_objects": 65}, ["config.max_objects", "65", "between 1 and 64"]),
        ({"prompt": "a", "max_objects": 2.5}, ["config.max_objects", "2.5", "whole number"]),
        ({"prompt": "a", "mode": "m" * 10_000}, ["config.mode", "..."]),  # a bounded quote of what was sent
        ({"prompt": "a", "confidence_threshold": 1.5}, ["config.confidence_threshold", "1.5", "0.0 and 1.0"]),
        ({"prompt": "a", "alpha": -0.1}, ["config.alpha", "-0.1", "0.0 and 1.0"]),
        ({"prompt": "a", "mode": "boxes"}, ["config.mode", "'boxes'", "mask", "overlay"]),
        ({"prompt": "a", "confidence_treshold": 0.2}, ["config.confidence_treshold", "not a known field"]),
    ],
)
def test_invalid_config_names_field_limit_and_value(config, words):
    with pytest.raises(InvalidJob) as info:
        parse_config(config)
    for word in words:
        assert word in str(info.value)


def test_boundaries_are_inclusive():
    assert parse_config({"prompt": "x" * 500, "confidence_threshold": 0.0, "alpha": 1.0}).alpha == 1.0


def test_unknown_job_type_is_named():
    with pytest.raises(UnknownJobType, match="inference.flux"):
        parse_job({"type": "inference.flux.txt2img.v1", "config": {"prompt": "a"}})


def test_non_object_job_is_rejected():
    with pytest.raises(InvalidJob, match="JSON object"):
        parse_job(["prompt"])


@pytest.mark.parametrize(
    "exc", [InvalidJob("bad"), UploadTooLarge("big"), UnsupportedMedia("nope"), Overloaded("full", 7)]
)
def test_errors_survive_pickling(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args


def test_status_table():
    assert http_status(UnknownJobType("x")) == 400
    assert http_status(UploadTooLarge("x")) == 413
    assert http_status(UnsupportedMedia("x")) == 415
    assert http_status(Overloaded("x", 3)) == 429
    assert Overloaded("x", 3).retry_after_s == 3
    assert http_status(ValueError("ours")) == 500
    assert all(issubclass(cls, ServiceError) for cls, _ in HTTP_STATUS)


def test_every_error_type_has_its_own_code_and_comes_back_from_it():
    from serve_app.errors import _all, error_from_code

    types = _all(ServiceError)
    assert len({cls.code for cls in types}) == len(types)
    for cls in types:
        rebuilt = error_from_code(cls.code, "message", 3)
        assert type(rebuilt) is cls and str(rebuilt) == "message"
    assert error_from_code("overloaded", "busy", 7).retry_after_s == 7
    assert type(error_from_code("from_a_newer_server", "x")) is ServiceError


def test_the_python_client_rebuilds_the_exact_type_from_the_answer():
    from serve_app.client import error_from
    from serve_app.errors import VideoLimitExceeded

    # Both are 413: only the code tells them apart.
    too_big = error_from(413, b'{"error": "upload is 131 MB; the limit is 100 MB", "code": "upload_too_large"}')
    too_long = error_from(413, b'{"error": "video has 20000 frames", "code": "video_limit_exceeded"}')
    assert type(too_big) is UploadTooLarge and type(too_long) is VideoLimitExceeded
    assert str(too_long) == "HTTP 413: video has 20000 frames"
    assert type(error_from(502, b"<html>bad gateway</html>")) is ServiceError  # not ours: no code


def test_an_error_with_a_retry_time_reads_as_its_message():
    assert str(Overloaded("the queue is full; retry later", 5)) == "the queue is full; retry later"


def test_extension_fields_are_echoed_only_when_sent():
    assert "max_objects" not in parse_config({"prompt": "fish"}).echo()
    assert parse_config({"prompt": "fish", "max_objects": 3}).echo()["max_objects"] == 3
    assert parse_config({"prompt": "fish", "confidence_threshold": 1}).confidence_threshold == 1.0  # 1 is a number


def test_messages_quote_what_was_sent_within_bounds():
    with pytest.raises(InvalidJob) as info:
        parse_config({"prompt": [[[[["x" * 100_000]]]]]})
    assert len(str(info.value)) < 200
