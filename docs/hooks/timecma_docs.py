"""MkDocs hook: the pages of the site that are generated from the repository at build time.

Nothing here is written into docs/: every page below is a ``File.generated`` that exists only in
the build, so it cannot go stale in the tree.

* ``reference/cli/<script>.md``: one page per entry point of ``[project.scripts]`` in
  pyproject.toml, each a mkdocs-click directive on the click object the script runs.
* ``reference/http/index.md``: the HTTP API, rendered from the OpenAPI document of the serving app
  (``timecma.runtime.serving.app.create_app().openapi()``, an app without a bundle), which is also
  published as ``reference/http/openapi.json``. The build fails if the app cannot build it.
* ``results/runs/<run>.md``: one page per folder of ``benchmarks/results/`` (its ``*.md``
  rendered, its ``*.png`` shown, every file linked), plus a page for each loose ``*.md`` and one
  for the loose ``*.json`` files, and ``results/runs/index.md``: a table of every run with its
  date and machine line.
  Runs trained on a budget (a window stride or an epoch cap: docs/design.md §16) carry a banner.

Also: the Python API pages (mkdocstrings) read the package from a temporary tree of symlinks laid out
as installed (``_source_tree``), and two rough edges of mkdocs-click's output are smoothed
(``_patch_mkdocs_click``).

The navigation entries that name ``reference/cli/index.md`` and ``results/runs/index.md`` become
sections holding every generated page of their kind, so a new entry point or results folder shows up
without an edit to mkdocs.yml.

Markers expanded in hand-written pages (``<!-- timecma:NAME -->``):

* ``accuracy``: ``benchmarks/results/accuracy-etth1/results.md`` when it exists, else a note.
* ``extras``: the optional-dependency groups of pyproject.toml.
* ``scripts``: the entry points of pyproject.toml with their one-line help.
* ``metrics``: the Prometheus metrics declared in ``runtime/serving/metrics.py`` (read with ast).
* ``manifest``: the manifest's dataclasses (``timecma/core/manifest.py``, ``ModelConfig``), field by field.
"""

from __future__ import annotations

import ast
import html
import importlib
import json
import logging
import os
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.timecma")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
ACCURACY = os.path.join(RESULTS, "accuracy-etth1", "results.md")
HTTP_APP_MODULE = "timecma.runtime.serving.app"  # its create_app() builds the app without a bundle
METRICS_MODULE = os.path.join(ROOT, "runtime", "serving", "metrics.py")

# Trained on a budget (docs/design.md §16: an accuracy claim comes from a model trained to early stopping on every
# training window; one that hit its epoch cap or used a window stride is labelled wherever it is shown).
BUDGET = {
    "ablation-etth1": "every 4th training window, at most 10 epochs, tiny random-weight GPT-2",
    "ablation-etth1-smollm2": "every 96th window of each split (89 training, 30 validation, 30 test windows), "
                              "at most 10 epochs",
    "ablation-etth1-joint": "every 32nd training and every 16th validation/test window, 3 epochs, "
                            "tiny random-weight GPT-2",
}
_STRIDE = re.compile(r"every \d+(st|nd|rd|th) (training |validation|test)|\d+ epochs max", re.I)


