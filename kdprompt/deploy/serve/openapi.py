"""The OpenAPI page of the app: its description, the classify request body, and the error answers."""

from __future__ import annotations

from typing import Any

from kdprompt.deploy import Bundle
from kdprompt.deploy.serve.inputs import IMAGE_FORMATS
from kdprompt.deploy.serve.request_body import JSON_EXAMPLE
from kdprompt.deploy.serve.schemas import ErrorResponse


def app_description(bundle: Bundle) -> str:
    """The page's introduction: the model served and how to call ``POST /v1/classify``."""
    return (
        f"Image classification with the distilled CLIP student **{bundle.name}** "
        f"({len(bundle.classnames)} classes, {bundle.input_size[1]}x{bundle.input_size[2]} inputs).\n\n"
        "`POST /v1/classify` takes image files as `multipart/form-data` (field `images`, repeatable; "
        f"optional `k`) or `application/json` `{JSON_EXAMPLE}` and answers the top-k classes of each "
        'image with their probabilities. Bad input answers a 4xx with `{"detail": ...}`.\n\n'
        "    curl -F images=@cat.jpg -F images=@dog.png -F k=3 http://HOST:PORT/v1/classify"
    )


def classify_openapi(default_k: int) -> dict[str, Any]:
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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Not an image, empty, bad base64, no images or bad k."},
    408: {
        "model": ErrorResponse,
        "description": "The body did not all arrive within the server's body timeout.",
    },
    413: {
        "model": ErrorResponse,
        "description": "An image or the request is too large (bytes or pixels), or too many images.",
    },
    415: {"model": ErrorResponse, "description": "Neither multipart/form-data nor application/json."},
    422: {"model": ErrorResponse, "description": "Malformed JSON, or an unknown or mistyped field."},
    503: {"model": ErrorResponse, "description": "Busy (queue full), starting or stopping; see Retry-After."},
}
