"""What a batch runs: one Item per input, read from a manifest.

- **JSONL** (`.jsonl`, `.ndjson`): one object a line, `{"input": ..., "config": {...},
  "output": "name"}`; `output` is optional (default: the input's stem); blank lines and lines
  starting with `#` are skipped.
- **CSV** (`.csv`): a header with `input`, optionally `output`, and config fields as columns
  (`prompt`, `mode`, `alpha`, ...); an empty cell leaves the field unset; a non-text field's cell
  is JSON (`0.3`, `["video","objects"]`), and a list may also be written `video;objects`.
- **A glob** (`videos/*.mp4`, `s3://bucket/in/**/*.mp4`): every match, with the config from the
  command line; outputs are named by the path below the glob's fixed folder (`cam1/clip`).

Relative inputs are read from the manifest's own folder, so a manifest moves with its videos
and runs from anywhere (a Ray job's driver starts in another directory). Every line is checked
before anything runs: a bad line, an unknown key, a config the service would refuse or two
inputs writing the same output stop the batch with one message naming the line.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from serve_app.contract import JobConfig, parse_config
from serve_app.errors import InvalidBatch, InvalidJob

GLOB = re.compile(r"[*?\[]")
NAME_PART = re.compile(r"[^\x00-\x1f/\\]+")
MAX_NAME = 200


@dataclass(frozen=True)
class Item:
    index: int          # its place in the manifest: results.jsonl keeps this order
    input: str          # a path or fsspec URL
    output: str         # NAME: DEST/NAME.mp4, NAME.objects.json, NAME.done.json
    config: JobConfig
    where: str          # "manifest.jsonl line 3", for messages


def load(manifest: str, defaults: dict[str, Any]) -> list[Item]:
    """The manifest's items; `defaults` are config fields from the command line, which each line's
    own config overrides. InvalidBatch naming the line for anything that cannot run."""
    import fsspec

    lower = manifest.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        reader = _jsonl
    elif lower.endswith(".csv"):
        reader = _csv
    elif GLOB.search(manifest):
        return _unique(_glob(manifest, defaults))
    else:
        raise InvalidBatch(f"MANIFEST {manifest!r} is neither a .jsonl or .csv file nor a glob of inputs "
                           "(such as 'videos/*.mp4')")
    try:
        with fsspec.open(manifest, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidBatch(f"MANIFEST {manifest!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    name = posixpath.basename(manifest.rstrip("/"))
    items = reader(text, name, _folder(manifest), defaults)
    if not items:
        raise InvalidBatch(f"MANIFEST {manifest!r} names no inputs")
    return _unique(items)


def _jsonl(text: str, name: str, folder: str, defaults: dict[str, Any]) -> list[Item]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{name} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise InvalidBatch(f"{where} is not JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise InvalidBatch(f"{where} is {type(entry).__name__}; each line is an object with 'input' and 'config'")
        unknown = sorted(set(entry) - {"input", "config", "output"})
        if unknown:
            raise InvalidBatch(f"{where}: {unknown[0][:60]!r} is not a known key; a line has 'input', 'config' "
                               "and optionally 'output'")
        config = entry.get("config", {})
        if not isinstance(config, dict):
            raise InvalidBatch(f"{where}: config is {type(config).__name__}; it must be an object")
        items.append(_item(len(items), entry.get("input"), entry.get("output"), {**defaults, **config}, folder, where))
    return items


def _csv(text: str, name: str, folder: str, defaults: dict[str, Any]) -> list[Item]:
    rows = csv.DictReader(io.StringIO(text))
    columns = rows.fieldnames or []
    if "input" not in columns:
        raise InvalidBatch(f"{name} has no 'input' column; its header is {','.join(columns)[:120]!r}")
    unknown = [c for c in columns if c not in ("input", "output") and c not in JobConfig.model_fields]
    if unknown:
        raise InvalidBatch(f"{name}: column {unknown[0][:60]!r} is neither 'input', 'output' nor a config field "
                           f"({', '.join(JobConfig.model_fields)})")
    items = []
    for row in rows:
        where = f"{name} line {rows.line_num}"
        if None in row:
            raise InvalidBatch(f"{where} has more cells than the header has columns")
        config = {k: _cell(k, v, where) for k, v in row.items() if k not in ("input", "output") and v not in ("", None)}
        items.append(_item(len(items), row["input"], row.get("output") or None, {**defaults, **config}, folder, where))
    return items


def _cell(field: str, value: str, where: str) -> Any:
    """A CSV cell as its config field's value: text fields as written, others as JSON."""
    if _text_field(field):
        return value
    try:
        return json.loads(value)
    except ValueError:
        if _list_field(field):
            return [v for v in re.split(r"[;\s]+", value) if v]
        raise InvalidBatch(f"{where}: {field} is {value[:60]!r}, not a value for that field") from None


