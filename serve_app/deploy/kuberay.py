"""Offline check of a KubeRay RayService manifest (deploy/kuberay/rayservice.yaml).

The manifest is walked against the RayService CRD's own `openAPIV3Schema` (KubeRay v1.7.0,
package data beside this module): unknown keys at any depth, named with a suggestion (the API
server prunes them, or refuses them under kubectl's strict field validation, and only with a live
cluster); wrong types; required keys (less those the CRD defaults, which the API server fills
first); enums, patterns, bounds; repeated keys of map-type lists. Free-form mappings and nulls
are taken as the API server takes them; `metadata`, which the CRD leaves to it, is checked
against ObjectMeta's fields. Not evaluated: the CRD's CEL rules (`x-kubernetes-validations`).

Then: a few of the KubeRay operator's own spec checks (ValidateRayServiceSpec) that it applies
only after the object is stored; the embedded Serve config (`spec.serveConfigV2`) through
ray_configs.py's checks; every Ray container loading the proxy body cap; and each replica of the
graph fitting a Ray group, whose Ray resources the Ray autoscaler's own function reads.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from functools import cache
from importlib import resources
from typing import Any

from serve_app import ray_compat
from serve_app.deploy.problems import Problem, join, unknown_key, unplaced
from serve_app.deploy.ray_configs import check_serve_config

KUBERAY_VERSION = "v1.7.0"
API_VERSION = "ray.io/v1"
KIND = "RayService"
SCHEMA_FILE = resources.files(__package__) / f"rayservice-crd-{KUBERAY_VERSION}.schema.json.gz"
SERVE_CONFIG = "spec.serveConfigV2"
CLUSTER = "spec.rayClusterConfig"
CONTAINERS = ("template", "spec", "containers")  # where a group's pod lists them
RAY_CONTAINER = 0  # KubeRay's utils.RayContainerIndex: the first container of a group's pod runs Ray
MAX_NAME = 47  # KubeRay's MaxRayServiceNameLength: "<name>-<5 chars>" must leave room for "-serve-svc"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

# metav1.ObjectMeta, which the API server validates itself (the CRD leaves `metadata` bare).
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_FREE = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
OBJECT_META = {
    "type": "object",
    "required": ["name"],  # `kubectl apply` needs one (generateName is for `create` only)
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": _STRINGS, "annotations": _STRINGS, "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": _FREE}, "managedFields": {"type": "array", "items": _FREE},
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"}, "generation": {"type": "integer"},
        "selfLink": {"type": "string"}, "creationTimestamp": {"type": "string", "nullable": True},
        "deletionTimestamp": {"type": "string"}, "deletionGracePeriodSeconds": {"type": "integer"},
    },
}


def is_rayservice(data: Any) -> bool:
    return isinstance(data, dict) and (data.get("kind") == KIND or str(data.get("apiVersion", "")).startswith("ray.io/"))


@cache
def crd_schema() -> dict:
    """The vendored document: provenance fields and the CRD's `openAPIV3Schema`."""
    return json.loads(gzip.decompress(SCHEMA_FILE.read_bytes()))


_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", dict: "mapping", list: "list"}.get(type(value), type(value).__name__)


