"""timecma.runtime: torch-free serving of a timecma bundle.

    from timecma.runtime import Forecaster
    f = Forecaster.load("runs/etth1/bundle", backend="auto", store="runs/etth1/store")
    y = f.predict(window_df)   # [pred_len, N] in original units

Four wings, imports running one way (serving | compile -> backends -> engines -> timecma.core):
``engines/`` native wrappers, ``backends/`` one per engine kind, ``compile/`` compile and
gate variants of a bundle, ``serving/`` the forecaster, batch, Ray and online serving.
"""

from timecma.core.errors import BackendUnavailable, BundleError, InputError

from .backends.base import BACKENDS
from .backends.select import available_backends, make_backend
from .serving.forecaster import Forecaster

__all__ = ["BACKENDS", "BackendUnavailable", "BundleError", "Forecaster", "InputError", "available_backends",
           "make_backend"]
