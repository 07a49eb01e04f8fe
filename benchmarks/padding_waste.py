"""How many LLM tokens a store miss spends on padding: one window's N prompts in one right-padded call,
as serving plans them (``core.tokens.plan_llm_batches``: length-sorted sub-batches with a per-call
cost), with no padding at all, and with the window's common prompt prefix computed once.

    python -m benchmarks.padding_waste --llm runs/llm/smollm2 --llm runs/demo/tiny-llm \\
        --time-windows 8 --out benchmarks/results/padding-waste-etth1

Every ETTh1 test window of 96 steps (stride 24), reference template, tokenizers only. With
``--time-windows K`` it also times what sharing the prefix would buy: on K of those windows, eager
PyTorch fp32 (the plain Hugging Face forward, all threads) runs serving's plan as it is and the same
plan over the suffixes after one pass over the prefix whose keys and values they attend to, with the
embedding error between the two. Whether the saved tokens are worth a KV-cache graph is that ratio.
"""

from __future__ import annotations

import json
import os
import time

import click
import numpy as np

from timecma.core.prompts import PromptRenderer, get_template
from timecma.core.tokens import encode_prompts, plan_llm_batches

from .machine import machine_info


def common_prefix(ids: list[np.ndarray]) -> int:
    """Leading tokens every prompt shares, leaving each at least one of its own (its last position is read)."""
    prefix = 0
    while all(len(t) > prefix + 1 for t in ids) and len({int(t[prefix]) for t in ids}) == 1:
        prefix += 1
    return prefix


def window_tokens(ids: list[np.ndarray], max_batch: int = 64) -> dict[str, int]:
    """Tokens the LLM computes for one window's prompts, four ways."""
    lengths = [len(t) for t in ids]
    prefix = common_prefix(ids)
    plan = plan_llm_batches(lengths, max_batch)
    return {"useful": sum(lengths), "one_padded_call": len(ids) * max(lengths),
            "planned_calls": sum(len(g) * max(lengths[i] for i in g) for g in plan), "calls": len(plan),
            "shared_prefix": prefix + sum(n - prefix for n in lengths), "prefix": prefix}


def planned_embeddings(llm, ids: list[np.ndarray], max_batch: int = 64) -> np.ndarray:
    """[N, d] last hidden states as serving computes a window's misses: its planned right-padded calls."""
    from timecma.llm import encode_last_token

    out = np.zeros((len(ids), llm.info.d_llm), dtype=np.float32)
    for g in plan_llm_batches([len(t) for t in ids], max_batch):
        out[g] = encode_last_token(llm, [ids[i] for i in g])
    return out


def shared_prefix_embeddings(llm, ids: list[np.ndarray], max_batch: int = 64) -> np.ndarray:
    """The same [N, d] with the window's common prefix computed once: one batch-1 pass keeps its keys
    and values, and each planned call of suffixes (positions from the prefix on) attends to them."""
    import copy

    import torch

    from timecma.core.tokens import pad_right

    model, prefix = llm.encoder.model, common_prefix(ids)
    out = np.zeros((len(ids), llm.info.d_llm), dtype=np.float32)
    with torch.inference_mode():
        kept = model(input_ids=torch.from_numpy(ids[0][:prefix])[None], use_cache=True).cache
        suffixes = [t[prefix:] for t in ids]
        for g in plan_llm_batches([len(t) for t in suffixes], max_batch):
            x, mask = pad_right([suffixes[i] for i in g], llm.info.pad_id)
            cache = copy.deepcopy(kept)
            cache.batch_repeat_interleave(len(g))
            full_mask = np.concatenate([np.ones((len(g), prefix), np.int64), mask], axis=1)
            pos = torch.arange(prefix, prefix + x.shape[1]).unsqueeze(0).expand(len(g), -1)
            h = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(full_mask), position_ids=pos,
                      cache=cache, use_cache=True).last_hidden_state
            last = torch.from_numpy(mask.sum(axis=1) - 1)
            out[g] = h[torch.arange(len(g)), last].float().numpy()
    return out


def time_sharing(llm_dir: str, windows: list[list[np.ndarray]], reps: int = 3) -> dict:
    """Eager fp32 seconds per window, serving's plan vs the shared prefix (alternating, medians), and the error."""
    import torch

    from timecma.core.accuracy import embedding_errors
    from timecma.llm import load_llm

    llm = load_llm(llm_dir, "cpu", last_position_only=False)  # both paths run the plain forward
    plain: list[float] = []
    shared: list[float] = []
    errs: list[float] = []
    for ids in windows:
        ref, emb = planned_embeddings(llm, ids), shared_prefix_embeddings(llm, ids)  # also the warm-up
        errs.append(embedding_errors(emb, ref)["prompt_rel_l2_max"])
        for _ in range(reps):
            for fn, times in ((planned_embeddings, plain), (shared_prefix_embeddings, shared)):
                t = time.perf_counter()
                fn(llm, ids)
                times.append(time.perf_counter() - t)
    return {"windows": len(windows), "reps": reps, "plan_ms_p50": 1e3 * float(np.median(plain)),
            "shared_prefix_ms_p50": 1e3 * float(np.median(shared)),
            "speedup": float(np.median(plain) / np.median(shared)), "embedding_rel_l2_max": float(max(errs)),
            "torch_threads": torch.get_num_threads()}


@click.command()
@click.option("--llm", "llms", multiple=True, required=True, help="Model directories whose tokenizers to measure.")
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--stride", default=24, show_default=True)
@click.option("--time-windows", default=0, show_default=True,
              help="Also time prefix sharing in eager fp32 on this many windows (spread over the test set).")
@click.option("--out", required=True)
def main(llms: tuple[str, ...], data: str, stride: int, time_windows: int, out: str) -> None:
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
        if time_windows > 0:
            picks = np.linspace(0, len(starts) - 1, time_windows).round().astype(int)
            res["tokenizers"][os.path.basename(os.path.normpath(llm))]["timed"] = time_sharing(
                llm, [ids[i * n:(i + 1) * n] for i in picks])
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
    timed = {k: r["timed"] for k, r in res["tokenizers"].items() if "timed" in r}
    if timed:
        m = res["machine"]
        lines += ["", f"Eager PyTorch fp32, the window's LLM stage (median ms over windows x reps), {m.get('cpu', '?')}, "
                  f"{m.get('cores')} cores, ISA {', '.join(m.get('isa', [])) or 'none listed'}:", "",
                  "| model | serving's plan | prefix computed once | speed-up | embedding error (worst prompt) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {t['plan_ms_p50']:.0f} | {t['shared_prefix_ms_p50']:.0f} | {t['speedup']:.3f}x | "
                  f"{t['embedding_rel_l2_max']:.1e} |" for k, t in timed.items()]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
