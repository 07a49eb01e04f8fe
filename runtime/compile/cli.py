"""`timecma-engines`: build, list and verify a bundle's TensorRT engines, without torch.

Engines are built on (or for) the box that serves, from the ONNX graphs export wrote, and
added to the bundle next to the engines other GPUs already have.
"""

from __future__ import annotations

import json
import logging
import os

import click

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail
from timecma.core.manifest import Engine, read_manifest

EPILOG = EXIT_CODES_HELP + " A failed build leaves the bundle unchanged."
PROG = "timecma-engines"


def triple(value: str) -> tuple[int, int, int]:
    """MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX."""
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise click.BadParameter(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {value!r}")
    return parts


def precisions(value: str) -> tuple[str, ...]:
    out = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in out if p not in ("fp16", "fp32")]
    if not out or bad:
        raise click.BadParameter(f"precisions are fp16 and/or fp32, got {value!r}")
    return out


# options shared with `timecma-export` (one definition, one meaning)
flavour_option = click.option(
    "--trt-flavour", type=click.Choice(["auto", "standard", "rtx"]), default="auto", show_default=True,
    help="standard TensorRT builds on the GPU it targets; TensorRT-RTX builds anywhere (auto: standard where it "
         "can build, else RTX).")
targets_option = click.option(
    "--compute-capability", "targets", default="",
    help="TensorRT-RTX targets, e.g. 75 or 86,89 [default: portable 8.6/8.9/12.0].")


