"""torch.compile for SAM 3 with a small set of shapes, all compiled before a replica is ready.

sam3's own `_compile_model` (sam3_video_inference.py:571-647) compiles seven parts lazily. The
tracker's mask decoder and memory encoder are compiled with dynamic=False, so every new
per-state object count compiled in the middle of a request (minutes with max-autotune), and
`suppress_errors=True` turned a failed compile into silent eager. `install` compiles the same
parts with the same modes, and:

- pads the object batch of those two parts to a bucket size (`buckets`: powers of two up to
  the replica's max_objects), so a replica meets at most len(buckets) shapes, all warmed up;
- does not suppress compile errors: a part whose compile fails is logged and runs eager;
- after `lock()` (the end of warm-up), a call that would compile runs eager instead: dynamo's
  stance "fail_on_recompile" raises before compiling, and the part's eager forward runs,
  logged with dynamo's reason and counted (`recompiles`, the Prometheus counter
  sam3_video_recompiles);
- bounds max-autotune's choices (`autotune="bounded"`): matrix products and convolutions run
  ATen's kernels (cuBLAS, cuDNN) instead of benchmarking Triton templates for each shape; CUDA
  graphs, fusion and the tuning of the generated kernels stay as sam3 has them;
- keeps inductor's caches where `use_cache_dir` says (a node-local folder), so a restarted
  replica loads compiled graphs instead of compiling them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"

# (attribute path, inductor mode, dynamic, makes inputs contiguous, pads the object batch):
# sam3_video_inference.py:593-647, one line per torch.compile there.
PARTS: tuple[tuple[str, str, bool | None, bool, bool], ...] = (
    ("detector.backbone.vision_backbone", "max-autotune", None, False, False),
    ("detector.transformer.encoder", "max-autotune", None, False, False),
    ("detector.transformer.decoder", "max-autotune", False, False, False),
    ("detector.segmentation_head", "max-autotune", None, False, False),
    ("tracker.maskmem_backbone", "max-autotune", False, True, True),
    ("tracker.transformer.encoder", "max-autotune-no-cudagraphs", True, True, False),
    ("tracker.sam_mask_decoder", "max-autotune", False, True, True),
)


# Inductor settings of autotune="bounded" (torch/_inductor/config.py names). Only the backends
# max-autotune may choose from are bounded; the option that quiets autotune's tables goes too.
BOUNDED = {"max_autotune_gemm_backends": "ATEN", "max_autotune_conv_backends": "ATEN",
           "autotune_num_choices_displayed": 0}
CACHE_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")


def inductor_options(mode: str, dynamic: bool | None, autotune: str = "bounded") -> dict[str, Any]:
    """What torch.compile(mode=mode) sets, as options (torch takes a mode or options, not both),
    plus BOUNDED unless autotune is "full". Keys this torch does not know are left out."""
    from torch._inductor import config, list_mode_options

    options = dict(list_mode_options(mode, dynamic))
    if autotune == "bounded":
        known = config.get_config_copy()
        options.update({k: v for k, v in BOUNDED.items() if k in known})
    elif autotune != "full":
        raise ValueError(f"autotune is {autotune!r}; 'bounded' or 'full'")
    return options


def use_cache_dir(path: str) -> str:
    """Keep this process's inductor caches (FX graphs, AOT autograd, autotune results, Triton
    kernels) in `path`. Inductor reads TORCHINDUCTOR_CACHE_DIR at each lookup, and its compile
    workers inherit it when they start, so this must run before the first compile."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def cache_counts() -> dict[str, int]:
    """Inductor's FX graph cache hits, misses and bypasses in this process so far."""
    try:
        from torch._dynamo.utils import counters

        return {name: int(counters["inductor"][name]) for name in CACHE_COUNTERS}
    except Exception:  # torch internals moved: a figure for logs only
        return {}


