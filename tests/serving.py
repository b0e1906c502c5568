"""A real local Ray cluster with Serve's HTTP proxy, shared by the integration and e2e tiers.

One cluster per test session: starting Ray costs ~4 s and each application ~5-10 s on two cores,
so apps are deployed once (by name) and reused. Deployments stop fast (graceful_shutdown_* small
in AppArgs) so the session ends in seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

from testkit.doubles import SCRIPTED_TRACKER
from testkit.net import free_port

REPO = Path(__file__).resolve().parent.parent

# Every test app: the scripted stand-in tracker on CPU, quick to stop.
TEST_APP_ARGS: dict[str, Any] = {
    "tracker": SCRIPTED_TRACKER,
    "graceful_shutdown_timeout_s": 0.5, "tracker_drain_timeout_s": 0.5,
    "job_min_free_bytes": 0,  # a test machine's disk may be small; test_full_disk.py sets its own
}


@dataclass
class Cluster:
    http_port: int
    metrics_port: int
    apps: dict[str, str] = field(default_factory=dict)  # app name -> base URL
    stores: dict[str, str] = field(default_factory=dict)  # app name -> its job_store

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def deploy(self, name: str, route_prefix: str, **app_args: Any) -> str:
        """Deploy `build_app(TEST_APP_ARGS | app_args)` once per session, its async jobs in a
        store of its own (`job_store`); returns its base URL."""
        if name not in self.apps:
            from ray import serve

            from serve_app.app import build_app

            app_args.setdefault("job_store", tempfile.mkdtemp(prefix=f"jobs-{name}-"))
            self.stores[name] = app_args["job_store"]
            serve.run(build_app({**TEST_APP_ARGS, **app_args}), name=name, route_prefix=route_prefix)
            self.apps[name] = self.base + route_prefix.rstrip("/")
        return self.apps[name]

    @contextmanager
    def one_off(self, name: str, route_prefix: str, **app_args: Any) -> Iterator[str]:
        """An app for one test, deleted after it: each app holds ~2 of the cluster's 16 logical CPUs."""
        from ray import serve

        try:
            yield self.deploy(name, route_prefix, **app_args)
        finally:
            serve.delete(name)
            self.apps.pop(name, None)


def start_cluster(env: dict[str, str] | None = None) -> Cluster:
    """ray.init + serve.start on free ports. `env` is set before Ray starts, so every worker
    (and so every replica) inherits it."""
    import ray
    from ray import serve

    from serve_app.api.proxy import install_env

    os.environ.update(env or {})
    install_env()  # as `sam3-video serve` runs it: the proxy stops reading past the upload cap
    # Replicas import the test doubles from this checkout.
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    cluster = Cluster(http_port=free_port(), metrics_port=free_port())
    # Logical CPUs: the test apps reserve ~2 each and two cores must hold several apps.
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=cluster.metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port})
    return cluster


def stop_cluster() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """{part name: bytes} of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {}
    for part in message.iter_parts():
        parts[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
    return parts


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)
