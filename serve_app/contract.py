"""The API contract: one job model shared by HTTP, Ray handles, the CLI and the tests, and the
limits on what the service accepts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.errors import InvalidJob, UnknownJobType

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


def size(n: int) -> str:
    """Bytes as the limits are written: 100 MB is 100 * 2**20 bytes."""
    if n < 1024:
        return f"{n} bytes"
    if n < MB:
        return f"{n / 1024:.0f} KB"
    return f"{n / MB:.1f}".removesuffix(".0") + " MB"


Mode = Literal["mask", "overlay"]


class JobConfig(BaseModel):
    """`config` of an `inference.sam3.segment.video.v1` job."""

    # A misspelled key ("confidence_treshold") must not be silently ignored: the user would get
    # the default without noticing.
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=500, description="What to segment, e.g. 'fish'.")
    confidence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Objects whose SAM 3 score is below this are dropped."
    )
    mode: Mode = Field("mask", description="mask: white where any kept object is; overlay: drawn on the input.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Mask opacity in overlay mode.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        # A prompt of spaces passes min_length but asks the model for nothing.
        if not value.strip():
            raise ValueError("must contain at least one non-space character")
        return value


class Job(BaseModel):
    """The job envelope: `{"type": "inference.sam3.segment.video.v1", "config": {...}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["inference.sam3.segment.video.v1"] = JOB_TYPE
    config: JobConfig


def _describe(error: dict[str, Any], prefix: str) -> str:
    loc = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
    given = error.get("input")
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return f"{loc} is required"
    if kind == "extra_forbidden":
        return f"{loc} is not a known field"
    if kind in ("string_too_short", "string_too_long"):
        n = len(given) if isinstance(given, str) else given
        return f"{loc} is {n} characters; it must be 1 to 500 characters"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{loc} is {given!r}; it must be between 0.0 and 1.0"
    if kind == "literal_error":
        return f"{loc} is {given!r}; it must be one of {ctx.get('expected', '')}"
    return f"{loc} is {given!r}: {error['msg']}"


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
        raise UnknownJobType(f"job.type is {job_type!r}; this service runs only {JOB_TYPE!r}")
    extra = sorted(set(data) - {"type", "config"})
    if extra:
        raise InvalidJob(f"job.{extra[0]} is not a known field; a job has 'type' and 'config'")
    if "config" not in data:
        raise InvalidJob("job.config is required")
    return Job(type=JOB_TYPE, config=parse_config(data["config"]))
