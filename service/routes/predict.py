"""POST /predict: images as multipart files or base64 JSON -> defended probabilities, label, class name."""
from __future__ import annotations

import base64
import binascii
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from astguard.card import PROBABILITIES
from service.core import Service
from service.errors import ClientError, validation_reasons
from service.images import decode_opened, decoded_pixels, open_image
from service.routes.deps import ERRORS, caller, get_service

router = APIRouter(tags=["predict"])


# Standard base64 with its padding, after an optional data: URL prefix.
BASE64 = r"^(data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"


class ImagesJSON(BaseModel):
    # The pattern is documented, and checked by base64 itself (a 400 naming the image, not a regex's message).
    images: list[Annotated[str, Field(min_length=1, json_schema_extra={"pattern": BASE64})]] = Field(
        min_length=1, description="base64-encoded image files (PNG, JPEG, WebP, BMP...); a `data:image/...;base64,` "
                                  "prefix is allowed")


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the served ONNX file")


class Prediction(BaseModel):
    probabilities: list[float] = Field(description="one per class, after the output defense; sums to 1")
    label: int = Field(description="the model's top-1 class index")
    class_name: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction] = Field(description="in request order")


_FILES_SCHEMA = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "one or more image files"}}}


async def _once(body: bytes):
    yield body


async def read_blobs(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(label, bytes) per image, from multipart field `files` or JSON `images`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    blobs: list[tuple[str, bytes]] = []
    if media == "multipart/form-data":
        body = await request.body()
        try:
            form = await MultiPartParser(request.headers, _once(body), max_files=100_000, max_fields=1000).parse()
        except MultiPartException as e:
            raise ClientError(f"malformed multipart body: {e.message}", 400, "malformed_body") from None
        for i, f in enumerate(form.getlist("files")):
            if isinstance(f, str):
                raise ClientError(f"field 'files' item {i} is text, not a file", 400, "malformed_body")
            label = f"image {i} ({f.filename})" if f.filename else f"image {i}"
            ctype = (f.content_type or "").split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                raise ClientError(f"{label} has content type {ctype}; send image files", 415, "unsupported_media")
            blobs.append((label, await f.read()))
    elif media == "application/json":
        try:
            payload = ImagesJSON.model_validate_json(await request.body())
        except ValidationError as e:
            raise ClientError(f"invalid JSON body: {validation_reasons(e.errors())}", 422, "malformed_body") from None
        for i, text in enumerate(payload.images):
            if text.startswith("data:"):
                text = text.partition(",")[2]
            try:
                blobs.append((f"image {i}", base64.b64decode(text, validate=True)))
            except (binascii.Error, ValueError) as e:
                raise ClientError(f"image {i} is not valid base64: {e}", 400, "malformed_body") from None
    else:
        raise ClientError(f"unsupported content type {media or '(none)'}: send multipart/form-data with field "
                          "'files', or application/json {\"images\": [base64, ...]}", 415, "unsupported_media")
    if not blobs:
        raise ClientError("no images: send files in the multipart field 'files' or JSON {\"images\": [...]}", 400,
                          "no_images")
    if len(blobs) > limit:
        raise ClientError(f"{len(blobs)} images in one request, over the limit of {limit}", 413, "too_many_images")
    return blobs


def decode_all(blobs: list[tuple[str, bytes]], service: Service) -> np.ndarray:
    """Every image's header first (pixel limits, the request's total, JPEG draft sizes), then the pixels: a request
    over a limit costs no decoding."""
    m, s = service.model, service.settings
    size = (m.width, m.height)
    opened = [open_image(blob, label, mode=m.color_mode, size=size, max_pixels=s.max_image_pixels,
                         policy=s.resize_policy) for label, blob in blobs]
    total = sum(decoded_pixels(img) for img in opened)
    if total > s.max_request_pixels:
        raise ClientError(f"the request's images come to {total} pixels to decode, over the limit of "
                          f"{s.max_request_pixels} per request (ASTGUARD_MAX_REQUEST_PIXELS); send fewer or smaller "
                          "images per request", 413, "too_many_pixels")
    return np.stack([decode_opened(img, label, mode=m.color_mode, size=size)
                     for img, (label, _) in zip(opened, blobs)])


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": _FILES_SCHEMA},
                                  "application/json": {"schema": {"$ref": "#/components/schemas/ImagesJSON"}}}}})
async def predict(request: Request, identity: str = Depends(caller), service: Service = Depends(get_service)):
    """Classify one or more images. Each is converted to the model's colour mode and resized to its input size
    (or refused, with `ASTGUARD_RESIZE_POLICY=reject`). The probabilities are the output defense's."""
    service.check_blocked(identity)  # before reading a flagged key's images
    blobs = await read_blobs(request, service.settings.max_images_per_request)
    service.precheck(identity, len(blobs))  # an exhausted budget is refused before any decoding
    async with service.decoding:  # at most MAX_CONCURRENT_DECODES requests decode at once
        images = await run_in_threadpool(decode_all, blobs, service)
    answer = await service.classify(identity, images)
    card, names = service.model.card, service.model.class_names
    # Built by hand, not through PredictResponse: pydantic would cost more than the model for small images.
    body = {"model": {"name": card.name, "version": card.version, "sha256": card.sha256},
            "predictions": [{PROBABILITIES: p.tolist(), "label": int(y), "class_name": names[y]}
                            for p, y in zip(answer.probabilities, answer.labels)]}
    headers = {} if answer.remaining is None else {"X-Budget-Remaining": str(answer.remaining)}
    return JSONResponse(body, headers=headers)
