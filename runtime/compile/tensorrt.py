"""Build TensorRT engines from the ONNX graphs already in a bundle and add them to it (torch-free).

Used by ``timecma-engines build`` on the serving box and by ``timecma-export --tensorrt``.
Engines are written to a temporary folder inside the bundle, moved into ``engines/`` and the
manifest rewritten atomically, under a lock, next to the engines other GPUs already have;
any failure leaves the bundle as it was. Where a CUDA GPU is visible the new engines are
loaded with the serving runner and compared with ONNX Runtime's outputs stored at export
(``parity/inputs.npz``), so export and serving check engines through one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from timecma.core.errors import BackendUnavailable, BundleError, InputError
from timecma.core.leftovers import remove_dead_temporaries
from timecma.core.config import ModelConfig
from timecma.core.manifest import PARITY_FILE, GRAPHS, Engine, Manifest, file_record, read_manifest, write_manifest

from ..engines import cuda as _cuda
from ..engines.trt_flavour import FLAVOURS, Flavour, load_flavour

log = logging.getLogger(__name__)




@dataclass
class EngineProfile:
    """Optimization-profile ranges (min, opt, max): LLM prompts per call and tokens, forecast windows per call."""

    llm_batch: tuple[int, int, int] = (1, 7, 64)
    llm_seq: tuple[int, int, int] = (1, 256, 1024)
    forecast_batch: tuple[int, int, int] = (1, 1, 64)

    def check(self, max_positions: int) -> None:
        for name, (lo, opt, hi) in asdict(self).items():
            if not 1 <= lo <= opt <= hi:
                raise InputError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")
        if self.llm_seq[2] > max_positions:
            raise InputError(f"profile llm_seq max {self.llm_seq[2]} exceeds the LLM's {max_positions} positions "
                             "recorded in the manifest")

    def shapes(self, graph: str, cfg: ModelConfig | None) -> dict[str, list[list[int]]]:
        """Input name -> [min, opt, max] shapes for one graph."""
        if graph == "llm":
            s = [[b, t] for b, t in zip(self.llm_batch, self.llm_seq)]
            return {"input_ids": s, "attention_mask": s}
        n = cfg.num_nodes
        shapes = {"x": [[b, cfg.seq_len, n] for b in self.forecast_batch]}
        if cfg.uses_llm:
            shapes["prompt_emb"] = [[b, n, cfg.d_llm] for b in self.forecast_batch]
        return shapes


def default_profile(manifest: Manifest) -> EngineProfile:
    mp = manifest.llm.max_positions if manifest.llm else 1024
    return EngineProfile(llm_seq=(1, min(256, mp), min(1024, mp)))


def _dtype_name(trt, dt) -> str:
    try:
        return np.dtype(trt.nptype(dt)).name
    except Exception:  # bf16/fp8 have no numpy type
        return dt.name.lower()


def parse_network(flavour: Flavour, onnx_path: str):
    """Parse an ONNX graph into a strongly typed network: (builder, network, parser, logger, report).

    The report says what a build will take and give (I/O names, dtypes, shapes with -1 for
    dynamic dims) and which precisions the layers compute in, without a GPU.
    """
    trt = flavour.trt
    logger = flavour.logger()
    builder = trt.Builder(logger)
    network = flavour.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{flavour.label} could not parse {os.path.basename(onnx_path)}: {errors}")
    io = {}
    for kind, count, get in (("inputs", network.num_inputs, network.get_input),
                             ("outputs", network.num_outputs, network.get_output)):
        io[kind] = {}
        for i in range(count):
            t = get(i)
            io[kind][t.name] = {"dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)}
    by_kind: dict[str, dict[str, int]] = {"all": {}, "matmul": {}, "normalization": {}, "softmax": {}}
    kinds = {trt.LayerType.MATRIX_MULTIPLY: "matmul", trt.LayerType.NORMALIZATION: "normalization",
             trt.LayerType.SOFTMAX: "softmax"}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            dt = _dtype_name(trt, layer.get_output(j).dtype)
            for k in ("all", kinds.get(layer.type)):
                if k:
                    by_kind[k][dt] = by_kind[k].get(dt, 0) + 1
    report = {**io, "layers": network.num_layers, "parser_errors": parser.num_errors,
              "layer_output_dtypes": by_kind}
    return builder, network, parser, logger, report


def build_plan(flavour: Flavour, onnx_path: str, shapes: dict[str, list[list[int]]], targets: list[str],
               portable: bool, workspace_gib: float | None = None) -> tuple[bytes, dict, list[str], float]:
    """One strongly typed engine with one optimization profile: (plan, network report, warnings, seconds)."""
    t0 = time.perf_counter()
    builder, network, _parser, logger, report = parse_network(flavour, onnx_path)
    names = set(report["inputs"])
    if names != set(shapes):
        raise BundleError(f"{os.path.basename(onnx_path)} has inputs {sorted(names)}; the profile names "
                          f"{sorted(shapes)}")
    config = builder.create_builder_config()
    if workspace_gib:  # default: TensorRT's own (the device's memory), which large profiles need
        config.set_memory_pool_limit(flavour.trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    state = flavour.configure(config, targets, portable)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        declared = report["inputs"][name]["shape"]
        for d, (want, got) in enumerate(zip(declared, mx)):
            if want != -1 and want != got:
                raise BundleError(f"profile for {name!r} dim {d} is {got}, the graph fixes it at {want}")
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.messages[-3:]) or "no message"
        raise BundleError(f"{flavour.label} failed to build an engine from {os.path.basename(onnx_path)}: {detail}")
    flavour.after_build(config, state)
    return bytes(memoryview(plan)), report, list(logger.messages), time.perf_counter() - t0


def target_description(targets: list[str], portable: bool) -> str:
    cc = "/".join(f"{c[:-1]}.{c[-1]}" for c in targets)
    return f"portable {cc}" if portable else f"sm{'/sm'.join(targets)}"


def engine_file_name(graph: str, precision: str, flavour: Flavour, targets: list[str], onnx_sha: str,
                     shapes: dict) -> str:
    """{graph}.{precision}.sm{targets}.{flavour+version}.{onnx sha}.{profile hash}.plan"""
    prof = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:8]
    return f"{graph}.{precision}.sm{'-'.join(targets)}.{flavour.tag}.{onnx_sha[:12]}.p{prof}.plan"


def _build_flavour(choice: str, gpu_cc: str | None) -> Flavour:
    """auto: standard TensorRT where it is importable and a GPU is here to build on, else RTX."""
    if choice != "auto":
        return load_flavour(choice)
    reasons = []
    for c in FLAVOURS:
        try:
            fl = load_flavour(c)
        except BackendUnavailable as exc:
            reasons.append(str(exc))
            continue
        if fl.is_rtx or gpu_cc is not None:
            return fl
        reasons.append(f"{fl.label} is installed but needs a CUDA GPU to build on")
    raise BackendUnavailable("no TensorRT flavour can build engines here: " + "; ".join(reasons))


@contextlib.contextmanager
def bundle_lock(bundle_dir: str) -> Iterator[None]:
    """One engine writer per bundle at a time (other processes wait)."""
    engines_dir = os.path.join(bundle_dir, "engines")
    os.makedirs(engines_dir, exist_ok=True)
    with open(os.path.join(engines_dir, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gpu_cc() -> str | None:
    if _cuda.device_count() == 0:
        return None
    return _cuda.CudaRuntime().capability()


def build_engines(bundle_dir: str, precisions: tuple[str, ...] = ("fp16",), flavour: str = "auto",
                  profile: EngineProfile | None = None, targets: list[str] | None = None,
                  graphs: tuple[str, ...] | None = None, workspace_gib: float | None = None) -> list[Engine]:
    """Build one engine per (graph, precision) from the bundle's ONNX graphs; add them to the bundle.

    Returns the new manifest entries. An entry for the same graph, precision, flavour, version
    and target is replaced (its old plan removed); engines for other targets stay.
    """
    bundle_dir = os.path.abspath(bundle_dir)
    manifest = read_manifest(bundle_dir)  # verifies every file first
    cfg = manifest.model_config
    graphs = tuple(g for g in GRAPHS if g in manifest.graphs) if graphs is None else graphs
    absent = [g for g in graphs if g not in manifest.graphs]
    if absent:
        raise BundleError(f"the bundle has no {absent[0]} graph (its model, {cfg.model}, has {sorted(manifest.graphs)})")
    profile = profile or default_profile(manifest)
    profile.check(manifest.llm.max_positions if manifest.llm else profile.llm_seq[2])
    for graph in graphs:
        files = manifest.graphs[graph].files
        for p in precisions:
            refused = manifest.graphs[graph].info.get(f"{p}_rejected")
            if p not in files and refused:
                raise BundleError(f"the {p} {graph} graph was refused at export: {refused.get('gate_figure', 0):.3g} "
                                  f"over its gate {refused.get('gate')} on CPU, so no engine is built from it; "
                                  f"build {graph} with --precision fp32")
            if p not in files:
                raise BundleError(f"the bundle has no {p} graph for {graph} (it has {sorted(files)}); precisions "
                                  "come from the ONNX graphs export wrote")
    gpu_cc = _gpu_cc()
    fl = _build_flavour(flavour, gpu_cc)
    built_targets, portable = fl.build_targets(targets, gpu_cc)
    engines_dir = os.path.join(bundle_dir, "engines")
    os.makedirs(engines_dir, exist_ok=True)
    with bundle_lock(bundle_dir):
        manifest = read_manifest(bundle_dir, verify=False)  # re-read under the lock: another builder may have written
        remove_dead_temporaries(engines_dir, ".build-", "an unfinished engine build")
        tmp = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=engines_dir)
        new: list[Engine] = []
        try:
            for p in precisions:
                for graph in graphs:
                    onnx_file = manifest.graphs[graph].files[p].file
                    onnx_sha = manifest.sha256(onnx_file)
                    shapes = profile.shapes(graph, cfg)
                    name = engine_file_name(graph, p, fl, built_targets, onnx_sha, shapes)
                    log.info("building %s with %s (%s)", name, fl.label, target_description(built_targets, portable))
                    plan, report, warnings, seconds = build_plan(fl, os.path.join(bundle_dir, onnx_file), shapes,
                                                                 built_targets, portable, workspace_gib)
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(plan)
                    new.append(Engine(
                        file=f"engines/{name}", graph=graph, precision=p, flavour=fl.name, version=fl.version,
                        compute_capabilities=built_targets, portable=portable,
                        target=target_description(built_targets, portable), onnx_file=onnx_file,
                        onnx_sha256=onnx_sha, profile=shapes, sha256=hashlib.sha256(plan).hexdigest(),
                        bytes=len(plan), network=report,
                        info={"build_seconds": round(seconds, 2),
                              "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "warnings": warnings}))
                    log.info("built %s: %.1f MB in %.1f s", name, len(plan) / 1e6, seconds)
            for e in new:
                e.info["parity_vs_ort_fp32"] = _engine_parity(bundle_dir, tmp, fl, e, gpu_cc)
            _commit(bundle_dir, manifest, tmp, new)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return new


def _same_slot(a: Engine, b: Engine) -> bool:
    keys = ("graph", "precision", "flavour", "version", "compute_capabilities")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _commit(bundle_dir: str, manifest: Manifest, tmp: str, new: list[Engine]) -> None:
    """Move the new plans in, then rewrite the manifest atomically; undo the moves on failure."""
    old = manifest.engines
    kept = [e for e in old if not any(_same_slot(e, n) for n in new)]
    replaced = {e.file for e in old} - {e.file for e in kept} - {n.file for n in new}
    moved = []
    try:
        for e in new:
            dst = os.path.join(bundle_dir, e.file)
            if os.path.exists(dst):  # identical name = identical inputs; keep the manifest's record consistent
                os.unlink(dst)
            os.replace(os.path.join(tmp, os.path.basename(e.file)), dst)
            moved.append(dst)
        files = {k: v for k, v in manifest.files.items() if k not in replaced}
        for e in new:
            files[e.file] = file_record(bundle_dir, e.file)
            if files[e.file].sha256 != e.sha256:
                raise BundleError(f"{e.file} changed while being added to the bundle")
        write_manifest(bundle_dir, dataclasses.replace(manifest, engines=kept + new, files=files))
    except BaseException:
        for dst in moved:
            if os.path.exists(dst):
                os.unlink(dst)
        raise
    for f in replaced:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(bundle_dir, f))


def _engine_parity(bundle_dir: str, tmp: str, fl: Flavour, entry: Engine, gpu_cc: str | None) -> dict:
    """Engine vs the ONNX Runtime fp32 outputs stored at export, on this GPU; or why not measured."""
    if gpu_cc is None:
        return {"not_measured": "no CUDA GPU on the build machine (engines were compiled, not executed)"}
    if gpu_cc not in entry.compute_capabilities:
        return {"not_measured": f"this GPU (sm{gpu_cc}) is not a target of the engine"}
    path = os.path.join(bundle_dir, PARITY_FILE)
    if not os.path.exists(path):
        return {"not_measured": f"the bundle has no {PARITY_FILE}"}
    from ..engines.trt_runner import EngineIO, EngineRunner

    ref = np.load(path, allow_pickle=False)
    g = entry.graph
    if g == "llm":
        feeds, want = {"input_ids": ref["llm_input_ids"], "attention_mask": ref["llm_attention_mask"]}, ref["llm_out"]
    else:
        feeds = {"x": ref["fc_x"], **({"prompt_emb": ref["fc_prompt_emb"]} if "fc_prompt_emb" in ref else {})}
        want = ref["fc_out"]
    try:
        EngineIO.from_manifest(entry).check(feeds)
    except ValueError as exc:
        return {"not_measured": f"the stored parity inputs do not fit the profile: {exc}"}
    with EngineRunner(fl, os.path.join(tmp, os.path.basename(entry.file))) as runner:
        free, total = runner.cuda.mem_info()
        need = runner.engine.device_memory_size_v2
        if need > total:
            raise BundleError(f"{entry.file}: the profile needs {need / 2**30:.1f} GiB of activation memory, more "
                              f"than this GPU's {total / 2**30:.1f} GiB; build with a smaller --max-batch/--max-seq")
        got = next(iter(runner(feeds).values()))
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = float(np.abs(want).max()) or 1.0
    return {"max_abs": float(diff.max()), "max_rel_to_max": float(diff.max() / scale), "gpu": f"sm{gpu_cc}",
            "device_memory_bytes": int(need)}
