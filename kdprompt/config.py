"""Recipes: pydantic models (``extra="forbid"``), YAML files, built-in names and ``key.sub=value`` overrides.

A recipe is resolved in three steps: find the YAML (a built-in name such as ``demo/pretrain-teacher``
or a path), apply command-line overrides to the raw mapping, then validate against the command's
recipe model. Any error is one :class:`~kdprompt.errors.KdpromptError` naming the dotted field, the bad
value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from kdprompt.data.config import DataConfig, StrictModel
from kdprompt.errors import KdpromptError
from kdprompt.models.spec import ModelSpec

RECIPES_ENV = "KDPROMPT_RECIPES_DIR"


# --------------------------------------------------------------------------------------------- models


class LoopConfig(StrictModel):
    """Loop settings every training command shares."""

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    stop_after_steps: int | None = Field(
        default=None,
        ge=1,
        description="end this invocation after N more steps (checkpointed), e.g. to fit a job slot; rerun to continue",
    )
    num_workers: int = Field(default=0, ge=0, description="data-loading worker processes per rank")
    log_every: int = Field(default=10, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on a GPU that supports it, no on CPU"
    )


class TrainConfig(LoopConfig):
    """Optimisation of contrastive pre-training (AdamW, warm-up then cosine)."""

    batch_size: int = Field(default=128, ge=1, description="per-process batch size")
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = Field(default=False, description="sample shards with replacement (infinite stream)")


class CheckpointConfig(StrictModel):
    """When to write checkpoints and how many to keep."""

    every_steps: int | None = Field(default=None, ge=1, description="also checkpoint every N steps")
    keep_last: int = Field(default=2, ge=1)


class ZeroShotEval(StrictModel):
    """A labelled split on which to report zero-shot top-1 accuracy."""

    name: str
    data: DataConfig
    split: Literal["train", "val", "test"] = "test"
    templates: Literal["simple", "ensemble"] = Field(
        default="simple", description='simple: "a photo of a {}."; ensemble: open_clip\'s ImageNet templates'
    )
    classes: Literal["all", "base", "novel"] = "all"


class PretrainRecipe(StrictModel):
    """``kdprompt pretrain``: contrastive CLIP training on image-text data."""

    recipe: Literal["pretrain"] = "pretrain"
    name: str = Field(description="run name: outputs go to <output_dir>/<name>/pretrain/")
    description: str = ""
    seed: int = 0
    output_dir: Path = Path("runs")
    model: ModelSpec
    data: DataConfig = Field(description="image-text data; non-shard sources are written to shards once")
    split: Literal["train", "val", "test"] = "train"
    shards_dir: Path = Field(
        default=Path("cache/shards"), description="where non-shard sources are materialised as shards"
    )
    shard_maxcount: int = Field(default=1000, ge=1, description="samples per shard when materialising shards")
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Literal["auto", "never"] | Path = Field(
        default="auto", description="auto: continue from the latest complete checkpoint of this run"
    )
    eval: list[ZeroShotEval] = Field(default_factory=list, description="zero-shot evaluations at the end")
    export: Path | None = Field(
        default=None,
        description="also copy the final open_clip weights here (e.g. cache/pretrained/x.safetensors)",
    )


class GPAConfig(StrictModel):
    """PromptSRC's Gaussian prompt aggregation: per-epoch weights from a Gaussian over epoch numbers."""

    enabled: bool = True
    mean: float = Field(default=15.0, description="epoch (1-based) at the Gaussian's peak")
    std: float = Field(default=1.0, gt=0)


class PromptSRCMethod(StrictModel):
    """PromptSRC: independent deep vision and text prompts with self-regulating losses."""

    name: Literal["promptsrc"] = "promptsrc"
    n_ctx_text: int = Field(default=4, ge=1)
    n_ctx_vision: int = Field(default=4, ge=1)
    text_depth: int = Field(default=9, ge=1, description="blocks receiving text prompts (1 = input only)")
    vision_depth: int = Field(default=9, ge=1, description="blocks receiving vision prompts (1 = input only)")
    ctx_init: str | None = Field(default="a photo of a", description="phrase initialising the text context")
    ce_weight: float = Field(default=1.0, ge=0)
    text_loss_weight: float = Field(
        default=25.0, ge=0, description="L1 to frozen template-ensemble text features"
    )
    image_loss_weight: float = Field(default=10.0, ge=0, description="L1 to frozen image features")
    kl_weight: float = Field(default=1.0, ge=0, description="KL(zero-shot || prompted) logits")
    templates: Literal["simple", "ensemble"] = Field(
        default="ensemble", description="templates of the frozen text features the text L1 pulls towards"
    )
    gpa: GPAConfig = GPAConfig()


