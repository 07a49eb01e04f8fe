"""OpenVINO precision variants and their accuracy gate (torch-free; run by export and `timecma-engines openvino`).

A lower precision is judged the way a user would judge it: on the forecast. Export stores
validation windows (``parity/gate.npz``: raw windows, their prompts' token ids, the truth in
the paper's normalised units). Per graph and precision, that graph runs in OpenVINO at that
precision while the other stays the fp32 ONNX Runtime reference; the forecast MSE against the
truth is compared with the all-fp32 MSE; a variant with a non-finite output, or whose MSE moves by
1% or more, or any of whose forecasts moves by ``FORECAST_GATE`` (normalised units, the fp16 graphs'
rule) or more, or (LLM) whose worst prompt's embedding moves by ``EMBEDDING_GATE`` or more, is
recorded as refused (``auto`` does not use it): ``timecma.core.accuracy.judge_variant``, the decision
TensorRT engines and export's int8 graphs take too. int8 is NNCF weight compression, saved as an
IR in the bundle; w8a8 (LLM only) is NNCF static quantisation of weights and activations with
SmoothQuant, calibrated on the gate's own validation prompts; bf16 is OpenVINO's
inference-precision hint on the fp32 graph, gated only on a CPU with native bf16. The verdicts, MSEs and latencies go into the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from timecma.core.accuracy import MSE_GATE, judge_variant
from timecma.core.errors import BundleError
from timecma.core.machine import cpu_info, has_native_bf16
from timecma.core.manifest import OVVariant, file_record, read_manifest, write_manifest
from timecma.core.timing import time_calls

from ..backends.base import forecaster_feeds
from ..backends.openvino import LLM_ONLY, compute_precision, graph_runner, ov_module
from .gate import GATE_FILE, GateReference  # noqa: F401  (GATE_FILE: re-exported, export and tests import it here)

log = logging.getLogger(__name__)

GATE = MSE_GATE  # largest accepted relative change of the validation forecast MSE
CALIBRATION_WINDOWS = 4  # w8a8: every other gate window's prompts up to this many windows (28 prompts at N = 7)
W8A8_SMOOTH_QUANT_ALPHA = 0.95  # NNCF's default for MatMuls; 0.5 measured no better on SmolLM2


def _nncf():
    try:
        import nncf
    except ImportError as exc:
        raise BundleError("int8 variants need NNCF: pip install 'timecma[openvino]'") from exc
    nncf.set_log_level(logging.ERROR)  # no progress tables on stdout
    return nncf


def compress_int8(src: str, dest: str) -> None:
    """NNCF int8 weight compression of a graph, saved as OpenVINO IR (``dest`` .xml + .bin)."""
    nncf, ov = _nncf(), ov_module()
    with _rich_bars_only_on_a_terminal():
        model = nncf.compress_weights(ov.Core().read_model(src))
    ov.save_model(model, dest, compress_to_fp16=False)


def nncf_w8a8(model, calibration: list[dict], float_matmuls: list[str]):
    """NNCF static int8 (weights and activations), one recipe for the OpenVINO IR and the ONNX QDQ graph.

    Plain min-max int8 moves SmolLM2's embeddings ~40% (activation outliers), so NNCF's transformer
    recipe is used: SmoothQuant (per-channel scales moved from activations into the weights, alpha
    0.95) before min-max ranges on ``calibration`` (one unpadded prompt per feed). ``float_matmuls``
    (the attention's activation x activation MatMuls) stay float: with the MLP down-projections also
    float, quantising them moved SmolLM2's worst held-out prompt from 5.5% to 13%, for a small share
    of the FLOPs."""
    nncf = _nncf()
    with _rich_bars_only_on_a_terminal():
        return nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                             preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration),
                             ignored_scope=nncf.IgnoredScope(names=float_matmuls, validate=False),
                             advanced_parameters=nncf.AdvancedQuantizationParameters(
                                 smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(
                                     matmul=W8A8_SMOOTH_QUANT_ALPHA)))


def w8a8_record(calibration: list[dict], float_matmuls: list[str]) -> dict:
    return {"calibration_prompts": len(calibration), "smooth_quant_alpha": W8A8_SMOOTH_QUANT_ALPHA,
            "float_activation_matmuls": len(float_matmuls)}


def calibration_windows(n_windows: int) -> list[int]:
    """The gate windows w8a8 calibrates on: every other one, up to CALIBRATION_WINDOWS. It is scored on the others."""
    return list(range(0, n_windows, 2))[:CALIBRATION_WINDOWS]


def scored_windows(starts: np.ndarray, span: int) -> tuple[np.ndarray, str]:
    """The windows a variant calibrated on the gate's ``calibration_windows`` is judged on, as indices into
    ``starts`` (the gate file's window starts, in order), and how to say so in its record: those that share no
    time step with a calibration window (every start ``span`` = seq_len + pred_len or more from each calibration
    start; gate windows lie closer together than that, so a calibration window's neighbours go too). Where none
    is left, every window, the record says so."""
    starts = np.asarray(starts, dtype=np.int64)
    calibrated = starts[calibration_windows(len(starts))]
    return disjoint_windows(starts, calibrated, span)


def disjoint_windows(starts: np.ndarray, calibrated: np.ndarray, span: int) -> tuple[np.ndarray, str]:
    """Indices of the windows at ``starts`` sharing no time step with a window at ``calibrated`` (``span``
    steps each), and the record's ``scored_on`` line; every index where none is left (the line says so)."""
    starts, calibrated = np.asarray(starts, dtype=np.int64), np.asarray(calibrated, dtype=np.int64)
    apart = np.abs(starts[:, None] - calibrated[None, :]).min(axis=1) >= span
    if apart.any():
        return np.flatnonzero(apart), ("validation windows sharing no time step with the ones it was calibrated "
                                       f"on ({int(apart.sum())} of {len(starts)})")
    return np.arange(len(starts)), ("validation windows overlapping the ones it was calibrated on (too few "
                                    "windows to keep them apart)")


def calibration_feeds(ids: np.ndarray, mask: np.ndarray, n: int) -> list[dict]:
    """w8a8 calibration: the prompts of the calibration windows (``calibration_windows``), one unpadded
    prompt per feed, so no pad token enters an activation range; the windows between stay unseen by it."""
    feeds = []
    for w in calibration_windows(len(ids) // n):
        for i in range(w * n, (w + 1) * n):
            k = int(mask[i].sum())
            feeds.append({"input_ids": ids[i:i + 1, :k], "attention_mask": mask[i:i + 1, :k]})
    return feeds


def activation_matmuls(model) -> list[str]:
    """The MatMuls with no constant (weight) input: the attention's activation x activation products,
    which w8a8 keeps float."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and all(i.get_source_output().get_node().get_type_name() != "Constant" for i in op.inputs())]


def quantize_w8a8(src: str, dest: str, calibration: list[dict]) -> dict:
    """The LLM graph as a w8a8 OpenVINO IR (``nncf_w8a8``); returns how it was made, for its record."""
    ov = ov_module()
    model = ov.Core().read_model(src)
    float_matmuls = activation_matmuls(model)
    ov.save_model(nncf_w8a8(model, calibration, float_matmuls), dest, compress_to_fp16=False)
    return w8a8_record(calibration, float_matmuls)


@contextlib.contextmanager
def _rich_bars_only_on_a_terminal():
    """NNCF draws rich progress bars on rich's global console; where that is no terminal (a log, CI,
    a pipe) each bar would land in the output as a line of its own, so the console stays quiet."""
    import rich

    console = rich.get_console()
    quiet = console.quiet
    console.quiet = quiet or not console.is_terminal
    try:
        yield
    finally:
        console.quiet = quiet


def build_openvino(bundle_dir: str, precisions: tuple[str, ...] = ("f32", "bf16", "int8", "w8a8"),
                   candidates: dict[tuple[str, str], str] | None = None, threads: int | None = None,
                   gate: float = GATE) -> list[OVVariant]:
    """Gate each (graph, precision) and record it in the manifest; returns the new records.

    ``candidates`` maps (graph, name) to a graph file already in the bundle, judged in f32 like the
    others (how a hand-made variant is checked; the tests use a deliberately damaged one)."""
    manifest = read_manifest(bundle_dir)
    ref = GateReference(bundle_dir, manifest, threads)
    cpu = cpu_info()
    # graph, label, file in bundle, compile precision, how a quantised graph was made (for its record)
    jobs: list[tuple[str, str, str | None, str, dict]] = []
    graphs: list[str] = [g for g in ("llm", "forecaster") if g in manifest.graphs]
    for g in graphs:
        for p in precisions:
            if p == "bf16" and not has_native_bf16():
                log.info("openvino: no native bf16 on this CPU (%s): bf16 not gated here", ", ".join(cpu["isa"]))
                continue
            if p in LLM_ONLY and g != "llm":
                continue
            rel, made = None, {}
            if p in ("int8", "w8a8"):
                rel = f"openvino/{g}.{p}.xml"
                os.makedirs(os.path.join(bundle_dir, "openvino"), exist_ok=True)
                src, dest = (os.path.join(bundle_dir, f) for f in (manifest.graphs[g].files["fp32"].file, rel))
                if p == "int8":
                    compress_int8(src, dest)
                else:
                    made = quantize_w8a8(src, dest, calibration_feeds(*ref.prompts(), ref.n))
            jobs.append((g, p, rel, p, made))
    for (g, name), rel in (candidates or {}).items():
        jobs.append((g, name, rel, "f32", {}))

    out = []
    for g, label, rel, prec, made in jobs:
        path = os.path.join(bundle_dir, rel or manifest.graphs[g].files["fp32"].file)
        run = graph_runner(path, prec, threads)
        # a variant calibrated on some gate windows (w8a8) is scored on windows apart from them only
        keep, scored_on = (scored_windows(ref.starts(), ref.span) if made.get("calibration_prompts")
                           else (np.arange(len(ref.x)), None))
        emb = emb_ref = None
        if g == "llm":
            emb_all, _, ms = ref.judge_llm(run)
            y = ref.forecast_fp32(emb_all)
            emb, emb_ref = emb_all[keep], None if ref.emb_ref is None else ref.emb_ref[keep]
        else:
            y = ref.forecast(lambda x, e: run(forecaster_feeds(x, e)), ref.emb_ref)
            feeds = forecaster_feeds(ref.x[:1], None if ref.emb_ref is None else ref.emb_ref[:1])
            ms, _ = time_calls(lambda k: run(feeds), 200, warmup=5, budget_s=3)
        # the one decision every variant takes (timecma.core.accuracy): the LLM stage is judged by its embeddings
        # too, since the forecast MSE alone hides their damage; and an MSE that barely moves on average can hide
        # single forecasts that move far (the fp16 gate's rule)
        j = judge_variant(y[keep], ref.y_ref[keep], ref.truth[keep], ref.mean, ref.std, emb, emb_ref, mse_gate=gate)
        mse, mse_ref = j["val_mse"], j["val_mse_fp32"]
        v = OVVariant(g, label, rel, j["mse_rel_change"], j["accepted"], float(np.median(ms)),
                      {"val_mse": mse, "val_mse_fp32": mse_ref, "windows": int(len(keep)), "gate": gate,
                       **({"scored_on": scored_on} if scored_on else {}),
                       **({"embedding": j["embedding"]} if "embedding" in j else {}),
                       "max_abs_change_normalized": j["forecast_max_abs_change_normalized"],
                       "forecast_gate": j["forecast_gate"], "finite": j["finite"],
                       "computes_in": compute_precision(prec), **made, **cpu,
                       "openvino": ov_module().__version__})
        log.info("openvino %s %s: validation MSE %.5f vs fp32 %.5f: %s", g, label, mse, mse_ref, v.verdict)
        out.append(v)

    others = [v for v in manifest.openvino if (v.graph, v.precision) not in {(n.graph, n.precision) for n in out}]
    manifest.openvino = others + out
    for v in out:
        if v.file:
            for f in (v.file, v.file[:-4] + ".bin") if v.file.endswith(".xml") else (v.file,):
                manifest.files[f] = file_record(bundle_dir, f)
    write_manifest(bundle_dir, manifest)
    return out
