"""On-disk, content-addressed store of last-token prompt embeddings (torch-free).

Key = sha256(namespace + prompt token ids); the namespace digests the LLM weights, the
tokenizer and the wrapper version, so an embedding is only ever reused for the exact
same model and prompt. Vectors computed at a reduced precision (OpenVINO bf16, TensorRT fp16, int8)
are keyed under the namespace plus a precision tag (``precision_tag``), so one store may hold
several precisions side by side, they never mix, and serving at the precision that filled the
store is a hit; fp32 from any backend is one precision (they agree within 1e-5). A second table maps sha256(namespace + prompt text) to that key:
the namespace fixes the tokenizer, so text -> ids is a pure function under it, and a
store hit can skip tokenization (the largest cost of a hit) without changing the key. A third table
holds, per served window, the forecaster's encoded prompts (``put_window``): a function of the window's
embeddings alone, so a window served again skips the prompt encoder as well. LMDB gives atomic, durable commits (a writer killed at any
instant loses only its uncommitted batch) and many concurrent reader processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Sequence

import lmdb
import numpy as np
from .errors import InputError, WriteError

log = logging.getLogger(__name__)

STORE_FORMAT = 1
FP32 = "fp32"
_META_KEY = b"__timecma_store_meta__"
# Virtual address space reserved for the map; the file grows only as data is written.
DEFAULT_MAP_SIZE = 1 << 38
# A store is not opened for writing on a filesystem with less free space than this: LMDB creating its
# file on a full tmpfs dies of SIGBUS instead of reporting ENOSPC (seen here), so the check comes first.
MIN_FREE_BYTES = 256 << 10
_TEXT_DB = b"prompt-text"
_WINDOW_DB = b"window-encoding"
_NAMED_DBS = (_TEXT_DB, _WINDOW_DB)


class StoreMismatchError(InputError):
    """The store on disk was built by another LLM/tokenizer/wrapper or vector shape."""


class StoreWriteError(WriteError):
    """The store cannot take new vectors (disk full, read-only, LMDB map full): a cache miss for serving,
    a stop for training."""


class EmbeddingStore:
    """A key -> vector map in an LMDB environment shared safely between processes."""

    def __init__(
        self,
        path: str | os.PathLike,
        namespace: str,
        dim: int,
        dtype: str | None = None,
        *,
        describe: str = "",
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        precision: str = FP32,
    ):
        self.path = os.fspath(path)
        self.namespace = namespace
        self.dim = int(dim)
        self.precision = precision
        self._ns = bytes.fromhex(namespace) if _is_hex(namespace) else namespace.encode()
        if precision != FP32:  # fp32 keys stay as they always were: existing stores keep their hits
            self._ns += f"|precision={precision}".encode()
        if readonly and not os.path.isdir(self.path):
            raise FileNotFoundError(f"embedding store {self.path} does not exist")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"embedding store {self.path} cannot be created: {exc.strerror or exc}") from exc
        if not readonly:
            st = os.statvfs(self.path)
            if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
                raise StoreWriteError(f"embedding store {self.path}: only {st.f_bavail * st.f_frsize} bytes free on "
                                      "its filesystem; free disk space, or use another --store")
        self.env = lmdb.open(
            self.path,
            map_size=map_size,
            subdir=True,
            readonly=readonly,
            max_readers=512,
            lock=True,
            sync=True,
            metasync=True,
            max_dbs=len(_NAMED_DBS),
        )
        if dtype is None:  # the store's own dtype where it exists (float16 stores halve the disk), else float32
            with self.env.begin() as txn:
                raw = txn.get(_META_KEY)
            dtype = json.loads(raw)["dtype"] if raw is not None else "float32"
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in ("float32", "float16"):
            raise StoreMismatchError(f"embedding stores hold float32 or float16 vectors, not {self.dtype.name}")
        meta = {
            "format": STORE_FORMAT,
            "namespace": namespace,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "describe": describe,
        }
        with self.env.begin(write=not readonly) as txn:
            raw = txn.get(_META_KEY)
            if raw is None:
                if readonly:
                    raise StoreMismatchError(f"embedding store {self.path} has no metadata")
                txn.put(_META_KEY, json.dumps(meta).encode())
            else:
                self._check(json.loads(raw), meta)
        self._text_db, self._window_db = (self._named_db(n, readonly) for n in _NAMED_DBS)

    def _named_db(self, name: bytes, readonly: bool):
        """A named table; None in a read-only store written before the table existed."""
        try:
            return self.env.open_db(name, create=not readonly)
        except lmdb.NotFoundError:
            return None

    def _check(self, found: dict, wanted: dict) -> None:
        if found.get("format") != STORE_FORMAT:
            raise StoreMismatchError(
                f"embedding store {self.path} has format {found.get('format')}, expected {STORE_FORMAT}"
            )
        if found["namespace"] != wanted["namespace"]:
            raise StoreMismatchError(
                f"embedding store {self.path} was built by another LLM/tokenizer "
                f"({found.get('describe') or 'unknown'}, namespace {found['namespace'][:12]}); "
                f"this run uses {wanted['describe'] or 'another model'} (namespace "
                f"{wanted['namespace'][:12]}). Use a different store directory."
            )
        if found["dim"] != wanted["dim"] or found["dtype"] != wanted["dtype"]:
            raise StoreMismatchError(
                f"embedding store {self.path} holds {found['dtype']}[{found['dim']}] vectors, "
                f"this run needs {wanted['dtype']}[{wanted['dim']}]"
            )

    def key(self, token_ids: np.ndarray) -> bytes:
        """Content address of one prompt's token ids under this store's namespace."""
        ids = np.ascontiguousarray(token_ids, dtype="<i8")
        return hashlib.sha256(self._ns + ids.tobytes()).digest()

    def keys(self, token_ids: Sequence[np.ndarray]) -> list[bytes]:
        return [self.key(t) for t in token_ids]

    def text_key(self, prompt: str) -> bytes:
        """Address of a prompt's text in the text index (same namespace as ``key``)."""
        return hashlib.sha256(self._ns + b"\0text\0" + prompt.encode()).digest()

    def get_many_by_text(self, prompts: Sequence[str], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like ``get_many`` but addressed by prompt text, through the text index."""
        if self._text_db is None:
            return (np.zeros((len(prompts), self.dim), dtype=self.dtype) if out is None else out,
                    np.zeros(len(prompts), dtype=bool))

        def key_of(txn, i: int) -> bytes | None:
            key = txn.get(self.text_key(prompts[i]), db=self._text_db)
            return None if key is None else bytes(key)

        return self._read(len(prompts), key_of, out)

    def keys_of_texts(self, prompts: Sequence[str]) -> list[bytes]:
        """The content addresses the text index holds for ``prompts`` (each must be indexed)."""
        with self.env.begin() as txn:
            keys = [txn.get(self.text_key(p), db=self._text_db) for p in prompts]
        missing = [p for p, key in zip(prompts, keys) if key is None]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) not in the store's text index, e.g. {missing[0][:80]!r}")
        return [bytes(key) for key in keys if key is not None]

    def get_many(self, keys: Sequence[bytes], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``keys`` as [len(keys), dim] and a boolean found-mask."""
        return self._read(len(keys), lambda txn, i: keys[i], out)

    def _read(self, n: int, key_of, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Read n vectors in one transaction; ``key_of(txn, i)`` gives entry i's key (None: absent)."""
        if out is None:
            out = np.zeros((n, self.dim), dtype=self.dtype)
        found = np.zeros(n, dtype=bool)
        nbytes = self.dim * self.dtype.itemsize
        with self.env.begin(buffers=True) as txn:
            for i in range(n):
                k = key_of(txn, i)
                buf = txn.get(k) if k is not None else None
                if buf is not None:
                    if len(buf) != nbytes:
                        raise StoreMismatchError(f"corrupt entry in {self.path}: {len(buf)} bytes")
                    out[i] = np.frombuffer(buf, dtype=self.dtype)
                    found[i] = True
        return out, found

    def missing(self, keys: Sequence[bytes]) -> list[int]:
        """Indices of keys not yet in the store."""
        with self.env.begin() as txn:
            return [i for i, k in enumerate(keys) if txn.get(k) is None]

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray | None,
                 prompts: Sequence[str] | None = None) -> None:
        """Insert a batch in one durable transaction (all or nothing).

        ``prompts`` (the texts the keys were tokenized from) also fill the text index;
        ``vectors=None`` adds only those text entries, for keys already stored.
        """
        if vectors is not None:
            vectors = np.ascontiguousarray(vectors, dtype=self.dtype)
            if vectors.shape != (len(keys), self.dim):
                raise ValueError(f"expected vectors of shape {(len(keys), self.dim)}, got {vectors.shape}")
        if prompts is not None and len(prompts) != len(keys):
            raise ValueError(f"{len(prompts)} prompt texts for {len(keys)} keys")
        with self._writing() as txn:
            if vectors is not None:
                for k, v in zip(keys, vectors):
                    txn.put(k, v.tobytes(), overwrite=False)
            if prompts is not None and self._text_db is not None:
                for k, p in zip(keys, prompts):
                    txn.put(self.text_key(p), k, db=self._text_db)

    @contextlib.contextmanager
    def _writing(self):
        """One durable write transaction; an LMDB failure aborts it (the store holds what it held before) and is
        raised as ``StoreWriteError``."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as exc:
            raise StoreWriteError(f"embedding store {self.path} cannot be written ({type(exc).__name__}: {exc}); "
                                  "free disk space, or use another --store") from exc

    def window_key(self, *parts: bytes) -> bytes:
        """Address of a window's record under this store's namespace (and precision): ``parts`` must fix the
        record's content given the embeddings, i.e. the window, how its prompts are rendered and the encoder."""
        return hashlib.sha256(self._ns + b"\0window\0" + b"\0".join(parts)).digest()

    def get_window(self, key: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
        """The float32 record of ``shape`` stored under ``key``, or None."""
        if self._window_db is None:
            return None
        with self.env.begin(buffers=True) as txn:
            buf = txn.get(key, db=self._window_db)
            if buf is None:
                return None
            if len(buf) != 4 * int(np.prod(shape)):
                raise StoreMismatchError(f"corrupt window record in {self.path}: {len(buf)} bytes for {shape}")
            return np.frombuffer(buf, dtype=np.float32).reshape(shape).copy()

    def put_window(self, key: bytes, record: np.ndarray) -> None:
        """Store a window's record (float32), durably; a no-op in a store that cannot have the table."""
        if self._window_db is None:
            return
        with self._writing() as txn:
            txn.put(key, np.ascontiguousarray(record, dtype=np.float32).tobytes(), db=self._window_db)

    def __len__(self) -> int:
        """Prompt vectors held (not the metadata record, the named tables' entries or their names)."""
        with self.env.begin() as txn:
            return txn.stat()["entries"] - 1 - sum(txn.get(n) is not None for n in _NAMED_DBS)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) % 2 == 0
    except ValueError:
        return False


def precision_tag(backend: str, precision: str) -> str:
    """The precision class that produced a vector: ``fp32`` for full precision on any backend (eager,
    ONNX Runtime, OpenVINO f32, a TensorRT fp32 engine agree within 1e-5), else ``backend:precision``
    (``openvino:bf16``, ``tensorrt:fp16``, ``ort:int8``): two backends' bf16 or int8 differ by far more
    than their fp32 runs, so a reduced precision is only ever reused by the kind that made it."""
    if precision in ("fp32", "f32", "float32", "fp32-ort-opt"):
        return FP32
    kind = "ort" if backend.startswith("ort") else backend  # ORT's int8 graph is the same on CPU and CUDA
    return f"{kind}:{precision}"


def make_namespace(weights_digest: str, tokenizer_digest: str, wrapper_version: str) -> str:
    """Namespace of the store: changes whenever any embedding could change."""
    payload = f"timecma-last-token|weights={weights_digest}|tokenizer={tokenizer_digest}|wrapper={wrapper_version}"
    return hashlib.sha256(payload.encode()).hexdigest()
