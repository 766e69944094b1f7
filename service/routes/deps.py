"""Shared dependencies: the service, and the caller's identity (API key check, then the rate limit)."""
from __future__ import annotations

from fastapi import Depends, Request

from service.core import Service
from service.errors import ClientError


# async: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per request for nothing here.
async def get_service(request: Request) -> Service:
    return request.app.state.service


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
    return key or None


async def caller(request: Request, service: Service = Depends(get_service)) -> str:
    identity = service.identify(presented_key(request))
    service.admit(identity)
    return identity


async def admin(request: Request, service: Service = Depends(get_service)) -> None:
    """An admin key (ASTGUARD_ADMIN_KEYS), or a 403."""
    if not service.is_admin(presented_key(request)):
        raise ClientError("this needs an admin key (ASTGUARD_ADMIN_KEYS)", 403, "not_admin")


ERRORS = {status: {"description": text} for status, text in {
    400: "bad input, with a message naming what and which image", 401: "missing or unknown API key",
    413: "body, image count or image dimensions over the limit", 415: "unsupported content type",
    403: "the key is flagged as extracting the model (detection policy block)",
    422: "malformed request, with the reasons", 429: "budget or rate limit exceeded; see Retry-After"}.items()}
