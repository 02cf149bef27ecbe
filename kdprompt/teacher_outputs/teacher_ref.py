"""The identity of a trained teacher (fingerprint, data, path) read from its artefact, without building it.

Distillation from stored teacher outputs needs what the teacher *is* (to match its caches and select on its
val split), never its towers: this reads ``teacher.json`` and re-hashes ``prompts.safetensors``, as
:func:`kdprompt.models.teacher.load_teacher` does, and stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdprompt.errors import KdpromptError
from kdprompt.models.teacher import PROMPTS_FILE, TEACHER_FILE, read_teacher_json, teacher_fingerprint


@dataclass(frozen=True)
class TeacherRecord:
    """What distillation uses of a teacher it does not run.

    Attributes:
        path: the teacher directory.
        fingerprint: its fingerprint (checked against ``prompts.safetensors``).
        data_config: the data it trained on (None when not recorded).
    """

    path: Path
    fingerprint: str
    data_config: Any


def read_teacher_record(path: Path) -> TeacherRecord:
    """Read and check a teacher's identity from ``path`` (``runs/<name>/teacher``).

    Raises:
        KdpromptError: not a teacher directory, or its prompts no longer match its ``teacher.json``.
    """
    from pydantic import TypeAdapter, ValidationError

    from kdprompt.data.sources import DataConfig

    path = Path(path)
    meta_file, prompts = path / TEACHER_FILE, path / PROMPTS_FILE
    for needed in (meta_file, prompts):
        if not needed.is_file():
            raise KdpromptError(
                f"{path} is not a teacher directory: {needed.name} is missing; train one with `kdprompt teacher RECIPE`"
            )
    meta = read_teacher_json(meta_file)
    if not isinstance(meta.get("model"), dict) or "fingerprint" not in meta:
        raise KdpromptError(
            f"{meta_file} lacks its model or fingerprint; restore it or retrain the teacher with `kdprompt teacher RECIPE`"
        )
    fingerprint = teacher_fingerprint(prompts, meta["model"])
    if fingerprint != meta["fingerprint"]:
        raise KdpromptError(
            f"teacher {path}: {PROMPTS_FILE} does not match teacher.json (fingerprint {fingerprint} != "
            f"{meta['fingerprint']}); the artefact was modified — retrain or restore it"
        )
    try:
        data = TypeAdapter(DataConfig).validate_python(meta["data"]) if meta.get("data") else None
    except ValidationError as exc:
        raise KdpromptError(f"teacher {path}: teacher.json is not valid for this kdprompt: {exc}") from None
    return TeacherRecord(path=path, fingerprint=fingerprint, data_config=data)