# --------------------------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _scripts() -> dict[str, str]:
    return dict(_pyproject()["project"].get("scripts", {}))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _demote(md: str, levels: int = 1) -> str:
    """Push every ATX heading of an included file ``levels`` deeper (outside fenced code)."""
    out, fence = [], False
    for line in md.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and re.match(r"#{1,5} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _budget_note(run: str, text: str) -> str | None:
    if run in BUDGET:
        return BUDGET[run]
    if _STRIDE.search(text):
        return "trained with a window stride or an epoch cap (see the run's own header)"
    return None


def _budget_banner(note: str) -> str:
    return ('!!! warning "Budget-limited"\n'
            f"    Trained on a budget: {note}. These figures show the mechanics and the latency at that budget; "
            "they are not an accuracy claim (an accuracy claim needs training to early stopping on every "
            "training window: [design §16](../../design.md#16-training-recipes-and-accuracy-claims)). "
            "For the full-training comparison see [Which model should I deploy?](../accuracy.md).\n")


# --------------------------------------------------------------------------------------------------------------
# CLI reference
def _cli_page(script: str, target: str) -> str:
    module, attr = target.split(":")
    return ("::: mkdocs-click\n"
            f"    :module: {module}\n"
            f"    :command: {attr}\n"
            f"    :prog_name: {script}\n"
            "    :depth: 0\n"
            "    :style: table\n"
            "    :list_subcommands: True\n\n"
            "---\n\n"
            f"Generated at build time by mkdocs-click from the click definition `{module}:{attr}` (the `{script}` "
            "entry point of `pyproject.toml`): the same text as `--help`. Exit codes: "
            "[Command line](index.md#exit-codes).\n")


def _patch_mkdocs_click() -> None:
    """Two fixes to mkdocs-click's rendering (0.9), applied only where its functions are as expected:

    * the table's Default column: click >= 8.2 leaves a required option's default as a sentinel, which
      mkdocs-click prints as ``Sentinel.UNSET``; a required option says *required*, an unset default nothing;
      pipes in help texts are escaped so they do not split the table's cells;
    * click's ``\\b`` paragraphs (kept as typed in ``--help``) become preformatted blocks instead of one
      run-on paragraph with a backspace character in it."""
    try:
        from mkdocs_click import _docs
    except ImportError:
        return
    row = getattr(_docs, "_format_table_option_row", None)
    if row is not None and not getattr(row, "_timecma", False):
        def format_row(option) -> str:
            names = ", ".join(f"`{o}`" for o in option.opts)
            if option.secondary_opts:
                names += " / " + ", ".join(f"`{o}`" for o in option.secondary_opts)
            value_type = _docs._format_table_option_type(option)
            description = html.escape(option.help or "", quote=False).replace("\n", " ").replace("|", "&#124;")
            if option.envvar and option.show_envvar:
                description += f" (environment: `{option.envvar}`)"
            default = option.default
            unset = default is None or "UNSET" in repr(default) or callable(default)
            if option.required:
                shown = "*required*"
            elif unset or option.show_default is False:
                shown = ""
            elif option.is_flag and not option.secondary_opts and default is False:
                shown = ""
            else:
                shown = f"`{default}`"
            return f"| {names} | {value_type} | {description} | {shown} |"
        format_row._timecma = True
        _docs._format_table_option_row = format_row
    desc = getattr(_docs, "_make_description", None)
    if desc is not None and not getattr(desc, "_timecma", False):
        def make_description(ctx, remove_ascii_art: bool = False):
            out, block = [], None
            for line in desc(ctx, remove_ascii_art=remove_ascii_art):
                if line.strip() == "\b":
                    block = []
                    continue
                if block is not None:
                    if line.strip():
                        block.append(line)
                        continue
                    out += ["```text", *block, "```", ""]
                    block = None
                out.append(html.escape(line, quote=False))  # "/v2/models/<model>/infer" is text, not a tag
            if block:
                out += ["```text", *block, "```", ""]
            yield from out
        make_description._timecma = True
        _docs._make_description = make_description


def _scripts_table() -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for script, target in _scripts().items():
        module, attr = target.split(":")
        try:
            cmd = getattr(importlib.import_module(module), attr)
            helptext = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
        except Exception as exc:  # the page for the script then fails the build with the real error
            helptext = f"(cannot import `{target}`: {exc})"
        rows.append(f"| [`{script}`]({script}.md) | {helptext} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# HTTP reference
def _openapi() -> tuple[dict, str]:
    """The serving app's OpenAPI document (``create_app()``: the app without a bundle) and its module.
    Nothing stands in for it: whatever stops the app from building its document fails the docs build."""
    from timecma.runtime.serving.app import create_app

    return create_app().openapi(), HTTP_APP_MODULE


def _schema_type(s: dict) -> str:
    if "$ref" in s:
        ref = s["$ref"].rsplit("/", 1)[-1]
        return f"[{ref}](#{_anchor('schema-' + ref)})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            return " or ".join(_schema_type(x) for x in s[key])
    t = s.get("type", "any")
    if t == "array":
        return f"array of {_schema_type(s.get('items', {}))}"
    if t == "object" and "additionalProperties" in s and isinstance(s["additionalProperties"], dict):
        return f"object of {_schema_type(s['additionalProperties'])}"
    return str(t)


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(text) -> str:
    """Text for a table cell: one line, HTML-escaped, pipes and brackets escaped (``[pred_len][N]`` would be
    read as a reference link)."""
    out = html.escape(str(text or ""), quote=False).replace("\n", " ").replace("|", "\\|")
    return out.replace("[", "\\[").replace("]", "\\]")


def _props_table(s: dict) -> list[str]:
    """An object schema's properties as table lines (empty when it has none)."""
    props = s.get("properties", {})
    if not props:
        return []
    req = set(s.get("required", []))
    out = ["| field | type | required | description |", "|---|---|---|---|"]
    for field, fs in props.items():
        desc = fs.get("description") or fs.get("title")
        if "default" in fs:
            desc = f"{desc or ''} (default `{json.dumps(fs['default'])}`)"
        out.append(f"| `{field}` | {_schema_type(fs)} | {'yes' if field in req else 'no'} | {_cell(desc)} |")
    return out + [""]


def _example(schema: dict, media: dict):
    if "example" in media:
        return media["example"]
    for holder in (media, schema):
        ex = holder.get("examples")
        if isinstance(ex, list) and ex:
            return ex[0]
        if isinstance(ex, dict) and ex:
            first = next(iter(ex.values()))
            return first.get("value", first) if isinstance(first, dict) else first
    return None


def _render_openapi(doc: dict, module: str) -> str:
    info = doc.get("info", {})
    out = ["# HTTP API\n",
           f"Generated at build time from the OpenAPI document of the FastAPI app in `{module}` "
           f"(`app.openapi()`; OpenAPI {doc.get('openapi', '?')}). The raw document: "
           "[openapi.json](openapi.json). Start the server with "
           "[`timecma-serve`](../cli/timecma-serve.md); the tutorial is [Serving over HTTP]"
           "(../../tutorials/serving-http.md).\n"]
    if info.get("summary"):
        out.append(f"*{_cell(info['summary'])}*\n")
    if info.get("description"):
        out.append(info["description"] + "\n")
    out.append(f"**{_cell(info.get('title'))}** version `{info.get('version', '?')}`.\n")
    out.append("## Endpoints\n")
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if method.startswith("x-") or not isinstance(op, dict):
                continue
            out.append(f"### {method.upper()} `{path}`\n")
            if op.get("summary"):
                out.append(f"**{_cell(op['summary'])}**\n")
            if op.get("description"):
                out.append(op["description"].strip() + "\n")
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for p in params:
                    out.append(f"| `{p.get('name')}` | {p.get('in')} | {_schema_type(p.get('schema', {}))} | "
                               f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description'))} |")
                out.append("")
            body = op.get("requestBody")
            if body:
                for ctype, media in body.get("content", {}).items():
                    schema = media.get("schema", {})
                    name = schema.get("title") if "$ref" not in schema else None
                    out.append(f"Request body (`{ctype}`{', required' if body.get('required') else ''}): "
                               f"{name or _schema_type(schema)}\n")
                    if schema.get("description") and "$ref" not in schema:
                        out.append(" ".join(schema["description"].split()) + "\n")
                    out += _props_table(schema)
                    ex = _example(schema, media)
                    if ex is not None:
                        out += ["Example:\n", "```json", json.dumps(ex, indent=None), "```", ""]
            responses = op.get("responses", {})
            if responses:
                # the refusals share one body (an error document): one row for all of them
                rows: list[tuple[list[str], list[str], str]] = []
                for status, r in responses.items():
                    kinds = ", ".join(f"`{c}` {_schema_type(m.get('schema', {}))}"
                                      for c, m in (r.get("content") or {}).items())
                    meaning = _cell(r.get("description"))
                    if rows and str(status)[0] in "45" and rows[-1][0][-1][0] in "45" and rows[-1][2] == kinds:
                        rows[-1][0].append(str(status))
                        rows[-1][1].append(meaning)
                    else:
                        rows.append(([str(status)], [meaning], kinds))
                out += ["| status | meaning | body |", "|---|---|---|"]
                out += [f"| {', '.join(st)} | {'; '.join(m)} | {k} |" for st, m, k in rows]
                out.append("")
    schemas = dict(doc.get("components", {}).get("schemas", {}))

    def collect_defs(node):  # inline request schemas carry their nested models in "$defs" ("#/$defs/Name")
        if isinstance(node, dict):
            for name, sub in (node.get("$defs") or {}).items():
                schemas.setdefault(name, sub)
            for v in node.values():
                collect_defs(v)
        elif isinstance(node, list):
            for v in node:
                collect_defs(v)
    collect_defs(doc.get("paths", {}))
    if schemas:
        out.append("## Schemas\n")
        for name, s in schemas.items():
            out.append(f"### {name} {{ #{_anchor('schema-' + name)} }}\n")
            if s.get("description"):
                out.append(s["description"].strip() + "\n")
            table = _props_table(s)
            if table:
                out += table
            elif "enum" in s:
                out.append("One of " + ", ".join(f"`{v}`" for v in s["enum"]) + ".\n")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Results
_WIDE = "---\nhide:\n  - toc\n---\n"  # front matter: run pages are wide tables, the page's contents column goes
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2}(?::\d{2})?)?")


def _machine_line(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Machine:") or (("cores" in s or "EPYC" in s) and len(s) < 600 and not s.startswith("|")):
            s = s.removeprefix("Machine:").strip()
            return s if len(s) <= 160 else s[:157] + "..."
    return ""


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def _run_dirs() -> list[str]:
    if not os.path.isdir(RESULTS):
        return []
    return sorted(d for d in os.listdir(RESULTS)
                  if os.path.isdir(os.path.join(RESULTS, d)) and not d.startswith((".", "_")))


def _loose(ext: str) -> list[str]:
    if not os.path.isdir(RESULTS):
        return []
    return sorted(f for f in os.listdir(RESULTS) if f.endswith(ext) and os.path.isfile(os.path.join(RESULTS, f)))


def _run_page(run: str, config, files: Files) -> tuple[str, str, str]:
    """The page of one results folder; returns (page markdown, title, machine line)."""
    folder = os.path.join(RESULTS, run)
    names = sorted(os.listdir(folder))
    mds = [n for n in names if n.endswith(".md")]
    texts = [_read(os.path.join(folder, n)) for n in mds]
    body = "\n\n".join(texts)
    title = _title(texts[0], run) if texts else run
    note = _budget_note(run, body)
    links = [n if n.endswith(".md") else f"[{n}]({run}/{n})" for n in names]
    out = [_WIDE, f"# {run}\n", f"`benchmarks/results/{run}/`: {', '.join(links)}.\n"]
    if note:
        out.append(_budget_banner(note))
    for n, t in zip(mds, texts):
        if len(mds) > 1:
            out.append(f"## {n}\n")
        out.append(_demote(t, 1))
    for n in names:
        src = os.path.join(folder, n)
        if n.endswith(".md"):
            continue  # rendered above (a copy would be a page of its own)
        files.append(File.generated(config, f"results/runs/{run}/{n}", abs_src_path=src))
        if n.endswith(".png"):
            out.append(f"\n![{n} of {run}]({run}/{n})\n")
    if not mds:
        out.append("This run has no Markdown report; its files are linked above.")
    return "\n".join(out) + "\n", title, _machine_line(body)


def _runs_index(rows: list[tuple[str, str, str, str, bool]]) -> str:
    out = ["# Benchmark runs\n",
           "Every folder and file of `benchmarks/results/`, rendered at build time with its own date and machine "
           "line. A figure quoted elsewhere in these docs names the run it comes from; the run's page is the "
           "record. What the measurements are and what they say is in [Results](../index.md).\n",
           "| run | what | date | machine | |", "|---|---|---|---|---|"]
    for page, run, title, machine, budget in rows:
        date = _DATE.search(title + " " + machine)
        flag = "budget-limited" if budget else ""
        out.append(f"| [{run}]({page}) | {_cell(_DATE.sub('', title).strip(' (),'))} | "
                   f"{date.group(0) if date else ''} | {_cell(machine)} | {flag} |")
    return "\n".join(out) + "\n"


def _results_pages(config, files: Files) -> list[tuple[str, str]]:
    """Generate the run pages; returns [(nav title, src uri)] in navigation order."""
    nav, rows = [], []
    for run in _run_dirs():
        md, title, machine = _run_page(run, config, files)
        uri = f"results/runs/{run}.md"
        files.append(File.generated(config, uri, content=md))
        budget = _budget_note(run, md) is not None
        nav.append((run, uri))
        rows.append((f"{run}.md", run, title, machine, budget))
    for name in _loose(".md"):
        text = _read(os.path.join(RESULTS, name))
        stem = name[:-3]
        uri = f"results/runs/{stem}.md"
        md = _WIDE + f"# {stem}\n\n`benchmarks/results/{name}`\n\n" + _demote(text, 1) + "\n"
        files.append(File.generated(config, uri, content=md))
        nav.append((stem, uri))
        rows.append((f"{stem}.md", stem, _title(text, stem), _machine_line(text), False))
    loose_json = _loose(".json")
    if loose_json:
        out = ["# Single-figure files\n",
               "The loose JSON files of `benchmarks/results/`, each one measurement written by a benchmark "
               "script (named in the file or in the page that quotes it).\n"]
        for name in loose_json:
            text = _read(os.path.join(RESULTS, name))
            files.append(File.generated(config, f"results/runs/files/{name}", abs_src_path=os.path.join(RESULTS, name)))
            out += [f"## {name}\n", f"[download](files/{name})\n", "```json", text.strip(), "```", ""]
        files.append(File.generated(config, "results/runs/files.md", content="\n".join(out) + "\n"))
        nav.append(("single-figure files", "results/runs/files.md"))
        rows.append(("files.md", "single-figure files", ", ".join(loose_json), "", False))
    files.append(File.generated(config, "results/runs/index.md", content=_runs_index(rows)))
    return nav


# --------------------------------------------------------------------------------------------------------------
# markers
def _accuracy() -> str:
    if os.path.isfile(ACCURACY):
        text = _read(ACCURACY)
        return ("The full-training comparison, included at build time from "
                "[`benchmarks/results/accuracy-etth1/results.md`](runs/accuracy-etth1.md):\n\n"
                + _demote(text, 2) + "\n")
    return ('!!! info "Not committed yet"\n'
            "    The full-training accuracy comparison (`dlinear`, `timecma-no-llm`, `timecma` with SmolLM2, "
            "seasonal-naive, repeat-last and the published figures, each trained to early stopping on every "
            "training window) will be `benchmarks/results/accuracy-etth1/results.md`. This page includes that "
            "file at build time as soon as it exists; until then there is no accuracy verdict here.\n")


def _extras_table() -> str:
    extras = _pyproject()["project"].get("optional-dependencies", {})
    rows = ["| extra | installs |", "|---|---|"]
    for name, deps in extras.items():
        rows.append(f"| `timecma[{name}]` | {', '.join(f'`{d}`' for d in deps)} |")
    return "\n".join(rows)


def _metrics_table() -> str:
    """Every Counter/Gauge/Histogram constructed in runtime/serving/metrics.py, read with ast."""
    tree = ast.parse(_read(METRICS_MODULE))
    rows = ["| metric (as exposed) | type | labels | what it counts |", "|---|---|---|---|"]
    suffix = {"Counter": "_total", "Gauge": "", "Histogram": "_bucket, _sum, _count"}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffix):
            continue
        try:
            name = ast.literal_eval(node.args[0])
            helptext = ast.literal_eval(node.args[1])
            labels = ast.literal_eval(node.args[2]) if len(node.args) > 2 else []
        except (ValueError, IndexError):
            continue
        kind = node.func.id
        exposed = f"`{name}_total`" if kind == "Counter" else (
            f"`{name}` (`_bucket`, `_sum`, `_count`)" if kind == "Histogram" else f"`{name}`")
        rows.append(f"| {exposed} | {kind.lower()} | {', '.join(f'`{x}`' for x in labels)} | {_cell(helptext)} |")
    return "\n".join(rows)


MANIFEST_MODULE = os.path.join(ROOT, "timecma", "core", "manifest.py")
CONFIG_MODULE = os.path.join(ROOT, "timecma", "core", "config.py")


def _dataclass_tables(path: str, only: tuple[str, ...] | None = None) -> str:
    """Each @dataclass of a module as a table: field, type, default, the comment on its line. Read with ast
    and tokenize, nothing imported, so the table is the code's and cannot drift."""
    import io
    import tokenize

    src = _read(path)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = []
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef) or (only and node.name not in only):
            continue
        if not any((isinstance(d, ast.Name) and d.id == "dataclass") or
                   (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "dataclass") for d in node.decorator_list):
            continue
        out.append(f"### {node.name}\n")
        doc = ast.get_docstring(node)
        if doc:
            out.append(" ".join(doc.split()) + "\n")
        out += ["| field | type | default | note |", "|---|---|---|---|"]
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                default = ""
                if item.value is not None:
                    default = ast.unparse(item.value)
                    m = re.fullmatch(r"field\(default_factory=(\w+)\)", default)
                    default = f"`{m.group(1)}()`" if m else f"`{default}`"
                note = comments.get(item.lineno, "")
                ann = ast.unparse(item.annotation).replace(" | ", " or ")
                out.append(f"| `{item.target.id}` | `{ann}` | {default.replace('|', 'or') if default else 'required'} "
                           f"| {_cell(note)} |")
        out.append("")
    return "\n".join(out)


