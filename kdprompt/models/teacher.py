"""The prompt-learned teacher: a frozen open_clip CLIP plus a prompt learner, and its on-disk artefact.

Artefact ``runs/<name>/teacher/``: ``prompts.safetensors`` (only the learned tensors) and
``teacher.json`` (base model spec, method and hyper-parameters, class names, data, fingerprint, and the
text of its class prompts: ``prompt_template`` and ``classname_form``).
The fingerprint is the sha256 of the prompts file plus the base model's identity, so anything built
from a teacher (a text-feature cache, a student) can tell whether it still matches. The fingerprint
does not cover the prompt text: a teacher.json without ``classname_form`` (saved before kdprompt
recorded it) keeps class names verbatim, as it was trained and cached, and every cache records the
exact prompts it encoded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdprompt.data.classnames import CLASSNAME_FORM, ClassnameForm, prompt_classname
from kdprompt.errors import KdpromptError
from kdprompt.io import atomic_write, file_sha256, write_json_atomic
from kdprompt.models.loading import LoadedClip, create_clip
from kdprompt.models.prompt_methods import PROMPT_METHODS, MethodConfig
from kdprompt.models.spec import ModelSpec
from kdprompt.models.towers import AppendPrompts, PromptedTextTower, PromptedVisionTower, ReplacePrompts
from kdprompt.version import __version__

TEACHER_FORMAT_VERSION = 1
PROMPTS_FILE = "prompts.safetensors"
TEACHER_FILE = "teacher.json"


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """The base model's spec, with the sha256 of a local weights file (a tag names its weights)."""
    identity: dict[str, Any] = spec.model_dump(mode="json")
    if spec.pretrained and Path(spec.pretrained).expanduser().is_file():
        identity["pretrained_sha256"] = file_sha256(Path(spec.pretrained).expanduser())
    return identity


def teacher_fingerprint(prompts_file: Path, identity: dict[str, Any]) -> str:
    """sha256 over the prompts file and the base model identity."""
    h = hashlib.sha256(file_sha256(prompts_file).encode())
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()