def parse_targets(value: str) -> list[str] | None:
    return [c.strip().replace(".", "") for c in value.split(",") if c.strip()] or None


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True)
def engines_cmd(verbose: bool) -> None:
    """Build, list and verify the TensorRT engines of a timecma bundle (torch-free)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@engines_cmd.command("build", epilog=EPILOG)
@click.argument("bundle", type=click.Path())
@click.option("--precision", "precision", default="fp16", show_default=True, help="Comma list of fp16,fp32.")
@flavour_option
@click.option("--llm-batch", default=None, help="LLM prompts per call MIN,OPT,MAX [default: 1,N,64: OPT a window's "
                                                "N prompts].")
@click.option("--llm-seq", default=None, help="LLM tokens per prompt MIN,OPT,MAX [default: OPT the bundle's validation "
                                              "prompts' padded length, MAX 1024 (or the longest prompt), capped at the "
                                              "LLM's positions].")
@click.option("--forecast-batch", default="1,1,64", show_default=True, help="Forecaster windows per call.")
@click.option("--max-batch", type=int, default=None, help="Shortcut: the MAX of --llm-batch and --forecast-batch.")
@click.option("--max-seq", type=int, default=None, help="Shortcut: the MAX of --llm-seq.")
@targets_option
@click.option("--graph", type=click.Choice(["all", "llm", "forecaster"]), default="all", show_default=True)
def build_cmd(bundle, precision, trt_flavour, llm_batch, llm_seq, forecast_batch, max_batch, max_seq,
              targets, graph):
    """Build engines from BUNDLE's ONNX graphs and add them to it, atomically.

    Where a GPU the engines target is visible, each is gated on the bundle's validation windows against
    ONNX Runtime fp32 (worst prompt's embedding, largest forecast change): one over the gate is refused,
    not added, and the command exits 3 after adding the others. Built without such a GPU, an engine is
    added as "not measured". A plan is written only where nothing is, over an empty file, or over a plan
    the manifest lists: any other file under its name is refused (exit 2) and left alone."""
    from .tensorrt import EngineProfile, build_engines, default_profile

    try:
        manifest = read_manifest(bundle)
        d = default_profile(manifest, bundle)
        lb = triple(llm_batch) if llm_batch else d.llm_batch
        ls, fb = triple(llm_seq) if llm_seq else d.llm_seq, triple(forecast_batch)
        if max_batch is not None:
            lb, fb = (min(lb[0], max_batch), min(lb[1], max_batch), max_batch), \
                     (min(fb[0], max_batch), min(fb[1], max_batch), max_batch)
        if max_seq is not None:
            ls = (min(ls[0], max_seq), min(ls[1], max_seq), max_seq)
        new = build_engines(bundle, precisions(precision), trt_flavour, EngineProfile(lb, ls, fb),
                            parse_targets(targets), None if graph == "all" else (graph,))
    except (InputError, BundleError, BackendUnavailable, OSError) as exc:
        fail(PROG, exc, " (bundle unchanged)")
    for e in new:
        click.echo(f"built {e.file} ({e.bytes / 1e6:.1f} MB, {e.info['build_seconds']} s, {e.target}); "
                   f"parity: {_parity(e)}")
    if new.refused:
        names = ", ".join(f"{e.graph} {e.precision}" for e in new.refused)
        fail(PROG, BundleError(f"refused by the gate on this GPU, not added to the bundle: {names}: "
                               + "; ".join(_parity(e) for e in new.refused)))


def _parity(e: Engine) -> str:
    from .tensorrt import PARITY_KEY, parity_summary

    return parity_summary(e.info.get(PARITY_KEY, {}))


@engines_cmd.command("openvino", epilog=EPILOG)
@click.argument("bundle", type=click.Path())
@click.option("--precision", "ov_precisions", default="f32,bf16,int8,w8a8", show_default=True,
              help="OpenVINO precisions to gate (bf16 only where the CPU has native bf16; w8a8 for the LLM).")
@click.option("--threads", default=None, type=int, help="CPU threads for the gate's timings (default: all).")
def openvino_cmd(bundle, ov_precisions, threads):
    """Gate OpenVINO precision variants on the bundle's validation windows and record them (int8 IRs added).

    A variant whose validation forecast MSE moves by 1% or more is recorded as refused: `--backend auto`
    does not use it; `--backend openvino` with that precision forced does, with a warning."""
    from ..backends.openvino import PRECISIONS
    from .openvino import build_openvino

    wanted = tuple(p.strip() for p in ov_precisions.split(",") if p.strip())
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or not wanted:
        fail(PROG, InputError(f"--precision takes {', '.join(PRECISIONS)}; got {ov_precisions!r}"))
    try:
        out = build_openvino(bundle, wanted, threads=threads)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(PROG, exc)
    for v in out:
        click.echo(f"{v.graph:10s} {v.precision:5s} {v.verdict}")


@engines_cmd.command("list", epilog=EPILOG)
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="The manifest's engine entries as JSON.")
def list_cmd(bundle, as_json):
    """The engines in BUNDLE: graph, precision, flavour, target, profile."""
    try:
        manifest = read_manifest(bundle, verify=False)
    except BundleError as exc:
        fail(PROG, exc)
    engines = manifest.engines
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in engines], indent=2))
        return
    if not engines:
        click.echo(f"{bundle}: no engines ({manifest.info.get('tensorrt_note', '')})")
    for e in engines:
        prof = "; ".join(f"{k} {v[0]}..{v[2]}" for k, v in e.profile.items())
        click.echo(f"{e.file}\n    {e.graph} {e.precision}, {e.flavour} {e.version}, {e.target}, "
                   f"{e.bytes / 1e6:.1f} MB, built {e.info.get('built')} in {e.info.get('build_seconds')} s\n"
                   f"    profile: {prof}\n    parity: {_parity(e)}; builder warnings: {len(e.info.get('warnings', []))}")


@engines_cmd.command("verify", epilog=EPILOG)
@click.argument("bundle", type=click.Path())
def verify_cmd(bundle):
    """Check every file of BUNDLE against its sha256; summarise graphs, parity, engines and which
    backends can run it on this machine (and why not)."""
    from ..backends.select import available_backends
    from ..backends.tensorrt import gate_state, select_engines
    from ..engines.cuda import current_capability
    from ..engines.trt_flavour import installed

    try:
        manifest = read_manifest(bundle)
    except BundleError as exc:
        fail(PROG, exc)
    cfg = manifest.model_config
    click.echo(f"bundle {os.path.abspath(bundle)}: {len(manifest.files)} files verified (sha256)")
    llm = f"LLM {manifest.llm.id} (d_llm {cfg.d_llm})" if manifest.llm else "no LLM"
    click.echo(f"  model: {cfg.model}, seq_len {cfg.seq_len}, pred_len {cfg.pred_len}, {cfg.num_nodes} variables, {llm}")
    for g, graph in manifest.graphs.items():
        par = graph.info.get("parity_vs_torch", {}).get("ort_cpu_fp32", {})
        worst = max((v["max_abs"] for v in par.values() if isinstance(v, dict) and "max_abs" in v), default=None)
        click.echo(f"  graph {g}: {', '.join(sorted(graph.files))}; parity vs PyTorch (ORT CPU fp32) "
                   f"{'%.1e' % worst if worst is not None else 'n/a'}")
    for e in manifest.engines:
        click.echo(f"  engine {e.graph} {e.precision}: {e.flavour} {e.version}, {e.target}; {_parity(e)}")
    avail = available_backends()
    for name, why in avail.items():
        detail = ""
        if name == "tensorrt" and why == "available":
            try:
                gpu_cc = current_capability()
                if gpu_cc is None:
                    raise BackendUnavailable("no CUDA GPU is visible to this process")
                chosen = select_engines(manifest, bundle, gpu_cc, installed())
                detail = f" on sm{gpu_cc}: " + "; ".join(f"{g} {e.precision} {e.flavour} ({gate_state(e, gpu_cc)})"
                                                         for g, e in chosen.items())
            except (BackendUnavailable, RuntimeError) as exc:  # RuntimeError: a CUDA call failed
                why = str(exc)
        click.echo(f"  backend {name}: {'can run here' + detail if why == 'available' else why}")
