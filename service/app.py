"""create_app(settings): the FastAPI application. Routes live in service/routes/, logic in service/core.py."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.config import Settings
from service.core import Service
from service.errors import ClientError, validation_reasons

log = logging.getLogger("astguard.service")


class BodyTooLarge(ClientError, HTTPException):
    """Also an HTTPException: FastAPI re-raises those from its own body reading instead of answering 400."""

    def __init__(self, limit: int):
        message = f"request body over the limit of {limit} bytes"
        HTTPException.__init__(self, 413, message)
        self.message, self.status, self.reason, self.headers = message, 413, "body_too_large", {}


class BodyTimeout(ClientError, HTTPException):
    def __init__(self, seconds: float):
        message = f"request body not complete within {seconds:g} s of its headers"
        HTTPException.__init__(self, 408, message)
        self.message, self.status, self.reason, self.headers = message, 408, "body_timeout", {"Connection": "close"}


class Instrument:
    """Pure ASGI middleware: counts requests by route template and status, times them, and stops request bodies
    over the limit (by Content-Length at once, or while streaming when there is none) or not complete within the
    body deadline (408)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, limit = self.service.metrics, self.service.settings.max_body_bytes
        start, status = time.perf_counter(), [500]
        length = dict(scope["headers"]).get(b"content-length")
        received, done = [0], [False]
        deadline = start + self.service.settings.body_timeout_s

        async def limited_receive():
            if done[0]:  # the body is in: later receives wait for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                metrics.rejections.labels("body_timeout").inc()
                raise BodyTimeout(self.service.settings.body_timeout_s) from None
            if message["type"] == "http.request":
                done[0] = not message.get("more_body", False)
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if length is not None and length.isdigit() and int(length) > limit:
                metrics.rejections.labels("body_too_large").inc()
                response = _error_response(scope["path"], BodyTooLarge(limit))
                await response(scope, receive, send_status)
            else:
                await self.app(scope, limited_receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


def _error_response(path: str, e: ClientError) -> JSONResponse:
    # The Open Inference Protocol's error body is {"error": ...}; the rest of the API uses FastAPI's {"detail": ...}.
    # `reason` is machine-readable: a client tells an exhausted budget (stop) from a rate limit (wait and retry).
    body = {"error" if path.startswith("/v2/") else "detail": e.message, "reason": e.reason}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The app for these settings. Loading the model, the card and the keys happens here, so a bad
    configuration fails before the server binds its port."""
    service = service or Service.from_settings(settings)
    if service.keys.open:
        log.warning("no API keys configured: the service is open to anyone who can reach it")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for runner in (service.runner, *service.other_runners.values()):
            await runner.start()

        def warm_up():
            for m in (service.model, *service.others.values()):
                m.warm_up()

        # Warm up off the event loop; /v2/health/ready answers 503 until it is done.
        warm = asyncio.create_task(asyncio.to_thread(warm_up))
        warm.add_done_callback(lambda t: setattr(service, "ready", t.exception() is None))
        yield
        for runner in (service.runner, *service.other_runners.values()):
            await runner.stop()

    app = FastAPI(title="astguard", version="0.1.0", lifespan=lifespan,
                  description="Defended class probabilities from an ONNX teacher. Keys: `Authorization: Bearer` "
                              "or `X-API-Key`. Errors are JSON with a message; `/v2` speaks the Open Inference "
                              "Protocol.")
    app.state.service = service

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError):
        service.metrics.rejections.labels(e.reason).inc()
        return _error_response(request.url.path, e)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, e: ClientDisconnect):
        # The client went away mid-request: its doing, not the server's. Counted as 499 (as nginx does), one log
        # line, nothing charged (budgets are charged only after the whole body is read and decoded).
        service.metrics.rejections.labels("client_disconnect").inc()
        log.info(json.dumps({"event": "client_disconnect", "path": request.url.path}))
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # Starlette's own 404 and 405 (no such route, wrong method) in the API's error shape, {"error"} under /v2.
        if isinstance(e, ClientError):
            return await client_error(request, e)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error_response(request.url.path, ClientError(str(e.detail), e.status_code, reason,
                                                             dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        service.metrics.rejections.labels("invalid_request").inc()
        return _error_response(request.url.path, ClientError(f"invalid request: {validation_reasons(e.errors())}",
                                                             422))

    from service.routes import info, predict, usage, v2

    for module in (predict, v2, info, usage):
        app.include_router(module.router)
    app.add_middleware(Instrument, service=service)
    app.openapi = lambda: openapi_document(app, service)
    return app


# Routes that take an API key when keys are configured (the rest stay open: health, server metadata, metrics, docs).
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics")


def openapi_document(app: FastAPI, service: Service) -> dict:
    """FastAPI's document, made true: the request bodies' models in components (their references resolve), the
    API key as a security scheme on the routes that take it."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from service.routes.predict import ImagesJSON
    from service.routes.v2 import InferRequest

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(ImagesJSON, "validation"), (InferRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (ASTGUARD_API_KEYS)"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same key"}}
    if not service.keys.open:
        for path, item in doc["paths"].items():
            if path not in OPEN_PATHS:
                for op in item.values():
                    op["security"] = [{"bearer": []}, {"apiKey": []}]
    app.openapi_schema = doc
    return doc
