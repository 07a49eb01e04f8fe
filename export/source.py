"""What export starts from: a timecma checkpoint or a public-reference state_dict, the LLM check,
and the real windows parity and the gates are measured on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from timecma.checkpoint import (CheckpointError, infer_reference_config, load_checkpoint, load_torch_file,
                                strip_reference_keys)
from timecma.core.config import DataContract, ModelConfig
from timecma.core.files import file_sha256, portable_name
from timecma.core.prompts import get_template
from timecma.core.scaling import Scaler
from timecma.data import load_series, make_windows, read_table, resolve_split, split_borders, validate_frame
from timecma.llm import LoadedLLM

from .options import ExportError


@dataclass
class Source:
    """Everything export needs, from a timecma checkpoint or an imported reference state_dict."""

    cfg: ModelConfig
    state_dict: dict
    data: DataContract
    prompt: dict
    llm: dict | None  # recorded LLM identity; None for reference checkpoints
    metrics: dict
    origin: dict  # kind, file name and sha256 of what the bundle came from (no build-machine paths)
    calibration: dict | None = None  # conformal scores' quantiles from training (None: no intervals)


def source_from_checkpoint(path: str) -> Source:
    ckpt = load_checkpoint(path)
    return Source(ModelConfig(**ckpt["model_config"]), ckpt["state_dict"], DataContract(**ckpt["data"]),
                  ckpt["prompt"], ckpt["llm"], ckpt["metrics"], _origin("timecma checkpoint", path),
                  ckpt.get("calibration"))


def _origin(kind: str, path: str) -> dict:
    return {"kind": kind, "file": os.path.basename(path), "sha256": file_sha256(path)}


def source_from_reference(path: str, data_path: str, llm: LoadedLLM, time_col: str = "date", split: str = "auto",
                          **flags) -> Source:
    """A bare state_dict saved by the public reference (``best_model.pth``)."""
    sd = load_torch_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a bare state_dict (a timecma checkpoint? drop --from-reference)")
    cfg = infer_reference_config(sd, **flags)
    if cfg.d_llm != llm.info.d_llm:
        raise CheckpointError(f"the state_dict expects d_llm={cfg.d_llm} but LLM {llm.info.id} has {llm.info.d_llm}")
    series = load_series(data_path, time_col)
    if len(series.variables) != cfg.num_nodes:
        raise CheckpointError(f"the state_dict has {cfg.num_nodes} variables but {data_path} has "
                              f"{len(series.variables)}: {series.variables}")
    split = resolve_split(split, data_path)
    b = split_borders(len(series.values), cfg.seq_len, split, series.frequency)["train"]
    scaler = Scaler.fit(series.values[b[0]:b[1]], series.variables)
    contract = DataContract(time_col, series.variables, series.frequency, cfg.seq_len, cfg.pred_len,
                            scaler.mean.tolist(), scaler.std.tolist(), split, os.path.abspath(data_path))
    tmpl = get_template("reference")
    return Source(cfg, strip_reference_keys(sd), contract, {"name": tmpl.name, "hash": tmpl.hash}, None, {},
                  _origin("public-reference state_dict", path))


def check_llm(src: Source, llm: LoadedLLM | None) -> None:
    """The LLM given is the one the model was trained with (weights, tokenizer, width), or none for models without it."""
    if not src.cfg.uses_llm:
        if llm is not None:
            raise ExportError(f"model {src.cfg.model} has no LLM branch; drop --llm")
        return
    if llm is None:
        raise ExportError("this model uses the LLM: pass --llm or export from a checkpoint that names it")
    if src.llm is None:
        return
    if llm.info.weights_digest != src.llm["weights_digest"]:
        raise ExportError(
            f"LLM {llm.info.id} has weights digest {llm.info.weights_digest[:12]} but the checkpoint was trained "
            f"with {src.llm['id']} (digest {src.llm['weights_digest'][:12]}): its prompt embeddings would differ"
        )
    if llm.info.tokenizer_digest != src.llm["tokenizer_digest"]:
        raise ExportError(f"LLM {llm.info.id}'s tokenizer differs from the one the checkpoint was trained with")
    if llm.info.d_llm != src.cfg.d_llm:
        raise ExportError(f"LLM hidden size {llm.info.d_llm} != the model's d_llm {src.cfg.d_llm}")


def real_windows(src: Source, data_path: str | None, n: int):
    """Raw windows from the checkpoint's data (validation split), for parity on real inputs and the fp16 twins'
    gates: no choice of a shipped artefact reads the test split, which is the final evaluation's alone."""
    path = data_path or src.data.source
    if not path or not os.path.exists(path):
        raise ExportError(f"the training data {path!r} is not available for the parity check; pass --data")
    series = validate_frame(read_table(path), path, src.data.time_col, src.data.variables)
    return series, spread_starts(src, series, "val", n, distinct=False)


def spread_starts(src: Source, series, split: str, n: int, distinct: bool = True) -> np.ndarray:
    """``n`` window starts spread evenly over a split (``distinct``: at most one per window of the split)."""
    borders = split_borders(len(series.values), src.cfg.seq_len, src.data.split, series.frequency)
    starts = make_windows(borders, src.cfg.seq_len, src.cfg.pred_len)[split].starts
    n = min(n, len(starts)) if distinct else n
    return starts[np.linspace(0, len(starts) - 1, n).astype(int)]


def portable_data(data: DataContract, path: str, rows: int) -> dict:
    """The data contract for the manifest: the source as file name, sha256 and row count, no path
    (``path`` and ``rows`` are those of the file the parity windows were read from)."""
    src = {"file": os.path.basename(data.source or path), "sha256": file_sha256(path), "rows": rows}
    return {**data.to_dict(), "source": src}


def portable_llm(info: dict, trained: dict | None = None) -> dict:
    """A local LLM directory is recorded by its folder name (digests identify it), a hub id as is; from the
    checkpoint's record (``trained``) the engine and precision that filled the training store."""
    precompute = ((trained or {}).get("extra") or {}).get("precompute")
    if precompute:
        info = {**info, "extra": {**info.get("extra", {}), "precompute": precompute}}
    return {**info, "id": portable_name(info["id"]), "local_directory": os.path.isdir(info["id"])}
