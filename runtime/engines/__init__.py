"""Engines: the native wrappers, the runtime's lowest floor.

``trt_flavour`` is the one module that imports TensorRT (standard or RTX, on request);
``cuda`` loads libcudart; ``trt_runner`` runs one engine with shapes checked against its
profiles. Imports ``timecma.core`` only.
"""
