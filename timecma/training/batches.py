"""The data a training run iterates over: mini-batches of (window, target, prompt embeddings) from the scaled
series and the store, the evaluation pass, and the naive forecasts that every model is judged beside."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.scaling import Scaler
from ..core.seasonality import seasonal_naive_rows
from ..core.store import EmbeddingStore
from ..joint import Prompts
from ..precompute import PromptSet


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

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | Prompts | None]:
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
