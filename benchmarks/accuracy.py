"""Accuracy you can trust, beside what it costs: each model family trained with its published recipe on EVERY
training window until early stopping, selected on validation only, evaluated once on the full test split, with
its training wall time and batch-1 latency (store miss and hit, one pass over every row's bundle).

    python -m benchmarks.accuracy run --out benchmarks/results/accuracy-etth1 --work runs/accuracy
    python -m benchmarks.accuracy run --rows timecma-smollm2 --llm runs/llm/smollm2 --llm-layers 6   # LLM rows
    python -m benchmarks.accuracy compare runs/demo/etth1/metrics.json   # a run beside the table (make demo)

Resumable: a run whose metrics.json exists in --work is read, not retrained, and results are rewritten after
every run, so a stopped session keeps every finished row. A row whose training ended at its epoch cap, or used
a window stride, is labelled budget-limited wherever it is shown.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import click
import numpy as np

from timecma.core.files import check_replaceable, file_sha256, portable_name

from .machine import machine_info, machine_line, write_results

log = logging.getLogger(__name__)

DATA = "timecma/datasets/ETTh1.csv"
HORIZONS = (96, 192, 336, 720)
# Published ETTh1 figures at lookback 96 (TimeCMA paper, Table 1). TimeCMA's were selected on the TEST split
# by its public script (it keeps a checkpoint after epoch 10 only when test MSE improves); ours never read test.
# DLinear at the longer horizons: iTransformer's full results (ICLR 2024, the same lookback-96 setting).
PUBLISHED = {("timecma", 96): (0.373, 0.391, "TimeCMA paper, GPT-2, selected on test"),
             ("dlinear", 96): (0.386, 0.400, "TimeCMA paper, DLinear row"),
             ("dlinear", 192): (0.437, 0.432, "iTransformer full results, DLinear"),
             ("dlinear", 336): (0.481, 0.459, "iTransformer full results, DLinear"),
             ("dlinear", 720): (0.519, 0.516, "iTransformer full results, DLinear"),
             ("repeat_last", 96): (1.295, 0.713, "TimeCMA paper, Repeat row")}


@dataclass(frozen=True)
class Row:
    """One table row: a model family at a horizon, over ``seeds`` seeds (the recipe's seed, +1, +2)."""

    key: str
    model: str
    pred_len: int
    seeds: int
    llm: str | None = None  # "real": --llm; "random": its architecture with random weights

    def label(self, llm_name: str, layers: int | None) -> str:
        depth = f", first {layers} layers" if layers else ""
        if self.llm == "real":
            return f"timecma + {llm_name} (pretrained{depth})"
        if self.llm == "random":
            return f"timecma + {llm_name}'s architecture, random weights{depth}"
        return self.model


ROWS = ([Row(f"dlinear-h{h}", "dlinear", h, 3) for h in HORIZONS]
        + [Row("timecma-no-llm-h96", "timecma-no-llm", 96, 3)]
        + [Row(f"timecma-no-llm-h{h}", "timecma-no-llm", h, 1) for h in HORIZONS[1:]]
        + [Row("timecma-smollm2-h96", "timecma", 96, 1, "real"), Row("timecma-random-h96", "timecma", 96, 1, "random")])


def run_once(row: Row, seed: int, work: str, data: str, llm: str | None, layers: int | None,
             precompute_backend: str, llm_batch_size: int) -> dict:
    """Train one (row, seed) with the row's recipe and every default, or read the metrics it already wrote."""
    run = os.path.join(work, f"{row.key}-s{seed}")
    path = os.path.join(run, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        check_trained_with(done, path, llm, layers)
        return done
    from timecma.core.config import TrainConfig
    from timecma.core.recipes import recipe_for
    from timecma.training import RunSpec, train

    recipe = recipe_for(row.model, row.pred_len)
    cfg = TrainConfig.from_recipe(recipe, seed=seed, device="cpu", precompute_backend=precompute_backend,
                                  llm_batch_size=llm_batch_size)
    model = dict(seq_len=96, pred_len=row.pred_len, **recipe.model)
    spec = RunSpec(data, run, llm or "gpt2", model, row.model, store_dir=store_dir(work, llm, layers) if llm else None,
                   llm_layers=layers)
    log.info("== %s seed %d -> %s", row.key, seed, run)
    return train(spec, cfg)


def check_trained_with(metrics: dict, path: str, llm: str | None, layers: int | None) -> None:
    """A run read back must have been trained with the LLM and depth this command names: its row is labelled
    from the command line, so a 6-layer run must not be shown as another depth's (or another LLM's)."""
    had = metrics["training"].get("llm") or {}
    want = {"id": portable_name(llm), "layers": layers} if llm else {}
    got = {"id": had.get("id"), "layers": had.get("layers")} if had else {}
    if got != want:
        raise click.ClickException(f"{path} was trained with LLM {got or 'none'}, not {want or 'none'}: use "
                                   "another --work, or the --llm/--llm-layers it was trained with")


def store_dir(work: str, llm: str | None, layers: int | None) -> str:
    """One store per LLM and depth (a store holds one namespace): every row and seed on it embeds a prompt once."""
    return os.path.join(work, "stores", f"{os.path.basename(os.path.normpath(llm or 'none'))}-{layers or 'all'}")


def embedding_similarity(run: str, store_path: str, data: str, windows: int = 256) -> dict:
    """How much the last-token embeddings say: mean pairwise cosine similarity across the variables of a window
    and across windows (same variable), raw and after centring (subtracting the mean embedding over these
    windows), read from the run's store. Validation windows: the test split is the final evaluation's alone.
    Users of the public code report near-identical embeddings (cosine about 1)."""
    from timecma.checkpoint import load_checkpoint
    from timecma.core.prompts import PromptRenderer
    from timecma.core.store import EmbeddingStore
    from timecma.data import SplitWindows, load_series, make_windows, split_borders
    from timecma.llm import load_llm, recorded_layers
    from timecma.precompute import build_prompt_set

    ck = load_checkpoint(os.path.join(run, "best.pt"))
    d, info = ck["data"], ck["llm"]
    series = load_series(data, d["time_col"])
    borders = split_borders(len(series.values), d["seq_len"], d["split"], series.frequency)
    val = make_windows(borders, d["seq_len"], d["pred_len"], 1, 1)["val"]
    pick = np.linspace(0, len(val.starts) - 1, min(windows, len(val.starts))).round().astype(int)
    llm = load_llm(info["id"], "cpu", layers=recorded_layers(info))
    precision = ((info.get("extra") or {}).get("precompute") or {}).get("precision", "fp32")
    store = EmbeddingStore(store_path, info["namespace"], info["d_llm"], readonly=True, precision=precision)
    try:
        ps = build_prompt_set(series, SplitWindows("val", val.starts[pick], val.seq_len, val.pred_len),
                              PromptRenderer.from_record(ck["prompt"], series.frequency), llm, store)
        emb, found = store.get_many(ps.keys)
    finally:
        store.close()
    if not found.all():
        raise RuntimeError(f"{(~found).sum()} validation prompts are not in the store {store_path}")
    return {**cosine_summary(emb.reshape(len(pick), ps.n_vars, -1).astype(np.float64)), "split": "val"}


def cosine_summary(emb: np.ndarray) -> dict:
    """``emb`` [W, N, D] -> mean pairwise cosine across the N variables of a window and across the W windows
    of a variable, raw and centred."""
    def mean_pairwise(x: np.ndarray) -> float:  # x [..., K, D]: mean cosine over the K x K off-diagonal pairs
        u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        g = u @ np.swapaxes(u, -1, -2)
        k = x.shape[-2]
        return float(((g.sum(axis=(-1, -2)) - np.trace(g, axis1=-2, axis2=-1)) / (k * (k - 1))).mean())

    centred = emb - emb.reshape(-1, emb.shape[-1]).mean(axis=0)
    return {"across_variables": mean_pairwise(emb), "across_windows": mean_pairwise(np.swapaxes(emb, 0, 1)),
            "across_variables_centred": mean_pairwise(centred),
            "across_windows_centred": mean_pairwise(np.swapaxes(centred, 0, 1)), "windows": int(emb.shape[0])}


def summarise(row: Row, runs: list[dict], label: str) -> dict:
    """Mean and spread over the seeds, and how each run ended."""
    mse = [r["test"]["mse"] for r in runs]
    mae = [r["test"]["mae"] for r in runs]
    tr = [r["training"] for r in runs]

    def spread(x: list[float]) -> float | None:  # the sample standard deviation over seeds; one seed has none
        return float(np.std(x, ddof=1)) if len(x) > 1 else None

    return {"key": row.key, "row": label, "model": row.model, "pred_len": row.pred_len, "seeds": len(runs),
            "test_mse": float(np.mean(mse)), "test_mse_std": spread(mse), "test_mae": float(np.mean(mae)),
            "test_mae_std": spread(mae), "per_seed": [{"seed": t["settings"]["seed"], "mse": r["test"]["mse"],
                                                           "mae": r["test"]["mae"], "stop": t["stop"],
                                                           "best_epoch": t["best_epoch"], "steps": t["optimizer_steps"]}
                                                          for r, t in zip(runs, tr)],
            "recipe": tr[0]["recipe"], "budget_limited": any(t["budget_limited"] for t in tr),
            "limits": sorted({lim for t in tr for lim in t["limits"]}),
            "train_seconds": float(np.mean([r["wall_seconds"] - r["embedding_seconds"] for r in runs])),
            "embedding_seconds": float(np.mean([r["embedding_seconds"] for r in runs])),
            "windows": runs[0]["windows"], "naive": {row.pred_len: runs[0]["naive"]["test"]}}


SPLIT_NAMES = {"val": "validation", "test": "test"}


def _mean_spread(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _latency_passes(rows: list[dict]) -> str:
    """How the latency columns were measured: one pass over every row, or which rows came from which pass."""
    passes = sorted({(r.get("latency") or {}).get("pass", "an earlier pass") for r in rows if r.get("latency")})
    if not passes:
        return " (**not measured yet**: the columns read -)"
    missing = [r["key"] for r in rows if not r.get("latency")]
    said = f" in one pass ({passes[0]})" if len(passes) == 1 else (
        f" in {len(passes)} passes ({', '.join(passes)}: each row's in results.json; compare rows of one pass only)")
    return said + (f"; not measured yet: {', '.join(missing)}" if missing else "")


def _engine(lat: dict) -> str:
    """``openvino (llm bf16, forecaster f32)``: the backend and each graph's precision, as ``latency`` records."""
    graphs = ", ".join(f"{g} {p}" for g, p in (lat.get("precision") or {}).items())
    return f"{lat.get('backend', '?')}{f' ({graphs})' if graphs else ''}"


def markdown(res: dict) -> list[str]:
    engines = sorted({_engine(r["latency"]) for r in res["rows"] if r.get("latency")})
    lines = [f"# Accuracy on ETTh1 with full training (lookback 96), {res['machine']['date']}", "",
             machine_line(res["machine"]), "",
             "Every row: its family's recipe with default flags (`timecma-train --model M --pred-len H`), every "
             "training window, selection on validation MSE only, the full test split evaluated once. MSE/MAE in "
             "train-split standard-normalised units (the paper's); mean ± sample std over seeds (one seed: no "
             "spread). Latency: batch 1, end to "
             f"end p50 on `{res['latency_backend']}` (miss: the LLM runs; hit: embeddings from the store; engines "
             f"it chose: {', '.join(engines) or '-'}), every row's first-seed bundle"
             + _latency_passes(res["rows"])
             + ". The LLM rows were trained on embeddings from the precompute engine their metrics.json names "
             "(eager bf16 by default); their miss column times the serving engine above. "
             "A model without the LLM has no store: its two columns are one pipeline, miss a new window each "
             "call (cold caches), hit the same window again. Re-run: `python -m benchmarks.accuracy run` (see its "
             "--help).", "",
             "| model | H | seeds | test MSE | test MAE | published MSE / MAE | best epoch | train s | miss ms | hit ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pub = PUBLISHED.get((r["model"], r["pred_len"]))
        lat = {k: f"{v:.2f}" for k, v in (r.get("latency") or {}).items() if k in ("miss", "hit") and v is not None}
        ended = ", ".join(f"{s['best_epoch']}{'' if s['stop'] == 'early_stop' else ' (' + s['stop'] + ')'}"
                          for s in r["per_seed"])
        flag = " **budget-limited**: " + "; ".join(r["limits"]) if r["budget_limited"] else ""
        published = f"{pub[0]:.3f} / {pub[1]:.3f}" + (" (GPT-2, on test)" if r["model"] == "timecma" else "") \
            if pub else "-"
        lines.append(f"| {r['row']}{flag} | {r['pred_len']} | {r['seeds']} | "
                     f"{_mean_spread(r['test_mse'], r['test_mse_std'])} | "
                     f"{_mean_spread(r['test_mae'], r['test_mae_std'])} | "
                     f"{published} | {ended} | {r['train_seconds']:.0f} | "
                     f"{lat.get('miss', '-')} | {lat.get('hit', '-')} |")
    for h, naive in sorted(res["naive"].items(), key=lambda kv: int(kv[0])):
        for name in ("seasonal_naive", "repeat_last"):
            pub = PUBLISHED.get((name, int(h)))
            lines.append(f"| {name.replace('_', '-')} | {h} | - | {naive[name]['mse']:.4f} | {naive[name]['mae']:.4f} | "
                         f"{f'{pub[0]:.3f} / {pub[1]:.3f}' if pub else '-'} | - | 0 | | |")
    sims = [r for r in res["rows"] if "embedding_similarity" in r]
    if sims:
        lines += ["", "How much the last-token embeddings say (mean pairwise cosine over "
                  f"{sims[0]['embedding_similarity']['windows']} "
                  f"{SPLIT_NAMES[sims[0]['embedding_similarity'].get('split', 'test')]} windows):", "",
                  "| row | across variables | across windows | across variables, centred | across windows, centred |",
                  "|---|---|---|---|---|"]
        for r in sims:
            s = r["embedding_similarity"]
            lines.append(f"| {r['row']} | {s['across_variables']:.4f} | {s['across_windows']:.4f} | "
                         f"{s['across_variables_centred']:.4f} | {s['across_windows_centred']:.4f} |")
    missing = res.get("not_run", [])
    if missing:
        lines += ["", "Not run yet (no figure is claimed for them): " + ", ".join(f"`{k}`" for k in missing) + "."]
    lines += ["", "Published: TimeCMA, DLinear (h96) and Repeat from the TimeCMA paper (Table 1); DLinear h192-720 from "
              "iTransformer's full results (same lookback-96 setting). The published TimeCMA figures were selected on "
              "the test split by the public script; every figure of ours was selected on validation only. "
              "`best epoch`: each seed's, in order, every seed early-stopped unless its ending is named; a row with a seed that "
              "ended at its epoch cap is marked budget-limited. `train s`: mean training wall time per seed, "
              "prompt embedding excluded, on the shared 2-core machine (other jobs ran beside it)."]
    return lines


@click.group()
def cli() -> None:
    """Full-training accuracy on ETTh1 beside latency (run), and any run compared with it (compare)."""


@cli.command("run")
@click.option("--data", default=DATA, show_default=True)
@click.option("--out", default="benchmarks/results/accuracy-etth1", show_default=True)
@click.option("--work", default="runs/accuracy", show_default=True, help="Checkpoints, bundles and stores.")
@click.option("--rows", default=None, help="Comma-separated row keys or prefixes to run (default: all but the LLM "
                                          "rows, which need --llm); the others are kept from results.json.")
@click.option("--llm", "llm_id", default=None, help="The pretrained LLM of the LLM rows (e.g. runs/llm/smollm2).")
@click.option("--llm-layers", type=int, default=None, help="Its first K layers (e.g. 6).")
@click.option("--precompute-backend", default="torch:bf16", show_default=True,
              help="Engine that embeds the LLM rows' prompts; eager bf16 at batch 4 was the fastest gated one on the "
                   "2-core AMX Xeon (47 prompts/s at 6 layers, worst prompt 1.4e-2 vs fp32; OpenVINO bf16 38, fp32 10).")
@click.option("--llm-batch-size", default=4, show_default=True)
@click.option("--latency-backend", default="auto", show_default=True)
@click.option("--latency-iters", default=30, show_default=True)
@click.option("--no-latency", is_flag=True, help="Skip the latency pass (run it later, machine quiet).")
@click.option("--seeds", default=None, help="Comma-separated seeds for every wanted row, instead of the recipe's "
                                           "seed and the next ones (the table's seed column says how many ran).")
def run_cmd(data, out, work, rows, llm_id, llm_layers, precompute_backend, llm_batch_size, latency_backend,
            latency_iters, no_latency, seeds) -> None:
    """Train (or read) every wanted row, rewrite the results after each, then time every row's bundle."""
    from timecma.core.logs import setup_logging

    setup_logging(False)
    wanted = [r for r in ROWS if (rows is None and r.llm is None)
              or (rows is not None and any(r.key.startswith(p) for p in rows.split(",")))]
    if any(r.llm for r in wanted) and not llm_id:
        raise click.UsageError("the LLM rows need --llm (e.g. runs/llm/smollm2, from `make smollm2`)")
    _check_out(out)
    old = _read(out)
    res = {"machine": machine_info(), "data": os.path.basename(data), "latency_backend": latency_backend,
           "rows": [r for r in old.get("rows", []) if r["key"] not in {w.key for w in wanted}],
           "naive": old.get("naive", {})}
    for row in wanted:
        from .ablation import random_twin

        llm = None if row.llm is None else (llm_id if row.llm == "real" else
                                            random_twin(llm_id, os.path.join(work, "random-llm")))
        from timecma.core.recipes import recipe_for

        first = recipe_for(row.model, row.pred_len).seed  # the recipe's seed, then +1, +2
        chosen = [int(x) for x in seeds.split(",")] if seeds else [first + i for i in range(row.seeds)]
        runs = [run_once(row, seed, work, data, llm, llm_layers if llm else None, precompute_backend,
                         llm_batch_size) for seed in chosen]
        summary = summarise(row, runs, row.label(portable_name(llm_id) if llm_id else "", llm_layers))
        res["naive"].update({str(row.pred_len): runs[0]["naive"]["test"]})
        if row.llm:
            summary["embedding_similarity"] = embedding_similarity(
                os.path.join(work, f"{row.key}-s{chosen[0]}"), store_dir(work, llm, llm_layers), data)
        res["rows"] = [r for r in res["rows"] if r["key"] != row.key] + [summary]
        _finish(res, out, {row.key})
    if not no_latency:
        _finish(res, out, set(), latency_pass(res, work, data, latency_backend, latency_iters))


def latency_pass(res: dict, work: str, data: str, backend: str, iters: int) -> dict:
    """Export each row's first-seed checkpoint (again where its bundle was made from another checkpoint) and
    time it at batch 1, every row in one pass (stamped with the pass's start). Returns, per row timed, the
    (seed, test MSE) pairs it was timed for and its latency: ``_finish`` puts it on that row only."""
    from timecma.export.bundle import export_bundle
    from timecma.export.options import ExportError, ExportOptions
    from timecma.export.source import source_from_checkpoint
    from timecma.llm import load_llm, recorded_layers

    from .ablation import latency

    stamp, timed = time.strftime("%Y-%m-%d %H:%M"), {}
    for r in res["rows"]:
        run = os.path.join(work, f"{r['key']}-s{r['per_seed'][0]['seed']}")
        bundle, ckpt = os.path.join(run, "bundle"), os.path.join(run, "best.pt")
        if not os.path.exists(ckpt):  # a row kept from results.json, trained elsewhere
            log.info("%s: no checkpoint in %s; its latency is kept as it was", r["key"], run)
            continue
        with open(os.path.join(run, "metrics.json")) as f:
            if json.load(f)["test"]["mse"] != r["per_seed"][0]["mse"]:  # the row on disk came from another run
                log.warning("%s: %s is not the run this row reports; not timed", r["key"], run)
                continue
        if _bundle_origin(bundle) != file_sha256(ckpt):
            src = source_from_checkpoint(ckpt)
            llm = load_llm(src.llm["id"], layers=recorded_layers(src.llm)) if src.cfg.uses_llm and src.llm else None
            try:
                export_bundle(src, llm, ExportOptions(out_dir=bundle, tensorrt="skip", parity_windows=4, force=True))
            except ExportError as exc:  # e.g. something that is not a bundle sits at run/bundle: left alone
                raise click.ClickException(f"{r['key']}: {exc}") from exc
        t0 = time.time()
        r["latency"] = {**latency(bundle, data, iters, backend), "pass": stamp}
        timed[r["key"]] = (_seeds_run(r), r["latency"])
        log.info("%s: latency %s (%.0fs)", r["key"], r["latency"], time.time() - t0)
    return timed


def _bundle_origin(bundle: str) -> str | None:
    """The sha256 of the checkpoint a bundle was exported from (None: no bundle there, or one this timecma
    cannot serve)."""
    from timecma.core.errors import BundleError
    from timecma.core.manifest import read_manifest

    try:
        return read_manifest(bundle, verify=False).origin.get("sha256")
    except (BundleError, OSError):
        return None


def _seeds_run(row: dict) -> list[tuple[int, float]]:
    """Which runs a row reports: (seed, test MSE) of each, what a latency figure is tied to."""
    return [(x["seed"], x["mse"]) for x in row["per_seed"]]


def _read(out: str) -> dict:
    """The table on disk ({} where there is none, or an empty file)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path} cannot be read as this benchmark's results ({exc})") from exc


def _check_out(out: str) -> None:
    """Only a table this benchmark wrote may be replaced: checked before any work, and again at each write."""
    for name in ("results.json", "results.md"):
        check_replaceable(os.path.join(out, name), _ours, "an accuracy table this benchmark wrote",
                          click.ClickException)


def _ours(path: str) -> bool:
    """A results.json / results.md this benchmark wrote (the only ones ``run`` replaces)."""
    try:
        with open(path) as f:
            if path.endswith(".md"):
                return f.readline().startswith("# Accuracy on ")
            return {"rows", "naive", "machine", "not_run"} <= set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False


def _finish(res: dict, out: str, keys: set[str], timed: dict | None = None) -> None:
    """Write the results with this command's rows (``keys``) over the rows on disk now, not over the snapshot
    it started from: several runs (say the LLM rows and the no-LLM rows, hours each) may write one table.
    ``timed`` (key -> ([(seed, mse)...], latency)) adds latency to a row on disk that is still the one timed.
    The read-merge-write holds an exclusive lock on the results folder; files are replaced whole."""
    import fcntl

    os.makedirs(out, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. NFS, where flock needs a file open for writing
            log.warning("cannot lock %s (%s): a run writing the same table at this moment could lose rows", out, exc)
        _check_out(out)
        now = _read(out)
        rows = [r for r in now.get("rows", []) if r["key"] not in keys] + [r for r in res["rows"] if r["key"] in keys]
        for r in rows:  # timings go onto the row on disk only where it is still the row that was timed
            t = (timed or {}).get(r["key"])
            if t and _seeds_run(r) == t[0]:
                r["latency"] = t[1]
        merged = {**res, "rows": rows, "naive": {**now.get("naive", {}), **res["naive"]}}
        order = {r.key: i for i, r in enumerate(ROWS)}
        merged["rows"].sort(key=lambda r: order.get(r["key"], len(order)))
        merged["not_run"] = [r.key for r in ROWS if r.key not in {x["key"] for x in merged["rows"]}]
        write_results(out, merged, markdown(merged))
        res.update(rows=merged["rows"], naive=merged["naive"])
    finally:
        os.close(fd)  # releases the lock


@cli.command("compare")
@click.argument("metrics", type=click.Path(exists=True, dir_okay=False))
@click.option("--horizon", default=96, show_default=True, help="The run's pred_len.")
@click.option("--results", default="benchmarks/results/accuracy-etth1", show_default=True)
def compare_cmd(metrics: str, horizon: int, results: str) -> None:
    """One run's test figures beside seasonal-naive, how it was trained, and what the full recipes reach."""
    with open(metrics) as f:
        click.echo(compare_lines(json.load(f), _read(results), horizon))


def compare_lines(m: dict, res: dict, horizon: int) -> str:
    t, naive = m["training"], m["naive"]["test"]["seasonal_naive"]
    limited = f" (budget-limited: {'; '.join(t['limits'])})" if t["budget_limited"] else ""
    out = [f"this run: test MSE {m['test']['mse']:.4f} / MAE {m['test']['mae']:.4f}, recipe {t['recipe']}{limited}; "
           f"seasonal-naive {naive['mse']:.4f} / {naive['mae']:.4f} on the same windows"]
    full = [r for r in res.get("rows", []) if r["pred_len"] == horizon and not r["budget_limited"]]
    if full:
        out.append(f"full recipes, every window, horizon {horizon} (benchmarks/results/accuracy-etth1): " + ", ".join(
            f"{r['row']} {r['test_mse']:.4f} / {r['test_mae']:.4f} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
            for r in full))
    return "\n".join(out)


if __name__ == "__main__":
    cli()
