"""Every CLI path that cannot go on ends in one line, `error: ...`, and exit status 2."""

import os

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


class Recorder:
    """Two small real HTTP servers on loopback: `origin` redirects every request to `location`
    but `/moved`, which it answers; both record each request and its Authorization header."""

    def __init__(self):
        import http.server
        import threading

        from testkit.net import free_port

        self.seen, self.location, recorder = [], "", self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                recorder.seen.append((self.server.server_address[0], self.path, self.headers.get("Authorization")))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.server is recorder.origin and self.path != "/moved":
                    self.send_response(302)
                    self.send_header("Location", recorder.location)
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"ok")

            do_GET = do_POST = answer

        self.origin = http.server.HTTPServer(("127.0.0.1", free_port()), Handler)
        self.target = http.server.HTTPServer(("127.0.0.2", free_port()), Handler)
        for server in (self.origin, self.target):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self):
        for server in (self.origin, self.target):
            server.shutdown()


def test_the_token_never_follows_a_redirect_to_another_origin(clip, tmp_path, capsys, monkeypatch):
    from serve_app.client import _call
    from serve_app.errors import ServiceError

    servers = Recorder()
    try:
        origin = f"http://127.0.0.1:{servers.origin.server_address[1]}"
        elsewhere = f"http://127.0.0.2:{servers.target.server_address[1]}"
        servers.location = f"{elsewhere}/v2/job/async"
        monkeypatch.setenv("SAM3_VIDEO_TOKEN", "secret-token")
        argv = ["segment", str(clip), "-o", str(tmp_path / "o.mp4"), "--prompt", "red", "--url", origin, "-q"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"redirected to {elsewhere}/v2/job/async, another origin" in err and err.count("\n") == 1
        with pytest.raises(ServiceError, match="another origin"):  # a poll's GET, as urllib would follow it
            _call("GET", f"{origin}/v2/job/async/x/job.json", None, {"Authorization": "Bearer secret-token"})
        assert [host for host, _, _ in servers.seen] == ["127.0.0.1", "127.0.0.1"]  # the other got nothing
        servers.location = f"{origin}/moved"  # within the origin: followed, token and all
        token = {"Authorization": "Bearer secret-token"}
        assert _call("GET", f"{origin}/v2/job/async/x/job.json", None, token) == b"ok"
        assert servers.seen[-1] == ("127.0.0.1", "/moved", "Bearer secret-token")
    finally:
        servers.close()


def test_the_embedded_start_leaves_rays_auth_mode_as_it_finds_it(monkeypatch):
    import ray

    from serve_app.app import start_app

    class Started(Exception):
        pass

    def init(**kwargs):
        raise Started(kwargs)

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Started):
        start_app({"tracker": "fake"})
    assert "RAY_AUTH_MODE" not in os.environ  # Ray's token auth stays on, its default


def test_concepts_boxes_and_a_prompt_frame_from_the_command_line(clip, tmp_path, capsys):
    import json

    out = tmp_path / "o.mp4"
    argv = ["segment", str(clip), "-o", str(out), "--tracker", "fake", "--local", "-q", "--objects",
            "--prompt", "red circle", "--prompt", "blue", "--negative-box", "0,0,4,4", "--prompt-frame", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "o.objects.json").read_text())
    assert data["prompts"] == ["red circle", "blue"] and len(data["frames"]) == 6
    assert {o["prompt"] for frame in data["frames"] for o in frame} == {"red circle", "blue"}
    assert main(["segment", str(clip), "-o", str(out), "--tracker", "fake", "--local", "--box", "1,2,3"]) == 2
    assert one_line_error(capsys) == "error: box '1,2,3' is not X,Y,W,H (four numbers, in the video's pixels)"
    assert main(["segment", str(clip), "-o", str(out), "--tracker", "fake", "--local", "--prompt", "red",
                 "--prompt-frame", "6"]) == 2
    assert one_line_error(capsys) == "error: config.prompt_frame is 6; the video has 6 frames, 0 to 5"
