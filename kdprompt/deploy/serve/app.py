"""The HTTP JSON API over a bundle: ``POST /v1/classify``, ``GET /v1/classes``, ``GET /healthz``.

Bad input is answered with a 4xx and ``{"detail": "..."}`` naming the image and the fix; only a
failure of the server itself answers a 5xx. Images are decoded off the event loop, and the images of
concurrent requests are classified together by a :class:`~kdprompt.deploy.serve.batcher.MicroBatcher`.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from torch import Tensor

from kdprompt import __version__
from kdprompt.deploy import Bundle
from kdprompt.deploy.serve.batcher import BatcherError, MicroBatcher
from kdprompt.deploy.serve.inputs import (
    IMAGE_FORMATS,
    InputError,
    check_size,
    decode_base64,
    decode_image,
    max_base64_chars,
    parse_k,
    too_large,
)
from kdprompt.errors import KdpromptError

IMAGE_FIELDS = ("images", "image")
JSON_EXAMPLE = '{"images": ["<base64>", ...], "k": 5}'
# Room for multipart headers / JSON punctuation beyond the image bytes themselves.
BODY_SLACK = 64 * 1024


class PredictionOut(BaseModel):
    """The top-k classes of one image."""

    labels: list[str]
    probs: list[float]
    indices: list[int]
    source: str


class ClassifyResponse(BaseModel):
    """Predictions, one per image in the order sent."""

    model: str
    k: int
    predictions: list[PredictionOut]


class ClassesResponse(BaseModel):
    """The bundle's class names, in index order."""

    model: str
    num_classes: int
    classes: list[str]


class HealthResponse(BaseModel):
    """Liveness, the bundle served and batching counters."""

    status: str
    model: str
    fingerprint: str | None
    num_classes: int
    batcher: dict[str, int | float]


class ErrorResponse(BaseModel):
    """What was wrong with the request and how to fix it."""

    detail: str


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_image_bytes: int
    max_images: int
    max_pixels: int
    max_request_bytes: int

    @property
    def multipart_body(self) -> int:
        """Bytes of a multipart body at most."""
        return min(self.max_images * (self.max_image_bytes + 1024) + BODY_SLACK, self.max_request_bytes)

    @property
    def json_body(self) -> int:
        """Bytes of a JSON body at most."""
        per_image = max_base64_chars(self.max_image_bytes) + 16
        return min(self.max_images * per_image + BODY_SLACK, self.max_request_bytes)

    def too_many(self, count: int | None = None) -> str:
        """The message for more than ``max_images`` images."""
        sent = f"{count} images" if count is not None else f"more than {self.max_images} images"
        return (
            f"{sent} in one request, over the server's limit of {self.max_images}; "
            "split them over several requests (or start the server with a larger --max-images)"
        )


@dataclass
class _Upload:
    name: str  # how errors name it: images[i] (filename)
    source: str  # Prediction.source: the filename, else images[i]
    data: bytes | None = None  # multipart: the file's bytes
    text: str | None = None  # JSON: base64 text


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _body_chunks(request: Request, limit: int, limits: Limits) -> AsyncIterator[bytes]:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = (
        f"the request body is over {limit} bytes, the most this server reads in one request (at most "
        f"{limits.max_images} images of {limits.max_image_bytes} bytes each, {limits.max_request_bytes} bytes "
        "in all); send fewer or smaller images per request"
    )
    if declared.isdigit() and int(declared) > limit:
        raise InputError(413, too_big)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise InputError(413, too_big)
        yield chunk