def buckets(max_objects: int) -> tuple[int, ...]:
    """Object-batch sizes the padded parts are compiled for: 1, 2, 4, ... and max_objects."""
    sizes, n = [], 1
    while n < max_objects:
        sizes.append(n)
        n *= 2
    return (*sizes, max_objects)


def bucket_of(n: int, sizes: tuple[int, ...]) -> int:
    return next((s for s in sizes if s >= n), n)


class RecompileMetric:
    """sam3_video_recompiles{part}: a no-op outside a Ray worker, as serve_app/metrics.py."""

    def __init__(self) -> None:
        self._counter = None
        if "ray" not in sys.modules:  # not in a Ray worker: nothing to export to (and no Ray to import)
            return
        try:
            from ray.serve.metrics import Counter as RayCounter

            self._counter = RayCounter("sam3_video_recompiles", tag_keys=("part",),
                                       description="SAM 3 compiles after warm-up (each ran eager instead).")
        except Exception:  # no Ray here (the GPU check, unit tests): nothing to export to
            self._counter = None

    def inc(self, part: str, n: int = 1) -> None:
        if self._counter is not None and n:
            self._counter.inc(n, tags={"part": part})


class Compiled:
    """The compiled parts of one SAM 3 model, and what they compiled."""

    def __init__(self, max_objects: int, backend: Any = None, parts: tuple[str, ...] | None = None,
                 pad: bool = True, autotune: str = "bounded") -> None:
        self.buckets = buckets(max_objects)
        self.backend = backend   # None or "inductor": inductor with sam3's modes; else any torch.compile backend
        self.parts = parts       # None: all of PARTS
        self.pad = pad
        self.autotune = autotune
        self.locked = False
        self.recompiles: Counter[str] = Counter()   # after lock: compiles that ran eager instead
        self.failed: dict[str, str] = {}             # part -> why its compile failed (it runs eager)
        self.metric = RecompileMetric()
        self._logged: set[tuple[str, str]] = set()
        self._graphs_at_lock = 0
        self._lock = threading.Lock()

    # -- building ----------------------------------------------------------------------------
    def install(self, model: Any) -> None:
        """Compile lazily, where sam3 does: at the first propagation, after the first prompt
        ran eager to fill the decoder's caches (sam3_video_inference.py:262-266)."""
        model.compile_model = True
        model._compile_model = lambda: self._compile(model)

    def _compile(self, model: Any) -> None:
        if getattr(model, "_model_is_compiled", False):
            return
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = 128             # sam3's own settings (sam3_video_inference.py:581-584),
        config.accumulated_cache_size_limit = 2048
        config.capture_scalar_outputs = True
        config.suppress_errors = False            # but a failed compile is reported, not hidden
        chosen = [part for part in PARTS if self.parts is None or part[0] in self.parts]
        if any(path == "tracker.maskmem_backbone" for path, *_ in chosen):
            _prime_caches(model)
        for path, mode, dynamic, contiguous, pad in chosen:
            module = _resolve(model, path)
            eager = module.forward
            compiled = self._torch_compile(eager, mode, dynamic)
            call = _contiguous_clone(compiled) if contiguous else _clone(compiled)
            call = self._guard(path, call, eager)
            if pad:
                call = self._padded(call)
            module.forward = call
        model._model_is_compiled = True

    def _torch_compile(self, fn: Callable, mode: str, dynamic: bool | None) -> Callable:
        import torch

        if self.backend in (None, "inductor"):
            options = inductor_options(mode, dynamic, self.autotune)
            return torch.compile(fn, options=options, fullgraph=True, dynamic=dynamic)
        return torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=dynamic)

    def _guard(self, part: str, compiled: Callable, eager: Callable) -> Callable:
        import torch._dynamo.exc

        def call(*args, **kwargs):
            if part in self.failed:
                return eager(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # a compile that failed
                detail = " ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
                self.failed[part] = f"{type(exc).__name__}: {detail[:300]}"
                log.error("SAM 3 %s: torch.compile failed (%s); it runs eager from now on", part, self.failed[part])
            except RuntimeError as exc:
                if RECOMPILE not in str(exc):
                    raise
                self._prevented(part, str(exc))
            return eager(*args, **kwargs)

        return call

    def _prevented(self, part: str, message: str) -> None:
        with self._lock:
            self.recompiles[part] += 1
        self.metric.inc(part)
        reason = " ".join(line.strip() for line in message.splitlines()[1:] if line.strip()) or "no cached graph"
        if (part, reason) not in self._logged:  # once per part and reason, not once per frame
            self._logged.add((part, reason))
            log.warning("SAM 3 %s would recompile after warm-up; running it eager instead (%s)", part, reason)

    def _padded(self, fn: Callable) -> Callable:
        """Run `fn` on an object batch padded to its bucket and slice the outputs back. The two
        padded parts (sam_mask_decoder with repeat_image=False, maskmem_backbone) treat every
        object independently, so the real rows do not depend on the padding."""
        return _padded(fn, self)

    # -- serving -------------------------------------------------------------------------------
    def lock(self) -> None:
        """From now on nothing compiles: a would-be compile runs eager and is counted."""
        self.locked = True
        self._graphs_at_lock = graphs()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around each step of a job on the model thread: once locked, dynamo may not compile.
        The stance is process-wide, so it is set per step rather than left on for other
        models' warm-ups."""
        if not self.locked:
            yield
            return
        import torch

        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                yield
        finally:
            unseen = graphs() - self._graphs_at_lock
            if unseen > 0:  # compiled anyway, by a path none of the guards covers
                self._graphs_at_lock += unseen
                self.recompiles["unattributed"] += unseen
                self.metric.inc("unattributed", unseen)
                log.warning("SAM 3: %d graph(s) compiled after warm-up outside the guarded parts", unseen)

    @property
    def total_recompiles(self) -> int:
        return sum(self.recompiles.values())


def _prime_caches(model: Any) -> None:
    """Fill, eagerly, a cache the memory encoder fills on its first call: a graph compiled on that
    call only fits an empty cache ("not ___dict_contains((72, 72), ...position_encoding.cache)"),
    so the shape met only then (one object at its birth) would compile again after warm-up."""
    import torch

    size = int(model.tracker.sam_image_embedding_size)  # its output's side: 1008 / 14
    model.tracker.maskmem_backbone.position_encoding(torch.zeros(1, 1, size, size, device=model.device))


def graphs() -> int:
    """Graphs dynamo has compiled in this process (its `unique_graphs` counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # torch internals moved: the guards still count what they prevent
        return 0


def _resolve(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _clone(fn: Callable) -> Callable:
    # what sam3_video_inference.py wraps its detector parts in
    from sam3.model.act_ckpt_utils import clone_output_wrapper

    return clone_output_wrapper(fn)


def _contiguous_clone(fn: Callable) -> Callable:
    # what sam3.perflib.compile.compile_wrapper adds around its compiled function
    from sam3.perflib.compile import recursive_clone, recursive_contiguous

    return lambda *args, **kwargs: recursive_clone(fn(*recursive_contiguous(args), **recursive_contiguous(kwargs)))


def _map_tensors(value: Any, fn: Callable) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _padded(fn: Callable, compiled: Compiled) -> Callable:
    import torch

    def call(*args, **kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        n = first.shape[0]
        size = bucket_of(n, compiled.buckets) if compiled.pad else n
        if size == n:
            return fn(*args, **kwargs)

        def pad(t: torch.Tensor) -> torch.Tensor:  # repeat the last object: ordinary values
            if t.dim() == 0 or t.shape[0] != n:
                return t  # shared across objects (image_pe has batch 1)
            return torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])])

        out = fn(*_map_tensors(args, pad), **_map_tensors(kwargs, pad))
        return _map_tensors(out, lambda t: t[:n] if t.dim() and t.shape[0] == size else t)

    return call
