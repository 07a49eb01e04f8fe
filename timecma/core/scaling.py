"""Dataset scalers, fitted on training rows (torch-free; the exported forecaster graph applies the
same formulas, and the tests hold the two to each other).

``standard`` (default, the paper's): per variable (v - mean) / std.

``log`` (spike-aware): per variable an offset so the training minimum maps to 1
(offset = 1 - min_train), then log, then standardisation, then clipping at +-20 so that a
spike cannot blow up gradients. The inverse is exact inside the clip range: un-standardise,
exp, minus the offset. A value at or below the floor (v + offset <= FLOOR, a new all-time low
far below the training minimum) cannot be logged: it is clamped to the floor and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

CLIP = 20.0
FLOOR = 1e-6  # smallest v + offset the log scaler takes (log(1e-6) = -13.8)
KINDS = ("standard", "log")


@dataclass
class Scaler:
    kind: str
    mean: np.ndarray
    std: np.ndarray
    offset: np.ndarray | None = None

    @classmethod
    def fit(cls, values: np.ndarray, variables: list[str], kind: str = "standard") -> "Scaler":
        if kind not in KINDS:
            raise InputError(f"unknown scaler {kind!r}; choose from {KINDS}")
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # non-finite columns are refused below, by name
            const = [variables[j] for j in np.flatnonzero(values.std(axis=0) == 0)]
        if const:
            raise InputError(f"constant column(s) {const} in the training rows: nothing to learn or scale")
        if kind == "standard":
            return cls(kind, values.mean(axis=0), values.std(axis=0))
        offset = 1.0 - values.min(axis=0)
        bad = [variables[j] for j in np.flatnonzero(~np.isfinite(offset))]
        if bad:
            raise InputError(f"log scaler: non-finite offset for column(s) {bad}")
        z = np.log(values + offset)
        std = z.std(axis=0)
        const = [variables[j] for j in np.flatnonzero(~(std > 0))]
        if const:
            raise InputError(f"log scaler: column(s) {const} are constant after the log; use --scaler standard")
        return cls(kind, z.mean(axis=0), std, offset)

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Raw -> normalised (the model's units)."""
        if self.kind == "standard":
            return (values - self.mean) / self.std
        z = (np.log(np.maximum(values + self.offset, FLOOR)) - self.mean) / self.std
        return np.clip(z, -CLIP, CLIP)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Normalised -> raw."""
        if self.kind == "standard":
            return y * self.std + self.mean
        return np.exp(np.clip(y, -CLIP, CLIP) * self.std + self.mean) - self.offset

    def below_floor(self, values: np.ndarray) -> np.ndarray:
        """Per window ([W, L, N] -> [W]): how many values the log scaler clamps (0 for standard)."""
        values = np.asarray(values)
        if self.kind == "standard":
            return np.zeros(values.shape[0], dtype=np.int64)
        return (values + self.offset <= FLOOR).reshape(values.shape[0], -1).sum(axis=1)

    def to_contract(self) -> dict:
        """The fields the checkpoint's data contract and the manifest record."""
        return {"scaler_kind": self.kind, "scaler_mean": self.mean.tolist(), "scaler_std": self.std.tolist(),
                "scaler_offset": None if self.offset is None else self.offset.tolist()}

    @classmethod
    def from_contract(cls, d) -> "Scaler":
        """From a data contract (dataclass or dict) with scaler_kind / _mean / _std / _offset."""
        get = d.get if isinstance(d, dict) else (lambda k, default=None: getattr(d, k, default))
        off = get("scaler_offset", None)
        return cls(get("scaler_kind", "standard") or "standard", np.asarray(get("scaler_mean"), dtype=np.float64),
                   np.asarray(get("scaler_std"), dtype=np.float64), None if off is None else np.asarray(off, np.float64))
