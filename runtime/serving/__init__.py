"""Serving: ``Forecaster`` (one window -> forecast, chaining prompts, store, LLM and forecaster),
batch scoring of parquet files (``batch``, on Ray in ``ray_batch``, the command line in
``batch_cli``) and the online endpoint (``app`` on ``single_process`` or ``ray_serve``; ``serve_cli``).

Imports ``runtime.backends`` and ``timecma.core``; never compile.
"""
