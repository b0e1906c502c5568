"""The CLI's two ways of reaching the graph: an embedded local Ray, or a running service's URL."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from serve_app.contract import JOB_TYPE, JobConfig
from serve_app.errors import ModelUnavailable, ServiceError, error_from_code


def start_graph(app_args: dict[str, Any], address: str | None = None, http: tuple[str, int] | None = None):
    """Start (or join, with `address`) Ray and run the app; returns its handle. A graph that
    fails to start raises ModelUnavailable with the cause's last line."""
    import ray
    from ray import serve

    from serve_app.api.proxy import install_env
    from serve_app.app import APP_NAME, build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    install_env()  # the HTTP proxy's body cap; only proxies started after this load it
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    if http is not None:
        serve.start(http_options={"host": http[0], "port": http[1]})
    try:
        return serve.run(build_app(app_args), name=APP_NAME, route_prefix="/" if http else None)
    except RuntimeError as exc:  # Serve's "Deploying application ... failed", a traceback inside
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelUnavailable(f"the graph did not start: {lines[-1] if lines else exc}") from None


def multipart_job(job: dict, video: bytes) -> tuple[bytes, str]:
    """A /v2/job request body as the official client sends it: (body, Content-Type)."""
    from serve_app.api.job import multipart_body

    return multipart_body([("job", "job.json", "application/json", json.dumps(job).encode()),
                           ("input", "input.mp4", "video/mp4", video)])


def segment_via_url(url: str, video: bytes, config: JobConfig, token: str | None = None,
                    timeout_s: float = 3600) -> tuple[bytes, dict[str, str]]:
    """POST /v2/job to a running service; returns (mp4, response headers). Errors come back
    as the service's typed errors, rebuilt from the `code` the answer carries."""
    body, ctype = multipart_job({"type": JOB_TYPE, "config": config.echo()}, video)
    request = urllib.request.Request(url.rstrip("/") + "/v2/job", data=body, method="POST",
                                     headers={"Content-Type": ctype, "Accept": "video/mp4"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for attempt in range(10):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            if exc.code == 429 and attempt < 9:
                time.sleep(float(exc.headers.get("Retry-After", "5")))
                continue
            raise error_from(exc.code, exc.read(), exc.headers.get("Retry-After")) from None
    raise AssertionError("unreachable")


def error_from(status: int, body: bytes, retry_after: str | None = None) -> ServiceError:
    """The typed error an error answer names (its `code`), its message prefixed with the status."""
    try:
        answer = json.loads(body)
        message, code = str(answer.get("error", "")), answer.get("code")
    except (ValueError, AttributeError):
        message, code = body.decode("utf-8", "replace")[:500], None
    return error_from_code(code, f"HTTP {status}: {message}", int(float(retry_after or 5)))
