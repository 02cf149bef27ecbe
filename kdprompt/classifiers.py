"""The classifiers ``kdprompt eval`` compares: zero-shot CLIPs, teachers, students and bundles.

:func:`load_classifiers` checks every model argument, resolves the labelled data (given, or the data
the first teacher records) and returns the classifiers as a lazy sequence: each model is created when
its turn comes, so only one is in memory at once. :func:`evaluate_classifiers` scores them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdprompt.errors import KdpromptError

if TYPE_CHECKING:
    from kdprompt.data.source import DataSource
    from kdprompt.data.types import Split
    from kdprompt.evaluate import ImageTextClassifier

Info = dict[str, Any]


def parse_zero_shot(text: str) -> tuple[str, str | None]:
    """Split ``MODEL[@PRETRAINED]`` into the model name and its weights (``None`` when absent)."""
    name, _, pretrained = text.partition("@")
    if not name.strip():
        raise KdpromptError(
            f"--zero-shot {text!r}: give a model name, e.g. kd-tiny-teacher or "
            "ViT-B-32@cache/pretrained/vit-b-32.safetensors"
        )
    return name.strip(), (pretrained.strip() or None)


def zero_shot_name(name: str, pretrained: str | None) -> str:
    """Report name: the model plus the weights' file name (or tag), so runs of one arch differ."""
    if not pretrained:
        return f"zero-shot {name}"
    return f"zero-shot {name}@{Path(pretrained).name}"


@dataclass
class Classifiers:
    """The models of one evaluation, in order: zero-shot CLIPs, teachers, students, bundles.

    Iterating creates them one at a time and yields ``(classifier, info)``, where ``info`` records
    what the model is (``kind``, its path or spec) for the metrics.
    """

    zero_shot: list[tuple[str, str | None]]
    teachers: list[Path]
    students: list[Path]
    bundles: list[Path]
    templates: str = "simple"
    device: str = "cpu"
    data_config: Any = None
    """The labelled data the models are evaluated on (the ``coop`` templates take its dataset)."""
    preloaded_teacher: Any = field(default=None, repr=False)
    """The first teacher, when it was loaded early for its data config (handed out once)."""

    def __iter__(self) -> Iterator[tuple[ImageTextClassifier, Info]]:
        yield from self._zero_shot()
        for i, path in enumerate(self.teachers):
            yield self._teacher(i, path), {"kind": "teacher", "path": str(path)}
        for path in self.students:
            yield self._student(path), {"kind": "student", "path": str(path)}
        for path in self.bundles:
            from kdprompt.deploy import load_bundle

            yield load_bundle(path, device=self.device), {"kind": "bundle", "path": str(path)}

    def _zero_shot(self) -> Iterator[tuple[ImageTextClassifier, Info]]:
        from kdprompt.evaluate import ZeroShotClassifier
        from kdprompt.models.loading import create_clip
        from kdprompt.models.spec import ModelSpec

        for name, pretrained in self.zero_shot:
            clip = create_clip(ModelSpec(name=name, pretrained=pretrained), device=self.device)
            clf = ZeroShotClassifier(
                clip, templates=self.templates, name=zero_shot_name(name, pretrained), data=self.data_config
            )
            spec = clip.spec.model_dump(mode="json")
            yield clf, {"kind": "zero-shot", "spec": spec, "templates": self.templates}

    def _teacher(self, i: int, path: Path) -> ImageTextClassifier:
        if i == 0 and self.preloaded_teacher is not None:
            teacher, self.preloaded_teacher = self.preloaded_teacher, None
            return teacher
        from kdprompt.models.teacher import load_teacher

        return load_teacher(path, device=self.device)

    def _student(self, path: Path) -> ImageTextClassifier:
        from kdprompt.models.student import StudentClassifier, load_student

        student, cache = load_student(path, device=self.device)
        return StudentClassifier(student, cache, name=f"student {path.resolve().parent.name}")


