"""What every HTTP route of the endpoint shares: the bearer key, the bounded body read, refusals as JSON
with their status and headers, and the middleware that counts every answer in ``/metrics``.

The body is read here, not by FastAPI, because the limit must hold before the body is in memory and
the refusal must be ours: a declared ``Content-Length`` over ``max_body_bytes`` is refused unread, a
chunked body (no length) is cut off as soon as it passes the limit; either way a 413 counted under
``too_large`` (Starlette's own limit would answer plain text after an auth refusal had been decided).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from timecma.core.errors import InputError

from .service import Refusal

log = logging.getLogger(__name__)

REFUSAL_KEY = "timecma.refusal"  # the scope key a handler names its refusal's reason under
REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
           415: "unsupported_media_type", 429: "overloaded", 500: "internal", 503: "unavailable", 504: "deadline"}

# the OpenAPI security scheme of the key (checked in the handlers, not by a FastAPI dependency: one call
# instead of a dependency graph solved on every request)
SECURITY_SCHEME = {"HTTPBearer": {"type": "http", "scheme": "bearer", "description": (
    "`Authorization: Bearer <key>` when the server was started with --api-key (every route but the health "
    "probes and the OpenAPI document)")}}
SECURED: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: 413 for a declared length over it (unread) or as soon as a
    chunked body passes it; 415 for a compressed body (a bounded read of it would not bound its size)."""
    enc = request.headers.get("content-encoding")
    if enc and enc.strip().lower() not in ("identity", ""):
        raise Refusal(415, "unsupported_media_type", f"Content-Encoding {enc!r} is not accepted; send the body "
                                                     "uncompressed")
    declared = (request.headers.get("content-length") or "").strip()
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise Refusal(413, "too_large", f"request body is {declared[:24]} bytes; at most {limit} are accepted")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Refusal(413, "too_large", f"request body is over {limit} bytes (read {total} so far); at most "
                                            f"{limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def check_key(svc, request: Request) -> None:
    """401 with ``WWW-Authenticate: Bearer`` unless the bearer key matches (compared in constant time)."""
    if not svc.key_required:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not svc.key_ok(given):
        raise Refusal(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is needed",
                      {"WWW-Authenticate": "Bearer"})


COMPONENT = "#/components/schemas/{model}"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: the request model, by reference (the model is
    put into the document's components by ``extend_openapi``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": COMPONENT.format(model=model.__name__)}}}}}


def extend_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    """Put the bearer scheme (routes name it in ``SECURED``) and the request models of the routes that read their
    body themselves (``body_schema``) into the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # also kept as app.openapi_schema
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(SECURITY_SCHEME)
        schemas = components.setdefault("schemas", {})
        for model in body_models:
            doc = model.model_json_schema(ref_template=COMPONENT)
            schemas.update(doc.pop("$defs", {}))
            schemas[model.__name__] = doc
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document


def refusal_response(request: Request, status: int, reason: str, message: str,
                     headers: dict | None = None) -> JSONResponse:
    request.scope[REFUSAL_KEY] = reason
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def install_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": message}`` with its status; bad input is 400 (FastAPI's 422 included)."""

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal):
        return refusal_response(request, exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError):
        return refusal_response(request, 400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errs[:3])
        return refusal_response(request, 400, "bad_request", msg or "invalid request")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged by the server; the client gets no traceback
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"},
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        reason = REASONS.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.url.path}; try POST /forecast, GET /metadata, /info, /metrics, /health, "
                       "/docs, or the Open Inference Protocol under /v2")
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        return refusal_response(request, exc.status_code, reason, message, getattr(exc, "headers", None))


class MetricsMiddleware:
    """Pure ASGI: counts every answer by route template and status, its latency, and every refusal (status
    4xx/5xx) by reason, including an exception no handler caught (counted as a 500 ``internal``)."""

    def __init__(self, app, get_metrics):
        self.app, self.get_metrics = app, get_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            scope[REFUSAL_KEY] = "internal"
            raise
        finally:
            m = self.get_metrics()
            if m is not None:
                label = getattr(scope.get("route"), "path", None) or "other"
                refusal = (scope.get(REFUSAL_KEY) or REASONS.get(status, f"http_{status}")) if status >= 400 else None
                m.answered(label, status, time.perf_counter() - t, refusal)
