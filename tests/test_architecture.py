"""The layering of DESIGN §1, checked with import-linter on the package as installed.

An editable install maps export/ and runtime/ into the timecma namespace through an import
hook that import-linter's graph builder cannot follow, so the package is installed (no deps)
into a temporary folder and the contracts of pyproject.toml are checked there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("installed")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(REPO)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    return target


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(REPO / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(cwd)})


def test_import_contracts_hold(installed):
    r = _lint(installed)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line", [
    ("core/leak.py", "import torch\n"),
    ("runtime/leak.py", "from timecma.export import bundle\n"),
    ("runtime/leak.py", "from timecma import train\n"),
])
def test_import_contracts_catch_a_violation(installed, tmp_path, module, line):
    """The contracts see the mapped sub-packages: a forbidden import added there breaks them."""
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(installed, copy)
    (copy / "timecma" / module).write_text(line)
    r = _lint(copy)
    assert r.returncode == 1 and "BROKEN" in r.stdout and f"timecma.{module[:-3].replace('/', '.')}" in r.stdout
