"""The README and the documentation site: the README stays short and keeps its commands; the site builds
with ``mkdocs build --strict`` (a broken link, anchor or API reference fails), and its generated pages
(every CLI, the HTTP API, every benchmark run) are there; the code's design references resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DESIGN = os.path.join(ROOT, "docs", "design.md")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CODE_DIRS = ("timecma", "export", "runtime", "benchmarks", "tests")


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_readme_is_short_and_keeps_its_commands():
    text = _readme()
    assert len(text.splitlines()) <= 200, "README.md: at most ~200 lines; the rest belongs in docs/"
    for command in ("make demo", "make test", "make docs"):
        assert command in text, command  # CI runs the README's test command
    start, end = text.find("<!-- accuracy-table:start -->"), text.find("<!-- accuracy-table:end -->")
    assert 0 <= start < end, "the accuracy table lives between its two markers"
    assert "benchmarks/results/accuracy-etth1" in text


def test_readme_names_only_extras_that_exist():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    named = set(re.findall(r"`\[([a-z0-9-]+)\]`", _readme()))
    assert named, "the README lists the install extras"
    assert named <= extras, f"README names extras pyproject.toml lacks: {sorted(named - extras)}"


def test_design_references_in_the_code_resolve():
    """Every "docs/design.md §N" in the code names a section of docs/design.md, and no bare "DESIGN §" is left."""
    with open(DESIGN, encoding="utf-8") as f:
        sections = {int(m) for m in re.findall(r"^## (\d+)\. ", f.read(), flags=re.M)}
    assert sections, "docs/design.md keeps its numbered sections"
    bare, missing = [], []
    for top in CODE_DIRS:
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.abspath(path) == os.path.abspath(__file__):
                    continue
                with open(path, encoding="utf-8") as f:
                    src = f.read()
                rel = os.path.relpath(path, ROOT)
                if "DESIGN §" in src:
                    bare.append(rel)
                for ref in re.findall(r"docs/design\.md §(\d+)((?:, §\d+)*)", src):
                    numbers = [int(ref[0])] + [int(n) for n in re.findall(r"\d+", ref[1])]
                    missing += [f"{rel}: §{n}" for n in numbers if n not in sections]
    assert not bare, f"cite the design as 'docs/design.md §N': {bare}"
    assert not missing, f"no such section in docs/design.md: {missing}"


def _hook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("timecma_docs_hook", os.path.join(ROOT, "docs", "hooks",
                                                                                   "timecma_docs.py"))
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_http_reference_is_the_apps_openapi_document_and_nothing_stands_in_for_it(monkeypatch):
    """The HTTP page comes from ``create_app().openapi()`` only: an app that cannot build its document fails the
    docs build (a docstring fallback used to keep the page, and this test, passing with the app broken)."""
    from timecma.runtime.serving import app

    hook = _hook()
    doc, module = hook._openapi()
    assert module == "timecma.runtime.serving.app" and "/forecast" in doc["paths"]
    assert "/forecast" in hook._render_openapi(doc, module)
    assert not hasattr(hook, "_render_docstring_fallback") and not hasattr(hook, "HTTP_APP_FACTORIES")

    def broken():
        raise RuntimeError("the app does not build")

    monkeypatch.setattr(app, "create_app", broken)
    monkeypatch.setattr(hook, "_scripts", dict)  # (no CLI pages: the HTTP reference is what is under test)
    with pytest.raises(RuntimeError, match="the app does not build"):
        hook.on_files([], {})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_site_builds_strict_with_its_generated_pages(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=280)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"

    def page(rel: str) -> str:
        path = site / rel
        assert path.is_file(), f"{rel} was not built"
        return path.read_text(encoding="utf-8")

    # every entry point has its page, generated from its click definition (its options are there)
    for script in _pyproject()["project"]["scripts"]:
        html = page(f"reference/cli/{script}.html")
        assert "--help" in html, f"{script}: no options rendered"
    # the HTTP API page, from the app's OpenAPI document (also published raw)
    assert "/forecast" in page("reference/http/index.html") and (site / "reference/http/openapi.json").is_file()
    # the Python API from docstrings
    assert "Forecaster" in page("reference/python.html") and "predict" in page("reference/python.html")
    # every results folder has its page, with its machine line; the budget-limited ablations say so
    for run_dir in sorted(os.listdir(RESULTS)):
        if os.path.isdir(os.path.join(RESULTS, run_dir)):
            html = page(f"results/runs/{run_dir}.html")
            if run_dir.startswith("ablation-"):
                assert "Budget-limited" in html, run_dir
    # the accuracy page includes the full-training results once they are committed
    accuracy = page("results/accuracy.html")
    if os.path.isfile(os.path.join(RESULTS, "accuracy-etth1", "results.md")):
        assert "Not committed yet" not in accuracy
    assert "Budget-limited" in accuracy
