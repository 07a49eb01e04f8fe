"""`timecma-bench`: batch-1 latency of every backend against eager PyTorch on the same inputs."""

from __future__ import annotations

import logging

import click

from timecma.core.errors import BackendUnavailable, WriteError, fail

from .harness import BenchConfig, run
from .report import check_outputs, data_record, markdown, write


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--backends", default="torch,torch-bf16,ort-cpu", show_default=True,
              help="Comma-separated: torch, torch-bf16, torch-compile, torch-compile-bf16, ort-cpu[:variant], ort-cuda, "
                   "openvino[:f32|bf16|int8|w8a8], tensorrt[:fp16|fp32]. Eager torch fp32 is the reference for parity; "
                   "speed-ups are given against each of torch, torch-bf16 and torch-compile-bf16 that ran.")
@click.option("--n-vars", default="7,21", show_default=True, help="LLM sweep: prompts per request.")
@click.option("--prompt-tokens", default="64,256", show_default=True, help="LLM sweep: tokens per prompt.")
@click.option("--hit-iters", default=200, show_default=True)
@click.option("--miss-iters", default=10, show_default=True)
@click.option("--sweep-iters", default=5, show_default=True)
@click.option("--budget-s", default=30.0, show_default=True, help="Stop a measured point after this many seconds.")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: ORT's choice).")
@click.option("--data", default=None, help="The data file the bundle was made from, for real windows (the "
                                            "manifest names it by file name and sha256, not by path).")
@click.option("--ckpt", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The checkpoint the bundle was exported from, for the torch rows (default: its file name "
                   "next to the bundle folder, as timecma-export lays it out); checked by sha256.")
@click.option("--precompute-prompts", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also measure embedding precompute throughput over this many real prompts (0: skip).")
@click.option("--precompute-batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--emulated-bf16", is_flag=True,
              help="Also run the torch bf16 rows on a CPU without native bf16 (AVX-512 BF16 or AMX), where PyTorch "
                   "emulates bf16 many times slower than fp32 (skipped there by default, with the reason in the report).")
@click.option("--out", "out_dir", default="bench", show_default=True)
def bench_cmd(bundle: str, backends: str, n_vars: str, prompt_tokens: str, hit_iters: int, miss_iters: int,
              sweep_iters: int, budget_s: float, threads: int | None, data: str | None, ckpt: str | None,
              precompute_prompts: int,
              precompute_batch: int, emulated_bf16: bool, out_dir: str) -> None:
    """Measure, print a table, and write results.json, results.md and latency.png to --out."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig(bundle=bundle, backends=[b.strip() for b in backends.split(",") if b.strip()],
                      n_vars=_ints(n_vars), prompt_tokens=_ints(prompt_tokens), hit_iters=hit_iters,
                      miss_iters=miss_iters, sweep_iters=sweep_iters, budget_s=budget_s, threads=threads, data=data,
                      ckpt=ckpt,
                      precompute_prompts=precompute_prompts, precompute_batch=precompute_batch,
                      emulated_bf16=emulated_bf16)
    try:
        check_outputs(out_dir)  # before minutes of measuring
        res = run(cfg, progress=lambda msg: click.echo(msg, err=True))
        from timecma.core.manifest import read_manifest

        assert data is not None, "run() measures real windows of --data only"
        res["data"] = data_record(data, read_manifest(bundle, verify=False).data.source)  # run() read it: exists
        paths = write(res, out_dir)
    except (FileNotFoundError, ValueError, BackendUnavailable) as exc:  # Input/BundleError are ValueErrors
        fail("timecma-bench", exc)
    except OSError as exc:
        fail("timecma-bench", WriteError(f"cannot write the results to {out_dir}: {exc.strerror or exc}"))
    click.echo(markdown(res))
    click.echo(f"wrote {paths['json']}, {paths['md']}, plot {paths['png']}")
