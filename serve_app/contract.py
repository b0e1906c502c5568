"""The API contract: one job model shared by HTTP, Ray handles, the CLI and the tests, and the
limits on what the service accepts."""

from __future__ import annotations

import reprlib
import unicodedata
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.errors import InvalidJob, UnknownJobType

if TYPE_CHECKING:
    from serve_app.media import VideoInfo

MB = 1 << 20  # the limits are binary megabytes: the 100 MB default is 100 * 2**20 bytes

JOB_TYPE = "inference.sam3.segment.video.v1"


class Limits(BaseModel):
    """Caps on what the service accepts. Checked before any frame is decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(100 * MB, gt=0, description="Upload size (100 MB).")
    # 4K UHD either way round; 8K is refused (a single 8K frame is 100 MB of RGB).
    max_long_side: int = Field(3840, gt=0, description="Longest side of the picture, pixels.")
    max_short_side: int = Field(2160, gt=0, description="Shortest side of the picture, pixels.")
    # 10 minutes at 30 fps. Memory stays flat in length; this bounds one request's GPU time.
    max_frames: int = Field(18_000, gt=0, description="Presented frames.")
    max_fps: float = Field(240.0, gt=0, description="Average frames per second.")
    # The work a job may ask for: 10 minutes of 1080p at 30 fps (4K: 2.5 minutes).
    max_pixel_frames: int = Field(1920 * 1080 * 18_000, gt=0, description="Decoded pixels x frames.")
    # Packets a non-video track may declare (a 96 kHz AAC track runs 3 hours within it).
    max_track_samples: int = Field(1_000_000, gt=0, description="Samples an audio or other track declares.")


def size(n: int) -> str:
    """Bytes as the limits are written: 100 MB is 100 * 2**20 bytes."""
    if n < 1024:
        return f"{n} bytes"
    if n < MB:
        return f"{n / 1024:.0f} KB"
    return f"{n / MB:.1f}".removesuffix(".0") + " MB"


Mode = Literal["mask", "overlay"]
EXTENSION = {"extension": True}
MAX_PROMPTS, MAX_BOXES = 8, 16


def _visible(value: str) -> str:
    # Spaces, zero-width characters or NULs pass min_length but ask the model for nothing.
    control = next((c for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n"), None)
    if control is not None:
        raise ValueError(f"contains the control character U+{ord(control):04X}")
    if all(unicodedata.category(c)[0] in "CZ" for c in value):
        raise ValueError("has no visible character")
    return value


PROMPT_CHARS = (1, 500)
Prompt = Annotated[str, Field(min_length=PROMPT_CHARS[0], max_length=PROMPT_CHARS[1]), AfterValidator(_visible)]


class Box(BaseModel):
    """An exemplar box on the prompt frame, in the input's pixels as a player shows them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box: Annotated[list[Annotated[float, Field(strict=True)]], Field(min_length=4, max_length=4)] = Field(
        description="x, y, width, height")
    label: bool = Field(True, strict=True, description="true: objects like this one; false: not like it.")

    @field_validator("box")
    @classmethod
    def _area(cls, value: list[float]) -> list[float]:
        if value[2] <= 0 or value[3] <= 0 or value[0] < 0 or value[1] < 0:
            raise ValueError(f"is {value}; x and y must be at least 0, width and height above 0")
        return value


class JobConfig(BaseModel):
    """`config` of an `inference.sam3.segment.video.v1` job. What to look for is `prompt`, or the
    extensions `prompts` (several concepts, one pass) and `boxes` (exemplars), on `prompt_frame`."""

    # A misspelled key ("confidence_treshold") must not be silently ignored: the user would get
    # the default without noticing.
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt | None = Field(None, description="What to segment, e.g. 'fish'.")
    # Numbers must be JSON numbers: "0.5" or true is a client bug to name, not to convert.
    confidence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, strict=True, description="Objects whose SAM 3 score is below this are dropped."
    )
    mode: Mode = Field("mask", description="mask: white where any kept object is; overlay: drawn on the input.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, strict=True, description="Mask opacity in overlay mode.")
    # Extensions of the API we follow (EXTENSION): echoed in the job JSON only when sent.
    max_objects: int = Field(16, ge=1, le=64, strict=True, description="Objects tracked at most (the highest-scoring).",
                             json_schema_extra=EXTENSION)
    outputs: list[Literal["video", "objects"]] = Field(
        default_factory=lambda: ["video"], description='"video" (the mp4), and "objects" for objects.json.',
        json_schema_extra=EXTENSION)
    prompts: list[Prompt] | None = Field(None, min_length=1, max_length=MAX_PROMPTS, json_schema_extra=EXTENSION,
                                         description="Concepts found in one pass over the video (1 to 8).")
    boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES, json_schema_extra=EXTENSION,
                             description="Exemplar boxes on the prompt frame, positive or negative.")
    prompt_frame: int = Field(0, ge=0, strict=True, json_schema_extra=EXTENSION,
                              description="The frame the prompts apply to; frames before it are tracked backwards.")

    @model_validator(mode="after")
    def _something_to_find(self) -> "JobConfig":
        if self.prompt is not None and self.prompts is not None and self.prompts != [self.prompt]:
            raise ValueError("config.prompt and config.prompts disagree; send one of them")
        if not self.concepts and not any(b.label for b in self.boxes):
            raise ValueError("config.prompt is required" + (" (the boxes are all negative)" if self.boxes else ""))
        return self

    @property
    def concepts(self) -> list[str]:
        """The texts to look for, in order: `prompts`, or `prompt` alone (none with only boxes)."""
        return list(self.prompts or ([self.prompt] if self.prompt else []))

    def check_video(self, info: VideoInfo) -> None:
        """What only the video can tell: the prompt frame is one of its frames, each box lies in
        its picture. Raises InvalidJob naming the field."""
        if self.prompt_frame >= info.num_frames:
            raise InvalidJob(f"config.prompt_frame is {self.prompt_frame}; the video has {info.num_frames} frames, "
                             f"0 to {info.num_frames - 1}")
        width, height = info.display_size
        for i, b in enumerate(self.boxes):
            x, y, w, h = b.box
            if x + w > width or y + h > height:
                raise InvalidJob(f"config.boxes[{i}].box is {_Short(b.box)!r}; it must lie within the "
                                 f"{width}x{height} picture")

    @field_validator("outputs")
    @classmethod
    def _with_video(cls, value: list[str]) -> list[str]:
        if "video" not in value or len(set(value)) != len(value):
            raise ValueError('must name "video" once, and may add "objects"')
        return value

    def echo(self) -> dict[str, Any]:
        """The config as the job JSON shows it: extension fields only when they were sent."""
        unsent = {name for name, f in type(self).model_fields.items() if f.json_schema_extra == EXTENSION}
        return self.model_dump(exclude=unsent - self.model_fields_set | ({"prompt"} if self.prompt is None else set()))


