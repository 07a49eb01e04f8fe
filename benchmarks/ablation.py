"""Does the LLM earn its cost? Train the variants on the bundled ETTh1 (seq 96, pred 96) with
validation-only model selection, evaluate each on the test split once, export each, and put
its batch-1 latency beside its accuracy (`make ablation`; not part of `make test`).

    python -m benchmarks.ablation --llm runs/demo/tiny-llm --out benchmarks/results/ablation-etth1

Test MSE/MAE are in the paper's units (train-split standard-normalised), for every row,
whatever its scaler. With the offline random-weight LLM the LLM rows measure the
architecture, not a pretrained model's knowledge: say so wherever the table is quoted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import click

from timecma.core.config import TrainConfig
from timecma.core.manifest import read_manifest
from timecma.runtime import make_backend

from .harness import BenchConfig, bench_bundle, real_windows
from .machine import machine_info

log = logging.getLogger(__name__)

# (row name, train keyword arguments); "llm": "random" is the --llm architecture with random weights
TINY: list[tuple[str, dict[str, Any]]] = [
    ("timecma (reference template, standard scaler)", {"model_name": "timecma"}),
    ("timecma, log scaler", {"model_name": "timecma", "scaler_kind": "log"}),
    ("timecma, `lags` template", {"model_name": "timecma", "template": "lags"}),
    ("timecma, seasonal-naive residual", {"model_name": "timecma", "residual": "seasonal-naive"}),
    ("timecma-no-llm", {"model_name": "timecma-no-llm"}),
    ("dlinear", {"model_name": "dlinear"}),
]
# A real pretrained LLM (--llm runs/llm/smollm2): does pretraining, and how much of the LLM, earn its cost?
REAL: list[tuple[str, dict[str, Any]]] = [
    ("timecma + SmolLM2, all 30 layers (pretrained)", {"model_name": "timecma"}),
    ("timecma + SmolLM2, first 12 layers", {"model_name": "timecma", "llm_layers": 12}),
    ("timecma + SmolLM2, first 6 layers", {"model_name": "timecma", "llm_layers": 6}),
    ("timecma + SmolLM2's architecture, random weights, first 6 layers",
     {"model_name": "timecma", "llm_layers": 6, "llm": "random"}),
    ("timecma-no-llm", {"model_name": "timecma-no-llm"}),
    ("dlinear", {"model_name": "dlinear"}),
]
# Joint text and time-series training (`--joint`): the LLM frozen (the paper) or learning with the forecaster
JOINT: list[tuple[str, dict[str, Any]]] = [
    ("timecma, frozen LLM (the paper)", {"model_name": "timecma"}),
    ("timecma, --joint lora (pretrained weights + adapters)", {"model_name": "timecma", "joint": "lora"}),
    ("timecma, --joint full --llm-init xavier", {"model_name": "timecma", "joint": "full", "llm_init": "xavier"}),
    ("timecma, frozen LLM, `log-values` template", {"model_name": "timecma", "template": "log-values"}),
    ("timecma, --joint lora, `log-values` template", {"model_name": "timecma", "joint": "lora",
                                                       "template": "log-values"}),
]
SUITES: dict[str, list[tuple[str, dict[str, Any]]]] = {"tiny": TINY, "real": REAL, "joint": JOINT}
BUDGET_LIMITED = ("**Budget-limited, not an accuracy claim**: every row trained on a strided subsample of the training "
                  "windows with an epoch cap, and most rows ended at the cap. Full-training figures: "
                  "`benchmarks/results/accuracy-etth1/`.")
TRAIN_CONFIG_KEYS = ("joint", "llm_init", "joint_weight")  # row settings that are TrainConfig fields


# what must agree for a saved twin to be ``llm_dir``'s architecture
TWIN_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "n_inner", "vocab_size")


def random_twin(llm_dir: str, dest: str, seed: int = 0) -> str:
    """The same architecture and tokenizer as ``llm_dir`` with freshly initialised weights (saved once; one
    saved before is reused only where its architecture is ``llm_dir``'s)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if os.path.exists(os.path.join(dest, "config.json")):
        have, want = (AutoConfig.from_pretrained(d) for d in (dest, llm_dir))  # attributes: GPT-2 maps the names
        differ = [k for k in TWIN_KEYS if getattr(have, k, None) != getattr(want, k, None)]
        if differ:
            raise click.ClickException(f"{dest} is a random twin of another architecture ({', '.join(differ)} "
                                       f"differ from {llm_dir}'s): use another --work")
        return dest
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(llm_dir)).save_pretrained(dest)
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(dest)
    return dest


