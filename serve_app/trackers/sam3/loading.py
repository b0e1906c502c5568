"""Where SAM 3's weights, vocabulary and device come from, and building the model.

Weights, in order: the sam3 tracker config's `checkpoint` field, the
SAM3_CHECKPOINT environment variable, else the gated hub repo facebook/sam3 with the user's
HF_TOKEN. With none of them the replica fails at start with one message naming both ways.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.errors import ModelUnavailable

log = logging.getLogger(__name__)

HUB_REPO = "facebook/sam3"
HUB_FILE = "sam3.pt"
CHECKPOINT_ENV = "SAM3_CHECKPOINT"
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

NO_WEIGHTS = (
    "no SAM 3 weights configured. Either download sam3.pt from the gated hub repo "
    f"{HUB_REPO} and set {CHECKPOINT_ENV}=/path/to/sam3.pt (or the sam3 tracker's "
    f"`checkpoint` field), or set HF_TOKEN to a Hugging Face token that has been granted access to "
    f"{HUB_REPO} so the tracker downloads it at start."
)


@dataclass(frozen=True)
class WeightsSource:
    """A local checkpoint (`path`), the hub (`hub_token`), or neither (`random`: tests and
    benchmarks, through testkit/sam3.py)."""

    path: str | None = None
    hub_token: str | None = None
    random: bool = False

    def describe(self) -> str:
        if self.path:
            return self.path
        if self.hub_token:
            return f"hf://{HUB_REPO}/{HUB_FILE}"
        return "random weights (architecture only; outputs are meaningless)"


def resolve_weights(checkpoint: str | None = None, env: Mapping[str, str] | None = None) -> WeightsSource:
    """Pick the weights without touching the network. Raises ModelUnavailable naming both ways."""
    env = os.environ if env is None else env
    for path, where in ((checkpoint, "the checkpoint option"), (env.get(CHECKPOINT_ENV), CHECKPOINT_ENV)):
        if path:
            path = os.path.expanduser(path)
            if not os.path.isfile(path):
                raise ModelUnavailable(f"{where} is {path!r}, which is not a file; " + NO_WEIGHTS)
            return WeightsSource(path=path)
    for name in TOKEN_ENVS:
        if env.get(name, "").strip():
            return WeightsSource(hub_token=env[name].strip())
    raise ModelUnavailable(NO_WEIGHTS)


def checkpoint_path(source: WeightsSource) -> str | None:
    """The local file for `source`, downloading from the hub if that is the source."""
    if source.random:
        return None
    if source.path:
        return source.path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, token=source.hub_token)
    except Exception as exc:  # gated repo without access, bad token, no network
        raise ModelUnavailable(
            f"could not download {HUB_FILE} from {HUB_REPO} with the HF_TOKEN given "
            f"({type(exc).__name__}: {exc}); " + NO_WEIGHTS
        ) from None


BPE_ENV = "SAM3_BPE_PATH"


def bpe_path() -> str:
    """The CLIP BPE vocabulary. The sam3 wheel omits assets/bpe_simple_vocab_16e6.txt.gz;
    open-clip-torch ships a byte-identical copy; $SAM3_BPE_PATH names another (the GPU check
    carries one where open-clip-torch is not installed)."""
    given = os.environ.get(BPE_ENV)
    if given:
        if not os.path.isfile(given):
            raise ModelUnavailable(f"{BPE_ENV} is {given!r}, which is not a file")
        return given
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise ModelUnavailable(f"the BPE vocabulary is missing from open-clip-torch ({path}); reinstall it")
    return path


def pick_device(device: str | None) -> Any:
    """CUDA when present, else CPU; an explicit "cuda" without CUDA is an error, not a fallback."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cuda", "cpu"):
        raise ModelUnavailable(f"device is {device!r}; SAM 3 runs on 'cuda' or 'cpu'")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device is {device!r} but torch sees no CUDA device here")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ModelUnavailable(f"device is {device!r} but torch sees {torch.cuda.device_count()} CUDA device(s) "
                               f"here (cuda:0 to cuda:{torch.cuda.device_count() - 1}; under Ray a replica sees "
                               "only the GPUs it was given, from cuda:0)")
    return chosen


def use_device(device: Any) -> None:
    """Make `device` the current CUDA device of the calling thread (the model thread, before it
    builds). sam3 puts tensors on plain "cuda" in many places (`.cuda()`, `device="cuda"` in
    position_encoding.py:47, decoder.py:281, transformer.py:285, the tracker's storage device,
    sam3_tracking_predictor.py:81), which is the thread's current device: with this, "cuda:1"
    means cuda:1 everywhere, not weights on cuda:1 and state on cuda:0."""
    import torch

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def build_model(source: WeightsSource, device: Any, compile: bool) -> Any:
    """Build the SAM 3 video model on `device`. Must run on the thread that will call it."""
    from sam3.model_builder import build_sam3_video_model

    from serve_app.trackers.sam3 import compat

    compat.install()
    path = checkpoint_path(source)
    start = time.perf_counter()
    with compat.on_device(device):
        model = build_sam3_video_model(
            checkpoint_path=path, load_from_HF=False, bpe_path=bpe_path(), device=str(device), compile=compile
        )
    if source.random:
        compat.initialise_untrained(model)
        log.warning("SAM 3 built with random weights: the architecture runs, its outputs mean nothing")
    model.eval()
    log.info("SAM 3 built from %s on %s in %.1f s (compile=%s)", source.describe(), device,
             time.perf_counter() - start, compile)
    return model
