"""Joint text and time-series training (``timecma-train --joint lora|full``): the LLM learns with the forecaster.

What is shared and what is not: the decoder's transformer layers (and its token embeddings) serve both
tasks; each modality keeps its own input and output heads: text enters through the LLM's token
embedding and leaves through its LM head (next-token loss), a window enters through the forecaster's
own input projection (and, as text, through the prompt) and leaves through the forecaster's head. Each
step runs the LLM on the batch's prompts with gradients (no store: the embeddings change every step),
feeds the last token's state to the forecaster, and minimises ``w * forecast MSE + (1 - w) * next-token
loss``. After training, LoRA adapters are merged and the LLM is saved beside the checkpoint as a plain
model directory: its weights digest (so the store namespace) is new, and export and serving treat it as
any local LLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .core.errors import InputError
from .core.tokens import pad_right
from .llm import _gather_rows, keep_first_layers, quiet_progress

log = logging.getLogger(__name__)

# attention and MLP projections per family (peft's LoRA targets); GPT-2's are Conv1D (fan_in_fan_out)
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LORA_TARGETS["mistral"] = LORA_TARGETS["qwen2"] = LORA_TARGETS["llama"]
TEXT_PROMPTS = 16  # prompts (or corpus chunks) per step whose next-token loss is computed: bounds the LM head's cost


@dataclass
class Prompts:
    """A batch's prompts as padded token ids, moved to a device like a tensor."""

    ids: torch.Tensor  # [B * N, S]
    mask: torch.Tensor

    def to(self, device) -> "Prompts":
        return Prompts(self.ids.to(device), self.mask.to(device))

    @classmethod
    def pad(cls, token_ids: list[np.ndarray], pad_id: int) -> "Prompts":
        ids, mask = pad_right(token_ids, pad_id)
        return cls(torch.from_numpy(ids), torch.from_numpy(mask))


