"""Logging for the command-line tools of the training side (train, export, llm, ablation): one setup."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """Our own loggers at INFO; third-party ones (exporter, ORT optimizer) only at WARNING unless -v, so
    progress stays readable."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("timecma").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
