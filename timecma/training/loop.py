"""The training loop: the recipe's optimizer and schedule, one epoch, validation each epoch, early stopping.
Its whole state lives in one ``LoopState``, which is also what metrics.json reports about how training ended."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.config import TrainConfig
from ..core.errors import InputError
from ..core.recipes import ETA_MIN, cosine_t_max
from ..joint import JointModel
from .batches import Batches, evaluate

log = logging.getLogger(__name__)

# how a run ended: early stopping (the only ending whose figures count as converged), the epoch cap, or a loss
# that stopped being finite (the best epoch before it is kept)
STOPS = ("early_stop", "epoch_cap", "diverged")


class TrainingDiverged(InputError):
    """No epoch produced a finite validation loss: there is no model to keep."""


@dataclass
class LoopState:
    """Where the loop is: the best validation epoch so far (and its weights), patience used, steps taken."""

    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    since_best: int = 0
    steps: int = 0
    stop: str = "epoch_cap"
    history: list[dict] = field(default_factory=list)

    def best(self) -> dict:
        """The best epoch's weights (``fit`` has raised TrainingDiverged where no epoch gave any)."""
        if self.best_state is None:
            raise TrainingDiverged("training kept no weights: no epoch had a finite validation loss")
        return self.best_state

    def record(self) -> dict:
        """How training ended, for metrics.json and the checkpoint."""
        return {"stop": self.stop, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                "optimizer_steps": self.steps}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """The recipe's optimizer and per-epoch schedule over the trainable parameters (``TrainConfig`` has refused
    any other optimizer or schedule name)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    opt: torch.optim.Optimizer = kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cosine_t_max(cfg.epochs, cfg.cosine_period),
                                                   eta_min=ETA_MIN)
        if cfg.schedule == "cosine" else torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    return opt, sched


def train_epoch(model: torch.nn.Module, batches: Batches, cfg: TrainConfig, opt: torch.optim.Optimizer,
                rng: np.random.Generator | None, device: torch.device, epoch: int, joint: dict) -> dict:
    """One pass over the training windows; returns the epoch's mean losses and its step count."""
    model.train()
    losses, fc_losses, text_losses = [], [], []
    w, corpus = cfg.joint_weight, joint.get("corpus")
    bar = tqdm(batches.iterate(cfg.batch_size, rng), total=-(-len(batches) // cfg.batch_size),
               desc=f"epoch {epoch}", leave=False, mininterval=1.0, disable=None)  # a bar on a terminal only
    for x, y, emb in bar:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x.to(device), None if emb is None else emb.to(device)),
                                            y.to(device))
        if joint:
            fc_losses.append(loss.item())
            if w < 1:
                assert isinstance(model, JointModel), "joint training runs the forecaster with its LLM (JointModel)"
                text = model.text_loss(corpus.sample().to(device) if corpus else None)
                text_losses.append(text.item())
                loss = w * loss + (1 - w) * text
            else:
                loss = w * loss
        loss.backward()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        losses.append(loss.item())
    out: dict[str, Any] = {"train_mse": float(np.mean(losses)), "steps": len(losses)}
    if joint:  # both losses, the forecast's unweighted
        out.update(train_forecast_mse=float(np.mean(fc_losses)),
                   train_text_loss=float(np.mean(text_losses)) if text_losses else None)
    return out


def fit(model: torch.nn.Module, batches: dict[str, Batches], cfg: TrainConfig, device: torch.device,
        to_report, reported: np.ndarray, joint: dict) -> LoopState:
    """Epochs until early stopping, the cap, or a non-finite loss; the best validation epoch's weights kept."""
    opt, sched = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed) if cfg.shuffle else None
    state = LoopState()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]  # the rate this epoch trains at
        ep = train_epoch(model, batches["train"], cfg, opt, rng, device, epoch, joint)
        state.steps += ep.pop("steps")
        sched.step()
        val = evaluate(model, batches["val"], cfg.batch_size, device, to_report, reported)
        state.history.append({"epoch": epoch, **ep, "val_mse": val["mse"], "val_mae": val["mae"],
                              "lr": lr, "seconds": time.time() - t0})
        log.info("epoch %d: train mse %.4f, val mse %.4f mae %.4f (%.1fs)", epoch, ep["train_mse"], val["mse"],
                 val["mae"], time.time() - t0)
        if not (math.isfinite(ep["train_mse"]) and math.isfinite(val["mse"])):
            state.stop = "diverged"
            log.error("epoch %d: the loss is not finite (train %s, val %s); stopping", epoch, ep["train_mse"],
                      val["mse"])
            break
        if _improved(state, val["mse"], epoch, model):
            continue
        if state.since_best >= cfg.patience:
            state.stop = "early_stop"
            log.info("early stop: no validation improvement in %d epochs", state.since_best)
            break
    _check_ending(state, cfg)
    return state


def _improved(state: LoopState, val_mse: float, epoch: int, model: torch.nn.Module) -> bool:
    if val_mse < state.best_val:
        state.best_val, state.best_epoch, state.since_best = val_mse, epoch, 0
        state.best_state = snapshot(model)
        return True
    state.since_best += 1
    return False


def snapshot(model: torch.nn.Module) -> dict:
    """The weights to come back to: a copy of every trainable parameter and buffer, and the frozen parameters
    (a jointly trained LLM's base under LoRA, hundreds of MB) by reference, since training never changes them."""
    return {k: v.detach() if isinstance(v, torch.nn.Parameter) and not v.requires_grad else v.detach().cpu().clone()
            for k, v in model.state_dict(keep_vars=True).items()}


def _check_ending(state: LoopState, cfg: TrainConfig) -> None:
    """No model at all is an error; ending at the cap is a warning: the model may still have been improving."""
    if state.best_state is None:
        raise TrainingDiverged(
            f"training produced no finite validation loss in {len(state.history)} epoch(s) (lr {cfg.lr:g}): "
            "nothing to keep. Lower --lr, or check the data for extreme values")
    if state.stop == "epoch_cap":
        log.warning("training ended at the epoch cap (%d epochs, best epoch %d) without early stopping: the model "
                    "may be undertrained; raise --epochs for figures you can trust", cfg.epochs, state.best_epoch)
