"""What the API answers (the response models of the OpenAPI page) and what one request may carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from kdprompt.deploy.serve.inputs import max_base64_chars

# Room for multipart headers / JSON punctuation beyond the image bytes themselves.
BODY_SLACK = 64 * 1024


class PredictionOut(BaseModel):
    """The top-k classes of one image."""

    labels: list[str]
    probs: list[float]
    indices: list[int]
    source: str
    probabilities: Literal["full", "candidates"] = Field(
        default="full",
        description=(
            "full: a softmax over every class; candidates: over the classes the FAISS index retrieved "
            "(large vocabularies, or an approximate index), an upper bound of the full probability"
        ),
    )


class ClassifyResponse(BaseModel):
    """Predictions, one per image in the order sent."""

    model: str
    k: int
    predictions: list[PredictionOut]


class ClassesResponse(BaseModel):
    """The bundle's class labels (class names with underscores as spaces), in index order."""

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
    max_request_pixels: int
    body_timeout: float  # seconds for the whole body to arrive

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
