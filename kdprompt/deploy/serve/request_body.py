"""Reading a classify request: image files and ``k`` from a multipart/form-data or JSON body.

The body is read in chunks, refused with a 413 as soon as it passes the request's limit and with a 408
when it has not all arrived within the body timeout; every failure is an
:class:`~kdprompt.deploy.serve.inputs.InputError` (a 4xx naming the fix), except a client that hangs up,
which is a :class:`ClientGone` (nobody is left to answer). :func:`until_disconnected` then watches the
connection while the request is served.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from kdprompt.deploy.serve.inputs import InputError, check_size, too_large
from kdprompt.deploy.serve.schemas import Limits

IMAGE_FIELDS = ("images", "image")
JSON_EXAMPLE = '{"images": ["<base64>", ...], "k": 5}'

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer; ``when`` says at which point."""

    def __init__(self, when: str) -> None:
        super().__init__(f"the client disconnected {when}")
        self.when = when


@dataclass
class Upload:
    """One image of a request, not yet decoded: the bytes of a file, or base64 text."""

    name: str  # how errors name it: images[i] (filename)
    source: str  # Prediction.source: the filename, else images[i]
    data: bytes | None = None  # multipart: the file's bytes
    text: str | None = None  # JSON: base64 text


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def body_timeout_message(timeout: float) -> str:
    """The message for a body that did not all arrive within ``timeout`` seconds."""
    return (
        f"the request body did not arrive within {timeout:g} s; send the whole body without pausing "
        "(or start the server with a larger --body-timeout)"
    )


async def _body_chunks(request: Request, limit: int, limits: Limits) -> AsyncIterator[bytes]:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes.

    Raises:
        InputError: 413 past ``limit``; 408 when the body has not all arrived ``limits.body_timeout``
            seconds after reading began (a half-sent body would otherwise hold its connection forever).
        ClientGone: the client hung up before the end of the body.
    """
    declared = request.headers.get("content-length", "")
    too_big = (
        f"the request body is over {limit} bytes, the most this server reads in one request (at most "
        f"{limits.max_images} images of {limits.max_image_bytes} bytes each, {limits.max_request_bytes} bytes "
        "in all); send fewer or smaller images per request"
    )
    if declared.isdigit() and int(declared) > limit:
        raise InputError(413, too_big)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    seen = 0
    more = True
    while more:
        # The raw ASGI channel rather than request.stream(): it reports a hang-up as a message we can
        # name, and one deadline covers the whole body, so a client trickling bytes cannot extend it.
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise InputError(408, body_timeout_message(limits.body_timeout)) from None
        if message["type"] == "http.disconnect":
            raise ClientGone("while sending its request body")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        seen += len(chunk)
        if seen > limit:
            raise InputError(413, too_big)
        if chunk:
            yield chunk


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is read, the ASGI channel has nothing more to say until the client hangs up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (after the body is read), cancelling it if the client hangs up first.

    The ASGI server does not cancel a request whose client has gone; without this its images would
    still be decoded and run through the model, delaying the requests of clients still waiting.

    Raises:
        ClientGone: the client disconnected before ``work`` finished.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation settle (the batcher drops the images) before answering.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("while waiting for its answer")
    return task.result()


async def _read_multipart(request: Request, limits: Limits) -> tuple[list[Upload], Any]:
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
    uploads: list[Upload] = []
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
                uploads.append(Upload(name, value.filename or f"images[{i}]", data=data))
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


async def _read_json(request: Request, limits: Limits) -> tuple[list[Upload], Any]:
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
        uploads.append(Upload(f"images[{i}]", f"images[{i}]", text=text))
    return uploads, payload.get("k")


async def read_uploads(request: Request, limits: Limits) -> tuple[list[Upload], Any]:
    """The images and the raw ``k`` of a classify request, by its content type.

    Raises:
        InputError: 415 for a body neither multipart/form-data nor JSON, else what the body's reader raises.
    """
    kind = _content_type(request)
    if kind == "multipart/form-data":
        return await _read_multipart(request, limits)
    if kind == "application/json" or kind.endswith("+json"):
        return await _read_json(request, limits)
    raise InputError(
        415,
        f"unsupported content type {kind or '(none)'!r}; send multipart/form-data with image files in "
        f"the 'images' field, or application/json {JSON_EXAMPLE}",
    )
