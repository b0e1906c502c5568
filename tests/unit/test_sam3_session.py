"""The per-frame detector queries a session hands SAM 3 (session._Stages): made on demand, every
frame's index a view of one tensor made on the device at the start (no model)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam3")

from serve_app.trackers.sam3.session import _Stages  # noqa: E402


def test_each_frames_query_indexes_its_frame_from_one_tensor(monkeypatch):
    stages = _Stages(20, "cpu")
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor built per access"))
    queries = [stages[t] for t in range(20)]
    assert [q.img_ids.tolist() for q in queries] == [[t] for t in range(20)]
    storage = queries[0].img_ids.untyped_storage().data_ptr()
    assert all(q.img_ids.untyped_storage().data_ptr() == storage for q in queries)
    assert all(q.text_ids is queries[0].text_ids for q in queries)  # sam3 writes it per frame, for all
    assert stages[-1].img_ids.tolist() == [19] and [q.img_ids.tolist() for q in stages[3:5]] == [[3], [4]]
    assert queries[7].img_ids.dtype == torch.long and len(stages) == 20
    with pytest.raises(IndexError):
        stages[20]


@pytest.mark.gpu
def test_a_query_costs_no_wait_for_the_gpu():
    stages = _Stages(100, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = [stages[t].img_ids for t in range(100)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids[42].cpu().tolist() == [42]
