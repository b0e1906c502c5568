"""SAM 3's tracker config: what a deployment may set, validated before any model is built.

Importing this is cheap (no torch, no sam3): the app's args and check-config validate it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_WARM_SIZES: tuple[tuple[int, int], ...] = ((832, 480), (1280, 720))
Pixels = Annotated[int, Field(gt=0, le=8192, strict=True)]
# Set per job from confidence_threshold and max_objects (session.detection_settings).
PER_JOB = {"score_threshold_detection": "confidence_threshold", "new_det_thresh": "confidence_threshold",
           "max_num_objects": "max_objects"}


class Sam3Config(BaseModel):
    """`{"kind": "sam3", ...}`: the real SAM 3 video model (PyPI sam3 0.1.4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sam3"] = "sam3"
    checkpoint: str | None = Field(None, description="A local sam3.pt; else $SAM3_CHECKPOINT; else the hub with $HF_TOKEN.")
    device: str | None = Field(None, pattern=r"^(cuda(:\d+)?|cpu)$",
                               description="cuda, cuda:N or cpu; default CUDA when present.")
    compile: bool | None = Field(None, description="torch.compile the detector and tracker; default on with CUDA.")
    compile_autotune: Literal["bounded", "full"] = Field(
        "bounded", description="bounded: inductor's max-autotune with ATen alone for matrix products and "
                               "convolutions (CUDA graphs, fusion and kernel tuning kept); full: sam3's own.")
    compile_cache_dir: str | None = Field(
        None, description="A node-local folder for inductor's compiled graphs and autotune results, so a "
                          "restarted replica loads them instead of compiling (TORCHINDUCTOR_CACHE_DIR).")
    warm_sizes: list[tuple[Pixels, Pixels]] = Field(default_factory=list,
                                                    description="WxH sizes warmed up after 832x480 and 1280x720.")
    warm_up: bool | None = Field(None, description="Run the warm-up at start; default: when compiling.")
    warm_frames: int | None = Field(None, ge=1, le=256, description="Frames per warm-up clip; default hotstart + 2.")
    model_overrides: dict[str, Any] = Field(default_factory=dict,
                                            description='{"attribute.path": value} set on the built model.')
    trim_memory: bool = Field(True, description="Keep each session's memory to the tracker's window.")
    max_pending: int = Field(4, ge=1, description="Jobs that may wait for the model thread before new ones get 429.")
    max_sessions: int | None = Field(None, ge=1, le=64, description="Jobs interleaved frame by frame on the one "
                                     "model; default: the tracker deployment's max_ongoing_requests (1 outside Serve).")
    # 16: 5 object buckets to compile and warm (1-16); 64 would be 7, and a job's own default is 16.
    max_objects: int = Field(16, ge=1, le=64, strict=True,
                             description="Objects a job may track here (a job's max_objects above it is lowered); "
                                         "warm-up compiles for up to this many.")

    @field_validator("model_overrides")
    @classmethod
    def _not_per_job(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name in PER_JOB:
                raise ValueError(f"{name!r} is set for each job from its {PER_JOB[name]}; it cannot be overridden")
        return value

    @property
    def sessions(self) -> int:
        return self.max_sessions or 1

    @property
    def num_gpus(self) -> float:
        return 0.0 if self.device == "cpu" else 1.0

    @property
    def all_warm_sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple(dict.fromkeys([*DEFAULT_WARM_SIZES, *map(tuple, self.warm_sizes)]))
