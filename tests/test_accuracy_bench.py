"""The accuracy benchmark's arithmetic and its reading of a real run (benchmarks.accuracy)."""

import json

import numpy as np
import pytest

from benchmarks.accuracy import compare_lines, cosine_summary, embedding_similarity, markdown, summarise, ROWS


def test_cosine_summary_separates_identical_from_informative_embeddings():
    rng = np.random.default_rng(0)
    same = np.broadcast_to(rng.normal(size=(1, 1, 16)), (5, 3, 16)) + 1e-9 * rng.normal(size=(5, 3, 16))
    s = cosine_summary(same)
    assert s["across_variables"] == pytest.approx(1.0) and s["across_windows"] == pytest.approx(1.0)
    assert abs(s["across_windows_centred"]) < 0.5  # centred, nothing but noise is left
    spread = rng.normal(size=(40, 3, 16))
    t = cosine_summary(spread)
    assert abs(t["across_variables"]) < 0.2 and abs(t["across_windows"]) < 0.2 and t["windows"] == 40


def test_embedding_similarity_reads_the_runs_own_store(small_run):
    data, run = small_run
    s = embedding_similarity(str(run), str(run / "store"), str(data), windows=8)
    assert s["windows"] == 8
    assert all(-1 <= s[k] <= 1 for k in ("across_variables", "across_windows", "across_variables_centred"))


def test_summary_table_and_demo_line_follow_the_runs(small_run):
    _, run = small_run
    m = json.loads((run / "metrics.json").read_text())
    row = next(r for r in ROWS if r.key == "timecma-no-llm-h96")
    s = summarise(row, [m, m], "timecma-no-llm")
    assert s["test_mse"] == pytest.approx(m["test"]["mse"]) and s["test_mse_std"] == 0 and s["seeds"] == 2
    assert s["budget_limited"] and s["limits"] == m["training"]["limits"]  # the fixture stops at its 2-epoch cap
    res = {"machine": {"date": "d", "cpu": "c", "cores": 2, "isa": []}, "latency_backend": "auto", "rows": [s],
           "naive": {"96": m["naive"]["test"]}}
    text = "\n".join(markdown(res))
    assert "**budget-limited**" in text and "0.386" not in text.split("| timecma-no-llm")[1].split("\n")[0]
    line = compare_lines(m, {"rows": [{**s, "budget_limited": False, "pred_len": 12}]}, 12)
    assert "budget-limited" in line.split("\n")[0] and "full recipes" in line.split("\n")[1]
    assert "full recipes" not in compare_lines(m, {"rows": [s]}, 12)  # a budget-limited row is never quoted
