"""``kdprompt export`` of a whole CLIP run (``kdprompt clipkd`` or ``kdprompt pretrain``) as a student bundle.

A CLIP run has both towers but no class list: the class names of ``--classes FILE`` are encoded here with
the run's own text tower (a template set, as ``kdprompt eval --zero-shot`` does), and the bundle ships
the image tower unprompted with an identity projector, those class features, the CLIP's own logit scale
and preprocessing. The bundle format is the one :mod:`kdprompt.deploy.export` writes, so
``load_bundle``, ``kdprompt predict`` and ``kdprompt serve`` take it unchanged. Its text-feature cache is
fingerprinted with the CLIP's own fingerprint (``text_features_from: "student"`` in the manifest): there
is no teacher cache behind it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdprompt.deploy.export import (
    CACHE_DIR,
    CONFIG_FILE,
    _check_replaceable,
    _image_tower_parameters,
    _preprocess_config,
    export_bundle,
    finish_bundle,
    write_encoder_files,
)
from kdprompt.errors import KdpromptError
from kdprompt.io import file_sha256, recover_swap

RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "model.safetensors"
CLIP_TEMPLATE_SETS = ("simple", "ensemble", "promptsrc")
"""Template sets that need no dataset (``coop`` is per dataset, and a CLIP run has none)."""
DEFAULT_TEMPLATES = "simple"
# Recipe kind -> (the recipe field holding the exported CLIP's spec, its teacher's spec or None).
CLIP_RECIPES: dict[str, tuple[str, str | None]] = {
    "clipkd": ("student", "teacher"),
    "pretrain": ("model", None),
}


@dataclass(frozen=True)
class ClipRun:
    """A finished CLIP run: ``runs/<name>/<kind>`` with ``recipe.yaml`` and ``model.safetensors``.

    Attributes:
        path: the run directory.
        kind: ``clipkd`` or ``pretrain``.
        recipe: the recorded recipe (raw mapping).
    """

    path: Path
    kind: str
    recipe: dict[str, Any]

    @property
    def weights(self) -> Path:
        """The CLIP's open_clip weights file."""
        return self.path / WEIGHTS_FILE

    def spec(self, field: str | None = None) -> Any:
        """The :class:`~kdprompt.models.spec.ModelSpec` of the exported CLIP (or of recipe ``field``)."""
        from kdprompt.config.loading import validate_recipe
        from kdprompt.models.spec import ModelSpec

        field = field or CLIP_RECIPES[self.kind][0]
        return validate_recipe(
            ModelSpec, self.recipe.get(field), origin=f"{self.path / RECIPE_FILE}: {field}"
        )

    def teacher_spec(self) -> Any:
        """The spec of the teacher CLIP it was distilled from, or None (a pre-training run has none)."""
        field = CLIP_RECIPES[self.kind][1]
        return None if field is None else self.spec(field)


def _recorded_kind(path: Path) -> str | None:
    """The ``recipe`` kind ``path/recipe.yaml`` records when it is a CLIP run's, else None."""
    from kdprompt.config.loading import read_recipe_yaml

    if not (path / RECIPE_FILE).is_file():
        return None
    try:
        kind = read_recipe_yaml(path / RECIPE_FILE).get("recipe")
    except KdpromptError:  # not this module's to judge: a student run's own loader reports its files
        return None
    return kind if kind in CLIP_RECIPES else None


def find_clip_run(path: Path) -> ClipRun | None:
    """``runs/<name>``, ``runs/<name>/clipkd`` or ``runs/<name>/pretrain`` -> its CLIP run; None if not one.

    Raises:
        KdpromptError: ``runs/<name>`` holds several runs (name the one to export), or the run has not
            finished (no ``model.safetensors`` yet).
    """
    from kdprompt.config.loading import read_recipe_yaml
    from kdprompt.models.student import STUDENT_FILE

    path = Path(path)
    found = [d for d in (path, *(path / kind for kind in CLIP_RECIPES)) if _recorded_kind(d)]
    if not found:
        return None
    if len(found) > 1 or (path / "student" / STUDENT_FILE).is_file():
        runs = [str(d) for d in found] + (
            [str(path / "student")] if (path / "student" / STUDENT_FILE).is_file() else []
        )
        raise KdpromptError(f"{path} holds several runs ({', '.join(runs)}); name the one to export")
    run_dir = found[0]
    recipe = read_recipe_yaml(run_dir / RECIPE_FILE)
    run = ClipRun(run_dir, str(recipe["recipe"]), recipe)
    if not run.weights.is_file():
        raise KdpromptError(
            f"{run.kind} run {run_dir} has no {WEIGHTS_FILE}: it has not finished; resume it with "
            f"`kdprompt {run.kind} {run_dir / RECIPE_FILE}`"
        )
    return run


