"""Every CLI path that cannot go on ends in one line, `error: ...`, and exit status 2."""

import pytest

from serve_app.cli import main
from serve_app.synthetic import write_clip


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "demo.mp4"
    write_clip(path, 96, 64, 6, 25)
    return path


@pytest.fixture
def no_weights(monkeypatch):
    for name in ("SAM3_CHECKPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("where", [["--local"], []])  # in this process, and through an embedded graph
def test_sam3_without_weights_says_both_ways_to_get_them_before_starting_anything(clip, tmp_path, capsys,
                                                                                 no_weights, where):
    # Without --local the graph would start Ray, which unit tests refuse: the check must come first.
    assert main(["segment", str(clip), "-o", str(tmp_path / "o.mp4"), "--prompt", "x", *where]) == 2
    line = one_line_error(capsys)
    assert "SAM3_CHECKPOINT" in line and "HF_TOKEN" in line


def test_serve_without_weights_refuses_before_starting_ray(capsys, no_weights):
    assert main(["serve", "--port", "0"]) == 2
    assert "SAM3_CHECKPOINT" in one_line_error(capsys)


@pytest.mark.parametrize("argv, words", [
    (["--tracker", "sam4"], "'sam4'"),
    (["--tracker", "fake", "--tracker-option", "min_aera=3"], "min_aera"),
    (["--tracker", "fake", "--tracker-option", "min_area"], "KEY=VALUE"),
    (["--tracker", "fake", "--alpha", "2"], "config.alpha is 2.0"),
])
def test_bad_command_lines_are_one_line(clip, tmp_path, capsys, argv, words):
    assert main(["segment", str(clip), "-o", str(tmp_path / "o.mp4"), "--prompt", "red", "--local", *argv]) == 2
    assert words in one_line_error(capsys)


def test_a_missing_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.mp4"
    assert main(["segment", str(missing), "-o", str(tmp_path / "o.mp4"), "--prompt", "red", "--tracker", "fake",
                 "--local"]) == 2
    assert "nope.mp4" in one_line_error(capsys)


def test_a_job_store_that_cannot_be_written_is_one_line_before_ray_starts(capsys):
    assert main(["serve", "--tracker", "fake", "--arg", "job_store=/proc/nowhere"]) == 2
    assert "the job store '/proc/nowhere'" in one_line_error(capsys)
