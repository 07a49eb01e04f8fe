"""The request and response documents of ``POST /forecast`` and the describing routes, as pydantic models
(they are the OpenAPI schema), and the conversion of a validated request into the arrays the forecaster
takes.

A body is validated from its bytes by pydantic-core (``model_validate_json``): its JSON parser refuses
what Python's ``json`` would raise on (an integer of 5,000 digits, arrays nested past its recursion
limit) with a validation error, and numbers are strict (``"12"`` and ``true`` are not numbers). Every
failure is an ``InputError`` with a one-line message naming the place: a 400, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

from timecma.core.conformal import parse_levels
from timecma.core.errors import InputError

# one number of a window: strict (no strings, no booleans); an integer is a number; inf/NaN are read and
# refused by the forecaster with the place they are at
Number = float
Levels = Annotated[Union[list[int], str, None], Field(
    default=None, description="Interval levels in percent, e.g. [80, 95] or \"80,95\": adds split-conformal "
                              "bounds (`intervals`) shaped like the forecast.", examples=[[80, 95]])]


class WindowRequest(BaseModel):
    """One window: ``seq_len`` timestamps and as many rows of values, columns in ``GET /metadata``'s order."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [
        {"timestamps": ["2018-02-20T00:00:00", "..."], "values": [[5.8, 2.0, 1.3, 0.4, 3.9, 1.2, 8.3], "..."]}]})
    timestamps: list[str] = Field(description="ISO 8601 timestamps, oldest first, one per row (naive, or 'Z': UTC)")
    values: list[list[Number]] = Field(description="[seq_len][N] numbers in original units")
    levels: Levels


class RecordsRequest(BaseModel):
    """One window as records: one object per row with the time column and every variable by name."""

    model_config = ConfigDict(strict=True)
    records: list[dict[str, Union[Number, str]]]
    levels: Levels


def _request_kind(doc: Any) -> str | None:
    if isinstance(doc, list):
        return "list"
    if isinstance(doc, dict):
        return "records" if "records" in doc else "window"
    return None


ForecastRequest = Annotated[Union[
    Annotated[WindowRequest, Tag("window")],
    Annotated[RecordsRequest, Tag("records")],
    Annotated[list[dict[str, Union[Number, str]]], Tag("list")],
], Discriminator(_request_kind, custom_error_type="body_kind",
                 custom_error_message="request body must be a JSON object or a list of records")]
FORECAST_REQUEST = TypeAdapter(ForecastRequest, config=ConfigDict(strict=True))


class Interval(BaseModel):
    lo: list[list[float]]
    hi: list[list[float]]


class ForecastResponse(BaseModel):
    """The forecast in original units: ``pred_len`` timestamps after the window, one row of N values each."""

    timestamps: list[str]
    variables: list[str]
    forecast: list[list[float]] = Field(description="[pred_len][N]")
    intervals: dict[str, Interval] | None = Field(None, description="level -> bounds, when levels were asked")


FORECAST_RESPONSE = TypeAdapter(ForecastResponse)


class Metadata(BaseModel):
    variables: list[str]
    time_col: str
    seq_len: int
    pred_len: int
    frequency: str
    backend: str
    model: str
    llm: str | None


class Health(BaseModel):
    status: str = Field(description="'ok'; 'starting' while warming up; 'stopped' once the forecasting thread "
                                    "has ended")


class ErrorDoc(BaseModel):
    error: str


# -- validation errors as one line ---------------------------------------------------------------------
def _where(loc: tuple) -> str:
    out = ""
    if len(loc) > 1 and loc[0] == "list" and isinstance(loc[1], int):  # a bare list of records
        out, loc = f"record {loc[1]}", loc[2:]
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("window", "records", "list"):  # the union's tags
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic ValidationError as one line: where, and what was wrong (the first few places)."""
    errors = exc.errors(include_url=False, include_input=False)
    first: dict = dict(errors[0]) if errors else {}
    if first.get("type") == "json_invalid":
        return f"request body is not JSON: {first.get('msg', '')}"
    if first.get("type") == "body_kind":
        return first["msg"]
    parts = []
    for e in errors[:limit]:
        where = _where(tuple(e.get("loc", ())))
        if e.get("type") == "missing" and len([p for p in e["loc"] if p not in ("window", "records")]) == 1:
            parts.append(f"request needs 'timestamps' and 'values' (or 'records'); {where!r} is missing")
        else:
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def validate_json(adapter: TypeAdapter, body: bytes):
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raise InputError(describe(exc)) from None


# -- a validated request -> arrays ------------------------------------------------------------------------
def parse_timestamps(ts: list[str]) -> np.ndarray:
    """ISO 8601 strings -> datetime64[ns]; 'Z' is UTC (naive times are taken as they are)."""
    try:
        return np.array([t[:-1] if t.endswith("Z") else t for t in ts], dtype="datetime64[ns]")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"a timestamp is not ISO 8601: {exc}") from None


def _records(rows: list[dict], time_col: str, variables: list[str]) -> tuple[list[list[float]], list[str]]:
    values, ts = [], []
    wanted = set(variables)
    for i, rec in enumerate(rows):
        if time_col not in rec:
            raise InputError(f"record {i} has no {time_col!r}")
        missing = [v for v in variables if v not in rec]
        if missing:
            raise InputError(f"record {i} lacks variable(s) {missing}; the model needs {variables}")
        extra = [k for k in rec if k != time_col and k not in wanted]
        if extra:
            raise InputError(f"record {i} has unexpected key(s) {extra}; the model's variables are {variables}")
        t = rec[time_col]
        if not isinstance(t, str):
            raise InputError(f"record {i} {time_col!r} is {t!r}; timestamps must be ISO 8601 strings")
        row = []
        for v in variables:
            x = rec[v]
            if isinstance(x, str):
                raise InputError(f"record {i} {v!r} is {x!r}; a number is needed")
            row.append(x)
        ts.append(t)
        values.append(row)
    return values, ts


def window_arrays(body: bytes, time_col: str, variables: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A ``POST /forecast`` body -> (values [L, N] float64, timestamps [L] datetime64[ns], interval levels).
    The window's length and values are checked by the forecaster."""
    doc = validate_json(FORECAST_REQUEST, body)
    if isinstance(doc, WindowRequest):
        rows, ts, levels = doc.values, doc.timestamps, doc.levels
        n = len(variables)
        bad = next((i for i, r in enumerate(rows) if len(r) != n), None)
        if bad is not None:
            raise InputError(f"each row of 'values' needs {n} numbers, in the order {variables} (row {bad} has "
                             f"{len(rows[bad])})")
    elif isinstance(doc, RecordsRequest):
        (rows, ts), levels = _records(doc.records, time_col, variables), doc.levels
    else:
        (rows, ts), levels = _records(doc, time_col, variables), None
    values = np.array(rows, dtype=np.float64).reshape(len(rows), len(variables))
    return values, parse_timestamps(ts), parse_levels(levels)
