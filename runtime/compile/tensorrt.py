"""Build TensorRT engines from the ONNX graphs already in a bundle and add them to it (torch-free).

Used by ``timecma-engines build`` on the serving box and by ``timecma-export --tensorrt``.
Engines are written to a temporary folder inside the bundle, moved into ``engines/`` and the
manifest rewritten atomically, under a lock, next to the engines other GPUs already have;
any failure leaves the bundle as it was.

Where a CUDA GPU the engine targets is visible, each new engine is gated like every other
precision variant (``runtime.compile.openvino``, export's fp16 and int8 checks): loaded with the
serving runner, run on the bundle's validation windows (``parity/gate.npz``) at batch sizes
above 1 and at batch 1, in chunks that stay within its profile, and judged against ONNX
Runtime fp32 (``runtime.compile.gate.GateReference``) by ``timecma.core.accuracy.judge_variant``:
the worst prompt's embedding (relative L2) and the largest forecast change in normalised units.
An engine over the gate is refused: it is not added to the bundle; so is one the gate cannot run
on that GPU (a bundle without ``parity/gate.npz``: re-export it). Built where no such GPU is
visible (TensorRT-RTX on a CPU machine), an engine is added
with ``not_measured`` saying why, and engine selection prefers engines that passed on the GPU.
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

from timecma.core.accuracy import judge_variant
from timecma.core.errors import BackendUnavailable, BundleError, InputError
from timecma.core.files import check_replaceable
from timecma.core.leftovers import remove_dead_temporaries
from timecma.core.config import ModelConfig
from timecma.core.manifest import GRAPHS, Engine, Manifest, file_record, read_manifest, write_manifest

from ..backends.base import forecaster_feeds
from ..backends.tensorrt import PARITY_KEY
from ..engines import cuda as _cuda
from ..engines.trt_flavour import FLAVOURS, Flavour, load_flavour
from .gate import GATE_FILE, REEXPORT, GateReference

log = logging.getLogger(__name__)

ENGINE_GATE_WINDOWS = 8  # validation windows an engine is judged on, spread over the bundle's gate windows
ENGINE_GATE_PROMPTS = 512  # ... as many as keep their LLM prompts to about this many (two windows at least)
DEFAULT_MAX_BATCH = 64  # prompts per LLM call, windows per forecaster call
DEFAULT_MAX_SEQ = 1024  # tokens per prompt (or the longest validation prompt), capped at the LLM's positions
FALLBACK_SEQ_OPT = 256  # the tokens opt point where the bundle has no validation prompts to take it from


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
        if cfg is None:
            raise ValueError(f"the {graph} graph's shapes come from the model config, and none was given")
        n = cfg.num_nodes
        shapes = {"x": [[b, cfg.seq_len, n] for b in self.forecast_batch]}
        if cfg.uses_llm:
            shapes["prompt_emb"] = [[b, n, cfg.d_llm] for b in self.forecast_batch]
        return shapes


def prompt_lengths(bundle_dir: str | None, n: int) -> np.ndarray | None:
    """Token counts of the bundle's validation prompts as [windows, N] (``parity/gate.npz``); None where
    the bundle has none (no LLM branch, exported by an older timecma, or no folder given)."""
    if not bundle_dir:
        return None
    path = os.path.join(bundle_dir, GATE_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path) as g:
        if "llm_attention_mask" not in g:
            return None
        counts = g["llm_attention_mask"].sum(axis=1)
    return counts.reshape(-1, n) if counts.size and counts.size % n == 0 else None


def default_profile(manifest: Manifest, bundle_dir: str | None = None) -> EngineProfile:
    """The optimization profile serving runs best in: opt is a window's N prompts per LLM call (up to the
    maximum), at the length its longest prompt pads them to (the median over the bundle's validation
    windows, ``bundle_dir``'s ``parity/gate.npz``), and one window per forecaster call (batch-1 serving).
    Maxima: 64 prompts or windows per call, 1024 tokens or the longest validation prompt, capped at the
    LLM's positions. Without validation prompts the tokens opt point stays at 256."""
    mp = manifest.llm.max_positions if manifest.llm else DEFAULT_MAX_SEQ
    n = manifest.model_config.num_nodes
    lengths = prompt_lengths(bundle_dir, n) if manifest.llm else None
    opt_seq = int(np.median(lengths.max(axis=1))) if lengths is not None else FALLBACK_SEQ_OPT
    longest = int(lengths.max()) if lengths is not None else 0
    max_seq = min(mp, max(DEFAULT_MAX_SEQ, longest))
    return EngineProfile(llm_batch=(1, min(n, DEFAULT_MAX_BATCH), DEFAULT_MAX_BATCH),
                         llm_seq=(1, max(1, min(opt_seq, max_seq)), max_seq))


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
    io: dict[str, dict[str, dict]] = {}
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
    return _cuda.current_capability()


class EngineBuild(list[Engine]):
    """The engines a build added to the bundle (a list of manifest entries), and ``refused``: those built
    but refused by the gate on this GPU, with their figures, and not added."""

    def __init__(self, committed: list[Engine], refused: list[Engine]):
        super().__init__(committed)
        self.refused = refused


def build_engines(bundle_dir: str, precisions: tuple[str, ...] = ("fp16",), flavour: str = "auto",
                  profile: EngineProfile | None = None, targets: list[str] | None = None,
                  graphs: tuple[str, ...] | None = None, workspace_gib: float | None = None) -> EngineBuild:
    """Build one engine per (graph, precision) from the bundle's ONNX graphs; add those the gate does not
    refuse to the bundle.

    Returns the new manifest entries (``EngineBuild.refused``: the engines refused on this GPU). An entry
    for the same graph, precision, flavour, version and target is replaced (its old plan removed once the
    new manifest is written); engines for other targets stay.
    """
    bundle_dir = os.path.abspath(bundle_dir)
    manifest = read_manifest(bundle_dir)  # verifies every file first
    cfg = manifest.model_config
    graphs = tuple(g for g in GRAPHS if g in manifest.graphs) if graphs is None else graphs
    absent = [g for g in graphs if g not in manifest.graphs]
    if absent:
        raise BundleError(f"the bundle has no {absent[0]} graph (its model, {cfg.model}, has {sorted(manifest.graphs)})")
    profile = profile or default_profile(manifest, bundle_dir)
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
                    check_plan_replaceable(bundle_dir, manifest, f"engines/{name}")  # before minutes of building
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
            gate = _GateOnce(bundle_dir, manifest, profile)
            for e in new:
                e.info[PARITY_KEY] = _engine_parity(gate, tmp, fl, e, gpu_cc)
            committed = [e for e in new if e.info[PARITY_KEY].get("accepted", True)]  # not measured: added as such
            refused = [e for e in new if e not in committed]
            for e in refused:
                log.warning("%s refused on sm%s: %s; it is not added to the bundle", os.path.basename(e.file), gpu_cc,
                            parity_summary(e.info[PARITY_KEY]))
            if committed:
                _commit(bundle_dir, manifest, tmp, committed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return EngineBuild(committed, refused)


def _same_slot(a: Engine, b: Engine) -> bool:
    keys = ("graph", "precision", "flavour", "version", "compute_capabilities")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _keep_aside(path: str, dest: str) -> None:
    """A second name for ``path``'s file (a hard link; a copy where links are not supported), so that
    replacing ``path`` leaves its old content recoverable."""
    try:
        os.link(path, dest)
    except OSError:
        shutil.copy2(path, dest)


ENGINE_PLAN = "an engine plan that this bundle's manifest lists (one timecma-engines build made)"


def is_plan_name(rel: str) -> bool:
    """A bundle path where engine builds put plans: ``engines/NAME.plan``."""
    folder, name = os.path.split(rel)
    return folder == "engines" and name.endswith(".plan") and not name.startswith(".")


def check_plan_replaceable(bundle_dir: str, manifest: Manifest, rel: str) -> None:
    """The one rule for what a build may write over (``timecma.core.files.check_replaceable``): nothing, an
    empty file, or a plan the manifest lists as an engine. A file of anyone else's under that name is
    refused (InputError naming it) and left alone."""
    listed = {e.file for e in manifest.engines}

    def ours(path: str) -> bool:
        return rel in listed and is_plan_name(rel) and os.path.isfile(path) and not os.path.islink(path)

    check_replaceable(os.path.join(bundle_dir, rel), ours, ENGINE_PLAN)


def _commit(bundle_dir: str, manifest: Manifest, tmp: str, new: list[Engine]) -> None:
    """Move the new plans in, then rewrite the manifest atomically; on failure put every name back.

    A plan is moved in with ``os.replace``, so its name always holds a whole plan, the old one or the new
    one. Where the name is taken (the same graph, precision, flavour, targets, ONNX graph and profile:
    a rebuild) the file there is kept aside in ``tmp`` first: a failed commit restores it, and removes
    only the files this attempt created. A name held by anything but a plan the manifest lists is refused
    before any file moves. Plans of replaced entries under other names are removed only after the new
    manifest is written, and only engine plans (``engines/*.plan``): a replaced entry naming any other
    file leaves that file and its record alone."""
    for e in new:
        check_plan_replaceable(bundle_dir, manifest, e.file)  # again: the build took minutes
    old = manifest.engines
    kept = [e for e in old if not any(_same_slot(e, n) for n in new)]
    replaced = {f for f in {e.file for e in old} - {e.file for e in kept} - {n.file for n in new} if is_plan_name(f)}
    created: list[str] = []
    displaced: list[tuple[str, str]] = []  # (name in the bundle, its previous file kept aside)
    try:
        for e in new:
            dst = os.path.join(bundle_dir, e.file)
            src = os.path.join(tmp, os.path.basename(e.file))
            if os.path.lexists(dst):
                aside = src + ".previous"
                _keep_aside(dst, aside)
                displaced.append((dst, aside))
            else:
                created.append(dst)
            os.replace(src, dst)
        files = {k: v for k, v in manifest.files.items() if k not in replaced}
        for e in new:
            files[e.file] = file_record(bundle_dir, e.file)
            if files[e.file].sha256 != e.sha256:
                raise BundleError(f"{e.file} changed while being added to the bundle")
        write_manifest(bundle_dir, dataclasses.replace(manifest, engines=kept + new, files=files))
    except BaseException:
        for dst in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
        for dst, aside in displaced:
            os.replace(aside, dst)
        raise
    for f in replaced:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(bundle_dir, f))


# --- the gate ------------------------------------------------------------------------------------------------------
def parity_summary(p: dict) -> str:
    """An engine's gate record in one line (``timecma-engines`` output, logs)."""
    if not p:
        return "not measured"
    if "not_measured" in p:
        return f"not measured: {p['not_measured']}"
    if "accepted" not in p:  # a record of an older timecma: an error figure, no verdict
        return f"not gated (max abs {p.get('max_abs', float('nan')):.2e} vs ONNX Runtime fp32, older record)"
    if "refused" in p:  # refused without figures: the gate could not run
        return f"REFUSED on {p.get('gpu')}: {p['refused']}"
    emb = p.get("embedding")
    figures = (f"worst prompt embedding {emb['prompt_rel_l2_max']:.1e} (gate {emb['gate']}), " if emb else "") + (
        f"forecast moved {p['forecast_max_abs_change_normalized']:.1e} (gate {p['forecast_gate']}), "
        f"validation MSE {100 * p['mse_rel_change']:+.2f}% (gate {100 * p['mse_gate']:.0f}%)")
    where = f" on {p['gpu']}, {p.get('windows')} windows at batch {'/'.join(map(str, p.get('batch_sizes', [])))}"
    return f"{'accepted' if p['accepted'] else 'REFUSED'} ({figures}{where} vs ONNX Runtime fp32)"


def _fit(rows: list[np.ndarray], lo: int) -> tuple[list[np.ndarray], int]:
    """Arrays of one call grown to the profile's minimum batch ``lo`` by repeating their last row;
    returns them and the real row count (the outputs past it are dropped)."""
    k = len(rows[0])
    if k >= lo:
        return rows, k
    return [np.concatenate([r, np.repeat(r[-1:], lo - k, axis=0)]) for r in rows], k


def llm_in_profile(run, ids: np.ndarray, mask: np.ndarray, batch: tuple[int, int, int], seq: tuple[int, int, int],
                   pad_id: int) -> tuple[np.ndarray, list[int]]:
    """Embeddings [P, d] of right-padded prompts, computed by ``run(input_ids, attention_mask)`` in calls that
    stay within an engine's profile: at most ``batch`` max prompts per call (chunks, when N is larger), each
    call's columns cut to its longest prompt (at least ``seq`` min). Returns them and the batch of each call.
    Every prompt must fit ``seq`` max (the caller keeps only windows whose prompts do)."""
    lo_b, _, hi_b = batch
    lo_s, _, hi_s = seq
    out, sizes = [], []
    for s in range(0, len(ids), hi_b):
        a, m = ids[s:s + hi_b], mask[s:s + hi_b]
        width = max(int(m.sum(axis=1).max()), lo_s)
        if width > hi_s:
            raise InputError(f"a prompt of {width} tokens exceeds the profile's {hi_s}")
        if width > a.shape[1]:  # the profile's minimum is longer than these prompts: more right padding
            extra = width - a.shape[1]
            a = np.pad(a, ((0, 0), (0, extra)), constant_values=pad_id)
            m = np.pad(m, ((0, 0), (0, extra)))
        (a, m), k = _fit([np.ascontiguousarray(a[:, :width]), np.ascontiguousarray(m[:, :width])], lo_b)
        out.append(np.asarray(run(a, m))[:k])
        sizes.append(len(a))
    return np.concatenate(out).astype(np.float32), sizes


def forecaster_in_profile(run, x: np.ndarray, emb: np.ndarray | None, batch: tuple[int, int, int]
                          ) -> tuple[np.ndarray, list[int]]:
    """Forecasts [W, pred_len, N] from ``run(x, prompt_emb)`` in calls of at most ``batch`` max windows
    (at least its min). Returns them and the batch of each call."""
    lo, _, hi = batch
    out, sizes = [], []
    for s in range(0, len(x), hi):
        rows = [x[s:s + hi]] + ([] if emb is None else [emb[s:s + hi]])
        rows, k = _fit(rows, lo)
        out.append(np.asarray(run(rows[0], rows[1] if emb is not None else None))[:k])
        sizes.append(len(rows[0]))
    return np.concatenate(out), sizes


class EngineGate(GateReference):
    """The gate reference (``runtime.compile.gate.GateReference``) an engine is judged against: up to
    ``windows`` validation windows spread over the stored ones, fewer where N is large (their prompts kept to
    about ``prompts``, two windows at least), and only windows whose prompts fit ``max_seq`` tokens (the
    engine's profile); and how an engine runs on them within its profile (``judge``)."""

    def __init__(self, bundle_dir: str, manifest: Manifest, max_seq: int | None = None,
                 windows: int = ENGINE_GATE_WINDOWS, prompts: int = ENGINE_GATE_PROMPTS, threads: int | None = None):
        super().__init__(bundle_dir, manifest, threads, max_seq=max_seq, windows=windows, prompts=prompts)

    def judge(self, graph: str, run, profile: dict[str, list[list[int]]]) -> dict:
        """Run a candidate within its profile (``Engine.profile``) and judge it: the LLM by its embeddings
        and the fp32 forecaster's forecast from them; the forecaster by its forecast from the fp32
        embeddings. Windows (or prompts) go in calls as large as the profile allows and, where its minimum
        is 1, at batch 1 as well: both are judged."""
        if graph == "llm":
            shapes = profile["input_ids"]
            batch = (shapes[0][0], shapes[1][0], shapes[2][0])
            seq = (shapes[0][1], shapes[1][1], shapes[2][1])
            ids, mask = self.prompts()
            assert self.emb_ref is not None, "the fp32 embeddings of the prompts, made with them in __init__"
            emb, sizes = llm_in_profile(run, ids, mask, batch, seq, self.pad_id)
            prompt_ref = self.emb_ref.reshape(len(emb), -1)  # one row per prompt
            emb_all, ref_all = emb, prompt_ref
            if batch[0] <= 1 and sizes and max(sizes) > 1:  # one prompt alone, as a single store miss is sent
                one, more = llm_in_profile(run, ids[:1], mask[:1], (1, 1, 1), seq, self.pad_id)
                emb_all, ref_all = np.concatenate([emb, one]), np.concatenate([prompt_ref, prompt_ref[:1]])
                sizes += more
            v = judge_variant(self.forecast_fp32(emb), self.y_ref, self.truth, self.mean, self.std, emb_all, ref_all)
        else:
            shapes = profile["x"]
            batch = (shapes[0][0], shapes[1][0], shapes[2][0])
            emb_ref = self.emb_ref  # [W, N, d]
            y, sizes = forecaster_in_profile(run, self.x, emb_ref, batch)
            ys, refs, truths = [y], [self.y_ref], [self.truth]
            if batch[0] <= 1 and max(sizes) > 1:  # batch-1 serving, every window
                y1, more = forecaster_in_profile(run, self.x, emb_ref, (1, 1, 1))
                ys.append(y1)
                refs.append(self.y_ref)
                truths.append(self.truth)
                sizes += more
            v = judge_variant(np.concatenate(ys), np.concatenate(refs), np.concatenate(truths), self.mean, self.std)
        return {**v, "windows": int(len(self.x)), "batch_sizes": sorted({int(s) for s in sizes})}


class _GateOnce:
    """The gate's reference, computed the first time an engine needs it (never on a machine without a GPU)."""

    def __init__(self, bundle_dir: str, manifest: Manifest, profile: EngineProfile):
        self.args = (bundle_dir, manifest, profile.llm_seq[2])
        self._gate: EngineGate | None = None

    def get(self) -> EngineGate:
        if self._gate is None:
            self._gate = EngineGate(*self.args)
        return self._gate


@contextlib.contextmanager
def open_engine(fl: Flavour, plan_path: str, graph: str) -> Iterator[tuple]:
    """An engine loaded on this GPU with the serving runner: (``run`` taking the graph's inputs as
    ``llm_in_profile`` / ``forecaster_in_profile`` pass them, bytes of activation memory it needs)."""
    from ..engines.trt_runner import EngineRunner

    with EngineRunner(fl, plan_path) as runner:
        _free, total = runner.cuda.mem_info()
        need = int(runner.engine.device_memory_size_v2)
        if need > total:
            raise BundleError(f"{os.path.basename(plan_path)}: the profile needs {need / 2**30:.1f} GiB of activation "
                              f"memory, more than this GPU's {total / 2**30:.1f} GiB; build with a smaller "
                              "--max-batch/--max-seq")
        if graph == "llm":
            def run(a, m):
                return runner({"input_ids": a, "attention_mask": m})["last_hidden"]
        else:
            def run(x, e):
                return runner(forecaster_feeds(x, e))["y"]
        yield run, need


def _engine_parity(gate: _GateOnce, tmp: str, fl: Flavour, entry: Engine, gpu_cc: str | None) -> dict:
    """The gate's verdict on an engine, run on this GPU against ONNX Runtime fp32; or why not measured (no GPU
    here, or not one it targets). On a GPU it targets, an engine the gate cannot run on (the bundle has no
    ``parity/gate.npz``, or no prompts in it for an LLM engine) is refused, not added ungated."""
    if gpu_cc is None:
        return {"not_measured": "no CUDA GPU on the build machine (engines were compiled, not executed)"}
    if gpu_cc not in entry.compute_capabilities:
        return {"not_measured": f"this GPU (sm{gpu_cc}) is not a target of the engine"}
    # a GPU the engine targets is here: an engine that cannot be gated on it is refused, never added ungated
    try:
        ref = gate.get()
    except BundleError as exc:
        return _ungated(str(exc), gpu_cc)
    if entry.graph == "llm" and ref.ids is None:
        return _ungated(f"the bundle's validation windows have no LLM prompts: {REEXPORT}", gpu_cc)
    with open_engine(fl, os.path.join(tmp, os.path.basename(entry.file)), entry.graph) as (run, need):
        verdict = ref.judge(entry.graph, run, entry.profile)
    return {**verdict, "gpu": f"sm{gpu_cc}", "device_memory_bytes": need}


def _ungated(why: str, gpu_cc: str) -> dict:
    """The record of an engine refused because the gate could not run on this GPU (no figures)."""
    return {"accepted": False, "refused": f"the gate cannot run: {why}", "gpu": f"sm{gpu_cc}"}
