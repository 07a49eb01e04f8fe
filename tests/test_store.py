"""The embedding store survives SIGKILL mid-precompute and serves concurrent readers."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from timecma.core.store import EmbeddingStore, StoreMismatchError

NS = "ab" * 32
DIM = 16


def _vectors(n: int) -> tuple[list[np.ndarray], np.ndarray]:
    ids = [np.arange(i, i + 3 + i % 5, dtype=np.int64) for i in range(n)]
    vecs = np.stack([np.full(DIM, i, dtype=np.float32) + np.arange(DIM, dtype=np.float32) / 100 for i in range(n)])
    return ids, vecs


def test_put_get_and_namespace_refusal(tmp_path):
    ids, vecs = _vectors(10)
    with EmbeddingStore(tmp_path / "s", NS, DIM, describe="LLM a") as store:
        keys = store.keys(ids)
        store.put_many(keys[:6], vecs[:6])
        out, found = store.get_many(keys)
        assert found.tolist() == [True] * 6 + [False] * 4
        np.testing.assert_array_equal(out[:6], vecs[:6])
        assert store.missing(keys) == [6, 7, 8, 9] and len(store) == 6
    with pytest.raises(StoreMismatchError, match="built by another LLM.*LLM a"):
        EmbeddingStore(tmp_path / "s", "cd" * 32, DIM, describe="LLM b")
    with pytest.raises(StoreMismatchError, match="float32\\[16\\]"):
        EmbeddingStore(tmp_path / "s", NS, DIM * 2)
    with EmbeddingStore(tmp_path / "s", NS, DIM) as store:  # untouched by the refusals
        assert len(store) == 6


def _slow_writer(path: str, n: int) -> None:
    ids, vecs = _vectors(n)
    store = EmbeddingStore(path, NS, DIM)
    keys = store.keys(ids)
    for i in range(0, n, 4):  # one committed transaction per batch of 4, like precompute
        store.put_many(keys[i : i + 4], vecs[i : i + 4])
        time.sleep(0.02)


def test_sigkill_mid_write_loses_no_committed_entry(tmp_path):
    path, n = str(tmp_path / "s"), 400
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(path, n))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(os.path.join(path, "data.mdb")):
            with EmbeddingStore(path, NS, DIM) as s:
                if len(s) >= 40:
                    break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    ids, vecs = _vectors(n)
    with EmbeddingStore(path, NS, DIM) as store:
        keys = store.keys(ids)
        out, found = store.get_many(keys)
        committed = int(found.sum())
        assert 40 <= committed < n
        np.testing.assert_array_equal(out[found], vecs[found])  # every committed entry intact
        missing = store.missing(keys)
        assert len(missing) == n - committed
        store.put_many([keys[i] for i in missing], vecs[missing])  # resume: only what was missing
        out, found = store.get_many(keys)
        assert found.all() and len(store) == n
        np.testing.assert_array_equal(out, vecs)


def _reader(path: str, n: int, seconds: float, q) -> None:
    ids, vecs = _vectors(n)
    store = EmbeddingStore(path, NS, DIM)
    keys = store.keys(ids)
    seen = reads = 0
    end = time.time() + seconds
    while time.time() < end:
        out, found = store.get_many(keys)
        if not np.array_equal(out[found], vecs[found]):
            q.put(("bad", reads))
            return
        if found.sum() < seen:
            q.put(("shrunk", reads))
            return
        seen = int(found.sum())
        reads += 1
    q.put(("ok", reads))


def test_concurrent_readers_while_writing(tmp_path):
    path, n = str(tmp_path / "s"), 200
    EmbeddingStore(path, NS, DIM).close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(path, n, 3.0, q)) for _ in range(3)]
    for r in readers:
        r.start()
    writer = ctx.Process(target=_slow_writer, args=(path, n))
    writer.start()
    writer.join(60)
    results = [q.get(timeout=60) for _ in readers]
    for r in readers:
        r.join(10)
    assert writer.exitcode == 0
    assert all(status == "ok" and reads > 0 for status, reads in results), results
    with EmbeddingStore(path, NS, DIM) as store:
        assert len(store) == n


def test_text_index_finds_vectors_without_token_ids(tmp_path):
    ids, vecs = _vectors(4)
    texts = [f"prompt {i}" for i in range(4)]
    with EmbeddingStore(tmp_path / "s", NS, DIM) as store:
        keys = store.keys(ids)
        store.put_many(keys[:2], vecs[:2], texts[:2])
        store.put_many(keys[2:3], vecs[2:3])  # stored by ids only (e.g. an older writer)
        out, found = store.get_many_by_text(texts)
        assert found.tolist() == [True, True, False, False]
        np.testing.assert_array_equal(out[:2], vecs[:2])
        store.put_many(keys[2:3], None, texts[2:3])  # text entry for a key already stored
        assert store.get_many_by_text(texts)[1].tolist() == [True, True, True, False]
        assert len(store) == 3  # vectors, not index entries
    with EmbeddingStore(tmp_path / "s", NS, DIM, readonly=True) as ro:
        assert ro.get_many_by_text(texts)[1].sum() == 3 and len(ro) == 3
    # another namespace never sees these texts (and is refused anyway)
    other = EmbeddingStore(tmp_path / "o", "cd" * 32, DIM)
    assert not other.get_many_by_text(texts)[1].any()
    other.close()


def test_float16_store_halves_vectors_and_is_adopted_when_reopened(tmp_path):
    import numpy as np

    from timecma.core.store import EmbeddingStore, StoreMismatchError

    rng = np.random.default_rng(0)
    vec = rng.normal(size=(5, 64)).astype(np.float32)
    ids = [rng.integers(0, 100, size=10) for _ in range(5)]
    with EmbeddingStore(tmp_path / "s16", "ab" * 16, 64, "float16") as st:
        st.put_many(st.keys(ids), vec)
    with EmbeddingStore(tmp_path / "s16", "ab" * 16, 64) as st:  # serving: no dtype given, the store's is used
        assert st.dtype == np.float16
        got, found = st.get_many(st.keys(ids))
    assert found.all() and got.dtype == np.float16
    np.testing.assert_array_equal(got, vec.astype(np.float16))
    with pytest.raises(StoreMismatchError, match="holds float16\\[64\\] vectors, this run needs float32\\[64\\]"):
        EmbeddingStore(tmp_path / "s16", "ab" * 16, 64, "float32")
    with pytest.raises(StoreMismatchError, match="float32 or float16"):
        EmbeddingStore(tmp_path / "s8", "ab" * 16, 64, "int8")


def test_window_records_round_trip_apart_from_prompt_vectors(tmp_path):
    """Window records (a served window's encoded prompts): found by their key under this namespace and precision
    only, not counted as prompt vectors, and a record of the wrong size is refused as corrupt."""
    ids, vecs = _vectors(3)
    rec = np.arange(2 * DIM, dtype=np.float32).reshape(1, 2, DIM)
    with EmbeddingStore(tmp_path / "s", NS, DIM) as store:
        store.put_many(store.keys(ids), vecs)
        key = store.window_key(b"encoder", b"window bytes")
        assert store.get_window(key, rec.shape) is None
        store.put_window(key, rec)
        np.testing.assert_array_equal(store.get_window(key, rec.shape), rec)
        assert store.get_window(store.window_key(b"encoder", b"other window"), rec.shape) is None
        assert len(store) == 3
        with pytest.raises(StoreMismatchError, match="corrupt window record"):
            store.get_window(key, (1, 3, DIM))
    with EmbeddingStore(tmp_path / "s", NS, DIM, precision="openvino:bf16") as other:  # another precision class
        assert other.get_window(other.window_key(b"encoder", b"window bytes"), rec.shape) is None
    with EmbeddingStore(tmp_path / "s", NS, DIM, readonly=True) as ro:
        np.testing.assert_array_equal(ro.get_window(key, rec.shape), rec)
        assert len(ro) == 3