def _type_ok(schema: dict, value: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return _kind_of(value) in ("integer", "string")
    if "anyOf" in schema and "type" not in schema:
        return any(_type_ok(member, value) for member in schema["anyOf"])
    want = schema.get("type")
    got = _kind_of(value)
    return (want is None or want == got or (want, got) in {("object", "mapping"), ("array", "list"), ("number", "integer")})


def _expected(schema: dict) -> str:
    if schema.get("x-kubernetes-int-or-string") or "anyOf" in schema and "type" not in schema:
        return "an integer or a string"
    return {"object": "a mapping", "array": "a list", "integer": "an integer", "number": "a number",
            "string": "a string", "boolean": "true or false"}.get(schema.get("type"), str(schema.get("type")))


def schema_problems(schema: dict, value: Any, file: str, path: str) -> list[Problem]:
    """What the API server would refuse or silently prune in `value`, walking `schema`.
    A null is taken as absent, as the API server prunes it where the field is not nullable."""
    if value is None:
        return []
    if not _type_ok(schema, value):
        shown = "" if isinstance(value, (dict, list)) else f" {value!r}"
        return [Problem(file, path, f"is invalid: expected {_expected(schema)}, got {_kind_of(value)}{shown}")]
    problems = _value_problems(schema, value, file, path)
    if isinstance(value, dict):
        problems += _mapping_problems(schema, value, file, path)
    elif isinstance(value, list):
        items = schema.get("items")
        for i, item in enumerate(value):
            if isinstance(items, dict):
                problems += schema_problems(items, item, file, join(path, i))
        problems += _list_key_problems(schema, value, file, path)
    return problems


def _value_problems(schema: dict, value: Any, file: str, path: str) -> list[Problem]:
    out = []
    if "enum" in schema and value not in schema["enum"]:
        close = [e for e in schema["enum"] if str(e).lower() == str(value).lower()]
        hint = f"did you mean {close[0]}?" if close else "one of " + ", ".join(map(str, schema["enum"]))
        out.append(Problem(file, path, f"is {value!r}; {hint}"))
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        what = "a Kubernetes quantity (e.g. 500m, 8Gi)" if "[KMGTPE]i" in schema["pattern"] else schema["pattern"]
        out.append(Problem(file, path, f"is {value!r}, which is not {what}"))
    if _kind_of(value) in ("integer", "number"):
        fmt_lo, fmt_hi = {"int32": _INT32, "int64": _INT64}.get(schema.get("format"), (None, None))
        lows = [x for x in (fmt_lo, schema.get("minimum")) if x is not None]
        highs = [x for x in (fmt_hi, schema.get("maximum")) if x is not None]
        lo, hi = (max(lows) if lows else None), (min(highs) if highs else None)
        if lo is not None and value < lo or hi is not None and value > hi:
            out.append(Problem(file, path, f"is {value}, outside [{lo}, {hi}]"))
    for kind, what, low, high in ((str, "characters", "minLength", "maxLength"), (list, "items", "minItems", "maxItems")):
        if isinstance(value, kind) and not schema.get(low, 0) <= len(value) <= schema.get(high, math.inf):
            out.append(Problem(file, path, f"has {len(value)} {what}, outside [{schema.get(low, 0)}, "
                                           f"{schema.get(high, 'any')}]"))
    return out


def _mapping_problems(schema: dict, value: dict, file: str, path: str) -> list[Problem]:
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    free = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
    embedded = schema.get("x-kubernetes-embedded-resource")
    problems = []
    for key, item in value.items():
        if key in properties:
            problems += schema_problems(properties[key], item, file, join(path, key))
        elif isinstance(extra, dict):
            problems += schema_problems(extra, item, file, join(path, key))
        elif embedded and key in ("apiVersion", "kind", "metadata"):
            continue
        elif not free:
            problems.append(unknown_key(file, path, str(key), list(properties)))
    for key in schema.get("required") or []:
        # The API server applies a field's default before it validates: such a key may be left out.
        if value.get(key) is None and "default" not in properties.get(key, {}):
            problems.append(Problem(file, join(path, key), "is required"))
    return problems


def _list_key_problems(schema: dict, value: list, file: str, path: str) -> list[Problem]:
    kind = schema.get("x-kubernetes-list-type")
    if kind not in ("map", "set"):
        return []
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: dict[Any, int] = {}
    problems = []
    for i, item in enumerate(value):
        if kind == "map" and not isinstance(item, dict):
            continue
        ident = json.dumps([item.get(k) for k in keys] if kind == "map" else item, sort_keys=True, default=str)
        if ident in seen:
            what = ", ".join(f"{k} {item.get(k)!r}" for k in keys) if kind == "map" else repr(item)
            problems.append(Problem(file, join(path, i), f"repeats {what} of item {seen[ident]}; the list is keyed by it"))
        seen.setdefault(ident, i)
    return problems


def check_rayservice(data: Any, file: str) -> list[Problem]:
    """Every problem of a RayService manifest, its embedded Serve config included."""
    if not isinstance(data, dict):
        return [Problem(file, "", "is not a mapping")]
    if data.get("apiVersion") != API_VERSION or data.get("kind") != KIND:
        key = "apiVersion" if data.get("kind") == KIND else "kind"
        return [Problem(file, key, f"is {data.get(key)!r}; this check knows apiVersion {API_VERSION}, kind {KIND} "
                                   f"(KubeRay {KUBERAY_VERSION}'s CRD)")]
    try:
        schema = crd_schema()["openAPIV3Schema"]
    except OSError as exc:
        return [Problem(file, "", f"cannot be checked: the vendored RayService CRD schema is missing ({exc})")]
    problems = schema_problems({**schema, "properties": {**schema["properties"], "metadata": OBJECT_META}},
                               data, file, "")
    spec = data.get("spec")
    if spec is None:  # the CRD lets it out; then there is no cluster and no application
        problems.append(Problem(file, "spec", "is required: it holds rayClusterConfig and serveConfigV2"))
    if problems:
        return problems  # the checks below read the structure the schema vouches for
    problems += _metadata_problems(data["metadata"], file)
    cluster = spec["rayClusterConfig"]
    groups = _groups(cluster)
    problems += _operator_problems(cluster, groups, file)
    problems += _proxy_problems(groups, file)
    config, replicas, serve = _serve_problems(spec, file)
    problems += serve
    if not serve:
        problems += _port_problems(config, groups, file)
        problems += _fit_problems(replicas, groups, file)
    return problems


def _metadata_problems(meta: dict, file: str) -> list[Problem]:
    name = meta.get("name")
    if isinstance(name, str) and (len(name) > MAX_NAME or not DNS1035.fullmatch(name)):
        return [Problem(file, "metadata.name", (
            f"is {name!r}; KubeRay wants a DNS-1035 label (lowercase letters, digits, '-', starting "
            f"with a letter) of at most {MAX_NAME} characters"))]
    return []


def _groups(cluster: dict) -> list[tuple[str, str, dict]]:
    """(group name, key path, group spec), the head first."""
    out = [("head", join(CLUSTER, "headGroupSpec"), cluster["headGroupSpec"])]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        out.append((group["groupName"], join(CLUSTER, "workerGroupSpecs", i), group))
    return out


def _ray_container(group: dict) -> dict | None:
    containers = (group.get("template", {}).get("spec") or {}).get("containers") or []
    return containers[RAY_CONTAINER] if containers else None


def _operator_problems(cluster: dict, groups: list, file: str) -> list[Problem]:
    """The KubeRay operator's spec checks (utils.ValidateRayClusterSpec) that a schema cannot
    express: it stores the object and only then refuses to reconcile it."""
    problems = []
    ray_params = ("num-cpus", "num-gpus", "memory", "resources")
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    seen: dict[str, str] = {}
    for name, path, _group in groups[1:]:
        if name in seen:  # what KubeRay's (optional) RayCluster webhook refuses
            problems.append(Problem(file, join(path, "groupName"), f"is {name!r}, as {seen[name]} is; "
                                                                    "worker group names must be unique"))
        seen.setdefault(name, join(path, "groupName"))
    for _name, path, group in groups:
        if _ray_container(group) is None:
            problems.append(Problem(file, join(path, *CONTAINERS), "is empty; KubeRay runs Ray in its first container"))
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(p) for p in ray_params):
            problems.append(Problem(file, join(path, "resources"), (
                "is set beside rayStartParams' num-cpus/num-gpus/memory/resources; KubeRay refuses both, use only one")))
        if "labels" in params:
            problems.append(Problem(file, join(path, "rayStartParams", "labels"),
                                    "is refused by KubeRay; use the group's labels field"))
        if path.endswith("headGroupSpec"):
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if lo is not None and hi is not None and lo > hi:
            problems.append(Problem(file, join(path, "minReplicas"), f"is {lo}, above maxReplicas {hi}"))
        elif n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            problems.append(Problem(file, join(path, "replicas"), f"is {n}, outside minReplicas..maxReplicas [{lo}, {hi}]"))
        if not autoscaling and (lo is None or hi is None):
            problems.append(Problem(file, path, "needs minReplicas and maxReplicas when enableInTreeAutoscaling is off"))
        if autoscaling and group.get("suspend"):
            problems.append(Problem(file, join(path, "suspend"), "cannot be true with the autoscaler on"))
    return problems


