"""``kdprompt teacher-outputs``: run the teacher once over V seeded views of every unlabelled image.

Each rank takes every ``world``-th shard (under ``accelerate launch`` the ranks' parts are disjoint) and
writes one part per shard atomically; a part already written for the same spec is kept, so a killed run
resumes where it stopped. The main process then writes the manifest, with each part's sha256, once every
part exists.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdprompt.errors import KdpromptError
from kdprompt.faults import crash_point
from kdprompt.io import atomic_write, file_sha256
from kdprompt.teacher_outputs.manifest import (
    mismatch_error,
    part_file,
    part_metadata,
    read_manifest,
    read_part_metadata,
    recipe_spec,
    shard_name,
    spec_digest,
    write_manifest,
)
from kdprompt.version import __version__

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def view_seed(seed: int, shard: str, key: str, view: int) -> random.Random:
    """The generator of view ``view`` of sample ``key`` in ``shard`` (independent of rank and order)."""
    return random.Random(f"teacher-outputs:{seed}:{shard}:{key}:{view}")


def _reusable(file: Path, digest: str, recorded_sha: str | None) -> bool:
    """A part already written for this spec (and, when the manifest records it, still intact)."""
    from safetensors import safe_open

    if not file.is_file():
        return False
    try:
        with safe_open(str(file), framework="pt") as handle:
            if read_part_metadata(handle.metadata()).get("spec_digest") != digest:
                return False
    except Exception:  # an unreadable header: rewrite the part
        return False
    return recorded_sha is None or file_sha256(file) == recorded_sha


@dataclass(frozen=True)
class Placement:
    """Where a precompute process runs: its device and autocast, and its rank among ``world``.

    Attributes:
        device: where the teacher runs.
        autocast: the mixed-precision context of the teacher's forwards.
        mixed_precision: its name (recorded in the manifest).
        rank: this process (it writes the parts of shards ``rank::world``).
        world: processes.
        barrier: waits for every process (a no-op for one).
    """

    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    mixed_precision: str
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)

    @classmethod
    def of(cls, accelerator: Any) -> Placement:
        """The placement of an ``accelerate`` Accelerator's process."""
        return cls(
            device=accelerator.device,
            autocast=accelerator.autocast,
            mixed_precision=accelerator.mixed_precision,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
        )


