"""Validate what a client sent: ``k``, base64 text, encoded image bytes; each failure is an :class:`InputError`.

Kept free of FastAPI so it can be tested and reused without the ``serve`` extra.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)


class InputError(Exception):
    """Bad client input: answered with ``status`` and ``{"detail": message}``, never a 5xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_k(value: Any, default: int) -> int:
    """``k`` from a form field (text) or JSON (int); ``None`` gives ``default``.

    Raises:
        InputError: 400 unless a whole number >= 1.
    """
    if value is None or value == "":
        return default
    # ASCII digits only, and few of them: str.isdigit() accepts "²" (int() then fails) and int() refuses
    # strings of thousands of digits; either was a 500 with a server traceback.
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        k = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    else:
        raise InputError(400, f"k must be a whole number >= 1 (classes per image), got {value!r}")
    if k < 1:
        raise InputError(400, f"k must be at least 1 (classes per image), got {k}")
    return k


def max_base64_chars(max_bytes: int) -> int:
    """Characters of base64 text (with a data-URL prefix and some line breaks) for ``max_bytes`` bytes."""
    return 4 * (max_bytes // 3 + 1) + max_bytes // 38 + 256


def decode_base64(text: str, name: str, max_bytes: int) -> bytes:
    """The bytes of base64 ``text`` (standard or URL-safe, optionally a ``data:image/...;base64,`` URL).

    Raises:
        InputError: 400 for text that is not base64, 413 when the bytes would exceed ``max_bytes``.
    """
    text = _DATA_URL.sub("", text.strip(), count=1)
    if len(text) > max_base64_chars(max_bytes):
        raise InputError(413, too_large(name, 3 * len(text) // 4, max_bytes))
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            400,
            f"{name} is not valid base64; send the encoded image file as standard base64 text "
            "(optionally as a data URL, data:image/png;base64,...)",
        ) from None
    check_size(data, name, max_bytes)
    return data


def too_large(name: str, size: int, max_bytes: int) -> str:
    """The message for an image of ``size`` bytes over the ``max_bytes`` limit."""
    return (
        f"{name} is {size} bytes, over the server's limit of {max_bytes} bytes per image; "
        "send a smaller or more compressed image (or start the server with a larger --max-image-mb)"
    )


def check_size(data: bytes, name: str, max_bytes: int) -> None:
    """Raise an :class:`InputError`: 400 for empty ``data``, 413 for more than ``max_bytes``."""
    if not data:
        raise InputError(400, f"{name} is empty (0 bytes); send the encoded image file ({IMAGE_FORMATS})")
    if len(data) > max_bytes:
        raise InputError(413, too_large(name, len(data), max_bytes))


@contextmanager
def _decoding(name: str, max_pixels: int) -> Iterator[None]:
    """Turn what PIL raises on bad bytes into an :class:`InputError` naming the image."""
    try:
        with warnings.catch_warnings():
            # PIL warns (then errors) on huge images; the explicit pixel limit decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise InputError(413, _too_many_pixels(name, 0, 0, max_pixels)) from None
    except UnidentifiedImageError:
        raise InputError(
            400, f"{name} is not an image this server can read; send a {IMAGE_FORMATS} file"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(
            400, f"{name} could not be decoded ({exc}); send the complete, undamaged image file"
        ) from None


def open_image(data: bytes, name: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Open encoded image bytes without decoding the pixels: reads the header and sets up a draft.

    Args:
        data: the encoded image file.
        name: how errors name the image.
        max_pixels: pixels of the image (as stored) at most.
        draft_size: when given, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose sides are
            still at least this many pixels (``Image.draft``): far less work for a model that keeps a few
            hundred pixels a side. Other formats are decoded whole.

    Returns:
        The opened image; its ``size`` is what :func:`load_rgb` will decode.

    Raises:
        InputError: 400 for bytes that are not an image, 413 for more than ``max_pixels`` pixels.
    """
    with _decoding(name, max_pixels):
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise InputError(413, _too_many_pixels(name, width, height, max_pixels))
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size))  # a no-op for formats without draft decoding
        return img


def load_rgb(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` to RGB (400 for damaged data)."""
    with _decoding(name, max_pixels):
        img.load()
        return img.convert("RGB")


def decode_image(data: bytes, name: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (:func:`open_image` then :func:`load_rgb`).

    Raises:
        InputError: 400 for bytes that are not an image, 413 for more than ``max_pixels`` pixels.
    """
    return load_rgb(open_image(data, name, max_pixels, draft_size), name, max_pixels)


def too_many_request_pixels(pixels: int, max_request_pixels: int) -> str:
    """The message for a request whose images decode to more than ``max_request_pixels`` pixels in all."""
    return (
        f"the images of this request decode to {pixels / 1e6:.2f} megapixels in all (JPEGs counted at the "
        f"reduced size they are decoded at), over the server's limit of {max_request_pixels / 1e6:g} "
        "megapixels per request; send fewer or smaller images per request (or start the server with a "
        "larger --max-request-megapixels)"
    )


def _too_many_pixels(name: str, width: int, height: int, max_pixels: int) -> str:
    size = f" ({width}x{height})" if width else ""
    return f"{name} has too many pixels{size}; the limit is {max_pixels} pixels: downscale it before sending"
