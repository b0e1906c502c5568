"""Offline checks of the deployment files, before `serve deploy` or `ray up` meets them.

    sam3-video check-config serve_config.yaml cluster.yaml

A Serve config goes through Serve's own schema (`ServeDeploySchema`), and then through a walk
of that schema's pydantic models that refuses unknown keys: the schema itself drops a misspelt
`max_ongoing_request` and deploys the default. `args:` go through AppArgs, the graph is bound
with them (no Ray is started), and `deployments:` overrides of options build_app sets are
refused. A cluster config goes through Ray's cluster-launcher schema and checks, as `ray up`
applies them, minus the cloud calls. Given both, each replica's resource request must fit a
node type the cluster declares. A KubeRay RayService manifest goes through the RayService
CRD's schema and its embedded Serve config through the checks above (deploy_kuberay.py).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    file: str
    path: str  # key path in the file, e.g. applications[0].args.tracker_max_replicas
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path + ' ' if self.path else ''}{self.message}"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _unknown(file: str, path: str, key: str, known: list[str]) -> Problem:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return Problem(file, _join(path, key), f"is not a known key; {hint}")


# -- unknown keys, by walking the pydantic models a mapping is validated into ------------------
def unknown_keys(model: type[BaseModel], data: Any, file: str, path: str = "") -> list[Problem]:
    """Keys in `data` (and in every nested mapping) that `model` does not declare."""
    if not isinstance(data, dict) or model.model_config.get("extra") == "allow":
        return []  # wrong types are the schema's to report; extra="allow" is free-form by design
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                fields[alias] = field
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(_unknown(file, path, key, list(model.model_fields)))
        else:
            problems += _walk(fields[key].annotation, value, file, _join(path, key))
    return problems


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(tp: Any, value: Any, file: str, path: str) -> list[Problem]:
    if _is_model(tp):
        return unknown_keys(tp, value, file, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _walk(args[0], value, file, path)
    if origin in (typing.Union, types.UnionType):
        # A tagged union (the tracker's `kind`): judge a mapping by the member its tag names.
        tagged = [m for m in args if _is_model(m) and "kind" in m.model_fields]
        if isinstance(value, dict) and tagged:
            chosen = [m for m in tagged if m.model_fields["kind"].default == value.get("kind")]
            return unknown_keys(chosen[0], value, file, path) if chosen else []
        # `Union[Dict, AutoscalingConfig]` keeps a dict as a dict, and Serve builds the model
        # from it only at deploy time: judge a mapping by the model member when there is one.
        for member in sorted(args, key=lambda a: not _is_model(a)):
            if (isinstance(value, dict) and _is_model(member)) or (
                isinstance(value, list) and typing.get_origin(member) is list
            ):
                return _walk(member, value, file, path)
        return []
    if origin is list and isinstance(value, list) and args:
        return [p for i, item in enumerate(value) for p in _walk(args[0], item, file, _join(path, i))]
    return []  # plain dicts (args, runtime_env, user_config) and scalars: nothing to walk


def _pydantic_problems(err: ValidationError, data: Any, file: str, path: str) -> list[Problem]:
    out = []
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            continue  # unknown_keys reported it, with a suggestion
        where, node = path, data
        for part in e["loc"]:  # pydantic adds union member names to loc; keep real keys only
            if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
                where, node = _join(where, part), node[part]
        if e["type"] == "missing":
            where = _join(where, e["loc"][-1])
            out.append(Problem(file, where, "is required"))
            continue
        got = "" if isinstance(e.get("input"), (dict, list)) else f" (got {e.get('input')!r})"
        out.append(Problem(file, where, f"is invalid: {e['msg']}{got}"))
    return out


# -- Serve config -------------------------------------------------------------------------------
def check_serve_config(data: Any, file: str) -> tuple[list[Problem], list[tuple[str, str, dict]]]:
    """Problems, and each bound replica's (app path, deployment name, ray_actor_options)."""
    from ray.serve.schema import ServeDeploySchema

    problems = unknown_keys(ServeDeploySchema, data, file)
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        problems += _pydantic_problems(err, data, file, "")
    replicas: list[tuple[str, str, dict]] = []
    apps = data.get("applications") if isinstance(data, dict) else None
    for i, app in enumerate(apps if isinstance(apps, list) else []):
        if isinstance(app, dict):
            problems += _check_app(app, file, f"applications[{i}]", replicas)
    return problems, replicas


def _check_app(app: dict, file: str, path: str, replicas: list) -> list[Problem]:
    from ray._common.utils import import_attr

    from serve_app.app import AppArgs, build_app

    import_path = app.get("import_path")
    if not isinstance(import_path, str):
        return []  # the schema has reported it
    try:
        target = import_attr(import_path)
    except Exception as exc:  # whatever importing user code raises
        return [Problem(file, _join(path, "import_path"), f"is {import_path!r}, which does not import: {exc}")]
    if target is not build_app:
        return [Problem(file, _join(path, "import_path"),
                        f"is {import_path!r}; this project's app is serve_app.app:build_app")]
    args = app.get("args") or {}
    problems = unknown_keys(AppArgs, args, file, _join(path, "args"))
    try:
        AppArgs.model_validate(args)
    except ValidationError as err:
        problems += _pydantic_problems(err, args, file, _join(path, "args"))
    if problems:
        return problems
    # Serve's own expansion of the graph (private API, ray is pinned <3): it needs no running Ray
    # and yields each deployment with the options build_app set on it.
    from ray.serve._private.build_app import build_app as expand

    try:
        built = expand(build_app(args), name=app.get("name", "app")).deployments
    except Exception as exc:  # anything build_app or Serve's option checks raise
        return [Problem(file, _join(path, "args"), f"build_app refuses them: {exc}")]
    return _check_overrides(app, {d.name: d for d in built}, file, path, replicas)


