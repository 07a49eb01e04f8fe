"""The bundle manifest (docs/design.md §8): one typed, versioned schema, written by export and by
``timecma-engines``, read by the runtime and the benchmarks. JSON on disk, no pickles.

What code relies on is a typed field; what is recorded for people (parity figures,
timings, build warnings) is kept verbatim in each part's ``info``. ``Manifest.from_dict``
validates on load and refuses a malformed or other-version manifest with a message that
names the key. Every file of a bundle is listed under ``files`` with its sha256 and size;
loading verifies them once per file content (cached by path, size, mtime, inode and change time).
Every path a manifest names is relative to the bundle and stays inside it: an absolute path or a
``..`` is refused, and so is a listed file that resolves (through a symlink) outside the bundle.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .config import ModelConfig
from .errors import BundleError
from .files import atomic_write_bytes, file_sha256, user_cache_dir
from .scaling import KINDS

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
MANIFEST_NAME = "manifest.json"
PARITY_FILE = "parity/inputs.npz"  # real inputs and ORT fp32 outputs: engine parity, serving warm-up
GRAPHS = ("llm", "forecaster")
BUNDLE = f"a timecma bundle (a folder whose {MANIFEST_NAME} has a manifest_version)"


def is_bundle(path: str | os.PathLike) -> bool:
    """A folder that timecma-export wrote: its manifest is a JSON object with a version and a file list
    (read without validating, so a bundle of another version is recognised too)."""
    try:
        with open(os.path.join(path, MANIFEST_NAME)) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "manifest_version" in raw and isinstance(raw.get("files"), dict)


def bundle_relpath(rel: Any, where: str) -> str:
    """A path named by the manifest, checked to stay inside the bundle: relative, no ``..``, no drive."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"manifest: {where} should be a non-empty relative path, not {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if (os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or ".." in parts
            or "\0" in rel):
        raise BundleError(f"manifest: {where} names {rel!r}, a path outside the bundle (absolute or with '..'); "
                          "a bundle's files are relative to its folder. Re-export the bundle with `timecma-export`")
    return rel


def _need(d: Any, key: str, where: str, kind: type | tuple = object) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"manifest: {where} lacks {key!r}")
    if not isinstance(d[key], kind):
        raise BundleError(f"manifest: {where}.{key} should be {getattr(kind, '__name__', kind)}, "
                          f"not {type(d[key]).__name__}")
    return d[key]