@functools.cache
def _schema(field: str) -> list[dict[str, Any]]:
    prop = JobConfig.model_json_schema()["properties"][field]
    return prop.get("anyOf", [prop])


def _text_field(field: str) -> bool:
    types = {s.get("type") or ("string" if "enum" in s or "const" in s else "?") for s in _schema(field)}
    return types - {"null"} == {"string"}


def _list_field(field: str) -> bool:
    return any(s.get("type") == "array" for s in _schema(field))


def _glob(pattern: str, defaults: dict[str, Any]) -> list[Item]:
    import fsspec

    if not defaults:
        raise InvalidBatch(f"MANIFEST {pattern!r} is a glob: its inputs take their config from the command line; "
                           "give --prompt (or --config)")
    fs, path = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    matches = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    if not matches:
        raise InvalidBatch(f"MANIFEST {pattern!r} matches no files")
    base = path[:GLOB.search(path).start()].rsplit("/", 1)[0]  # the glob's fixed folder
    items = []
    for match in matches:
        relative = posixpath.relpath(match, base) if base else match.lstrip("/")
        url = protocol + match if protocol else match
        items.append(_item(len(items), url, posixpath.splitext(relative)[0], defaults, "", f"{match}"))
    return items


def _item(index: int, given: Any, output: Any, config: dict[str, Any], folder: str, where: str) -> Item:
    if not isinstance(given, str) or not given.strip():
        raise InvalidBatch(f"{where}: input is {'missing' if given is None else repr(given)[:60]}; it must be a path "
                           "or URL")
    url = given.strip()
    if folder and "://" not in url and not url.startswith("/"):
        url = folder + url
    if "://" not in url:
        url = posixpath.normpath(url)
    if output is None:
        output = posixpath.splitext(posixpath.basename(url.rstrip("/")))[0]
    if not isinstance(output, str):
        raise InvalidBatch(f"{where}: output is {output!r}; it must be a name")
    _check_name(output, where)
    try:
        job = parse_config(config)
    except InvalidJob as exc:
        raise InvalidBatch(f"{where}: {exc}") from None
    return Item(index, url, output, job, where)


def _check_name(name: str, where: str) -> None:
    parts = name.split("/")
    if len(name) > MAX_NAME or not all(NAME_PART.fullmatch(p) and p not in (".", "..") and not p.startswith(".")
                                       for p in parts):
        raise InvalidBatch(f"{where}: output {name[:80]!r} must be a relative name of at most {MAX_NAME} characters "
                           "(folders with '/'; no '..', no part starting with '.', no control characters)")


def _folder(manifest: str) -> str:
    """The folder relative inputs are read from, with its trailing slash."""
    if "://" in manifest:
        return manifest.rsplit("/", 1)[0] + "/"
    import os

    return os.path.dirname(os.path.abspath(manifest)) + "/"


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        first = seen.setdefault(item.output, item)
        if first is not item:
            raise InvalidBatch(f"{item.where} and {first.where} both write {item.output!r}; give one an 'output' name")
    return items
