"""Load a bundle and classify images with it: no teacher, no text tower, no network, no pickle."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdprompt.data.classnames import prompt_classname
from kdprompt.deploy.export import (
    CACHE_DIR,
    CONFIG_FILE,
    DIGEST_KEY,
    ENCODER_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ONNX_FILE,
    PREPROCESS_FILE,
    manifest_digest,
)
from kdprompt.errors import KdpromptError
from kdprompt.io import file_sha256, recover_swap
from kdprompt.text_features.ranking import index_to_device, rank

ImageInput = str | Path | bytes | Image.Image | Tensor
BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """The top-k classes of one image.

    Attributes:
        labels: readable class labels (:attr:`Bundle.labels`), most probable first; ``indices`` name
            the classes exactly.
        probs: their probabilities, computed as ``probabilities`` says.
        indices: their class indices.
        source: the image's name (its path, or ``image[i]``).
        probabilities: ``full``: a softmax over all the bundle's classes; ``candidates``: a softmax over
            the classes the FAISS index retrieved (a large vocabulary, or an approximate index that did
            not reach every class), an upper bound of the full-vocabulary probability.
    """

    labels: list[str]
    probs: list[float]
    indices: list[int]
    source: str = ""
    probabilities: str = "full"

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of the bundle at ``path``.

    Raises:
        KdpromptError: not a bundle, unreadable, another format, a newer format version, a manifest
            changed since export (its ``manifest_sha256``), or missing or malformed fields.
    """
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        hint = (
            "; it is a student run: export it first with `kdprompt export RUN OUT`"
            if (path / "student.json").is_file() or (path / "student" / "student.json").is_file()
            else "; create one with `kdprompt export STUDENT_RUN OUT`"
        )
        raise KdpromptError(f"{path} is not a kdprompt bundle: {MANIFEST_FILE} is missing{hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KdpromptError(f"{file} is not readable JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdpromptError(f"{file} is not a {FORMAT} manifest; re-export the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise KdpromptError(
            f"{file}: format_version must be an integer, got {version!r}; re-export the bundle with "
            "`kdprompt export`"
        )
    if version > FORMAT_VERSION:
        raise KdpromptError(
            f"bundle {path} has format version {version}; this kdprompt reads up to {FORMAT_VERSION}: "
            "upgrade kdprompt or re-export the bundle with this version"
        )
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        why = "has no" if DIGEST_KEY not in manifest else "does not match its"
        raise KdpromptError(
            f"{file} {why} {DIGEST_KEY}: the manifest was edited or damaged after export (or written by an "
            "older kdprompt) and cannot be trusted; re-export the bundle with `kdprompt export`"
        )
    _check_fields(file, manifest)
    return manifest


# What the loader reads: each must be listed (with its sha256) so none is served unchecked.
REQUIRED_FILES = (
    ENCODER_FILE,
    CONFIG_FILE,
    PREPROCESS_FILE,
    f"{CACHE_DIR}/manifest.json",
    f"{CACHE_DIR}/text_features.safetensors",
    f"{CACHE_DIR}/index.faiss",
)


def _check_fields(file: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest missing what loading needs, or listing a file outside the bundle."""

    def bad(field: str, want: str) -> KdpromptError:
        found = f"got {manifest[field]!r:.80}" if field in manifest else "it is missing"
        return KdpromptError(
            f"{file}: {field} must be {want}, {found}; re-export the bundle with `kdprompt export`"
        )

    model, cache = manifest.get("model"), manifest.get("cache")
    if not isinstance(model, dict) or not isinstance(model.get("projector"), list):
        raise bad("model", "an object with a projector list")
    size = model.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(n, int) and n > 0 for n in size)):
        raise bad("model", "an object whose input_size is [3, H, W]")
    if not isinstance(manifest.get("preprocess"), dict):
        raise bad("preprocess", "an object (open_clip PreprocessCfg)")
    if not isinstance(cache, dict) or not isinstance(cache.get("teacher_fingerprint"), str):
        raise bad("cache", "an object with the teacher_fingerprint")
    scale = manifest.get("logit_scale")
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise bad("logit_scale", "a finite positive number")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise bad("files", "an object mapping every file of the bundle to its sha256")
    outside = [rel for rel in files if not _inside(rel)]
    if outside:
        raise KdpromptError(
            f"{file}: files lists path(s) outside the bundle ({', '.join(map(repr, outside[:3]))}): only "
            "relative paths without '..' are allowed; re-export the bundle with `kdprompt export`"
        )
    unlisted = [rel for rel in REQUIRED_FILES if rel not in files]
    if unlisted:
        raise KdpromptError(
            f"{file}: files does not list {', '.join(unlisted)}, which loading reads and must check; "
            "re-export the bundle with `kdprompt export`"
        )


def _inside(rel: str) -> bool:
    """Whether ``rel`` names a path under the bundle: relative, POSIX, no ``..``."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and ".." not in pure.parts and bool(pure.parts)


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest exists in the bundle with its sha256.

    A listed file that is a link resolving outside the bundle counts as changed: it is never read.

    Raises:
        KdpromptError: names the missing or changed files.
    """
    root = path.resolve()
    missing, changed = [], []
    for rel, digest in manifest["files"].items():
        file = path / rel
        if not file.resolve().is_relative_to(root):
            changed.append(f"{rel} (a link out of the bundle)")
        elif not file.is_file():
            missing.append(rel)
        elif file_sha256(file) != digest:
            changed.append(rel)
    if missing or changed:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"changed since export: {', '.join(changed)}"] if changed else []
        )
        raise KdpromptError(
            f"bundle {path} is damaged ({'; '.join(parts)}); re-export it with `kdprompt export`"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KdpromptError(f"{path} is not readable JSON ({e}); re-export the bundle") from e


def _build_transform(cfg: dict[str, Any], where: Path) -> Callable[[Image.Image], Tensor]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    try:
        cfg = {**cfg, "size": tuple(cfg["size"]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    except (KeyError, TypeError, ValueError) as e:
        raise KdpromptError(
            f"{where / MANIFEST_FILE}: preprocess is not a valid open_clip PreprocessCfg "
            f"({type(e).__name__}: {e}); re-export the bundle with `kdprompt export`"
        ) from None


def _load_torch_encoder(path: Path, manifest: dict[str, Any]) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kdprompt.deploy.encoder import ImageEncoder, build_projector, build_visual

    model = manifest["model"]
    try:
        state = load_file(str(path / ENCODER_FILE))
    except (SafetensorError, OSError) as e:
        raise KdpromptError(
            f"{path / ENCODER_FILE} is not a readable safetensors file ({e}); re-export it"
        ) from e
    visual = build_visual(_read_json(path / CONFIG_FILE))
    prompts = state.get("prompts")
    encoder = ImageEncoder(visual, build_projector(model["projector"]), prompts)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise KdpromptError(f"{path / ENCODER_FILE} does not fit {path / CONFIG_FILE}: {e}") from e
    return encoder.eval()


class Bundle:
    """A deployable student: image encoder + cached class text features.

    Also an :class:`kdprompt.evaluate.ImageTextClassifier`, so ``kdprompt eval --bundle`` evaluates it.

    Attributes:
        path: the bundle directory.
        manifest: its manifest.
        cache: the text-feature cache (features, FAISS index, class names); predictions rank through
            its index (on the GPU with faiss-gpu when the bundle runs on CUDA).
        transform: PIL image -> preprocessed tensor.
        name: report name.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        encoder: Callable[[Tensor], Tensor],
        cache: Any,
        device: torch.device,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.encoder = encoder
        self.cache = cache
        self.device = device
        self.transform = _build_transform(manifest["preprocess"], self.path)
        self.name = f"bundle {manifest.get('name') or self.path.name}"
        self._index = index_to_device(cache.index, device)

    @property
    def classnames(self) -> list[str]:
        """The class names, in index order, as the cache identifies them."""
        return list(self.cache.classnames)

    @property
    def labels(self) -> list[str]:
        """The readable class labels, in index order: the class names as prompts spell them."""
        return [prompt_classname(name) for name in self.cache.classnames]

    @property
    def logit_scale(self) -> float:
        """The teacher's (exponentiated) logit scale."""
        return float(self.manifest["logit_scale"])

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(3, H, W) of a preprocessed image."""
        c, h, w = self.manifest["model"]["input_size"]
        return int(c), int(h), int(w)

    def to(self, device: torch.device | str) -> Bundle:
        """Move the (torch) encoder and the class index to ``device``; returns self."""
        self.device = torch.device(device)
        if isinstance(self.encoder, torch.nn.Module):
            self.encoder.to(self.device)
        self._index = index_to_device(self.cache.index, self.device)
        return self

    # ---------------------------------------------------------------- ImageTextClassifier interface

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) unit-norm features in the teacher's space."""
        if isinstance(self.encoder, torch.nn.Module):
            images = images.to(self.device)
        return self.encoder(images).float()

    def class_features(self, classnames: list[str]) -> Tensor:
        """Cached text features of ``classnames`` (C x D)."""
        return self.cache.subset(list(classnames)).features

    # ---------------------------------------------------------------------------------- prediction

    def preprocess(self, image: ImageInput, name: str = "image") -> Tensor:
        """One image -> a (3, H, W) model input.

        Args:
            image: a path, encoded bytes, a PIL image, a uint8 (3, H, W) RGB tensor (preprocessed here)
                or a float (3, H, W) tensor taken as already preprocessed.
            name: how the image is named in errors.

        Raises:
            KdpromptError: unreadable image, or a tensor of the wrong shape.
        """
        from kdprompt.data.types import decode_image

        if isinstance(image, Tensor):
            if image.dtype == torch.uint8:
                from torchvision.transforms.functional import to_pil_image

                if image.dim() != 3 or image.shape[0] not in (1, 3):
                    raise KdpromptError(
                        f"{name}: a uint8 image tensor must be (3, H, W), got {tuple(image.shape)}"
                    )
                return self.transform(to_pil_image(image).convert("RGB"))
            if tuple(image.shape) != self.input_size:
                raise KdpromptError(
                    f"{name}: a float tensor is taken as a preprocessed image of shape {self.input_size}, "
                    f"got {tuple(image.shape)}; pass a PIL image or a path to have it preprocessed"
                )
            return image.float()
        if isinstance(image, Image.Image):
            return self.transform(image.convert("RGB"))
        if isinstance(image, (str, Path, bytes)):
            return self.transform(decode_image(image, name if isinstance(image, bytes) else str(image)))
        raise KdpromptError(
            f"{name}: cannot classify a {type(image).__name__}; give a path, bytes, PIL image or tensor"
        )

    @torch.no_grad()
    def predict_tensor(
        self, batch: Tensor, k: int = 5, sources: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Top-``k`` predictions of a (B, 3, H, W) batch of preprocessed images, ranked through the index.

        Each :class:`Prediction` says how its probabilities were computed (``probabilities``); an
        approximate index may find fewer than ``k`` classes for an image.
        """
        if k < 1:
            raise KdpromptError(f"k must be at least 1, got {k}")
        if batch.shape[0] == 0:
            return []
        feats = F.normalize(self.encode_images(batch).float(), dim=-1)
        ranking = rank(self._index, feats, k, self.logit_scale)
        # Only the returned classes' labels: `self.labels` builds all of them (1M names: ~60 ms a call).
        names = self.cache.classnames
        out = []
        for i in range(batch.shape[0]):
            found = ranking.ids[i] >= 0  # an approximate index may return fewer than k: id -1
            idx = [int(j) for j in ranking.ids[i][found]]
            out.append(
                Prediction(
                    labels=[prompt_classname(names[j]) for j in idx],
                    probs=[float(p) for p in ranking.probs[i][found]],
                    indices=idx,
                    source=sources[i] if sources is not None else f"image[{i}]",
                    probabilities=ranking.probabilities,
                )
            )
        return out

    def predict(
        self, images: ImageInput | Iterable[ImageInput], k: int = 5, batch_size: int = 64
    ) -> list[Prediction]:
        """Top-``k`` classes of each image.

        Args:
            images: one image or a sequence of them (paths, bytes, PIL images, tensors; see
                :meth:`preprocess`), or a (B, 3, H, W) float tensor of preprocessed images.
            k: classes per image.
            batch_size: images per forward pass.

        Returns:
            One :class:`Prediction` per image, in order.

        Raises:
            KdpromptError: an image cannot be read (the message names it).
        """
        if isinstance(images, Tensor) and images.dim() == 4:
            items: list[ImageInput] = list(images.unbind(0))
        elif isinstance(images, (str, Path, bytes, Image.Image, Tensor)):
            items = [images]
        else:
            items = list(images)
        sources = [str(x) if isinstance(x, (str, Path)) else f"image[{i}]" for i, x in enumerate(items)]
        out: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            names = sources[start : start + batch_size]
            batch = torch.stack([self.preprocess(x, n) for x, n in zip(chunk, names, strict=True)])
            out.extend(self.predict_tensor(batch, k, names))
        return out


def load_bundle(
    path: str | Path, device: str | torch.device = "cpu", backend: str = "torch", verify: bool = True
) -> Bundle:
    """Load a bundle written by ``kdprompt export``.

    Args:
        path: the bundle directory.
        device: where the torch encoder runs (``onnx`` runs on onnxruntime's CPU provider).
        backend: ``torch`` (rebuild the open_clip tower) or ``onnx`` (``image_encoder.onnx`` on onnxruntime).
        verify: check every file against the manifest's sha256.

    Returns:
        The :class:`Bundle`.

    Raises:
        KdpromptError: not a bundle, a damaged or newer-format bundle, or a missing ONNX file.
    """
    from kdprompt.text_features import load_cache

    path = Path(path)
    # An export killed between its two renames left the previous bundle aside as .NAME.old.
    recover_swap(path)
    manifest = read_manifest(path)
    if backend not in BACKENDS:
        raise KdpromptError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if verify:
        verify_files(path, manifest)
    for needed in (ENCODER_FILE, CONFIG_FILE, PREPROCESS_FILE):
        if not (path / needed).is_file():
            raise KdpromptError(f"bundle {path} is incomplete: {needed} is missing; re-export it")
    cache = load_cache(path / CACHE_DIR, expect_fingerprint=manifest["cache"]["teacher_fingerprint"])
    device = torch.device(device)
    if backend == "onnx":
        if not (path / ONNX_FILE).is_file() or ONNX_FILE not in manifest["files"]:
            raise KdpromptError(
                f"bundle {path} has no {ONNX_FILE}; re-export it with `kdprompt export RUN OUT --onnx`"
            )
        from kdprompt.deploy.onnx import OnnxImageEncoder

        encoder: Callable[[Tensor], Tensor] = OnnxImageEncoder(path / ONNX_FILE)
        device = torch.device("cpu")
    else:
        encoder = _load_torch_encoder(path, manifest).to(device)
    return Bundle(path, manifest, encoder, cache, device)
