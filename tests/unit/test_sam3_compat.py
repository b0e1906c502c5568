"""The sam3 work-arounds, each checked against the sam3 code it answers (no full model)."""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serve_app.trackers.sam3 import compat  # noqa: E402

compat.install()


def test_install_is_idempotent():
    cuda, pin = torch.Tensor.cuda, torch.Tensor.pin_memory
    compat.install()
    assert torch.Tensor.cuda is cuda and torch.Tensor.pin_memory is pin


def test_cuda_and_pin_memory_stay_put_only_on_a_thread_running_a_cpu_model():
    t = torch.ones(3)
    with compat.on_device("cpu"):
        assert t.cuda(non_blocking=True) is t
        assert t.pin_memory() is t
    # elsewhere they are torch's own: a real copy, or torch's error without an accelerator
    seen = {}

    def elsewhere():
        try:
            seen["pinned"] = t.pin_memory() is not t
        except RuntimeError:
            seen["pinned"] = "torch's own error"

    with compat.on_device("cpu"):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert seen["pinned"] in (True, "torch's own error")


def test_model_context_runs_sam3s_bf16_casts_in_float32_on_a_cpu_on_any_thread():
    """sam3 casts features to bf16 as it would on a GPU (sam3_image.py:839,
    sam3_tracking_predictor.py:1098): bare, a float conv fed the cast fails; inside
    model_context on a CPU, on a thread that built nothing, the cast keeps float32 and the conv
    runs in float32 (no autocast: a CPU without bf16 arithmetic runs it hundreds of times
    slower). Outside the context the cast is torch's own."""
    conv = torch.nn.Conv2d(4, 4, 1)
    x = torch.ones(1, 4, 8, 8)
    result = {}

    def call():
        try:
            conv(x.to(torch.bfloat16))
            result["bare"] = "ran"
        except RuntimeError:
            result["bare"] = "dtype error"
        with compat.model_context("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
            inner = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16), compat.model_context("cpu"):
            result["autocast inside"] = torch.is_autocast_enabled("cpu")
            result["inside"] = conv(x.to(torch.bfloat16)).dtype
        result["after"] = x.to(torch.bfloat16).dtype
        result["explicit autocast still works"] = inner

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert result == {"bare": "dtype error", "autocast inside": False, "inside": torch.float32,
                      "after": torch.bfloat16, "explicit autocast still works": True}


def test_position_encoding_cache_is_built_on_the_target_device():
    """position_encoding.py:47 precomputes on "cuda" in __init__."""
    from sam3.model.position_encoding import PositionEmbeddingSine

    with compat.on_device("cpu"):
        pe = PositionEmbeddingSine(num_pos_feats=64, precompute_resolution=1008)
    assert sorted(pe.cache) == [(31, 31), (63, 63), (126, 126), (252, 252)]
    fresh = PositionEmbeddingSine(num_pos_feats=64)
    for size, cached in pe.cache.items():
        assert cached.device.type == "cpu"
        assert torch.equal(cached, fresh(torch.zeros((1, 1) + size))[0])


def test_decoder_coordinates_follow_the_target_device():
    """decoder.py:281 asks for device="cuda" in __init__."""
    from sam3.model.decoder import TransformerDecoder

    with compat.on_device("cpu"):
        h, w = TransformerDecoder._get_coords(72, 72, device="cuda")
    assert h.device.type == "cpu" and h.shape == (72,) and float(w[1]) == pytest.approx(1 / 72)


def test_connected_components_match_sam3_and_allow_an_empty_batch():
    """perflib/connected_components.py:48 stacks an empty list when a frame has no masks."""
    from sam3.perflib import connected_components as cc

    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((3, 1, 40, 36)) > 0.6)
    labels, counts = cc.connected_components_cpu(masks)
    for b in range(3):
        want_labels, want_counts = cc.connected_components_cpu_single(masks[b, 0])  # sam3's own
        assert torch.equal(labels[b, 0], want_labels.to(labels.dtype))
        assert torch.equal(counts[b, 0], want_counts.to(counts.dtype))
    empty_labels, empty_counts = cc.connected_components(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))
    assert empty_labels.shape == empty_counts.shape == (0, 1, 8, 8)


def test_untrained_text_encoder_parameters_become_finite():
    """text_encoder_ve.py:196,218 leave two parameters as torch.empty."""
    from sam3.model.text_encoder_ve import TextTransformer

    text = TextTransformer(context_length=8, vocab_size=100, width=32, heads=2, layers=1, output_dim=16)
    with torch.no_grad():
        text.positional_embedding.fill_(float("nan"))
        text.text_projection.fill_(float("inf"))
    compat.initialise_untrained(torch.nn.Sequential(text))
    assert torch.isfinite(text.positional_embedding).all() and torch.isfinite(text.text_projection).all()
    assert 0 < float(text.positional_embedding.detach().std()) < 0.1


def test_another_sam3_release_is_refused(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.2.0")
    with pytest.raises(RuntimeError, match="sam3 is 0.2.0.*0.1.4"):
        compat._check_version()


def test_memory_attention_reaches_a_fused_sdpa_kernel():
    """sam3's memory attention (RoPEAttention, 1 head x 256) calls F.scaled_dot_product_attention
    itself: in the model's context its inputs are the model's dtype (bf16 on a GPU, float32 on a
    CPU) with no mask and no dropout (eval), which the dispatcher sends to a fused kernel (CPU:
    flash; CUDA: flash takes bf16 with head_dim up to 256 on sm80/sm90). So there is nothing to route: the GPU check names the kernel it runs."""
    from sam3.model_builder import _create_tracker_transformer
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    attention = _create_tracker_transformer().encoder.layers[0].cross_attn_image.eval()
    objects, tokens, frames, pointers = 2, 72 * 72, 3, 16
    q = torch.randn(objects, tokens, 256)
    memory = torch.randn(objects, frames * tokens + pointers, 64)  # spatial memory, then pointers
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watch(q, k, v, *args, **kwargs):
        calls.append((q, k, v, args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = watch
    try:
        with compat.model_context("cpu"):
            out = attention(q, memory, memory, num_k_exclude_rope=pointers)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    (q, k, v, args, kwargs), = calls
    assert out.shape == (objects, tokens, 256)
    assert q.dtype == k.dtype == v.dtype == torch.float32  # a CPU runs the model in float32 (compat)
    assert q.shape == (objects, 1, tokens, 256) and k.shape == (objects, 1, frames * tokens + pointers, 256)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert not args and kwargs == {"dropout_p": 0.0}
    assert SDPBackend(int(torch._fused_sdp_choice(q, k, v))) != SDPBackend.MATH
