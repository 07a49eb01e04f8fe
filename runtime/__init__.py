"""timecma.runtime: torch-free serving of a timecma bundle.

    from timecma.runtime import Forecaster
    f = Forecaster.load("runs/etth1/bundle", backend="auto", store="runs/etth1/store")
    y = f.predict(window_df)   # [pred_len, N] in original units
"""

from timecma.core.errors import BackendUnavailable, BundleError, InputError

from .backends import BACKENDS, available_backends, make_backend
from .pipeline import Forecaster

__all__ = ["BACKENDS", "BackendUnavailable", "BundleError", "Forecaster", "InputError", "available_backends",
           "make_backend"]
