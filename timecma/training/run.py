"""``train``: one training run as its steps — data, prompts, model, loop, final evaluation, checkpoint. The
model is selected on validation only and the test split is evaluated once, on the selected weights."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..core.conformal import METHOD, Calibration, coverage
from ..core.config import ModelConfig, TrainConfig
from ..core.files import atomic_write_bytes, check_replaceable, portable_name
from ..core.ray_setup import RayPool
from ..core.seasonality import NATURAL_PERIOD
from ..joint import JOINT_LLM, JointModel, is_joint_llm, merge_and_save
from ..llm import load_llm
from ..model import ForecastModel, make_model
from .batches import Batches, evaluate, in_original_units, naive_metrics
from .embeddings import Embedded, embed_prompts
from .inputs import RunData, prepare_data
from .loop import LoopState, fit

log = logging.getLogger(__name__)
REPORTED_LEVELS = [80, 95]  # interval levels whose test coverage metrics.json reports


@dataclass
class RunSpec:
    """What a run trains on and with (everything but the optimisation settings, which are a TrainConfig)."""

    data_path: str
    out_dir: str
    llm_id: str = "gpt2"
    model: dict = field(default_factory=dict)  # ModelConfig fields: seq_len, pred_len, channel, ...
    model_name: str = "timecma"
    time_col: str = "date"
    split: str = "auto"
    store_dir: str | None = None
    template: str = "reference"
    scaler_kind: str = "standard"
    residual: str = "none"
    store_dtype: str = "float32"
    llm_layers: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(spec: RunSpec, cfg: TrainConfig, ray: RayPool | None = None) -> dict:
    """Full training run; writes best.pt and metrics.json into ``spec.out_dir``. Returns the metrics."""
    t0 = time.time()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    seq_len, pred_len = spec.model["seq_len"], spec.model["pred_len"]
    check_outputs(spec.out_dir, joint=cfg.joint != "none")
    data = prepare_data(spec.data_path, spec.time_col, spec.split, seq_len, pred_len, cfg.train_stride,
                        cfg.eval_stride, spec.scaler_kind, spec.template, spec.residual)
    log.info("detected periods per variable (training rows): %s",
             dict(zip(data.series.variables, data.contract.periods or [])))
    os.makedirs(spec.out_dir, exist_ok=True)
    emb = embed_prompts(data, spec.model_name, spec.llm_id, spec.llm_layers, cfg,
                        spec.store_dir or os.path.join(spec.out_dir, "store"), spec.store_dtype, device, ray)
    try:
        mcfg = ModelConfig(num_nodes=len(data.series.variables), d_llm=emb.d_llm, model=spec.model_name,
                           residual=spec.residual, residual_periods=data.residual_periods, **spec.model)
        seed_everything(cfg.seed)
        model: ForecastModel | JointModel = make_model(mcfg).to(device)
        if emb.joint:
            model = JointModel(model, emb.joint["lm"], len(data.series.variables)).to(device)
        batches = {k: Batches(data.scaled, v, emb.store, seq_len, pred_len, emb.pad_id) for k, v in emb.splits.items()}
        state = fit(model, batches, cfg, device, data.to_report, data.reported, emb.joint)
        model.load_state_dict(state.best())
        metrics, cal = final_evaluation(model, batches, cfg, device, data)
        state_dict, llm_info = _trained_parts(spec, cfg, emb, state, model)
    finally:
        emb.close()
    metrics.update(best_epoch=state.best_epoch, training=training_record(cfg, state, spec, llm_info), history=state.history,
                   naive={name: naive_metrics(data.reported, emb.splits[name].starts, seq_len, pred_len,
                                              NATURAL_PERIOD.get(data.series.frequency)) for name in ("val", "test")},
                   windows={name: len(w.starts) for name, w in data.windows.items()}, eval_stride=cfg.eval_stride,
                   scaler=data.scaler.kind, embedding_seconds=emb.seconds, embeddings_computed=emb.computed,
                   wall_seconds=time.time() - t0)
    save_outputs(spec.out_dir, metrics, {
        "state_dict": state_dict, "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
        "data": data.contract.to_dict(), "prompt": data.prompt_record if mcfg.uses_llm else None, "llm": llm_info,
        "calibration": cal.to_dict()})
    return metrics


def final_evaluation(model: torch.nn.Module, batches: dict[str, Batches], cfg: TrainConfig, device: torch.device,
                     data: RunData) -> tuple[dict, Calibration]:
    """Validation and test once on the selected weights (the only time the test split is read), and
    split-conformal intervals calibrated on validation, their coverage judged on test."""
    out: dict[str, list] = {"val": [], "test": []}  # one pass per split: metrics, then intervals
    val = evaluate(model, batches["val"], cfg.batch_size, device, data.to_report, data.reported, out["val"])
    test = evaluate(model, batches["test"], cfg.batch_size, device, data.to_report, data.reported, out["test"])
    values = data.series.values
    cal = Calibration.fit(*in_original_units(batches["val"], out["val"], data.scaler, values))
    intervals: dict[str, Any] = {"method": METHOD, "calibration": f"{cal.windows} val windows",
                 "test": coverage(cal, *in_original_units(batches["test"], out["test"], data.scaler, values),
                                  REPORTED_LEVELS)}
    log.info("prediction intervals on test: %s", ", ".join(f"{lv}% covers {c['coverage']:.1%}"
                                                           for lv, c in intervals["test"].items()))
    return {"val": val, "test": test, "scale": "normalized (train-split StandardScaler), as in the paper",
            "intervals": intervals}, cal


def _trained_parts(spec: RunSpec, cfg: TrainConfig, emb: Embedded, state: LoopState,
                   model: torch.nn.Module) -> tuple[dict, dict | None]:
    """The forecaster's weights and the LLM's record. Joint training leaves the LLM as a plain model directory
    (adapters merged) beside the checkpoint, recorded with the base LLM it started from."""
    if not emb.joint:
        return state.best(), emb.llm_info
    assert isinstance(model, JointModel), "joint training ran the forecaster with its LLM (JointModel)"
    made = {"mode": cfg.joint, "init": cfg.llm_init, "layers": spec.llm_layers, "weight": cfg.joint_weight,
            "text": os.path.basename(cfg.joint_text) if cfg.joint_text else "prompts", "from": portable_name(spec.llm_id),
            # Xavier-initialised weights never were the base LLM's: only its config was
            "from_weights_digest": emb.joint["base_digest"] if cfg.llm_init == "pretrained" else None}
    llm_dir = merge_and_save(model, emb.joint["tokenizer"], os.path.join(spec.out_dir, "llm"), made)
    trained = load_llm(llm_dir, "cpu")
    trained.info.extra["joint"] = made
    log.info("joint training: the trained LLM is %s (weights %s; a new store namespace)", llm_dir,
             trained.info.weights_digest[:12])
    best = state.best_state or {}
    return {k[len("forecaster."):]: v for k, v in best.items() if k.startswith("forecaster.")}, trained.info.to_dict()


def training_record(cfg: TrainConfig, state: LoopState, spec: RunSpec, llm_info: dict | None) -> dict:
    """How the model was trained, for metrics.json, the checkpoint and the bundle's manifest: the recipe and
    what overrode it, how training ended, how the LLM was made, and whether the figures are budget-limited."""
    limits = [f"ended at the epoch cap ({cfg.epochs})"] if state.stop == "epoch_cap" else []
    limits += [f"ended by a non-finite loss at epoch {len(state.history)}"] if state.stop == "diverged" else []
    limits += [f"every {cfg.train_stride}th training window"] if cfg.train_stride > 1 else []
    limits += [f"every {cfg.eval_stride}th validation/test window"] if cfg.eval_stride > 1 else []
    if llm_info is None:
        llm = None
    elif "joint" in llm_info.get("extra", {}):
        joint = llm_info["extra"]["joint"]
        llm = {"made": f"joint-{joint['mode']}", "from": portable_name(joint["from"]), "init": joint.get("init"),
               "layers": joint.get("layers"), "from_weights_digest": joint["from_weights_digest"],
               "weights_digest": llm_info["weights_digest"]}
    else:
        llm = {"made": "frozen", "id": portable_name(llm_info["id"]), "weights_digest": llm_info["weights_digest"],
               "layers": spec.llm_layers}
    return {"recipe": cfg.recipe, "overrides": cfg.overrides,
            "settings": {k: getattr(cfg, k) for k in ("optimizer", "lr", "schedule", "cosine_period",
                                                      "weight_decay", "clip", "batch_size", "epochs", "patience",
                                                      "shuffle", "seed", "train_stride")},
            **state.record(), "budget_limited": bool(limits), "limits": limits, "llm": llm,
            "selection": "validation MSE only; test evaluated once on the selected weights"}


def check_outputs(out_dir: str, joint: bool) -> None:
    """Before any work: what this run will write into ``out_dir`` may replace only what an earlier run wrote
    (a timecma checkpoint, a timecma-train metrics.json, a merged LLM with its config): nothing of the user's."""
    def ours_ckpt(path: str) -> bool:
        try:
            return bool(load_checkpoint(path))
        except Exception:  # anything that does not load as our checkpoint is not ours
            return False

    def ours_metrics(path: str) -> bool:
        try:
            with open(path) as f:
                return {"val", "test", "history", "naive"} <= set(json.load(f))
        except (OSError, ValueError):
            return False

    check_replaceable(os.path.join(out_dir, "best.pt"), ours_ckpt, "a timecma checkpoint")
    check_replaceable(os.path.join(out_dir, "metrics.json"), ours_metrics, "a timecma-train metrics.json")
    if joint:
        check_replaceable(os.path.join(out_dir, "llm"), is_joint_llm, JOINT_LLM)


def save_outputs(out_dir: str, metrics: dict, ckpt: dict) -> None:
    """best.pt and metrics.json, each written whole or not at all."""
    save_checkpoint(os.path.join(out_dir, "best.pt"),
                    {**ckpt, "metrics": {k: v for k, v in metrics.items() if k != "history"}})
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2).encode())
