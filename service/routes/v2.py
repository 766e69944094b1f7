"""The KServe v2 / Open Inference Protocol: health, model metadata, and infer on FP32 or UINT8 tensors."""
from __future__ import annotations

import json
import zlib
from typing import Annotated, Any, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, Field, StrictFloat, StrictInt, ValidationError

from astguard.card import PROBABILITIES
from service.core import Service
from service.errors import ClientError, validation_reasons
from service.routes.deps import ERRORS, caller, get_service

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


Number = Union[StrictInt, StrictFloat]  # no strings, no booleans: JSON numbers only


def _whole(v):
    """A JSON integer: 3 or 3.0 (JSON Schema's integer), never "3" or true."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")) \
            or v != int(v):
        raise ValueError("must be a whole number")
    return int(v)


Dimension = Annotated[int, Field(ge=0), BeforeValidator(_whole)]


class Tensor(BaseModel):
    name: str = Field(min_length=1)
    shape: list[Dimension] = Field(description="[N, C, H, W], C/H/W as in the model "
                                                                        "metadata")
    datatype: Literal["FP32", "UINT8"] = Field(description="FP32 (pixels in [0,1]) or UINT8 (0..255)")
    data: list[Union[Number, list[Any]]] | None = Field(
        None, description="the values in row-major order, flat or nested (numbers only); absent when the tensor "
                          "travels in the binary section (`parameters.binary_data_size`)")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size`: the tensor's bytes in the "
                                                                "binary section (little-endian)")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data: true`: the output in the binary "
                                                                "section")


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output: true`: every output in the "
                                                                "binary section")


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it sent one")
    outputs: list[OutputTensor]


BINARY_HEADER = "inference-header-content-length"
NOT_FOUND = {404: {"description": "unknown model or version"}}


def _model(name: str, service: Service, version: str | None = None) -> None:
    if name != service.model.card.name:
        raise ClientError(f"unknown model {name!r}; this server serves {service.model.card.name!r}", 404,
                          "unknown_model")
    if version is not None and version != service.model.card.version:
        raise ClientError(f"unknown version {version!r} of model {name!r}; it has version "
                          f"{service.model.card.version!r}", 404, "unknown_model")


def _numbers(data: list) -> np.ndarray:
    """Nested lists of JSON numbers -> float64, flat; anything else (strings, booleans, ragged) is a 400."""
    try:
        flat = np.asarray(data, dtype=object).reshape(-1)
    except ValueError:
        raise ClientError("input data must be a flat list or evenly nested lists of numbers") from None
    kinds = set(map(type, flat.tolist()))
    if list in kinds:
        raise ClientError("input data must be a flat list or evenly nested lists of numbers")
    if not kinds <= {int, float}:
        names = ", ".join(sorted(k.__name__ for k in kinds - {int, float}))
        raise ClientError(f"input data must be numbers, got {names}")
    try:
        return np.asarray(flat.tolist(), dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # 10**400 is a valid JSON number, and no float
        raise ClientError("input data must be numbers within float range") from None


def tensor_to_images(t: Tensor, service: Service, binary: bytes | None = None) -> np.ndarray:
    m = service.model
    expected = [m.channels, m.height, m.width]
    if t.name != m.input_name:
        raise ClientError(f"unknown input {t.name!r}; the model's input is {m.input_name!r}")
    if len(t.shape) != 4 or t.shape[1:] != expected or t.shape[0] < 1:
        raise ClientError(f"input shape {t.shape} does not fit the model's [N, {', '.join(map(str, expected))}]")
    if t.shape[0] > service.settings.max_images_per_request:
        raise ClientError(f"{t.shape[0]} images in one request, over the limit of "
                          f"{service.settings.max_images_per_request}", 413, "too_many_images")
    count = int(np.prod(t.shape))
    if binary is not None:
        dtype = np.dtype("<f4") if t.datatype == "FP32" else np.dtype(np.uint8)
        if len(binary) != count * dtype.itemsize:
            raise ClientError(f"binary input has {len(binary)} bytes; shape {t.shape} of {t.datatype} needs "
                              f"{count * dtype.itemsize}")
        values = np.frombuffer(binary, dtype).astype(np.float64)
    elif t.data is None:
        raise ClientError("input has no data: send `data`, or the binary extension's `binary_data_size`")
    else:
        values = _numbers(t.data)
    if values.size != count:
        raise ClientError(f"input data has {values.size} values; shape {t.shape} needs {count}")
    if t.datatype == "UINT8":
        if not np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
            raise ClientError("UINT8 data must be whole numbers in 0..255")
        values = values / 255.0
    elif not np.all(np.isfinite(values) & (values >= 0) & (values <= 1)):
        raise ClientError("FP32 data must be finite pixel values in [0, 1]")
    return values.astype(np.float32).reshape(t.shape)


def _split_binary(http: Request, raw: bytes) -> tuple[bytes, bytes | None]:
    """The binary tensor data extension: the first Inference-Header-Content-Length bytes are JSON, the rest the
    tensors' bytes."""
    header = http.headers.get(BINARY_HEADER)
    if header is None:
        if http.headers.get("content-type", "").split(";")[0].strip().lower() == "application/octet-stream":
            raise ClientError("an application/octet-stream body is the binary tensor data extension: it needs the "
                              "Inference-Header-Content-Length header (the length of its JSON part)")
        return raw, None
    if not header.isdigit() or int(header) > len(raw):
        raise ClientError(f"Inference-Header-Content-Length {header!r} must be a whole number of bytes, at most the "
                          f"body's {len(raw)}")
    return raw[:int(header)], raw[int(header):]


