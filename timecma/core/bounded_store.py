"""An embedding store with a bound on disk, for long-running endpoints: every live request adds N vectors.

Two generations of ``EmbeddingStore`` live under one folder (``gen-<n>/``), each an LMDB map of at
most half the bound, so the folder never holds more than the bound. New vectors go into the newer
generation; when it is full, the older one is deleted, the newer becomes the older, and a new one
starts (an eviction). A hit in the older generation is copied into the newer one, so what is used
stays and what was not used for a whole generation goes: an approximate LRU at the cost of one copy
per promoted vector. Keys are the store's usual content addresses, so a hit is always correct; an
evicted prompt is a miss and is computed again.

One process owns a bounded store (an endpoint replica's node-local store): a rotation deletes files
that other processes could still have open. The owner holds an exclusive lock on ``owner.lock`` in the
store's directory (``flock``: released when the process ends, however it ends); a second owner is
refused with ``StoreBusy``, naming the process that holds it. ``BoundedStore.claim(root)`` gives each
process its own directory under ``root`` instead (``proc-0``, ``proc-1``, ...: the first one no live
process holds), which is how several endpoint replicas on one node share a ``--store`` setting.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from typing import Any, Sequence

import lmdb
import numpy as np

from .errors import InputError
from .store import FP32, EmbeddingStore, StoreWriteError

log = logging.getLogger(__name__)

MIN_BYTES = 2 << 20  # two generations of at least 1 MiB (LMDB's meta pages and the text index need room)
LOCK_FILE = "owner.lock"
MAX_CLAIMS = 256  # proc-0 .. proc-255 under one root: more processes than that on one node is a mistake


class StoreBusy(InputError):
    """Another process owns this bounded store."""


def _own(path: str) -> int:
    """An exclusive, non-blocking lock on ``path``/owner.lock, held by the returned descriptor."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise StoreBusy(f"bounded store {path} is owned by process {holder}: one process owns a bounded store "
                        "(its rotation deletes files another process would still have open); give each process "
                        "its own directory (BoundedStore.claim does: --store-max-gb with several replicas)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _map_full(exc: StoreWriteError) -> bool:
    return isinstance(exc.__cause__, lmdb.MapFullError)


