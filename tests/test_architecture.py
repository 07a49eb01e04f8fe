"""The layering of docs/design.md §1, checked with import-linter on the package as installed.

`.ci/lint-imports` (what `make lint` runs) installs the package (no deps) into a folder and checks
the contracts of pyproject.toml there: the editable install maps export/ and runtime/ into the
timecma namespace through an import hook that import-linter's graph builder cannot follow.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "lint-imports"
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed by the contributor's command, which must also find every contract kept."""
    target = tmp_path_factory.mktemp("installed")
    r = subprocess.run(["bash", str(SCRIPT), "--into", str(target), sys.executable], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "5 kept, 0 broken" in r.stdout
    return target


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(REPO / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(cwd)})


def test_import_contracts_hold(installed):
    assert (installed / "timecma" / "runtime" / "serving" / "forecaster.py").is_file()


@pytest.mark.parametrize("module, line, contract", [
    ("core/leak.py", "import torch\n", "core is torch-free"),
    ("runtime/leak.py", "from timecma.export import bundle\n", "runtime is torch-free"),
    ("runtime/leak.py", "from timecma import training\n", "runtime is torch-free"),
    # a lower wing reaching up: engines -> backends, backends -> serving, and one side wing into the other
    ("runtime/engines/leak.py", "from timecma.runtime.backends import select\n", "runtime wings"),
    ("runtime/backends/leak.py", "from timecma.runtime.serving import forecaster\n", "runtime wings"),
    ("runtime/serving/leak.py", "from timecma.runtime.compile import tensorrt\n", "runtime wings"),
    ("export/source.py", "from . import graphs\n", "export steps"),
    # a circle inside one wing: batcher -> service -> batcher
    ("runtime/serving/batcher.py", "from . import service\n", "no import circles"),
])
def test_import_contracts_catch_a_violation(installed, tmp_path, module, line, contract):
    """The contracts see the mapped sub-packages: a forbidden import added there breaks the named contract."""
    copy = tmp_path / "pkg"
    shutil.copytree(installed, copy)
    path = copy / "timecma" / module
    path.write_text((path.read_text() if path.exists() else "") + line)
    r = _lint(copy)
    assert r.returncode == 1, r.stdout[-2000:]
    verdicts = r.stdout[r.stdout.index("Contracts\n"):]  # the list of contracts, each followed by KEPT or BROKEN
    after = verdicts[verdicts.index(contract):]
    assert after.index("BROKEN") < (after.index("KEPT") if "KEPT" in after else len(after)), r.stdout[-2000:]