def _decompressed(http: Request, raw: bytes, limit: int) -> bytes:
    """A gzip or deflate request body (the client's request_compression_algorithm), bounded by the body limit."""
    encoding = http.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise ClientError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none", 415,
                          "unsupported_media")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as e:
        raise ClientError(f"the {encoding} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise ClientError(f"the decompressed body is over the limit of {limit} bytes", 413, "body_too_large")
    return out


@router.get("/health/live", tags=["health"])
async def live():
    return {"live": True}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "model not loaded and warmed yet"}})
async def ready(service: Service = Depends(get_service)):
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("")
async def server_metadata():
    return {"name": "astguard", "version": "0.1.0", "extensions": []}


@router.get("/models/{name}", responses={**ERRORS, **NOT_FOUND})
async def model_metadata(name: str, identity: str = Depends(caller), service: Service = Depends(get_service)):
    return _metadata(name, None, service)


@router.get("/models/{name}/versions/{version}", responses={**ERRORS, **NOT_FOUND})
async def model_version_metadata(name: str, version: str, identity: str = Depends(caller),
                                 service: Service = Depends(get_service)):
    return _metadata(name, version, service)


def _metadata(name: str, version: str | None, service: Service) -> dict:
    _model(name, service, version)
    m = service.model
    return {"name": m.card.name, "versions": [m.card.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, m.channels, m.height, m.width]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, m.num_classes]}]}


@router.get("/models/{name}/ready", tags=["health"], responses={**ERRORS, **NOT_FOUND})
async def model_ready(name: str, identity: str = Depends(caller), service: Service = Depends(get_service)):
    _model(name, service)
    return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("/models/{name}/versions/{version}/ready", tags=["health"], responses={**ERRORS, **NOT_FOUND})
async def model_version_ready(name: str, version: str, identity: str = Depends(caller),
                              service: Service = Depends(get_service)):
    _model(name, service, version)
    return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)


INFER_BODY = {"parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                              "schema": {"type": "integer", "minimum": 0},
                              "description": "the binary tensor data extension: the length of the body's JSON part"}],
              "requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "the binary tensor data extension: Inference-Header-Content-Length "
                                                "bytes of InferRequest JSON, then the tensors' bytes"}}}}
INFER_RESPONSES = {**ERRORS, **NOT_FOUND, 200: {"description": "the defended probabilities; with binary output "
                                                              "requested, JSON then the bytes (application/"
                                                              "octet-stream, Inference-Header-Content-Length)"}}


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
             responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer(name: str, http: Request, identity: str = Depends(caller), service: Service = Depends(get_service)):
    """Defended probabilities for a batch of images given as one tensor. Only `probabilities` is served: the
    logits would undo the defense."""
    return await _infer(name, None, http, identity, service)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             response_model_exclude_none=True, responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer_version(name: str, version: str, http: Request, identity: str = Depends(caller),
                        service: Service = Depends(get_service)):
    """As `/v2/models/{name}/infer`, for the named version."""
    return await _infer(name, version, http, identity, service)


async def _infer(name: str, version: str | None, http: Request, identity: str, service: Service):
    service.check_blocked(identity)
    # The body is parsed here, after the key and the rate limit (a declared body model would be parsed before).
    raw = _decompressed(http, await http.body(), service.settings.max_body_bytes)
    header, binary = _split_binary(http, raw)
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as e:
        if binary is not None:  # the schema describes the body only up to the binary section: a bad request
            raise ClientError(f"the body's JSON part (Inference-Header-Content-Length bytes) is not a valid "
                              f"request: {validation_reasons(e.errors())}") from None
        raise ClientError(f"invalid request: {validation_reasons(e.errors())}", 422, "invalid_request") from None
    _model(name, service, version)
    if len(request.inputs) != 1:
        raise ClientError(f"the model takes one input, got {len(request.inputs)}")
    for out in request.outputs or []:
        if out.name != PROBABILITIES:
            raise ClientError(f"unknown output {out.name!r}; this server returns {PROBABILITIES!r} only")
    tensor = request.inputs[0]
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if binary is None:
            raise ClientError("the input gives binary_data_size but the request has no Inference-Header-Content-"
                              "Length header")
        if type(size) is not int or size < 0 or size != len(binary):
            raise ClientError(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON")
    elif binary:
        raise ClientError(f"{len(binary)} bytes follow the JSON but no input gives binary_data_size")
    shape = tensor.shape
    service.precheck(identity, shape[0] if shape and shape[0] > 0 else 1)
    images = tensor_to_images(tensor, service, binary if size is not None else None)
    answer = await service.classify(identity, images)
    probs = answer.probabilities.astype(np.float32)
    wants_binary = bool((request.parameters or {}).get("binary_data_output")) or any(
        (o.parameters or {}).get("binary_data") for o in request.outputs or [])
    output = {"name": PROBABILITIES, "datatype": "FP32", "shape": list(probs.shape)}
    headers = {} if answer.remaining is None else {"X-Budget-Remaining": str(answer.remaining)}
    body = {"model_name": name, "model_version": service.model.card.version,
            **({"id": request.id} if request.id is not None else {}), "outputs": [output]}
    if not wants_binary:
        output["data"] = probs.reshape(-1).tolist()
        return JSONResponse(body, headers=headers)
    blob = probs.astype("<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(blob)}
    head = json.dumps(body, separators=(",", ":")).encode()
    headers["Inference-Header-Content-Length"] = str(len(head))
    return Response(head + blob, media_type="application/octet-stream", headers=headers)