async def _read_multipart(request: Request, limits: Limits) -> tuple[list[_Upload], Any]:
    """Image files of fields ``images``/``image`` and the ``k`` field of a multipart/form-data body."""
    parser = MultiPartParser(
        request.headers,
        _body_chunks(request, limits.multipart_body, limits),
        max_files=limits.max_images + 1,  # one over, to tell "too many" apart
        max_fields=16,
        max_part_size=64 * 1024,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise InputError(413, limits.too_many()) from None
        raise InputError(
            400,
            f"malformed multipart/form-data body ({exc.message}); upload image files in the 'images' "
            "field, e.g. curl -F images=@photo.jpg -F k=5 URL",
        ) from None
    uploads: list[_Upload] = []
    k: Any = None
    try:
        for field, value in form.multi_items():
            if field in IMAGE_FIELDS:
                i = len(uploads)
                if not isinstance(value, UploadFile):
                    raise InputError(
                        422,
                        f"form field {field!r} (images[{i}]) is text, not a file; upload the image file "
                        "itself (curl -F images=@photo.jpg), or send base64 as application/json",
                    )
                name = f"images[{i}] ({value.filename})" if value.filename else f"images[{i}]"
                if value.size is not None and value.size > limits.max_image_bytes:
                    raise InputError(413, too_large(name, value.size, limits.max_image_bytes))
                data = await value.read(limits.max_image_bytes + 1)
                check_size(data, name, limits.max_image_bytes)
                uploads.append(_Upload(name, value.filename or f"images[{i}]", data=data))
            elif field == "k":
                if isinstance(value, UploadFile):
                    raise InputError(422, "form field 'k' must be a number, not a file")
                k = value
            else:
                raise InputError(
                    422,
                    f"unknown form field {field!r}; upload image files in the 'images' field (repeat it for "
                    "several images) and optionally set 'k'",
                )
    finally:
        await form.close()
    return uploads, k


async def _read_json(request: Request, limits: Limits) -> tuple[list[_Upload], Any]:
    """Base64 images and ``k`` of a JSON body ``{"images": [...], "k": 5}``."""
    body = b"".join([chunk async for chunk in _body_chunks(request, limits.json_body, limits)])
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InputError(422, f"the body is not valid JSON ({exc}); send {JSON_EXAMPLE}") from None
    if not isinstance(payload, dict):
        raise InputError(
            422, f"the JSON body must be an object, got {type(payload).__name__}; send {JSON_EXAMPLE}"
        )
    unknown = sorted(set(payload) - {*IMAGE_FIELDS, "k"})
    if unknown:
        raise InputError(422, f"unknown JSON field(s) {', '.join(map(repr, unknown))}; send {JSON_EXAMPLE}")
    if all(field in payload for field in IMAGE_FIELDS):
        raise InputError(422, "give either 'images' (a list) or 'image' (one), not both")
    images = payload.get("images", payload.get("image"))
    if images is None:
        raise InputError(422, f"the JSON body has no 'images' field; send {JSON_EXAMPLE}")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise InputError(422, f"'images' must be a list of base64 strings, got {type(images).__name__}")
    if len(images) > limits.max_images:
        raise InputError(413, limits.too_many(len(images)))
    uploads = []
    for i, text in enumerate(images):
        if not isinstance(text, str):
            raise InputError(
                422, f"images[{i}] must be a base64 string of an image file, got {type(text).__name__}"
            )
        uploads.append(_Upload(f"images[{i}]", f"images[{i}]", text=text))
    return uploads, payload.get("k")


def _classify_openapi(default_k: int) -> dict[str, Any]:
    """The request body of ``POST /v1/classify`` for the OpenAPI page (the handler parses it itself)."""
    k = {"type": "integer", "minimum": 1, "default": default_k, "description": "Classes per image."}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": f"Image files ({IMAGE_FORMATS}); repeat the field for several.",
                            },
                            "k": k,
                        },
                        "required": ["images"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "byte"},
                                "description": "Base64 image files (a data:image/...;base64, prefix is allowed).",
                            },
                            "k": k,
                        },
                        "required": ["images"],
                    },
                    "example": {"images": ["iVBORw0KGgo..."], "k": default_k},
                },
            },
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Not an image, empty, bad base64, no images or bad k."},
    413: {"model": ErrorResponse, "description": "An image or the request is too large, or too many images."},
    415: {"model": ErrorResponse, "description": "Neither multipart/form-data nor application/json."},
    422: {"model": ErrorResponse, "description": "Malformed JSON, or an unknown or mistyped field."},
    503: {"model": ErrorResponse, "description": "Busy (queue full), starting or stopping; see Retry-After."},
}


