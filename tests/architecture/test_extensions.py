"""Each extensible concept is one new piece of code: defined here, in this file only, registered, and trained.

A new data source, prompt method, distillation objective and student adaptation are registered from this
test file; recipes name them like built-ins, their configs are validated by their own models, and a
teacher and a student train a few steps through the public ``run_teacher`` / ``run_distill``.
"""

from __future__ import annotations

import io
import json
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from kdprompt.config.distill import DistillRecipe
from kdprompt.config.loading import load_recipe
from kdprompt.config.teacher import TeacherRecipe
from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError
from kdprompt.models import ModelSpec, create_clip, save_clip_weights
from kdprompt.models.prompt_methods import PROMPT_METHODS, PromptLearner, PromptMethodConfig, phrase_context
from kdprompt.models.student import ADAPTATIONS, Adaptation
from kdprompt.objectives import OBJECTIVES, Objective, ObjectiveConfig
from kdprompt.train.distill_loop import run_distill
from kdprompt.train.teacher_loop import run_teacher

# ------------------------------------------------------------------ a data source: flat colour swatches

COLOURS = {"crimson": (220, 20, 60), "gold": (255, 215, 0), "teal": (0, 128, 128), "navy": (0, 0, 128)}


class SwatchData(DataSource):
    """Solid-colour swatches with a little noise, ``per_class`` images per class and split."""

    source: Literal["swatches"] = "swatches"
    per_class: int = Field(default=4, ge=1)

    def load_split(self, split: str) -> Split:
        generator = torch.Generator().manual_seed(("train", "val", "test").index(split))
        samples = []
        for label, (name, rgb) in enumerate(COLOURS.items()):
            for i in range(self.per_class):
                noise = torch.randint(-20, 20, (32, 32, 3), generator=generator)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                samples.append(Sample(buffer.getvalue(), label, name, key=f"{split}-{name}-{i}"))
        return Split(samples=samples, classnames=list(COLOURS), name=split)


# ------------------------------------------------------ a prompt method: shallow text context, its own loss


class ShallowConfig(PromptMethodConfig):
    name: Literal["shallow"] = "shallow"
    n_ctx: int = Field(default=2, ge=1)
    smoothing: float = Field(default=0.1, ge=0, lt=1)


class ShallowPrompts(PromptLearner):
    """A learned text context at the input only, one vision prompt, and label-smoothed cross-entropy."""

    Config = ShallowConfig

    def __init__(self, cfg, clip, text_tower, vision_tower) -> None:
        super().__init__()
        self.cfg = cfg
        ctx, self.prefix = phrase_context(
            None, cfg.n_ctx, clip.tokenizer, clip.model.token_embedding, "method"
        )
        self.ctx = torch.nn.Parameter(ctx)
        self.vision = torch.nn.Parameter(torch.zeros(1, vision_tower.width))

    def text_prompts(self):
        return [self.ctx]

    def vision_prompts(self):
        return [self.vision]

    def training_loss(self, model, out):
        return {"loss": F.cross_entropy(out.logits, out.labels, label_smoothing=self.cfg.smoothing)}


# ----------------------------------------------------------- an objective: cosine distance to the teacher


class CosineConfig(ObjectiveConfig):
    margin: float = Field(default=0.0, ge=0)


class CosineObjective(Objective):
    """``mean(relu(1 - cos(s, t) - margin))``."""

    Config = CosineConfig

    def forward(self, batch):
        return F.relu(1 - (batch.student * batch.teacher).sum(-1) - self.cfg.margin).mean()


# ------------------------------------------------------- an adaptation: only the tower's last LayerNorm trains


class FinalNormAdaptation(Adaptation):
    def attach(self, student, cfg) -> None:
        student.visual.ln_post.requires_grad_(True)


@pytest.fixture()
def registered():
    entries = [
        (SOURCES, "swatches", SwatchData),
        (PROMPT_METHODS, "shallow", ShallowPrompts),
        (OBJECTIVES, "cosine", CosineObjective),
        (ADAPTATIONS, "final_norm", FinalNormAdaptation),
    ]
    for registry, name, entry in entries:
        registry.register(name)(entry)
    yield
    for registry, name, _ in entries:
        registry.unregister(name)


