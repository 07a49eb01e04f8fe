"""The bounded store (timecma-serve --store-max-gb): the bound holds on disk, hits stay correct after evictions,
what is used survives a rotation, and the store reopens as it was."""

from __future__ import annotations

import numpy as np
import pytest

from timecma.core.bounded_store import BoundedStore, StoreBusy
from timecma.core.errors import InputError

NS, DIM = "ab" * 32, 256  # 1 KiB vectors


def _vec(i: int) -> np.ndarray:
    return np.full(DIM, i, np.float32)


def _key(i: int) -> bytes:
    return b"key-%06d" % i


def test_bound_holds_and_hits_stay_correct(tmp_path):
    bound = 2 << 20
    st = BoundedStore(tmp_path / "s", NS, DIM, max_bytes=bound)
    hot = _key(0)
    st.put_many([hot], _vec(0)[None], ["prompt 0"])
    for b in range(60):  # 3,000 vectors of 1 KiB through a 2 MiB bound
        ids = range(1 + 50 * b, 1 + 50 * (b + 1))
        st.put_many([_key(i) for i in ids], np.stack([_vec(i) for i in ids]), [f"prompt {i}" for i in ids])
        assert st.disk_bytes() <= bound
        got, found = st.get_many([hot])  # used all along: promoted on every rotation, never evicted
        assert found.all() and (got == _vec(0)).all()
    assert st.evictions >= 2
    recent = [_key(i) for i in range(2950, 3001)]
    got, found = st.get_many(recent)
    assert found.all() and (got[:, 0] == np.arange(2950, 3001)).all()  # hits are the vectors written
    got, found = st.get_many([_key(1), _key(2)])
    assert not found.any()  # evicted: a miss, computed again by the caller
    assert st.missing([_key(1), hot]) == [0]
    vecs, found = st.get_many_by_text(["prompt 2999", "prompt 3", "prompt 0"])
    # the hot entry was promoted by its key alone, without its text: serving then finds it by key (after tokenizing)
    assert found.tolist() == [True, False, False] and vecs[0, 0] == 2999
    n = len(st)
    st.close()
    with BoundedStore(tmp_path / "s", NS, DIM, max_bytes=bound) as again:  # reopened: both generations back
        assert len(again) == n and again.get_many([_key(3000)])[1].all()


def test_bound_too_small_is_refused(tmp_path):
    with pytest.raises(InputError, match="at least 2 MiB"):
        BoundedStore(tmp_path / "s", NS, DIM, max_bytes=1 << 20)


def test_forecaster_serves_from_a_bounded_store(small_bundle, tmp_path):
    from conftest import make_frame
    from timecma.runtime import Forecaster

    f = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), store_max_gb=0.002)
    assert isinstance(f.store, BoundedStore) and f.store.max_bytes == int(0.002 * (1 << 30))
    win = make_frame(24, seed=9)
    y = f.predict(win)
    np.testing.assert_array_equal(f.predict(win), y)
    assert (f.stats.misses, f.stats.hits) == (3, 3)


def test_window_records_survive_rotation_when_used(tmp_path):
    """A window record read from the older generation is promoted, as prompt vectors are; one never read is
    evicted with its generation (a miss: the caller computes it again)."""
    st = BoundedStore(tmp_path / "s", NS, DIM, max_bytes=2 << 20)
    rec = np.ones((1, 3, DIM), np.float32)
    hot, cold = st.window_key(b"hot"), st.window_key(b"cold")
    st.put_window(hot, rec)
    st.put_window(cold, 2 * rec)
    for b in range(60):
        ids = range(50 * b, 50 * (b + 1))
        st.put_many([_key(i) for i in ids], np.stack([_vec(i) for i in ids]))
        np.testing.assert_array_equal(st.get_window(hot, rec.shape), rec)
    assert st.evictions >= 2
    assert st.get_window(cold, rec.shape) is None
    st.close()


def test_one_process_owns_a_bounded_store(tmp_path):
    """A second owner is refused, naming the first (a rotation deletes files another owner has open); another
    process holding it is refused the same way; the lock goes with close() or the process."""
    import os
    import subprocess
    import sys

    path = tmp_path / "s"
    a = BoundedStore(path, NS, DIM, max_bytes=2 << 20)
    with pytest.raises(StoreBusy, match=f"owned by process {os.getpid()}.*its own directory"):
        BoundedStore(path, NS, DIM, max_bytes=2 << 20)
    a.close()
    code = ("import sys, time; from timecma.core.bounded_store import BoundedStore; "
            f"s = BoundedStore({str(path)!r}, {NS!r}, {DIM}, max_bytes=2 << 20); print('held', flush=True); "
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy, match=f"owned by process {holder.pid}"):
            BoundedStore(path, NS, DIM, max_bytes=2 << 20)
    finally:
        holder.stdin.close()
        holder.wait(30)
    BoundedStore(path, NS, DIM, max_bytes=2 << 20).close()  # free again once its owner has ended


def test_claim_gives_each_owner_its_own_directory(tmp_path):
    """What several replicas on one node do: each claims a directory; one's rotations never touch another's."""
    a = BoundedStore.claim(tmp_path, NS, DIM, max_bytes=2 << 20)
    b = BoundedStore.claim(tmp_path, NS, DIM, max_bytes=2 << 20)
    assert a.path != b.path and {a.path, b.path} == {str(tmp_path / "proc-0"), str(tmp_path / "proc-1")}
    b.put_many([_key(0)], _vec(0)[None])
    for k in range(60):  # a rotates several times
        ids = range(1 + 50 * k, 1 + 50 * (k + 1))
        a.put_many([_key(i) for i in ids], np.stack([_vec(i) for i in ids]))
    assert a.evictions >= 2
    got, found = b.get_many([_key(0)])
    assert found.all() and (got == _vec(0)).all()  # b's generations were never a's to delete
    a.close()
    c = BoundedStore.claim(tmp_path, NS, DIM, max_bytes=2 << 20)  # a's directory, free again, with its vectors
    assert c.path == str(tmp_path / "proc-0") and c.get_many([_key(3000)])[1].all()
    b.close()
    c.close()


def test_forecasters_given_one_bounded_store_take_one_directory_each(small_bundle, tmp_path):
    """``--replicas N --store-max-gb X``: every replica on the node is given the same --store."""
    from conftest import make_frame
    from timecma.runtime import Forecaster

    f1 = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), store_max_gb=0.002)
    f2 = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), store_max_gb=0.002)
    try:
        assert f1.store.path != f2.store.path
        win = make_frame(24, seed=9)
        np.testing.assert_array_equal(f1.predict(win), f2.predict(win))
    finally:
        f1.close()
        f2.close()