def _proxy_problems(groups: list, file: str) -> list[Problem]:
    """Every Ray node (the first container of each group's pod) must start with the body cap,
    as cluster.yaml's `ray start` commands do: Serve's proxy reads it from the environment."""
    from serve_app.api.proxy import CALLBACK, CALLBACK_ENV

    problems = []
    for _name, path, group in groups:
        container = _ray_container(group)
        if container is not None and not any(e.get("name") == CALLBACK_ENV and e.get("value") == CALLBACK
                                             for e in container.get("env") or []):
            where = join(path, *CONTAINERS, RAY_CONTAINER, "env")
            problems.append(Problem(file, where, f"does not set {CALLBACK_ENV}={CALLBACK}; that node's HTTP proxy "
                                                 "would read uploads of any size into memory"))
    return problems


def _serve_problems(spec: dict, file: str) -> tuple[dict, list, list[Problem]]:
    import yaml

    text = spec.get("serveConfigV2")
    if text is None:
        return {}, [], [Problem(file, SERVE_CONFIG, "is missing; it carries the application (serve_config.yaml's, embedded)")]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1} of the block)" if mark else ""
        return {}, [], [Problem(file, SERVE_CONFIG, f"is not YAML: {getattr(exc, 'problem', None) or exc}{where}")]
    if not isinstance(config, dict) or "applications" not in config:
        return {}, [], [Problem(file, SERVE_CONFIG, "is not a Serve config (no applications:)")]
    found, replicas = check_serve_config(config, file)
    # The same problems serve_config.yaml would have, their paths inside the embedded document.
    return config, replicas, [Problem(p.file, _inside(p.path), p.message) for p in found]


