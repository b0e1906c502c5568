"""Where SAM 3's weights, vocabulary and device come from (no model is built here)."""

import gzip
import pickle
import sys
import threading

import pytest

from serve_app.errors import ModelUnavailable, http_status
from serve_app.trackers.sam3 import loading
from serve_app.trackers.sam3.loading import WeightsSource, resolve_weights


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "sam3.pt"
    path.write_bytes(b"not really weights")
    return str(path)


def test_the_checkpoint_argument_wins_over_the_environment(ckpt, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    env = {"SAM3_CHECKPOINT": str(other), "HF_TOKEN": "hf_x"}
    assert resolve_weights(ckpt, env=env) == WeightsSource(path=ckpt)


def test_the_environment_checkpoint_wins_over_the_hub(ckpt):
    assert resolve_weights(None, env={"SAM3_CHECKPOINT": ckpt, "HF_TOKEN": "hf_x"}).path == ckpt


def test_a_token_means_the_hub():
    source = resolve_weights(None, env={"HF_TOKEN": " hf_abc \n"})
    assert source.hub_token == "hf_abc" and source.path is None
    assert "facebook/sam3" in source.describe()


@pytest.mark.parametrize("env", [{}, {"HF_TOKEN": "  "}, {"SAM3_CHECKPOINT": ""}])
def test_neither_way_fails_with_one_message_naming_both(env):
    with pytest.raises(ModelUnavailable) as info:
        resolve_weights(None, env=env)
    message = str(info.value)
    for word in ("SAM3_CHECKPOINT", "HF_TOKEN", "facebook/sam3", "checkpoint"):
        assert word in message
    assert http_status(info.value) == 503


def test_a_checkpoint_that_is_not_a_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelUnavailable) as info:
        resolve_weights(None, env={"SAM3_CHECKPOINT": missing})
    assert missing in str(info.value) and "SAM3_CHECKPOINT" in str(info.value) and "HF_TOKEN" in str(info.value)


def test_the_error_survives_pickling():
    with pytest.raises(ModelUnavailable) as info:
        resolve_weights(None, env={})
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is ModelUnavailable and str(back) == str(info.value)


def test_random_weights_need_no_file_and_no_network():
    assert loading.checkpoint_path(WeightsSource(random=True)) is None


def test_a_failed_hub_download_names_the_token_and_the_other_way(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast instead of reaching for the network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as info:
        loading.checkpoint_path(WeightsSource(hub_token="hf_nope"))
    assert "HF_TOKEN" in str(info.value) and "SAM3_CHECKPOINT" in str(info.value)


def test_the_bpe_vocabulary_comes_from_open_clip_and_tokenises():
    from sam3.model.tokenizer_ve import SimpleTokenizer

    path = loading.bpe_path()
    with gzip.open(path, "rt") as f:
        assert f.readline().startswith('"bpe_simple_vocab_16e6.txt')
    tokens = SimpleTokenizer(bpe_path=path)(["a red circle"])
    assert tokens.shape[-1] == 77 and int((tokens > 0).sum()) == 5  # start, 3 words, end


def test_a_carried_vocabulary_can_stand_in_for_open_clips(monkeypatch, tmp_path):
    """Where open-clip-torch is not installed (the GPU check), SAM3_BPE_PATH names a copy."""
    copy = tmp_path / "bpe.txt.gz"
    copy.write_bytes(open(loading.bpe_path(), "rb").read())
    monkeypatch.setenv(loading.BPE_ENV, str(copy))
    monkeypatch.setitem(sys.modules, "open_clip", None)  # importing it would fail
    assert loading.bpe_path() == str(copy)
    monkeypatch.setenv(loading.BPE_ENV, str(tmp_path / "missing.gz"))
    with pytest.raises(ModelUnavailable, match="SAM3_BPE_PATH"):
        loading.bpe_path()


def test_device_defaults_to_what_is_present_and_refuses_what_is_not():
    torch = pytest.importorskip("torch")
    assert loading.pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loading.pick_device("cpu").type == "cpu"
    with pytest.raises(ModelUnavailable, match="'tpu'"):
        loading.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelUnavailable, match="no CUDA"):
            loading.pick_device("cuda")


