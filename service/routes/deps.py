"""Shared dependencies: the service, and the caller's identity (API key check, then the rate limit)."""
from __future__ import annotations

from fastapi import Depends, Request

from service.core import Service


# async: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per request for nothing here.
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def caller(request: Request, service: Service = Depends(get_service)) -> str:
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
    identity = service.identify(key or None)
    service.admit(identity)
    return identity


ERRORS = {status: {"description": text} for status, text in {
    400: "bad input, with a message naming what and which image", 401: "missing or unknown API key",
    413: "body, image count or image dimensions over the limit", 415: "unsupported content type",
    422: "malformed request, with the reasons", 429: "budget or rate limit exceeded; see Retry-After"}.items()}
