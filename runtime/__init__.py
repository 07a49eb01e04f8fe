"""timecma.runtime: torch-free serving of a timecma bundle.

    from timecma.runtime import Forecaster
    f = Forecaster.load("runs/etth1/bundle", backend="auto", store="runs/etth1/store")
    y = f.predict(window_df)   # [pred_len, N] in original units
"""

from timecma.manifest import BundleError

from .backends import BACKENDS, available_backends, make_backend
from .pipeline import Forecaster, InputError

__all__ = ["BACKENDS", "BundleError", "Forecaster", "InputError", "available_backends", "make_backend"]
