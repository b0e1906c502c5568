"""The shipped deploy files pass Ray's validators and ours; broken ones fail with a message that
names the file, the key path and what would be right. No Ray is started (conftest refuses it)."""

import copy
import pathlib

import pytest
import yaml

from serve_app.app import APP_NAME
from serve_app.cli import main
from serve_app.deploy_check import check_cluster_config, check_files, check_fit, check_serve_config

REPO = pathlib.Path(__file__).resolve().parents[2]
SERVE = REPO / "serve_config.yaml"
CLUSTER = REPO / "cluster.yaml"


@pytest.fixture()
def serve_cfg():
    return yaml.safe_load(SERVE.read_text())


@pytest.fixture()
def cluster_cfg():
    return yaml.safe_load(CLUSTER.read_text())


def serve_problems(cfg):
    return check_serve_config(cfg, "serve_config.yaml")[0]


def cluster_problems(cfg):
    return check_cluster_config(cfg, "cluster.yaml")[0]


def test_shipped_files_pass_every_check_together():
    assert check_files([str(SERVE), str(CLUSTER)]) == []


def test_shipped_serve_config_deploys_the_app_handles_look_up(serve_cfg):
    (app,) = serve_cfg["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (APP_NAME, "serve_app.app:build_app", "/")
    assert "deployments" not in app  # replicas and resources come from args, validated by AppArgs


def test_serve_schema_alone_drops_a_misspelt_key_and_the_check_catches_it(serve_cfg):
    from ray.serve.schema import ServeDeploySchema

    serve_cfg["applications"][0]["deployments"] = [{"name": "Decoder", "max_replicas_per_nod": 1}]
    parsed = ServeDeploySchema.model_validate(serve_cfg)  # Serve accepts it and forgets the key
    assert parsed.applications[0].deployments[0].model_fields_set == {"name"}
    assert [str(p) for p in serve_problems(serve_cfg)] == [
        "serve_config.yaml: applications[0].deployments[0].max_replicas_per_nod is not a known key; "
        "did you mean max_replicas_per_node?"
    ]


def _set(cfg, where, key, value):
    node = cfg
    for part in where:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[key] = value


@pytest.mark.parametrize(
    "where, key, expected_path, suggestion",
    [
        ((), "proxy_locaton", "proxy_locaton", "proxy_location"),
        (("http_options",), "request_timout_s", "http_options.request_timout_s", "request_timeout_s"),
        (("applications", 0), "rout_prefix", "applications[0].rout_prefix", "route_prefix"),
        (("applications", 0, "args"), "tracker_max_replica", "applications[0].args.tracker_max_replica",
         "tracker_max_replicas"),
        (("applications", 0, "args", "limits"), "max_byte", "applications[0].args.limits.max_byte", "max_bytes"),
        (("applications", 0, "args", "tracker"), "warm_size", "applications[0].args.tracker.warm_size", "warm_sizes"),
        (("applications", 0, "deployments", 0), "health_check_period", "applications[0].deployments[0].health_check_period",
         "health_check_period_s"),
        (("applications", 0, "deployments", 0, "autoscaling_config"), "min_replica",
         "applications[0].deployments[0].autoscaling_config.min_replica", "min_replicas"),
    ],
)
def test_misspelt_key_at_any_depth_is_named_with_a_suggestion(serve_cfg, where, key, expected_path, suggestion):
    serve_cfg["applications"][0]["deployments"] = [{"name": "Decoder"}]
    _set(serve_cfg, where, key, 1)
    problems = serve_problems(serve_cfg)
    hit = [p for p in problems if p.path == expected_path]
    assert hit, problems
    assert f"did you mean {suggestion}?" in str(hit[0]) and str(hit[0]).startswith("serve_config.yaml: ")


def test_unknown_key_without_a_near_miss_lists_the_known_ones(serve_cfg):
    serve_cfg["http_options"]["zzz"] = 1
    (problem,) = serve_problems(serve_cfg)
    assert "known keys:" in problem.message and "request_timeout_s" in problem.message


def test_app_args_values_are_checked_by_app_args(serve_cfg):
    serve_cfg["applications"][0]["args"].update(tracker_max_replicas=0, encoder_preset=7)
    by_path = {p.path: p.message for p in serve_problems(serve_cfg)}
    assert "greater than or equal to 1" in by_path["applications[0].args.tracker_max_replicas"]
    assert "applications[0].args.encoder_preset" in by_path


def test_import_path_must_resolve_to_build_app(serve_cfg):
    serve_cfg["applications"][0]["import_path"] = "serve_app.app:buildapp"
    (problem,) = serve_problems(serve_cfg)
    assert problem.path == "applications[0].import_path" and "does not import" in problem.message
    serve_cfg["applications"][0]["import_path"] = "serve_app.app:AppArgs"
    (problem,) = serve_problems(serve_cfg)
    assert "serve_app.app:build_app" in problem.message


def test_deployment_overrides_of_what_args_set_are_refused(serve_cfg):
    serve_cfg["applications"][0]["deployments"] = [
        {"name": "Tracker", "ray_actor_options": {"num_cpus": 2}},  # would drop num_gpus
        {"name": "Tracker", "health_check_period_s": 30},  # build_app leaves this alone: allowed
        {"name": "Trackr"},
    ]
    problems = {p.path: p.message for p in serve_problems(serve_cfg)}
    assert "dropping num_gpus" in problems["applications[0].deployments[0].ray_actor_options"]
    assert "Decoder, Tracker, Encoder, Ingress" in problems["applications[0].deployments[2].name"]
    assert len(problems) == 2


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),
         "available_node_types.gpu_worker.min_worker is not a known key; did you mean min_workers?"),
        (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute is not a known key"),
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=7),  # sum > global max
         "Ray's validator refuses it: The specified global `max_workers` is smaller"),
        (lambda c: c.update(head_node_type="ray.head"), "`head_node_type` must be one of"),
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
         "available_node_types.gpu_worker.resources.GPU is invalid"),
    ],
)
def test_invalid_cluster_config_fails_rays_validator(cluster_cfg, mutate, expected):
    mutate(cluster_cfg)
    assert any(expected in str(p) for p in cluster_problems(cluster_cfg)), cluster_problems(cluster_cfg)


