"""Accuracy, zero-shot classifiers, base/novel/harmonic mean and their reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch.utils.data import DataLoader

from kdprompt.data.dataset import SplitDataset
from kdprompt.data.types import Split

SIMPLE_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": (SIMPLE_TEMPLATE,),
    "ensemble": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two accuracies (0 when either is 0)."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@torch.no_grad()
def text_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = (SIMPLE_TEMPLATE,),
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights (C x D, L2-normalised): per class, the normalised mean of normalised template features."""
    weights = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        feats = []
        for i in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[i : i + batch_size]).to(device)
            feats.append(F.normalize(encode_text(tokens).float(), dim=-1))
        mean = torch.cat(feats).mean(dim=0)
        weights.append(F.normalize(mean, dim=-1))
    return torch.stack(weights)


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
    templates: Sequence[str] = (SIMPLE_TEMPLATE,),
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
