"""The CLI's two ways of reaching the graph: an embedded local Ray, or a running service's URL."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from serve_app.contract import JOB_TYPE, JobConfig
from serve_app.errors import HTTP_STATUS, Overloaded, ServiceError


def start_graph(app_args: dict[str, Any], address: str | None = None, http: tuple[str, int] | None = None):
    """Start (or join, with `address`) Ray and run the app; returns its handle."""
    import ray
    from ray import serve

    from serve_app.app import APP_NAME, build_app
    from serve_app.proxy import install_env

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    install_env()  # the HTTP proxy's body cap; only proxies started after this load it
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # Stage replicas reserve logical CPUs (4 in all by default); on a small machine they
            # would wait forever for them, so a local cluster counts at least that many.
            ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    if http is not None:
        serve.start(http_options={"host": http[0], "port": http[1]})
    return serve.run(build_app(app_args), name=APP_NAME, route_prefix="/" if http else None)


def segment_via_graph(handle, video: bytes, config: JobConfig):
    return handle.segment_result.remote(video, config).result()


def _multipart(job: dict, video: bytes) -> tuple[bytes, str]:
    boundary = os.urandom(12).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"job\"; filename=\"job.json\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(job)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"input\"; filename=\"input.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode()
    return head + video + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def segment_via_url(url: str, video: bytes, config: JobConfig, token: str | None = None,
                    timeout_s: float = 3600) -> tuple[bytes, dict[str, str]]:
    """POST /v2/job to a running service; returns (mp4, response headers). Errors come back
    as the service's typed errors, rebuilt from the status code and message."""
    body, ctype = _multipart({"type": JOB_TYPE, "config": config.model_dump()}, video)
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
            raise _error_from(exc.code, exc.read(), exc.headers.get("Retry-After")) from None
    raise AssertionError("unreachable")


def _error_from(status: int, body: bytes, retry_after: str | None = None) -> ServiceError:
    try:
        message = json.loads(body).get("error", "")
    except ValueError:
        message = body.decode("utf-8", "replace")[:500]
    message = f"HTTP {status}: {message}"
    if status == 429:
        return Overloaded(message, int(float(retry_after or 5)))
    for cls, code in HTTP_STATUS:
        if code == status:
            return cls(message)
    return ServiceError(message)
