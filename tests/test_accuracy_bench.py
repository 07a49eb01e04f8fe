"""The accuracy benchmark's arithmetic and its reading of a real run (benchmarks.accuracy)."""

import json

import click
import numpy as np
import pytest

from benchmarks.accuracy import (ROWS, _finish, check_trained_with, compare_lines, cosine_summary,
                                 embedding_similarity, markdown, summarise)


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
    assert s["windows"] == 8 and s["split"] == "val"  # never the test split: the final evaluation's alone
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


def _result(rows: list[dict], naive: dict) -> dict:
    return {"machine": {"date": "d", "cpu": "c", "cores": 2, "isa": []}, "latency_backend": "auto", "rows": rows,
            "naive": naive}


def test_one_seed_has_no_spread_and_latency_passes_are_named(small_run):
    _, run = small_run
    m = json.loads((run / "metrics.json").read_text())
    row = next(r for r in ROWS if r.key == "timecma-no-llm-h96")
    one = summarise(row, [m], "timecma-no-llm")
    assert one["test_mse_std"] is None and one["test_mae_std"] is None
    two = summarise(row, [m, {**m, "test": {"mse": m["test"]["mse"] + 0.2, "mae": m["test"]["mae"]}}], "x")
    assert two["test_mse_std"] == pytest.approx(np.sqrt(0.02))  # the sample std: 0.2 apart over two seeds
    lat = {"miss": 1.0, "hit": 0.5, "backend": "openvino", "precision": {"llm": "bf16", "forecaster": "f32"}}
    lines = markdown(_result([{**one, "latency": {**lat, "pass": "p1"}},
                              {**two, "key": "k2", "latency": {**lat, "pass": "p2"}}], {}))
    table = "\n".join(lines)
    assert "in 2 passes (p1, p2" in table and "engines it chose: openvino (llm bf16, forecaster f32)" in table
    first = next(x for x in lines if x.startswith("| timecma-no-llm"))
    assert "±" not in first.split("|")[4]  # one seed: a mean, no spread


def test_concurrent_runs_keep_each_others_rows_and_foreign_files_are_refused(small_run, tmp_path):
    _, run = small_run
    m = json.loads((run / "metrics.json").read_text())
    a = summarise(next(r for r in ROWS if r.key == "dlinear-h96"), [m], "dlinear")
    b = summarise(next(r for r in ROWS if r.key == "timecma-no-llm-h96"), [m], "timecma-no-llm")
    out = tmp_path / "res"
    first, second = _result([], {}), _result([], {})  # both started before either wrote
    first["rows"].append(a)
    _finish(first, str(out), {a["key"]})
    second["rows"].append(b)
    _finish(second, str(out), {b["key"]})
    keys = [r["key"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert keys == ["dlinear-h96", "timecma-no-llm-h96"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "own results"}')
    with pytest.raises(click.ClickException, match="refusing to replace"):
        _finish(_result([a], {}), str(mine), {a["key"]})
    assert (mine / "results.json").read_text() == '{"my": "own results"}' and len(list(mine.iterdir())) == 1
    from click.testing import CliRunner

    from benchmarks.accuracy import cli

    r = CliRunner().invoke(cli, ["run", "--out", str(mine), "--work", str(tmp_path / "w"), "--rows", "dlinear-h96"])
    assert r.exit_code == 1 and "refusing to replace" in r.output  # before any training: nothing in --work
    assert not (tmp_path / "w").exists() and (mine / "results.json").read_text() == '{"my": "own results"}'
    (out / "results.json").write_text("")  # an empty file reads as no table
    _finish(_result([a], {}), str(out), {a["key"]})
    assert [r["key"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["dlinear-h96"]


def test_a_run_read_back_must_match_the_llm_named(small_run, tiny_llm_dir):
    _, run = small_run
    m = json.loads((run / "metrics.json").read_text())
    check_trained_with(m, "p", tiny_llm_dir, None)  # the LLM folder it was trained with, every layer
    with pytest.raises(click.ClickException, match="was trained with LLM"):
        check_trained_with(m, "p", tiny_llm_dir, 12)
    with pytest.raises(click.ClickException, match="not none"):
        check_trained_with(m, "p", None, None)