def _manifest_tables() -> str:
    return (_dataclass_tables(MANIFEST_MODULE) + "\n### ModelConfig (`model_config`, from `timecma/core/config.py`)\n\n"
            + _dataclass_tables(CONFIG_MODULE, ("ModelConfig",)).split("\n", 2)[2])


MARKERS = {"accuracy": _accuracy, "extras": _extras_table, "scripts": _scripts_table, "metrics": _metrics_table,
           "manifest": _manifest_tables}
_MARKER = re.compile(r"<!-- timecma:([a-z-]+) -->")


# --------------------------------------------------------------------------------------------------------------
# MkDocs events
def _source_tree() -> str:
    """A temporary folder holding the ``timecma`` package as it is installed (``.ci/installed_layout.py``, the
    tree mypy reads too). mkdocstrings reads the API from it statically: griffe follows an editable install's
    top-level packages only, not sub-packages mapped from other folders, and importing is not needed."""
    import atexit
    import importlib.util
    import shutil
    import tempfile

    spec = importlib.util.spec_from_file_location("installed_layout", os.path.join(ROOT, ".ci", "installed_layout.py"))
    assert spec is not None and spec.loader is not None
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    tmp = tempfile.mkdtemp(prefix="timecma-docs-src-")
    atexit.register(shutil.rmtree, tmp, True)
    layout.lay_out(ROOT, os.path.join(tmp, "tree"))
    return os.path.join(tmp, "tree")


