"""Prompt templates, the template sets, and the template-ensemble classifier.

Every place where a class name becomes text for a text tower goes through
:func:`~kdprompt.data.classnames.prompt_classname` (the teacher's prompts, the frozen template
ensembles, zero-shot classifiers, the text-feature cache), so teacher, cache and student always see one
spelling of a class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from kdprompt.data.classnames import prompt_classname
from kdprompt.errors import KdpromptError

if TYPE_CHECKING:
    from kdprompt.data.source import DataSource

Averaging = Literal["normalised", "raw"]
TemplateSetName = Literal["simple", "ensemble", "promptsrc", "coop"]
TEMPLATE_SET_NAMES: tuple[str, ...] = get_args(TemplateSetName)

SIMPLE_TEMPLATE = "a photo of a {}."

# PromptSRC's frozen text ensemble (muzairkhattak/PromptSRC trainers/imagenet_templates.py,
# IMAGENET_TEMPLATES, imported by trainers/promptsrc.py): 60 of the 80 OpenAI ImageNet templates.
PROMPTSRC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)

# CoOp's zero-shot baseline, one template per dataset (KaiyangZhou/CoOp trainers/zsclip.py,
# CUSTOM_TEMPLATES), keyed by kdprompt's coop dataset names.
COOP_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}


@dataclass(frozen=True)
class TemplateSet:
    """Prompt templates (``{}`` marks the class name) and how a class's template features are averaged.

    Attributes:
        templates: the templates.
        average: ``normalised`` averages unit-length features (open_clip, CoOp's ``ZeroshotCLIP2``);
            ``raw`` averages the text tower's raw outputs (PromptSRC's frozen ensemble). The mean is
            L2-normalised either way.
    """

    templates: tuple[str, ...]
    average: Averaging = "normalised"

    def prompts(self, classnames: Sequence[str]) -> list[str]:
        """Every prompt, class-major: all templates of the first class, then of the next."""
        return [t.format(prompt_classname(name)) for name in classnames for t in self.templates]


TEMPLATE_SETS: dict[str, TemplateSet] = {
    "simple": TemplateSet((SIMPLE_TEMPLATE,)),
    "ensemble": TemplateSet(tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)),
    # PromptSRC trainers/promptsrc.py: encode_text per template, mean over templates, normalised later.
    "promptsrc": TemplateSet(PROMPTSRC_TEMPLATES, average="raw"),
}
"""The template sets that need no data; ``coop`` is resolved per dataset by :func:`template_set`."""


def template_set(name: str, data: DataSource | None = None) -> TemplateSet:
    """The template set ``name``: one of :data:`TEMPLATE_SET_NAMES`.

    Args:
        name: ``simple`` ("a photo of a {}."), ``ensemble`` (open_clip's 80 ImageNet templates),
            ``promptsrc`` (PromptSRC's 60, raw features averaged) or ``coop`` (CoOp's template of the
            dataset ``data`` names).
        data: the data config the classes come from; only ``coop`` reads it (``data.dataset`` of the
            ``coop`` source).

    Raises:
        KdpromptError: an unknown name, or ``coop`` without coop data.
    """
    if name == "coop":
        dataset = getattr(data, "dataset", None) if getattr(data, "source", None) == "coop" else None
        if dataset not in COOP_TEMPLATES:
            found = getattr(data, "source", None) or "no data"
            raise KdpromptError(
                f"templates 'coop' are CoOp's per-dataset templates and need coop data (data.source: coop), "
                f"got {found}; choose one of {', '.join(n for n in TEMPLATE_SET_NAMES if n != 'coop')}"
            )
        return TemplateSet((COOP_TEMPLATES[dataset],))
    if name not in TEMPLATE_SETS:
        raise KdpromptError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SET_NAMES)}")
    return TEMPLATE_SETS[name]


@torch.no_grad()
def text_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: TemplateSet | Sequence[str] = TEMPLATE_SETS["simple"],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights (C x D, L2-normalised): per class, the normalised mean of its template features.

    Args:
        encode_text: token ids -> text features.
        tokenizer: prompts -> token ids.
        classnames: the classes (underscores become spaces, see :func:`prompt_classname`).
        templates: a :class:`TemplateSet`, or templates whose normalised features are averaged.
        device: where the tokens go.
        batch_size: prompts per forward pass.
    """
    tset = templates if isinstance(templates, TemplateSet) else TemplateSet(tuple(templates))
    # All (class, template) prompts go through the text tower in shared batches: one forward pass
    # per class would cost far more than the model itself for small models and short templates.
    prompts = tset.prompts(classnames)
    if not prompts:
        raise ValueError("text_classifier needs at least one class name and one template")
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        feats.append(encode_text(tokens).float())
    per_template = torch.cat(feats).view(len(classnames), len(tset.templates), -1)
    if tset.average == "normalised":
        per_template = F.normalize(per_template, dim=-1)
    return F.normalize(per_template.mean(dim=1), dim=-1)
