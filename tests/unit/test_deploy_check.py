"""The shipped deploy files pass Ray's validators and ours; broken ones fail with a message that
names the file, the key path and what would be right. No Ray is started (conftest refuses it)."""

import copy
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from serve_app.app import APP_NAME
from serve_app.cli import main
from serve_app.deploy import check_files
from serve_app.deploy.ray_configs import check_cluster_config, check_fit, check_serve_config

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
    from serve_app.ray_compat import prepare_cluster_config, validate_cluster_config

    cluster_cfg["available_node_types"]["gpu_worker"].update(min_workers=3, max_workers=2)
    validate_cluster_config(prepare_cluster_config(copy.deepcopy(cluster_cfg)))  # Ray would launch 2, silently
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


# -- KubeRay RayService (deploy/kuberay/rayservice.yaml, serve_app/deploy/kuberay.py) -------------
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"


@pytest.fixture()
def rs_cfg():
    return yaml.safe_load(RAYSERVICE.read_text())


def rs_problems(cfg):
    from serve_app.deploy.kuberay import check_rayservice

    return check_rayservice(cfg, "rayservice.yaml")


def _groups(cfg):
    return cfg["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _embedded(cfg, mutate):
    """Apply `mutate` to the Serve config embedded in spec.serveConfigV2."""
    serve = yaml.safe_load(cfg["spec"]["serveConfigV2"])
    mutate(serve)
    cfg["spec"]["serveConfigV2"] = yaml.safe_dump(serve)


def test_shipped_rayservice_passes_alone_and_beside_the_other_files(capsys):
    assert check_files([str(RAYSERVICE)]) == []
    assert check_files([str(SERVE), str(CLUSTER), str(RAYSERVICE)]) == []
    assert main(["check-config", str(RAYSERVICE)]) == 0
    assert capsys.readouterr().err == f"ok: {RAYSERVICE}\n"


def test_shipped_rayservice_embeds_serve_config_yaml(rs_cfg, serve_cfg):
    assert (rs_cfg["apiVersion"], rs_cfg["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(rs_cfg["spec"]["serveConfigV2"]) == serve_cfg  # edit both together


def test_vendored_crd_schema_names_its_release():
    from serve_app.deploy.kuberay import KUBERAY_VERSION, SCHEMA_FILE, crd_schema

    doc = crd_schema()
    assert (doc["kuberay_version"], doc["crd"], doc["version"]) == (KUBERAY_VERSION, "rayservices.ray.io", "v1")
    assert len(doc["commit"]) == 40 and doc["license"] == "Apache-2.0"
    assert len(SCHEMA_FILE.read_bytes()) < 300_000
    spec = doc["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["rayClusterConfig"] and "serveConfigV2" in spec["properties"]


@pytest.mark.parametrize(
    "mutate, expected_path, suggestion",
    [
        (lambda c: c["spec"].update(serveConfigv2="{}"), "spec.serveConfigv2", "serveConfigV2"),
        (lambda c: c["metadata"].update(lables={}), "metadata.lables", "labels"),
        (lambda c: c["spec"]["rayClusterConfig"].update(enableInTreeAutoscale=True),
         "spec.rayClusterConfig.enableInTreeAutoscale", "enableInTreeAutoscaling"),
        (lambda c: _groups(c)[0].update(replica=1), "spec.rayClusterConfig.workerGroupSpecs[0].replica", "replicas"),
        (lambda c: _groups(c)[1]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
         "spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].imagePullPolcy", "imagePullPolicy"),
        (lambda c: _groups(c)[1]["template"]["spec"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"]
         .update(nme="x"),
         "spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].env[1].valueFrom.secretKeyRef.nme",
         "name"),
        (lambda c: _groups(c)[1]["template"]["spec"]["tolerations"][0].update(efect="NoSchedule"),
         "spec.rayClusterConfig.workerGroupSpecs[1].template.spec.tolerations[0].efect", "effect"),
        (lambda c: _embedded(c, lambda s: s.update(proxy_locaton="EveryNode")),
         "spec.serveConfigV2.proxy_locaton", "proxy_location"),
        (lambda c: _embedded(c, lambda s: s["applications"][0]["args"].update(tracker_max_replica=4)),
         "spec.serveConfigV2.applications[0].args.tracker_max_replica", "tracker_max_replicas"),
        (lambda c: _embedded(c, lambda s: s["applications"][0]["args"]["tracker"].update(warm_size=[1])),
         "spec.serveConfigV2.applications[0].args.tracker.warm_size", "warm_sizes"),
    ],
)
def test_rayservice_misspelt_key_at_any_depth_is_named_with_a_suggestion(rs_cfg, mutate, expected_path, suggestion):
    mutate(rs_cfg)
    problems = rs_problems(rs_cfg)
    assert [p.path for p in problems] == [expected_path], problems
    assert f"is not a known key; did you mean {suggestion}?" in str(problems[0])
    assert str(problems[0]).startswith("rayservice.yaml: ")


def test_rayservice_free_form_maps_take_any_key(rs_cfg):
    rs_cfg["metadata"]["labels"] = {"team": "vision", "app.kubernetes.io/name": "sam3-video"}
    rs_cfg["metadata"]["annotations"] = {"example.com/owner": "x"}
    head = rs_cfg["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParams"] = {"metrics-export-port": "8080"}  # additionalProperties: string
    head["template"]["metadata"] = {"labels": {"tier": "control"}}
    head["template"]["spec"]["containers"][0]["resources"]["limits"]["example.com/fpga"] = 1  # int-or-string
    assert rs_problems(rs_cfg) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: _groups(c)[0].update(maxReplicas="2"),
         "spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas is invalid: expected an integer, got string '2'"),
        (lambda c: _groups(c)[1].update(resources={"CPU": 0, "GPU": "1"}),  # a map of strings
         "spec.rayClusterConfig.workerGroupSpecs[1].resources.CPU is invalid: expected a string, got integer 0"),
        (lambda c: c["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling="yes"),
         "spec.rayClusterConfig.enableInTreeAutoscaling is invalid: expected true or false, got string 'yes'"),
        (lambda c: c["spec"]["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="conservative"),
         "spec.rayClusterConfig.autoscalerOptions.upscalingMode is 'conservative'; did you mean Conservative?"),
        (lambda c: _groups(c)[0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="12GB"),
         "containers[0].resources.limits.memory is '12GB', which is not a Kubernetes quantity"),
        (lambda c: _groups(c)[0].pop("groupName"), "spec.rayClusterConfig.workerGroupSpecs[0].groupName is required"),
        (lambda c: c["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
         "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].name is required"),
        (lambda c: c["spec"].pop("rayClusterConfig"), "spec.rayClusterConfig is required"),
        (lambda c: c["metadata"].pop("name"), "metadata.name is required"),
        (lambda c: c["metadata"].update(name="SAM3_video"), "metadata.name is 'SAM3_video'; KubeRay wants a DNS-1035"),
        (lambda c: _groups(c)[1].update(groupName="cpu-worker"),
         "workerGroupSpecs[1].groupName is 'cpu-worker', as spec.rayClusterConfig.workerGroupSpecs[0].groupName is"),
        (lambda c: _groups(c)[1].update(minReplicas=5),
         "spec.rayClusterConfig.workerGroupSpecs[1].minReplicas is 5, above maxReplicas 4"),
        (lambda c: _groups(c)[1].update(rayStartParams={"num-gpus": "1"}),
         "workerGroupSpecs[1].resources is set beside rayStartParams' num-cpus/num-gpus/memory/resources"),
        (lambda c: _embedded(c, lambda s: s["http_options"].update(port=8080)),
         "containers[0].ports[3].containerPort is 8000, but the Serve proxies listen on 8080"),
        (lambda c: c["spec"].update(serveConfigV2="applications: [\n"), "spec.serveConfigV2 is not YAML"),
        (lambda c: _embedded(c, lambda s: s["applications"][0]["args"].update(tracker_max_replicas=0)),
         "spec.serveConfigV2.applications[0].args.tracker_max_replicas is invalid"),
        (lambda c: c.update(apiVersion="ray.io/v1alpha1"), "apiVersion is 'ray.io/v1alpha1'; this check knows"),
    ],
)
def test_rayservice_wrong_types_missing_keys_and_operator_checks_are_reported(rs_cfg, mutate, expected):
    mutate(rs_cfg)
    problems = rs_problems(rs_cfg)
    assert len(problems) == 1 and expected in str(problems[0]), problems


def test_required_key_with_a_crd_default_may_be_left_out(rs_cfg):
    del _groups(rs_cfg)[0]["maxReplicas"]  # required, but the API server fills 2147483647 first
    assert rs_problems(rs_cfg) == []


def test_rayservice_group_without_the_proxy_body_cap_is_reported(rs_cfg):
    env = _groups(rs_cfg)[1]["template"]["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    assert [str(p) for p in rs_problems(rs_cfg)] == [
        "rayservice.yaml: spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].env does not set "
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.proxy:middlewares; that node's HTTP proxy would "
        "read uploads of any size into memory"
    ]


def test_group_ray_resources_are_what_the_autoscaler_plans_with(rs_cfg):
    from serve_app.deploy.kuberay import ray_resources

    head = rs_cfg["spec"]["rayClusterConfig"]["headGroupSpec"]
    cpu, gpu = _groups(rs_cfg)
    assert [ray_resources(head, True), ray_resources(cpu, False), ray_resources(gpu, False)] == [
        {"CPU": 0}, {"CPU": 7}, {"CPU": 0, "GPU": 1}]
    del gpu["resources"]  # then the container's limits: 6 CPUs, 1 nvidia.com/gpu
    assert ray_resources(gpu, False) == {"CPU": 6, "GPU": 1}


def test_group_whose_cpus_the_autoscaler_cannot_tell_is_reported(rs_cfg):
    cpu = _groups(rs_cfg)[0]
    del cpu["resources"]
    for kind in ("requests", "limits"):
        del cpu["template"]["spec"]["containers"][0]["resources"][kind]["cpu"]
    (problem,) = rs_problems(rs_cfg)
    assert problem.path == "spec.rayClusterConfig.workerGroupSpecs[0]"
    assert "Autoscaler failed to detect `CPU` resources for group cpu-worker" in problem.message


def test_rayservice_tracker_gpu_with_no_gpu_group_is_reported(rs_cfg):
    del _groups(rs_cfg)[1]
    (problem,) = rs_problems(rs_cfg)
    assert problem.path == "spec.serveConfigV2.applications[0]"
    assert "binds Tracker, which asks {'GPU': 1} per replica; no Ray group in spec.rayClusterConfig" in problem.message


def test_rayservice_gpu_group_that_advertises_cpus_takes_cpu_stages_too(rs_cfg):
    _groups(rs_cfg)[0].update(replicas=0, minReplicas=0, maxReplicas=0)  # no CPU pods: CPU stages have nowhere to go...
    stages = {p.message.split(",")[0] for p in rs_problems(rs_cfg)}
    assert stages == {"binds Decoder", "binds Encoder", "binds Ingress"}
    del _groups(rs_cfg)[1]["resources"]  # ...unless the GPU pod advertises its 6 cores to Ray
    assert rs_problems(rs_cfg) == []


def test_cli_names_each_rayservice_problem(tmp_path, capsys, rs_cfg):
    _groups(rs_cfg)[0]["replica"] = 1
    _embedded(rs_cfg, lambda s: s["applications"][0]["args"].update(max_queued_request=8))
    bad = tmp_path / "rayservice.yaml"
    bad.write_text(yaml.safe_dump(rs_cfg))
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{bad}: spec.rayClusterConfig.workerGroupSpecs[0].replica is not a known key; did you mean replicas?",
    ]
    del _groups(rs_cfg)[0]["replica"]
    bad.write_text(yaml.safe_dump(rs_cfg))
    assert main(["check-config", str(bad)]) == 1
    assert capsys.readouterr().err == (f"{bad}: spec.serveConfigV2.applications[0].args.max_queued_request is not "
                                       "a known key; did you mean max_queued_requests?\n")


def test_a_file_of_no_known_kind_is_named(tmp_path):
    other = tmp_path / "deployment.yaml"
    other.write_text("apiVersion: apps/v1\nkind: Deployment\n")
    (problem,) = check_files([str(other)])
    assert "kind: RayService" in problem.message


def test_a_plain_install_checks_the_rayservice_with_its_own_crd_schema(tmp_path):
    """Not editable, not run from the checkout: the CRD schema must travel as package data."""
    source, target, elsewhere = tmp_path / "src", tmp_path / "target", tmp_path / "elsewhere"
    shutil.copytree(REPO / "serve_app", source / "serve_app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)  # no stale egg-info or build/ from the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", (
        "import sys, serve_app.cli as cli; print(cli.__file__); sys.exit(cli.main(['check-config', sys.argv[1]]))"),
        str(RAYSERVICE)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.endswith(f"ok: {RAYSERVICE}\n"), run.stderr
    assert pathlib.Path(run.stdout.strip()).is_relative_to(target)
    palette = subprocess.run([sys.executable, "-c", "from serve_app.video.palette import COLORS; print(COLORS.shape)"],
                             cwd=elsewhere, env=env, capture_output=True, text=True)
    assert palette.stdout.strip() == "(128, 3)", palette.stderr  # the overlay colours travel as package data too
