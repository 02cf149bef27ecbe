"""The objectives a recipe names, weighted and summed: the distillation loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, PlainValidator, SerializeAsAny
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from torch import Tensor, nn

from kdprompt.config.base import RegisteredBy, config_model
from kdprompt.errors import KdpromptError
from kdprompt.objectives.base import OBJECTIVES, DistillBatch, ObjectiveConfig
from kdprompt.registry import Registry

_ENTRY = RegisteredBy(lambda: OBJECTIVES, tag=None)

RENAMED: dict[str, str] = {"icl": "icl_image", "crd": "crd_image"}
"""Old ``kdprompt distill`` objective names -> their names since CLIP-KD's own ``icl``/``crd`` arrived."""


def validate_named_configs(
    value: Any, registry: Registry[Any], entry: RegisteredBy, renamed: Mapping[str, str], hint: str = ""
) -> dict[str, BaseModel]:
    """A mapping of registered names -> settings (``null`` leaves one out) -> name -> its validated config.

    Each entry is validated by its registered class's own ``Config``; errors keep their dotted path
    (``objectives.kl.temperature``). A name in ``renamed`` is refused with its new name (and ``hint``).
    """
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "objectives_mapping",
            "expected a mapping of objective names to their settings, e.g. {example}; registered: {names}",
            {
                "example": f"{{{registry.in_order()[0]}: {{weight: 1}}}}",
                "names": ", ".join(registry.in_order()),
            },
        )
    out: dict[str, BaseModel] = {}
    errors: list[InitErrorDetails] = []
    for name, settings in value.items():
        if name in renamed and name not in registry:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "objective_renamed",
                        # Formatted here: pydantic's templates take {key} only, not {key!r}.
                        f"objective {name!r} is now called {renamed[name]!r}{hint}; rename it in the recipe",
                    ),
                    loc=(name,),
                    input=settings,
                )
            )
            continue
        if name not in registry:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "registry_tag_invalid",
                        "unknown objective {name!r}; allowed: {allowed}",
                        {"name": name, "tag": None, "allowed": ", ".join(registry.names())},
                    ),
                    loc=(name,),
                    input=settings,
                )
            )
            continue
        if settings is None:  # `objectives.fd=null` leaves fd out
            continue
        try:
            out[name] = entry.validate(settings, name)
        except ValidationError as exc:
            errors.extend(
                InitErrorDetails(
                    type=e["type"], loc=(name, *e["loc"]), input=e["input"], ctx=e.get("ctx", {})
                )
                for e in exc.errors()
            )
    if errors:
        raise ValidationError.from_exception_data("objectives", errors)
    return out


def validate_objectives(value: Any) -> dict[str, ObjectiveConfig]:
    """``objectives:`` of a distill recipe as given -> name -> its validated config (see
    :func:`validate_named_configs`); ``icl``/``crd`` are refused with their new names."""
    hint = (
        " (the image-to-image adaptation; CLIP-KD's own caption-mode "
        f"{', '.join(RENAMED)} are objectives of `kdprompt clipkd` recipes)"
    )
    return validate_named_configs(value, OBJECTIVES, _ENTRY, RENAMED, hint)  # type: ignore[return-value]


ObjectivesConfig = Annotated[
    dict[str, SerializeAsAny[ObjectiveConfig]], PlainValidator(validate_objectives), _ENTRY
]
"""The ``objectives:`` recipe section: registered objective name -> its ``Config``."""


class DistillObjectives(nn.Module):
    """The objectives a recipe names, with their weights; forward gives weighted terms and their sum.

    The objective modules live in an ``nn.ModuleDict`` so that learnable state (ICL's temperature)
    trains with the student and is saved and restored with it.
    """

    def __init__(self, cfg: Mapping[str, ObjectiveConfig]) -> None:
        super().__init__()
        if not cfg:
            raise KdpromptError(
                f"name at least one objective under `objectives:` ({', '.join(OBJECTIVES.in_order())})"
            )
        for name, sub in cfg.items():
            if not isinstance(sub, config_model(OBJECTIVES.get(name))):
                raise KdpromptError(
                    f"objectives.{name}: expected {config_model(OBJECTIVES.get(name)).__name__}"
                )
        self.terms = nn.ModuleDict({name: OBJECTIVES.get(name)(sub) for name, sub in cfg.items()})
        self.weights = {name: float(sub.weight) for name, sub in cfg.items()}

    @property
    def names(self) -> list[str]:
        """Enabled objective names, in config order."""
        return list(self.terms.keys())

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        """Each enabled objective's weighted value, plus their sum under ``"loss"``."""
        # Logits at λ ≈ 100 lose most of their precision in bf16/fp16, so the objectives run in
        # float32 with autocast off whatever the training loop's mixed precision.
        device_type = batch.student.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            batch = batch.float32()
            out = {name: self.weights[name] * term(batch) for name, term in self.terms.items()}
        out["loss"] = sum(out.values())
        return out
