"""The endpoint as one ASGI app (FastAPI, pydantic request and response models, OpenAPI at
``/openapi.json``, docs at ``/docs``): ``create_app(service)``. The same app runs in one process on
uvicorn (``single_process``, the default of ``timecma-serve``) or in each Ray Serve replica
(``ray_serve``, ``timecma-serve --ray``).

``POST /forecast`` takes one window as JSON, either
``{"timestamps": [...seq_len ISO strings], "values": [[...N numbers] x seq_len]}`` (columns in the order
``GET /metadata`` lists) or ``{"records": [{"<time_col>": ..., "<var>": ..., ...}]}`` (a bare list of
records works too), and answers ``{"timestamps": [...pred_len], "variables": [...], "forecast": [[...N] x
pred_len]}`` in original units; with ``"levels": [80, 95]`` also ``"intervals": {"80": {"lo": ..., "hi":
...}}`` (split-conformal, shaped like the forecast). ``GET /health`` (open to probes: 200 ``ok``, 503
``starting`` until warmed up, 503 ``stopped`` if the forecasting thread has ended), ``/metadata``,
``/info`` and ``/metrics`` (Prometheus text) describe the replica; the Open Inference Protocol v2 lives
under ``/v2`` (``oip``). Refusals are fast, ``{"error": message}``, and counted in ``/metrics``: 400 bad
input (any malformed body or header), 401 without the bearer key, 404/405, 413 too large (chunked bodies
included), 415 a compressed body, 429 too many in flight (Retry-After), 503 while starting, 504 past the
deadline. Torch-free.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from timecma import __version__

from .admission import (SECURED, MetricsMiddleware, body_schema, check_key, extend_openapi, install_handlers,
                        read_body)
from .oip import InferRequest, oip_router
from .schemas import (ErrorDoc, ForecastResponse, Health, Interval, Metadata, RecordsRequest, WindowRequest,
                      window_arrays)
from .service import RETRY, Forecast, ForecastService, Limits, Refusal

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorDoc} for code in (400, 401, 413, 415, 429, 503, 504)}


def forecast_json(svc: ForecastService, fc: Forecast) -> bytes:
    """The answer of ``/forecast`` as JSON bytes (pydantic-core's serializer)."""
    intervals = None
    if fc.intervals:
        intervals = {str(lv): Interval.model_construct(lo=lo.astype(float).tolist(), hi=hi.astype(float).tolist())
                     for lv, (lo, hi) in fc.intervals.items()}
    doc = ForecastResponse.model_construct(timestamps=fc.iso_timestamps(), variables=svc.f.variables,
                                           forecast=fc.y.astype(float).tolist(), intervals=intervals)
    return doc.model_dump_json(exclude_none=True).encode()


def create_app(service: ForecastService | None = None) -> FastAPI:
    """The app over one replica. Without a service (``create_app()``) every route answers 503: an app for
    its OpenAPI document alone."""

    def get_service() -> ForecastService:
        if service is None:
            raise Refusal(503, "no_model", "no bundle is loaded here (an app built for its OpenAPI document)")
        return service

    def authorized(request: Request) -> ForecastService:
        svc = get_service()
        check_key(svc, request)
        return svc

    limits = service.limits if service is not None else Limits()
    app = FastAPI(
        title="timecma", version=__version__,
        summary="TimeCMA forecasts, one window per request: today's /forecast API and the Open Inference "
                "Protocol v2 (KServe / Triton clients)",
        description=__doc__.split("\n\n", 1)[1].split("Torch-free")[0].strip())
    install_handlers(app)
    extend_openapi(app, [WindowRequest, RecordsRequest, InferRequest])
    app.add_middleware(MetricsMiddleware, get_metrics=lambda: service.metrics if service is not None else None)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["probes"],
             summary="Readiness (open to probes: no key)")
    async def health(request: Request):
        svc = get_service()
        status = svc.status()
        if status == "ok":
            return JSONResponse({"status": "ok"})
        request.scope["timecma.refusal"] = status
        return JSONResponse({"status": status}, status_code=503, headers=RETRY if status == "starting" else None)

    @app.get("/metadata", response_model=Metadata, responses=ERRORS, openapi_extra=SECURED,
             tags=["forecast"], summary="Variables (in order), time column, window and horizon, backend")
    async def metadata(request: Request):
        return JSONResponse(authorized(request).metadata)

    @app.get("/info", responses=ERRORS, openapi_extra=SECURED, tags=["describe"],
             summary="Model, LLM, backend and precision per graph, engines, versions, limits, readiness")
    async def info(request: Request):
        return JSONResponse(authorized(request).info())

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS, openapi_extra=SECURED,
             tags=["describe"], summary="Prometheus metrics of this replica")
    async def metrics(request: Request):
        return PlainTextResponse(authorized(request).metrics_text(), media_type=PROMETHEUS)

    @app.post("/forecast", response_model=ForecastResponse, responses=ERRORS, tags=["forecast"],
              summary="Forecast one window", openapi_extra={**SECURED, **body_schema(WindowRequest)})
    async def forecast(request: Request):
        """The body is read within ``--max-body-bytes`` and validated by the request model (``"records"`` and
        a bare list of records are read too); at most ``--max-concurrent`` requests are in flight."""
        svc = authorized(request)
        svc.ensure_ready()
        body = await read_body(request, limits.max_body_bytes)
        with svc.admit():
            with svc.batcher.arriving():
                values, stamps, levels = window_arrays(body, svc.f.time_col, svc.f.variables)
            fc = await svc.forecast(values, stamps, levels)
            return Response(forecast_json(svc, fc), media_type="application/json")

    app.include_router(oip_router(get_service, authorized, limits.max_body_bytes))
    return app