class BoundedStore:
    """The ``EmbeddingStore`` interface serving uses, within ``max_bytes`` on disk."""

    def __init__(self, path: str | os.PathLike, namespace: str, dim: int, dtype: str | None = None, *,
                 max_bytes: int, describe: str = "", precision: str = FP32):
        if max_bytes < MIN_BYTES:
            raise InputError(f"a bounded store needs at least {MIN_BYTES >> 20} MiB, not {max_bytes} bytes")
        self.path, self.max_bytes, self.evictions = os.fspath(path), int(max_bytes), 0
        self._args = (namespace, dim, dtype)
        self._kw: dict[str, Any] = {"describe": describe, "precision": precision, "map_size": self.max_bytes // 2}
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd: int | None = _own(self.path)  # before touching a generation: a second owner never does
        try:
            self._open_generations()
        except BaseException:
            self._release()
            raise

    @classmethod
    def claim(cls, root: str | os.PathLike, namespace: str, dim: int, dtype: str | None = None,
              **kwargs) -> "BoundedStore":
        """A bounded store of this process's own: ``root``/proc-K for the first K that no live process owns
        (a directory left by a process that has ended is taken over, its vectors with it)."""
        root = os.fspath(root)
        for k in range(MAX_CLAIMS):
            try:
                return cls(os.path.join(root, f"proc-{k}"), namespace, dim, dtype, **kwargs)
            except StoreBusy:
                continue
        raise StoreBusy(f"all {MAX_CLAIMS} bounded stores under {root} are owned by live processes")

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the descriptor
            self._lock_fd = None

    def _open_generations(self) -> None:
        gens = sorted(int(d[4:]) for d in os.listdir(self.path) if d.startswith("gen-") and d[4:].isdigit())
        self._n = gens[-1] if gens else 0
        for g in gens[:-2]:  # left by a rotation that was killed halfway
            shutil.rmtree(self._dir(g), ignore_errors=True)
        self.old = self._open(self._n - 1) if self._n - 1 in gens else None
        self.cur = self._open(self._n)
        self.namespace, self.dim, self.dtype, self.precision = (self.cur.namespace, self.cur.dim, self.cur.dtype,
                                                                self.cur.precision)

    def _dir(self, n: int) -> str:
        return os.path.join(self.path, f"gen-{n}")

    def _open(self, n: int) -> EmbeddingStore:
        return EmbeddingStore(self._dir(n), *self._args, **self._kw)

    def _rotate(self) -> None:
        """Drop the older generation; the newer one becomes the older; a new one starts."""
        if self.old is not None:
            self.old.close()
            shutil.rmtree(self._dir(self._n - 1), ignore_errors=True)
        self.old, self._n = self.cur, self._n + 1
        self.cur = self._open(self._n)
        self.evictions += 1
        log.info("bounded store %s: generation %d full, generation %d evicted", self.path, self._n - 1, self._n - 2)

    # -- the EmbeddingStore interface -------------------------------------------------
    def key(self, token_ids: np.ndarray) -> bytes:
        return self.cur.key(token_ids)

    def keys(self, token_ids: Sequence[np.ndarray]) -> list[bytes]:
        return self.cur.keys(token_ids)

    def get_many(self, keys: Sequence[bytes], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        out, found = self.cur.get_many(keys, out)
        if self.old is not None and not found.all():
            idx = np.flatnonzero(~found).tolist()
            got, hit = self.old.get_many([keys[i] for i in idx])
            rows = np.asarray(idx, dtype=np.int64)[hit]
            self._take(out, found, rows, got[hit], [keys[i] for i in rows.tolist()], None)
        return out, found

    def get_many_by_text(self, prompts: Sequence[str], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        out, found = self.cur.get_many_by_text(prompts, out)
        if self.old is not None and not found.all():
            idx = np.flatnonzero(~found).tolist()
            got, hit = self.old.get_many_by_text([prompts[i] for i in idx])
            rows = np.asarray(idx, dtype=np.int64)[hit]
            texts = [prompts[i] for i in rows.tolist()]
            self._take(out, found, rows, got[hit], self.old.keys_of_texts(texts), texts)
        return out, found

    def _take(self, out: np.ndarray, found: np.ndarray, rows: np.ndarray, vectors: np.ndarray, keys: list[bytes],
              prompts: list[str] | None) -> None:
        """Hits of the older generation: into the answer, and promoted into the newer one."""
        if len(rows):
            out[rows], found[rows] = vectors, True
            self._promote(keys, vectors, prompts)

    def _promote(self, keys: list[bytes], vectors: np.ndarray, prompts: list[str] | None) -> None:
        try:
            self.put_many(keys, vectors, prompts)
        except StoreWriteError as exc:  # a cache: a failed promotion only means a later miss
            log.warning("bounded store %s: promotion failed (%s)", self.path, exc)

    def missing(self, keys: Sequence[bytes]) -> list[int]:
        idx = self.cur.missing(keys)
        if self.old is None or not idx:
            return idx
        gone = self.old.missing([keys[i] for i in idx])
        return [idx[j] for j in gone]

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray | None, prompts: Sequence[str] | None = None) -> None:
        """Into the newer generation; a full one is rotated once and the batch written to the fresh one."""
        try:
            self.cur.put_many(keys, vectors, prompts)
        except StoreWriteError as exc:
            if not _map_full(exc):
                raise
            self._rotate()
            self.cur.put_many(keys, vectors, prompts)

    def window_key(self, *parts: bytes) -> bytes:
        return self.cur.window_key(*parts)

    def get_window(self, key: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
        """From the newer generation, else the older (promoted into the newer, as prompt vectors are)."""
        rec = self.cur.get_window(key, shape)
        if rec is None and self.old is not None:
            rec = self.old.get_window(key, shape)
            if rec is not None:
                try:
                    self.put_window(key, rec)
                except StoreWriteError as exc:
                    log.warning("bounded store %s: promotion failed (%s)", self.path, exc)
        return rec

    def put_window(self, key: bytes, record: np.ndarray) -> None:
        try:
            self.cur.put_window(key, record)
        except StoreWriteError as exc:
            if not _map_full(exc):
                raise
            self._rotate()
            self.cur.put_window(key, record)

    def disk_bytes(self) -> int:
        """Bytes of the store's files on disk (what the bound is about)."""
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.path) for f in files)

    def __len__(self) -> int:
        return len(self.cur) + (len(self.old) if self.old is not None else 0)

    def close(self) -> None:
        self.cur.close()
        if self.old is not None:
            self.old.close()
        self._release()

    def __enter__(self) -> "BoundedStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