def clip_fingerprint(model_name: str, weights: Path) -> str:
    """The fingerprint of a CLIP: its architecture and the sha256 of its weights file."""
    identity = {"model": model_name, "weights_sha256": file_sha256(weights)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_run_clip(run: ClipRun) -> Any:
    """The run's CLIP (float32, eval, CPU) as :func:`~kdprompt.models.loading.create_clip` returns it.

    The architecture is built from the recorded spec (an open_clip tag may switch on QuickGELU) and the
    run's final weights are loaded into it strictly.

    Raises:
        KdpromptError: the weights do not fit the recorded architecture.
    """
    from safetensors.torch import load_file

    from kdprompt.models.loading import create_clip

    recorded = run.spec()
    # A recorded tag shapes the architecture (QuickGELU, preprocessing); otherwise naming the run's own
    # weights keeps open_clip from announcing a random initialisation that is overwritten right below.
    spec = recorded.model_copy(
        update={"precision": "fp32", "pretrained": recorded.pretrained or str(run.weights)}
    )
    clip = create_clip(spec, load_weights=False)
    try:
        clip.model.load_state_dict(load_file(str(run.weights)), strict=True)
    except Exception as e:  # a safetensors read error or a state dict of another model
        raise KdpromptError(
            f"{run.weights} does not load into {spec.name} (the model {run.path / RECIPE_FILE} records): {e}"
        ) from e
    clip.model.float().eval()
    return clip


def export_run(
    run_path: Path,
    out: Path,
    *,
    classes: Path | None = None,
    templates: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``kdprompt export``: a CLIP run with :func:`export_clip_bundle`, a distilled student with ``export_bundle``.

    Args:
        run_path: a distilled student run, or a CLIP run (``runs/<name>/clipkd``, ``runs/<name>/pretrain``).
        out: the bundle directory to create.
        classes, templates: a CLIP run's class names file and template set (given for a student run, the
            error says to pass ``--cache`` instead).
        options: ``onnx``, ``overwrite``, ``opset``, ``cache_dir``, ``index``, as ``export_bundle`` takes them.

    Returns:
        The bundle's manifest.
    """
    if classes is not None or templates is not None or find_clip_run(run_path) is not None:
        return export_clip_bundle(run_path, out, classes=classes, templates=templates, **options)
    return export_bundle(run_path, out, **options)


def export_clip_bundle(
    run_path: Path,
    out: Path,
    *,
    classes: Path | None,
    templates: str | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    opset: int = 18,
    cache_dir: Path | None = None,
    index: str = "auto",
) -> dict[str, Any]:
    """Export a CLIP run as a bundle classifying the classes of ``classes`` with its own text tower.

    Args:
        run_path: ``runs/<name>``, ``runs/<name>/clipkd`` or ``runs/<name>/pretrain``.
        out: the bundle directory to create.
        classes: the class names file (see :func:`~kdprompt.data.classnames.read_classnames_file`).
        templates: the template set: ``simple`` (default), ``ensemble`` or ``promptsrc``.
        onnx: also write ``image_encoder.onnx``.
        overwrite: replace ``out`` when it is a bundle (nothing else is ever replaced).
        opset: ONNX opset version.
        cache_dir: refused: a teacher's cache does not fit a CLIP run (it is here to say so).
        index: the cache's FAISS index, ``auto``, ``flat``, ``hnsw`` or ``ivf`` (see ``build_cache``).

    Returns:
        The bundle's manifest.

    Raises:
        KdpromptError: not a CLIP run, no ``classes``, a ``cache_dir``, an unknown template set, a bad
            class file, or ``out`` is a bundle and no ``overwrite`` / holds something else.
    """

    from kdprompt.data.classnames import read_classnames_file
    from kdprompt.deploy.encoder import ImageEncoder, open_clip_config
    from kdprompt.evaluate import ZeroShotClassifier
    from kdprompt.io import atomic_path
    from kdprompt.models.templates import template_set
    from kdprompt.text_features import build_cache
    from kdprompt.text_features.manifest import index_entry

    run = find_clip_run(run_path)
    if run is None:
        raise KdpromptError(
            f"--classes/--templates encode class names with a CLIP run's own text tower, and {run_path} is "
            "not one (runs/<name>/clipkd or runs/<name>/pretrain); a distilled student ships its "
            "teacher's features: pass --cache DIR instead"
        )
    if cache_dir is not None:
        raise KdpromptError(
            f"--cache ships a teacher's text-feature cache, and {run.path} is a {run.kind} run with no "
            "teacher cache: pass --classes FILE to encode the classes with its own text tower"
        )
    if classes is None:
        raise KdpromptError(
            f"{run.path} is a {run.kind} run (a whole CLIP) and has no class list: pass --classes FILE "
            "(one class name per line) to encode with its own text tower"
        )
    templates = templates or DEFAULT_TEMPLATES
    if templates not in CLIP_TEMPLATE_SETS:
        raise KdpromptError(
            f"unknown template set {templates!r} for a CLIP run; choose one of {', '.join(CLIP_TEMPLATE_SETS)}"
        )
    tset = template_set(templates)
    classnames = read_classnames_file(classes)
    out = Path(out)
    # A previous export killed between its two renames left the old bundle aside: put it back first.
    recover_swap(out)
    _check_replaceable(out, overwrite)

    clip = load_run_clip(run)
    model = clip.model
    spec = run.spec()
    fingerprint = clip_fingerprint(clip.name, run.weights)
    # The very features `kdprompt eval --zero-shot MODEL@model.safetensors --templates T` classifies with.
    features = ZeroShotClassifier(clip, templates=tset).class_features(classnames).cpu()
    logit_scale = float(model.logit_scale.detach().exp())
    encoder = ImageEncoder(model.visual, torch.nn.Sequential()).eval()  # identity projector, no prompts
    config = open_clip_config(spec.name, encoder.visual)
    preprocess = _preprocess_config(model.visual.preprocess_cfg)
    size = preprocess["size"]
    teacher = run.teacher_spec()

    with atomic_path(out, exclusive=True) as tmp:
        write_encoder_files(tmp, encoder, config, preprocess)
        cache = build_cache(
            features,
            classnames,
            tmp / CACHE_DIR,
            teacher_fingerprint=fingerprint,
            logit_scale=logit_scale,
            provenance={
                "text_features_from": "student",
                "run": str(run.path),
                "model": spec.name,
                "classes_file": str(classes),
                "templates": {"name": templates, "templates": list(tset.templates), "average": tset.average},
            },
            # One exact prompt per class when there is one template (an ensemble is in the provenance).
            prompts=tset.prompts(classnames) if len(tset.templates) == 1 else None,
            index=index,
        )
        fields = {
            "text_features_from": "student",
            "model": {
                "name": spec.name,
                "adaptation": run.kind,
                "open_clip_config": CONFIG_FILE,
                "prompts": None,
                "projector": [],
                "embed_dim": cache.embed_dim,
                "input_size": [3, size[0], size[1]],
            },
            "parameters": {
                **encoder.parameter_counts(),
                "teacher_image_tower": _image_tower_parameters(teacher.name) if teacher else None,
            },
            "preprocess": preprocess,
            "logit_scale": logit_scale,
            "classes": {
                "num_classes": cache.num_classes,
                "classnames_sha256": cache.manifest["classnames_sha256"],
            },
            "templates": templates,
            # The CLIP it was distilled from (clipkd); no teacher directory, no teacher cache.
            "teacher": {
                "fingerprint": None,
                "path": None,
                "model": teacher.name if teacher else None,
                "pretrained": teacher.pretrained if teacher else None,
                "data": None,
            },
            "cache": {
                "dir": CACHE_DIR,
                # the CLIP's own fingerprint: its text tower wrote the features
                "teacher_fingerprint": cache.teacher_fingerprint,
                "features_sha256": cache.manifest["features_sha256"],
                "index": index_entry(cache.manifest),
            },
            "source": {
                "run": str(run.path),
                "recipe": run.kind,
                "weights_sha256": file_sha256(run.weights),
                "fingerprint": fingerprint,
            },
        }
        return finish_bundle(
            tmp,
            run.path.resolve().parent.name,
            encoder,
            fields,
            features_sha256=cache.manifest["features_sha256"],
            onnx=onnx,
            opset=opset,
        )
