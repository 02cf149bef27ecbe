"""PromptSRC parity: kdprompt's loss terms and Gaussian prompt aggregation against the reference formulas.

The reference is muzairkhattak/PromptSRC ``trainers/promptsrc.py``: CustomCLIP.forward (the frozen text
ensemble averaged over IMAGENET_TEMPLATES from raw ``encode_text`` outputs, then normalised; zero-shot
logits from the frozen image features), PromptSRC.forward_backward (CE + 25 · L1 text + 10 · L1 image +
KL with ``log_target=True``, ``reduction='sum'`` over ``logits.numel()``) and ``get_gauss`` with the
``state_dict_weighting`` / ``state_dict_add`` aggregation. They are written here from that code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.prompt_methods import PromptSRCConfig, TeacherOutputs
from kdprompt.models.prompt_methods.promptsrc import (
    GaussianPromptAggregation,
    gaussian_epoch_weights,
    promptsrc_losses,
)
from kdprompt.models.teacher import PromptedClip
from kdprompt.models.templates import PROMPTSRC_TEMPLATES

TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 25.0, 10.0  # configs/trainers/PromptSRC/*.yaml
TOL = 1e-6


def reference_losses(
    logits: Tensor,
    label: Tensor,
    normalized_text_features: Tensor,
    zs_clip_text_embeddings: Tensor,
    zs_image_embedd: Tensor,
    image_ft: Tensor,
    zero_shot_logits: Tensor,
) -> dict[str, Tensor]:
    """PromptSRC.forward_backward's terms (fp32 path)."""
    loss_ce = F.cross_entropy(logits, label)
    loss_scl_text = (
        F.l1_loss(normalized_text_features, zs_clip_text_embeddings, reduction="mean") * TEXT_LOSS_WEIGHT
    )
    loss_scl_image = F.l1_loss(image_ft, zs_image_embedd, reduction="mean") * IMAGE_LOSS_WEIGHT
    kl = (
        F.kl_div(
            F.log_softmax(logits / 1, dim=1),
            F.log_softmax(zero_shot_logits / 1, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (1 * 1)
        / logits.numel()
    )
    return {
        "ce": loss_ce,
        "text_l1": loss_scl_text,
        "image_l1": loss_scl_image,
        "kl": kl,
        "loss": loss_ce + (kl + loss_scl_text + loss_scl_image),
    }


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _close(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    """Every term within TOL, relative to the term's size once it exceeds 1 (float32 sums of ~40 differ
    in the last bits with the order of addition)."""
    assert ours.keys() == ref.keys()
    for name in ref:
        assert (ours[name] - ref[name]).abs().item() <= TOL * max(1.0, ref[name].abs().item()), name


def test_loss_terms_match_on_the_same_tensors():
    g = torch.Generator().manual_seed(0)
    b, c, d, scale = 6, 5, 16, 100.0

    def unit(*shape: int) -> Tensor:
        return _unit(torch.randn(*shape, generator=g, dtype=torch.float64))

    text, frozen_text, image, frozen_image = unit(c, d), unit(c, d), unit(b, d), unit(b, d)
    labels = torch.randint(0, c, (b,), generator=g)
    logits, zero_shot = scale * image @ text.T, scale * frozen_image @ frozen_text.T
    ours = promptsrc_losses(
        logits=logits,
        labels=labels,
        text_features=text,
        frozen_text_features=frozen_text,
        image_features=image,
        frozen_image_features=frozen_image,
        zero_shot_logits=zero_shot,
        weights={"ce": 1.0, "text": TEXT_LOSS_WEIGHT, "image": IMAGE_LOSS_WEIGHT, "kl": 1.0},
    )
    _close(ours, reference_losses(logits, labels, text, frozen_text, frozen_image, image, zero_shot))


def test_training_loss_matches_the_reference_forward_on_the_tiny_model():
    """The whole loss of one batch: frozen template ensemble, zero-shot logits and the four terms."""
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(name="kd-tiny-teacher"))
    classnames = ["red_circle", "blue star", "green ring"]
    cfg = PromptSRCConfig(text_depth=2, vision_depth=2, templates="promptsrc")
    model = PromptedClip(clip, cfg, name="t")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        model.learner.ctx.add_(0.05 * torch.randn_like(model.learner.ctx))
        model.learner.prepare_training(model, classnames)
        image, text = model.encode_images(images), model.class_features(classnames)
        logits = model.logit_scale * image @ text.T
        out = TeacherOutputs(images, labels, image, text, logits, model.logit_scale)
        ours = model.learner.training_loss(model, out)

        # CustomCLIP.forward / VLPromptLearner.__init__: Dassl class names (underscores as spaces), the
        # mean of raw features over the 60 templates, normalised; frozen image features normalised.
        names = [n.replace("_", " ") for n in classnames]
        per_template = [
            clip.model.encode_text(clip.tokenizer([t.replace("{}", n) for n in names])).unsqueeze(1)
            for t in PROMPTSRC_TEMPLATES
        ]
        fixed = _unit(torch.cat(per_template, dim=1).mean(dim=1))
        zero_shot_features = _unit(clip.model.encode_image(images))
        zero_shot_logits = clip.model.logit_scale.exp() * zero_shot_features @ fixed.T
    ref = reference_losses(logits, labels, text, fixed, zero_shot_features, image, zero_shot_logits)
    _close(ours, ref)


def _reference_gauss_weights(epochs: int, mu: float, sigma: float) -> np.ndarray:
    gauss = lambda x: (1 / (sigma * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mu) / sigma) ** 2)  # noqa: E731
    weights = np.array([gauss(a) for a in range(1, epochs + 1)])
    return weights / sum(weights)


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (20, 6, 10), (50, 30, 30), (5, 15, 1)])
def test_gpa_weights_and_aggregate_match(epochs, mean, std):
    """Base-to-novel (15/1), cross-dataset (6/10), few-shot (30/30) and a peak past the last epoch."""
    ref_weights = _reference_gauss_weights(epochs, mean, std)
    assert np.abs(np.array(gaussian_epoch_weights(epochs, mean, std)) - ref_weights).max() <= TOL

    g = torch.Generator().manual_seed(epochs)
    states = [
        {"ctx": torch.randn(4, 8, generator=g), "deep.0": torch.randn(4, 8, generator=g)}
        for _ in range(epochs)
    ]
    gpa = GaussianPromptAggregation(epochs, mean, std)
    previous_model_gpa = None
    for epoch, state in enumerate(states, start=1):
        gpa.epoch_end(epoch, state)
        # state_dict_weighting then state_dict_add, once per finished epoch.
        weighted = {k: v * float(ref_weights[epoch - 1]) for k, v in state.items()}
        if previous_model_gpa is None:
            previous_model_gpa = weighted
        else:
            previous_model_gpa = {k: previous_model_gpa[k] + weighted[k] for k in weighted}
    result = gpa.result()
    assert result is not None and previous_model_gpa is not None
    for key, value in previous_model_gpa.items():
        assert (result[key] - value).abs().max().item() <= TOL
