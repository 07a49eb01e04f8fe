"""`timecma-export` command line."""

from __future__ import annotations

import json
import os

import click


from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail
from timecma.runtime.compile.cli import flavour_option, parse_targets, targets_option
from timecma.runtime.compile.cli import precisions as _precisions
from timecma.runtime.compile.cli import triple as _triple


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--ckpt", required=True, help="best.pt from timecma-train (or best_model.pth with --from-reference).")
@click.option("--out", "out_dir", default=None, help="Bundle directory [default: next to the checkpoint, bundle/].")
@click.option("--force", is_flag=True, help="Replace an existing bundle directory (only a bundle or an empty folder: "
                                           "anything else at --out is refused).")
@click.option("--data", "data_path", default=None, help="Data file (parity windows; required with --from-reference).")
@click.option("--llm", "llm_id", default=None, help="LLM hub id or directory [default: the one in the checkpoint].")
@click.option("--from-reference", is_flag=True, help="CKPT is a bare state_dict from the public TimeCMA repository.")
@click.option("--time-col", default="date", show_default=True)
@click.option("--split", type=click.Choice(["auto", "ett", "ratio"]), default="auto", show_default=True)
@click.option("--seq-len", type=int, default=None, help="Reference import: checked against tensor shapes.")
@click.option("--pred-len", type=int, default=None)
@click.option("--channel", type=int, default=None)
@click.option("--e-layer", type=int, default=None)
@click.option("--d-layer", type=int, default=None)
@click.option("--d-ff", type=int, default=None)
@click.option("--head", type=int, default=8, show_default=True, help="Reference import: not inferable from shapes.")
@click.option("--tolerance", default=1e-4, show_default=True, help="Max abs error vs PyTorch (fp32 graphs).")
@click.option("--parity-windows", default=8, show_default=True)
@click.option("--tensorrt", type=click.Choice(["build", "require", "skip"]), default="build", show_default=True,
              help="Build TensorRT engines with the same code as `timecma-engines build`: where a flavour is "
                   "installed (build), or fail without one (require), or not at all (skip).")
@flavour_option
@click.option("--trt-batch", default=None, help="LLM engine prompts per call MIN,OPT,MAX [default: 1,N,64: OPT a "
                                                "window's N prompts, at most 64].")
@click.option("--trt-seq", default=None, help="LLM engine tokens per prompt MIN,OPT,MAX [default: OPT the length the "
                                              "bundle's validation windows pad their prompts to (the median), MAX 1024 "
                                              "(or the longest validation prompt), capped at the LLM's positions].")
@click.option("--trt-forecast-batch", default="1,1,64", show_default=True)
@click.option("--trt-precision", default="fp16", show_default=True, help="Comma list of fp16,fp32.")
@click.option("--fp16-gate", default=1e-2, show_default=True, type=click.FloatRange(min=0),
              help="fp16 graphs are checked on CPU before any engine is built from them: refused when the worst "
                   "prompt's embedding error (relative L2) or forecast change (model units) exceeds this.")
@targets_option
@click.option("--quantize", type=click.Choice(["int8", "w8a8"]), multiple=True,
              help="Also write an int8 LLM graph for ONNX Runtime on CPU (repeatable): int8 (dynamic: int8 weights) or "
                   "w8a8 (static QDQ: int8 weights and activations, SmoothQuant, calibrated on validation prompts); "
                   "kept (and preferred if faster) only if the forecast test MSE changes by less than 1% and the "
                   "worst prompt's embedding by less than 5%.")
@click.option("--quantize-windows", default=64, show_default=True, help="Test windows for that MSE check.")
@click.option("--openvino", type=click.Choice(["auto", "build", "skip"]), default="auto", show_default=True,
              help="Gate OpenVINO f32/bf16/int8 variants on validation windows (same code as `timecma-engines "
                   "openvino`): where openvino is installed (auto), or fail without it (build), or not at all.")
