"""Export the two graphs of a bundle to ONNX with the torch.export-based exporter.

``llm_last_token.onnx``: input_ids, attention_mask [B,S] int64 -> last_hidden [B,d_llm]
``forecaster.onnx``:     x [B,seq_len,N] raw units, prompt_emb [B,N,d_llm] -> y [B,pred_len,N] raw units
B and S are dynamic. The dataset scaler lives inside the forecaster graph, so the runtime
feeds raw values and gets forecasts in original units. CPU serving also gets the forecaster
split in two batch-1 graphs (``export_split_forecaster``) so a repeated window skips the prompt encoder.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Callable

import onnx
import torch
from torch import nn

from timecma.core.scaling import CLIP, FLOOR, Scaler
from timecma.core.files import user_cache_dir
from timecma.core.leftovers import remove_dead_temporaries
from timecma.llm import LastTokenEncoder, LoadedLLM
from timecma.model import ForecastModel, TimeCMA

log = logging.getLogger(__name__)

OPSET = 18  # >= 17 so LayerNormalization is one node


class ForecasterGraph(nn.Module):
    """Dataset scaling around the model: raw units in, raw units out. The formulas are those of
    ``timecma.core.scaling.Scaler`` (standard, or log with offset, floor clamp and +-20 clip)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor
    offset: torch.Tensor

    def __init__(self, model: ForecastModel, scaler: Scaler, encoded: bool = False):
        super().__init__()
        self.model, self.scaler = model, scaler
        # encoded: the second input is the prompt encoder's output (``PromptEncoderGraph``), not the embeddings
        run: Callable[..., torch.Tensor] = model
        if encoded:
            run = _with_prompt_encoder(model).forecast_encoded
        self._run = run
        self.log = scaler.kind == "log"
        self.register_buffer("mean", torch.as_tensor(scaler.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(scaler.std, dtype=torch.float32))
        if self.log:
            self.register_buffer("offset", torch.as_tensor(scaler.offset, dtype=torch.float32))

    def forward(self, x: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.log:
            y = self._run((x - self.mean) / self.std, prompt_emb)
            return y * self.std + self.mean
        z = ((torch.log(torch.clamp(x + self.offset, min=FLOOR)) - self.mean) / self.std).clamp(-CLIP, CLIP)
        y = self._run(z, prompt_emb).clamp(-CLIP, CLIP)
        return torch.exp(y * self.std + self.mean) - self.offset


class PromptEncoderGraph(nn.Module):
    """prompt_emb [B,N,d_llm] -> prompt_enc [B,N,d_llm]: the forecaster's prompt encoder alone."""

    def __init__(self, model: TimeCMA):
        super().__init__()
        self.model = model

    def forward(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        return self.model.encode_prompts(prompt_emb)


def _with_prompt_encoder(model: ForecastModel) -> TimeCMA:
    if not isinstance(model, TimeCMA):
        raise TypeError(f"a {type(model).__name__} has no prompt encoder to export apart")
    return model


def _export(module: nn.Module, args: tuple, path: str, input_names: list[str], output_names: list[str],
            dynamic_shapes: dict | None) -> None:
    """torch.onnx.export(dynamo=True) with the quirks of the installed torch handled here only."""
    module.eval()
    # The exporter's op registry logs one warning per torchvision op when torchvision is not
    # installed; we export no vision ops, so that is noise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The fused "fast path" of nn.TransformerEncoderLayer is a single opaque op; exporting
        # the plain decomposition keeps the graph portable (ONNX Runtime, TensorRT).
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True, verbose=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
    assert program is not None, "torch.onnx.export(dynamo=True) returns the program"
    program.save(path)
    del program  # the checker loads the saved graph again: one copy at a time
    gc.collect()
    onnx.checker.check_model(path, full_check=True)


def export_llm(encoder: LastTokenEncoder, path: str, max_positions: int) -> None:
    """Last-token graph with dynamic batch and sequence (example shape 2 x 8: never 0 or 1)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max_positions)
    ids = torch.randint(1, 50, (2, 8), dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    _export(encoder, (ids, mask), path, ["input_ids", "attention_mask"], ["last_hidden"],
            {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


def export_forecaster(graph: ForecasterGraph, path: str, batch_one: bool = False) -> None:
    """Dynamic batch, or (``batch_one``) a fixed batch of 1: every shape is then a constant,
    the exporter folds the shape arithmetic away, and the graph has fewer nodes, which is
    what a batch-1 request on CPU pays for (microseconds per node, not FLOPs)."""
    cfg = graph.model.cfg
    b = 1 if batch_one else 2
    args: tuple = (torch.randn(b, cfg.seq_len, cfg.num_nodes),)
    names = ["x"]
    if cfg.uses_llm:  # models without the LLM branch take the window alone
        args, names = (*args, torch.randn(b, cfg.num_nodes, cfg.d_llm)), ["x", "prompt_emb"]
    if batch_one:
        _export(graph, args, path, names, ["y"], None)
        return
    batch = torch.export.Dim("batch", min=1, max=4096)
    _export(graph, args, path, names, ["y"], {name: {0: batch} for name in names})


def export_split_forecaster(graph: ForecasterGraph, encoder_path: str, head_path: str) -> None:
    """The forecaster in two batch-1 graphs: the prompt encoder (a function of the stored embeddings
    alone, so serving keeps its output per window) and the head (window + encoded prompts -> y)."""
    cfg = graph.model.cfg
    emb = torch.randn(1, cfg.num_nodes, cfg.d_llm)
    encoder = PromptEncoderGraph(_with_prompt_encoder(graph.model))
    _export(encoder, (emb,), encoder_path, ["prompt_emb"], ["prompt_enc"], None)
    head = ForecasterGraph(graph.model, graph.scaler, encoded=True).eval()
    with torch.no_grad():
        enc = encoder(emb)
    _export(head, (torch.randn(1, cfg.seq_len, cfg.num_nodes), enc), head_path, ["x", "prompt_enc"], ["y"], None)


EXPORT_TMP = ".export-"  # cached_llm_graph's temporaries: .export-<pid>-...


def cached_llm_graph(llm: LoadedLLM) -> tuple[str, float]:
    """The LLM's last-token graph, exported once per store namespace (weights, tokenizer, wrapper version and
    layer count: the graph is a function of these) into the user cache dir, where training's precompute on a
    runtime engine and export both find it; returns its path and the export's seconds (0 when cached).
    Written to a temporary folder and moved into place, the graph file last: a killed export leaves no graph.
    The temporary (``.export-<pid>-``) goes when the export fails; one a killed export left (its PID no longer
    runs) goes on the next call, never one of a live process."""
    enc = llm.encoder  # the namespace fixes the embeddings; these two fix the graph that computes them
    attn = getattr(enc.model.config, "_attn_implementation", None) or "default"
    folder = user_cache_dir("llm-graphs", f"{llm.info.namespace[:32]}-{'last' if enc.last_position_only else 'all'}"
                                          f"-{attn}")
    remove_dead_temporaries(folder, EXPORT_TMP, "an unfinished LLM graph export")
    path = os.path.join(folder, "llm_last_token.onnx")
    if os.path.exists(path):
        return path, 0.0
    t = time.time()
    tmp = tempfile.mkdtemp(prefix=f"{EXPORT_TMP}{os.getpid()}-", dir=folder)
    try:
        export_llm(llm.encoder, os.path.join(tmp, "llm_last_token.onnx"), llm.info.max_positions)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "llm_last_token.onnx"):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, time.time() - t


FP16_HEADROOM = 65504 / 2  # a weight matmul whose input or output reaches this on real inputs stays fp32


def convert_fp16(src: str, dst: str, calibration: list[dict] | None = None) -> dict:
    """fp16 for TensorRT's strongly typed networks, the way mixed-precision recipes for Llama-class
    decoders do it: only the matmuls with a weight operand (the linear layers, nearly all the
    FLOPs) compute in fp16; norms with their squares and reductions, residual adds, softmax,
    attention scores, rotary angles (a position x frequency matmul: fp16 cannot hold angles of
    hundreds of radians) and graph I/O stay fp32. With ``calibration`` feeds, a weight matmul whose
    input or output exceeds half of fp16's range on them (the massive activations of real decoders)
    stays fp32 too. Returns what was converted, for the manifest."""
    model = onnx.load(src)
    weights = _constant_tensors(model)
    linear = [n for n in model.graph.node
              if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]
    if calibration:  # the probe holds a second copy of the graph: this one waits on disk meanwhile
        probes = {n.name: [t for t in (*n.input, *n.output) if t not in weights] for n in linear}
        n_linear = len(linear)
        del model, linear
        large = _large_activations(src, probes, calibration)
        model = onnx.load(src)
        weights = _constant_tensors(model)
        linear = [n for n in model.graph.node if n.name in probes]
        if len(linear) != n_linear:  # the names identify the nodes across the two loads
            raise ValueError(f"{src}: weight matmuls without unique node names; cannot convert to fp16")
    else:
        large = set()
    converted = _matmuls_to_fp16(model, [n for n in linear if n.name not in large])
    onnx.save(model, dst)
    onnx.checker.check_model(dst)
    return {"recipe": "weight-matmuls-fp16", "fp16_matmuls": converted, "matmuls": len(linear),
            "kept_fp32_large_activations": sorted(large)}


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and what nodes compute from them alone (a weight sliced or transposed in the graph)."""
    const = {i.name for i in model.graph.initializer}
    for n in model.graph.node:  # the exporter writes nodes in topological order
        if n.op_type != "Shape" and n.input and all(t in const for t in n.input if t):
            const.update(n.output)
    return const


def _matmuls_to_fp16(model: onnx.ModelProto, nodes: list) -> int:
    """Each node computes in fp16 on an fp16 copy of its weights, between a Cast of its activation
    input and a Cast of its output back to fp32; every other tensor keeps its type. (onnxruntime's
    float16 converter stores even the tensors between two blocked nodes in fp16, which rounds a
    rotary angle of 400 radians to the nearest 0.25.)"""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    order = list(model.graph.node)
    position = {id(n): i for i, n in enumerate(order)}
    before: dict[int, list] = {}
    after: dict[int, list] = {}
    made: set[str] = set()  # weights computed in the graph, already cast once
    for n in nodes:
        x, w, *bias = n.input
        out = n.output[0]
        casts = before.setdefault(position[id(n)], [])
        for name in [w, *bias]:
            if f"{name}_fp16" in inits or f"{name}_fp16" in made:
                continue
            if name in inits:  # stored in fp16: the fp16 graph file is half the size
                half = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), f"{name}_fp16")
                model.graph.initializer.append(half)
                inits[half.name] = half
            else:  # computed from weights in the graph: a Cast that TensorRT folds into the constant
                casts.append(onnx.helper.make_node("Cast", [name], [f"{name}_fp16"], to=onnx.TensorProto.FLOAT16,
                                                   name=f"{name}_to_fp16"))
                made.add(f"{name}_fp16")
        casts.append(
            onnx.helper.make_node("Cast", [x], [f"{out}_in_fp16"], to=onnx.TensorProto.FLOAT16, name=f"{n.name}_in_fp16"))
        after.setdefault(position[id(n)], []).append(
            onnx.helper.make_node("Cast", [f"{out}_fp16"], [out], to=onnx.TensorProto.FLOAT, name=f"{n.name}_out_fp32"))
        n.input[:] = [f"{out}_in_fp16", f"{w}_fp16", *[f"{b}_fp16" for b in bias]]
        n.output[0] = f"{out}_fp16"
    rebuilt = []
    for i, n in enumerate(order):
        rebuilt += before.get(i, []) + [n] + after.get(i, [])
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    # fp32 weights no longer read by any node are dropped (the fp16 copies replaced them)
    read = {t for n in model.graph.node for t in n.input}
    keep = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return len(nodes)


