import os
import pathlib

import pytest

# Ray writes an auth token into ~/.ray unless told otherwise; tests must not depend on it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = pathlib.Path(__file__).resolve().parent.parent
# Real clips live beside the checkout (../shared/clips); SHARED_CLIPS overrides.
CLIPS = pathlib.Path(os.environ.get("SHARED_CLIPS", REPO.parent / "shared" / "clips"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def clips_dir() -> pathlib.Path:
    if not CLIPS.is_dir():
        pytest.skip(f"real clips not found at {CLIPS} (set SHARED_CLIPS)")
    return CLIPS


@pytest.fixture(scope="session")
def cockatoo(clips_dir) -> pathlib.Path:
    return clips_dir / "cockatoo_1280x720_yuv444_mp3.mp4"


@pytest.fixture(scope="session")
def bikes(clips_dir) -> pathlib.Path:
    return clips_dir / "bikes_640x272.mp4"