def _rest(d: dict, cls) -> dict:
    """The keys of ``d`` that are not typed fields of ``cls`` (kept verbatim in ``info``)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k not in names}


@dataclass
class FileRecord:
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "FileRecord":
        sha = _need(d, "sha256", where, str)
        if len(sha) != 64:
            raise BundleError(f"manifest: {where}.sha256 is not a sha256")
        return cls(sha, _need(d, "bytes", where, int))

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass
class TensorDesc:
    shape: list  # ints, and names for dynamic dims ("B", "S")
    dtype: str
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TensorDesc":
        return cls(_need(d, "shape", where, list), _need(d, "dtype", where, str), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"shape": self.shape, "dtype": self.dtype, **self.info}


@dataclass
class GraphFile:
    """One ONNX file of a graph (a precision or CPU variant) and what was measured on it."""

    file: str
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "GraphFile":
        return cls(bundle_relpath(_need(d, "file", where, str), f"{where}.file"), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"file": self.file, **self.info}


@dataclass
class SplitGraphs:
    """The batch-1 forecaster in two graphs: the prompt encoder (embeddings -> encoded prompts, kept per window by
    serving) and the head (window + encoded prompts -> forecast)."""

    prompt_encoder: GraphFile
    head: GraphFile
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "SplitGraphs":
        return cls(GraphFile.from_dict(_need(d, "prompt_encoder", where, dict), f"{where}.prompt_encoder"),
                   GraphFile.from_dict(_need(d, "head", where, dict), f"{where}.head"), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"prompt_encoder": self.prompt_encoder.to_dict(), "head": self.head.to_dict(), **self.info}


@dataclass
class Graph:
    inputs: dict[str, TensorDesc]
    outputs: dict[str, TensorDesc]
    files: dict[str, GraphFile]  # variant (fp32, fp16, int8, ...) -> file
    cpu_preferred: str = "fp32"
    cpu_batch1: GraphFile | None = None  # forecaster: the graph (and threads) batch-1 CPU requests use
    cpu_split: SplitGraphs | None = None  # forecaster: prompt encoder + head, for batch-1 CPU requests with a store
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Graph":
        files = {k: GraphFile.from_dict(v, f"{where}.files.{k}") for k, v in _need(d, "files", where, dict).items()}
        if "fp32" not in files:
            raise BundleError(f"manifest: {where} has no fp32 graph")
        pref = d.get("cpu_preferred", "fp32")
        if pref not in files:
            raise BundleError(f"manifest: {where}.cpu_preferred {pref!r} is not among its files {sorted(files)}")
        b1, split = d.get("cpu_batch1"), d.get("cpu_split")
        return cls({k: TensorDesc.from_dict(v, f"{where}.inputs.{k}") for k, v in _need(d, "inputs", where, dict).items()},
                   {k: TensorDesc.from_dict(v, f"{where}.outputs.{k}")
                    for k, v in _need(d, "outputs", where, dict).items()},
                   files, pref, GraphFile.from_dict(b1, f"{where}.cpu_batch1") if b1 else None,
                   SplitGraphs.from_dict(split, f"{where}.cpu_split") if split else None, _rest(d, cls))

    def to_dict(self) -> dict:
        out = {"inputs": {k: v.to_dict() for k, v in self.inputs.items()},
               "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
               "files": {k: v.to_dict() for k, v in self.files.items()}, "cpu_preferred": self.cpu_preferred}
        if self.cpu_batch1:
            out["cpu_batch1"] = self.cpu_batch1.to_dict()
        if self.cpu_split:
            out["cpu_split"] = self.cpu_split.to_dict()
        return {**out, **self.info}


@dataclass
class Engine:
    """A TensorRT plan: what it was built from, for which GPUs, with which flavour and profile."""

    file: str
    graph: str
    precision: str
    flavour: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    compute_capabilities: list[str]
    portable: bool
    target: str
    onnx_file: str
    onnx_sha256: str
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    sha256: str
    bytes: int
    network: dict  # the parsed network: I/O names, dtypes, shapes; layer precisions
    info: dict = field(default_factory=dict)  # build time, warnings, parity

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Engine":
        kinds = {"portable": bool, "bytes": int, "compute_capabilities": list, "profile": dict, "network": dict}
        kw = {f.name: _need(d, f.name, where, kinds.get(f.name, str)) for f in fields(cls) if f.name != "info"}
        for key in ("file", "onnx_file"):
            bundle_relpath(kw[key], f"{where}.{key}")
        if kw["graph"] not in GRAPHS:
            raise BundleError(f"manifest: {where}.graph {kw['graph']!r} is not one of {GRAPHS}")
        return cls(**kw, info=_rest(d, cls))

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "info"}, **self.info}


@dataclass
class OVVariant:
    """One OpenVINO precision of one graph, with the accuracy gate's verdict (runtime/compile/openvino.py)."""

    graph: str  # "llm" | "forecaster"
    precision: str  # "f32" | "bf16" | "int8" (or a name the user gave a variant under test)
    file: str | None  # IR in the bundle (int8 weights); None: the fp32 ONNX graph compiled with this precision
    mse_rel_change: float  # |forecast MSE - fp32 forecast MSE| / fp32 forecast MSE on validation windows
    accepted: bool  # MSE change < 1%, every forecast value moved < FORECAST_GATE, for the LLM embeddings < 5%
    ms: float  # median latency here at gate time: the forecaster at batch 1, the LLM on one window's prompts
    info: dict = field(default_factory=dict)  # MSEs, max abs change, CPU and ISA the gate ran on

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "OVVariant":
        g = _need(d, "graph", where, str)
        if g not in GRAPHS:
            raise BundleError(f"manifest: {where}.graph {g!r} is not one of {GRAPHS}")
        f = d.get("file")
        if f is not None and not isinstance(f, str):
            raise BundleError(f"manifest: {where}.file must be a string or null")
        if f is not None:
            bundle_relpath(f, f"{where}.file")
        return cls(g, _need(d, "precision", where, str), f, float(_need(d, "mse_rel_change", where, (int, float))),
                   _need(d, "accepted", where, bool), float(_need(d, "ms", where, (int, float))), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"graph": self.graph, "precision": self.precision, "file": self.file,
                "mse_rel_change": self.mse_rel_change, "accepted": self.accepted, "ms": self.ms, **self.info}

    @property
    def verdict(self) -> str:
        """The gate's decision with the figures it took, in one line (export's and timecma-engines' output)."""
        emb, moved = self.info.get("embedding"), self.info.get("max_abs_change_normalized")
        figures = f"validation MSE {100 * self.mse_rel_change:+.2f}%" + (
            f", worst prompt embedding {emb['prompt_rel_l2_max']:.1e} (gate {emb['gate']})" if emb else "") + (
            f", forecast moved {moved:.1e} (gate {self.info['forecast_gate']})" if "forecast_gate" in self.info else "")
        return f"{'accepted' if self.accepted else 'REFUSED'} ({figures}, {self.ms:.2f} ms)"


