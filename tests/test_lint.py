"""The static checks of `make lint` bite: `.ci/lint-static` (ruff, and mypy on the package as installed) fails on
what CPU tests cannot reach, such as a relative import left stale by a move inside a function only a GPU machine
runs (issue 39: `from .cuda import CudaRuntime` in runtime/compile/cli.py, whose module is runtime/engines/cuda.py).

Each check runs the script on a small tree laid out like this repository (timecma/, runtime/ mapped into the
timecma namespace by pyproject.toml's package-dir) under this repository's own pyproject.toml, so what is checked
is the configuration `make lint` uses. `make lint` itself runs the script on the whole repository.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "lint-static"

CUDA = '''\
class CudaRuntime:
    def capability(self) -> str:
        return "90"
'''
# an unannotated function, as click commands are: mypy still resolves the imports inside it
CLI = '''\
def verify():
    from {cuda} import CudaRuntime
    import onnxruntime  # third party without type information: skipped by name in the config

    return CudaRuntime().capability(), onnxruntime
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One mypy cache for the module's runs (the first is cold: a few seconds for the standard library)."""
    return tmp_path_factory.mktemp("mypy-cache")


def tree(root: Path, cuda_import: str, extra: dict[str, str] | None = None) -> Path:
    files = {"timecma/__init__.py": "", "runtime/__init__.py": "", "runtime/engines/__init__.py": "",
             "runtime/engines/cuda.py": CUDA, "runtime/compile/__init__.py": "",
             "runtime/compile/cli.py": CLI.format(cuda=cuda_import), **(extra or {})}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path, cache: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), "--root", str(root), sys.executable], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "MYPY_CACHE_DIR": str(cache)}, timeout=300)
    return r


def test_a_stale_relative_import_fails_the_lint(tmp_path, cache):
    r = lint(tree(tmp_path, ".cuda"), cache)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    # named by the repository's file, not the installed layout's
    assert 'runtime/compile/cli.py:2: error: Cannot find implementation or library stub for module named ' \
           '"timecma.runtime.compile.cuda"  [import-not-found]' in out, out
    assert "onnxruntime" not in out, out


def test_the_same_tree_with_the_import_fixed_passes(tmp_path, cache):
    r = lint(tree(tmp_path, "..engines.cuda"), cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found in" in r.stdout


def test_ruff_findings_fail_the_lint(tmp_path, cache):
    r = lint(tree(tmp_path, "..engines.cuda", {"runtime/engines/extra.py": "import os\n"}), cache)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "runtime/engines/extra.py:1:8: F401" in r.stdout, r.stdout


def test_a_type_error_fails_the_lint(tmp_path, cache):
    wrong = "from .cuda import CudaRuntime\n\n\ndef major() -> int:\n    return CudaRuntime().capability()\n"
    r = lint(tree(tmp_path, "..engines.cuda", {"runtime/engines/use.py": wrong}), cache)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "runtime/engines/use.py:5: error: Incompatible return value type" in r.stdout, r.stdout


def test_no_import_of_timecma_is_exempt_from_resolution():
    """A global ignore_missing_imports, or an override naming timecma, would silence the stale import above."""
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "ignore_missing_imports" not in mypy
    for override in mypy.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not [m for m in modules if m.split(".")[0] == "timecma" or m == "*"], override
