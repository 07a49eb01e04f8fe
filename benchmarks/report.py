"""results.json -> results.md (tables) and latency.png (a plot read at a glance)."""

from __future__ import annotations

import functools
import io
import json
import os

from timecma.core.files import atomic_write_bytes, check_replaceable, is_marked_png, png_mark, png_text

from .harness import ANCHORS, FASTEST_TORCH, KINDS, STAGES
from .precompute_speed import markdown_rows

FILES = {"json": "results.json", "md": "results.md", "png": "latency.png"}
PNG_WRITER = "timecma-bench"  # latency.png's mark (timecma.core.files.png_mark): how a later run knows it is its own
PNG_TITLE = "timecma-bench latency"  # the mark of plots written before it (their Title metadata)


def data_record(path: str, bundle_source: dict) -> dict:
    """The data file the windows were read from (name and sha256), beside the one the bundle was made from."""
    from timecma.core.files import file_sha256

    sha = file_sha256(path)
    return {"file": os.path.basename(path), "sha256": sha,
            "bundle_data": {k: bundle_source.get(k) for k in ("file", "sha256", "rows")},
            "same_as_bundle_data": sha == bundle_source.get("sha256")}


def _data_words(res: dict) -> str:
    """Which data file the windows came from: a results file must name the data it measured."""
    d = res.get("data") or {}
    name = d.get("file") or os.path.basename((res.get("config") or {}).get("data") or "")
    if not name:
        return "Real windows of a data file the results do not name"
    words = f"Real windows of `{name}`"
    if d.get("sha256"):
        trained = (d.get("bundle_data") or {}).get("file")
        words += f" (sha256 {d['sha256'][:12]}; " + (
            "the data the bundle was made from)" if d.get("same_as_bundle_data")
            else f"NOT the data the bundle was made from, `{trained}`)")
    return words


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def markdown(res: dict) -> str:
    m, b = res["machine"], res["bundle"]
    anchors = [a for a in (*ANCHORS, FASTEST_TORCH) if any(a in r.get("speedup_vs", {}) for r in res["backends"].values())]
    fastest = res.get("fastest_torch", {})
    lines = [
        f"# timecma-bench: batch-1 latency ({m['date']})", "",
        f"Machine: {m.get('cpu')}, {m['cores']} cores, ISA {', '.join(m.get('isa', [])) or 'n/a'}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), numpy {m['numpy']}.", "",
        f"Bundle: model `{b.get('model', 'timecma')}`, "
        + (f"LLM `{b['llm']}` (d_llm {b['d_llm']})" if b["llm"] else "no LLM") + f", N = {b['n_vars']} variables, seq_len {b['seq_len']}, "
        f"pred_len {b['pred_len']}. {_data_words(res)}; the same inputs for every backend. Reference for parity and "
        f"speed-up: `{res['reference']}`. Parity: max |forecast - reference| / series std over the miss windows. Store: `miss` a new "
        "window; `prompt-hit` a new window whose prompts the store holds; `hit` a window served before (backends that "
        "run the forecaster split read its encoded prompts from the store and skip the prompt encoder).", "",
        *_bf16_note(res, fastest),
        "## End to end (one window, N prompts), milliseconds", "",
        "| backend | store | p50 | p90 | p99 | " + " | ".join(f"{s} p50" for s in STAGES)
        + "".join(" | speed-up vs fastest PyTorch row" if a == FASTEST_TORCH else f" | speed-up vs {a}" for a in anchors)
        + " | parity | gate (val MSE change) |",
        "|---|---|---|---|---|" + "---|" * (len(STAGES) + len(anchors)) + "---|---|",
    ]
    for spec, r in res["backends"].items():
        if "skipped" in r:
            lines.append(f"| {spec} | - | skipped: {r['skipped']} |" + " |" * (len(STAGES) + len(anchors) + 4))
            continue
        for kind in (k for k in KINDS if k in r):
            e, st = r[kind]["end_to_end_ms"], r[kind]["stages_ms"]
            sp = [r.get("speedup_vs", {}).get(a, {}).get(kind) for a in anchors]
            lines.append(f"| {spec} | {kind} | {_ms(e['p50'])} | {_ms(e['p90'])} | {_ms(e['p99'])} | "
                         + " | ".join(_ms(st[s]["p50"]) for s in STAGES)
                         + "".join((f" | {x:.2f}x" + (f" ({fastest[kind]})" if a == FASTEST_TORCH else "")) if x
                                   else " | -" for a, x in zip(anchors, sp))
                         + f" | {r['parity_vs_reference']['max_abs_over_series_std']:.1e} | "
                         + (", ".join(f"{g} {r['precision'][g]} {100 * c:+.2f}%"
                                      for g, c in r.get("gate_mse_rel_change", {}).items()) or "-") + " |")
    if res["sweep"]:
        lines += ["", "## LLM stage alone: N prompts x T tokens, p50 ms (parity: max abs vs reference / max |reference|)",
                  "", "| backend | N | tokens | p50 | p90 | parity |", "|---|---|---|---|---|---|"]
        for s in res["sweep"]:
            lines.append(f"| {s['backend']} | {s['n_vars']} | {s['prompt_tokens']} | {_ms(s['llm_ms']['p50'])} | "
                         f"{_ms(s['llm_ms']['p90'])} | {s['parity_rel_to_max']:.1e} |")
    pc = res.get("precompute")
    if pc:
        lines += ["", f"## Embedding precompute throughput ({pc['prompts']} real prompts, {pc['tokens']} tokens)", "",
                  *markdown_rows(pc)]
    return "\n".join(lines) + "\n"


