"""Serving: ``Forecaster`` (one window -> forecast, chaining prompts, store, LLM and forecaster),
batch scoring of parquet files (``batch``, on Ray in ``ray_batch``, the command line in
``batch_cli``) and the online endpoint (``online``).

Imports ``runtime.backends`` and ``timecma.core``; never compile.
"""