def latency(bundle: str, data: str, iters: int, backend: str) -> dict:
    """Batch-1 end-to-end p50 on ``backend``: store miss (LLM runs) and hit."""
    m = read_manifest(bundle)
    cfg = BenchConfig(bundle=bundle, backends=[backend], hit_iters=iters, miss_iters=min(iters, 10), budget_s=20)
    values, ts = real_windows(m, cfg.miss_iters + 1, data)
    be = make_backend(backend, bundle, m)
    r, _ = bench_bundle(m, be, values, ts, cfg)
    return {**{k: r[k]["end_to_end_ms"]["p50"] for k in ("miss", "hit")}, "backend": be.name,
            **({"precision": be.precision} if hasattr(be, "precision") else {})}


@click.command()
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--llm", "llm_id", required=True, help="The LLM for the LLM rows (hub id or directory).")
@click.option("--out", default="benchmarks/results/ablation-etth1", show_default=True)
@click.option("--work", default="runs/ablation", show_default=True, help="Checkpoints and bundles go here.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--suite", type=click.Choice(sorted(SUITES)), default="tiny", show_default=True,
              help="tiny: the variants on the offline random-weight LLM; real: a pretrained LLM at several depths, "
                   "its architecture with random weights, and the baselines; joint: the LLM frozen vs trained with "
                   "the forecaster (--joint lora, --joint full --llm-init xavier), with the `log-values` template.")
@click.option("--train-stride", default=4, show_default=True, help="Every k-th training window.")
@click.option("--eval-stride", default=1, show_default=True,
              help="Every k-th validation and test window (1 = all): one deterministic subsample, the same for "
                   "every row, for LLMs too slow to embed every window.")
@click.option("--precompute-backend", default="torch", show_default=True,
              help="Engine that embeds the prompts (timecma-train --precompute-backend).")
@click.option("--latency-backend", default="ort-cpu", show_default=True,
              help="Backend of the batch-1 latency columns (auto: the fastest available here).")
@click.option("--latency-iters", default=50, show_default=True)
@click.option("--llm-batch-size", default=64, show_default=True)
@click.option("--rows", default=None, help="Comma-separated row numbers (1-based) to (re)run; the others are kept "
                                          "from an existing results.json.")
@click.option("--latency-only", is_flag=True, help="Measure the latency columns again on the bundles already in "
                                                   "--work, all rows in one pass (keep the machine quiet), and keep "
                                                   "the accuracy columns of results.json.")
def main(data: str, llm_id: str, out: str, work: str, epochs: int, suite: str, train_stride: int, eval_stride: int,
         precompute_backend: str, latency_backend: str, latency_iters: int, llm_batch_size: int,
         rows: str | None, latency_only: bool) -> None:
    from timecma.core.logs import setup_logging
    from timecma.export.bundle import export_bundle
    from timecma.export.options import ExportOptions
    from timecma.export.source import source_from_checkpoint
    from timecma.llm import load_llm, recorded_layers
    from timecma.core.recipes import recipe_for
    from timecma.training import RunSpec, train

    setup_logging(False)
    if latency_only:
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        for (name, kw), row in zip(SUITES[suite], res["rows"]):
            assert row["row"] == name, f"{out}/results.json is not the {suite} suite's"
            row["batch1_ms"] = latency(os.path.join(_run_dir(work, kw), "bundle"), data, latency_iters,
                                        latency_backend)
            click.echo(f"{name}: {row['batch1_ms']}", err=True)
        res["machine"], res["latency_pass"] = machine_info(), "one quiet pass over every row's bundle"
        _write(res, out)
        return
    # the budget-limited setup these ablations were run with (their results say so): the old defaults, a strided
    # training split and an epoch cap; the full-training figures are benchmarks.accuracy's
    model = dict(seq_len=96, pred_len=96, channel=32, e_layer=2, d_layer=2, head=8, d_ff=32, dropout=0.2)
    tcfg = TrainConfig.from_recipe(recipe_for("timecma", 96), epochs=epochs, patience=3, batch_size=32,
                                   cosine_period=min(epochs, 20), shuffle=True, seed=2036, train_stride=train_stride,
                                   eval_stride=eval_stride, llm_batch_size=llm_batch_size, device="cpu",
                                   precompute_backend=precompute_backend)
    keep: dict = {}
    naive = None
    only = {int(r) for r in rows.split(",")} if rows else None
    if only and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            old = json.load(f)
        keep, naive = {r["row"]: r for r in old["rows"]}, old["naive_test"]
    table: list[dict] = []
    for i, (name, kw) in enumerate(SUITES[suite], 1):
        if only and i not in only and name in keep:
            table.append(keep[name])
            continue
        run = _run_dir(work, kw)
        click.echo(f"== {name}", err=True)
        kw = dict(kw)
        llm = random_twin(llm_id, os.path.join(work, "random-llm")) if kw.pop("llm", None) == "random" else llm_id
        # one store per LLM and depth (a store holds one namespace): rows sharing an LLM embed each prompt once
        store = os.path.join(work, "stores", f"{os.path.basename(os.path.normpath(llm))}-{kw.get('llm_layers', 'all')}")
        row_cfg = dataclasses.replace(tcfg, **{k: kw.pop(k) for k in TRAIN_CONFIG_KEYS if k in kw})
        metrics = train(RunSpec(data, run, llm, model, store_dir=store, **kw), row_cfg)
        src = source_from_checkpoint(os.path.join(run, "best.pt"))
        loaded = load_llm(src.llm["id"], layers=recorded_layers(src.llm)) if src.cfg.uses_llm and src.llm else None
        export_bundle(src, loaded, ExportOptions(out_dir=os.path.join(run, "bundle"), force=True, tensorrt="skip",
                                                 parity_windows=4, openvino="auto" if suite == "tiny" else "skip"))
        del loaded
        lat = latency(os.path.join(run, "bundle"), data, latency_iters, latency_backend)
        naive = metrics["naive"]["test"]
        table.append({"row": name, "test_mse": metrics["test"]["mse"], "test_mae": metrics["test"]["mae"],
                      "val_mse": metrics["val"]["mse"], "best_epoch": metrics["best_epoch"],
                      "batch1_ms": lat, "params": sum(v.numel() for v in src.state_dict.values()),
                      "windows": metrics["windows"], "embedding_seconds": metrics["embedding_seconds"],
                      "embeddings_computed": metrics["embeddings_computed"],
                      "seconds_per_epoch": sum(h["seconds"] for h in metrics["history"]) / len(metrics["history"]),
                      "epochs_run": len(metrics["history"])})
    res = {"machine": machine_info(), "data": os.path.basename(data), "seq_len": 96, "pred_len": 96,
           "llm": os.path.basename(os.path.normpath(llm_id)), "suite": suite, "epochs": epochs,
           "train_stride": train_stride, "eval_stride": eval_stride, "precompute_backend": precompute_backend,
           "selection": "validation MSE only; test evaluated once on the selected checkpoint",
           "rows": table, "naive_test": naive}
    _write(res, out)