def _large_activations(src: str, probes: dict[str, list[str]], calibration: list[dict]) -> set[str]:
    """Names of the nodes in ``probes`` (node name -> its activation tensors) whose activations exceed
    ``FP16_HEADROOM`` on the feeds. One copy of the graph at a time: the proto goes before the session comes."""
    import numpy as np
    import onnxruntime as ort

    probe = onnx.load(src)
    tensors = sorted({t for ts in probes.values() for t in ts})
    known = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    blob = probe.SerializeToString()
    del probe
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    del blob
    peak = dict.fromkeys(tensors, 0.0)
    for feeds in calibration:  # one call at a time: every matmul's activations at once is large
        for t, v in zip(tensors, sess.run(tensors, feeds)):
            peak[t] = max(peak[t], float(np.abs(v).max()) if v.size else 0.0)
    return {name for name, ts in probes.items() if any(peak.get(t, 0.0) > FP16_HEADROOM for t in ts)}


def optimize_llm_for_cpu(src: str, dst: str, num_heads: int, hidden_size: int, model_type: str) -> list[str]:
    """ONNX Runtime's transformer optimizer (LayerNorm/GELU fusions for a no-cache GPT-2 pass).

    Returns the fused op types it produced, for the manifest.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    kinds = ["gpt2", "bert"] if model_type == "gpt2" else ["bert"]
    for kind in kinds:
        try:
            opt = optimize_model(src, model_type=kind, num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
            break
        except (IndexError, KeyError, ValueError) as exc:
            # The gpt2 post-processing assumes Gemm nodes with a bias, which the dynamo
            # exporter does not always emit; the generic fusions still apply.
            log.info("ORT %s optimizer failed (%s); trying the next", kind, exc)
    else:
        raise RuntimeError("onnxruntime's transformer optimizer could not process the LLM graph")
    opt.save_model_to_file(dst)
    return sorted({n.op_type for n in opt.model.graph.node if n.domain == "com.microsoft"})


def quantize_w8a8(src: str, dst: str, calibration: list[dict]) -> dict:
    """Static int8 weights and activations as a QDQ graph for ONNX Runtime (its VNNI / AMX-INT8 kernels), with
    the same NNCF recipe as the OpenVINO w8a8 IR; returns how it was made, for the manifest."""
    from timecma.runtime.compile.openvino import nncf_w8a8, w8a8_record

    model = onnx.load(src)
    consts = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    float_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and not consts & set(n.input)]
    onnx.save(nncf_w8a8(model, calibration, float_matmuls), dst)
    onnx.checker.check_model(dst)
    return w8a8_record(calibration, float_matmuls)


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic int8 weights for MatMul/Gemm (activations quantized per call): CPU only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     extra_options={"MatMulConstBOnly": True})
    onnx.checker.check_model(dst)
