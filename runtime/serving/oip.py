"""The Open Inference Protocol v2 (KServe / Triton REST) on the endpoint, so their clients can call it.

    GET  /v2                             server metadata (name, version, extensions)
    GET  /v2/health/live                 200 {"live": true} while the forecasting thread runs, else 503
    GET  /v2/health/ready                200 {"ready": true} once warmed up and while that thread runs, else 503
    GET  /v2/models/{name}               model metadata: input and output tensors
    GET  /v2/models/{name}/ready         as /v2/health/ready, for the one model served
    POST /v2/models/{name}/infer         one window in, its forecast out

Inputs: ``values`` FP64 (FP32 and integer types are read too) ``[seq_len, N]`` or ``[1, seq_len, N]``, columns
in the model's variable order; ``timestamps`` BYTES ``[seq_len]`` (ISO 8601 strings) or INT64 ``[seq_len]``
(nanoseconds since the epoch, UTC). Outputs: ``forecast`` FP32 ``[pred_len, N]`` (``[1, pred_len, N]`` for a
batched input), ``forecast_timestamps`` BYTES ``[pred_len]``, and with the request parameter ``levels``
(``"80,95"`` or ``80``), or when an output ``lo-<level>`` / ``hi-<level>`` is asked for by name, the
split-conformal bounds as ``lo-80``, ``hi-80``, ... shaped like the forecast. ``outputs`` in the request
picks which are returned.

Tensor data travels as JSON (``data``: flat row-major or nested) or, Triton's binary tensor data extension,
after the JSON header (``Inference-Header-Content-Length``; ``parameters.binary_data_size`` per input;
an output is returned binary when asked with ``parameters.binary_data`` or the request's
``binary_data_output``): what ``tritonclient.http`` sends and expects by default.

The readiness probes answer 503 rather than the spec's unspecified 4xx when not ready (what a load
balancer and Kubernetes read as "not yet"); OIP clients test for 200. Errors are ``{"error": message}``
as the protocol gives them. Same key, limits, batcher and metrics as ``/forecast``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable, Union

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter

from timecma import __version__
from timecma.core.conformal import parse_levels
from timecma.core.errors import InputError

from .admission import SECURED, body_schema, read_body
from .schemas import ErrorDoc, parse_timestamps, validate_json
from .service import RETRY, Forecast, ForecastService, Refusal

Param = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
NUMERIC = {"FP64": "<f8", "FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4", "INT16": "<i2",
           "INT8": "i1", "UINT64": "<u8", "UINT32": "<u4", "UINT16": "<u2", "UINT8": "u1"}
HEADER = "Inference-Header-Content-Length"


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class InferInput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Param] | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when the tensor travels "
                                                     "as binary data after the JSON header")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    parameters: dict[str, Param] | None = None


class InferRequest(BaseModel):
    """``inputs``: ``values`` and ``timestamps``; ``parameters.levels`` for intervals."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [{
        "inputs": [{"name": "values", "datatype": "FP64", "shape": [96, 7], "data": [5.8, 2.0, "..."]},
                   {"name": "timestamps", "datatype": "BYTES", "shape": [96], "data": ["2018-02-20T00:00:00", "..."]}],
        "parameters": {"levels": "80,95"}}]})
    id: str | None = None
    parameters: dict[str, Param] | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Param] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutput]


INFER_REQUEST = TypeAdapter(InferRequest)
VERSION = "1"