def test_type_min_above_max_is_caught_although_ray_accepts_it(cluster_cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster_cfg["available_node_types"]["gpu_worker"].update(min_workers=3, max_workers=2)
    validate_config(prepare_config(copy.deepcopy(cluster_cfg)))  # Ray would launch 2, silently
    assert [str(p) for p in cluster_problems(cluster_cfg)] == [
        "cluster.yaml: available_node_types.gpu_worker.min_workers is 3, above max_workers 2"
    ]


def test_a_node_started_without_the_proxy_body_cap_is_reported(cluster_cfg):
    cluster_cfg["worker_start_ray_commands"] = ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]
    assert [str(p) for p in cluster_problems(cluster_cfg)] == [
        "cluster.yaml: worker_start_ray_commands[1] starts Ray without RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="
        "serve_app.api.proxy:middlewares; that node's HTTP proxy would read uploads of any size into memory"
    ]


def test_a_replica_no_node_type_can_hold_is_reported(serve_cfg, cluster_cfg):
    serve_cfg["applications"][0]["args"]["tracker_num_cpus"] = 1  # the GPU type offers 0 CPUs
    problems, replicas = check_serve_config(serve_cfg, "serve_config.yaml")
    assert problems == []
    cluster = check_cluster_config(cluster_cfg, "cluster.yaml")[1]
    (problem,) = check_fit(replicas, cluster, "serve_config.yaml", "cluster.yaml")
    assert "binds Tracker" in problem.message and "'GPU': 1" in problem.message


def test_cli_check_config_exit_status_and_message(tmp_path, capsys, serve_cfg):
    assert main(["check-config", str(SERVE), str(CLUSTER)]) == 0
    serve_cfg["applications"][0]["args"]["max_queued_request"] = 8
    bad = tmp_path / "serve_config.yaml"
    bad.write_text(yaml.safe_dump(serve_cfg))
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: applications[0].args.max_queued_request is not a known key; did you mean max_queued_requests?" in err