class _Encoder:
    """Views of decoded images -> the teacher's features, exactly as the online distill step computes them."""

    def __init__(self, teacher: Any, view: Any, to_teacher: Any, place: Placement, batch_size: int) -> None:
        self.teacher, self.view, self.to_teacher = teacher, view, to_teacher
        self.place, self.batch_size = place, batch_size

    @torch.no_grad()
    def encode(self, images: list[Tensor]) -> Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack(images[i : i + self.batch_size]).to(self.place.device)
            with self.place.autocast():
                out.append(self.teacher.encode_images(self.to_teacher(batch)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def _shard_part(
    url: str, encoder: _Encoder, cfg: Any, digest: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of one shard's part."""
    from kdprompt.data.shard_format import DECODE_ERRORS
    from kdprompt.data.shard_reader import decode_sample, shard_samples

    shard = shard_name(url)
    keys: list[str] = []
    skipped: list[str] = []
    params: list[list[list[int]]] = []
    sizes: list[list[int]] = []
    views: list[Tensor] = []
    # shard_samples marks the sample a cut shard ends in, so it is skipped here as training skips it.
    for sample in shard_samples([url]):
        key = sample["__key__"]
        try:
            img, _, _ = decode_sample(sample)
        except DECODE_ERRORS:
            skipped.append(key)  # the training stream skips it too
            continue
        drawn = [encoder.view.sample(*img.size, view_seed(cfg.seed, shard, key, v)) for v in range(cfg.views)]
        keys.append(key)
        sizes.append(list(img.size))
        params.append([p.as_row() for p in drawn])
        views.extend(encoder.view.apply(img, p) for p in drawn)
    features = encoder.encode(views)
    dim = features.shape[-1] if len(keys) else 0
    tensors = {
        "features": features.reshape(len(keys), cfg.views, dim).to(DTYPES[cfg.dtype]).contiguous(),
        "params": torch.tensor(params, dtype=torch.int32).reshape(len(keys), cfg.views, 5),
        "image_size": torch.tensor(sizes, dtype=torch.int32).reshape(len(keys), 2),
    }
    return tensors, part_metadata(keys, skipped, shard, digest)


def precompute_teacher_outputs(recipe: Any) -> Path:
    """Write the teacher outputs of a distill ``recipe`` to ``recipe.teacher_outputs.path``; returns it.

    Raises:
        KdpromptError: no ``teacher_outputs`` section, or the path holds outputs of another spec.
    """
    from kdprompt.models.teacher import load_teacher
    from kdprompt.train.distill_loop import freeze_teacher
    from kdprompt.train.runtime import epoch_plan, make_accelerator

    cfg = recipe.teacher_outputs
    if cfg is None:
        raise KdpromptError(
            "the recipe has no teacher_outputs section; add teacher_outputs.path=DIR (and optionally "
            ".views, .dtype, .seed)"
        )
    accelerator = make_accelerator(Path(cfg.path), recipe.train.mixed_precision, tensorboard=False)
    urls, *_ = epoch_plan(recipe, accelerator.num_processes, accelerator)
    teacher = load_teacher(recipe.teacher)
    freeze_teacher(teacher, recipe.train, accelerator.device)
    return write_teacher_outputs(recipe, teacher, urls, Placement.of(accelerator))


def write_teacher_outputs(recipe: Any, teacher: Any, urls: list[str], place: Placement) -> Path:
    """Write the teacher outputs of ``teacher`` over the shards ``urls`` as ``recipe`` specifies them.

    The body of :func:`precompute_teacher_outputs` once the teacher is built (frozen, on
    ``place.device``) and the shards listed; ``kdprompt bench distill --real-size`` calls it with a
    randomly initialised teacher.

    Args:
        recipe: a distill recipe with a ``teacher_outputs`` section (path, views, seed, dtype, batch size).
        teacher: the prompted teacher, with a ``fingerprint``.
        urls: the local shards (listed in a ``sizes.json``).
        place: this process's device, autocast and rank.

    Returns:
        ``recipe.teacher_outputs.path``, complete.

    Raises:
        KdpromptError: the path holds outputs of another spec.
    """
    from safetensors.torch import save_file

    from kdprompt.data.augment import ReplayableView, train_transform, view_converter
    from kdprompt.models.loading import create_clip

    cfg = recipe.teacher_outputs
    root = Path(cfg.path)
    rank, world, main = place.rank, place.world, place.rank == 0
    student_pre = create_clip(recipe.student.model, load_weights=False).model.visual.preprocess_cfg
    teacher_pre = teacher.clip_model.visual.preprocess_cfg
    spec = recipe_spec(recipe, teacher.fingerprint, urls, student_pre)
    digest = spec_digest(spec)
    existing = read_manifest(root)  # every rank checks, so every rank refuses alike
    if existing is not None:
        error = mismatch_error(root, existing["spec"], spec)
        if error is not None:
            raise error
    recorded = {k: v["sha256"] for k, v in (existing or {}).get("parts", {}).items()}
    info = {
        "kdprompt_version": __version__,
        "teacher": str(recipe.teacher),
        "student_model": recipe.student.model.name,
        "teacher_image_tower_parameters": sum(p.numel() for p in teacher.clip_model.visual.parameters()),
        "mixed_precision": place.mixed_precision,
        "shard_urls": urls,
    }
    place.barrier()
    if main and (existing is None or existing["spec_digest"] != digest or not existing["complete"]):
        write_manifest(root, spec, info, None)
    encoder = _Encoder(
        teacher,
        ReplayableView(recipe.augmentation, student_pre),
        view_converter(
            train_transform(recipe.augmentation, student_pre),
            train_transform(recipe.augmentation, teacher_pre),
        ),
        place,
        cfg.batch_size,
    )
    mine = urls[rank::world]
    for url in tqdm(mine, desc=f"teacher outputs (rank {rank})", unit="shard", disable=not main):
        file = part_file(root, shard_name(url))
        if _reusable(file, digest, recorded.get(shard_name(url))):
            continue
        tensors, metadata = _shard_part(url, encoder, cfg, digest)
        atomic_write(file, lambda p, t=tensors, m=metadata: save_file(t, str(p), metadata=m))
        crash_point("teacher_outputs.part_written")
    place.barrier()
    if main:
        _finish(root, spec, info, urls, cfg.views)
    place.barrier()
    return root


def _finish(root: Path, spec: dict[str, Any], info: dict[str, Any], urls: list[str], views: int) -> None:
    """Record every part (sha256, bytes, samples) and the cache's size in the manifest, now complete."""
    from safetensors import safe_open

    parts: dict[str, dict[str, Any]] = {}
    dims: list[int] = []
    for url in urls:
        shard = shard_name(url)
        file = part_file(root, shard)
        if not file.is_file():
            raise KdpromptError(
                f"teacher-output part {file} was not written; run `kdprompt teacher-outputs` again"
            )
        with safe_open(str(file), framework="pt") as handle:
            meta = read_part_metadata(handle.metadata())
            dims.append(handle.get_slice("features").get_shape()[-1])
        parts[shard] = {
            "file": str(file.relative_to(root)),
            "samples": len(meta["keys"]),
            "skipped": len(meta["skipped"]),
            "bytes": file.stat().st_size,
            "sha256": file_sha256(file),
        }
    info = {**info, "embed_dim": max(dims)}
    images = sum(p["samples"] for p in parts.values())
    total = sum(p["bytes"] for p in parts.values())
    stats = {
        "images": images,
        "bytes": total,
        "bytes_per_image_view": round(total / max(1, images * views), 1),
        "feature_bytes_per_view": info["embed_dim"] * (4 if spec["dtype"] == "fp32" else 2),
    }
    write_manifest(root, spec, {**info, "stats": stats}, parts)
