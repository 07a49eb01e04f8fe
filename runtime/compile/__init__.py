"""Compile: compiling and gating variants of a bundle on the machine that serves it (TensorRT
engines, OpenVINO precision variants) and their command line, ``timecma-engines``.

Imports ``runtime.backends``, ``runtime.engines`` and ``timecma.core``; never serving.
"""