def _bf16_note(res: dict, fastest: dict) -> list[str]:
    """Where the bf16 anchors ran without native bf16, say so: they are no baseline a user there would pick."""
    bf16 = [s for s, r in res["backends"].items() if s.startswith("torch") and "bf16" in s and "skipped" not in r]
    if not bf16 or {"avx512_bf16", "amx_bf16"} & set(res["machine"].get("isa", [])):
        return []
    miss = res["backends"]["torch"]["miss"]["end_to_end_ms"]["p50"] if "torch" in res["backends"] else None
    slower = ", ".join(f"`{s}` {res['backends'][s]['miss']['end_to_end_ms']['p50'] / miss:.1f}x"
                       for s in bf16) if miss else ""
    return ["This CPU has no native bf16 (neither AVX-512 BF16 nor AMX): PyTorch runs its bf16 rows emulated"
            + (f", slower than eager fp32 on a store miss ({slower})" if slower else "")
            + f"; the fastest PyTorch row for a store miss is `{fastest.get('miss', '?')}`, and that column is the "
            "speed-up a user here gets.", ""]


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in res["backends"].items() if "skipped" not in v}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    labels, bottoms = [], []
    colors = dict(zip(STAGES, ["#9ecae1", "#6baed6", "#fdae6b", "#e6550d", "#31a354"]))
    x = 0
    for spec, r in ok.items():
        for kind in (k for k in KINDS if k in r):
            bottom = 0.0
            for s in STAGES:
                v = r[kind]["stages_ms"][s]["p50"]
                ax.bar(x, v, bottom=bottom, color=colors[s], label=s if x == 0 else None)
                bottom += v
            ax.text(x, bottom, _ms(r[kind]["end_to_end_ms"]["p50"]), ha="center", va="bottom", fontsize=8)
            labels.append(f"{spec}\n{kind}")
            bottoms.append(bottom)
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per request (p50, log scale)")
    ax.set_title("End to end per stage, batch 1 (store miss / prompt hit / hit)")
    ax.legend(fontsize=8)
    ax = axes[1]
    toks = sorted({s["prompt_tokens"] for s in res["sweep"]})
    for spec in ok:
        for t in toks:
            pts = sorted((s["n_vars"], s["llm_ms"]["p50"]) for s in res["sweep"] if s["backend"] == spec
                         and s["prompt_tokens"] == t)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{spec}, {t} tokens")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of variables N (prompts per request)")
    ax.set_ylabel("LLM stage ms (p50)")
    ax.set_title("LLM latency against the number of variables")
    if res["sweep"]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no LLM in this bundle", ha="center", va="center", transform=ax.transAxes)
    m = res["machine"]
    fig.suptitle(f"timecma-bench — {m.get('cpu')} ({m['cores']} cores), d_llm {res['bundle']['d_llm']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=png_mark(PNG_WRITER))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _ours(kind: str, path: str) -> bool:
    """Whether ``path`` is a file an earlier timecma-bench run wrote (the only files it replaces)."""
    try:
        if kind == "json":
            with open(path) as f:
                res = json.load(f)
            return isinstance(res, dict) and {"machine", "backends", "reference"} <= set(res)
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except (OSError, ValueError):
        return False
    if kind == "md":
        return head.startswith(b"# timecma-bench")
    return (is_marked_png(path, PNG_WRITER) or png_text(path).get("Title") == PNG_TITLE
            or head.startswith(b"\x89PNG") and _ours("json", os.path.join(os.path.dirname(path), FILES["json"])))


def check_outputs(out_dir: str) -> None:
    """Before measuring: the three files may be replaced only where an earlier run wrote them (or they are
    empty); anything else is refused (InputError naming it), untouched."""
    for kind, name in FILES.items():
        check_replaceable(os.path.join(out_dir, name), functools.partial(_ours, kind),
                          f"a {name} that timecma-bench wrote")


def write(res: dict, out_dir: str) -> dict[str, str]:
    """results.json, results.md and latency.png in ``out_dir``, each written atomically (temporary + rename)."""
    os.makedirs(out_dir, exist_ok=True)
    check_outputs(out_dir)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    atomic_write_bytes(paths["json"], json.dumps(res, indent=2).encode())
    atomic_write_bytes(paths["md"], markdown(res).encode())
    plot(res, paths["png"])
    return paths
