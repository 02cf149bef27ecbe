"""PromptKD parity: kdprompt's projector, student features and KL objective against the reference code.

The reference is zhengli97/PromptKD ``trainers/promptkd.py``: ``Feature_Trans_Module_two_layer`` (1x1
Conv2d - BatchNorm2d - ReLU - 1x1 Conv2d on features unsqueezed to B x C x 1 x 1), CustomCLIP.forward
(image tower, projector, L2 normalisation) and PromptKD.forward_backward (``F.kl_div`` of the student's
log-softmax against the teacher's softmax at temperature T, ``reduction='sum'`` times T² over
``stu_logits.numel()``, times KD_WEIGHT; ``scripts/promptkd/base2new_train.sh`` sets T 1, KD_WEIGHT 1000).
They are written here from that code, not with kdprompt's helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprompt.models import ModelSpec, create_clip
from kdprompt.models.student import MLPProjector, Student, StudentConfig
from kdprompt.objectives import DistillBatch, DistillObjectives
from kdprompt.objectives.kl import KLObjectiveConfig

KD_WEIGHT = 1000.0
TOL = 1e-6


class FeatureTransModuleTwoLayer(nn.Module):
    """PromptKD's projector (``VPT_image_trans``), layer for layer."""

    def __init__(self, input_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_dim, out_dim, 1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def forward(self, input_feat: Tensor) -> Tensor:
        return self.conv1(input_feat.unsqueeze(-1).unsqueeze(-1)).squeeze(-1).squeeze(-1)


def reference_projector_from(ours: MLPProjector) -> FeatureTransModuleTwoLayer:
    """The reference module holding kdprompt's weights: a 1x1 convolution is a linear map."""
    first, norm, _, last = ours
    in_dim, out_dim = first.in_features, first.out_features
    ref = FeatureTransModuleTwoLayer(in_dim, out_dim).to(first.weight.dtype)
    conv_a, bn, _, conv_b = ref.conv1
    with torch.no_grad():
        conv_a.weight.copy_(first.weight.view(out_dim, in_dim, 1, 1))
        conv_a.bias.copy_(first.bias)
        conv_b.weight.copy_(last.weight.view(out_dim, out_dim, 1, 1))
        conv_b.bias.copy_(last.bias)
    bn.load_state_dict(norm.state_dict())
    return ref


def reference_kd_loss(stu_logits: Tensor, tea_logits: Tensor, temperature: float) -> Tensor:
    """PromptKD.forward_backward's loss."""
    l_ukd = (
        F.kl_div(
            F.log_softmax(stu_logits / temperature, dim=1),
            F.softmax(tea_logits / temperature, dim=1),
            reduction="sum",
        )
        * (temperature * temperature)
        / stu_logits.numel()
    )
    return KD_WEIGHT * l_ukd


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def test_projector_matches_in_train_and_eval_mode():
    """PromptKD's widths (ViT-B/16 512 -> ViT-L/14 768): outputs, BatchNorm statistics and gradients.

    In float64, so that sums over 768 channels compare the formulas rather than float32 rounding.
    """
    torch.manual_seed(0)
    ours = MLPProjector(512, 768).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        ours[1].weight.uniform_(0.5, 1.5)
        ours[1].bias.uniform_(-0.5, 0.5)
    ref = reference_projector_from(ours)
    g = torch.Generator().manual_seed(1)
    ours.train(), ref.train()
    for _ in range(3):  # running statistics move the same way batch after batch
        x = torch.randn(8, 512, generator=g, dtype=torch.float64)
        x_ref = x.clone().requires_grad_(True)
        x = x.requires_grad_(True)
        ours.zero_grad(), ref.zero_grad()
        out, out_ref = ours(x), ref(x_ref)
        assert _max_diff(out, out_ref) <= TOL
        (out**2).sum().backward()
        (out_ref**2).sum().backward()
        assert _max_diff(x.grad, x_ref.grad) <= TOL
        assert _max_diff(ours[0].weight.grad, ref.conv1[0].weight.grad.view(768, 512)) <= TOL
    assert _max_diff(ours[1].running_mean, ref.conv1[1].running_mean) <= TOL
    assert _max_diff(ours[1].running_var, ref.conv1[1].running_var) <= TOL
    ours.eval(), ref.eval()
    x = torch.randn(5, 512, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    spec = ModelSpec(name="kd-tiny-student")
    return Student(create_clip(spec), StudentConfig(model=spec, adaptation="projector"), out_dim=128)


def test_student_features_match_custom_clip_forward(student):
    """CustomCLIP.forward: frozen image tower, projector, L2 normalisation."""
    ref = reference_projector_from(student.projector)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    student.train(), ref.train()
    with torch.no_grad():
        features = ref(student.visual(images))
        assert _max_diff(student(images), features / features.norm(dim=-1, keepdim=True)) <= TOL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_objective_matches_promptkd_loss(student, temperature):
    """kdprompt's ``kl`` (reduction mean, weight 1000) on the student's features and cached text features."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, 32, 32, generator=g)
    text = F.normalize(torch.randn(10, 128, generator=g), dim=-1)
    teacher = F.normalize(torch.randn(8, 128, generator=g), dim=-1)
    scale = torch.tensor(100.0)
    student.eval()
    with torch.no_grad():
        image_ft = student(images)
    objectives = DistillObjectives(
        {"kl": KLObjectiveConfig(weight=KD_WEIGHT, temperature=temperature, reduction="mean")}
    )
    ours = objectives(DistillBatch(student=image_ft, teacher=teacher, text=text, logit_scale=scale))["loss"]
    # PromptKD: stu_logits = logit_scale * image_ft @ tea_text_features.t(); tea_logits from the teacher.
    ref = reference_kd_loss(scale * image_ft @ text.t(), scale * teacher @ text.t(), temperature)
    assert ref.item() > 1.0  # a loss worth comparing
    assert (ours - ref).abs().item() <= TOL * ref.abs().item()
