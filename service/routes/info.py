"""GET /v1/model (the model card, provider and defense in force) and GET /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.core import Service
from service.routes.deps import ERRORS, caller, get_service

router = APIRouter(tags=["info"])


@router.get("/v1/model", responses=ERRORS)
async def model_info(identity: str = Depends(caller), service: Service = Depends(get_service)):
    """The model card, the onnxruntime provider in use, the output defense in force and the limits."""
    return service.describe()


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(service: Service = Depends(get_service)):
    """Prometheus metrics: requests by route and status, latency, queue and compute time, batch sizes,
    images served per key, rejections by reason."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
