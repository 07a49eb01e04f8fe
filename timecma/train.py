"""Training as in the paper: AdamW, cosine schedule, clipping at 5, validation each epoch,
early stopping; model selection on validation only, test evaluated once at the end."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .core.config import MODELS, DataContract, ModelConfig, TrainConfig
from .core.errors import InputError
from .core.conformal import METHOD, Calibration, coverage
from .core.scaling import Scaler
from .core.seasonality import NATURAL_PERIOD, detect_periods, primary_periods, seasonal_naive_rows
from .data import Series, load_series, make_windows, resolve_split, split_borders
from .llm import load_llm
from .model import make_model
from .encoders import GATE_PROMPTS, parse_choice, prompt_encoder
from .joint import JointModel, Prompts, TextCorpus, load_causal_lm, merge_and_save
from .precompute import PromptSet, build_prompt_set, precompute
from .core.prompts import PromptRenderer, get_template
from .core.ray_setup import RayPool
from .core.store import EmbeddingStore, precision_tag

log = logging.getLogger(__name__)
REPORTED_LEVELS = [80, 95]  # interval levels whose test coverage metrics.json reports


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class SplitData:
    """Scaled inputs/targets of one split plus its prompt keys in the store (None: no LLM)."""

    starts: np.ndarray
    prompts: PromptSet | None


class Batches:
    """Mini-batches of (x, y, prompt embeddings) read from the scaled series and the store."""

    def __init__(self, scaled: np.ndarray, split: SplitData, store: EmbeddingStore | None, seq_len: int,
                 pred_len: int, pad_id: int = 0):
        self.scaled = scaled.astype(np.float32)
        self.split = split
        self.store = store  # None with prompts: joint training, which embeds them every step
        self.seq_len, self.pred_len, self.pad_id = seq_len, pred_len, pad_id

    def __len__(self) -> int:
        return len(self.split.starts)

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        starts = self.split.starts[idx]
        rows = starts[:, None] + np.arange(self.seq_len + self.pred_len)[None, :]
        xy = self.scaled[rows]  # [B, L+P, N]
        if self.split.prompts is None:  # a model without the LLM branch
            return torch.from_numpy(xy[:, : self.seq_len]), torch.from_numpy(xy[:, self.seq_len :]), None
        n = self.split.prompts.n_vars
        if self.store is None:  # joint training: the prompts' token ids, embedded by the model in the loop
            ids = self.split.prompts.token_ids
            prompts = Prompts.pad([ids[int(i) * n + j] for i in idx for j in range(n)], self.pad_id)
            return torch.from_numpy(xy[:, : self.seq_len]), torch.from_numpy(xy[:, self.seq_len :]), prompts
        keys = [k for i in idx for k in self.split.prompts.window_keys(int(i))]
        emb, found = self.store.get_many(keys)
        if not found.all():
            raise RuntimeError(f"{(~found).sum()} prompt embeddings missing from the store")
        emb = emb.reshape(len(idx), n, -1)
        return (torch.from_numpy(xy[:, : self.seq_len]), torch.from_numpy(xy[:, self.seq_len :]),
                torch.from_numpy(emb))

    def iterate(self, batch_size: int, rng: np.random.Generator | None = None):
        order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
        for i in range(0, len(order), batch_size):
            yield self.get(order[i : i + batch_size])


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, batch_size: int, device: torch.device,
             to_report=None, reported: np.ndarray | None = None, keep: list | None = None) -> dict[str, float]:
    """MSE and MAE on the normalised scale (as the paper reports). With another scaler (log), the
    predictions are mapped by ``to_report`` and compared with ``reported`` (standard-normalised
    values of the same rows), so every scaler is judged in the same units. ``keep`` collects the
    model's outputs batch by batch (model units), for what else is judged on the same pass."""
    model.eval()
    se = ae = 0.0
    count = 0
    for k, (x, y, emb) in enumerate(batches.iterate(batch_size)):
        pred = model(x.to(device), None if emb is None else emb.to(device))
        if keep is not None:
            keep.append(pred.cpu().numpy())
        if to_report is not None and reported is not None:
            idx = np.arange(k * batch_size, min((k + 1) * batch_size, len(batches)))
            rows = batches.split.starts[idx][:, None] + batches.seq_len + np.arange(batches.pred_len)[None, :]
            pred = torch.from_numpy(to_report(pred.cpu().numpy().astype(np.float64)))
            y = torch.from_numpy(reported[rows])
        diff = pred - y.to(pred.device).to(pred.dtype)
        se += float((diff**2).sum())
        ae += float(diff.abs().sum())
        count += diff.numel()
    return {"mse": se / count, "mae": ae / count}


