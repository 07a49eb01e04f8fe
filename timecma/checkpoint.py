"""The ``best.pt`` checkpoint (docs/design.md §7) and import of public-reference state_dicts."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from . import __version__
from .core.config import ModelConfig
from .model import REFERENCE_UNUSED_PREFIXES, ForecastModel, make_model
from .core.errors import InputError

FORMAT_VERSION = 1
REQUIRED = ("format_version", "state_dict", "model_config", "data", "prompt", "llm", "metrics", "package_version")


class CheckpointError(InputError):
    """The checkpoint is missing, corrupt, from another format, or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): an earlier checkpoint is never half-overwritten."""
    path = os.fspath(path)
    payload = {"format_version": FORMAT_VERSION, "package_version": __version__, **payload}
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks {missing}")
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".best.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_torch_file(path: str | os.PathLike) -> Any:
    """torch.load with weights_only (no pickled code), failures named as checkpoint errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a timecma checkpoint (tensors and plain data only: weights_only)."""
    path = os.fspath(path)
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(
            f"{path} is not a timecma checkpoint (a bare state_dict from the reference? use --from-reference)"
        )
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']}; this timecma reads format {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return ckpt


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> ForecastModel:
    """Instantiate the model ``cfg.model`` names and load weights strictly, naming any key/shape mismatch."""
    model = make_model(cfg)
    expected = model.state_dict()
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        raise CheckpointError(
            f"state_dict does not fit the model config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"state_dict shapes do not fit the model config: {bad[:5]}")
    model.load_state_dict(state_dict)
    return model.eval()


def strip_reference_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the reference's unused template-layer keys; everything else is kept for a strict load."""
    return {k: v for k, v in state_dict.items() if not k.startswith(REFERENCE_UNUSED_PREFIXES)}


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return len(idx)


def infer_reference_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """Hyper-parameters from tensor shapes; flags (``overrides``) win where given.

    ``head`` cannot be read from shapes (in_proj packs all heads); it defaults to 8.
    """
    sd = strip_reference_keys(state_dict)
    try:
        channel, seq_len = sd["length_to_feature.weight"].shape
        pred_len = sd["c_to_length.weight"].shape[0]
        num_nodes = sd["cross.layers.0.self_attn.W_Q.weight"].shape[0]
        d_llm = sd["prompt_encoder.layers.0.self_attn.in_proj_weight"].shape[1]
        d_ff = sd["cross.layers.0.ff.0.weight"].shape[0]
        dim_ff = sd["ts_encoder.layers.0.linear1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a TimeCMA state_dict: key {exc} is missing") from exc
    inferred: dict[str, Any] = dict(
        num_nodes=int(num_nodes), seq_len=int(seq_len), pred_len=int(pred_len), d_llm=int(d_llm),
        channel=int(channel), e_layer=_count_layers(sd, "ts_encoder.layers."),
        d_layer=_count_layers(sd, "decoder.layers."), d_ff=int(d_ff), dim_feedforward=int(dim_ff),
    )
    conflicts = {k: (v, inferred[k]) for k, v in overrides.items() if v is not None and k in inferred and v != inferred[k]}
    if conflicts:
        raise CheckpointError(
            "flags contradict the state_dict's shapes: "
            + ", ".join(f"{k}={flag} but the tensors say {shape}" for k, (flag, shape) in conflicts.items())
        )
    inferred.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**inferred)