def _check_overrides(app: dict, deployments: dict, file: str, path: str, replicas: list) -> list[Problem]:
    replicas += [(path, name, dict(d.ray_actor_options or {})) for name, d in deployments.items()]
    problems = []
    for j, override in enumerate(app.get("deployments") or []):
        where = _join(_join(path, "deployments"), j)
        name = override.get("name") if isinstance(override, dict) else None
        if name not in deployments:
            problems.append(Problem(file, _join(where, "name"),
                                    f"is {name!r}; the graph's deployments are {', '.join(deployments)}"))
            continue
        deployment = deployments[name]
        owned = deployment._deployment_config.user_configured_option_names  # private too, as above
        gpu = "num_gpus" in (deployment.ray_actor_options or {})
        for key in override:
            if key != "name" and key in owned:
                problems.append(Problem(file, _join(where, key), (
                    f"overrides what build_app sets on {name} from args; set it through args "
                    "(AppArgs in serve_app/app.py): Serve replaces the option whole"
                    + (", dropping num_gpus" if key == "ray_actor_options" and gpu else "") + ".")))
    return problems


# -- cluster config -----------------------------------------------------------------------------
def check_cluster_config(data: Any, file: str) -> tuple[list[Problem], dict | None]:
    """Problems, and the config as `ray up` would see it after Ray fills its defaults."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(data, dict) or not isinstance(data.get("provider"), dict):
        return [Problem(file, "provider", "is missing; a cluster config names its cloud provider")], None
    quiet = logging.getLogger(prepare_config.__module__)  # it logs each default it fills at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        prepared = prepare_config(copy.deepcopy(data))
    except Exception as exc:  # Ray's own preparation: KeyError/ValueError/AssertionError alike
        return [Problem(file, "", f"Ray cannot read it: {exc!r}")], None
    finally:
        quiet.setLevel(level)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    problems = []
    for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(prepared):
        where = ""
        for part in e.absolute_path:
            where = _join(where, part)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known = list(e.schema.get("properties", {}))
            problems += [_unknown(file, where, k, known) for k in e.instance if k not in known]
        else:
            problems.append(Problem(file, where, f"is invalid: {e.message}"))
    if not problems:
        try:
            validate_config(prepared)  # the schema again, plus Ray's cross-key checks
        except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
            problems.append(Problem(file, "", f"Ray's validator refuses it: {exc}"))
    for name, node in (prepared.get("available_node_types") or {}).items():
        # Ray accepts this and silently launches only max_workers (it takes the smaller).
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(Problem(file, _join(_join("available_node_types", name), "min_workers"),
                                    f"is {lo}, above max_workers {hi}"))
    problems += _check_proxy_callback(data, file)
    return problems, prepared


def _check_proxy_callback(data: dict, file: str) -> list[Problem]:
    """Every `ray start` must load serve_app.api.proxy's body cap into the node's HTTP proxy."""
    from serve_app.api.proxy import CALLBACK, CALLBACK_ENV

    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(data.get(key) or []):
            if isinstance(command, str) and "ray start" in command and f"{CALLBACK_ENV}={CALLBACK}" not in command:
                problems.append(Problem(file, f"{key}[{i}]", f"starts Ray without {CALLBACK_ENV}={CALLBACK}; "
                                        "that node's HTTP proxy would read uploads of any size into memory"))
    return problems


def check_fit(replicas: list[tuple[str, str, dict]], cluster: dict, file: str, cluster_file: str) -> list[Problem]:
    """Each replica must fit one node type. A type that declares resources is taken at its word
    (what it leaves out, it has none of); one that leaves them all to AWS autodetection
    (`resources: {}`) cannot be judged offline and counts as fitting."""
    offers = {name: node.get("resources") or {} for name, node in cluster["available_node_types"].items()
              if name == cluster["head_node_type"] or node.get("max_workers", 0) > 0}
    problems = []
    for path, name, opts in replicas:
        need = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **(opts.get("resources") or {})}
        need = {k: v for k, v in need.items() if v}
        if not any(not offer or all(offer.get(k, 0) >= v for k, v in need.items()) for offer in offers.values()):
            problems.append(Problem(file, path, (
                f"binds {name}, which asks {need} per replica; no node type in {cluster_file} offers that "
                f"({'; '.join(f'{n}: {o}' for n, o in offers.items())})")))
    return problems


# -- files --------------------------------------------------------------------------------------
def check_files(paths: list[str]) -> list[Problem]:
    """Check each file by its content (Serve config: `applications:`; cluster: `provider:`;
    KubeRay: `kind: RayService`, serve_app/deploy_kuberay.py)."""
    import yaml

    from serve_app.deploy_kuberay import check_rayservice, is_rayservice

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
