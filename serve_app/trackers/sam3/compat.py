"""Make sam3 0.1.4 run on the device it is given, CPU included, without editing it.

sam3 assumes CUDA in a few places. Each work-around below names the line it answers and is
applied at runtime by wrapping a function or attribute; site-packages is never edited. The
wrappers change nothing for a model on CUDA: they only act on the thread that is running a
CPU model inside `model_context` (the thread-local `_active`), so a CPU tracker and other code
in the same process keep their ordinary torch behaviour.

`model_context(device)` is what every call into the model goes through. On a GPU it enters
the bf16 autocast per call, which answers two sam3 traps at once:
- sam3_tracking_predictor.py:49-50 enters `torch.autocast("cuda", bfloat16)` once, on the
  thread that builds the tracker, and never leaves it; autocast state is thread-local, so a
  call from any other thread fails with "Input type (c10::BFloat16) and bias type (float)
  should be the same" (upstream facebookresearch/sam3#329).
- sam3_image.py:839 and sam3_tracking_predictor.py:1098/1149 cast features to bf16
  unconditionally, and the autocast makes the float convolutions that read them agree.
On a CPU the model runs in float32 instead: no autocast, and those casts (`x.to(torch.bfloat16)`)
leave the tensor as it is. A CPU without bf16 arithmetic (AVX2) runs bf16 convolutions and
matmuls through slow reference paths: a 3x3 convolution 560x slower, a linear layer 7x, so a
random-weights test took minutes a frame (docs/design.md, "SAM 3 on a CPU").
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch

SAM3_VERSION = "0.1.4"

_active = threading.local()  # .device: the torch.device of the model this thread is running
_install_lock = threading.Lock()
_installed = False


def _cpu_here() -> bool:
    device = getattr(_active, "device", None)
    return device is not None and device.type == "cpu"


def _target_device() -> torch.device | None:
    return getattr(_active, "device", None)


@contextlib.contextmanager
def on_device(device: torch.device | str) -> Iterator[None]:
    """Mark this thread as building or running a model on `device` (the wrappers read it)."""
    previous = getattr(_active, "device", None)
    _active.device = torch.device(device)
    try:
        yield
    finally:
        _active.device = previous


@contextlib.contextmanager
def model_context(device: torch.device | str) -> Iterator[None]:
    """Everything a call into the SAM 3 model needs: inference mode, the bf16 autocast of
    the model's device (see the module docstring), and the CPU work-arounds when on CPU."""
    device = torch.device(device)
    install()
    # sam3's plain "cuda" means the thread's current device: cuda:N's, whichever thread calls
    current = torch.cuda.device(device) if device.type == "cuda" and device.index is not None \
        else contextlib.nullcontext()
    # CPU: float32 throughout (module docstring); an outer autocast is switched off too
    precision = torch.autocast("cpu", enabled=False) if device.type == "cpu" \
        else torch.autocast(device.type, dtype=torch.bfloat16)
    with on_device(device), current, torch.inference_mode(), precision:
        yield


