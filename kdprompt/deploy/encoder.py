"""The shipped image encoder: a student's image tower with its prompts and projector folded in.

One module, rebuilt from an open_clip model config alone (no text tower, no pretrained download):
``normalize(projector(tower(x, prompts)))``. The projector's BatchNorm is folded into the Linear
before it, so the exported graph is Linear/ReLU only and does not depend on batch statistics.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprompt.errors import KdpromptError
from kdprompt.models.towers import AppendPrompts, PromptedVisionTower

# Projector layers as they are written in the bundle config (folded: Linear/ReLU only).
LayerSpec = dict[str, Any]


def fold_projector(projector: nn.Module) -> tuple[nn.Sequential, list[LayerSpec]]:
    """Fold each eval-mode BatchNorm1d into the Linear before it.

    Args:
        projector: a Linear, or a Sequential of Linear / BatchNorm1d / ReLU layers.

    Returns:
        The folded projector (a new Sequential; ``projector`` is untouched) and its layer specs.

    Raises:
        KdpromptError: a layer kind the bundle format does not know, or a BatchNorm without a Linear before it.
    """
    layers = list(projector) if isinstance(projector, nn.Sequential) else [projector]
    folded: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            folded.append(copy.deepcopy(layer).float())
        elif isinstance(layer, nn.BatchNorm1d):
            if not folded or not isinstance(folded[-1], nn.Linear):
                raise KdpromptError("cannot fold a projector BatchNorm1d that does not follow a Linear layer")
            _fold_batchnorm(folded[-1], layer)
        elif isinstance(layer, nn.ReLU):
            folded.append(nn.ReLU())
        else:
            raise KdpromptError(
                f"cannot export a projector layer of type {type(layer).__name__}; the bundle format knows "
                "Linear, BatchNorm1d and ReLU"
            )
    specs: list[LayerSpec] = [
        {"type": "linear", "in": m.in_features, "out": m.out_features}
        if isinstance(m, nn.Linear)
        else {"type": "relu"}
        for m in folded
    ]
    return nn.Sequential(*folded), specs


@torch.no_grad()
def _fold_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> None:
    """Make ``linear`` compute ``bn(linear(x))`` with BatchNorm's running statistics (eval mode)."""
    mean = bn.running_mean.float()
    scale = (bn.running_var.float() + bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight.float()
    shift = -mean * scale + (bn.bias.float() if bn.affine else 0.0)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    new_bias = bias.float() * scale + shift
    linear.weight.mul_(scale[:, None])
    if linear.bias is None:
        linear.bias = nn.Parameter(new_bias)
    else:
        linear.bias.copy_(new_bias)


def build_projector(specs: list[LayerSpec]) -> nn.Sequential:
    """A projector with the layout of ``specs`` (as :func:`fold_projector` writes them), uninitialised weights."""
    layers: list[nn.Module] = []
    for i, spec in enumerate(specs):
        kind = spec.get("type")
        if kind == "linear":
            layers.append(nn.Linear(int(spec["in"]), int(spec["out"])))
        elif kind == "relu":
            layers.append(nn.ReLU())
        else:
            raise KdpromptError(f"projector layer {i} has unknown type {kind!r} (known: linear, relu)")
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """Images -> L2-normalised features in the teacher's text-embedding space.

    Args:
        visual: an open_clip image tower.
        projector: maps the tower's features to the teacher's embedding dim.
        prompts: (depth, n_ctx, width) deep vision prompts, or None for an unprompted tower.
    """

    def __init__(self, visual: nn.Module, projector: nn.Module, prompts: Tensor | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.projector = projector
        if prompts is not None:
            self.prompts = nn.Parameter(prompts.detach().clone(), requires_grad=False)
            # Kept out of the module tree: it shares ``visual``, whose weights must be saved once.
            self._prompted = (PromptedVisionTower(visual),)
        else:
            self.prompts = None
            self._prompted = None

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) unit-norm features."""
        if self._prompted is not None:
            feats = self._prompted[0](images, AppendPrompts(list(self.prompts.unbind(0))))
        else:
            feats = self.visual(images)
        return F.normalize(self.projector(feats), dim=-1)

    @classmethod
    def from_student(cls, student: nn.Module) -> tuple[ImageEncoder, list[LayerSpec]]:
        """The encoder of a trained :class:`kdprompt.models.student.Student` (float32, eval mode).

        Returns:
            The encoder (sharing nothing with ``student``) and its projector's layer specs.
        """
        projector, specs = fold_projector(student.projector.eval())
        prompts = torch.stack([p.detach().float() for p in student.prompts]) if student.prompts else None
        visual = copy.deepcopy(student.visual).float().eval()
        return cls(visual, projector, prompts).eval(), specs

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the image tower, the prompts and the projector, and their total."""
        tower = sum(p.numel() for p in self.visual.parameters())
        prompts = self.prompts.numel() if self.prompts is not None else 0
        projector = sum(p.numel() for p in self.projector.parameters())
        return {
            "image_tower": tower,
            "prompts": prompts,
            "projector": projector,
            "total": tower + prompts + projector,
        }


def open_clip_config(model_name: str, visual: nn.Module) -> dict[str, Any]:
    """The open_clip model config of ``model_name`` as ``visual`` was built (QuickGELU included).

    open_clip switches a config to QuickGELU for some pretrained tags (OpenAI's), so the activation
    is read off the built tower rather than the registered config.
    """
    import open_clip
    from open_clip.model import QuickGELU

    from kdprompt.models.loading import resolve_model_name

    config = open_clip.get_model_config(resolve_model_name(model_name))
    if config is None:
        raise KdpromptError(f"open_clip has no config for model {model_name!r}")
    config = copy.deepcopy(config)
    config["quick_gelu"] = any(isinstance(m, QuickGELU) for m in visual.modules())
    return config


def build_visual(config: dict[str, Any]) -> nn.Module:
    """Build (randomly initialised, float32) the image tower of an open_clip model config; no text tower.

    Raises:
        KdpromptError: the config lacks ``embed_dim`` or ``vision_cfg``, or open_clip rejects it.
    """
    # open_clip's own builder for the image half of a CLIP, the one CLIP.__init__ calls.
    from open_clip.model import _build_vision_tower

    missing = [k for k in ("embed_dim", "vision_cfg") if k not in config]
    if missing:
        raise KdpromptError(f"open_clip config lacks {', '.join(missing)}; re-export the bundle")
    try:
        return _build_vision_tower(
            config["embed_dim"], dict(config["vision_cfg"]), quick_gelu=bool(config.get("quick_gelu", False))
        )
    except Exception as e:  # a config edited by hand or from an incompatible open_clip
        raise KdpromptError(f"open_clip cannot build the image tower from this config: {e}") from e