@click.option("-v", "--verbose", is_flag=True)
def export_cmd(ckpt, out_dir, force, data_path, llm_id, from_reference, time_col, split, seq_len, pred_len, channel,
               e_layer, d_layer, d_ff, head, tolerance, parity_windows, tensorrt, trt_flavour, trt_batch, trt_seq,
               trt_forecast_batch, trt_precision, fp16_gate, targets, quantize, quantize_windows, openvino, verbose):
    """Export a checkpoint to a bundle: two ONNX graphs (parity-checked), tokenizer, TensorRT
    engines where TensorRT exists, and a JSON manifest."""
    from timecma.core.logs import setup_logging

    from .bundle import check_out_dir, export_bundle
    from .options import ExportError, ExportOptions
    from .source import source_from_checkpoint, source_from_reference

    setup_logging(verbose)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "bundle")
    opts = ExportOptions(out_dir=out_dir, force=force, data_path=data_path, llm_id=llm_id, tolerance=tolerance,
                         quantize=tuple(quantize),
                         quantize_windows=quantize_windows, openvino=openvino, fp16_gate=fp16_gate,
                         parity_windows=parity_windows, tensorrt=tensorrt, trt_flavour=trt_flavour,
                         trt_batch=_triple(trt_batch) if trt_batch else None,
                         trt_seq=_triple(trt_seq) if trt_seq else None,
                         trt_forecast_batch=_triple(trt_forecast_batch),
                         trt_precisions=_precisions(trt_precision),
                         trt_targets=tuple(parse_targets(targets) or ()))
    try:
        check_out_dir(out_dir, force)  # before the checkpoint and the LLM load
        from timecma.llm import LoadedLLM, load_llm, recorded_layers

        llm: LoadedLLM | None
        if from_reference:
            if not data_path or not llm_id:
                raise ExportError("--from-reference needs --data and --llm (the reference saves neither)")
            llm = load_llm(llm_id)
            src = source_from_reference(ckpt, data_path, llm, time_col, split, seq_len=seq_len, pred_len=pred_len,
                                        channel=channel, e_layer=e_layer, d_layer=d_layer, d_ff=d_ff, head=head)
        else:
            src = source_from_checkpoint(ckpt)
            name = llm_id or (src.llm or {}).get("id")  # neither: check_llm says what to pass
            llm = load_llm(name, layers=recorded_layers(src.llm)) if src.cfg.uses_llm and name else None
        manifest = export_bundle(src, llm, opts)
    except (InputError, BundleError, BackendUnavailable, OSError) as exc:
        fail("timecma-export", exc)
    g = {k: v.info for k, v in manifest.graphs.items()}
    llm_graph = manifest.graphs.get("llm")
    click.echo(json.dumps({
        "bundle": out_dir,
        "llm_parity_max_abs": g["llm"]["parity_vs_torch"]["ort_cpu_fp32"]["per_window"]["max_abs"]
        if llm_graph else None,
        "forecaster_parity_max_abs_normalized": g["forecaster"]["parity_vs_torch"]["ort_cpu_fp32"]["batch_1"]["max_abs"],
        "llm_cpu_preferred": llm_graph.cpu_preferred if llm_graph else None,
        "fp16_checked_on_cpu": {name: _fp16_verdict(g) for name, g in manifest.graphs.items()},
        "engines": [e.file for e in manifest.engines],
        "tensorrt": manifest.info["tensorrt_note"],
        "openvino": {f"{v.graph} {v.precision}": v.verdict for v in manifest.openvino} or "not gated (openvino not installed or --openvino skip)",
        "export_seconds": manifest.info["export_seconds"],
        "export_steps": {r["step"]: f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB"
                         for r in manifest.info["export_steps"]},
    }, indent=2))


def _fp16_verdict(graph) -> str:
    """The fp16 graph's CPU check in one line: accepted or refused, with the figure the gate took."""
    if "fp16" in graph.files:
        rec = graph.files["fp16"].info.get("parity_vs_torch_ort_cpu", {})
        return f"accepted ({rec.get('gate_figure', float('nan')):.2e} <= {rec.get('gate')})"
    rec = graph.info.get("fp16_rejected", {})
    return f"REFUSED ({rec.get('gate_figure', float('nan')):.2e} > {rec.get('gate')}): no fp16 engine"