@dataclass
class LLMRecord:
    id: str  # hub id, or the folder name of a local directory (no build-machine path)
    namespace: str  # store namespace: digest of weights, tokenizer and wrapper
    d_llm: int
    max_positions: int
    pad_id: int
    info: dict = field(default_factory=dict)  # digests, wrapper version, local_directory, ...

    @classmethod
    def from_dict(cls, d: dict, where: str = "llm") -> "LLMRecord":
        return cls(_need(d, "id", where, str), _need(d, "namespace", where, str), _need(d, "d_llm", where, int),
                   _need(d, "max_positions", where, int), _need(d, "pad_id", where, int), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"id": self.id, "namespace": self.namespace, "d_llm": self.d_llm, "max_positions": self.max_positions,
                "pad_id": self.pad_id, **self.info}


@dataclass
class DataRecord:
    time_col: str
    variables: list[str]
    frequency: str
    scaler_mean: list[float]
    scaler_std: list[float]
    source: dict  # file name, sha256, rows of the training data
    scaler_kind: str = "standard"  # or "log": mean/std are of the logged values, offset per variable
    scaler_offset: list[float] | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "data") -> "DataRecord":
        kind = d.get("scaler_kind", "standard")
        if kind not in KINDS:
            raise BundleError(f"manifest: {where}.scaler_kind {kind!r} is not one of {KINDS}")
        if kind == "log" and not isinstance(d.get("scaler_offset"), list):
            raise BundleError(f"manifest: {where} has a log scaler without scaler_offset")
        return cls(_need(d, "time_col", where, str), _need(d, "variables", where, list),
                   _need(d, "frequency", where, str), _need(d, "scaler_mean", where, list),
                   _need(d, "scaler_std", where, list), _need(d, "source", where, dict), kind,
                   d.get("scaler_offset"), _rest(d, cls))

    def to_dict(self) -> dict:
        return {"time_col": self.time_col, "variables": self.variables, "frequency": self.frequency,
                "scaler_mean": self.scaler_mean, "scaler_std": self.scaler_std, "source": self.source,
                "scaler_kind": self.scaler_kind, "scaler_offset": self.scaler_offset, **self.info}