def test_unknown_names_list_what_is_registered(registered):
    with pytest.raises(KdpromptError) as err:
        load_recipe(TeacherRecipe, "demo/teacher-promptsrc", ["data={source: swatch}"])
    assert "data.source: got 'swatch'; allowed: coop, folder, shards, swatches, synthetic" in str(err.value)
    with pytest.raises(KdpromptError) as err:
        load_recipe(
            DistillRecipe, "demo/distill-student", ["objectives={cosin: {}}", "student.adaptation=final"]
        )
    message = str(err.value)
    assert "objectives.cosin: got 'cosin'; allowed: cosine, crd_image, fd, icl_image, kl" in message
    assert "unknown student adaptation 'final'; available: final_norm, full, projector, prompts" in message
    with pytest.raises(KdpromptError, match=r"method.smoothng: unknown key \(did you mean 'smoothing'\?\)"):
        load_recipe(TeacherRecipe, "demo/teacher-promptsrc", ["method={name: shallow, smoothng: 0.2}"])


def test_new_source_method_objective_and_adaptation_train(registered, tmp_path, tiny_teacher_weights):
    teacher = load_recipe(
        TeacherRecipe,
        "demo/teacher-promptsrc",
        [
            "name=ext",
            f"output_dir={tmp_path / 'runs'}",
            f"model.pretrained={tiny_teacher_weights}",
            "data={source: swatches, per_class: 3}",
            "method={name: shallow, n_ctx: 3, smoothing: 0.2}",
            "fewshot.shots=2",
            "train.batch_size=2",
            "train.max_steps=3",
            "train.log_every=1",
            f"cache_dir={tmp_path / 'cache'}",
            "evaluate=false",
        ],
    )
    assert isinstance(teacher.data, SwatchData) and isinstance(teacher.method, ShallowConfig)
    teacher_dir = run_teacher(teacher)
    meta = json.loads((teacher_dir / "teacher.json").read_text())
    assert meta["method"] == {"name": "shallow", "n_ctx": 3, "smoothing": 0.2}
    assert meta["data"] == {"source": "swatches", "per_class": 3}
    losses = [json.loads(r)["loss"] for r in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)

    torch.manual_seed(1)
    student_weights = tmp_path / "student.safetensors"
    save_clip_weights(create_clip(ModelSpec(name="kd-tiny-student")).model, student_weights)
    recipe = load_recipe(
        DistillRecipe,
        "demo/distill-student",
        [
            "name=ext",
            f"output_dir={tmp_path / 'runs'}",
            f"teacher={teacher_dir}",
            f"cache={tmp_path / 'cache'}",
            f"student.model.pretrained={student_weights}",
            "student.adaptation=final_norm",
            "data={source: swatches, per_class: 4}",
            f"shards_dir={tmp_path / 'shards'}",
            "objectives={cosine: {weight: 2.0, margin: 0.01}, kl: {weight: 1.0}}",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.log_every=1",
            "evaluate=false",
        ],
    )
    student_dir = run_distill(recipe)
    rows = [json.loads(r) for r in (student_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"cosine", "kl", "loss"} <= set(r) for r in rows)
    assert all(abs(r["loss"] - r["cosine"] - r["kl"]) < 1e-4 for r in rows)
    student_meta = json.loads((student_dir / "student.json").read_text())
    assert student_meta["student"]["adaptation"] == "final_norm"
    assert student_meta["objectives"]["cosine"] == {"weight": 2.0, "margin": 0.01}
    # Only the final LayerNorm and the projector trained.
    from safetensors.torch import load_file

    from kdprompt.models.student import load_student

    start = load_file(str(student_weights))
    trained, _ = load_student(student_dir)
    changed = {
        k
        for k, v in trained.visual.state_dict().items()
        if not torch.equal(v, start[f"visual.{k}"].to(v.dtype))
    }
    assert changed == {"ln_post.weight", "ln_post.bias"}
