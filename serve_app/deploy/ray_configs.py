"""A Serve config (serve_config.yaml, or a RayService's embedded one) goes through Serve's own
schema (`ServeDeploySchema`), and then through a walk of that schema's pydantic models that
refuses unknown keys: the schema itself drops a misspelt `max_ongoing_request` and deploys the
default. `args:` go through AppArgs, the graph is bound with them (no Ray is started), and
`deployments:` overrides of options build_app sets are refused. A cluster config (cluster.yaml)
goes through Ray's cluster-launcher schema and checks, as `ray up` applies them, minus the cloud
calls. Given both, each replica's resource request must fit a node type the cluster declares.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from importlib import resources
from typing import Any

from pydantic import BaseModel, ValidationError

from serve_app import ray_compat
from serve_app.deploy.problems import Problem, join, unknown_key, unplaced


def unknown_keys(model: type[BaseModel], data: Any, file: str, path: str = "") -> list[Problem]:
    """Keys in `data` (and in every nested mapping) that `model` does not declare."""
    if not isinstance(data, dict) or model.model_config.get("extra") == "allow":
        return []  # wrong types are the schema's to report; extra="allow" is free-form by design
    fields = {**model.model_fields, **{alias: field for field in model.model_fields.values()
                                       for alias in (field.alias, field.validation_alias) if isinstance(alias, str)}}
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(unknown_key(file, path, key, list(model.model_fields)))
        else:
            problems += _walk(fields[key].annotation, value, file, join(path, key))
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
            if isinstance(value, dict) and _is_model(member) or isinstance(value, list) and typing.get_origin(member) is list:
                return _walk(member, value, file, path)
        return []
    if origin is list and isinstance(value, list) and args:
        return [p for i, item in enumerate(value) for p in _walk(args[0], item, file, join(path, i))]
    return []  # plain dicts (args, runtime_env, user_config) and scalars: nothing to walk


def _pydantic_problems(err: ValidationError, data: Any, file: str, path: str) -> list[Problem]:
    out = []
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            continue  # unknown_keys reported it, with a suggestion
        where, node = path, data
        for part in e["loc"]:  # pydantic adds union member names to loc; keep real keys only
            if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
                where, node = join(where, part), node[part]
        if e["type"] == "missing":
            out.append(Problem(file, join(where, e["loc"][-1]), "is required"))
            continue
        got = "" if isinstance(e.get("input"), (dict, list)) else f" (got {e.get('input')!r})"
        out.append(Problem(file, where, f"is invalid: {e['msg']}{got}"))
    return out


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
    from serve_app.app import AppArgs, build_app

    import_path = app.get("import_path")
    if not isinstance(import_path, str):
        return []  # the schema has reported it
    try:
        target = ray_compat.import_attr(import_path)
    except Exception as exc:  # whatever importing user code raises
        return [Problem(file, join(path, "import_path"), f"is {import_path!r}, which does not import: {exc}")]
    if target is not build_app:
        return [Problem(file, join(path, "import_path"),
                        f"is {import_path!r}; this project's app is serve_app.app:build_app")]
    args = app.get("args") or {}
    problems = unknown_keys(AppArgs, args, file, join(path, "args"))
    try:
        AppArgs.model_validate(args)
    except ValidationError as err:
        problems += _pydantic_problems(err, args, file, join(path, "args"))
    if problems:
        return problems
    try:
        built = ray_compat.expand_app(build_app(args), app.get("name", "app"))
    except Exception as exc:  # anything build_app or Serve's option checks raise
        return [Problem(file, join(path, "args"), f"build_app refuses them: {exc}")]
    return _check_overrides(app, {d.name: d for d in built}, file, path, replicas)


def _check_overrides(app: dict, deployments: dict, file: str, path: str, replicas: list) -> list[Problem]:
    replicas += [(path, name, dict(d.ray_actor_options or {})) for name, d in deployments.items()]
    problems = []
    for j, override in enumerate(app.get("deployments") or []):
        where = join(path, "deployments", j)
        name = override.get("name") if isinstance(override, dict) else None
        if name not in deployments:
            problems.append(Problem(file, join(where, "name"),
                                    f"is {name!r}; the graph's deployments are {', '.join(deployments)}"))
            continue
        deployment = deployments[name]
        owned = ray_compat.user_configured_options(deployment)
        gpu = "num_gpus" in (deployment.ray_actor_options or {})
        for key in override:
            if key != "name" and key in owned:
                problems.append(Problem(file, join(where, key), (
                    f"overrides what build_app sets on {name} from args; set it through args "
                    "(AppArgs in serve_app/app.py): Serve replaces the option whole"
                    + (", dropping num_gpus" if key == "ray_actor_options" and gpu else "") + ".")))
    return problems


def check_cluster_config(data: Any, file: str) -> tuple[list[Problem], dict | None]:
    """Problems, and the config as `ray up` would see it after Ray fills its defaults."""
    import jsonschema

    if not isinstance(data, dict) or not isinstance(data.get("provider"), dict):
        return [Problem(file, "provider", "is missing; a cluster config names its cloud provider")], None
    try:
        prepared = ray_compat.prepare_cluster_config(copy.deepcopy(data))
    except Exception as exc:  # Ray's own preparation: KeyError/ValueError/AssertionError alike
        return [Problem(file, "", f"Ray cannot read it: {exc!r}")], None
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    problems = []
    for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(prepared):
        where = join("", *e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known = list(e.schema.get("properties", {}))
            problems += [unknown_key(file, where, k, known) for k in e.instance if k not in known]
        else:
            problems.append(Problem(file, where, f"is invalid: {e.message}"))
    if not problems:
        try:
            ray_compat.validate_cluster_config(prepared)  # the schema again, plus Ray's cross-key checks
        except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
            problems.append(Problem(file, "", f"Ray's validator refuses it: {exc}"))
    for name, node in (prepared.get("available_node_types") or {}).items():
        # Ray accepts this and silently launches only max_workers (it takes the smaller).
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(Problem(file, join("available_node_types", name, "min_workers"),
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
    """Each replica must fit one node type: one that declares resources has none of what it leaves
    out; one that leaves them all to AWS autodetection (`resources: {}`) counts as fitting."""
    offers = [(name, node.get("resources") or {}) for name, node in cluster["available_node_types"].items()
              if name == cluster["head_node_type"] or node.get("max_workers", 0) > 0]
    return unplaced(replicas, offers, file, f"node type in {cluster_file}")
