"""Tokenization and right padding shared by training and serving (torch-free).

Both sides use the Hugging Face ``tokenizers`` backend of the LLM's fast tokenizer,
so token ids (and hence store keys) are identical in training and serving.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer
from .errors import InputError


class PromptTooLongError(InputError):
    """A prompt has more tokens than the LLM has positions (never truncated silently)."""


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """Digest of the tokenizer definition (vocab, merges, normalizer, post-processor)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each prompt as int64 arrays, special tokens as the model expects."""
    # The GPT-2 tokenizer adds no special tokens; others (e.g. Llama's BOS) do, as in
    # the reference's ``tokenizer.encode``.
    encodings = tokenizer.encode_batch(list(prompts), add_special_tokens=True)
    out = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    for i, ids in enumerate(out):
        if ids.size == 0:
            raise ValueError(f"prompt {i} encodes to zero tokens: {prompts[i]!r}")
    return out


def check_lengths(token_ids: Sequence[np.ndarray], max_positions: int, describe,
                  limit: str = "the LLM accepts at most {n} positions") -> None:
    """Raise naming the first prompt longer than ``max_positions`` (or empty: no last token).

    ``describe(i)`` returns a human description of prompt i (window and variable); ``limit``
    says where the bound comes from (the LLM's positions, or an engine's profile).
    """
    for i, ids in enumerate(token_ids):
        if len(ids) > max_positions:
            raise PromptTooLongError(
                f"prompt for {describe(i)} has {len(ids)} tokens but {limit.format(n=max_positions)}; "
                "use a shorter --seq-len or another template"
            )
        if len(ids) == 0:  # TensorRT's out-of-range Gather returns zeros instead of failing
            raise PromptTooLongError(f"prompt for {describe(i)} has no tokens")


def pad_right(
    token_ids: Sequence[np.ndarray], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a batch: (input_ids [B,S] int64, attention_mask [B,S] int64)."""
    longest = max(len(t) for t in token_ids)
    width = longest if length is None else length
    if width < longest:
        raise ValueError(f"pad length {width} is shorter than the longest prompt ({longest})")
    ids = np.full((len(token_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_ids), width), dtype=np.int64)
    for i, t in enumerate(token_ids):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return ids, mask


def llm_feeds(token_ids: Sequence[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The LLM graph's inputs for some prompts: right-padded ids and their attention mask."""
    ids, mask = pad_right(token_ids, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def plan_llm_batches(lengths: Sequence[int], max_batch: int, call_cost_tokens: int = 32,
                     max_tokens: int | None = None) -> list[np.ndarray]:
    """Split prompts into right-padded LLM calls that waste the least compute on padding.

    A call over prompts of lengths l costs ``len(l) * max(l)`` padded tokens plus a fixed
    ``call_cost_tokens`` (launch overhead in token equivalents). Prompts sorted by length
    are cut into contiguous groups of at most ``max_batch`` by dynamic programming, which
    is optimal for this cost: one long outlier gets its own call instead of padding the
    other prompts to its length. ``max_tokens`` caps a call's padded tokens (a token budget, as
    embedding servers batch; a prompt longer than it goes alone). Returns index arrays into ``lengths``.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(np.asarray(lengths), kind="stable")
    sl = np.asarray(lengths, dtype=np.int64)[order]
    best = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # best[j]: cheapest plan for the j shortest prompts
        i = np.arange(max(0, j - max_batch), j)
        if max_tokens is not None:  # calls within the budget; the last prompt alone always fits
            i = i[((j - i) * sl[j - 1] <= max_tokens) | (i == j - 1)]
        cost = best[i] + (j - i) * sl[j - 1] + call_cost_tokens
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = int(cut[j])
    return groups[::-1]
