import os
import pathlib
import shutil

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
        tier = pathlib.Path(str(item.fspath)).parent.name
        if tier in ("integration", "e2e"):
            item.add_marker(tier)
        if "cluster" in item.fixturenames:  # a real Ray cluster: seconds to start, minutes in all
            item.add_marker(pytest.mark.slow)


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


# -- the served graph (integration and e2e tiers) ----------------------------------------------
# Bearer tokens the "strict" test app accepts; set before Ray starts so its replicas see them.
TEST_TOKENS_ENV = "SAM3_VIDEO_TEST_TOKENS"
TEST_TOKEN = "test-token-1"
TEST_ADMIN_ENV, TEST_ADMIN_TOKEN = "SAM3_VIDEO_TEST_ADMIN_TOKENS", "test-admin-1"


@pytest.fixture(scope="session")
def cluster():
    """A real local Ray cluster with Serve's HTTP proxy on a free port, once per session."""
    from tests.serving import start_cluster, stop_cluster

    cluster = start_cluster({TEST_TOKENS_ENV: f"{TEST_TOKEN},test-token-2", TEST_ADMIN_ENV: TEST_ADMIN_TOKEN})
    yield cluster
    stop_cluster()
    for store in cluster.stores.values():  # the apps' job stores (temporary folders)
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def graph(cluster) -> str:
    """The app as deployed by default (100 MB limit, default queues), named "sam3-video" at "/",
    with the scripted stand-in tracker; returns its base URL."""
    from serve_app.app import APP_NAME

    return cluster.deploy(APP_NAME, "/")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A synthetic clip of coloured shapes whose segmentation is known (serve_app.synthetic)."""
    from serve_app import synthetic

    path = tmp_path_factory.mktemp("shapes") / "shapes.mp4"
    synthetic.write_clip(path, SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS)
    return path


SHAPES_W, SHAPES_H, SHAPES_N, SHAPES_FPS = 384, 216, 40, 25


@pytest.fixture(scope="session")
def bad_uploads(tmp_path_factory):
    """{name: (bytes, HTTP status, words the message must contain, typed error)}: tests/corpus.py."""
    from tests.corpus import make_bad_uploads

    return make_bad_uploads(tmp_path_factory.mktemp("bad_uploads"))


# -- a real PostgreSQL server for the job store's tests ------------------------------------------
@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of this session's own (SAM3_VIDEO_TEST_POSTGRES names another), from the
    system's packages, which .ci/run installs."""
    from tests.pg import start_postgres

    if os.environ.get("SAM3_VIDEO_TEST_POSTGRES"):
        yield os.environ["SAM3_VIDEO_TEST_POSTGRES"]
        return
    server = start_postgres()
    if server is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it from the system's packages)")
    yield server.url
    server.stop()
