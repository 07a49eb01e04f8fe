"""File helpers shared by training, export and serving (torch-free): the user cache folder,
atomic writes, sha256, and the one rule for replacing what is already at an output path."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from typing import Callable

from .errors import InputError

log = logging.getLogger(__name__)


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


def is_empty(path: str | os.PathLike) -> bool:
    """A folder with no entries or a file of 0 bytes (a symlink is never empty: it points somewhere)."""
    path = os.fspath(path)
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        return not os.listdir(path)
    return os.path.isfile(path) and os.path.getsize(path) == 0


def check_replaceable(path: str | os.PathLike, ours: Callable[[str], bool], what: str,
                      error: type[Exception] = InputError) -> None:
    """The rule every command follows before it replaces ``path``: nothing there, an empty folder or file,
    or something ``ours`` recognises as made by timecma (``what`` names it: "a timecma bundle", ...).
    Anything else raises ``error`` naming the path and what to do; nothing is touched."""
    path = os.fspath(path)
    if not os.path.lexists(path) or is_empty(path) or ours(path):
        return
    kind = "folder" if os.path.isdir(path) else "file"
    raise error(f"{path} is a {kind} that is not {what}; refusing to replace it (nothing was changed). Choose "
                f"another output path, or move or delete {path} yourself if it should go")


def publish_dir(tmp: str, final: str) -> bool:
    """Rename the finished folder ``tmp`` to ``final`` when nothing is there yet (atomic: readers see a whole
    folder or none). When another process published ``final`` first, ``tmp`` is removed and its copy kept;
    returns whether ours went into place."""
    try:
        os.rename(tmp, final)  # onto an existing non-empty folder this fails, onto a file too: never replaces
        return True
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR) or not os.path.isdir(final):
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    log.debug("%s was published by another process meanwhile; kept that one", final)
    return False
