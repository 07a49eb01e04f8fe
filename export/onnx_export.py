"""Export the two graphs of a bundle to ONNX with the torch.export-based exporter.

``llm_last_token.onnx``: input_ids, attention_mask [B,S] int64 -> last_hidden [B,d_llm]
``forecaster.onnx``:     x [B,seq_len,N] raw units, prompt_emb [B,N,d_llm] -> y [B,pred_len,N] raw units
B and S are dynamic. The dataset scaler lives inside the forecaster graph, so the runtime
feeds raw values and gets forecasts in original units.
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import nn

from timecma.core.scaling import CLIP, FLOOR, Scaler
from timecma.llm import LastTokenEncoder

log = logging.getLogger(__name__)

OPSET = 18  # >= 17 so LayerNormalization is one node


class ForecasterGraph(nn.Module):
    """Dataset scaling around the model: raw units in, raw units out. The formulas are those of
    ``timecma.core.scaling.Scaler`` (standard, or log with offset, floor clamp and +-20 clip)."""

    def __init__(self, model: nn.Module, scaler: Scaler):
        super().__init__()
        self.model = model
        self.log = scaler.kind == "log"
        self.register_buffer("mean", torch.as_tensor(scaler.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(scaler.std, dtype=torch.float32))
        if self.log:
            self.register_buffer("offset", torch.as_tensor(scaler.offset, dtype=torch.float32))

    def forward(self, x: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.log:
            y = self.model((x - self.mean) / self.std, prompt_emb)
            return y * self.std + self.mean
        z = ((torch.log(torch.clamp(x + self.offset, min=FLOOR)) - self.mean) / self.std).clamp(-CLIP, CLIP)
        y = self.model(z, prompt_emb).clamp(-CLIP, CLIP)
        return torch.exp(y * self.std + self.mean) - self.offset


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
    program.save(path)
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


def convert_fp16(src: str, dst: str) -> None:
    """fp16 weights and math for TensorRT's strongly typed networks; numerically sensitive ops
    (LayerNorm, Softmax, Pow/ReduceMean, Gather of the last token) and graph I/O stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src)
    fp16 = convert_float_to_float16(
        model, keep_io_types=True,
        op_block_list=["LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "Erf",
                       "GatherElements", "Range", "CumSum", "ReduceSum"],
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(fp16)
    wrapped.topological_sort()  # the converter appends Cast nodes out of order
    onnx.save(wrapped.model, dst)
    onnx.checker.check_model(dst)


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


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic int8 weights for MatMul/Gemm (activations quantized per call): CPU only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     extra_options={"MatMulConstBOnly": True})
    onnx.checker.check_model(dst)
