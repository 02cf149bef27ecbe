"""Prompt templates and the template-ensemble text classifier of a frozen CLIP."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

SIMPLE_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": (SIMPLE_TEMPLATE,),
    "ensemble": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


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
    # All (class, template) prompts go through the text tower in shared batches: one forward pass
    # per class would cost far more than the model itself for small models and short templates.
    prompts = [t.format(name) for name in classnames for t in templates]
    if not prompts:
        raise ValueError("text_classifier needs at least one class name and one template")
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        feats.append(F.normalize(encode_text(tokens).float(), dim=-1))
    per_template = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)