@event_priority(100)  # before mkdocstrings' own on_config, which creates the python handler
def on_config(config):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    _patch_mkdocs_click()
    # the API reference: mkdocstrings' python handler reads the package from the merged tree
    plugin = config.plugins.get("mkdocstrings")
    if plugin is not None:
        handlers = plugin.config.handlers
        handlers.setdefault("python", {})["paths"] = [_source_tree()]
    # generated pages in the navigation: a nav entry naming one of these index pages becomes a section
    # holding that index and every generated page of its kind
    runs = [(run, f"results/runs/{run}.md") for run in _run_dirs()]
    runs += [(f[:-3], f"results/runs/{f[:-3]}.md") for f in _loose(".md")]
    if _loose(".json"):
        runs.append(("single-figure files", "results/runs/files.md"))
    sections = {"results/runs/index.md": runs,
                "reference/cli/index.md": [(s, f"reference/cli/{s}.md") for s in _scripts()]}

    def expand(items):
        for item in items or []:
            if isinstance(item, dict):
                for k, v in item.items():
                    if isinstance(v, str) and v in sections:
                        item[k] = [v] + [{t: u} for t, u in sections[v]]
                    elif isinstance(v, list):
                        expand(v)
    expand(config["nav"])
    return config


def on_files(files: Files, config):
    for script, target in _scripts().items():
        files.append(File.generated(config, f"reference/cli/{script}.md", content=_cli_page(script, target)))
    doc, module = _openapi()
    files.append(File.generated(config, "reference/http/openapi.json", content=json.dumps(doc, indent=2)))
    files.append(File.generated(config, "reference/http/index.md", content=_render_openapi(doc, module)))
    log.info("HTTP reference from the OpenAPI document of %s", module)
    _results_pages(config, files)
    return files


def on_page_markdown(markdown: str, page, config, files):
    return _MARKER.sub(lambda m: MARKERS[m.group(1)]() if m.group(1) in MARKERS else m.group(0), markdown)