def load_classifiers(
    *,
    zero_shot: Sequence[str] = (),
    teachers: Sequence[Path] = (),
    students: Sequence[Path] = (),
    bundles: Sequence[Path] = (),
    templates: str = "simple",
    data_src: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> tuple[Classifiers, DataSource]:
    """The classifiers to evaluate (created lazily) and the labelled data config to evaluate them on.

    Args:
        zero_shot: ``MODEL[@PRETRAINED]`` specs of plain CLIPs classifying by prompted class names.
        teachers: teacher directories (``runs/<name>/teacher``).
        students: distilled students (``runs/<name>/student``), with their cached text features.
        bundles: bundles from ``kdprompt export``.
        templates: zero-shot prompts: ``simple``, ``ensemble``, ``promptsrc`` or ``coop`` (the data's
            CoOp template; see :func:`~kdprompt.models.templates.template_set`).
        data_src: a directory, a data YAML file or a source name; default: the data the first
            teacher records, else the data of the first bundle's teacher.
        overrides: ``key=value`` overrides of the data config.
        device: where the models run (a resolved torch device).

    Raises:
        KdpromptError: no model given, a bad spec, no data config to be found, or templates that do not
            fit the data.
    """
    if not zero_shot and not teachers and not students and not bundles:
        raise KdpromptError(
            "no model to evaluate: give --zero-shot MODEL[@PRETRAINED], --teacher DIR, --student DIR "
            "and/or --bundle DIR (each repeatable)"
        )
    # Every model argument is parsed before any slow loading, so a typo fails at once.
    classifiers = Classifiers(
        zero_shot=[parse_zero_shot(z) for z in zero_shot],
        teachers=[Path(p) for p in teachers],
        students=[Path(p) for p in students],
        bundles=[Path(p) for p in bundles],
        templates=templates,
        device=device,
    )
    if data_src is not None:
        from kdprompt.data.from_src import data_config_from_src

        data_config = data_config_from_src(data_src, overrides)
    else:
        data_config = _recorded_data_config(classifiers, overrides)
    if classifiers.zero_shot:
        from kdprompt.models.templates import template_set

        template_set(templates, data_config)  # a set that does not fit the data fails before any model loads
    classifiers.data_config = data_config
    return classifiers, data_config


def _recorded_data_config(classifiers: Classifiers, overrides: Sequence[str]) -> DataSource:
    """The data the first teacher records (loading it early), else that of the first bundle's teacher."""
    from kdprompt.data.from_src import data_config_from_record, src_kinds

    if classifiers.teachers:
        from kdprompt.models.teacher import load_teacher

        teacher = load_teacher(classifiers.teachers[0], device=classifiers.device)
        classifiers.preloaded_teacher = teacher
        config = teacher.data_config
        recorded = None if config is None else config.model_dump(mode="json")
        origin = f"teacher {classifiers.teachers[0]}"
    elif classifiers.bundles:
        from kdprompt.deploy.bundle import read_manifest

        recorded = read_manifest(classifiers.bundles[0])["teacher"].get("data")
        origin = f"the teacher of bundle {classifiers.bundles[0]}"
    else:
        recorded, origin = None, ""
    if recorded is None:
        where = f" ({origin} does not record its data)" if origin else ""
        raise KdpromptError(f"give --data SRC{where}: {src_kinds()} with key=value overrides")
    return data_config_from_record(recorded, overrides, origin)


def evaluate_classifiers(
    classifiers: Classifiers,
    data: Split,
    *,
    split: str,
    data_config: DataSource,
    batch_size: int = 256,
    on_model: Callable[[str], None] | None = None,
) -> list[Info]:
    """Base / novel / all accuracy and HM of each classifier on ``data``, one model at a time.

    ``data`` is split ``split`` of ``data_config`` (both recorded in every result); ``on_model`` is
    told each model's name before it is evaluated.
    """
    import torch

    from kdprompt.evaluate import evaluate_base_novel

    data_info = {"data_source": data_config.source, "data": data_config.model_dump(mode="json")}
    results: list[Info] = []
    for clf, about in classifiers:
        if on_model is not None:
            on_model(clf.name)
        result = evaluate_base_novel(clf, data, device=classifiers.device, batch_size=batch_size)
        results.append({**result, "split": split, **about, **data_info})
        del clf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def write_evaluation(out: Path, results: list[Info]) -> str:
    """Write ``out/metrics.json`` and ``out/metrics.md``; returns the Markdown table."""
    from kdprompt.evaluate import evaluation_table
    from kdprompt.io import write_json_atomic, write_text_atomic

    table = evaluation_table(results)
    write_json_atomic(Path(out) / "metrics.json", results)
    write_text_atomic(Path(out) / "metrics.md", table + "\n")
    return table
