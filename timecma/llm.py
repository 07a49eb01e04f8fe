"""Frozen LLM as a batched last-token encoder (docs/design.md §4).

Prompts are right-padded with an attention mask and plain position ids; the gather of the
last real position happens inside the module, so only [B, d_llm] leaves it (the same
module is what gets exported to ONNX).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .core.config import LLMInfo
from .core.errors import InputError
from .core.store import make_namespace
from .core.tokens import tokenizer_digest

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Bump when the wrapper's computation changes: it is part of the store namespace.
WRAPPER_VERSION = "last-token-v1"
GGUF_RECORD = "timecma-gguf.json"  # beside a model imported from GGUF (llm_import.py): the file it came from


class LastTokenEncoder(nn.Module):
    """Wraps a decoder LM; returns the final hidden state at the last non-padding token.

    With ``last_position_only`` (GPT-2 architecture) the last block runs its query, attention
    output and MLP for the last real position alone: earlier positions still give keys and
    values, but their outputs are never read, so about 10/12 of that block's matmul FLOPs
    (and its full attention matrix) are skipped. The result is the same function; the
    unmodified Hugging Face forward is what ``last_position_only=False`` runs.
    """

    _trunk: nn.Module  # with ``last_position_only``: the first L-1 blocks, not a registered submodule

    def __init__(self, model: Any, last_position_only: bool = False):
        """``model``: a Hugging Face base model; its parts (``h``, ``ln_f``, ``config``) are looked up by name."""
        super().__init__()
        self.model = model
        self.last_position_only = bool(last_position_only) and supports_last_position_only(model)
        if self.last_position_only:
            # The first L-1 blocks through Hugging Face's own forward (masks, positions), on a
            # shallow copy that shares every parameter; kept out of _modules so the weights
            # are not registered (or exported) twice.
            trunk = copy.copy(model)
            trunk._modules = dict(model._modules)
            trunk.h = nn.ModuleList(list(model.h)[:-1])
            trunk.ln_f = nn.Identity()
            object.__setattr__(self, "_trunk", trunk)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        # Right padding: positions are a plain range (GPT-2 does not derive them from the mask).
        position_ids = torch.arange(seq, device=input_ids.device, dtype=torch.long).unsqueeze(0).expand_as(input_ids)
        last = attention_mask.sum(dim=1) - 1  # [B]
        if self.last_position_only:
            hidden = self._trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
            return self._last_block(hidden, last)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return _gather_rows(hidden, last)

    def _last_block(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """GPT-2's last block and final LayerNorm, evaluated at position ``last`` of each row."""
        block = self.model.h[-1]
        attn = block.attn
        b, s, d = hidden.shape
        heads = attn.num_heads
        x = block.ln_1(hidden)  # every position: keys and values
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ w + bias, w [d, 3d] = q | k | v
        kv = torch.matmul(x, w[:, d:]) + bias[d:]
        k, v = kv.split(d, dim=-1)
        q = torch.matmul(_gather_rows(x, last), w[:, :d]) + bias[:d]  # [B, d]
        q = q.view(b, heads, 1, d // heads)
        k = k.view(b, s, heads, d // heads).transpose(1, 2)
        v = v.view(b, s, heads, d // heads).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * _attention_scale(attn)  # [B, H, 1, S]
        # causal + right padding: the last real position sees exactly positions 0..last
        beyond = torch.arange(s, device=hidden.device).view(1, 1, 1, s) > last.view(b, 1, 1, 1)
        scores = scores.masked_fill(beyond, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(b, d)
        h = _gather_rows(hidden, last) + attn.c_proj(out)
        h = h + block.mlp(block.ln_2(h))
        return self.model.ln_f(h)


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, d], index [B] -> hidden[b, index[b]] as [B, d] (a Gather in the graph)."""
    idx = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return torch.gather(hidden, 1, idx).squeeze(1)


def _attention_scale(attn: Any) -> float:
    if hasattr(attn, "scaling"):
        return float(attn.scaling)
    scale = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
    return scale / (attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale


def supports_last_position_only(model: Any) -> bool:
    """The last-block shortcut is written for Hugging Face's GPT-2 (Conv1D q|k|v, pre-LN blocks)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(model, "h") and hasattr(model, "ln_f")
            and len(model.h) >= 1 and not getattr(cfg, "add_cross_attention", False))


@dataclass
class LoadedLLM:
    """The wrapper, its fast tokenizer backend and its identity."""

    encoder: LastTokenEncoder
    tokenizer: PreTrainedTokenizerFast
    info: LLMInfo

    @property
    def backend(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` used for encoding (same object serving loads)."""
        return self.tokenizer.backend_tokenizer


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def quiet_progress() -> None:
    """Hugging Face's per-model "Loading weights" / "Writing shards" bars are for terminals, not logs."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_llm(name_or_dir: str, device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
             last_position_only: bool = True, layers: int | None = None) -> LoadedLLM:
    """Load a Hugging Face model (hub id or local directory) as a frozen last-token encoder.

    ``last_position_only=False`` keeps the plain Hugging Face forward (the eager baseline
    benchmarks compare against); both compute the same embeddings. ``layers=K`` keeps the first
    K decoder layers and the final norm (None: all of them).
    """
    from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

    quiet_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
        model = AutoModel.from_pretrained(
            name_or_dir, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except OSError as exc:
        raise OSError(
            f"cannot load LLM {name_or_dir!r}: {exc}\n(no network? pass a local directory made "
            "with save_pretrained, or `timecma-tiny-llm DIR` for the offline test model)"
        ) from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):  # tokenizer.json's backend, which serving loads
        raise ValueError(f"LLM {name_or_dir!r} has no fast tokenizer; timecma needs tokenizer.json")
    model.eval().requires_grad_(False)
    total = keep_first_layers(model, layers)
    cfg = model.config
    max_positions = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))
    d_llm = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    w = weights_digest(model)
    t = tokenizer_digest(tokenizer.backend_tokenizer)
    used = layers or total
    # all layers: the wrapper as it always was (stores made before the knob stay valid)
    wrapper = WRAPPER_VERSION if used == total else f"{WRAPPER_VERSION}|layers={used}/{total}"
    extra = {"model_type": cfg.model_type, "tokenizer": _special_tokens(tokenizer), "layers": used,
             "model_layers": total}
    gguf = read_gguf_record(name_or_dir) if os.path.isdir(name_or_dir) else None
    if gguf:
        extra["gguf"] = gguf
    info = LLMInfo(
        id=str(name_or_dir),
        weights_digest=w,
        tokenizer_digest=t,
        wrapper_version=wrapper,
        namespace=make_namespace(w, t, wrapper),
        d_llm=d_llm,
        max_positions=max_positions,
        pad_id=int(pad_id),
        extra=extra,
    )
    encoder = LastTokenEncoder(model, last_position_only).to(device)
    log.info("loaded LLM %s (d=%d, %s of %s layers, %d positions, weights %s)", name_or_dir, d_llm, used, total,
             max_positions, w[:12])
    return LoadedLLM(encoder, tokenizer, info)


# where each family keeps its decoder layers, and the config key that counts them
_LAYER_LISTS = (("h", "n_layer"), ("layers", "num_hidden_layers"))


def keep_first_layers(model: Any, k: int | None) -> int | None:
    """Cut a decoder to its first ``k`` layers (its final norm stays); returns the model's own depth.

    The prompt embedding is then the last token's state after layer k and the final norm, as
    OFA/GPT4TS use the first 6 of GPT-2's 12 layers: serving cost falls about as k / depth.
    ``k=None`` changes nothing and works for every model the loader takes (an encoder such as BERT
    keeps its layers elsewhere): the depth is then read from the config, None where it has none."""
    for attr, count_key in _LAYER_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList):
            break
    else:
        if k is None:
            cfg = getattr(model, "config", None)
            depth = next((getattr(cfg, key) for _, key in _LAYER_LISTS if isinstance(getattr(cfg, key, None), int)),
                         None)
            return depth
        raise InputError(f"cannot find the decoder layers of a {type(model).__name__}: --llm-layers supports "
                         "GPT-2 and the Llama, Mistral and Qwen2 families")
    total = len(blocks)
    if k is None or k == total:
        return total
    if not 1 <= k <= total:
        raise InputError(f"--llm-layers {k} is out of range: this {model.config.model_type} model has {total} "
                         f"decoder layers (choose 1..{total})")
    setattr(model, attr, nn.ModuleList(list(blocks)[:k]))
    setattr(model.config, count_key, k)
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer attention kinds (sliding, full)
        model.config.layer_types = model.config.layer_types[:k]
    return total


def release_weights(llm: LoadedLLM) -> None:
    """Free the LLM's weights (moved to the meta device), keeping its config and identity (``info``): export's
    later steps work on the ONNX graph alone, and 0.5 GB (SmolLM2) to GBs of fp32 weights need not stay resident."""
    import gc

    llm.encoder.to("meta")
    gc.collect()


def recorded_layers(record: dict | None) -> int | None:
    """The decoder depth an LLM record (``LLMInfo.to_dict()``, as in checkpoints and manifests) embedded with."""
    return ((record or {}).get("extra") or {}).get("layers")


def read_gguf_record(model_dir: str) -> dict | None:
    """The GGUF file a directory was imported from (name, sha256, quantisation); None for other models."""
    path = os.path.join(model_dir, GGUF_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _special_tokens(tokenizer) -> dict:
    """How the tokenizer frames a prompt (BOS prepended, EOS appended), recorded with the LLM: the
    bundle's tokenizer.json carries the same post-processor, so serving frames prompts identically."""
    probe = tokenizer.backend_tokenizer.encode("1").ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "adds_bos": bool(probe and bos is not None and probe[0] == bos and len(probe) > 1),
            "adds_eos": bool(probe and eos is not None and probe[-1] == eos and len(probe) > 1)}


@torch.inference_mode()
def encode_last_token(
    llm: LoadedLLM, token_ids: list[np.ndarray], device: str | torch.device = "cpu"
) -> np.ndarray:
    """Run one right-padded batch and return [B, d_llm] float32."""
    from .core.tokens import pad_right

    ids, mask = pad_right(token_ids, llm.info.pad_id)
    out = llm.encoder(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
    return out.float().cpu().numpy()


# --- offline small preset -------------------------------------------------------------

TINY_CONFIG = dict(n_positions=1024, n_embd=32, n_layer=2, n_head=4)
# GPT-2 small's architecture (124M): random weights cost exactly what the real ones do.
PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY_CONFIG, "gpt2-size": dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12)}


def _tiny_corpus(seed: int) -> list[str]:
    """Text resembling the prompts, for training a small byte-level BPE deterministically."""
    rng = np.random.default_rng(seed)
    words = "From to , the values were every hour 15 minutes 10 minutes day week month . The total trend value was"
    lines = []
    for _ in range(500):
        vals = ", ".join(str(int(v)) for v in rng.normal(0, 30, size=24))
        d, m, y, h = rng.integers(1, 29), rng.integers(1, 13), rng.integers(2000, 2030), rng.integers(0, 24)
        lines.append(f"From {d:02d}/{m:02d}/{y} {h:02d}:00 to {d:02d}/{m:02d}/{y} {h:02d}:00, the values were {vals} "
                     f"every hour. The total trend value was {rng.normal(0, 10):0f}")
    lines.append(words)
    return lines


ARCHES = ("gpt2", "llama", "mistral", "qwen2")


def _tiny_decoder(arch: str, vocab: int, n_positions: int, preset: str, special: dict):
    """A small random-weight model of ``arch`` (RoPE + GQA for the Llama family)."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(vocab_size=vocab, bos_token_id=special["bos"], eos_token_id=special["eos"],
                                          **{**PRESETS[preset], "n_positions": n_positions}))
    size = PRESETS[preset]
    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=size["n_embd"], intermediate_size=4 * size["n_embd"],
                  num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
                  num_key_value_heads=max(1, size["n_head"] // 2), max_position_embeddings=n_positions,
                  bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"])
    if arch == "llama":
        return tf.LlamaModel(tf.LlamaConfig(**common))
    if arch == "mistral":  # a sliding window shorter than the prompts, so it really applies
        return tf.MistralModel(tf.MistralConfig(**common, sliding_window=64))
    return tf.Qwen2Model(tf.Qwen2Config(**common, use_sliding_window=False))


TINY_LLM_RECORD = "timecma-tiny-llm.json"  # in every folder timecma-tiny-llm writes: how it was made
TINY_LLM = f"an LLM folder made by timecma-tiny-llm (with its {TINY_LLM_RECORD})"
_TINY_README = "Offline test LLM made by `timecma-tiny-llm"  # how older timecma-tiny-llm folders begin their README


def is_tiny_llm(path: str) -> bool:
    """A folder ``build_tiny_llm`` made: its record, or (made before the record) its README and a config.json."""
    from .core.files import has_record

    if os.path.islink(path) or not os.path.isdir(path):
        return False
    if has_record(path, TINY_LLM_RECORD, "timecma-tiny-llm"):
        return True
    try:
        with open(os.path.join(path, "README.md")) as f:
            readme = f.read(len(_TINY_README))
    except (OSError, UnicodeDecodeError):
        return False
    return readme == _TINY_README and os.path.isfile(os.path.join(path, "config.json"))


def _put_tiny_llm(tmp: str, out_dir: str) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir`` (``timecma.core.files.replace_dir``): where nothing is,
    over an empty folder or file, or over a tiny LLM made before (moved aside first, removed after, put back if
    the rename fails). Anything else is refused, untouched (checked again: building took a while)."""
    from .core.files import replace_dir

    replace_dir(tmp, out_dir, is_tiny_llm, TINY_LLM)


def build_tiny_llm(
    out_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 600, n_positions: int = 1024, preset: str = "tiny",
    arch: str = "gpt2",
) -> str:
    """Create a small random-weight decoder (GPT-2, Llama, Mistral or Qwen2 architecture) with a
    locally trained tokenizer, saved with ``save_pretrained`` so it loads through the same
    ``from_pretrained(dir)`` path users run.

    Its weights are random: embeddings carry no language knowledge. It exists for tests and
    the offline demo; real use means ``--llm gpt2`` (or a Llama/Mistral/Qwen2 hub id or directory).
    The Llama family's tokenizers prepend a BOS token, as the real ones do; GPT-2's and Qwen2's do not.

    ``out_dir`` may be new, an empty folder, or a tiny LLM made here before (``TINY_LLM_RECORD``), which
    is replaced whole; anything else raises ``InputError`` naming it, before any work, and is left alone.
    The model is written to a temporary folder beside it and renamed into place at the end.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .core.files import check_replaceable, make_shareable
    from .core.leftovers import remove_dead_temporaries

    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHES}")
    given = os.fspath(out_dir)
    out_dir = os.path.abspath(given)
    check_replaceable(out_dir, is_tiny_llm, TINY_LLM)  # before any work
    quiet_progress()
    specials = ["<|endoftext|>"] if arch in ("gpt2", "qwen2") else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=trainer)
    if arch in ("gpt2", "qwen2"):
        ids: dict[str, int | None] = {"bos": 0, "eos": 0, "pad": 0}
        names = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        ids = {"bos": tok.token_to_id("<s>"), "eos": tok.token_to_id("</s>"), "pad": tok.token_to_id("</s>")}
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["bos"])])
        names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    torch.manual_seed(seed)
    model = _tiny_decoder(arch, tok.get_vocab_size(), n_positions, preset, ids)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_dead_temporaries(parent, f".tiny-llm-{name}-", "an unfinished timecma-tiny-llm folder")
    tmp = tempfile.mkdtemp(prefix=f".tiny-llm-{name}-{os.getpid()}-", dir=parent)
    try:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"{_TINY_README} --arch {arch}`: {arch} architecture "
                    f"{PRESETS[preset]}, RANDOM weights, byte-level BPE of {tok.get_vocab_size()} tokens trained on "
                    "synthetic prompt text. For tests and the demo only; use --llm gpt2 for real forecasts.\n")
        with open(os.path.join(tmp, TINY_LLM_RECORD), "w") as f:
            json.dump({"made_by": "timecma-tiny-llm", "arch": arch, "preset": preset, "seed": seed,
                       "vocab_size": tok.get_vocab_size(), "n_positions": n_positions}, f, indent=2)
        make_shareable(tmp)
        _put_tiny_llm(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return given
