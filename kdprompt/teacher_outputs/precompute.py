"""``kdprompt teacher-outputs``: run the teacher once over V seeded views of every unlabelled image.

Each rank takes every ``world``-th shard (under ``accelerate launch`` the ranks' parts are disjoint) and
writes one part per shard atomically; a part already written for the same spec is kept, so a killed run
resumes where it stopped. The main process then writes the manifest, with each part's sha256, once every
part exists.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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

    def __init__(self, teacher: Any, to_teacher: Any, place: Placement) -> None:
        self.teacher, self.to_teacher, self.place = teacher, to_teacher, place

    @torch.no_grad()
    def encode(self, views: Tensor) -> Tensor:
        """The teacher's features of a batch of the student's views (on the host, float32)."""
        batch = views.to(self.place.device, non_blocking=True)
        with self.place.autocast():
            return self.teacher.encode_images(self.to_teacher(batch)).float().cpu()


class _Sample(NamedTuple):
    """One sample of a shard, decoded and cut into its V views (or skipped: undecodable).

    A NamedTuple so that the loader's ``pin_memory`` pins its views.
    """

    key: str
    size: tuple[int, int] = (0, 0)
    params: tuple[list[int], ...] = ()
    views: Tensor | None = None  # (V, 3, H, W), the student's views; None when skipped


class _ShardViews(torch.utils.data.IterableDataset):
    """The samples of one shard as :class:`_Sample`, decoded and cut in the loader's workers.

    Worker w of n decodes samples w, w + n, ...; the DataLoader takes one from each worker in turn, so the
    samples come back in shard order whatever the number of workers (a skipped sample is yielded too, to
    keep the turns aligned).
    """

    def __init__(self, url: str, view: Any, views: int, seed: int) -> None:
        self.url, self.view, self.views, self.seed = url, view, views, seed

    def __iter__(self) -> Any:
        from kdprompt.data.shard_format import DECODE_ERRORS
        from kdprompt.data.shard_reader import decode_sample, shard_samples

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = shard_name(self.url)
        # shard_samples marks the sample a cut shard ends in, so it is skipped here as training skips it.
        for i, sample in enumerate(shard_samples([self.url])):
            if i % workers != worker:
                continue
            key = sample["__key__"]
            try:
                img, _, _ = decode_sample(sample)
            except DECODE_ERRORS:
                yield _Sample(key)  # the training stream skips it too
                continue
            drawn = [
                self.view.sample(*img.size, view_seed(self.seed, shard, key, v)) for v in range(self.views)
            ]
            views = torch.stack([self.view.apply(img, p) for p in drawn])
            yield _Sample(key, tuple(img.size), tuple(p.as_row() for p in drawn), views)


def _shard_part(
    url: str, encoder: _Encoder, view: Any, cfg: Any, workers: int, pin: bool, digest: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of one shard's part.

    Images are decoded and cut in ``workers`` loader processes while the teacher encodes; views go to the teacher
    ``cfg.batch_size`` at a time, so memory holds one batch of views, not the shard's.
    """
    keys: list[str] = []
    skipped: list[str] = []
    params: list[list[list[int]]] = []
    sizes: list[list[int]] = []
    features: list[Tensor] = []
    pending: list[Tensor] = []
    waiting = 0
    samples = torch.utils.data.DataLoader(
        _ShardViews(url, view, cfg.views, cfg.seed),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
    )
    for sample in samples:
        if sample.views is None:
            skipped.append(sample.key)
            continue
        keys.append(sample.key)
        sizes.append(list(sample.size))
        params.append(sample.params)
        pending.append(sample.views)
        waiting += len(sample.views)
        if waiting >= cfg.batch_size:
            # Whole batches only; the views left over wait for the next images (no small forwards).
            batch = torch.cat(pending)
            whole = len(batch) - len(batch) % cfg.batch_size
            features += [encoder.encode(chunk) for chunk in batch[:whole].split(cfg.batch_size)]
            pending, waiting = [batch[whole:]], len(batch) - whole
    if waiting:
        features += [encoder.encode(chunk) for chunk in torch.cat(pending).split(cfg.batch_size)]
    dim = features[0].shape[-1] if features else 0
    stacked = torch.cat(features) if features else torch.zeros(0, dim)
    tensors = {
        "features": stacked.reshape(len(keys), cfg.views, dim).to(DTYPES[cfg.dtype]).contiguous(),
        "params": torch.tensor(params, dtype=torch.int32).reshape(len(keys), cfg.views, 5),
        "image_size": torch.tensor(sizes, dtype=torch.int32).reshape(len(keys), 2),
    }
    return tensors, part_metadata(keys, skipped, shard_name(url), digest)


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


PartCallback = Callable[[str, int, float], None]
"""Called after each part this process writes, with its shard name, image-views encoded and seconds taken."""


def write_teacher_outputs(
    recipe: Any, teacher: Any, urls: list[str], place: Placement, on_part: PartCallback | None = None
) -> Path:
    """Write the teacher outputs of ``teacher`` over the shards ``urls`` as ``recipe`` specifies them.

    The body of :func:`precompute_teacher_outputs` once the teacher is built (frozen, on
    ``place.device``) and the shards listed; ``kdprompt bench distill --real-size`` calls it with a
    randomly initialised teacher.

    Args:
        recipe: a distill recipe with a ``teacher_outputs`` section (path, views, seed, dtype, batch size).
        teacher: the prompted teacher, with a ``fingerprint``.
        urls: the local shards (listed in a ``sizes.json``).
        place: this process's device, autocast and rank.
        on_part: called after each part written (shard, image-views, seconds: decode, views cut, teacher,
            part written), e.g. to time the precompute's steady rate apart from its one-off setup.

    Returns:
        ``recipe.teacher_outputs.path``, complete.

    Raises:
        KdpromptError: the path holds outputs of another spec.
    """
    from safetensors.torch import save_file

    from kdprompt.data.augment import ReplayableView, train_transform, view_converter
    from kdprompt.models.loading import create_clip
    from kdprompt.train.runtime import resolve_pin_memory

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
    view = ReplayableView(recipe.augmentation, student_pre)
    to_teacher = view_converter(
        train_transform(recipe.augmentation, student_pre), train_transform(recipe.augmentation, teacher_pre)
    )
    encoder = _Encoder(teacher, to_teacher, place)
    # Decoding and cutting V views runs in the recipe's loader workers, beside the teacher (as in training).
    workers = recipe.train.num_workers
    pin = resolve_pin_memory(recipe.train.pin_memory) and place.device.type == "cuda"
    mine = urls[rank::world]
    bar = tqdm(mine, desc=f"teacher outputs (rank {rank})", unit="shard", disable=not main)
    done_views, done_seconds = 0, 0.0
    for url in bar:
        file = part_file(root, shard_name(url))
        if _reusable(file, digest, recorded.get(shard_name(url))):
            continue
        start = time.perf_counter()
        tensors, metadata = _shard_part(url, encoder, view, cfg, workers, pin, digest)
        atomic_write(file, lambda p, t=tensors, m=metadata: save_file(t, str(p), metadata=m))
        seconds = time.perf_counter() - start
        crash_point("teacher_outputs.part_written")
        views = int(tensors["features"].shape[0]) * cfg.views
        done_views, done_seconds = done_views + views, done_seconds + seconds
        bar.set_postfix_str(f"{done_views / max(done_seconds, 1e-9):.1f} image-views/s")
        if on_part is not None:
            on_part(shard_name(url), views, seconds)
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
