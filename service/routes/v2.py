"""The KServe v2 / Open Inference Protocol: health, model metadata, and infer on FP32 or UINT8 tensors."""
from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from astguard.card import PROBABILITIES
from service.core import Service
from service.errors import ClientError, validation_reasons
from service.routes.deps import ERRORS, caller, get_service

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


class Tensor(BaseModel):
    name: str
    shape: list[int] = Field(description="[N, C, H, W], C/H/W as in the model metadata")
    datatype: str = Field(description="FP32 (pixels in [0,1]) or UINT8 (0..255)")
    data: list[Any] = Field(description="the values in row-major order, flat or nested")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[Tensor]


def _model(name: str, service: Service) -> None:
    if name != service.model.card.name:
        raise ClientError(f"unknown model {name!r}; this server serves {service.model.card.name!r}", 404,
                          "unknown_model")


def tensor_to_images(t: Tensor, service: Service) -> np.ndarray:
    m = service.model
    expected = [m.channels, m.height, m.width]
    if t.name != m.input_name:
        raise ClientError(f"unknown input {t.name!r}; the model's input is {m.input_name!r}")
    if len(t.shape) != 4 or t.shape[1:] != expected or t.shape[0] < 1:
        raise ClientError(f"input shape {t.shape} does not fit the model's [N, {', '.join(map(str, expected))}]")
    if t.shape[0] > service.settings.max_images_per_request:
        raise ClientError(f"{t.shape[0]} images in one request, over the limit of "
                          f"{service.settings.max_images_per_request}", 413, "too_many_images")
    if t.datatype not in ("FP32", "UINT8"):
        raise ClientError(f"datatype {t.datatype!r} is not supported; send FP32 or UINT8")
    try:
        values = np.asarray(t.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, OverflowError):  # 10**400 is a valid JSON number, and no float
        raise ClientError("input data must be numbers (flat or nested lists) within float range") from None
    if values.size != int(np.prod(t.shape)):
        raise ClientError(f"input data has {values.size} values; shape {t.shape} needs {int(np.prod(t.shape))}")
    if t.datatype == "UINT8":
        if not np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
            raise ClientError("UINT8 data must be whole numbers in 0..255")
        values = values / 255.0
    elif not np.all(np.isfinite(values) & (values >= 0) & (values <= 1)):
        raise ClientError("FP32 data must be finite pixel values in [0, 1]")
    return values.astype(np.float32).reshape(t.shape)


@router.get("/health/live", tags=["health"])
async def live():
    return {"live": True}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "model not loaded and warmed yet"}})
async def ready(service: Service = Depends(get_service)):
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("")
async def server_metadata():
    return {"name": "astguard", "version": "0.1.0", "extensions": []}


@router.get("/models/{name}", responses=ERRORS)
async def model_metadata(name: str, identity: str = Depends(caller), service: Service = Depends(get_service)):
    _model(name, service)
    m = service.model
    return {"name": m.card.name, "versions": [m.card.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, m.channels, m.height, m.width]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, m.num_classes]}]}


@router.get("/models/{name}/ready", tags=["health"], responses=ERRORS)
async def model_ready(name: str, identity: str = Depends(caller), service: Service = Depends(get_service)):
    _model(name, service)
    return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)


@router.post("/models/{name}/infer", response_model=InferResponse, responses=ERRORS, openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": InferRequest.model_json_schema()}}}})
async def infer(name: str, http: Request, identity: str = Depends(caller),
                service: Service = Depends(get_service)):
    """Defended probabilities for a batch of images given as one tensor. Only `probabilities` is served: the
    logits would undo the defense."""
    service.check_blocked(identity)
    # The body is parsed here, after the key and the rate limit (a declared body model would be parsed before).
    try:
        request = InferRequest.model_validate_json(await http.body())
    except ValidationError as e:
        raise ClientError(f"invalid request: {validation_reasons(e.errors())}", 422, "invalid_request") from None
    _model(name, service)
    if len(request.inputs) != 1:
        raise ClientError(f"the model takes one input, got {len(request.inputs)}")
    for out in request.outputs or []:
        if out.name != PROBABILITIES:
            raise ClientError(f"unknown output {out.name!r}; this server returns {PROBABILITIES!r} only")
    shape = request.inputs[0].shape
    service.precheck(identity, shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else 1)
    images = tensor_to_images(request.inputs[0], service)
    answer = await service.classify(identity, images)
    body = {"model_name": name, "model_version": service.model.card.version, "id": request.id,
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": list(answer.probabilities.shape),
                         "data": answer.probabilities.reshape(-1).tolist()}]}
    headers = {} if answer.remaining is None else {"X-Budget-Remaining": str(answer.remaining)}
    return JSONResponse(body, headers=headers)