class PromptedClip(nn.Module):
    """A frozen CLIP whose towers take the prompts of a learner (PromptSRC or MaPLe).

    Implements the evaluation classifier interface: ``encode_images``, ``class_features``,
    ``transform`` and ``name``.
    """

    def __init__(
        self,
        clip: LoadedClip,
        method_cfg: Any,
        name: str = "teacher",
        classname_form: ClassnameForm = CLASSNAME_FORM,
    ) -> None:
        super().__init__()
        self.name = name
        self.classname_form = classname_form
        self.spec = clip.spec
        self.method_cfg = method_cfg
        self.clip_model = clip.model
        self.clip_model.requires_grad_(False)
        self.clip_model.eval()
        self.tokenizer = clip.tokenizer
        self.transform = clip.preprocess_val
        self.train_transform = clip.preprocess_train
        self.text_tower = PromptedTextTower(clip.model, clip.spec.name)
        self.vision_tower = PromptedVisionTower(clip.model, clip.spec.name)
        self.learner = PROMPT_METHODS.get(method_cfg.name)(
            method_cfg, clip, self.text_tower, self.vision_tower
        )
        self._tokens: dict[tuple[str, ...], Tensor] = {}

    def train(self, mode: bool = True) -> PromptedClip:
        """Train the learner; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip_model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.clip_model.logit_scale.device

    @property
    def logit_scale(self) -> Tensor:
        """The frozen CLIP's (exponentiated) logit scale."""
        return self.clip_model.logit_scale.exp()

    @property
    def prompt_template(self) -> str:
        """The text of every class prompt, ``{}`` marking the class name: "{context} {}."."""
        # PromptSRC / MaPLe / PromptKD trainers: prompt_prefix + " " + name + "."
        return f"{self.learner.prefix} {{}}."

    def class_prompts(self, classnames: list[str]) -> list[str]:
        """The exact text the text tower reads for each class (context placeholders included)."""
        return [f"{self.learner.prefix} {prompt_classname(c, self.classname_form)}." for c in classnames]

    def class_tokens(self, classnames: list[str]) -> Tensor:
        """Token ids of :meth:`class_prompts` (cached per class list)."""
        key = tuple(classnames)
        if key not in self._tokens:
            self._tokens[key] = self.tokenizer(self.class_prompts(classnames))
        return self._tokens[key].to(self.device)

    def text_features(self, tokens: Tensor) -> Tensor:
        """Prompted, L2-normalised text features of class tokens."""
        hook = ReplacePrompts(self.learner.text_prompts())
        return F.normalize(self.text_tower(tokens, hook), dim=-1)

    def class_features(self, classnames: list[str]) -> Tensor:
        """Prompted, L2-normalised text features (C x D) of class names."""
        return self.text_features(self.class_tokens(classnames))

    def encode_images(self, images: Tensor) -> Tensor:
        """Prompted, L2-normalised image features (B x D)."""
        hook = AppendPrompts(self.learner.vision_prompts())
        return F.normalize(self.vision_tower(images, hook), dim=-1)

    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """The frozen CLIP's L2-normalised image features (no prompts)."""
        return F.normalize(self.clip_model.encode_image(images), dim=-1)

    def forward(self, images: Tensor, class_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Prompted image and class features in one call (what DDP wraps)."""
        return self.encode_images(images), self.text_features(class_tokens)


class Teacher(PromptedClip):
    """A trained teacher loaded from its artefact directory."""

    fingerprint: str
    classnames: list[str]
    all_classnames: list[str]
    data_config: Any
    path: Path


def save_teacher(
    out_dir: Path,
    model: PromptedClip,
    *,
    classnames: list[str],
    all_classnames: list[str],
    extra: dict[str, Any],
) -> str:
    """Write ``prompts.safetensors`` then ``teacher.json`` (atomically); returns the fingerprint."""
    out_dir = Path(out_dir)
    prompts = out_dir / PROMPTS_FILE
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.learner.state_dict().items()}
    atomic_write(prompts, lambda p: save_file(state, str(p), metadata={"kdprompt": __version__}))
    identity = model_identity(model.spec)
    fingerprint = teacher_fingerprint(prompts, identity)
    write_json_atomic(
        out_dir / TEACHER_FILE,
        {
            "format_version": TEACHER_FORMAT_VERSION,
            "kdprompt_version": __version__,
            "fingerprint": fingerprint,
            "model": identity,
            "method": model.method_cfg.model_dump(mode="json"),
            "prefix": model.learner.prefix,
            "prompt_template": model.prompt_template,
            "classname_form": model.classname_form,
            "classnames": classnames,
            "all_classnames": all_classnames,
            **extra,
        },
    )
    return fingerprint


TEACHER_FIELDS = ("fingerprint", "model", "method", "classnames", "all_classnames")


def read_teacher_json(file: Path) -> dict[str, Any]:
    """Read a ``teacher.json`` as a JSON object.

    Raises:
        KdpromptError: unreadable, not JSON, or not an object (names the file and the fix).
    """
    try:
        meta = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise KdpromptError(
            f"{file} is not readable JSON ({err}); restore it or retrain the teacher with `kdprompt teacher RECIPE`"
        ) from None
    if not isinstance(meta, dict):
        raise KdpromptError(
            f"{file} is not a JSON object; restore it or retrain the teacher with `kdprompt teacher RECIPE`"
        )
    return meta


def load_teacher(path: Path, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a teacher from ``runs/<name>/teacher/`` (checks its fingerprint and base weights)."""
    from kdprompt.data.sources import DataConfig

    path = Path(path)
    meta_file, prompts = path / TEACHER_FILE, path / PROMPTS_FILE
    for needed in (meta_file, prompts):
        if not needed.is_file():
            raise KdpromptError(
                f"{path} is not a teacher directory: {needed.name} is missing; train one with `kdprompt teacher RECIPE`"
            )
    meta = read_teacher_json(meta_file)
    missing = [k for k in TEACHER_FIELDS if k not in meta]
    if missing or not isinstance(meta["model"], dict) or not isinstance(meta["model"].get("name"), str):
        raise KdpromptError(
            f"{meta_file} lacks or has malformed field(s) {', '.join(missing) or 'model'}; "
            "restore it or retrain the teacher with `kdprompt teacher RECIPE`"
        )
    identity = meta["model"]
    spec = ModelSpec(**{k: identity[k] for k in ("name", "pretrained", "precision") if k in identity})
    found = model_identity(spec)
    if found.get("pretrained_sha256") != identity.get("pretrained_sha256"):
        raise KdpromptError(
            f"teacher {path} was trained on base weights {spec.pretrained} with sha256 "
            f"{identity.get('pretrained_sha256')}, but that file now has sha256 {found.get('pretrained_sha256')}; "
            "restore the original weights or retrain the teacher"
        )
    fingerprint = teacher_fingerprint(prompts, identity)
    if fingerprint != meta["fingerprint"]:
        raise KdpromptError(
            f"teacher {path}: {PROMPTS_FILE} does not match teacher.json (fingerprint {fingerprint} != "
            f"{meta['fingerprint']}); the artefact was modified — retrain or restore it"
        )
    form = meta.get("classname_form", "verbatim")
    if form not in get_args(ClassnameForm):
        raise KdpromptError(
            f"teacher {path}: teacher.json has classname_form {form!r}; this kdprompt knows "
            f"{', '.join(get_args(ClassnameForm))}"
        )
    try:
        method_cfg = TypeAdapter(MethodConfig).validate_python(meta["method"])
        data_cfg = TypeAdapter(DataConfig).validate_python(meta["data"]) if meta.get("data") else None
    except ValidationError as exc:
        raise KdpromptError(f"teacher {path}: teacher.json is not valid for this kdprompt: {exc}") from None
    teacher = Teacher(
        create_clip(spec, device=device),
        method_cfg,
        name=f"teacher {path.parent.name}",
        # Teachers saved before the form was recorded learned their prompts on the names as given.
        classname_form=form,
    )
    missing, unexpected = teacher.learner.load_state_dict(load_file(str(prompts)), strict=False)
    if missing or unexpected:
        raise KdpromptError(
            f"teacher {path}: prompts file keys differ (missing {missing}, unexpected {unexpected})"
        )
    teacher.to(device)
    teacher.eval()
    teacher.fingerprint = fingerprint
    teacher.classnames = list(meta["classnames"])
    teacher.all_classnames = list(meta["all_classnames"])
    teacher.data_config = data_cfg
    teacher.path = path
    return teacher
