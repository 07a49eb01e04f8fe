"""Precompute resumes after SIGKILL and computes only what is missing."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np

from timecma.llm import encode_last_token, load_llm
from timecma.precompute import precompute
from timecma.core.store import EmbeddingStore
from timecma.core.tokens import encode_prompts


def _prompts(n: int) -> list[str]:
    return [f"From 01/01/2020 00:00 to 02/01/2020 00:00, the values were {i}, {i * 7 % 31}, {i % 5} "
            f"every hour. The total trend value was {i / 7:0f}" for i in range(n)]


def _run(llm_dir: str, store_dir: str, n: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    llm = load_llm(llm_dir)
    store = EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm)
    ids = encode_prompts(llm.backend, _prompts(n))
    precompute(store, llm, ids, store.keys(ids), batch_size=2)


def test_sigkill_mid_precompute_then_resume(tiny_llm_dir, tmp_path):
    n, store_dir = 3000, str(tmp_path / "store")
    llm = load_llm(tiny_llm_dir)
    EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm).close()
    proc = mp.get_context("spawn").Process(target=_run, args=(tiny_llm_dir, store_dir, n))
    proc.start()
    deadline = time.time() + 120
    with EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm) as probe:
        while len(probe) < 50 and time.time() < deadline and proc.is_alive():
            time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, "writer finished before it could be killed"

    store = EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm)
    ids = encode_prompts(llm.backend, _prompts(n))
    keys = store.keys(ids)
    got, found = store.get_many(keys)
    committed = int(found.sum())
    assert 50 <= committed < n
    idx = np.flatnonzero(found)
    expected = np.concatenate([encode_last_token(llm, [ids[i] for i in idx[j:j + 64]]) for j in range(0, len(idx), 64)])
    np.testing.assert_allclose(got[idx], expected, atol=1e-5, rtol=0)  # every committed entry intact

    computed = precompute(store, llm, ids, keys, batch_size=64)
    assert computed == n - committed  # the resumed run computes only what was missing
    assert len(store) == n
    assert precompute(store, llm, ids, keys) == 0