# -- tensors ------------------------------------------------------------------------------------------
def _bytes_elements(raw: bytes, what: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError(f"{what}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InputError(f"{what}: a BYTES element of {n} bytes runs past the data")
        out.append(raw[i:i + n])
        i += n
    return out


def _tensor(t: InferInput, binary: memoryview | None) -> np.ndarray:
    """One input tensor as a numpy array of its declared shape: numbers as float64/int64, BYTES as str."""
    what = f"input {t.name!r}"
    if any(d < 0 for d in t.shape):
        raise InputError(f"{what}: shape {t.shape} has a negative dimension")
    count = 1
    for d in t.shape:
        count *= d
        if count > 1 << 28:
            raise InputError(f"{what}: shape {t.shape} is too large")
    if binary is not None:
        if t.datatype == "BYTES":
            items = _bytes_elements(bytes(binary), what)
            try:
                arr = np.array([b.decode() for b in items], dtype=str)
            except UnicodeDecodeError:
                raise InputError(f"{what}: BYTES elements must be UTF-8 text") from None
        elif t.datatype in NUMERIC:
            dt = np.dtype(NUMERIC[t.datatype])
            if len(binary) % dt.itemsize:
                raise InputError(f"{what}: {len(binary)} bytes of binary data is not a whole number of {t.datatype}")
            arr = np.frombuffer(binary, dtype=dt)
        else:
            raise InputError(f"{what}: datatype {t.datatype!r} is not one this model reads")
    else:
        if t.data is None:
            raise InputError(f"{what} has neither 'data' nor parameters.binary_data_size")
        try:
            arr = np.asarray(t.data)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise InputError(f"{what}: 'data' is not a rectangular array ({exc})") from None
        if t.datatype == "BYTES":
            if arr.size and arr.dtype.kind != "U":
                raise InputError(f"{what}: BYTES data must be strings")
        elif t.datatype in NUMERIC:
            if arr.size and arr.dtype.kind not in ("f", "i", "u"):
                raise InputError(f"{what}: {t.datatype} data must be numbers (within 64-bit range)")
        else:
            raise InputError(f"{what}: datatype {t.datatype!r} is not one this model reads")
    if arr.size != count:
        raise InputError(f"{what}: {arr.size} elements for shape {t.shape}")
    return arr.reshape(t.shape)


def _levels(params: dict | None, wanted: list[str] | None) -> list[int]:
    spec = (params or {}).get("levels")
    if isinstance(spec, bool):
        raise InputError("parameter 'levels' is a list of percentages such as \"80,95\", not a boolean")
    levels = parse_levels(spec if isinstance(spec, str) else None if spec is None else [spec])
    for name in wanted or ():  # lo-80 / hi-95 asked by name imply their level
        side, _, lv = name.partition("-")
        if side in ("lo", "hi") and lv:
            levels = sorted(set(levels) | set(parse_levels(lv)))
    return levels


def decode(body: bytes, header_length: str | None, svc: ForecastService):
    """A request body -> (values [L, N] float64, timestamps [L], levels, the request, batched input?)."""
    binary = None
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InputError(f"{HEADER} {header_length!r} is not a length within the body of {len(body)} bytes")
        n = int(header_length)
        body, binary = body[:n], memoryview(body)[n:]
    req = validate_json(INFER_REQUEST, body)
    by_name, offset = {}, 0
    for t in req.inputs:
        size = (t.parameters or {}).get("binary_data_size")
        chunk = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or binary is None:
                raise InputError(f"input {t.name!r}: binary_data_size needs binary data after the JSON header "
                                 f"({HEADER})")
            if offset + size > len(binary):
                raise InputError(f"input {t.name!r}: binary_data_size {size} runs past the body")
            chunk, offset = binary[offset:offset + size], offset + size
        if t.name in by_name:
            raise InputError(f"input {t.name!r} is given twice")
        by_name[t.name] = (t, chunk)
    unknown = sorted(set(by_name) - {"values", "timestamps"})
    missing = sorted({"values", "timestamps"} - set(by_name))
    if unknown or missing:
        raise InputError("the inputs are 'values' and 'timestamps'" + (f"; {missing} missing" if missing else "")
                         + (f"; {unknown} unknown" if unknown else ""))
    vt, ts_t = by_name["values"], by_name["timestamps"]
    values = _tensor(*vt)
    batched = values.ndim == 3 and values.shape[0] == 1
    if batched:
        values = values[0]
    if values.ndim != 2 or values.dtype.kind not in "fiu":
        raise InputError(f"input 'values' must be numbers shaped [{svc.f.seq_len}, {svc.f.n_vars}] (or "
                         f"[1, {svc.f.seq_len}, {svc.f.n_vars}]), got {vt[0].datatype} {vt[0].shape}")
    stamps = _tensor(*ts_t)
    if stamps.ndim == 2 and stamps.shape[0] == 1:
        stamps = stamps[0]
    if stamps.ndim != 1:
        raise InputError(f"input 'timestamps' must be [{svc.f.seq_len}], got {ts_t[0].shape}")
    if ts_t[0].datatype == "BYTES":
        stamps = parse_timestamps(stamps.tolist())
    elif ts_t[0].datatype == "INT64":
        stamps = stamps.astype(np.int64).view("datetime64[ns]")
    else:
        raise InputError("input 'timestamps' is BYTES (ISO 8601 strings) or INT64 (nanoseconds since the epoch)")
    wanted = [o.name for o in req.outputs] if req.outputs else None
    return values.astype(np.float64), stamps, _levels(req.parameters, wanted), req, batched


def _binary(name: str, wanted: dict, req: InferRequest) -> bool:
    o = wanted.get(name)
    if o is not None and o.parameters and "binary_data" in o.parameters:
        return bool(o.parameters["binary_data"])
    return bool((req.parameters or {}).get("binary_data_output", False))


def _bytes_tensor(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in items))


def encode(svc: ForecastService, fc: Forecast, levels: list[int], req: InferRequest, batched: bool) -> Response:
    lead = [1] if batched else []
    tensors: dict[str, tuple[str, Any]] = {"forecast": ("FP32", fc.y.astype(np.float32)),
                                           "forecast_timestamps": ("BYTES", fc.iso_timestamps())}
    for lv in levels:
        lo, hi = fc.intervals[lv]
        tensors[f"lo-{lv}"] = ("FP32", lo.astype(np.float32))
        tensors[f"hi-{lv}"] = ("FP32", hi.astype(np.float32))
    wanted = {o.name: o for o in req.outputs} if req.outputs else {}
    unknown = sorted(set(wanted) - set(tensors))
    if unknown:
        raise InputError(f"unknown output(s) {unknown}; this model gives {sorted(tensors)}")
    outputs, blobs = [], []
    for name in (wanted or tensors):
        dtype, data = tensors[name]
        shape = lead + ([len(data)] if dtype == "BYTES" else list(data.shape))
        if _binary(name, wanted, req):
            raw = _bytes_tensor(data) if dtype == "BYTES" else np.ascontiguousarray(data, "<f4").tobytes()
            outputs.append(InferOutput.model_construct(name=name, datatype=dtype, shape=shape, data=None,
                                                       parameters={"binary_data_size": len(raw)}))
            blobs.append(raw)
        else:
            outputs.append(InferOutput.model_construct(
                name=name, datatype=dtype, shape=shape, parameters=None,
                data=data if dtype == "BYTES" else data.reshape(-1).tolist()))
    head = InferResponse.model_construct(model_name=svc.model_name, model_version=VERSION, id=req.id,
                                         outputs=outputs).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER: str(len(head))})


