"""SAM 3's compile guard on a toy model (CPU, no SAM 3 weights): object batches padded to
buckets, nothing compiled after warm-up, a would-be recompile run eager, logged and counted,
a failed compile run eager. The real model goes through the same code in test_sam3_model.py."""

import logging
import sys

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.testing import CompileCounter  # noqa: E402

from serve_app.trackers.sam3.compile import Compiled, RecompileMetric, bucket_of, buckets  # noqa: E402

DECODER = "tracker.sam_mask_decoder"


class Decoder(torch.nn.Module):
    """Treats every object (row) on its own, as sam_mask_decoder does with repeat_image=False."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, image_embeddings, image_pe, multimask_output=False):
        out = self.proj(image_embeddings) + image_pe
        return out, out.sum(-1, keepdim=True)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tracker = torch.nn.Module()
        self.tracker.sam_mask_decoder = Decoder()


@pytest.fixture
def toy():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = Toy()
    compiled = Compiled(max_objects=4, backend=counter, parts=(DECODER,))
    compiled.install(model)
    model._compile_model()  # what sam3 calls at the first propagation
    yield model, compiled, counter
    torch._dynamo.reset()


def call(model, n):
    with torch.inference_mode():  # as every call into SAM 3 (compat.model_context)
        x = torch.arange(n * 8, dtype=torch.float32).reshape(n, 8)
        pe = torch.ones(1, 8)
        return x, pe, model.tracker.sam_mask_decoder(image_embeddings=x, image_pe=pe, multimask_output=True)


def expected(model, x, pe):
    with torch.inference_mode():
        out = model.tracker.sam_mask_decoder.proj(x) + pe
    return out, out.sum(-1, keepdim=True)


def test_buckets_are_powers_of_two_up_to_the_replicas_max():
    assert buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(16) == (1, 2, 4, 8, 16) and buckets(5) == (1, 2, 4, 5) and buckets(1) == (1,)
    assert [bucket_of(n, buckets(16)) for n in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, 17]


def test_object_batches_are_padded_to_their_bucket_and_sliced_back(toy):
    model, compiled, counter = toy
    for n in (3, 4):
        x, pe, (out, score) = call(model, n)
        want, want_score = expected(model, x, pe)
        assert out.shape == (n, 8) and torch.allclose(out, want) and torch.allclose(score, want_score)
    assert counter.frame_count == 1  # 3 objects ran as 4: one shape, one compile


def test_after_warm_up_nothing_compiles_on_a_new_object_count(toy):
    model, compiled, counter = toy
    for n in compiled.buckets:  # the warm-up sweep
        call(model, n)
    warmed = counter.frame_count
    compiled.lock()
    with compiled.serving():
        for n in (3, 1, 4, 2):
            call(model, n)
    assert counter.frame_count == warmed and compiled.total_recompiles == 0


def test_a_would_be_recompile_runs_eager_logged_and_counted(toy, caplog):
    model, compiled, counter = toy
    incs = []
    compiled.metric.inc = lambda part, n=1: incs.append((part, n))
    for n in compiled.buckets:
        call(model, n)
    warmed = counter.frame_count
    compiled.lock()
    compiled.pad = False  # 3 objects now need a shape of their own
    with caplog.at_level(logging.WARNING, logger="serve_app.trackers.sam3.compile"), compiled.serving():
        x, pe, (out, _) = call(model, 3)
        call(model, 3)
    assert torch.allclose(out, expected(model, x, pe)[0])
    assert counter.frame_count == warmed  # nothing compiled: it ran eager
    assert compiled.recompiles[DECODER] == 2 and incs == [(DECODER, 1), (DECODER, 1)]
    assert caplog.text.count("would recompile after warm-up") == 1  # logged once, counted twice
    assert "size mismatch" in caplog.text or "no cached graph" in caplog.text


def test_a_failed_compile_is_reported_and_the_part_runs_eager(caplog):
    torch._dynamo.reset()

    def broken(gm, inputs):
        raise RuntimeError("inductor fell over")

    model = Toy()
    compiled = Compiled(max_objects=4, backend=broken, parts=(DECODER,))
    compiled.install(model)
    model._compile_model()
    with caplog.at_level(logging.ERROR, logger="serve_app.trackers.sam3.compile"):
        x, pe, (out, _) = call(model, 2)
        call(model, 2)
    assert torch.allclose(out, expected(model, x, pe)[0])
    assert "inductor fell over" in compiled.failed[DECODER]
    assert caplog.text.count("torch.compile failed") == 1
    torch._dynamo.reset()


def test_the_recompile_metric_is_a_no_op_outside_a_ray_worker(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    metric = RecompileMetric()
    metric.inc("tracker.sam_mask_decoder")  # nothing to export to, nothing raised
    assert metric._counter is None and "ray" not in sys.modules


def test_the_recompile_metric_is_a_ray_serve_counter_in_a_worker():
    pytest.importorskip("ray.serve.metrics")  # imports ray, as a worker has
    metric = RecompileMetric()
    assert metric._counter is not None and metric._counter._name == "sam3_video_recompiles"
    metric.inc("tracker.sam_mask_decoder", 2)


# -- bounded autotune and the compile cache ----------------------------------------------------
def test_bounded_autotune_is_sam3s_mode_with_aten_matmuls_and_convolutions():
    from serve_app.trackers.sam3.compile import inductor_options

    full = inductor_options("max-autotune", False, "full")
    bounded = inductor_options("max-autotune", False, "bounded")
    assert full == torch._inductor.list_mode_options("max-autotune", False)
    assert full["max_autotune"] and full["triton.cudagraphs"]  # what sam3 asks for stays
    assert bounded == {**full, "max_autotune_gemm_backends": "ATEN", "max_autotune_conv_backends": "ATEN",
                       "autotune_num_choices_displayed": 0}
    assert "triton.cudagraphs" not in inductor_options("max-autotune-no-cudagraphs", True, "bounded")
    with pytest.raises(ValueError, match="'bounded' or 'full'"):
        inductor_options("max-autotune", False, "some")


def test_each_part_is_compiled_with_its_modes_options(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    model = Toy()
    Compiled(max_objects=2, parts=(DECODER,)).install(model)
    model._compile_model()
    (kwargs,) = seen
    assert kwargs["fullgraph"] and kwargs["dynamic"] is False and "mode" not in kwargs  # a mode or options
    assert kwargs["options"]["max_autotune_gemm_backends"] == "ATEN" and kwargs["options"]["triton.cudagraphs"]


def test_the_cache_dir_is_inductors_for_the_process(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from serve_app.trackers.sam3.compile import use_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    path = use_cache_dir(str(tmp_path / "node-local" / "sam3"))
    assert path == str(tmp_path / "node-local" / "sam3") and (tmp_path / "node-local" / "sam3").is_dir()
    assert cache_dir() == path  # where inductor puts graphs, autotune results and kernels


@pytest.mark.slow
def test_a_new_process_loads_what_the_first_compiled(tmp_path):
    """Two processes compile the same part with inductor (C++ on a CPU) and one cache folder:
    the first compiles it, the second finds the compiled graph (inductor's FX graph cache)."""
    import json
    import subprocess
    import textwrap
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(repo)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from serve_app.trackers.sam3.compile import Compiled, cache_counts, use_cache_dir
        from test_sam3_compile import DECODER, Toy, call
        use_cache_dir({str(tmp_path / "cache")!r})
        torch.manual_seed(0)
        model = Toy()
        compiled = Compiled(max_objects=2, backend="inductor", parts=(DECODER,))
        compiled.install(model)
        model._compile_model()
        call(model, 2)
        print(json.dumps(cache_counts()))
    """)
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
                       .stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0]["fxgraph_cache_miss"] >= 1 and runs[0]["fxgraph_cache_hit"] == 0
    assert runs[1]["fxgraph_cache_hit"] == runs[0]["fxgraph_cache_miss"] and runs[1]["fxgraph_cache_miss"] == 0