def load_causal_lm(llm_id: str, mode: str, init: str, layers: int | None, lora_rank: int = 8):
    """The decoder with its LM head, trainable as ``mode`` says; Xavier-initialised from its config with
    ``init="xavier"``. Returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_progress()
    config = AutoConfig.from_pretrained(llm_id)
    if not (getattr(config, "is_decoder", False) or config.model_type in LORA_TARGETS
            or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])):
        raise InputError(f"--joint trains a decoder LLM with its next-token head; {llm_id!r} is a "
                         f"{config.model_type} model without one (encoder-only?)")
    if mode == "lora" and config.model_type not in LORA_TARGETS:
        raise InputError(f"--joint lora knows the projections of {sorted(LORA_TARGETS)}, not {config.model_type}")
    if mode == "lora" and init == "xavier":
        raise InputError("--joint lora adapts pretrained weights; with --llm-init xavier use --joint full")
    tokenizer = AutoTokenizer.from_pretrained(llm_id, use_fast=True)
    if init == "xavier":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        xavier_(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(llm_id, dtype=torch.float32)
    keep_first_layers(model.base_model, layers)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                         target_modules=LORA_TARGETS[config.model_type], fan_in_fan_out=config.model_type == "gpt2")
        model = get_peft_model(model, cfg)  # only the adapters train
    else:
        model.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("joint training (%s, %s weights): %d trainable LLM parameters", mode, init, n)
    return model, tokenizer


def xavier_(model: nn.Module) -> None:
    """The founding design's initialisation: Xavier-uniform matrices (linear, Conv1D, embeddings), zero biases,
    norms at their defaults."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.xavier_uniform_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class JointModel(nn.Module):
    """The forecaster with its LLM in the loop: ``forward(x, prompts)`` embeds the prompts (last real token of
    the decoder's final hidden state, as the frozen encoder does) and forecasts; ``text_loss`` is the
    next-token loss of the same forward (or of ``text`` chunks) on at most ``TEXT_PROMPTS`` sequences."""

    def __init__(self, forecaster: nn.Module, lm: Any, n_vars: int):
        """``lm``: a Hugging Face causal LM, or peft's wrapper of one (their methods are looked up by name)."""
        super().__init__()
        self.forecaster, self.lm, self.n_vars = forecaster, lm, n_vars
        self._hidden: tuple[torch.Tensor, Prompts] | None = None

    def _causal_lm(self) -> Any:
        """The Hugging Face model (under peft's wrapper with LoRA): its decoder and its LM head."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def embed(self, p: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [P, S, d] (after the final norm) and the last real token's [P, d]."""
        pos = torch.arange(p.ids.shape[1], device=p.ids.device).unsqueeze(0).expand_as(p.ids)
        hidden = self._causal_lm().base_model(input_ids=p.ids, attention_mask=p.mask, position_ids=pos,
                                              use_cache=False).last_hidden_state
        return hidden, _gather_rows(hidden, p.mask.sum(dim=1) - 1)

    def forward(self, x: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        hidden, emb = self.embed(prompts)
        self._hidden = (hidden, prompts) if self.training else None
        return self.forecaster(x, emb.reshape(x.shape[0], self.n_vars, -1))

    def text_loss(self, text: Prompts | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over real tokens: of ``text`` (a corpus batch), else of the prompts of
        the last training forward (the same hidden states, no second pass)."""
        if text is not None:
            hidden, _ = self.embed(text)
            p = text
        elif self._hidden is None:
            raise RuntimeError("text_loss() without text follows a forward in training mode (its prompts)")
        else:
            hidden, p = self._hidden
        if len(p.ids) > TEXT_PROMPTS:  # the LM head over a 50k vocabulary is costly: a random subset
            pick = torch.randperm(len(p.ids))[:TEXT_PROMPTS].to(hidden.device)
            hidden, p = hidden[pick], Prompts(p.ids[pick], p.mask[pick])
        logits = self._causal_lm().get_output_embeddings()(hidden[:, :-1])
        target = p.ids[:, 1:].masked_fill(p.mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100)


class TextCorpus:
    """``--joint-text FILE``: one document per line, tokenised once, cut into chunks of the prompts' length;
    each step samples ``TEXT_PROMPTS`` chunks (the same number of tokens as the prompt text loss reads)."""

    def __init__(self, path: str, tokenizer, chunk: int, pad_id: int, seed: int):
        if not os.path.isfile(path):
            raise InputError(f"--joint-text {path} does not exist")
        with open(path, encoding="utf-8") as f:
            docs = [line.strip() for line in f if line.strip()]
        if not docs:
            raise InputError(f"--joint-text {path} holds no text (one document per line)")
        ids = np.concatenate([np.asarray(tokenizer(d)["input_ids"], np.int64) for d in docs])
        if len(ids) < chunk + 1:
            raise InputError(f"--joint-text {path} has {len(ids)} tokens; at least {chunk + 1} are needed")
        self.chunks = [ids[i:i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]
        self.pad_id, self.rng = pad_id, np.random.default_rng(seed)

    def sample(self) -> Prompts:
        pick = self.rng.choice(len(self.chunks), size=min(TEXT_PROMPTS, len(self.chunks)), replace=False)
        return Prompts.pad([self.chunks[i] for i in pick], self.pad_id)


JOINT_LLM_RECORD = "timecma-joint-llm.json"  # in every LLM folder joint training writes: how it was made
JOINT_LLM = f"an LLM saved by joint training (with its {JOINT_LLM_RECORD})"


def is_joint_llm(path: str) -> bool:
    """A folder ``merge_and_save`` wrote (its record says so): the only LLM folder a training run replaces."""
    from .core.files import has_record

    return has_record(path, JOINT_LLM_RECORD, "timecma-train --joint")


def merge_and_save(model: JointModel, tokenizer, out_dir: str, record: dict | None = None) -> str:
    """Merge LoRA adapters into the weights and save the LLM (``save_pretrained``), its tokenizer and
    ``JOINT_LLM_RECORD`` (``record``: how it was trained) into a temporary folder beside ``out_dir``, renamed
    into place whole (``replace_dir``): a kill leaves the previous folder or none, never half a model, and only
    a folder joint training wrote is replaced."""
    from .core.files import make_shareable, replace_dir
    from .core.leftovers import remove_dead_temporaries

    lm = model.lm.merge_and_unload() if hasattr(model.lm, "merge_and_unload") else model.lm
    lm.requires_grad_(False)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_dead_temporaries(parent, f".joint-llm-{name}-", "an unfinished joint-training LLM folder")
    tmp = tempfile.mkdtemp(prefix=f".joint-llm-{name}-{os.getpid()}-", dir=parent)
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, JOINT_LLM_RECORD), "w") as f:
            json.dump({"made_by": "timecma-train --joint", **(record or {})}, f, indent=2)
        make_shareable(tmp)
        replace_dir(tmp, out_dir, is_joint_llm, JOINT_LLM)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
