"""Trackers turn decoded frames plus a text prompt into per-frame detections.

Each tracker has a typed config, chosen by `kind`, that validates its fields; `build(config)`
builds the tracker it describes:

    {"kind": "sam3", "device": "cuda"}                   SAM 3 (trackers/sam3)
    {"kind": "fake"}                                      the stand-in test double (trackers/fake.py)
    {"kind": "import", "path": "pkg.mod:Name", "options": {...}}   anyone else's

The names alone ("sam3", "fake", "pkg.mod:Name") stand for their config with its defaults,
in the app's args, `serve run ... tracker=fake` and the CLI's --tracker alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from serve_app.contract import JobConfig
from serve_app.media import Detections, FrameChunk, VideoInfo
from serve_app.trackers.fake import ColorShapeTracker, FakeConfig
from serve_app.trackers.sam3.config import Sam3Config


@runtime_checkable
class Tracker(Protocol):
    """What every tracker implements.

    `track` consumes frame chunks as they are decoded and yields exactly one `Detections` per
    frame, in frame order, possibly lagging behind the input (SAM 3 holds frames back). It may
    use `config.confidence_threshold` to tune itself; the pipeline keeps only the objects
    scoring at least that in any case (pipeline.track), so a tracker never has to.
    """

    def track(self, chunks: Iterable[FrameChunk], info: VideoInfo, config: JobConfig) -> Iterator[Detections]: ...


class ImportConfig(BaseModel):
    """A tracker from anywhere: `path` names a class (module:Name) built with `options`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["import"] = "import"
    path: str = Field(pattern=r"^[\w.]+:\w+$", description="module:Name of a class with track(chunks, info, config).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of its constructor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs a replica of it needs.")


_CONFIGS = (Sam3Config, FakeConfig, ImportConfig)
TrackerConfig = Annotated[Union[_CONFIGS], Field(discriminator="kind")]
KINDS = tuple(c.model_fields["kind"].default for c in _CONFIGS)
_ADAPTER: TypeAdapter = TypeAdapter(TrackerConfig)


def build(config: TrackerConfig) -> Tracker:
    """The tracker `config` describes (SAM 3 loads, compiles and warms its model here)."""
    if isinstance(config, Sam3Config):
        from serve_app.trackers.sam3.tracker import Sam3Tracker

        return Sam3Tracker(config)
    if isinstance(config, FakeConfig):
        return ColorShapeTracker(config)
    module_name, _, attr = config.path.partition(":")
    tracker = getattr(importlib.import_module(module_name), attr)(**config.options)
    if not isinstance(tracker, Tracker):
        raise TypeError(f"{config.path} has no track(chunks, info, config) method")
    return tracker


def preflight(config: TrackerConfig) -> None:
    """Fail now, with one line, where building would fail in a replica: SAM 3 without weights."""
    if isinstance(config, Sam3Config):
        from serve_app.trackers.sam3.loading import resolve_weights

        resolve_weights(config.checkpoint)


def tracker_config(value: str | dict | BaseModel, **fields: Any) -> TrackerConfig:
    """A tracker config from a name ("sam3", "fake", "module:Name") or a mapping, with `fields`
    set on it (for an import path: its constructor options)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        if ":" in value:
            value, fields = {"kind": "import", "path": value}, {"options": fields} if fields else {}
        else:
            value = {"kind": value}
    return _ADAPTER.validate_python({**value, **fields})
