"""Embedding precompute throughput: the public reference's loop, eager PyTorch fp32 batched, and every engine
of ``timecma-train --precompute-backend`` (eager bf16, the exported LLM graph on ONNX Runtime and OpenVINO), on
the same real prompts in one run, each with its embedding error against eager fp32.

    python -m benchmarks.precompute_speed --llm runs/llm/smollm2 --prompts 56 \\
        --out benchmarks/results/precompute-smollm2

``timecma-bench --precompute-prompts N`` runs the same modes on a bundle's LLM.
"""

from __future__ import annotations

import os
import time

import click
import numpy as np

from timecma.core.accuracy import EMBEDDING_GATE, embedding_errors

from .machine import machine_info, machine_line, write_results

ENGINES = ("torch:bf16", "ort-cpu", "openvino", "openvino:bf16", "openvino:int8")


def precompute_modes(fast, ids: list[np.ndarray], batch_size: int, engines=ENGINES, progress=None) -> dict:
    """Prompts/s and embedding error of each way to embed ``ids`` with the LLM ``fast`` (a ``LoadedLLM`` whose
    last block runs at the last position only, as training's precompute does)."""
    from timecma.core.tokens import plan_llm_batches
    from timecma.encoders import prompt_encoder
    from timecma.llm import LastTokenEncoder, LoadedLLM, encode_last_token

    plain = LoadedLLM(LastTokenEncoder(fast.encoder.model, last_position_only=False), fast.tokenizer, fast.info)
    tokens = int(sum(len(i) for i in ids))
    one = [np.array([i]) for i in range(len(ids))]
    bucketed = plan_llm_batches([len(i) for i in ids], batch_size)
    out: dict = {"prompts": len(ids), "tokens": tokens, "batch_size": batch_size, "embedding_gate": EMBEDDING_GATE,
                 "modes": {}}
    ref: np.ndarray | None = None

    def measure(name: str, encode, batches) -> None:
        nonlocal ref
        encode([ids[i] for i in batches[0]])  # warm-up
        emb = np.zeros((len(ids), fast.info.d_llm), np.float32)
        t = time.perf_counter()
        for b in batches:
            emb[b] = encode([ids[i] for i in b])
        sec = time.perf_counter() - t
        ref = emb if ref is None else ref  # the first mode (eager fp32) is the reference
        err = embedding_errors(emb, ref)
        out["modes"][name] = {"seconds": sec, "prompts_per_s": len(ids) / sec, "tokens_per_s": tokens / sec,
                              "llm_calls": len(batches), "embedding_rel_l2_max": err["prompt_rel_l2_max"],
                              "within_embedding_gate": err["prompt_rel_l2_max"] < EMBEDDING_GATE}
        if progress:
            progress(f"precompute {name}: {len(ids) / sec:.2f} prompts/s, worst prompt {err['prompt_rel_l2_max']:.1e}")

    measure("one at a time, plain forward (reference)", lambda b: encode_last_token(plain, b), one)
    measure(f"eager fp32, batched {batch_size}, length-bucketed, plain forward", lambda b: encode_last_token(plain, b),
            bucketed)
    measure(f"eager fp32, batched {batch_size}, length-bucketed, last position only (timecma)",
            lambda b: encode_last_token(fast, b), bucketed)
    for choice in engines:
        try:  # no gate here: the table shows each engine's figure; training refuses past EMBEDDING_GATE
            enc = prompt_encoder(fast, choice, ids[:1], gate=float("inf"))
        except Exception as exc:  # an engine not installed, bf16 on a CPU without it
            out["modes"][f"{choice} (--precompute-backend)"] = {"not_measured": str(exc)[:200]}
            continue
        measure(f"{choice}, batched {batch_size} (--precompute-backend)", enc, bucketed)
        out["modes"][f"{choice}, batched {batch_size} (--precompute-backend)"]["store_precision"] = enc.precision
    first = next(iter(out["modes"].values()))["prompts_per_s"]
    for m in out["modes"].values():
        if "prompts_per_s" in m:
            m["speedup_vs_reference"] = m["prompts_per_s"] / first
    return out


def markdown_rows(pc: dict) -> list[str]:
    """The table of ``precompute_modes``' result (also in timecma-bench's report)."""
    lines = ["| mode | prompts/s | tokens/s | LLM calls | speed-up vs reference | worst prompt rel. L2 vs fp32 |",
             "|---|---|---|---|---|---|"]
    for name, v in pc["modes"].items():
        if "not_measured" in v:
            lines.append(f"| {name} | not measured: {v['not_measured']} | | | | |")
            continue
        gate = "" if v["within_embedding_gate"] else " (past the gate)"
        lines.append(f"| {name} | {v['prompts_per_s']:.2f} | {v['tokens_per_s']:.0f} | {v['llm_calls']} | "
                     f"{v['speedup_vs_reference']:.2f}x | {v['embedding_rel_l2_max']:.1e}{gate} |")
    return lines


@click.command()
@click.option("--llm", "llm_dir", required=True, help="A model directory (timecma-llm fetch-smollm2).")
@click.option("--layers", type=int, default=None, help="First K decoder layers (default: all).")
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--prompts", "n_prompts", default=56, show_default=True, help="Real ETTh1 training prompts.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--engines", default=",".join(ENGINES), show_default=True)
@click.option("--out", required=True)
def main(llm_dir: str, layers: int | None, data: str, n_prompts: int, batch_size: int, engines: str, out: str) -> None:
    from timecma.core.prompts import PromptRenderer, get_template
    from timecma.core.tokens import encode_prompts
    from timecma.data import load_series, make_windows, resolve_split, split_borders
    from timecma.llm import load_llm

    llm = load_llm(llm_dir, layers=layers)
    series = load_series(data, "date")
    borders = split_borders(len(series.values), 96, resolve_split("auto", data), series.frequency)
    starts = make_windows(borders, 96, 96)["train"].starts
    n_win = -(-n_prompts // len(series.variables))
    starts = starts[np.linspace(0, len(starts) - 1, n_win).astype(int)]
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    prompts = renderer.render_series(series.values, series.timestamps, starts, 96)[:n_prompts]
    ids = encode_prompts(llm.backend, prompts)
    res = precompute_modes(llm, ids, batch_size, [e for e in engines.split(",") if e],
                           progress=lambda m: click.echo(m, err=True))
    res.update(llm=os.path.basename(os.path.normpath(llm_dir)), layers=llm.info.extra["layers"],
               model_layers=llm.info.extra["model_layers"], machine=machine_info())
    lines = [f"# Embedding precompute: {res['llm']} ({res['layers']} of {res['model_layers']} layers)", "",
             f"{res['prompts']} real ETTh1 training prompts ({res['tokens']} tokens, "
             f"{min(len(i) for i in ids)}-{max(len(i) for i in ids)} each), batch {batch_size}; one run.", "",
             machine_line(res["machine"]), "", *markdown_rows(res)]
    write_results(out, res, lines)
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