@dataclass
class Manifest:
    """A bundle. ``llm``, ``prompt``, ``tokenizer`` and ``graphs["llm"]`` are None / absent for
    models without the LLM branch (``timecma-no-llm``, ``dlinear``)."""

    model_config: ModelConfig
    data: DataRecord
    prompt: dict | None  # template name and content hash
    llm: LLMRecord | None
    tokenizer: dict | None  # file and digest
    opset: int
    graphs: dict[str, Graph]
    files: dict[str, FileRecord]
    engines: list[Engine] = field(default_factory=list)
    openvino: list[OVVariant] = field(default_factory=list)  # gated precisions (timecma-engines openvino)
    origin: dict = field(default_factory=dict)  # kind, file name, sha256 of what the bundle came from
    versions: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # created, parity tolerance and windows, metrics, notes, timings

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        version = d.get("manifest_version")
        if version != MANIFEST_VERSION:
            newer = isinstance(version, int) and version > MANIFEST_VERSION
            raise BundleError(f"manifest version {version}; this timecma reads version {MANIFEST_VERSION}"
                              + (" (upgrade timecma)" if newer else
                                 " (re-export the bundle with `timecma-export --force`)"))
        graphs = _need(d, "graphs", "manifest", dict)
        try:
            cfg = ModelConfig(**_need(d, "model_config", "manifest", dict))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"manifest: model_config: {exc}") from exc
        missing = [g for g in (GRAPHS if cfg.uses_llm else ("forecaster",)) if g not in graphs]
        if missing:
            raise BundleError(f"manifest: graphs lacks {missing}")
        prompt = tok = llm = None
        if cfg.uses_llm:
            prompt = _need(d, "prompt", "manifest", dict)
            _need(prompt, "name", "prompt", str), _need(prompt, "hash", "prompt", str)
            tok = _need(d, "tokenizer", "manifest", dict)
            _need(tok, "file", "tokenizer", str), _need(tok, "digest", "tokenizer", str)
            bundle_relpath(tok["file"], "tokenizer.file")
            llm = LLMRecord.from_dict(_need(d, "llm", "manifest", dict))
        known = {f.name for f in fields(cls)} | {"manifest_version"}
        cal = d.get("calibration")
        if isinstance(cal, dict) and "file" in cal:
            bundle_relpath(cal["file"], "calibration.file")
        files = _need(d, "files", "manifest", dict)
        for rel in files:
            bundle_relpath(rel, f"files[{rel!r}]")
        return cls(
            model_config=cfg, data=DataRecord.from_dict(_need(d, "data", "manifest", dict)), prompt=prompt,
            llm=llm, tokenizer=tok,
            opset=_need(d, "opset", "manifest", int),
            graphs={g: Graph.from_dict(v, f"graphs.{g}") for g, v in graphs.items()},
            files={k: FileRecord.from_dict(v, f"files.{k}") for k, v in files.items()},
            engines=[Engine.from_dict(e, f"engines[{i}]") for i, e in enumerate(d.get("engines", []))],
            openvino=[OVVariant.from_dict(v, f"openvino[{i}]") for i, v in enumerate(d.get("openvino", []))],
            origin=d.get("origin", {}), versions=d.get("versions", {}),
            info={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        return {"manifest_version": MANIFEST_VERSION, "model_config": self.model_config.to_dict(),
                "data": self.data.to_dict(), "prompt": self.prompt, "llm": self.llm.to_dict() if self.llm else None,
                "tokenizer": self.tokenizer, "opset": self.opset,
                "graphs": {g: v.to_dict() for g, v in self.graphs.items()},
                "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
                "engines": [e.to_dict() for e in self.engines], "openvino": [v.to_dict() for v in self.openvino],
                "origin": self.origin, "versions": self.versions, **self.info}

    def sha256(self, rel: str) -> str:
        """The recorded sha256 of a bundle file."""
        return self.files[rel].sha256


# --- reading and writing ------------------------------------------------------------------
def file_record(bundle_dir: str | os.PathLike, rel: str) -> FileRecord:
    """The ``files`` entry of one bundle file: sha256 and size. Hashed once per file content: the
    result joins the verification memo, so recording and then verifying a file reads it once."""
    path = os.path.join(bundle_dir, rel)
    key = _stat_key(path)
    digest = _memo.get(key) or file_sha256(path)
    _memo[key] = digest
    return FileRecord(digest, os.path.getsize(path))


def list_bundle_files(bundle_dir: str | os.PathLike[str]) -> dict[str, FileRecord]:
    """sha256 and size of every file under the bundle except the manifest and hidden files."""
    bundle_dir = os.fspath(bundle_dir)
    out = {}
    for root, _, names in os.walk(bundle_dir):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), bundle_dir)
            if rel != MANIFEST_NAME and not name.startswith("."):
                out[rel] = file_record(bundle_dir, rel)
    return dict(sorted(out.items()))


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> str:
    """Write manifest.json atomically (readers see the old or the new one, never half)."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    atomic_write_bytes(path, json.dumps(manifest.to_dict(), indent=2).encode())
    return path


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    """Load and validate a bundle manifest; refuse other versions and (``verify``) corrupt files."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir} is not a timecma bundle: {MANIFEST_NAME} is missing")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    try:
        manifest = Manifest.from_dict(raw)
    except BundleError as exc:
        raise BundleError(f"bundle {bundle_dir}: {exc}") from exc
    root = os.path.realpath(bundle_dir)
    for rel in manifest.files:
        real = os.path.realpath(os.path.join(bundle_dir, rel))
        if os.path.commonpath([root, real]) != root:
            raise BundleError(f"bundle {bundle_dir}: {rel} named in its manifest resolves to {real}, outside the "
                              "bundle (a symlink); a bundle's files live in its folder. Re-export the bundle")
        if not os.path.isfile(os.path.join(bundle_dir, rel)):
            raise BundleError(f"bundle {bundle_dir} lacks {rel} named in its manifest; re-export the bundle"
                              + (" or rebuild its engines with `timecma-engines build`" if rel.startswith("engines/")
                                 else ""))
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


