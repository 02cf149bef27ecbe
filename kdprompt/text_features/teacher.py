"""Caching a prompted teacher's class text features: after training, and for any other class list later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdprompt.data.classnames import read_classnames_file
from kdprompt.folder_lock import folder_lock, remove_stale_temporaries
from kdprompt.io import recover_swap
from kdprompt.models.teacher import PromptedClip, load_teacher
from kdprompt.text_features.store import TextCache, build_cache, check_replaceable


def cache_class_features(
    model: PromptedClip,
    classnames: list[str],
    out_dir: Path,
    *,
    provenance: dict[str, Any],
    teacher_fingerprint: str | None = None,
    overwrite: bool = True,
    index: str = "auto",
) -> TextCache:
    """Encode ``classnames`` with the prompted teacher ``model`` and write them as a cache at ``out_dir``.

    The manifest records the exact prompt of each class (``prompts``).

    Args:
        model: the teacher (in eval mode), on any device.
        classnames: the classes to encode, in row order.
        out_dir: the cache directory to create or replace.
        provenance: facts recorded in the manifest (teacher path, classes file, method, ...).
        teacher_fingerprint: the teacher's fingerprint; default ``model.fingerprint`` (a loaded teacher
            has one, a freshly trained one gets it from ``save_teacher``).
        overwrite: replace a cache already at ``out_dir`` (False: refuse it).
        index: the FAISS index to build (``auto``, ``flat``, ``hnsw``, ``ivf``; see :func:`build_cache`).

    Returns:
        The cache written.
    """
    with torch.no_grad():
        features = model.class_features(classnames).float().cpu()
    return build_cache(
        features,
        classnames,
        out_dir,
        teacher_fingerprint=teacher_fingerprint if teacher_fingerprint is not None else model.fingerprint,
        logit_scale=float(model.logit_scale),
        provenance=provenance,
        # The prompt text is not part of the teacher fingerprint: recording it makes a cache whose
        # prompts differ from what the teacher now writes (e.g. another class-name form) visible.
        prompts=model.class_prompts(classnames),
        overwrite=overwrite,
        index=index,
    )


def write_cache_for_teacher(
    teacher_dir: Path,
    classes_file: Path,
    out: Path | None,
    device: str,
    overwrite: bool = False,
    index: str = "auto",
) -> tuple[Path, int]:
    """Cache the classes listed in ``classes_file`` with the teacher saved in ``teacher_dir``.

    Args:
        teacher_dir: a teacher directory (``runs/<name>/teacher``).
        classes_file: the class names (see :func:`~kdprompt.data.classnames.read_classnames_file`).
        out: the cache directory; default ``cache/<teacher run name>-<classes file stem>``.
        device: where to encode the class names.
        overwrite: replace a cache already at ``out`` (never anything else).
        index: the FAISS index to build (``auto``, ``flat``, ``hnsw``, ``ivf``; see :func:`build_cache`).

    Returns:
        The cache directory and the number of classes cached.
    """
    # The class list and the destination first: both fail before the (slow) teacher is loaded.
    classnames = read_classnames_file(classes_file)
    out = out or Path("cache") / f"{Path(teacher_dir).resolve().parent.name}-{Path(classes_file).stem}"
    # One writer at a time; temporaries of killed writers (up to a whole cache) are removed.
    with folder_lock(out):
        remove_stale_temporaries(out)
        recover_swap(out)
        check_replaceable(out, overwrite)
        model = load_teacher(teacher_dir, device=device)
        cache_class_features(
            model,
            classnames,
            out,
            provenance={"teacher": str(teacher_dir), "classes_file": str(classes_file)},
            overwrite=overwrite,
            index=index,
        )
    return out, len(classnames)
