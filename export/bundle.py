"""`timecma-export`: checkpoint -> self-contained bundle (docs/design.md §8), as the sequence of its steps.

Load what export starts from and check the LLM (``source``); export both graphs and check them
against PyTorch on real windows (``graphs``); add the CPU variants that earn their place
(``cpu_variants``) and fp16 graphs for TensorRT; build engines where TensorRT exists and gate
OpenVINO variants (the same code as ``timecma-engines``); write it all to a temporary directory
that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from timecma import __version__
from timecma.core.conformal import FILE as CALIBRATION_FILE, METHOD, Calibration
from timecma.core.errors import BackendUnavailable, InputError
from timecma.core.files import check_replaceable, make_shareable, recover_replaced, replace_dir
from timecma.core.leftovers import remove_dead_temporaries
from timecma.core.manifest import (BUNDLE, MANIFEST_VERSION, PARITY_FILE, Engine, Manifest, file_record, is_bundle,
                                   list_bundle_files, read_manifest, write_manifest)
from timecma.llm import LoadedLLM, release_weights
from timecma.runtime.compile.tensorrt import (PARITY_KEY, EngineProfile, build_engines, default_profile,
                                             parity_summary)
from timecma.runtime.engines.trt_flavour import installed, load_flavour

from .cpu_variants import batch1_forecaster, gate_inputs, llm_cpu_variants, openvino_variants, split_forecaster
from .graphs import (ForecasterPart, LLMPart, check_forecaster, export_forecaster_graph, forecaster_fp16, llm_fp16,
                     llm_graph)
from .onnx_export import OPSET
from .options import FORECASTER_ONNX, ExportError, ExportOptions
from .source import Source, check_llm, portable_data, portable_llm, real_windows

log = logging.getLogger(__name__)


def export_bundle(src: Source, llm: LoadedLLM | None, opts: ExportOptions) -> Manifest:
    """Write the bundle; returns its manifest. Nothing is left at ``out_dir`` on failure. ``llm`` is spent:
    its weights are released once the LLM graph has passed its parity check (its ``info`` stays)."""
    t0 = time.time()
    out_dir = os.path.abspath(opts.out_dir)
    recover_bundle(out_dir)
    check_out_dir(out_dir, opts.force)
    check_llm(src, llm)
    if opts.tensorrt == "require":  # fail before minutes of export, not after
        try:
            load_flavour(opts.trt_flavour)
        except BackendUnavailable as exc:
            raise ExportError(f"--tensorrt require, but {exc}") from exc
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".bundle-{name}-{os.getpid()}-", dir=parent)
    steps = _Steps()
    try:
        raw = _build(src, llm, opts, tmp, steps)
        raw["files"] = {k: v.to_dict() for k, v in list_bundle_files(tmp).items()}
        manifest = Manifest.from_dict({"manifest_version": MANIFEST_VERSION, **raw})  # the schema checks the writer too
        write_manifest(tmp, manifest)
        with steps("TensorRT engines"):
            manifest = _engines(opts, tmp, manifest)
        with steps("OpenVINO gate"):
            manifest = openvino_variants(opts, tmp, manifest)
        manifest.info["export_seconds"] = round(time.time() - t0, 1)
        manifest.info["export_steps"] = steps.rows
        write_manifest(tmp, manifest)
        make_shareable(tmp)
        _put_in_place(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_out_dir(out_dir: str, force: bool) -> None:
    """What may be at ``--out``: nothing, or with ``--force`` an empty folder or a bundle (its manifest), which
    is replaced. Anything else is refused before any work starts, and nothing is touched."""
    if os.path.lexists(out_dir) and not force:
        raise ExportError(f"{out_dir} exists; pass --force to replace it")
    check_replaceable(out_dir, is_bundle, BUNDLE, ExportError)


OLD_BUNDLE = ".old-bundle-"  # + NAME-: where a previous bundle waits while the new one is renamed in


def _put_in_place(tmp: str, out_dir: str) -> None:
    """Rename the finished bundle into place (``timecma.core.files.replace_dir``): a previous one (a bundle or
    an empty folder, checked again here: minutes passed since export started) is moved aside first, put back
    if the rename fails, and removed after."""
    replace_dir(tmp, out_dir, is_bundle, BUNDLE, ExportError, aside=_old_bundle(out_dir))


def _old_bundle(out_dir: str) -> str:
    return f"{OLD_BUNDLE}{os.path.basename(out_dir)}-"


def recover_bundle(out_dir: str) -> None:
    """Clean up after a killed export of ``out_dir``: put back a previous bundle that a kill between the two
    renames left stranded in ``.old-bundle-*`` (``timecma.core.files.recover_replaced``), and remove its dead
    temporaries."""
    parent, name = os.path.split(out_dir)
    recover_replaced(out_dir, "the bundle", aside=_old_bundle(out_dir))
    remove_dead_temporaries(parent, f".bundle-{name}-", "an unfinished bundle")


class _Steps:
    """Seconds of each export step and the process's peak RSS when it ended (the peak so far: it only
    rises, so the step that raised it is the one to look at)."""

    def __init__(self):
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.time()
        yield
        seconds = time.time() - t
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
        self.rows.append({"step": name, "seconds": round(seconds, 1), "peak_rss_gb": round(peak_gb, 2)})
        log.info("export step %s: %.1f s, peak RSS %.2f GB", name, seconds, peak_gb)


def _build(src: Source, llm: LoadedLLM | None, opts: ExportOptions, tmp: str, step: _Steps) -> dict:
    """The bundle's files in ``tmp`` and its manifest as a dict. Models without the LLM branch
    (``timecma-no-llm``, ``dlinear``) get a forecaster graph that takes the window alone and no
    LLM graph, tokenizer or prompt template."""
    cfg = src.cfg
    with step("forecaster graph"):
        fc = export_forecaster_graph(src, tmp)
    series, starts = real_windows(src, opts.data_path, opts.parity_windows)
    x = np.stack([series.values[s:s + cfg.seq_len] for s in starts]).astype(np.float32)
    with step("LLM graph and its parity"):
        part = None
        if cfg.uses_llm:
            assert llm is not None, "check_llm refuses a model with the LLM branch and no LLM"
            part = llm_graph(src, llm, opts, tmp, series, starts)
            release_weights(llm)  # past its parity check the graph stands for the LLM: the torch weights go
    with step("forecaster parity and batch-1 graph"):
        check_forecaster(fc, tmp, x, part.emb if part else None, opts.tolerance)
        fc_batch1 = batch1_forecaster(fc, tmp, opts.tolerance)
        fc_split = split_forecaster(fc, tmp, opts.tolerance) if cfg.uses_llm else None
        _save_parity_inputs(tmp, fc, part)
        gate_inputs(src, opts, tmp, series, part)
    calibration = _save_calibration(tmp, src)
    if part:
        with step("LLM CPU variants"):
            llm_cpu_variants(src, llm, opts, tmp, series, part, fc.session)
        with step("LLM fp16 graph and its CPU check"):
            _keep_fp16(part.files, part.graph, *llm_fp16(tmp, part, fc, opts.fp16_gate))
    fc_files = {"fp32": {"file": FORECASTER_ONNX}}
    fc_rejected: dict = {}
    with step("forecaster fp16 graph and its CPU check"):
        _keep_fp16(fc_files, fc_rejected, *forecaster_fp16(tmp, fc, opts.fp16_gate))
    for files in [fc_files] + ([part.files] if part else []):
        for v in files.values():
            v.update(file_record(tmp, v["file"]).to_dict())  # hashed once: the manifest's `files` reuses it
    fc_batch1["sha256"] = file_record(tmp, fc_batch1["file"]).sha256
    fc_extra = {**fc_rejected, **({"cpu_split": fc_split} if fc_split else {})}
    return {**_manifest_dict(src, llm, opts, fc, fc_files, fc_batch1, part, series, starts, fc_extra),
            **({"calibration": calibration} if calibration else {})}


def _save_calibration(tmp: str, src: Source) -> dict | None:
    """The checkpoint's conformal calibration as ``calibration.npz``, for prediction intervals at serving time."""
    if not src.calibration:
        log.warning("the checkpoint has no conformal calibration (trained by an older timecma): the bundle serves "
                    "point forecasts only")
        return None
    cal = Calibration.from_dict(src.calibration)
    cal.save(os.path.join(tmp, CALIBRATION_FILE))
    return {"file": CALIBRATION_FILE, "method": METHOD, "windows": cal.windows, "split": cal.split,
            "test": (src.metrics.get("intervals") or {}).get("test")}


