"""Accuracy, zero-shot classifiers, base/novel/harmonic mean and their reports.

Every model that classifies images against class names (a zero-shot CLIP, a prompt-learned teacher,
a distilled student, a deployed bundle) implements :class:`ImageTextClassifier`; the base/novel
evaluation and the ``kdprompt eval`` command work on that interface alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdprompt.data.dataset import SplitDataset
from kdprompt.data.protocol import base_novel_labels
from kdprompt.data.types import Split
from kdprompt.errors import KdpromptError
from kdprompt.models.templates import TEMPLATE_SETS, TemplateSet, template_set, text_classifier
from kdprompt.text_features.ranking import build_index, plan_index

if TYPE_CHECKING:
    from kdprompt.models.loading import LoadedClip


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two accuracies (0 when either is 0)."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@torch.no_grad()
def predict(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    classifier: torch.Tensor,
    split: Split,
    transform: Callable,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every sample of ``split`` (cosine similarity to ``classifier`` rows)."""
    loader = DataLoader(SplitDataset(split, transform), batch_size=batch_size, shuffle=False)
    preds, labels = [], []
    classifier = classifier.to(device)
    for images, target in loader:
        feats = F.normalize(encode_image(images.to(device)).float(), dim=-1)
        preds.append((feats @ classifier.T).argmax(dim=-1).cpu())
        labels.append(target)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0 for an empty split)."""
    return 0.0 if labels.numel() == 0 else 100.0 * (preds == labels).float().mean().item()


def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable,
    split: Split,
    templates: TemplateSet | Sequence[str] = TEMPLATE_SETS["simple"],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> float:
    """Zero-shot top-1 accuracy (%) of an open_clip model on a labelled split among its classes."""
    was_training = model.training
    model.eval()
    try:
        classifier = text_classifier(model.encode_text, tokenizer, split.classnames, templates, device)
        preds, labels = predict(model.encode_image, classifier, split, transform, device, batch_size)
    finally:
        model.train(was_training)
    return accuracy(preds, labels)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (floats with 2 decimals)."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# ------------------------------------------------------------------------ the classifier interface


@runtime_checkable
class ImageTextClassifier(Protocol):
    """What every evaluable model provides: image features and class-name features in one space.

    Attributes:
        name: how the model is shown in reports (e.g. ``"zero-shot kd-tiny-teacher"``).
        transform: PIL image -> image tensor, the model's evaluation preprocessing.
    """

    name: str
    transform: Callable[[Image.Image], Tensor]

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image features (B x D) of a batch of transformed images."""
        ...

    def class_features(self, classnames: list[str]) -> Tensor:
        """L2-normalised class features (C x D), row ``i`` for ``classnames[i]``."""
        ...


