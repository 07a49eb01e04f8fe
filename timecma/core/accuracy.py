"""How far a lower-precision variant moves what the LLM stage hands on: the one measure every gate
uses for embeddings (export's fp16 and int8 checks, the OpenVINO gate).

A prompt's embedding error is the relative L2 distance of its last hidden state from the fp32
one; the worst prompt decides. Forecast changes alone cannot judge the LLM stage: a forecaster
whose own error is large (one with random weights above all) hides any embedding damage.

``judge_variant`` is the one decision every lower-precision gate takes from these figures and the
forecast's (TensorRT engines, OpenVINO variants, export's ONNX Runtime int8 / w8a8 LLM graphs).
"""

from __future__ import annotations

import numpy as np

EMBEDDING_GATE = 0.05  # worst prompt's relative L2 error of the last hidden state a variant may have
# largest change of any forecast value (normalised units) a lower-precision variant may make; eager bf16 moves a
# SmolLM2 bundle's forecast by 5e-3, OpenVINO's bf16 forecaster (the d_llm-wide prompt encoder) by 3e-2 to 4e-2
FORECAST_GATE = 0.01


def embedding_errors(emb: np.ndarray, ref: np.ndarray) -> dict:
    """Per-prompt relative L2 errors of ``emb`` [P, d] against ``ref``: the worst and the median."""
    emb = emb.reshape(-1, emb.shape[-1]).astype(np.float64)
    ref = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    rel = np.linalg.norm(emb - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    return {"prompt_rel_l2_max": float(rel.max()), "prompt_rel_l2_median": float(np.median(rel)),
            "prompts": int(len(rel))}


MSE_GATE = 0.01  # largest relative change of the validation forecast MSE (the paper's normalised units) accepted


def judge_variant(y: np.ndarray, y_ref: np.ndarray, truth: np.ndarray, mean: np.ndarray, std: np.ndarray,
                  emb: np.ndarray | None = None, emb_ref: np.ndarray | None = None, *, mse_gate: float = MSE_GATE,
                  forecast_gate: float | None = FORECAST_GATE) -> dict:
    """Accept or refuse a lower-precision variant's outputs against fp32's, with the figures: the one decision
    every gate takes (TensorRT engines, OpenVINO variants, export's ONNX Runtime int8 / w8a8 LLM graphs).

    ``y``, ``y_ref``: forecasts [W, pred_len, N] in raw units, of the candidate (an LLM variant: the fp32
    forecaster on its embeddings) and of fp32; ``truth`` [W, pred_len, N] in the paper's normalised units;
    ``mean``/``std`` [N] the normalisation; ``emb``/``emb_ref`` the LLM's embeddings ([..., d], one row per
    prompt) where the variant is the LLM stage.

    Accepted when every output of the candidate is finite, the validation MSE changes by less than
    ``mse_gate`` (relative), no forecast value moves by ``forecast_gate`` (normalised units) or more, and
    (LLM) the worst prompt's embedding moves less than ``EMBEDDING_GATE`` (relative L2). ``forecast_gate``
    None: the largest change is recorded but not judged. Returns ``accepted``, ``finite``, ``val_mse``, ``val_mse_fp32``, ``mse_rel_change``,
    ``mse_gate``, ``forecast_max_abs_change_normalized``, ``forecast_gate`` and, with embeddings,
    ``embedding`` (``embedding_errors``' figures and the gate). A non-finite candidate's figures are inf."""
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    truth = np.asarray(truth, np.float64)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    emb_finite = emb is None or bool(np.isfinite(emb).all())
    finite = bool(np.isfinite(y).all()) and emb_finite
    mse_ref = float(np.mean(((y_ref - mean) / std - truth) ** 2))
    if np.isfinite(y).all():
        moved = float(np.max(np.abs((y - y_ref) / std)))
        mse = float(np.mean(((y - mean) / std - truth) ** 2))
        change = abs(mse - mse_ref) / max(mse_ref, 1e-12)
    else:
        moved = mse = change = float("inf")
    out: dict = {"val_mse": mse, "val_mse_fp32": mse_ref, "mse_rel_change": change, "mse_gate": mse_gate,
                 "forecast_max_abs_change_normalized": moved, "forecast_gate": forecast_gate, "finite": finite}
    emb_ok = True
    if emb is not None:
        if emb_ref is None:
            raise ValueError("judge_variant: embeddings need the reference embeddings (emb_ref)")
        err = embedding_errors(emb, emb_ref) if emb_finite else {
            "prompt_rel_l2_max": float("inf"), "prompt_rel_l2_median": float("inf"),
            "prompts": int(np.asarray(emb).reshape(-1, np.shape(emb)[-1]).shape[0])}
        out["embedding"] = {**err, "gate": EMBEDDING_GATE}
        emb_ok = err["prompt_rel_l2_max"] < EMBEDDING_GATE
    # comparisons with a NaN figure (a non-finite reference) are False: refused too
    out["accepted"] = bool(finite and emb_ok and change < mse_gate
                           and (forecast_gate is None or moved < forecast_gate))
    return out