def in_original_units(batches: Batches, preds: list[np.ndarray], scaler: Scaler,
                      values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs [W, L, N], actuals and forecasts [W, H, N] of a split's windows, in original units, from the
    model outputs ``evaluate`` kept for that split."""
    starts = batches.split.starts
    rows = starts[:, None] + np.arange(batches.seq_len + batches.pred_len)[None, :]
    xy = values[rows]
    return xy[:, :batches.seq_len], xy[:, batches.seq_len:], scaler.inverse(np.concatenate(preds).astype(np.float64))


def naive_metrics(scaled: np.ndarray, starts: np.ndarray, seq_len: int, pred_len: int,
                  period: int | None = None) -> dict[str, dict[str, float]]:
    """Repeat-last-value, window-mean and (with ``period`` <= seq_len) seasonal-naive forecasts
    (the last period of the window repeated), for judging the model's numbers."""
    rows = starts[:, None] + np.arange(seq_len + pred_len)[None, :]
    xy = scaled[rows]
    x, y = xy[:, :seq_len], xy[:, seq_len:]
    out = {}
    preds = [("repeat_last", x[:, -1:, :]), ("window_mean", x.mean(axis=1, keepdims=True))]
    if period and period <= seq_len:
        preds.append(("seasonal_naive", x[:, seasonal_naive_rows(seq_len, pred_len, period), :]))
    for name, pred in preds:
        d = y - pred
        out[name] = {"mse": float((d**2).mean()), "mae": float(np.abs(d).mean())}
    return out


def train(
    data_path: str,
    out_dir: str,
    llm_id: str,
    model_cfg_overrides: dict,
    train_cfg: TrainConfig,
    *,
    time_col: str = "date",
    split: str = "auto",
    store_dir: str | None = None,
    template: str = "reference",
    model_name: str = "timecma",
    scaler_kind: str = "standard",
    residual: str = "none",
    store_dtype: str = "float32",
    ray: RayPool | None = None,
    llm_layers: int | None = None,
) -> dict:
    """Full training run; writes best.pt and metrics.json into ``out_dir``. Returns the metrics."""
    t0 = time.time()
    seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    series: Series = load_series(data_path, time_col)
    split = resolve_split(split, data_path)
    seq_len, pred_len = model_cfg_overrides["seq_len"], model_cfg_overrides["pred_len"]
    borders = split_borders(len(series.values), seq_len, split, series.frequency)
    windows = make_windows(borders, seq_len, pred_len, train_cfg.train_stride, train_cfg.eval_stride)
    b_train = borders["train"]
    scaler = Scaler.fit(series.values[b_train[0] : b_train[1]], series.variables, scaler_kind)
    scaled = scaler.transform(series.values)
    # metrics are reported in the paper's units (standard-normalised raw values), whatever the scaler
    report = Scaler.fit(series.values[b_train[0] : b_train[1]], series.variables)
    reported = report.transform(series.values)

    def to_report(y: np.ndarray) -> np.ndarray:
        return y if scaler.kind == "standard" else report.transform(scaler.inverse(y))

    tmpl = get_template(template)
    n_vars = len(series.variables)
    # seasonality from training rows only: in the checkpoint, the `lags` prompts and the residual
    periods = detect_periods(series.values[b_train[0] : b_train[1]], max_period=seq_len)
    prompt_periods = primary_periods(periods, n_vars, series.frequency, seq_len, fallback=False)
    residual_periods = (primary_periods(periods, n_vars, series.frequency, seq_len, fallback=True)
                        if residual != "none" else None)
    log.info("detected periods per variable (training rows): %s", dict(zip(series.variables, periods)))
    # what serving needs to render the same prompts: template, periods (`lags`), log scaler (`log-values`)
    prompt_record = {"name": tmpl.name, "hash": tmpl.hash,
                     **({"periods": prompt_periods} if tmpl.needs_periods else {})}
    if tmpl.value_transform == "log":
        z = Scaler.fit(series.values[b_train[0]:b_train[1]], series.variables, "log")
        prompt_record["log_scaler"] = {"offset": z.offset.tolist(), "mean": z.mean.tolist(), "std": z.std.tolist()}
    os.makedirs(out_dir, exist_ok=True)
    splits: dict[str, SplitData] = {}
    t_emb = time.time()
    store, llm_info, d_llm, pad_id, joint = None, None, 0, 0, train_cfg.joint != "none"
    if joint and not MODELS[model_name]:
        raise InputError(f"--joint trains the LLM with the forecaster; --model {model_name} has no LLM")
    if joint:  # no store: the embeddings change every step; the LLM trains with its LM head (timecma.joint)
        renderer = PromptRenderer.from_record(prompt_record, series.frequency)
        llm = load_llm(llm_id, device, layers=llm_layers)  # tokenizer, limits and identity of the starting point
        sets = {name: build_prompt_set(series, w, renderer, llm, None) for name, w in windows.items()}
        lm, lm_tokenizer = load_causal_lm(llm_id, train_cfg.joint, train_cfg.llm_init, llm_layers,
                                             train_cfg.lora_rank)
        corpus = (TextCorpus(train_cfg.joint_text, lm_tokenizer, max(len(t) for t in sets["train"].token_ids),
                             llm.info.pad_id, train_cfg.seed) if train_cfg.joint_text else None)
        splits = {name: SplitData(w.starts, sets[name]) for name, w in windows.items()}
        d_llm, pad_id, n_computed = llm.info.d_llm, llm.info.pad_id, 0
        del llm
    elif MODELS[model_name]:
        renderer = PromptRenderer.from_record(prompt_record, series.frequency)
        llm = load_llm(llm_id, device, layers=llm_layers)
        store_dir = store_dir or os.path.join(out_dir, "store")
        engine = parse_choice(train_cfg.precompute_backend)  # `auto` resolved once, here
        store = EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm, store_dtype, describe=f"LLM {llm_id}",
                               precision=precision_tag(*engine))
        sets = {name: build_prompt_set(series, w, renderer, llm, store) for name, w in windows.items()}
        all_ids = [t for ps in sets.values() for t in ps.token_ids]
        keys = [k for ps in sets.values() for k in ps.keys]
        encoder = None
        # the precision the store's vectors come from, in the checkpoint and bundle (vectors are keyed by it)
        llm.info.extra["precompute"] = {"backend": engine[0], "precision": store.precision}
        if engine != ("torch", "fp32") and store.missing(keys):  # eager fp32 is the gate's reference: no gate
            spread = np.linspace(0, len(all_ids) - 1, min(GATE_PROMPTS, len(all_ids))).round().astype(int)
            encoder = prompt_encoder(llm, train_cfg.precompute_backend, [all_ids[i] for i in spread])
            llm.info.extra["precompute"] = encoder.record
        # one pass over every split's prompts (one Ray job, its actors loading the LLM once)
        t_pre = time.time()
        n_computed = precompute(store, llm, all_ids, keys, train_cfg.llm_batch_size, device,
                                desc="prompt embeddings", prompts=[p for ps in sets.values() for p in ps.prompts],
                                ray=ray, encoder=encoder)
        if n_computed:
            sec = time.time() - t_pre
            log.info("precompute: %d prompts in %.1fs (%.2f prompts/s) on %s", n_computed, sec, n_computed / sec,
                     encoder.backend if encoder else "eager PyTorch")
        splits = {name: SplitData(w.starts, sets[name]) for name, w in windows.items()}
        log.info("embeddings ready: %d computed, store holds %d (%.1fs)", n_computed, len(store), time.time() - t_emb)
        llm_info, d_llm = llm.info.to_dict(), llm.info.d_llm
        del llm  # the LLM is not needed for training the forecaster
    else:
        n_computed = 0
        splits = {name: SplitData(w.starts, None) for name, w in windows.items()}
    emb_seconds = time.time() - t_emb

    cfg = ModelConfig(num_nodes=n_vars, d_llm=d_llm, model=model_name, residual=residual,
                      residual_periods=residual_periods, **model_cfg_overrides)
    seed_everything(train_cfg.seed)
    model = make_model(cfg).to(device)
    if joint:
        model = JointModel(model, lm, n_vars).to(device)
    w = train_cfg.joint_weight
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr,
                            weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=min(train_cfg.epochs, 20), eta_min=1e-8)
    batches = {k: Batches(scaled, v, store, seq_len, pred_len, pad_id) for k, v in splits.items()}
    rng = np.random.default_rng(train_cfg.seed) if train_cfg.shuffle else None

    contract = DataContract(
        time_col=time_col, variables=series.variables, frequency=series.frequency, seq_len=seq_len,
        pred_len=pred_len, split=split, source=os.path.abspath(data_path), periods=periods, **scaler.to_contract(),
        raw_std=report.std.tolist(),
    )
    best_val, best_state, best_epoch, since_best = float("inf"), None, 0, 0
    history = []
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        losses, fc_losses, text_losses = [], [], []
        t_ep = time.time()
        bar = tqdm(batches["train"].iterate(train_cfg.batch_size, rng),
                   total=-(-len(batches["train"]) // train_cfg.batch_size), desc=f"epoch {epoch}", leave=False,
                   mininterval=1.0, disable=None)  # a bar on a terminal; the per-epoch log line elsewhere
        for x, y, emb in bar:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x.to(device), None if emb is None else emb.to(device)),
                                                y.to(device))
            if joint:
                fc_losses.append(loss.item())
                if w < 1:
                    text = model.text_loss(corpus.sample().to(device) if corpus else None)
                    text_losses.append(text.item())
                    loss = w * loss + (1 - w) * text
                else:
                    loss = w * loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip)
            opt.step()
            losses.append(loss.item())
        sched.step()
        val = evaluate(model, batches["val"], train_cfg.batch_size, device, to_report, reported)
        history.append({"epoch": epoch, "train_mse": float(np.mean(losses)), "val_mse": val["mse"],
                        "val_mae": val["mae"], "seconds": time.time() - t_ep})
        if joint:  # both losses, the forecast's unweighted
            history[-1].update(train_forecast_mse=float(np.mean(fc_losses)),
                               train_text_loss=float(np.mean(text_losses)) if text_losses else None)
            log.info("epoch %d: forecast mse %.4f, next-token loss %s", epoch, np.mean(fc_losses),
                     f"{np.mean(text_losses):.4f}" if text_losses else "-")
        log.info("epoch %d: train mse %.4f, val mse %.4f mae %.4f (%.1fs)", epoch, np.mean(losses),
                 val["mse"], val["mae"], time.time() - t_ep)
        if val["mse"] < best_val:
            best_val, best_epoch, since_best = val["mse"], epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= train_cfg.patience:
                log.info("early stop: no validation improvement in %d epochs", since_best)
                break

    model.load_state_dict(best_state)
    out: dict[str, list] = {"val": [], "test": []}  # one pass per split: metrics, then intervals
    val = evaluate(model, batches["val"], train_cfg.batch_size, device, to_report, reported, out["val"])
    test = evaluate(model, batches["test"], train_cfg.batch_size, device, to_report, reported, out["test"])
    # prediction intervals: conformal scores on validation windows, coverage judged on test
    cal = Calibration.fit(*in_original_units(batches["val"], out["val"], scaler, series.values))
    intervals = {"method": METHOD, "calibration": f"{cal.windows} val windows",
                 "test": coverage(cal, *in_original_units(batches["test"], out["test"], scaler, series.values),
                                  REPORTED_LEVELS)}
    log.info("prediction intervals on test: %s", ", ".join(f"{lv}% covers {c['coverage']:.1%}"
                                                           for lv, c in intervals["test"].items()))
    state_dict = best_state
    if joint:  # the LLM leaves as a plain model directory (adapters merged); the checkpoint keeps the forecaster
        llm_dir = os.path.abspath(merge_and_save(model, lm_tokenizer, os.path.join(out_dir, "llm")))
        trained = load_llm(llm_dir, "cpu")
        trained.info.extra["joint"] = {"mode": train_cfg.joint, "init": train_cfg.llm_init, "weight": w,
                                       "text": os.path.basename(train_cfg.joint_text) if train_cfg.joint_text
                                       else "prompts", "from": llm_id}
        llm_info = trained.info.to_dict()
        log.info("joint training: the trained LLM is %s (weights %s; a new store namespace)", llm_dir,
                 trained.info.weights_digest[:12])
        state_dict = {k[len("forecaster."):]: v for k, v in best_state.items() if k.startswith("forecaster.")}
        del trained
    metrics = {
        "best_epoch": best_epoch,
        "val": val,
        "test": test,
        "naive": {name: naive_metrics(reported, splits[name].starts, seq_len, pred_len,
                                      NATURAL_PERIOD.get(series.frequency)) for name in ("val", "test")},
        "scale": "normalized (train-split StandardScaler), as in the paper",
        "intervals": intervals,
        "windows": {name: len(w.starts) for name, w in windows.items()},
        "eval_stride": train_cfg.eval_stride,
        "scaler": scaler.kind,
        "history": history,
        "embedding_seconds": emb_seconds,
        "embeddings_computed": n_computed,
        "wall_seconds": time.time() - t0,
    }
    save_checkpoint(
        os.path.join(out_dir, "best.pt"),
        {
            "state_dict": state_dict,
            "model_config": cfg.to_dict(),
            "train_config": train_cfg.to_dict(),
            "data": contract.to_dict(),
            "prompt": prompt_record if cfg.uses_llm else None,
            "llm": llm_info,
            "metrics": {k: v for k, v in metrics.items() if k != "history"},
            "calibration": cal.to_dict(),
        },
    )
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if store is not None:
        store.close()
    return metrics
