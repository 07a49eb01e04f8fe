"""Training (torch): a run's steps, each a module — ``inputs`` (series, splits, scalers), ``embeddings`` (the
prompt step: the store or joint training), ``batches`` (mini-batches, evaluation, naive forecasts), ``loop``
(the recipe's optimizer and schedule, early stopping) and ``run`` (``train``: the steps in order, the
checkpoint). The recipes themselves are torch-free: timecma.core.recipes."""

from .run import RunSpec, train

__all__ = ["RunSpec", "train"]
