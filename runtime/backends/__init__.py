"""Backends: one file per engine kind behind the interface in ``base`` (ONNX Runtime, OpenVINO,
TensorRT, eager PyTorch for comparison); ``select`` says which run here and makes one.

Imports ``runtime.engines`` and ``timecma.core``; never serving or compile. ``eager`` is the one
module allowed torch, imported only when ``--backend torch`` is asked for.
"""
