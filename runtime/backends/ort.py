"""ONNX Runtime backends (``ort-cpu``, ``ort-cuda`` with IO binding and CUDA graphs) and the one
ORT session factory that serving, export's measurements, the OpenVINO gate and the benchmarks use."""

from __future__ import annotations

import functools
import os

import numpy as np

from timecma.core.errors import BundleError
from timecma.core.manifest import Manifest
from timecma.core.store import FP32, precision_tag

from .base import HEAD_THREADS, forecaster_feeds, split_id


def ort_module():
    import onnxruntime as ort

    return ort


def ort_session(path: str, device: str = "cpu", threads: int | None = None, cuda_graph: bool = False,
                spin: bool = True):
    """The one ONNX Runtime session factory (serving, export's measurements, benchmarks): all graph
    optimisations; ``threads`` intra-op threads (None: ORT's choice); CUDA with optional CUDA graph;
    ``spin=False`` for a session another one runs right after (its idle threads would spin against it)."""
    ort = ort_module()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}))
    return ort.InferenceSession(path, opts, providers=providers)


class OrtBackend:
    """ONNX Runtime on CPU, or CUDA with IO binding (outputs bound to host, inputs copied once)."""

    limits: dict[str, int] = {}

    def __init__(self, bundle_dir: str, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 llm_variant: str | None = None, cuda_graph: bool = True):
        ort = ort_module()
        self.name = "ort-cuda" if device == "cuda" else "ort-cpu"
        self.device = device
        llm, fc = manifest.graphs.get("llm"), manifest.graphs["forecaster"]
        self.llm = self.llm_variant = None
        self.llm_precision = FP32
        if llm is not None:  # models without the LLM branch have no LLM graph
            variant = llm_variant or (llm.cpu_preferred if device == "cpu" else "fp32")
            if variant not in llm.files:
                raise BundleError(f"bundle has no LLM graph variant {variant!r}; it has {sorted(llm.files)}")
            self.llm_variant = variant
            self.llm_precision = precision_tag(self.name, variant)
            self.llm = ort_session(os.path.join(bundle_dir, llm.files[variant].file), device, threads)
        self.fc = ort_session(os.path.join(bundle_dir, fc.files["fp32"].file), device, threads,
                              cuda_graph=cuda_graph)
        # batch-1 requests on CPU: the graph and thread count export measured fastest
        self.fc1 = self.fc
        b1 = fc.cpu_batch1
        if device == "cpu" and b1:
            self.fc1 = ort_session(os.path.join(bundle_dir, b1.file), device, threads or b1.info.get("threads"))
        # batch-1 requests with a store on CPU: prompt encoder and head apart (``Backend.split``), loaded on first
        # use (a Forecaster without a store never runs them)
        self.split = split_id(manifest) if device == "cpu" else None
        self._bundle_dir, self._split, self._threads = bundle_dir, fc.cpu_split, threads
        self._fc_graph = device == "cuda" and cuda_graph
        if self._fc_graph:
            cfg = manifest.model_config
            # CUDA graphs replay fixed device addresses: bind batch-1 buffers once, copy into them.
            self._x = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.seq_len, cfg.num_nodes), np.float32, "cuda", 0)
            self._y = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.pred_len, cfg.num_nodes), np.float32, "cuda", 0)
            self._binding = self.fc.io_binding()
            self._binding.bind_ortvalue_input("x", self._x)
            if llm is not None:
                self._e = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.num_nodes, cfg.d_llm), np.float32,
                                                                     "cuda", 0)
                self._binding.bind_ortvalue_input("prompt_emb", self._e)
            self._binding.bind_ortvalue_output("y", self._y)

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert self.llm is not None, "run_llm on a bundle without an LLM graph"
        if self.device == "cpu":
            return self.llm.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        binding = self.llm.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_output("last_hidden", "cpu")
        self.llm.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        """ORT sessions are freed with the object."""

    @functools.cached_property
    def _enc(self):
        assert self._split is not None, "the split graphs of a bundle without them (Backend.split is None)"
        return ort_session(os.path.join(self._bundle_dir, self._split.prompt_encoder.file), self.device, self._threads,
                           spin=False)

    @functools.cached_property
    def _head(self):
        assert self._split is not None, "the split graphs of a bundle without them (Backend.split is None)"
        return ort_session(os.path.join(self._bundle_dir, self._split.head.file), self.device, HEAD_THREADS)

    def run_prompt_encoder(self, prompt_emb: np.ndarray) -> np.ndarray:
        return self._enc.run(None, {"prompt_emb": prompt_emb})[0]

    def run_head(self, x: np.ndarray, prompt_enc: np.ndarray) -> np.ndarray:
        return self._head.run(None, {"x": x, "prompt_enc": prompt_enc})[0]

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        feeds = forecaster_feeds(x, prompt_emb)
        if self._fc_graph and feeds["x"].shape[0] == 1:
            self._x.update_inplace(feeds["x"])
            if prompt_emb is not None:
                self._e.update_inplace(feeds["prompt_emb"])
            self.fc.run_with_iobinding(self._binding)
            return self._y.numpy()
        if self.device == "cuda":  # other batch sizes: a plain CUDA run, one at a time under the graph
            if not self._fc_graph:
                return self.fc.run(None, feeds)[0]
            return np.concatenate([self.run_forecaster(x[i:i + 1], None if prompt_emb is None else prompt_emb[i:i + 1])
                                   for i in range(len(x))])
        sess = self.fc1 if feeds["x"].shape[0] == 1 else self.fc
        return sess.run(None, feeds)[0]