def _inside(path: str) -> str:
    """A key path of the embedded Serve config as a path in the manifest."""
    return SERVE_CONFIG if not path else SERVE_CONFIG + ("" if path.startswith("[") else ".") + path


def _port_problems(config: dict, groups: list, file: str) -> list[Problem]:
    """KubeRay's serve Service sends to the head container's port named `serve`; the proxies
    listen on the Serve config's http_options.port (default 8000)."""
    port = (config.get("http_options") or {}).get("port", 8000)
    _name, path, head = groups[0]
    for i, p in enumerate((_ray_container(head) or {}).get("ports") or []):
        if p.get("name") == "serve" and p.get("containerPort") != port:
            where = join(path, *CONTAINERS, RAY_CONTAINER, "ports", i)
            return [Problem(file, join(where, "containerPort"), (
                f"is {p.get('containerPort')}, but the Serve proxies listen on {port} "
                f"({SERVE_CONFIG} http_options.port); the serve Service would reach nothing"))]
    return []


def ray_resources(group: dict, is_head: bool) -> dict[str, float]:
    """A group's pod's Ray resources as the autoscaler plans pods with them, less memory (no replica asks)."""
    return {k: v for k, v in ray_compat.kuberay_group_resources(group, is_head).items() if k != "memory"}


def _num(x: float) -> float | int:  # 1.0 -> 1, for messages
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _fit_problems(replicas: list, groups: list, file: str) -> list[Problem]:
    """Each replica must fit one Ray group that may have a pod (the head, or maxReplicas > 0)."""
    offers, problems = [], []
    for name, path, group in groups:
        head = path.endswith("headGroupSpec")
        if _ray_container(group) is None or not head and group.get("maxReplicas", 2**31 - 1) <= 0:
            continue  # no Ray container (reported above), or a group that never has a pod
        try:
            offers.append((name, ray_resources(group, head)))
        except Exception as exc:  # whatever Ray's reading of the group raises
            problems.append(Problem(file, path, f"has Ray resources the autoscaler cannot read: {exc}"))
    # The autoscaler's offers always name CPU: none is empty, so none holds any replica unread.
    inside = [(_inside(path), name, opts) for path, name, opts in replicas]
    return problems or unplaced(inside, offers, file, f"Ray group in {CLUSTER}", _num)
