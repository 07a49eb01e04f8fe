"""The bundle manifest (DESIGN §8): JSON, versioned, no pickles (torch-free).

Every file of a bundle is listed under ``files`` with its sha256 and size. Loading verifies
them (a corrupt or truncated graph or engine is named, not met as a protobuf traceback);
hashes already checked for the same file size and mtime are remembered in the user cache
directory, so a repeat load of a multi-hundred-MB bundle costs a stat per file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

from .errors import BundleError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
MANIFEST_NAME = "manifest.json"


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


def file_record(bundle_dir: str | os.PathLike, rel: str) -> dict[str, Any]:
    """The ``files`` entry of one bundle file: sha256 and size."""
    path = os.path.join(bundle_dir, rel)
    return {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}


def list_bundle_files(bundle_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under the bundle except the manifest (relative paths)."""
    out = {}
    for root, _, names in os.walk(bundle_dir):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), bundle_dir)
            if rel != MANIFEST_NAME and not name.startswith("."):
                out[rel] = file_record(bundle_dir, rel)
    return dict(sorted(out.items()))


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write manifest.json atomically (version stamped first)."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    body = {"manifest_version": MANIFEST_VERSION, **{k: v for k, v in manifest.items() if k != "manifest_version"}}
    atomic_write_bytes(path, json.dumps(body, indent=2).encode())
    return path


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load and check a bundle manifest; refuse other versions and (``verify``) corrupt files."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir} is not a timecma bundle: {MANIFEST_NAME} is missing")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        newer = isinstance(version, int) and version > MANIFEST_VERSION
        raise BundleError(
            f"bundle {bundle_dir} has manifest version {version}; this timecma reads version {MANIFEST_VERSION}"
            + (" (upgrade timecma)" if newer else " (re-export the bundle with `timecma-export --force`)")
        )
    for rel in manifest.get("files", {}):
        if not os.path.isfile(os.path.join(bundle_dir, rel)):
            raise BundleError(f"bundle {bundle_dir} lacks {rel} named in its manifest; re-export the bundle"
                              + (" or rebuild its engines with `timecma-engines build`" if rel.startswith("engines/")
                                 else ""))
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


# --- integrity ---------------------------------------------------------------------------
_memo: dict[tuple, str] = {}


def _cache_path() -> str | None:
    try:
        return os.path.join(user_cache_dir(), "verified-files.json")
    except OSError:
        return None


def _load_cache() -> dict[str, str]:
    path = _cache_path()
    try:
        with open(path) as f:  # type: ignore[arg-type]
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, TypeError, ValueError):
        return {}


def _stat_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def verify_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> int:
    """Check every listed file's size and sha256; return how many were hashed (not cached).

    A file is hashed once per content: the result is cached by path, size, mtime and inode
    in this process and in the user cache directory.
    """
    cache = None
    hashed = 0
    for rel, rec in manifest.get("files", {}).items():
        path = os.path.join(bundle_dir, rel)
        fix = ("rebuild it with `timecma-engines build`" if rel.startswith("engines/")
               else "re-export the bundle with `timecma-export --force`")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise BundleError(f"bundle file {rel} is corrupt or truncated: {size} bytes, the manifest records "
                              f"{rec['bytes']}; {fix}")
        key = _stat_key(path)
        if _memo.get(key) == rec["sha256"]:
            continue
        if cache is None:
            cache = _load_cache()
        if cache.get(key) != rec["sha256"]:
            digest = file_sha256(path)
            hashed += 1
            if digest != rec["sha256"]:
                raise BundleError(f"bundle file {rel} is corrupt: sha256 {digest[:12]}..., the manifest records "
                                  f"{rec['sha256'][:12]}...; {fix}")
            cache[key] = digest
        _memo[key] = rec["sha256"]
    if hashed and cache is not None and (path := _cache_path()):
        try:
            if len(cache) > 10_000:  # bounded: drop the oldest half
                cache = dict(list(cache.items())[-5_000:])
            atomic_write_bytes(path, json.dumps(cache).encode())
        except OSError as exc:  # a read-only home must not stop serving
            log.debug("could not write the verification cache: %s", exc)
    return hashed