class Job(BaseModel):
    """The job envelope: `{"type": "inference.sam3.segment.video.v1", "config": {...}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["inference.sam3.segment.video.v1"] = JOB_TYPE
    config: JobConfig


def rule(name: str, typed: bool = False) -> str:
    """What config field `name` must be, read from its declaration: "between 0.0 and 1.0" ("a
    number between 0.0 and 1.0" `typed`), "a whole number between 1 and 64", "1 to 500 characters"."""
    field = JobConfig.model_fields[name]
    bound = {k: getattr(m, k) for m in field.metadata for k in ("ge", "le", "min_length", "max_length") if hasattr(m, k)}
    if "max_length" in bound:
        return f"{bound.get('min_length', 0)} to {bound['max_length']} characters"
    kind = "a whole number" if field.annotation is int else "a number"
    between = f"between {bound['ge']} and {bound['le']}" if {"ge", "le"} <= set(bound) else ""
    return f"{kind} {between}".strip() if typed or field.annotation is int or not between else between


def _describe(error: dict[str, Any], prefix: str) -> str:
    loc = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    given = _Short(error.get("input"))
    kind = error["type"]
    ctx = error.get("ctx") or {}
    field = str(error["loc"][0]) if error["loc"] else ""
    if kind == "missing":
        return f"{loc} is required"
    if kind == "value_error" and not error["loc"]:  # the config as a whole: the message names its fields
        return str(ctx.get("error", error["msg"]))
    if kind == "too_long":
        return f"{loc} has {ctx.get('actual_length')} items; the most is {ctx.get('max_length')}"
    if kind == "too_short":
        return f"{loc} has {len(error.get('input') or ())} items; the fewest is {ctx.get('min_length')}"
    if kind == "extra_forbidden":
        return f"{loc} is not a known field"
    if kind in ("string_too_short", "string_too_long"):
        return f"{loc} is {len(given.value)} characters; it must be {PROMPT_CHARS[0]} to {PROMPT_CHARS[1]} characters"
    if kind == "float_type":
        return f"{loc} is {given!r} ({type(given.value).__name__}); it must be {rule(field, typed=True)}"
    if kind in ("int_from_float", "greater_than_equal", "less_than_equal", "int_type"):
        return f"{loc} is {given!r}; it must be {rule(field) if field in JobConfig.model_fields else 'in range'}"
    if kind == "literal_error":
        return f"{loc} is {given!r}; it must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return f"{loc} {ctx.get('error', error['msg'])}"
    return f"{loc} is {given!r}: {error['msg']}"


class _Short:
    """A value as messages quote it: a bounded repr, whatever the client sent."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        short = reprlib.Repr()
        short.maxstring = short.maxother = 60
        short.maxlevel = 2
        return short.repr(self.value)


def parse_config(data: Any) -> JobConfig:
    """Validate a config mapping; raises InvalidJob naming the field, the limit and the value."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob("; ".join(_describe(e, "config") for e in exc.errors())) from None


def parse_job(data: Any) -> Job:
    """Validate a job envelope (already-decoded JSON)."""
    if not isinstance(data, dict):
        raise InvalidJob(f"job must be a JSON object, got {type(data).__name__}")
    job_type = data.get("type", JOB_TYPE)
    if job_type != JOB_TYPE:
        raise UnknownJobType(f"job.type is {_Short(job_type)!r}; this service runs only {JOB_TYPE!r}")
    extra = sorted(set(data) - {"type", "config"})
    if extra:
        raise InvalidJob(f"job.{extra[0][:60]} is not a known field; a job has 'type' and 'config'")
    if "config" not in data:
        raise InvalidJob("job.config is required")
    return Job(type=JOB_TYPE, config=parse_config(data["config"]))