def create_app(
    bundle: Bundle,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_image_bytes: int = 8 * 2**20,
    max_images: int = 64,
    default_k: int = 5,
    max_pixels: int = 64 * 2**20,
    max_request_bytes: int = 64 * 2**20,
    max_queue: int = 1024,
) -> FastAPI:
    """The FastAPI app serving ``bundle``.

    Args:
        bundle: the loaded bundle.
        max_batch: images per model call at most.
        max_wait_ms: how long an image waits for others to share its model call.
        max_image_bytes: size of one encoded image at most.
        max_images: images per request at most.
        default_k: classes per image when a request gives no ``k``.
        max_pixels: decoded pixels of one image at most (guards against decompression bombs).
        max_request_bytes: bytes of one request body at most (base64 JSON is held in memory).
        max_queue: images waiting for the model at most; beyond it requests answer 503 with Retry-After.

    Returns:
        The app; the batcher starts and stops with its lifespan (uvicorn, or ``TestClient`` as a context).
    """
    limits = Limits(
        max_image_bytes=max_image_bytes,
        max_images=max_images,
        max_pixels=max_pixels,
        max_request_bytes=max_request_bytes,
    )
    batcher = MicroBatcher(
        bundle.predict_tensor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue
    )
    classnames = bundle.classnames
    fingerprint = bundle.manifest.get("fingerprint")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Decoding is CPU-bound: more threads than cores would only queue up inside torch and PIL.
        state["decoders"] = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))
        # torch + open_clip leave ~400k long-lived objects; a full GC pass over them stalls every request
        # for ~200 ms now and then. Freezing them keeps later passes to what requests allocate.
        gc.collect()
        gc.freeze()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title=f"kdprompt: {bundle.name}",
        version=__version__,
        description=(
            f"Image classification with the distilled CLIP student **{bundle.name}** "
            f"({len(classnames)} classes, {bundle.input_size[1]}x{bundle.input_size[2]} inputs).\n\n"
            "`POST /v1/classify` takes image files as `multipart/form-data` (field `images`, repeatable; "
            f"optional `k`) or `application/json` `{JSON_EXAMPLE}` and answers the top-k classes of each "
            'image with their probabilities. Bad input answers a 4xx with `{"detail": ...}`.\n\n'
            "    curl -F images=@cat.jpg -F images=@dog.png -F k=3 http://HOST:PORT/v1/classify"
        ),
        lifespan=lifespan,
    )
    app.state.bundle = bundle
    app.state.batcher = batcher

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(BatcherError)
    async def batcher_error(request: Request, exc: BatcherError) -> JSONResponse:
        response = _error(exc.status, str(exc))
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    def prepare(uploads: list[_Upload]) -> list[Tensor]:
        """Decode and preprocess (in a worker thread): base64 -> bytes -> RGB image -> (3, H, W)."""
        out = []
        for up in uploads:
            data = up.data if up.text is None else decode_base64(up.text, up.name, max_image_bytes)
            assert data is not None
            check_size(data, up.name, max_image_bytes)
            image = decode_image(data, up.name, max_pixels)
            try:
                out.append(bundle.preprocess(image, up.name))
            except KdpromptError as exc:
                raise InputError(400, str(exc)) from None
        return out

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        openapi_extra=_classify_openapi(default_k),
        summary="Top-k classes of one or more images",
    )
    async def classify(request: Request) -> dict[str, Any]:
        """Classify image files sent as multipart/form-data (`images`, `k`) or JSON base64."""
        kind = _content_type(request)
        if kind == "multipart/form-data":
            uploads, k_value = await _read_multipart(request, limits)
        elif kind == "application/json" or kind.endswith("+json"):
            uploads, k_value = await _read_json(request, limits)
        else:
            raise InputError(
                415,
                f"unsupported content type {kind or '(none)'!r}; send multipart/form-data with image files in "
                f"the 'images' field, or application/json {JSON_EXAMPLE}",
            )
        k = parse_k(k_value, default_k)
        if not uploads:
            raise InputError(
                400, f"no images in the request; upload files in the 'images' field or send {JSON_EXAMPLE}"
            )
        if len(uploads) > max_images:
            raise InputError(413, limits.too_many(len(uploads)))
        images = await anyio.to_thread.run_sync(prepare, uploads, limiter=state.get("decoders"))
        predictions = await batcher.submit(images, k, [up.source for up in uploads])
        return {"model": bundle.name, "k": k, "predictions": [p.to_dict() for p in predictions]}

    @app.get("/v1/classes", response_model=ClassesResponse, summary="The class names, in index order")
    async def classes() -> dict[str, Any]:
        """The classes the bundle chooses among; `indices` in predictions index this list."""
        return {"model": bundle.name, "num_classes": len(classnames), "classes": classnames}

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: _ERRORS[503]},
        summary="Liveness and the bundle served",
    )
    async def healthz() -> Any:
        """`ok` once the model is ready, with the bundle's fingerprint and batching counters."""
        if not batcher.running:
            return _error(503, "the model is not running (server starting or stopping)")
        return {
            "status": "ok",
            "model": bundle.name,
            "fingerprint": fingerprint,
            "num_classes": len(classnames),
            "batcher": batcher.stats(),
        }

    return app
