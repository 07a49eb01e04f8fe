"""What every benchmark result records of the machine it ran on: CPU and ISA flags, cores, versions, threads."""

from __future__ import annotations

import json
import os
import platform
import time

from timecma.core.files import atomic_write_bytes
from timecma.core.machine import cpu_info


def machine_info() -> dict:
    """CPU, cores, ISA flags that matter here, library versions and thread counts."""
    info: dict = {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_info()}
    import numpy
    import onnxruntime

    info["numpy"], info["onnxruntime"] = numpy.__version__, onnxruntime.__version__
    info["ort_providers"] = onnxruntime.get_available_providers()
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def machine_line(m: dict) -> str:
    """The results.md line that says which machine a figure came from (CPU, cores, ISA flags, date)."""
    return f"Machine: {m.get('cpu')}, {m.get('cores')} cores, ISA {', '.join(m.get('isa', []))}; {m['date']}."


def write_results(out: str, res: dict, md_lines: list[str]) -> None:
    """A benchmark's two files: results.json (every figure) and results.md (the table a reader wants)."""
    os.makedirs(out, exist_ok=True)  # each file whole or not at all: a reader never sees half a table
    atomic_write_bytes(os.path.join(out, "results.json"), json.dumps(res, indent=2).encode())
    atomic_write_bytes(os.path.join(out, "results.md"), ("\n".join(md_lines) + "\n").encode())