class MaPLeMethod(StrictModel):
    """MaPLe: deep text prompts coupled to vision prompts by per-depth linear maps."""

    name: Literal["maple"] = "maple"
    n_ctx: int = Field(default=2, ge=1)
    depth: int = Field(
        default=9, ge=1, description="blocks receiving prompts in both towers (1 = input only)"
    )
    ctx_init: str | None = Field(default="a photo", description="phrase initialising the text context")


MethodConfig = Annotated[PromptSRCMethod | MaPLeMethod, Field(discriminator="name")]


class FewShotConfig(StrictModel):
    """The CoOp protocol: K labelled images per class of the chosen classes."""

    shots: int | None = Field(default=16, ge=1, description="images per class (None: all)")
    classes: Literal["base", "all"] = Field(
        default="base", description="train on the base half or all classes"
    )


class TeacherTrainConfig(LoopConfig):
    """Optimisation of the prompts (PromptSRC's base-to-novel defaults)."""

    batch_size: int = Field(default=4, ge=1, description="per-process batch size")
    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=0.0025, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=1, ge=0, description="epochs at the constant warm-up lr")
    warmup_lr: float = Field(default=1e-5, gt=0)


class TeacherRecipe(StrictModel):
    """``kdprompt teacher``: prompt learning on few-shot labelled data, then the text-feature cache."""

    recipe: Literal["teacher"] = "teacher"
    name: str = Field(description="run name: outputs go to <output_dir>/<name>/teacher/")
    description: str = ""
    seed: int = Field(default=1, description="drives few-shot sampling, data order and initialisation")
    output_dir: Path = Path("runs")
    model: ModelSpec
    data: DataConfig
    fewshot: FewShotConfig = FewShotConfig()
    method: MethodConfig = Field(default_factory=PromptSRCMethod)
    train: TeacherTrainConfig = TeacherTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Literal["auto", "never"] | Path = "auto"
    selection: Literal["last", "val"] = Field(
        default="last",
        description="last: the final (GPA-aggregated) prompts; val: the epoch best on the val split (never test)",
    )
    cache_dir: Path | None = Field(
        default=None, description="where the text-feature cache goes (default cache/<name>)"
    )
    evaluate: bool = Field(default=True, description="report base/novel/HM on the test split at the end")


class KLObjectiveConfig(StrictModel):
    """``kl``: τ² · KL(softmax(zT/τ) ‖ softmax(zS/τ)) over the cached classes (PromptKD)."""

    weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = Field(
        default="batchmean", description="batchmean: sum / B; mean: sum / (B·C), PromptKD's own (weight 1000)"
    )


class FDObjectiveConfig(StrictModel):
    """``fd``: mean squared error between student and teacher features (CLIP-KD FD, weight 2000)."""

    weight: float = Field(default=2000.0, ge=0)


class ICLObjectiveConfig(StrictModel):
    """``icl``: student features as anchors contrasted with the batch's teacher features (CLIP-KD ICL)."""

    weight: float = Field(default=1.0, ge=0)
    init_temperature: float = Field(default=0.07, gt=0, description="learnable, kept in log space")
    min_temperature: float = Field(
        default=0.01, gt=0, description="clamp: 1/temperature never exceeds 1/this"
    )


class CRDObjectiveConfig(StrictModel):
    """``crd``: KL between teacher and student in-batch relation distributions (CLIP-KD CRD)."""

    weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=0.07, gt=0)


class ObjectivesConfig(StrictModel):
    """The distillation objectives a recipe names, each with its weight; the total is their weighted sum."""

    kl: KLObjectiveConfig | None = None
    fd: FDObjectiveConfig | None = None
    icl: ICLObjectiveConfig | None = None
    crd: CRDObjectiveConfig | None = None