def _keep_fp16(files: dict, graph_info: dict, entry: dict | None, record: dict) -> None:
    """An accepted fp16 twin joins the graph's files; a refused one is recorded with its figure."""
    if entry:
        files["fp16"] = entry
    else:
        graph_info["fp16_rejected"] = record


def _save_parity_inputs(tmp: str, fc: ForecasterPart, part: LLMPart | None) -> None:
    """Real inputs and ONNX Runtime fp32 outputs, for engine parity wherever engines are built."""
    os.makedirs(os.path.join(tmp, os.path.dirname(PARITY_FILE)), exist_ok=True)
    x, _, y_ort = fc.checked()
    arrays: dict[str, Any] = {"fc_x": x[:1], "fc_out": y_ort[:1],
                              **({"fc_prompt_emb": fc.emb[:1]} if fc.emb is not None else {}),
                              **(part.parity if part else {})}
    np.savez(os.path.join(tmp, PARITY_FILE), **arrays)


def _forecaster_record(src: Source, fc: ForecasterPart, fc_files: dict, fc_batch1: dict, extra: dict) -> dict:
    cfg = src.cfg
    inputs = {"x": {"shape": ["B", cfg.seq_len, cfg.num_nodes], "dtype": "float32", "units": "raw"}}
    if cfg.uses_llm:
        inputs["prompt_emb"] = {"shape": ["B", cfg.num_nodes, cfg.d_llm], "dtype": "float32"}
    return {
        "inputs": inputs,
        "outputs": {"y": {"shape": ["B", cfg.pred_len, cfg.num_nodes], "dtype": "float32", "units": "raw"}},
        "scaler": "in_graph", "files": fc_files, "cpu_preferred": "fp32", "cpu_batch1": fc_batch1,
        "parity_vs_torch": {"units": fc.unit_name, "ort_cpu_fp32": fc.parity},
        "export_seconds": round(fc.export_s, 1), **extra,
    }


