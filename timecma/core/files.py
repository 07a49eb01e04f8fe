"""File helpers shared by training, export and serving (torch-free): the user cache folder,
atomic writes and sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile


def user_cache_dir(*parts: str) -> str:
    """$TIMECMA_CACHE_DIR, else $XDG_CACHE_HOME/timecma, else ~/.cache/timecma (created)."""
    root = os.environ.get("TIMECMA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "timecma")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder + rename: readers see old or new, never half."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