def install() -> None:
    """Apply the wrappers once per process. Idempotent and thread-safe."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _check_version()
        _patch_position_encoding()
        _patch_decoder_coords()
        _patch_tensor_methods()
        _patch_tracker_storage_device()
        _patch_cpu_connected_components()
        _quiet_object_limit()
        _installed = True


def _check_version() -> None:
    import importlib.metadata

    found = importlib.metadata.version("sam3")
    if found != SAM3_VERSION:
        # The wrappers answer named lines of one release; on another they may patch the wrong
        # thing silently. Fail loudly at replica start instead.
        raise RuntimeError(f"sam3 is {found}; serve_app.trackers.sam3.compat is written for sam3=={SAM3_VERSION}")


def _patch_position_encoding() -> None:
    """position_encoding.py:47 precomputes its cache with `torch.zeros(..., device="cuda")`
    inside `__init__` (the tracker's memory encoder asks for it at model_builder.py:338).
    Build without the precompute, then fill the same cache on the target device."""
    from sam3.model.position_encoding import PositionEmbeddingSine

    original = PositionEmbeddingSine.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, precompute_resolution: int | None = None, **kwargs: Any) -> None:
        device = _target_device()
        if precompute_resolution is None or device is None or device.type == "cuda":
            original(self, *args, precompute_resolution=precompute_resolution, **kwargs)
            return
        original(self, *args, precompute_resolution=None, **kwargs)
        for stride in (4, 8, 16, 32):  # the sizes position_encoding.py:40-45 precomputes
            size = (precompute_resolution // stride, precompute_resolution // stride)
            self.forward(torch.zeros((1, 1) + size, device=device))
            self.cache[size] = self.cache[size].clone().detach()

    PositionEmbeddingSine.__init__ = __init__


def _patch_decoder_coords() -> None:
    """decoder.py:281 builds the box-RPB coordinate cache with `device="cuda"` in `__init__`."""
    from sam3.model.decoder import TransformerDecoder

    original = TransformerDecoder._get_coords  # a staticmethod, so a plain function here

    def _get_coords(H, W, device):
        target = _target_device()
        if str(device) == "cuda" and target is not None and target.type != "cuda":
            device = target
        return original(H, W, device)

    TransformerDecoder._get_coords = staticmethod(_get_coords)


def _patch_tensor_methods() -> None:
    """`.cuda()` and `.pin_memory()` are called unconditionally on the model path, and so is
    `.to(torch.bfloat16)` (module docstring):
    - sam3_tracker_base.py:657 and :664 (`prev["maskmem_features"].cuda(...)`, memory frames),
    - sam3_tracking_predictor.py:303 (previous mask logits on re-prompt),
    - sam3_tracker_base.py:168, geometry_encoders.py:659, sam3_video_inference.py:480
      (`pin_memory()` before a non-blocking copy).
    On a thread running a CPU model they mean "stay here" (and stay float32); elsewhere torch's own."""
    original_cuda = torch.Tensor.cuda
    original_pin = torch.Tensor.pin_memory

    @functools.wraps(original_cuda)
    def cuda(self, *args: Any, **kwargs: Any):
        if _cpu_here():
            return self
        return original_cuda(self, *args, **kwargs)

    @functools.wraps(original_pin)
    def pin_memory(self, *args: Any, **kwargs: Any):
        if _cpu_here():
            return self
        return original_pin(self, *args, **kwargs)

    original_to = torch.Tensor.to

    @functools.wraps(original_to)
    def to(self, *args: Any, **kwargs: Any):
        # sam3's bf16 casts, exactly as written there (module docstring): float32 on a CPU
        if args and args[0] is torch.bfloat16 and len(args) == 1 and not kwargs and _cpu_here():
            return self
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    torch.Tensor.pin_memory = pin_memory
    torch.Tensor.to = to


def _patch_tracker_storage_device() -> None:
    """sam3_tracking_predictor.py:81 stores tracker state on `torch.device("cuda")` unless the
    state is offloaded; on CPU the state lives on the CPU."""
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    original = Sam3TrackerPredictor.init_state

    @functools.wraps(original)
    def init_state(self, *args: Any, **kwargs: Any):
        state = original(self, *args, **kwargs)
        if self.device.type != "cuda":
            state["storage_device"] = self.device
        return state

    Sam3TrackerPredictor.init_state = init_state


def _patch_cpu_connected_components() -> None:
    """perflib/connected_components.py:48 is the CPU path of the hole filling every frame runs:
    it `torch.stack`s an empty list when no mask is in the batch (a frame with no new
    detection) and raises; and it counts component sizes with one full-image pass per
    component (:25-28). Same labels and counts, empty batches allowed, one bincount."""
    import numpy as np
    from sam3.perflib import connected_components as cc

    def connected_components_cpu(input_tensor: torch.Tensor):
        from skimage.measure import label

        out_shape = input_tensor.shape
        masks = input_tensor.squeeze(1) if input_tensor.dim() == 4 else input_tensor
        labels = np.zeros(masks.shape, dtype=np.int64)
        counts = np.zeros(masks.shape, dtype=np.int64)
        for b, mask in enumerate(masks.cpu().numpy()):
            labels[b] = label(mask)  # 8-connectivity, as sam3's `label(values)` call
            sizes = np.bincount(labels[b].ravel())
            sizes[0] = 0  # background pixels count 0, as in sam3's loop from label 1
            counts[b] = sizes[labels[b]]
        device = input_tensor.device
        return (torch.from_numpy(labels).to(device).view(out_shape),
                torch.from_numpy(counts).to(device).view(out_shape))

    cc.connected_components_cpu = connected_components_cpu


def _quiet_object_limit() -> None:
    """sam3_video_base.py:562 warns on every frame on which max_num_objects turned a detection
    away, which in a crowded scene is every frame; the tracker logs a summary per job instead."""
    import logging

    from sam3.model import sam3_video_base

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("hitting self.max_num_objects")

    sam3_video_base.logger.addFilter(_Filter())


def initialise_untrained(model: torch.nn.Module) -> None:
    """text_encoder_ve.py:196 and :218 make `positional_embedding` and `text_projection` with
    `torch.empty` and never initialise them (a checkpoint overwrites them). Built without a
    checkpoint they hold whatever memory held, NaN/inf included, and every score turns NaN.
    Give them open_clip's initialisation so random-weight models are usable in tests."""
    from sam3.model.text_encoder_ve import TextTransformer

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, TextTransformer):
                continue
            torch.nn.init.normal_(module.positional_embedding, std=0.01)
            if isinstance(module.text_projection, torch.nn.Parameter):
                torch.nn.init.normal_(module.text_projection, std=module.width**-0.5)