def test_the_tracker_fails_at_construction_and_in_preflight_without_weights(monkeypatch):
    from serve_app.trackers import build, preflight, tracker_config

    for name in ("SAM3_CHECKPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = tracker_config("sam3")
    with pytest.raises(ModelUnavailable, match="SAM3_CHECKPOINT.*HF_TOKEN"):
        preflight(config)
    with pytest.raises(ModelUnavailable, match="SAM3_CHECKPOINT.*HF_TOKEN"):
        build(config)


def test_compile_without_cuda_is_refused_before_building():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from serve_app.trackers.sam3.config import Sam3Config
    from testkit.sam3 import InstrumentedSam3Tracker

    with pytest.raises(ModelUnavailable, match="compile=True needs CUDA"):
        InstrumentedSam3Tracker(Sam3Config(device="cpu", compile=True), random_weights=True)


def test_model_overrides_set_nested_attributes_and_refuse_unknown_ones():
    from types import SimpleNamespace

    from serve_app.trackers.sam3.tracker import apply_overrides

    model = SimpleNamespace(new_det_thresh=0.7, tracker=SimpleNamespace(max_obj_ptrs_in_encoder=16))
    apply_overrides(model, {"new_det_thresh": 0.8, "tracker.max_obj_ptrs_in_encoder": 8})
    assert model.new_det_thresh == 0.8 and model.tracker.max_obj_ptrs_in_encoder == 8
    for path in ("new_det_treshold", "tracker.nope", "nope.new_det_thresh"):
        with pytest.raises(ValueError, match=repr(path)):
            apply_overrides(model, {path: 1})


def test_warm_sizes_are_validated_and_deduplicated():
    from pydantic import ValidationError

    from serve_app.trackers.sam3.config import Sam3Config

    config = Sam3Config(warm_sizes=[[1920, 1080], (832, 480)])
    assert config.all_warm_sizes == ((832, 480), (1280, 720), (1920, 1080))
    for bad in ([1920], [0, 10], ["wide", "1080"], [1920.5, 1080], [9000, 10]):
        with pytest.raises(ValidationError, match="warm_sizes"):
            Sam3Config(warm_sizes=[bad])


# -- cuda:N ------------------------------------------------------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    """torch as on a machine with two CUDA devices; set_device is recorded, not done."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((device, threading.current_thread().name)))
    return calls


def test_cuda_n_is_taken_when_torch_sees_it_and_refused_naming_what_it_sees(two_gpus):
    torch = pytest.importorskip("torch")
    assert loading.pick_device("cuda:1") == torch.device("cuda:1")
    assert loading.pick_device("cuda") == torch.device("cuda")
    with pytest.raises(ModelUnavailable) as info:
        loading.pick_device("cuda:2")
    assert "'cuda:2'" in str(info.value) and "2 CUDA device(s)" in str(info.value) and "cuda:0 to cuda:1" in str(info.value)


def test_the_model_thread_makes_cuda_n_its_current_device_before_building(two_gpus, monkeypatch):
    """sam3 puts tensors on plain "cuda" in many places: the model thread's current device must
    be the one configured, set before the model is built, on the thread that runs every call."""
    from types import SimpleNamespace

    from serve_app.trackers.sam3 import tracker as module
    from serve_app.trackers.sam3.config import Sam3Config

    built = []

    def build_model(weights, device, compile):
        built.append((device, threading.current_thread().name, list(two_gpus)))
        return SimpleNamespace(hotstart_delay=15)

    monkeypatch.setattr(module, "build_model", build_model)
    tracker = module.Sam3Tracker(Sam3Config(device="cuda:1", compile=False, warm_up=False),
                                 weights=WeightsSource(random=True))
    try:
        (device, thread, set_before), = built
        assert str(device) == "cuda:1" and thread == "sam3-model"
        assert [(str(d), name) for d, name in set_before] == [("cuda:1", "sam3-model")]
    finally:
        tracker.close()


def test_plain_cuda_leaves_the_current_device_alone(two_gpus):
    torch = pytest.importorskip("torch")
    loading.use_device(torch.device("cuda"))
    loading.use_device(torch.device("cpu"))
    assert two_gpus == []
