"""The HTTP JSON API over a bundle: ``POST /v1/classify``, ``GET /v1/classes``, ``GET /healthz``.

Bad input is answered with a 4xx and ``{"detail": "..."}`` naming the image and the fix; only a
failure of the server itself answers a 5xx. Images are decoded off the event loop, and the images of
concurrent requests are classified together by a :class:`~kdprompt.deploy.serve.batcher.MicroBatcher`.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from torch import Tensor

from kdprompt.deploy import Bundle, Prediction
from kdprompt.deploy.serve.batcher import BatcherError, MicroBatcher
from kdprompt.deploy.serve.inputs import (
    InputError,
    check_size,
    decode_base64,
    load_rgb,
    open_image,
    parse_k,
    too_many_request_pixels,
)
from kdprompt.deploy.serve.openapi import ERROR_RESPONSES, app_description, classify_openapi
from kdprompt.deploy.serve.request_body import (
    JSON_EXAMPLE,
    ClientGone,
    Upload,
    read_uploads,
    until_disconnected,
)
from kdprompt.deploy.serve.schemas import ClassesResponse, ClassifyResponse, HealthResponse, Limits
from kdprompt.errors import KdpromptError
from kdprompt.text_features.ranking import GPU_MAX_K
from kdprompt.version import __version__

log = logging.getLogger(__name__)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _client(request: Request) -> str:
    """The client's address, ``host:port``, for the log."""
    return f"{request.client.host}:{request.client.port}" if request.client else "(unknown client)"


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
    max_request_pixels: int = 128_000_000,
    body_timeout: float = 30.0,
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
        max_request_pixels: decoded pixels of all the images of one request at most (JPEGs counted at
            their draft size); bounds the decoding work one request can ask for.
        body_timeout: seconds for a request's whole body to arrive; a slower one answers 408 and its
            connection is closed.

    Returns:
        The app; the batcher starts and stops with its lifespan (uvicorn, or ``TestClient`` as a context).
    """
    limits = Limits(
        max_image_bytes=max_image_bytes,
        max_images=max_images,
        max_pixels=max_pixels,
        max_request_bytes=max_request_bytes,
        max_request_pixels=max_request_pixels,
        body_timeout=body_timeout,
    )
    # JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still leaves twice the model's input size:
    # far less work for large photos, while the final resize still has more pixels than it keeps.
    draft_size = 2 * max(bundle.input_size[1:])
    batcher = MicroBatcher(
        bundle.predict_tensor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue
    )
    labels = bundle.labels
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
        description=app_description(bundle),
        lifespan=lifespan,
    )
    app.state.bundle = bundle
    app.state.batcher = batcher

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        response = _error(exc.status, exc.message)
        if exc.status == 408:
            log.warning(
                "client %s sent no complete request body within %g s; answered 408",
                _client(request),
                body_timeout,
            )
            # The rest of the body may still come (or never): don't keep reading it for another request.
            response.headers["Connection"] = "close"
        return response

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: Exception) -> Response:
        # One line, not a traceback: a client hanging up is routine (timeouts, closed tabs).
        when = exc.when if isinstance(exc, ClientGone) else "before its request was read"
        log.info("client %s disconnected %s; its request was dropped", _client(request), when)
        return Response(status_code=400)  # nobody is left to read it

    @app.exception_handler(BatcherError)
    async def batcher_error(request: Request, exc: BatcherError) -> JSONResponse:
        response = _error(exc.status, str(exc))
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")

    def prepare(uploads: list[Upload]) -> list[Tensor]:
        """Decode and preprocess (in a worker thread): base64 -> bytes -> RGB image -> (3, H, W).

        Every image's header is read first, so a request over ``max_request_pixels`` is refused before
        any pixels are decoded.
        """
        opened = []
        for up in uploads:
            data = up.data if up.text is None else decode_base64(up.text, up.name, max_image_bytes)
            assert data is not None
            check_size(data, up.name, max_image_bytes)
            opened.append(open_image(data, up.name, max_pixels, draft_size))
        pixels = sum(img.width * img.height for img in opened)
        if pixels > max_request_pixels:
            raise InputError(413, too_many_request_pixels(pixels, max_request_pixels))
        out = []
        for up, img in zip(uploads, opened, strict=True):
            image = load_rgb(img, up.name, max_pixels)
            try:
                out.append(bundle.preprocess(image, up.name))
            except KdpromptError as exc:
                raise InputError(400, str(exc)) from None
        return out

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=classify_openapi(default_k),
        summary="Top-k classes of one or more images",
    )
    async def classify(request: Request) -> dict[str, Any]:
        """Classify image files sent as multipart/form-data (`images`, `k`) or JSON base64."""
        uploads, k_value = await read_uploads(request, limits)
        k = parse_k(k_value, default_k)
        if k > GPU_MAX_K and bundle.device.type == "cuda":
            raise InputError(400, f"k must be at most {GPU_MAX_K} when the model runs on a GPU, got {k}")
        if not uploads:
            raise InputError(
                400, f"no images in the request; upload files in the 'images' field or send {JSON_EXAMPLE}"
            )
        if len(uploads) > max_images:
            raise InputError(413, limits.too_many(len(uploads)))

        async def answer() -> list[Prediction]:
            images = await anyio.to_thread.run_sync(prepare, uploads, limiter=state.get("decoders"))
            return await batcher.submit(images, k, [up.source for up in uploads])

        predictions = await until_disconnected(request, answer())
        return {"model": bundle.name, "k": k, "predictions": [p.to_dict() for p in predictions]}

    @app.get("/v1/classes", response_model=ClassesResponse, summary="The class labels, in index order")
    async def classes() -> dict[str, Any]:
        """The classes the bundle chooses among; `indices` in predictions index this list."""
        return {"model": bundle.name, "num_classes": len(labels), "classes": labels}

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: ERROR_RESPONSES[503]},
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
            "num_classes": len(labels),
            "batcher": batcher.stats(),
        }

    return app
