"""How many LLM tokens a store miss spends on padding: one window's N prompts in one right-padded call,
as serving plans them (``core.tokens.plan_llm_batches``: length-sorted sub-batches with a per-call
cost), with no padding at all, and with the window's common prompt prefix computed once.

    python -m benchmarks.padding_waste --llm runs/llm/smollm2 --llm runs/demo/tiny-llm \\
        --out benchmarks/results/padding-waste-etth1

Tokenizers only: no model runs. Every ETTh1 test window of 96 steps (stride 24), reference template.
"""

from __future__ import annotations

import json
import os

import click
import numpy as np

from timecma.core.prompts import PromptRenderer, get_template
from timecma.core.tokens import encode_prompts, plan_llm_batches

from .machine import machine_info


def window_tokens(ids: list[np.ndarray], max_batch: int = 64) -> dict[str, int]:
    """Tokens the LLM computes for one window's prompts, four ways."""
    lengths = [len(t) for t in ids]
    prefix = 0
    while all(len(t) > prefix for t in ids) and len({int(t[prefix]) for t in ids}) == 1:
        prefix += 1
    plan = plan_llm_batches(lengths, max_batch)
    return {"useful": sum(lengths), "one_padded_call": len(ids) * max(lengths),
            "planned_calls": sum(len(g) * max(lengths[i] for i in g) for g in plan), "calls": len(plan),
            "shared_prefix": prefix + sum(n - prefix for n in lengths), "prefix": prefix}


@click.command()
@click.option("--llm", "llms", multiple=True, required=True, help="Model directories whose tokenizers to measure.")
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--stride", default=24, show_default=True)
@click.option("--out", required=True)
def main(llms: tuple[str, ...], data: str, stride: int, out: str) -> None:
    from transformers import AutoTokenizer

    from timecma.data import load_series, make_windows, resolve_split, split_borders

    series = load_series(data, "date")
    borders = split_borders(len(series.values), 96, resolve_split("auto", data), series.frequency)
    starts = make_windows(borders, 96, 96)["test"].starts[::stride]
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    n = len(series.variables)
    res: dict = {"data": os.path.basename(data), "windows": int(len(starts)), "n_vars": n, "tokenizers": {},
                 "machine": machine_info()}
    for llm in llms:
        tok = AutoTokenizer.from_pretrained(llm).backend_tokenizer
        ids = encode_prompts(tok, renderer.render_series(series.values, series.timestamps, starts, 96))
        rows = [window_tokens(ids[i * n:(i + 1) * n]) for i in range(len(starts))]
        tot = {k: int(sum(r[k] for r in rows)) for k in rows[0]}
        res["tokenizers"][os.path.basename(os.path.normpath(llm))] = {
            "prompt_tokens_min": int(min(len(t) for t in ids)), "prompt_tokens_max": int(max(len(t) for t in ids)),
            "totals": tot, "prefix_tokens_median": float(np.median([r["prefix"] for r in rows])),
            "padding_share_one_call": 1 - tot["useful"] / tot["one_padded_call"],
            "padding_share_planned": 1 - tot["useful"] / tot["planned_calls"],
            "saved_by_prefix_sharing": 1 - tot["shared_prefix"] / tot["useful"]}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [f"# Padding waste on {res['data']}: {res['windows']} test windows x {n} prompts (reference template)", "",
             "| tokenizer | tokens per prompt | padding, one call per window | padding, serving's plan (calls/window) "
             "| computed once if the common prefix were shared |", "|---|---|---|---|---|"]
    for name, r in res["tokenizers"].items():
        lines.append(f"| {name} | {r['prompt_tokens_min']}-{r['prompt_tokens_max']} | "
                     f"{100 * r['padding_share_one_call']:.1f}% | {100 * r['padding_share_planned']:.1f}% "
                     f"({r['totals']['calls'] / res['windows']:.1f}) | {r['prefix_tokens_median']:.0f} tokens, "
                     f"{100 * r['saved_by_prefix_sharing']:.1f}% of the useful tokens |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
