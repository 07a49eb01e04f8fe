"""The timecma package laid out as it is installed, as a tree of symlinks into the repository.

export/, runtime/ and benchmarks/ are mapped into the ``timecma`` namespace by [tool.setuptools.package-dir]; the
editable install's import hook does that at run time, but static readers (mypy in `.ci/lint-static`, mkdocstrings
in the docs hook) follow files, so both read this tree. Run as a script (ROOT TREE) it lays the tree out and prints
a sed script that maps installed paths back to the repository's files (for mypy's messages).
"""

from __future__ import annotations

import os
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def lay_out(root: str, tree: str) -> dict[str, str]:
    """Lay ``root``'s packages out under ``tree`` (created) as installed; returns the mapping, package -> folder."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        mapped = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    mapped = {pkg: folder for pkg, folder in mapped.items() if os.path.isdir(os.path.join(root, folder))}

    def lay(pkg: str) -> None:
        """The package's folder as a symlink, or as a folder of symlinks where packages are mapped inside it."""
        src, dst = os.path.join(root, mapped[pkg]), os.path.join(tree, *pkg.split("."))
        inner = {p.rpartition(".")[2] for p in mapped if p.rpartition(".")[0] == pkg}
        if not inner:
            os.symlink(src, dst)
            return
        os.makedirs(dst)
        for name in os.listdir(src):
            if name not in inner and name != "__pycache__":
                os.symlink(os.path.join(src, name), os.path.join(dst, name))
        for name in sorted(inner):
            lay(f"{pkg}.{name}")

    os.makedirs(tree)
    for pkg in mapped:
        if "." not in pkg:
            lay(pkg)
    return mapped


if __name__ == "__main__":
    mapped = lay_out(*sys.argv[1:3])
    # longest prefix first: timecma/export/x.py -> export/x.py before timecma/x.py -> timecma/x.py
    for pkg in sorted(mapped, key=len, reverse=True):
        installed, folder = pkg.replace(".", "/") + "/", mapped[pkg].strip("/") + "/"
        print(f"s#^{installed}#{folder}#;t")
