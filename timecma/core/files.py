"""File helpers shared by training, export and serving (torch-free): the user cache folder,
atomic writes, sha256, the one rule for replacing what is already at an output path, and the one
way a finished folder replaces what is there (``replace_dir``)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Callable

from .errors import InputError
from .leftovers import dead_temporaries

log = logging.getLogger(__name__)


def user_cache_dir(*parts: str) -> str:
    """$TIMECMA_CACHE_DIR, else $XDG_CACHE_HOME/timecma, else ~/.cache/timecma (created)."""
    root = os.environ.get("TIMECMA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "timecma")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def make_shareable(folder: str | os.PathLike) -> None:
    """Give a ``mkdtemp`` folder (private, 0o700) the mode a plain ``mkdir`` would: 0o777 less the umask. A
    model or bundle folder is meant to be shared as the user's umask says, no wider."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def portable_name(name: str) -> str:
    """A local directory by its folder name only (digests identify it; no build machine's paths in a bundle or
    a checkpoint), anything else (a hub id) as it is."""
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name


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


def has_record(path: str | os.PathLike, record: str, made_by: str) -> bool:
    """A real folder (not a link) whose JSON ``record`` file says ``made_by`` wrote it: how a command knows a
    folder is its own to replace."""
    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, record)) as f:
            return json.load(f).get("made_by") == made_by
    except (OSError, ValueError, AttributeError):
        return False


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


ASIDE_ENTRY = "b"  # the previous occupant's name inside its aside folder


def _aside_prefix(final: str, aside: str | None) -> str:
    return aside or f".{os.path.basename(final)}.old-"


def recover_replaced(final: str | os.PathLike, what: str, aside: str | None = None) -> int:
    """After a killed ``replace_dir`` of ``final``: put back the previous occupant a kill between the two
    renames left stranded (only where nothing is at ``final`` now), and remove the aside folders of dead
    processes (``<aside><pid>-*``, default ``.NAME.old-<pid>-*`` beside ``final``). Returns how many were
    recovered; each is logged, naming ``what``."""
    final = os.path.abspath(os.fspath(final))
    n = 0
    for old in dead_temporaries(os.path.dirname(final), _aside_prefix(final, aside)):
        stranded = os.path.join(old, ASIDE_ENTRY)
        if not os.path.lexists(final) and os.path.lexists(stranded):
            os.replace(stranded, final)
            log.warning("recovered %s %s that a killed run left in %s", what, final, old)
            n += 1
        if os.path.isdir(old) and not os.path.islink(old):  # replace_dir makes its asides with mkdtemp: folders only
            shutil.rmtree(old, ignore_errors=True)
    return n


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike, ours: Callable[[str], bool], what: str,
                error: type[Exception] = InputError, aside: str | None = None) -> None:
    """Put the finished folder ``tmp`` at ``final``, the one way every command does it.

    First a previous occupant a killed run stranded is recovered (``recover_replaced``). Then what is at
    ``final`` is checked again (``check_replaceable``: nothing, an empty folder or file, or what ``ours``
    recognises as ``what``; anything else raises ``error`` and nothing moves). A previous occupant is moved
    aside into ``<aside><pid>-*/b`` beside ``final`` (default ``.NAME.old-``), ``tmp`` is renamed in, and the
    aside copy is removed; if the rename in fails, the previous occupant is put back and ``tmp`` stays for the
    caller to remove. Readers see the old folder, the new one, or (for the moment between the renames)
    nothing."""
    tmp, final = os.fspath(tmp), os.path.abspath(os.fspath(final))
    recover_replaced(final, what, aside)
    check_replaceable(final, ours, what, error)
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    old = tempfile.mkdtemp(prefix=f"{_aside_prefix(final, aside)}{os.getpid()}-", dir=os.path.dirname(final))
    try:
        os.replace(final, os.path.join(old, ASIDE_ENTRY))
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(os.path.join(old, ASIDE_ENTRY), final)  # put the previous one back
            raise
    except BaseException:
        if not os.path.lexists(os.path.join(old, ASIDE_ENTRY)):  # nothing of the previous one is left in it
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- PNGs timecma writes (timecma-plot, timecma-bench): one mark, read with Pillow (matplotlib's dependency) ------
PNG_MARK = "timecma.output"  # a PNG text chunk of every PNG timecma writes; its value names the command


def png_mark(writer: str) -> dict[str, str]:
    """The ``savefig(metadata=...)`` entry that marks a PNG as written by ``writer`` (e.g. ``timecma-plot``)."""
    return {PNG_MARK: writer}


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG file (keyword -> text); empty for anything that is not a readable PNG (or where
    Pillow is not installed: nothing can be recognised then)."""
    try:
        from PIL import Image
    except ImportError:
        return {}
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "PNG":
                return {}
            return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return {}


def is_marked_png(path: str | os.PathLike, writer: str) -> bool:
    """A PNG file (not a link) that ``writer`` marked with ``png_mark``: what that command may replace."""
    path = os.fspath(path)
    return os.path.isfile(path) and not os.path.islink(path) and png_text(path).get(PNG_MARK) == writer
