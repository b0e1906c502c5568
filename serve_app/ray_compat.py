"""Every private Ray API serve_app uses, one small function each; no other module imports one.
Written against Ray 2.60, the one minor pyproject allows: tests/unit/test_ray_compat.py fails
when a release moves or changes any of them."""

import contextlib
import logging
from typing import Any


def import_attr(path: str) -> Any:  # ray/_common/utils.py: an import_path, read as Serve reads one
    from ray._common.utils import import_attr
    return import_attr(path)


def expand_app(app: Any, name: str) -> list:  # ray/serve/_private/build_app.py; needs no running Ray
    from ray.serve._private.build_app import build_app
    return build_app(app, name=name).deployments  # each with the options the graph's code set


def user_configured_options(deployment: Any) -> set[str]:  # ray/serve/deployment.py, _private/config.py
    return deployment._deployment_config.user_configured_option_names  # what a `deployments:` entry replaces


def prepare_cluster_config(config: dict) -> dict:  # ray/autoscaler/_private/util.py: `ray up`'s defaults
    from ray.autoscaler._private.util import prepare_config
    quiet = logging.getLogger(prepare_config.__module__)  # it logs each default it fills at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return prepare_config(config)
    finally:
        quiet.setLevel(level)


def validate_cluster_config(config: dict) -> None:  # ray/autoscaler/_private/util.py: schema + cross-key checks
    from ray.autoscaler._private.util import validate_config
    validate_config(config)


def kuberay_group_resources(group: dict, is_head: bool) -> dict:  # ray/autoscaler/_private/kuberay/autoscaling_config.py
    # KubeRay's `ray start` flags, in its order: the group's `resources`, else rayStartParams, else the
    # Ray container's limits, rounded up; ValueError where it cannot tell the CPUs (the autoscaler fails too).
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
    return _get_ray_resources_from_group_spec(group, is_head)


def prefer_local_routing(handle: Any) -> None:  # ray/serve/handle.py: an init option of an unused handle
    with contextlib.suppress(AttributeError, RuntimeError, TypeError):  # local testing mode's handle, or one routing
        handle._init(_prefer_local_routing=True)


def actor_alive(handle: Any, timeout_s: float = 5.0) -> bool:  # ray/actor.py: every actor's __ray_ready__
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
    except RayActorError:
        return False
    except GetTimeoutError:  # busy, not gone
        pass
    return True
