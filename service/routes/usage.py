"""GET /v1/usage: a key's own images, budget and (unless disabled) extraction score and flag; for an admin key,
GET /v1/usage/all (every key's status) and POST /v1/usage/{key_id}/clear (clear a flag)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from service.core import Service
from service.routes.deps import ERRORS, admin, caller, get_service

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", responses=ERRORS)
async def usage(identity: str = Depends(caller), service: Service = Depends(get_service)):
    """The calling key's images used and budget left this period, and its own extraction score and flag."""
    return service.usage(identity)


@router.get("/v1/usage/all", responses=ERRORS)
async def all_usage(identity: str = Depends(caller), _: None = Depends(admin),
                    service: Service = Depends(get_service)):
    """Every key the detector has seen, with its score, flag and budget (an admin key)."""
    return {"keys": service.all_usage()}


@router.post("/v1/usage/{key_id}/clear", responses=ERRORS)
async def clear(key_id: str, identity: str = Depends(caller), _: None = Depends(admin),
                service: Service = Depends(get_service)):
    """Clear a key's extraction flag (an admin key); its detector state is kept."""
    was = service.clear_flag(key_id)
    return {"key": key_id, "was_flagged": was, "flagged": False}