class StudentConfig(StrictModel):
    """The student: an open_clip image tower, how it adapts, and its projector."""

    model: ModelSpec
    adaptation: Literal["prompts", "full", "projector"] = Field(
        default="prompts",
        description="prompts: frozen tower + deep visual prompts (PromptKD); full: every tower weight trains; "
        "projector: only the projector",
    )
    n_ctx: int = Field(default=4, ge=1, description="visual prompt tokens per depth (adaptation: prompts)")
    depth: int = Field(default=9, ge=1, description="blocks receiving visual prompts (adaptation: prompts)")
    projector: Literal["mlp", "linear"] = Field(
        default="mlp", description="mlp: Linear-BatchNorm-ReLU-Linear (PromptKD); linear"
    )


class DistillTrainConfig(LoopConfig):
    """Optimisation of the student (PromptKD's defaults)."""

    batch_size: int = Field(default=8, ge=1, description="per-process batch size")
    epochs: int = Field(default=20, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.005, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    warmup_lr: float = Field(default=1e-5, gt=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = False


class DistillRecipe(StrictModel):
    """``kdprompt distill``: train a student from unlabelled shards against a teacher and its cache."""

    recipe: Literal["distill"] = "distill"
    name: str = Field(description="run name: outputs go to <output_dir>/<name>/student/")
    description: str = ""
    seed: int = 1
    output_dir: Path = Path("runs")
    teacher: Path = Field(description="the teacher directory (runs/<name>/teacher)")
    cache: Path | None = Field(
        default=None, description="the teacher's text-feature cache (default cache/<teacher run>)"
    )
    student: StudentConfig
    data: DataConfig = Field(
        description="unlabelled images (labels, if any, are ignored); written to shards once"
    )
    split: Literal["train", "val", "test"] = "train"
    shards_dir: Path = Path("cache/shards")
    shard_maxcount: int = Field(default=1000, ge=1)
    objectives: ObjectivesConfig
    train: DistillTrainConfig = DistillTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Literal["auto", "never"] | Path = "auto"
    evaluate: bool = Field(
        default=True, description="report base/novel/HM on the teacher's test split at the end"
    )


class DataSection(StrictModel):
    """Just a ``data:`` section (``kdprompt shards`` validates its SRC with it)."""

    data: DataConfig


RECIPE_MODELS: dict[str, type[StrictModel]] = {
    "pretrain": PretrainRecipe,
    "teacher": TeacherRecipe,
    "distill": DistillRecipe,
}

R = TypeVar("R", bound=BaseModel)


# ------------------------------------------------------------------------------------ finding recipes


def recipes_dir() -> Path:
    """The directory of built-in recipes (``$KDPROMPT_RECIPES_DIR`` or the repository's ``recipes/``)."""
    env = os.environ.get(RECIPES_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names (path below ``recipes/`` without ``.yaml``) mapped to their files."""
    root = recipes_dir()
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    """Resolve a built-in recipe name or a YAML path to a file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise KdpromptError(f"recipe file not found: {path}")
        return path
    known = builtin_recipes()
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(known), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KdpromptError(
        f"no built-in recipe named {name_or_path!r} and no such file.{hint} "
        "List the built-in recipes with `kdprompt recipes`."
    )


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise KdpromptError(f"recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KdpromptError(f"recipe {path} must be a YAML mapping of fields, got {type(data).__name__}")
    return data


def recipe_description(path: Path) -> str:
    """One-line description of a recipe file (its ``description`` field)."""
    try:
        data = read_recipe_yaml(path)
    except KdpromptError:
        return "(invalid YAML)"
    return str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""


# ---------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise KdpromptError(f"Command-line overrides must be in the form of key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _tree_copy(node: Any) -> Any:
    """Copy nested dicts/lists without keeping shared references (YAML anchors become independent)."""
    if isinstance(node, dict):
        return {k: _tree_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_tree_copy(v) for v in node]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set.

    Missing sections are created; an integer part indexes a list (``eval.0.split=val``).
    """
    out = _tree_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = out
        for i, key in enumerate(keys):
            where = ".".join(keys[: i + 1])
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise KdpromptError(
                        f"override {text!r}: {'.'.join(keys[:i])} is a list of {len(node)}; "
                        f"use an index 0..{len(node) - 1}, got {key!r}"
                    )
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise KdpromptError(f"override {text!r}: {where} is inside a value ({node!r}), not a section")
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return out


# --------------------------------------------------------------------------------------- validation


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types behind Optional/Union/Annotated/list annotations."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _unwrap(arg)]
    if origin in (list, tuple):
        return [t for arg in get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


class _Union:
    """Several candidate models at one location; the next location part (the union's tag) picks one."""

    def __init__(self, models: list[type[BaseModel]]) -> None:
        self.models = models

    def pick(self, tag: Any) -> type[BaseModel] | None:
        for m in self.models:
            for field in m.model_fields.values():
                if get_origin(field.annotation) is Literal and tag in get_args(field.annotation):
                    return m
        return None


def _models_of(annotation: Any) -> type[BaseModel] | _Union | None:
    models = [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    if not models:
        return None
    return models[0] if len(models) == 1 else _Union(models)


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """Follow a pydantic error location to (dotted path without union tags, the model owning the end).

    ``("data", "synthetic", "sede")`` becomes ``"data.sede"`` owned by ``SyntheticData``.
    """
    parts: list[str] = []
    current: type[BaseModel] | _Union | None = model
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        if isinstance(current, _Union):
            current = current.pick(part)
            continue
        parts.append(str(part))
        field = current.model_fields.get(part) if current is not None else None
        current = _models_of(field.annotation) if field is not None else None
    owner = current if isinstance(current, type) else None
    return ".".join(parts).replace(".[", "["), owner


def format_validation_error(exc: ValidationError, model: type[BaseModel], origin: str) -> str:
    """One message listing every problem with its dotted field, bad value and allowed keys/values."""
    lines = [f"invalid recipe {origin}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = _walk(model, loc)[0] or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _walk(model, loc[:-1])[1]
            allowed = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {field}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            tag_field = str(ctx.get("discriminator", "source")).strip("'")
            lines.append(
                f"  {field}.{tag_field}: got {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
            )
        else:
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate_recipe(model: type[R], data: dict[str, Any], origin: str = "") -> R:
    """Validate raw recipe data against ``model`` or raise a :class:`KdpromptError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KdpromptError(format_validation_error(exc, model, origin or model.__name__)) from None


def load_recipe(model: type[R], name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> R:
    """Find, parse, override and validate a recipe for one command."""
    path = find_recipe(name_or_path)
    data = apply_overrides(read_recipe_yaml(path), list(overrides))
    kind = data.get("recipe")
    expected = model.model_fields["recipe"].default if "recipe" in model.model_fields else None
    if expected is not None and kind not in (None, expected):
        raise KdpromptError(
            f"recipe {path} is a {kind!r} recipe, but this command needs a {expected!r} recipe; "
            f"run `kdprompt {kind} {name_or_path}` instead"
        )
    return validate_recipe(model, data, origin=str(path))


# Fields that do not change what a run computes: where it writes, how it logs, how it is scheduled.
_NON_SEMANTIC = {
    "name",
    "description",
    "output_dir",
    "resume",
    "eval",
    "export",
    "evaluate",
    "cache_dir",
    "shards_dir",
    "checkpoint",
    "stop_after_steps",
    "log_every",
    "num_workers",
}


def _semantic(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _semantic(v) for k, v in node.items() if k not in _NON_SEMANTIC}
    if isinstance(node, list):
        return [_semantic(v) for v in node]
    return node


def recipe_fingerprint(recipe: BaseModel) -> str:
    """A digest of what determines a run's result (model, data, method, optimisation, seed).

    Synthetic data contributes its world's directory name, which hashes the generator version and
    style, so a changed generator never passes for the same data.
    """
    import hashlib
    import json

    data = _semantic(recipe.model_dump(mode="json"))
    source = getattr(recipe, "data", None)
    if getattr(source, "source", None) == "synthetic":
        from kdprompt.data.synthetic import world_dir

        data["world"] = world_dir(source).name
        data["data"].pop("root", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (what ``--dry-run`` prints and runs record)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
