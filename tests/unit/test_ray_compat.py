"""Each private Ray API serve_app relies on (serve_app/ray_compat.py) still exists and does what
we use it for, on a tiny real input. A Ray release that breaks one fails here, before the bound
in pyproject moves. No Ray is started (conftest refuses it)."""

import copy
import logging

import pytest

from serve_app import ray_compat


def test_import_attr_reads_an_import_path_as_serve_does():
    from serve_app.app import build_app

    assert ray_compat.import_attr("serve_app.app:build_app") is build_app
    assert ray_compat.import_attr("serve_app.app.build_app") is build_app
    with pytest.raises(AttributeError):  # deploy's check reports it as "does not import"
        ray_compat.import_attr("serve_app.app:buildapp")


def _graph():
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    class Leaf:
        pass

    @serve.deployment
    class Root:
        def __init__(self, leaf):
            self.leaf = leaf

    return Root.options(max_ongoing_requests=3).bind(Leaf.bind())


def test_expand_app_yields_each_deployment_with_the_options_its_code_set():
    deployments = {d.name: d for d in ray_compat.expand_app(_graph(), "app")}
    assert set(deployments) == {"Root", "Leaf"}
    assert (deployments["Leaf"].num_replicas, deployments["Leaf"].ray_actor_options) == (2, {"num_cpus": 0.5})
    assert deployments["Root"].max_ongoing_requests == 3


def test_user_configured_options_are_the_ones_the_code_set():
    deployments = {d.name: d for d in ray_compat.expand_app(_graph(), "app")}
    leaf, root = (ray_compat.user_configured_options(deployments[n]) for n in ("Leaf", "Root"))
    assert {"num_replicas", "ray_actor_options"} <= leaf and "max_ongoing_requests" not in leaf
    assert "max_ongoing_requests" in root and not {"num_replicas", "ray_actor_options"} & root


CLUSTER = {
    "cluster_name": "t", "max_workers": 1, "provider": {"type": "aws", "region": "us-west-2"},
    "available_node_types": {"head": {"node_config": {}, "resources": {"CPU": 2}, "max_workers": 0}},
    "head_node_type": "head",
}


def test_prepare_cluster_config_fills_rays_defaults_quietly(caplog):
    logger = logging.getLogger("ray.autoscaler._private.util")
    level = logger.level
    with caplog.at_level(logging.INFO):
        prepared = ray_compat.prepare_cluster_config(copy.deepcopy(CLUSTER))
    assert not [r for r in caplog.records if r.name == logger.name]
    assert logger.level == level
    assert {"idle_timeout_minutes", "upscaling_speed", "worker_start_ray_commands"} <= set(prepared)
    assert prepared["available_node_types"]["head"]["min_workers"] == 0


def test_validate_cluster_config_passes_a_good_one_and_refuses_a_cross_key_error():
    prepared = ray_compat.prepare_cluster_config(copy.deepcopy(CLUSTER))
    ray_compat.validate_cluster_config(prepared)
    with pytest.raises(ValueError, match="head_node_type"):  # what the schema alone cannot say
        ray_compat.validate_cluster_config({**prepared, "head_node_type": "gpu"})


def _group(resources=None, params=None, limits=None):
    group = {"groupName": "g", "rayStartParams": params or {},
             "template": {"spec": {"containers": [{"resources": {"limits": limits or {}}}]}}}
    return group if resources is None else {**group, "resources": resources}


def test_kuberay_group_resources_read_in_kuberays_order():
    assert ray_compat.kuberay_group_resources(
        _group(limits={"cpu": "1500m", "nvidia.com/gpu": 1, "memory": "1Gi"}), False
    ) == {"CPU": 2, "GPU": 1, "memory": 2**30}  # limits, CPUs rounded up
    assert ray_compat.kuberay_group_resources(_group({"CPU": "3"}, {"num-cpus": "5"}, {"cpu": "2"}), True) == {"CPU": 3}
    with pytest.raises(ValueError, match="failed to detect `CPU` resources for group g"):
        ray_compat.kuberay_group_resources(_group(), False)


def test_prefer_local_routing_sets_the_handles_init_option():
    from ray.serve.handle import DeploymentHandle

    routers = []
    handle = DeploymentHandle("Decoder", "app", _create_router=lambda **kw: routers.append(kw) or object())
    ray_compat.prefer_local_routing(handle)
    assert handle.init_options._prefer_local_routing is True
    assert [r["handle_options"]._prefer_local_routing for r in routers] == [True]
    ray_compat.prefer_local_routing(handle)  # already routing: left as it is, no second router
    assert len(routers) == 1
