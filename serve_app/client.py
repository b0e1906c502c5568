"""A running service's client, through its URL: what `sam3-video segment --url` uses."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from serve_app.contract import JOB_TYPE, JobConfig
from serve_app.errors import JobTimeout, ServiceError, error_from_code


def multipart_job(job: dict, video: bytes) -> tuple[bytes, str]:
    """A /v2/job request body as the official client sends it: (body, Content-Type)."""
    from serve_app.api.answers import multipart_body

    return multipart_body([("job", "job.json", "application/json", json.dumps(job).encode()),
                           ("input", "input.mp4", "video/mp4", video)])


def segment_via_url(url: str, video: bytes, config: JobConfig, token: str | None = None,
                    progress: Callable[[int, int], None] | None = None, poll_s: float = 0.5,
                    timeout_s: float = 3600) -> tuple[dict[str, bytes], dict]:
    """Run a job on a running service through its async API: submit, follow its progress
    (`progress(frames done, frames in all)`), fetch its files. Returns ({name: bytes}, the
    job JSON). Errors come back as the service's typed errors, rebuilt from their `code`."""
    base = url.rstrip("/") + "/v2/job/async"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body, ctype = multipart_job({"type": JOB_TYPE, "config": config.echo()}, video)
    job = json.loads(_call("POST", base, body, {**headers, "Content-Type": ctype}))
    deadline = time.monotonic() + timeout_s
    try:
        while job["state"]["current"] not in ("processed", "failed"):
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {job['id']} was not done within {timeout_s:g} s")
            time.sleep(poll_s)
            job = json.loads(_call("GET", f"{base}/{job['id']}/job.json", None, headers))
            if progress is not None and job["progress"]["frames_total"]:
                progress(job["progress"]["frames_done"], job["progress"]["frames_total"])
    except BaseException:  # given up (timeout, Ctrl-C): the job must not go on using the tracker
        with contextlib.suppress(Exception):
            _call("DELETE", f"{base}/{job['id']}", None, headers)
        raise
    if job["state"]["current"] == "failed":
        raise error_from_code(job.get("code"), job.get("error") or "the job failed")
    names = json.loads(_call("GET", f"{base}/{job['id']}/output", None, headers))
    return {name: _call("GET", f"{base}/{job['id']}/output/{name}", None, headers) for name in names}, job


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Redirects within the service's origin only: urllib would send the bearer token on to
    wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        origin = [urllib.parse.urlsplit(u)[:2] for u in (req.full_url, newurl)]
        if origin[0] != origin[1]:
            raise ServiceError(f"{req.full_url} redirected to {newurl}, another origin; not followed, so the "
                               "token goes nowhere else")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOrigin)


def _call(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    """One request; 429 waits Retry-After and tries again (10 times), as the official client does."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    for attempt in range(10):
        try:
            with _OPENER.open(request, timeout=300) as response:
                return response.read()
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