def _run_dir(work: str, kw: dict) -> str:
    """Where a row's checkpoint, metrics and bundle go."""
    return os.path.join(work, "-".join([kw["model_name"], *(str(v) for k, v in kw.items() if k != "model_name")]))


def _write(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))
    click.echo(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    if res.get("suite", "tiny") != "real":
        llm = (f"LLM: `{res['llm']}` (**random weights, offline**: the LLM rows measure the architecture, not "
               "GPT-2's knowledge).")
    else:
        llm = (f"LLM: `{res['llm']}`, **pretrained** (real weights), at several depths, and its architecture with "
               f"random weights; prompts embedded with `--precompute-backend {res['precompute_backend']}`.")
    windows = next((r["windows"] for r in res["rows"] if "windows" in r), None)
    counted = (f" Windows (train/val/test): {windows['train']}/{windows['val']}/{windows['test']}, the same for every "
               "row." if windows else "")
    lat = res["rows"][0]["batch1_ms"]
    evals = f"every {res['eval_stride']}th" if res.get("eval_stride", 1) > 1 else "every"
    backend = lat["backend"] + (f" ({', '.join(f'{g} {p}' for g, p in lat['precision'].items())})"
                                if "precision" in lat else "")
    lines = [f"# Ablation on {res['data']} (seq {res['seq_len']}, pred {res['pred_len']}), {m['date']}", "",
             f"> {BUDGET_LIMITED}", "",
             f"Machine: {m.get('cpu')}, {m['cores']} cores, ISA {', '.join(m.get('isa', []))}. {llm} "
             f"{res['epochs']} epochs max, every {res['train_stride']}th training window, "
             f"{evals} validation/test window; {res['selection']}.{counted} "
             "MSE/MAE in train-split standard-normalised units (the paper's). "
             f"Latency: {backend}, batch 1, end to end p50 (miss: the LLM runs; hit: embeddings from the store).", "",
             "| model | test MSE | test MAE | val MSE | params | s / epoch | batch-1 ms (miss) | batch-1 ms (hit) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lat = r["batch1_ms"]
        per_epoch = f"{r['seconds_per_epoch']:.1f}" if "seconds_per_epoch" in r else ""
        lines.append(f"| {r['row']} | {r['test_mse']:.4f} | {r['test_mae']:.4f} | {r['val_mse']:.4f} | "
                     f"{r['params']:,} | {per_epoch} | {lat['miss']:.2f} | {lat['hit']:.2f} |")
    for k, v in res["naive_test"].items():
        lines.append(f"| naive: {k.replace('_', '-')} | {v['mse']:.4f} | {v['mae']:.4f} | | 0 | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