# --- integrity ---------------------------------------------------------------------------
_memo: dict[str, str] = {}


def _cache_path() -> str | None:
    try:
        return os.path.join(user_cache_dir(), "verified-files.json")
    except OSError:
        return None


def _load_cache() -> dict[str, str]:
    path = _cache_path()
    if path is None:  # no cache folder here
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, TypeError, ValueError):
        return {}


def _stat_key(path: str) -> str:
    """What identifies one content of a file without reading it. The change time is in it because no
    edit can put it back (``os.utime`` restores the mtime, and sets the ctime to now)."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def verify_files(bundle_dir: str | os.PathLike, manifest: Manifest) -> int:
    """Check every listed file's size and sha256; return how many were hashed (not cached).

    A file is hashed once per content: the result is cached by path, size, mtime, inode and
    change time in this process and in the user cache directory.
    """
    cache = None
    hashed = 0
    for rel, rec in manifest.files.items():
        path = os.path.join(bundle_dir, rel)
        fix = ("rebuild it with `timecma-engines build`" if rel.startswith("engines/")
               else "re-export the bundle with `timecma-export --force`")
        size = os.path.getsize(path)
        if size != rec.bytes:
            raise BundleError(f"bundle file {rel} is corrupt or truncated: {size} bytes, the manifest records "
                              f"{rec.bytes}; {fix}")
        key = _stat_key(path)
        if _memo.get(key) == rec.sha256:
            continue
        if cache is None:
            cache = _load_cache()
        if cache.get(key) != rec.sha256:
            digest = file_sha256(path)
            hashed += 1
            if digest != rec.sha256:
                raise BundleError(f"bundle file {rel} is corrupt: sha256 {digest[:12]}..., the manifest records "
                                  f"{rec.sha256[:12]}...; {fix}")
            cache[key] = digest
        _memo[key] = rec.sha256
    if hashed and cache is not None and (cache_file := _cache_path()):
        try:
            if len(cache) > 10_000:  # bounded: drop the oldest half
                cache = dict(list(cache.items())[-5_000:])
            atomic_write_bytes(cache_file, json.dumps(cache).encode())
        except OSError as exc:  # a read-only home must not stop serving
            log.debug("could not write the verification cache: %s", exc)
    return hashed
