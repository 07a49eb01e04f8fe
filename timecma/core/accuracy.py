"""How far a lower-precision variant moves what the LLM stage hands on: the one measure every gate
uses for embeddings (export's fp16 and int8 checks, the OpenVINO gate).

A prompt's embedding error is the relative L2 distance of its last hidden state from the fp32
one; the worst prompt decides. Forecast changes alone cannot judge the LLM stage: a forecaster
whose own error is large (one with random weights above all) hides any embedding damage.
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
