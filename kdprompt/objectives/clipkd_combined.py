"""CLIP-KD's caption-mode loss: the objectives a ``clipkd`` recipe names, weighted and summed, and the
linear projectors from the student's width to the teacher's that ``fd`` and ``icl`` share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import PlainValidator, SerializeAsAny
from torch import Tensor, nn

from kdprompt.config.base import RegisteredBy, config_model
from kdprompt.errors import KdpromptError
from kdprompt.objectives.base import ObjectiveConfig
from kdprompt.objectives.caption import CLIPKD_OBJECTIVES, CaptionBatch
from kdprompt.objectives.combined import validate_named_configs

_ENTRY = RegisteredBy(lambda: CLIPKD_OBJECTIVES, tag=None)


def validate_clipkd_objectives(value: Any) -> dict[str, ObjectiveConfig]:
    """``objectives:`` of a clipkd recipe as given -> name -> its validated config."""
    return validate_named_configs(value, CLIPKD_OBJECTIVES, _ENTRY, {})  # type: ignore[return-value]


ClipKDObjectivesConfig = Annotated[
    dict[str, SerializeAsAny[ObjectiveConfig]], PlainValidator(validate_clipkd_objectives), _ENTRY
]
"""The ``objectives:`` section of a clipkd recipe: registered caption objective name -> its ``Config``."""


def clipkd_defaults() -> dict[str, ObjectiveConfig]:
    """CLIP-KD's published combination: task + 2000 · fd + icl + crd."""
    return validate_clipkd_objectives({"task": {}, "fd": {}, "icl": {}, "crd": {}})


def _at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 -> float32; float64 (the reference tests) is kept."""
    return x if x.dtype == torch.float64 else x.float()


def _projector(student_dim: int, teacher_dim: int) -> nn.Module:
    # CLIP-KD projects only when the widths differ (``KDClipLoss.__init__``).
    return nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()


class ClipKDObjectives(nn.Module):
    """The caption objectives a recipe names, with their weights and the shared projectors.

    The objectives and projectors are one module so that they train with the student, are synced by
    DDP and are saved in checkpoints with it (CLIP-KD's own checkpoints leave the projectors out).

    Args:
        cfg: name -> config (validated by :func:`validate_clipkd_objectives`).
        student_dim: the student's embedding width.
        teacher_dim: the teacher's embedding width.
    """

    def __init__(self, cfg: Mapping[str, ObjectiveConfig], student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if not cfg:
            raise KdpromptError(
                f"name at least one objective under `objectives:` ({', '.join(CLIPKD_OBJECTIVES.in_order())})"
            )
        for name, sub in cfg.items():
            if not isinstance(sub, config_model(CLIPKD_OBJECTIVES.get(name))):
                raise KdpromptError(
                    f"objectives.{name}: expected {config_model(CLIPKD_OBJECTIVES.get(name)).__name__}"
                )
        self.terms = nn.ModuleDict({n: CLIPKD_OBJECTIVES.get(n)(sub) for n, sub in cfg.items()})
        self.weights = {name: float(sub.weight) for name, sub in cfg.items()}
        self.projects = any(type(t).uses_projection for t in self.terms.values())
        self.uses_student_logits = any(type(t).uses_student_logits for t in self.terms.values())
        if self.projects:
            self.proj_image = _projector(student_dim, teacher_dim)
            self.proj_text = _projector(student_dim, teacher_dim)

    @property
    def names(self) -> list[str]:
        """Enabled objective names, in config order."""
        return list(self.terms.keys())

    def batch(
        self,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        teacher_logit_scale: Tensor,
    ) -> CaptionBatch:
        """The :class:`CaptionBatch` of raw (unnormalised) student features and the teacher's features."""
        image, text = _at_least_f32(image), _at_least_f32(text)
        image_proj = text_proj = None
        if self.projects:
            # As CLIP-KD: the projector maps the raw features, the projection is normalised after.
            image_proj = F.normalize(self.proj_image(image), dim=-1)
            text_proj = F.normalize(self.proj_text(text), dim=-1)
        return CaptionBatch(
            image=F.normalize(image, dim=-1),
            text=F.normalize(text, dim=-1),
            image_proj=image_proj,
            text_proj=text_proj,
            teacher_image=teacher_image.detach().to(image),
            teacher_text=teacher_text.detach().to(image),
            logit_scale=logit_scale.to(image),
            teacher_logit_scale=torch.as_tensor(teacher_logit_scale).detach().to(image),
        )

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        teacher_logit_scale: Tensor,
    ) -> dict[str, Tensor]:
        """Each enabled objective's weighted value, plus their sum under ``"loss"``.

        Args:
            image, text: the student's raw features of the global batch (N x Ds each).
            logit_scale: the student's exponentiated logit scale.
            teacher_image, teacher_text: the teacher's normalised features (N x Dt each).
            teacher_logit_scale: the teacher's exponentiated logit scale.
        """
        # Logits at λ ≈ 100 lose most of their precision in bf16/fp16: float32, autocast off.
        with torch.autocast(device_type=image.device.type, enabled=False):
            b = self.batch(image, text, logit_scale, teacher_image, teacher_text, teacher_logit_scale)
            out = {name: self.weights[name] * term(b) for name, term in self.terms.items()}
        out["loss"] = sum(out.values())
        return out