def _manifest_dict(src: Source, llm: LoadedLLM | None, opts: ExportOptions, fc: ForecasterPart, fc_files: dict,
                   fc_batch1: dict, part: LLMPart | None, series, starts, fc_extra: dict) -> dict:
    cfg, data = src.cfg, src.data
    graphs = {"forecaster": _forecaster_record(src, fc, fc_files, fc_batch1, fc_extra)}
    if part:
        graphs["llm"] = part.graph
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "origin": src.origin,
        "model_config": cfg.to_dict(),
        "data": portable_data(data, opts.data_path or data.source, len(series.values)),
        "prompt": src.prompt if cfg.uses_llm else None,
        "llm": ({**portable_llm(llm.info.to_dict(), src.llm), "digest_verified": src.llm is not None}
                if part and llm is not None else None),
        "tokenizer": part.tokenizer_record if part else None,
        "opset": OPSET,
        "graphs": graphs,
        "parity_tolerance": opts.tolerance,
        "parity_windows": [int(s) for s in starts],
        "engines": [],
        "versions": _versions(),
        "metrics": src.metrics,
    }


def _versions() -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                **{k: (None if v.startswith("not installed") else v) for k, v in installed().items()},
                "timecma": __version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def _engines(opts: ExportOptions, tmp: str, manifest: Manifest) -> Manifest:
    """TensorRT engines through the same code as `timecma-engines build`, at the profile it would take (its
    opt point from the bundle's own validation prompts and N) unless --trt-batch / --trt-seq say otherwise;
    the manifest after it, whose ``tensorrt_note`` names the engines the gate refused, with their figures."""
    if opts.tensorrt == "skip":
        manifest.info["tensorrt_note"] = ("TensorRT build skipped (--tensorrt skip); ONNX-only bundle. Add engines "
                                          "later with timecma-engines build")
        return manifest
    d = default_profile(manifest, tmp)  # tmp holds parity/gate.npz: the real prompts' lengths
    profile = EngineProfile(opts.trt_batch or d.llm_batch, opts.trt_seq or d.llm_seq, opts.trt_forecast_batch)
    by_precisions: dict[tuple, list[str]] = {}  # a graph whose fp16 twin was refused gets no fp16 engine
    for name, g in manifest.graphs.items():
        by_precisions.setdefault(tuple(p for p in opts.trt_precisions if p in g.files), []).append(name)
    refused: list[Engine] = []
    try:
        for precisions, graphs in by_precisions.items():
            if precisions:
                refused += build_engines(tmp, precisions, opts.trt_flavour, profile, list(opts.trt_targets) or None,
                                         graphs=tuple(graphs)).refused
    except BackendUnavailable as exc:
        if opts.tensorrt == "require":
            raise ExportError(f"--tensorrt require, but {exc}") from exc
        log.warning("%s: writing an ONNX-only bundle (the runtime uses ONNX Runtime)", exc)
        manifest.info["tensorrt_note"] = f"{exc}; ONNX-only bundle"
        return manifest
    except InputError as exc:
        raise ExportError(f"TensorRT engine build failed: {exc}") from exc
    m = read_manifest(tmp, verify=False)
    m.info["tensorrt_note"] = tensorrt_note(m.engines, refused, opts.trt_precisions)
    return m


def tensorrt_note(engines: list[Engine], refused: list[Engine], precisions: tuple[str, ...]) -> str:
    """What export's engine step did, in one line for the manifest and the command's output: the engines built,
    and those the gate refused on this GPU (not added to the bundle), each with its figures."""
    if engines:
        note = f"engines built with {', '.join(sorted({f'{e.flavour} {e.version}' for e in engines}))}"
    elif refused:
        note = "no engine added"
    else:
        note = f"no graph has a {'/'.join(precisions)} variant that passed its CPU check; no engines built"
    if refused:
        note += "; refused by the gate on this GPU, not added to the bundle: " + "; ".join(
            f"{e.graph} {e.precision} ({os.path.basename(e.file)}): {parity_summary(e.info.get(PARITY_KEY, {}))}"
            for e in refused)
    return note
