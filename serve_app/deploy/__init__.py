"""Offline checks of the deployment files, before `serve deploy`, `ray up` or `kubectl apply`
meets them (`sam3-video check-config FILE...`): ray_configs.py checks a Serve config, a Ray
cluster config and whether the one's replicas fit the other, kuberay.py a KubeRay RayService
and its embedded Serve config; problems.py is what they report."""

from serve_app.deploy.kuberay import check_rayservice, is_rayservice
from serve_app.deploy.problems import Problem
from serve_app.deploy.ray_configs import check_cluster_config, check_fit, check_serve_config


def check_files(paths: list[str]) -> list[Problem]:
    """Each file checked as its content says: `applications:`, `provider:` or `kind: RayService`."""
    import yaml

    problems: list[Problem] = []
    replicas: list[tuple[str, str, dict]] = []
    serve_file = cluster = cluster_file = None
    for path in paths:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem(path, "", f"cannot be read as YAML: {exc}"))
            continue
        if isinstance(data, dict) and "applications" in data:
            found, bound = check_serve_config(data, path)
            problems += found
            if not found:
                serve_file, replicas = path, bound
        elif isinstance(data, dict) and ("provider" in data or "available_node_types" in data):
            found, prepared = check_cluster_config(data, path)
            problems += found
            if not found:
                cluster, cluster_file = prepared, path
        elif is_rayservice(data):
            problems += check_rayservice(data, path)  # self-contained: its Serve config is embedded
        else:
            problems.append(Problem(path, "", "is neither a Serve config (applications:), a Ray cluster "
                                              "config (provider:) nor a KubeRay RayService (kind: RayService)"))
    if serve_file and cluster:
        problems += check_fit(replicas, cluster, serve_file, cluster_file)
    return problems