class ZeroShotClassifier:
    """A plain open_clip CLIP as an :class:`ImageTextClassifier`: classes are prompted templates.

    Args:
        clip: the model with its tokenizer and evaluation transform.
        templates: a template set by name (see :func:`~kdprompt.models.templates.template_set`; ``coop``
            needs ``data``), a :class:`~kdprompt.models.templates.TemplateSet`, or a sequence of
            ``{}`` templates (normalised features averaged).
        name: report name; default ``"zero-shot <model name>"``.
        data: the data config of the classes, for ``templates="coop"``.

    Raises:
        KdpromptError: an unknown template set, or ``coop`` without coop data.
    """

    def __init__(
        self,
        clip: LoadedClip,
        templates: str | TemplateSet | Sequence[str] = "simple",
        name: str | None = None,
        data: Any = None,
    ) -> None:
        if isinstance(templates, str):
            templates = template_set(templates, data)
        self.model = clip.model
        self.tokenizer = clip.tokenizer
        self.transform = clip.preprocess_val
        self.templates = templates if isinstance(templates, TemplateSet) else TemplateSet(tuple(templates))
        self.name = name or f"zero-shot {clip.spec.name}"
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ZeroShotClassifier:
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised float image features (B x D)."""
        # Low-precision models (bf16/fp16 weights) need inputs of the same dtype.
        dtype = next(self.model.visual.parameters()).dtype
        feats = self.model.encode_image(images.to(device=self.device, dtype=dtype))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def class_features(self, classnames: list[str]) -> Tensor:
        """Template-averaged, L2-normalised class features (C x D)."""
        return text_classifier(
            self.model.encode_text, self.tokenizer, classnames, self.templates, self.device
        )


# ------------------------------------------------------------------------------- base/novel/HM


@torch.no_grad()
def _encode_split(
    clf: ImageTextClassifier, split: Split, device: torch.device | str, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Image features (N x D, on CPU, float) and labels (N) of every sample of ``split``."""
    loader = DataLoader(SplitDataset(split, clf.transform), batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    for images, target in loader:
        feats.append(F.normalize(clf.encode_images(images.to(device)).float(), dim=-1).cpu())
        labels.append(target)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _subset_accuracy(
    image_feats: Tensor, class_feats: Tensor, labels: Tensor, classes: list[int]
) -> tuple[float, int]:
    """Top-1 (%) and count of the images whose label is in ``classes``, ranked among those classes.

    The ranking goes through an exact FAISS index over the subset's class features (the inner products
    of a matrix product, without materialising the image x class matrix).
    """
    if not classes:
        return 0.0, 0
    lo, hi = classes[0], classes[-1] + 1  # base and novel labels are contiguous ranges
    rows = (labels >= lo) & (labels < hi)
    n = int(rows.sum())
    if n == 0:
        return 0.0, 0
    index = build_index(class_feats[lo:hi], plan_index(hi - lo, "flat"))
    _, top = index.search(image_feats[rows].float().numpy(), 1)
    preds = torch.from_numpy(top[:, 0]).long() + lo
    return accuracy(preds, labels[rows]), n


def evaluate_base_novel(
    clf: ImageTextClassifier,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Base / novel / all top-1 accuracy and their harmonic mean, by the CoOp protocol.

    Base classes are the first ``ceil(n / 2)`` of the split's ``n`` classes, novel the rest. Base
    images are classified among the base classes only, novel images among the novel classes only,
    and every image among all classes. Each image and each class is encoded once: a class's
    features do not depend on the other classes, so the three settings rank the same features through
    exact FAISS indexes over the base, novel and all classes.

    Args:
        clf: the model (moved to ``device`` when it has a ``to`` method; evaluated in eval mode).
        split: a labelled split, labels indexing ``split.classnames``.
        device: where images are encoded.
        batch_size: images per forward pass.

    Returns:
        ``model``, ``split``, ``base``, ``novel``, ``all``, ``hm`` (percent), ``n_base``,
        ``n_novel``, ``n_all`` (images) and ``num_base_classes``, ``num_novel_classes``.

    Raises:
        KdpromptError: an image cannot be read (the message names it), or a label is out of range.
    """
    num_classes = len(split.classnames)
    for s in split.samples:
        if not 0 <= s.label < num_classes:
            what = s.key or (s.image if isinstance(s.image, str) else "<bytes>")
            raise KdpromptError(f"sample {what!r} has label {s.label}, outside 0..{num_classes - 1}")
    base, novel = base_novel_labels(num_classes)
    if hasattr(clf, "to"):
        clf.to(device)
    was_training = clf.training if isinstance(clf, nn.Module) else None
    if isinstance(clf, nn.Module):
        clf.eval()
    try:
        with torch.no_grad():
            image_feats, labels = _encode_split(clf, split, device, batch_size)
            if labels.numel() and num_classes:
                class_feats = F.normalize(clf.class_features(list(split.classnames)).float(), dim=-1).cpu()
            else:
                class_feats = torch.empty(num_classes, 0)
    finally:
        if isinstance(clf, nn.Module) and was_training is not None:
            clf.train(was_training)
    base_acc, n_base = _subset_accuracy(image_feats, class_feats, labels, base)
    novel_acc, n_novel = _subset_accuracy(image_feats, class_feats, labels, novel)
    all_acc, n_all = _subset_accuracy(image_feats, class_feats, labels, list(range(num_classes)))
    return {
        "model": clf.name,
        "split": split.name,
        "base": base_acc,
        "novel": novel_acc,
        "all": all_acc,
        "hm": harmonic_mean(base_acc, novel_acc),
        "n_base": n_base,
        "n_novel": n_novel,
        "n_all": n_all,
        "num_base_classes": len(base),
        "num_novel_classes": len(novel),
    }


EVALUATION_COLUMNS: tuple[str, ...] = ("model", "base", "novel", "HM", "all")


def evaluation_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table (model, base, novel, HM, all) of :func:`evaluate_base_novel` results."""
    rows = [
        {"model": r["model"], "base": r["base"], "novel": r["novel"], "HM": r["hm"], "all": r["all"]}
        for r in results
    ]
    return markdown_table(rows, EVALUATION_COLUMNS)