# -- routes -------------------------------------------------------------------------------------------
def oip_router(get_service: Callable[[], ForecastService], authorized: Callable[[Request], ForecastService],
               max_body: int) -> APIRouter:
    r = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorDoc} for code in (400, 401, 404, 413, 415, 429,
                                                                                      503, 504)}

    def model(name: str, request: Request | None = None) -> ForecastService:
        svc = authorized(request) if request is not None else get_service()
        if name != svc.model_name:
            raise Refusal(404, "not_found", f"unknown model {name!r}; this server serves {svc.model_name!r}")
        return svc

    @r.get("", response_model=ServerMetadata, openapi_extra=SECURED, summary="Server metadata")
    async def server_metadata(request: Request):
        authorized(request)
        return ServerMetadata(name="timecma", version=__version__, extensions=["binary_tensor_data"])

    @r.get("/health/live", response_model=Live, responses={503: {"model": Live}}, summary="Liveness")
    async def live():
        svc = get_service()
        return Response(json.dumps({"live": svc.live}), status_code=200 if svc.live else 503,
                        media_type="application/json")

    def _ready(svc: ForecastService) -> Response:
        return Response(json.dumps({"ready": svc.ready}), status_code=200 if svc.ready else 503,
                        media_type="application/json", headers=None if svc.ready else RETRY)

    @r.get("/health/ready", response_model=Ready, responses={503: {"model": Ready}}, summary="Readiness")
    async def ready(request: Request):
        svc = get_service()
        if not svc.ready:
            request.scope["timecma.refusal"] = svc.status()
        return _ready(svc)

    @r.get("/models/{model_name}/ready", response_model=Ready, responses={503: {"model": Ready}, **errors},
           summary="Model readiness")
    async def model_ready(model_name: str, request: Request):
        svc = model(model_name)
        if not svc.ready:
            request.scope["timecma.refusal"] = svc.status()
        return _ready(svc)

    @r.get("/models/{model_name}", response_model=ModelMetadata, responses=errors, openapi_extra=SECURED,
           summary="Model metadata")
    async def model_metadata(model_name: str, request: Request):
        svc = model(model_name, request)
        f = svc.f
        outputs = [TensorMetadata(name="forecast", datatype="FP32", shape=[f.pred_len, f.n_vars]),
                   TensorMetadata(name="forecast_timestamps", datatype="BYTES", shape=[f.pred_len])]
        if svc.has_calibration:
            outputs += [TensorMetadata(name=f"{side}-{lv}", datatype="FP32", shape=[f.pred_len, f.n_vars])
                        for lv in (80, 95) for side in ("lo", "hi")]
        return ModelMetadata(
            name=svc.model_name, versions=[VERSION], platform=f"timecma/{svc.metadata['backend']}",
            inputs=[TensorMetadata(name="values", datatype="FP64", shape=[f.seq_len, f.n_vars]),
                    TensorMetadata(name="timestamps", datatype="BYTES", shape=[f.seq_len])],
            outputs=outputs)

    @r.post("/models/{model_name}/infer", response_model=InferResponse, responses=errors,
            summary="Forecast one window", openapi_extra={**SECURED, **body_schema(InferRequest)})
    async def infer(model_name: str, request: Request):
        svc = model(model_name, request)
        svc.ensure_ready()
        body = await read_body(request, max_body)
        with svc.admit():
            with svc.batcher.arriving():
                values, stamps, levels, req, batched = decode(body, request.headers.get(HEADER), svc)
            fc = await svc.forecast(values, stamps, levels)
            return encode(svc, fc, levels, req, batched)

    return r
