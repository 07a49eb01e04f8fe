"""The bundle manifest (DESIGN §8): JSON, versioned, no pickles (torch-free)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(ValueError):
    """The bundle is missing, incomplete or from another manifest version."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump({"manifest_version": MANIFEST_VERSION, **manifest}, f, indent=2, sort_keys=False)
    return path


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check a bundle manifest; refuse other versions with a clear message."""
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir} is not a timecma bundle: {MANIFEST_NAME} is missing")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        newer = isinstance(version, int) and version > MANIFEST_VERSION
        raise BundleError(
            f"bundle {bundle_dir} has manifest version {version}; this timecma reads version {MANIFEST_VERSION}"
            + (" (upgrade timecma)" if newer else " (re-export the bundle)")
        )
    for graph in manifest["graphs"].values():
        for variant in graph["files"].values():
            if not os.path.isfile(os.path.join(bundle_dir, variant["file"])):
                raise BundleError(f"bundle {bundle_dir} lacks {variant['file']} named in its manifest")
    return manifest
