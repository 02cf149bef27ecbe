"""``kdprompt bench distill --real-size``: distillation loops side by side at real sizes, randomly initialised.

The teacher is built from a teacher recipe (by default PromptKD's: PromptSRC on ViT-L-14, 4 + 4 prompts at
depth 9), the students from a distill recipe (by default PromptKD's ViT-B-16 with 4 visual prompts at
depth 9 and the MLP projector 512 -> 768) with its ``prompts`` adaptation and with ``full`` adaptation.
The architectures are shaped as their recipes' weights would shape them (an open_clip tag's QuickGELU
and preprocessing) but their weights are random and nothing is read or downloaded: speed does not depend
on the weights. Batches are random images at the student's input size, preloaded on the host (the
``cached`` loop's are views of photos, see below).

Each loop is a step callable of :data:`MODES`, timed phase by phase (the device is synchronised between
phases): ``data`` (host-to-device copy; for ``cached`` also the views and rows read), ``text`` (class text features), ``teacher`` (teacher image
features), ``student`` (student forward + backward, FLOPs counted with
:class:`~torch.utils.flop_counter.FlopCounterMode`) and ``optimiser``. The operations are those of
:meth:`~kdprompt.train.distill_loop.DistillStage.step`:

- ``promptkd``: the PromptKD reference's loop, which re-encodes the class texts through the teacher's
  prompted text tower at every batch (``DistillStage(recompute_text=True)``);
- ``online``: kdprompt's loop, class text features read from the cache (computed once here) and the
  teacher's image tower run at every step;
- ``cached``: kdprompt on a teacher-output cache (:mod:`kdprompt.teacher_outputs`), the teacher's image
  tower never run. Before timing, photo-sized JPEGs (one per image of the largest batch) are written to a
  shard in a temporary folder and the real precompute (:func:`~kdprompt.teacher_outputs.precompute.write_teacher_outputs`)
  stores V views of each (V: the recipe's ``teacher_outputs.views``, else the section's default, 4), timed as image-views/s.
  Each timed step then does what distill does on stored outputs: its ``data`` phase re-cuts every image's
  stored view of the step's epoch (:class:`~kdprompt.teacher_outputs.replay.ReplayTransform`: row lookup,
  crop, flip, normalise), reads the matching feature rows from the parts
  (:func:`~kdprompt.teacher_outputs.replay.stored_features`) and copies both to the device. In training the
  replay runs in the loader's workers, beside the step; here it is on the clock (shown as ``replay``,
  the rows read as ``rows``).

Besides the table, a whole-recipe cost per student and batch size: E images, ``train.epochs`` epochs
and V views cost ``online = epochs·E / online images/s`` and ``cached = V·E / precompute image-views/s +
epochs·E / cached images/s`` seconds (:func:`recipe_cost`).

The recipe's throughput settings (``train.mixed_precision``, ``allow_tf32``, ``channels_last``,
``compile``) apply to each student and to the teacher's image tower as in training
(:func:`~kdprompt.train.runtime.apply_throughput_settings`, :func:`~kdprompt.train.distill_loop.freeze_teacher`),
and ``num_workers`` / ``pin_memory`` to a decode benchmark: JPEG photos decoded and augmented in loader
workers, whose images/s must stay above what each loop consumes.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdprompt.config.distill import TeacherOutputsConfig
from kdprompt.io import write_json_atomic
from kdprompt.train.runtime import resolve_mixed_precision

PHASES = ("data", "text", "teacher", "student", "optimiser")
STUDENTS = ("prompts", "full")
DEFAULT_TEACHER_RECIPE = "base2novel/oxford_pets/promptsrc-vit-l-14"
PHOTO_SIZE = (500, 375)  # a typical OxfordPets photo, as the rehearsal writes them
DEFAULT_VIEWS = TeacherOutputsConfig.model_fields["views"].default  # V when the recipe has no section


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseClock:
    """Seconds per phase of the steps it times; ``count`` names a phase whose FLOPs are counted once.

    ``details`` holds the seconds of named parts of a phase (``replay`` within ``data``).
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    count: str | None = None
    flops: int | None = None
    details: dict[str, float] = field(default_factory=dict)

    def __call__(self, phase: str, fn: Callable[[], Any], detail: str | None = None) -> Any:
        """Run ``fn`` as ``phase`` (synchronised before and after; also counted as ``detail`` when
        named); returns its result."""
        _sync(self.device)
        start = time.perf_counter()
        if phase == self.count:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                out = fn()
            self.flops, self.count = counter.get_total_flops(), None
        else:
            out = fn()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.seconds[phase] += elapsed
        if detail is not None:
            self.details[detail] = self.details.get(detail, 0.0) + elapsed
        return out


@dataclass
class StoredTeacher:
    """A teacher-output cache and the decoded images it was made from, read as distill reads it.

    Attributes:
        outputs: the opened cache (:class:`~kdprompt.teacher_outputs.reader.TeacherOutputs`).
        replay: the distill transform re-cutting a stored view
            (:class:`~kdprompt.teacher_outputs.replay.ReplayTransform`).
        images: the decoded images of the cache's shard, in order.
        keys: their sample keys.
        url: the shard.
        seed: the run seed (which view an epoch picks).
    """

    outputs: Any
    replay: Any
    images: list[Any]
    keys: list[str]
    url: str
    seed: int

    def views(self, epoch: int, size: int) -> Tensor:
        """The first ``size`` images cut to the views ``epoch`` picks (B, 3, H, W), as distill's loader does."""
        keys = self.keys[:size]
        return torch.stack(
            [
                self.replay(img, key=key, url=self.url, epoch=epoch)
                for img, key in zip(self.images[:size], keys, strict=True)
            ]
        )

    def rows(self, epoch: int, size: int) -> Tensor:
        """The stored teacher features of those views (B, D, storage dtype), as distill's step reads them."""
        from kdprompt.teacher_outputs.replay import stored_features

        return stored_features(self.outputs, self.seed, epoch, [self.url] * size, self.keys[:size])


@dataclass
class StepContext:
    """One student at one batch size, with the teacher and the data every mode shares.

    Attributes:
        teacher: the prompted teacher (frozen, eval).
        model: student + objectives (:class:`~kdprompt.train.distill_loop.DistillModule`).
        optimizer: the recipe's optimiser over the trainable parameters.
        classnames: the classes whose prompts the teacher encodes.
        text: cached class text features (C x D), as the online loop reads them.
        logit_scale: the teacher's logit scale.
        to_teacher: student view -> teacher view (same augmented image, the teacher's normalisation).
        batches: host image batches, cycled.
        device: where the models run.
        autocast: the mixed-precision context of the recipe.
        stored: the teacher-output cache the ``cached`` loop reads (None without that loop).
    """

    teacher: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    classnames: list[str]
    text: Tensor
    logit_scale: Tensor
    to_teacher: Callable[[Tensor], Tensor]
    batches: list[Tensor]
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    stored: StoredTeacher | None = None

    def load(self, i: int) -> Tensor:
        """Batch ``i`` on the device."""
        return self.batches[i % len(self.batches)].to(self.device, non_blocking=True)

    @torch.no_grad()
    def encode_text(self) -> Tensor:
        """Class text features through the teacher's prompted text tower (the PromptKD reference's)."""
        with self.autocast():
            return self.teacher.class_features(self.classnames).float()

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Teacher image features of the student's view."""
        with self.autocast():
            return self.teacher.encode_images(self.to_teacher(images)).float()

    def stored_batch(self, i: int, clock: PhaseClock) -> tuple[Tensor, Tensor]:
        """Step ``i`` on the cache (epoch ``i``: each step picks other views): the replayed views and
        their stored teacher features, on the device, clocked as ``data`` (details ``replay``, ``rows``)."""
        stored = self.stored
        if stored is None:
            raise RuntimeError("the cached loop needs StepContext.stored (bench_real_size builds it)")
        size = self.batches[0].shape[0]
        images = clock("data", lambda: stored.views(i, size), detail="replay")
        features = clock("data", lambda: stored.rows(i, size), detail="rows")
        return clock(
            "data",
            lambda: (
                images.to(self.device, non_blocking=True),
                features.to(self.device, non_blocking=True).float(),
            ),
        )

    def student_backward(self, images: Tensor, teacher_features: Tensor, text: Tensor) -> None:
        """Student forward (objectives included) and backward."""
        with self.autocast():
            terms = self.model(images, teacher_features, text, self.logit_scale)
        terms["loss"].backward()

    def optimizer_step(self) -> None:
        """One optimiser step, gradients cleared."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


StepFn = Callable[[StepContext, int, PhaseClock], None]


def promptkd_step(ctx: StepContext, i: int, clock: PhaseClock) -> None:
    """PromptKD's loop: class texts re-encoded by the prompted text tower at every batch."""
    images = clock("data", lambda: ctx.load(i))
    text = clock("text", ctx.encode_text)
    features = clock("teacher", lambda: ctx.encode_images(images))
    clock("student", lambda: ctx.student_backward(images, features, text))
    clock("optimiser", ctx.optimizer_step)


def online_step(ctx: StepContext, i: int, clock: PhaseClock) -> None:
    """kdprompt online: cached class text features, the teacher's image tower run at every step."""
    images = clock("data", lambda: ctx.load(i))
    features = clock("teacher", lambda: ctx.encode_images(images))
    clock("student", lambda: ctx.student_backward(images, features, ctx.text))
    clock("optimiser", ctx.optimizer_step)


def cached_step(ctx: StepContext, i: int, clock: PhaseClock) -> None:
    """kdprompt cached: stored views replayed and their stored teacher features read, never computed."""
    images, features = ctx.stored_batch(i, clock)
    clock("student", lambda: ctx.student_backward(images, features, ctx.text))
    clock("optimiser", ctx.optimizer_step)


MODES: dict[str, StepFn] = {"promptkd": promptkd_step, "online": online_step, "cached": cached_step}
"""The loops compared, by name; a new loop is one entry."""


def time_mode(step: StepFn, ctx: StepContext, steps: int, warmup: int, count_flops: bool) -> dict[str, Any]:
    """``warmup`` untimed steps (the first counting the student's FLOPs), then ``steps`` timed ones."""
    ctx.model.train()
    clock = PhaseClock(ctx.device, count="student" if count_flops else None)
    for i in range(warmup):
        step(ctx, i, clock)
    flops = clock.flops
    clock = PhaseClock(ctx.device)
    _sync(ctx.device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(ctx, i, clock)
    _sync(ctx.device)
    elapsed = time.perf_counter() - start
    batch = ctx.batches[0].shape[0]
    return {
        "images_per_s": steps * batch / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "phase_ms": {k: 1000 * v / steps for k, v in clock.seconds.items()},
        "detail_ms": {k: 1000 * v / steps for k, v in clock.details.items()},
        "student_flops_per_step": flops,
    }


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` (best of ``repeats``, after one warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _photos(count: int) -> list[bytes]:
    """``count`` photo-sized JPEGs: a colour gradient plus noise (what the rehearsal writes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = PHOTO_SIZE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(count):
        base = np.stack([xs / w * 255, ys / h * 255, np.full_like(xs, 32.0 * (i % 8))], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _JpegDataset(torch.utils.data.Dataset):
    """``images`` samples cycling over a few JPEGs, decoded as the shard reader decodes and augmented."""

    def __init__(self, jpegs: list[bytes], images: int, transform: Callable[[Any], Tensor]) -> None:
        self.jpegs, self.images, self.transform = jpegs, images, transform

    def __len__(self) -> int:
        return self.images

    def __getitem__(self, i: int) -> Tensor:
        from kdprompt.data.shard_reader import decode_sample

        image, _, _ = decode_sample({"jpg": self.jpegs[i % len(self.jpegs)]})
        return self.transform(image)


def decode_images_per_s(
    transform: Callable[[Any], Tensor], *, images: int, batch_size: int, num_workers: int, pin_memory: bool
) -> float:
    """Images/s of JPEG decoding + augmentation through a DataLoader (after its first batch: workers started)."""
    dataset = _JpegDataset(_photos(16), images + batch_size, transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory
    )
    batches: Iterator[Tensor] = iter(loader)
    next(batches)
    start = time.perf_counter()
    seen = sum(b.shape[0] for b in batches)
    return seen / (time.perf_counter() - start)


def precompute_cache(
    recipe: Any,
    teacher: nn.Module,
    folder: Path,
    *,
    images: int,
    views: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[StoredTeacher, dict[str, Any]]:
    """Write ``images`` photo-sized JPEGs to a shard in ``folder`` and their teacher-output cache (``views``
    views each) with the real precompute, timed; returns the opened cache and the precompute's figures.

    Args:
        recipe: the distill recipe (augmentation, student preprocessing, seed, ``teacher_outputs`` if any).
        teacher: the frozen teacher, on ``device``.
        folder: an empty temporary folder.
        images: distinct images (at least the largest batch).
        views: V, views stored per image.
        device: where the teacher runs.
        autocast: the recipe's mixed-precision context.
    """
    import webdataset as wds

    from kdprompt.config.distill import TeacherOutputsConfig
    from kdprompt.data.augment import ReplayableView
    from kdprompt.data.shard_reader import decode_sample
    from kdprompt.models.loading import create_clip
    from kdprompt.teacher_outputs.manifest import recipe_spec
    from kdprompt.teacher_outputs.precompute import Placement, write_teacher_outputs
    from kdprompt.teacher_outputs.reader import open_teacher_outputs
    from kdprompt.teacher_outputs.replay import ReplayTransform

    shard = folder / "bench-000000.tar"
    keys = [f"{i:06d}" for i in range(images)]
    jpegs = _photos(images)
    with wds.TarWriter(str(shard)) as sink:
        for key, jpeg in zip(keys, jpegs, strict=True):
            sink.write({"__key__": key, "jpg": jpeg})
    write_json_atomic(folder / "sizes.json", {shard.name: images})
    section = recipe.teacher_outputs or TeacherOutputsConfig(path=folder)
    section = section.model_copy(update={"path": folder / "teacher-outputs", "views": views})
    cached = recipe.model_copy(update={"teacher_outputs": section})
    place = Placement(
        device=device,
        autocast=autocast,
        mixed_precision=resolve_mixed_precision(recipe.train.mixed_precision),
    )
    url = str(shard)
    # One untimed teacher forward first, as the loops get warm-up steps: at the precompute's batch when
    # compiling (the graph is built for that shape), else one view (the first call's one-off costs).
    size = teacher.clip_model.visual.preprocess_cfg["size"]
    warm = min(section.batch_size, images * views) if recipe.train.compile else 1
    with torch.no_grad(), autocast():
        teacher.encode_images(torch.randn(warm, 3, *size, device=device))
    _sync(device)
    parts: list[float] = []
    start = time.perf_counter()
    root = write_teacher_outputs(cached, teacher, [url], place, on_part=lambda _, __, s: parts.append(s))
    _sync(device)
    seconds = time.perf_counter() - start
    student_pre = create_clip(recipe.student.model, load_weights=False).model.visual.preprocess_cfg
    outputs = open_teacher_outputs(root, recipe_spec(cached, teacher.fingerprint, [url], student_pre))
    replay = ReplayTransform(outputs, ReplayableView(recipe.augmentation, student_pre), recipe.seed)
    decoded = [decode_sample({"jpg": jpeg})[0] for jpeg in jpegs]
    stored = StoredTeacher(
        outputs=outputs, replay=replay, images=decoded, keys=keys, url=url, seed=recipe.seed
    )
    figures = {
        "images": images,
        "views": views,
        "teacher_batch_size": section.batch_size,
        "dtype": section.dtype,
        # The rate is the part's (decode, views cut, teacher, part written): what E images cost; the one-off
        # setup (student preprocessing looked up, spec, manifest) does not grow with E.
        "seconds": seconds,
        "part_seconds": sum(parts),
        "setup_seconds": seconds - sum(parts),
        "image_views_per_s": images * views / sum(parts),
        "bytes": outputs.manifest["stats"]["bytes"],
    }
    return stored, figures


def recipe_cost(rows: list[dict[str, Any]], precompute: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    """Seconds per image of a whole recipe, online and cached, for each student and batch size timed both ways.

    For E images, ``epochs`` epochs and V stored views (``precompute["views"]``):
    ``online = epochs·E / online images/s``; ``cached = V·E / precompute image-views/s + epochs·E / cached
    images/s``. Both are proportional to E, so the figures are per image (multiply by E).
    """
    by_key = {(r["student"], r["batch_size"], r["mode"]): r for r in rows}
    views, precompute_rate = precompute["views"], precompute["image_views_per_s"]
    out = []
    for (student, batch_size, mode), online in by_key.items():
        cached = by_key.get((student, batch_size, "cached"))
        if mode != "online" or cached is None:
            continue
        online_s = epochs / online["images_per_s"]
        precompute_s = views / precompute_rate
        train_s = epochs / cached["images_per_s"]
        out.append(
            {
                "student": student,
                "batch_size": batch_size,
                "epochs": epochs,
                "views": views,
                "online_images_per_s": online["images_per_s"],
                "cached_images_per_s": cached["images_per_s"],
                "precompute_image_views_per_s": precompute_rate,
                "online_s_per_image": online_s,
                "cached_precompute_s_per_image": precompute_s,
                "cached_train_s_per_image": train_s,
                "cached_s_per_image": precompute_s + train_s,
                "recipe_speedup": online_s / (precompute_s + train_s),
                "epoch_speedup": cached["images_per_s"] / online["images_per_s"],
            }
        )
    return out


def _optimizer(cfg: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The distill recipe's optimiser (as :class:`~kdprompt.train.distill_loop.DistillStage` builds it)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _time_loops(
    recipe: Any,
    teacher: nn.Module,
    text: Tensor,
    stored: StoredTeacher | None,
    *,
    batch_sizes: Sequence[int],
    students: Sequence[str],
    modes: Sequence[str],
    steps: int,
    warmup: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[list[dict[str, Any]], dict[str, bool], Any]:
    """Time each loop of ``modes`` for each student and batch size.

    Returns:
        The rows, the throughput settings in effect for the students, and the student's train transform.
    """
    from kdprompt.data.augment import train_transform, view_converter
    from kdprompt.models.loading import create_clip
    from kdprompt.models.student import Student
    from kdprompt.objectives import DistillObjectives
    from kdprompt.train.distill_loop import DistillModule
    from kdprompt.train.runtime import apply_throughput_settings, resolve_pin_memory

    cfg = recipe.train
    classnames = [f"class {c}" for c in range(text.shape[0])]
    teacher_view = train_transform(recipe.augmentation, teacher.clip_model.visual.preprocess_cfg)
    rows: list[dict[str, Any]] = []
    applied: dict[str, bool] = {}
    augment: Any = None
    for kind in students:
        spec = recipe.student.model_copy(update={"adaptation": kind})
        for batch_size in batch_sizes:
            torch.manual_seed(recipe.seed)
            student = Student(create_clip(spec.model, load_weights=False), spec, out_dim=text.shape[-1])
            model = DistillModule(student, DistillObjectives(recipe.objectives)).to(device)
            applied = apply_throughput_settings(model, cfg, device)
            augment = train_transform(recipe.augmentation, student.visual.preprocess_cfg)
            height, width = student.visual.preprocess_cfg["size"]
            generator = torch.Generator().manual_seed(recipe.seed)
            batches = [
                torch.randn(batch_size, 3, height, width, generator=generator)
                for _ in range(min(warmup + steps, 4))
            ]
            if resolve_pin_memory(cfg.pin_memory) and device.type == "cuda":
                batches = [b.pin_memory() for b in batches]
            ctx = StepContext(
                teacher=teacher,
                model=model,
                optimizer=_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]),
                classnames=classnames,
                text=text,
                logit_scale=teacher.logit_scale.detach(),
                to_teacher=view_converter(augment, teacher_view),
                batches=batches,
                device=device,
                autocast=autocast,
                stored=stored,
            )
            flops: int | None = None
            for mode in modes:
                figures = time_mode(MODES[mode], ctx, steps, warmup, count_flops=flops is None)
                flops = flops or figures["student_flops_per_step"]
                rows.append(
                    {
                        "batch_size": batch_size,
                        "student": kind,
                        "mode": mode,
                        **figures,
                        "student_flops_per_step": flops,
                    }
                )
            del ctx, model, student
    return rows, applied, augment


def bench_real_size(
    recipe: Any,
    teacher_recipe: Any,
    *,
    batch_sizes: Sequence[int] = (8, 64),
    students: Sequence[str] = STUDENTS,
    modes: Sequence[str] = tuple(MODES),
    steps: int = 5,
    warmup: int = 1,
    classes: int = 37,
    device: str = "cpu",
    decode_images: int = 256,
    matmul_size: int | None = None,
    views: int | None = None,
) -> dict[str, Any]:
    """Images/s, the split of a step and the student's share of matmul FLOP/s for each loop; returns the figures.

    Args:
        recipe: a distill recipe (student, objectives, augmentation, train settings).
        teacher_recipe: a teacher recipe (its model and prompt method build the teacher).
        batch_sizes: one table block per batch size.
        students: student adaptations (``prompts``: PromptKD's; ``full``: every tower weight trains).
        modes: names of :data:`MODES`.
        steps: timed steps per row.
        warmup: untimed steps per row first (at least 1: the first counts the student's FLOPs).
        classes: class prompts the teacher encodes (OxfordPets has 37).
        device: where the models run.
        decode_images: images the decode benchmark decodes.
        matmul_size: side of the square matmul timed for the machine's FLOP/s (default 8192 on CUDA, 2048 on CPU).
        views: V, views the ``cached`` loop's cache stores per image (default the recipe's
            ``teacher_outputs.views``, else the section's default, 4).

    Raises:
        KdpromptError: an unknown mode or student, or ``warmup`` below 1.
    """
    from kdprompt.errors import KdpromptError
    from kdprompt.models.loading import create_clip
    from kdprompt.models.teacher import PromptedClip
    from kdprompt.train.distill_loop import freeze_teacher
    from kdprompt.train.runtime import resolve_pin_memory

    unknown = [m for m in modes if m not in MODES] + [s for s in students if s not in STUDENTS]
    if unknown:
        raise KdpromptError(
            f"unknown mode or student {', '.join(unknown)}: modes are {', '.join(MODES)}, "
            f"students {', '.join(STUDENTS)}"
        )
    if warmup < 1:
        raise KdpromptError(f"--warmup {warmup}: at least 1 (the first warm-up step counts the FLOPs)")
    dev, cfg = torch.device(device), recipe.train
    precision = resolve_mixed_precision(cfg.mixed_precision)
    autocast = _autocast(dev, precision)
    torch.manual_seed(recipe.seed)

    teacher = PromptedClip(create_clip(teacher_recipe.model, load_weights=False), teacher_recipe.method)
    teacher.fingerprint = f"random-init {teacher_recipe.model.name}"  # what the cache's spec records
    freeze_teacher(teacher, cfg, dev)  # as distill and the precompute run it
    with torch.no_grad(), autocast():
        text = teacher.class_features([f"class {c}" for c in range(classes)]).float()
    views = views or (recipe.teacher_outputs.views if recipe.teacher_outputs else DEFAULT_VIEWS)
    with tempfile.TemporaryDirectory(prefix="kdprompt-bench-") as tmp:
        stored, precompute = None, None
        if "cached" in modes:
            stored, precompute = precompute_cache(
                recipe,
                teacher,
                Path(tmp),
                images=max(batch_sizes),
                views=views,
                device=dev,
                autocast=autocast,
            )
        rows, applied, augment = _time_loops(
            recipe,
            teacher,
            text,
            stored,
            batch_sizes=batch_sizes,
            students=students,
            modes=modes,
            steps=steps,
            warmup=warmup,
            device=dev,
            autocast=autocast,
        )
    matmul = matmul_size or (8192 if dev.type == "cuda" else 2048)
    peaks = {"fp32": matmul_flops_per_s(dev, torch.float32, matmul)}
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if compute is not None:
        peaks[precision] = matmul_flops_per_s(dev, compute, matmul)
    peak = peaks[precision if compute is not None else "fp32"]
    pin = resolve_pin_memory(cfg.pin_memory)
    decode = decode_images_per_s(
        augment,
        images=decode_images,
        batch_size=max(batch_sizes),
        num_workers=cfg.num_workers,
        pin_memory=pin,
    )
    for row in rows:
        student_s = row["phase_ms"]["student"] / 1000
        row["student_flops_per_s"] = row["student_flops_per_step"] / student_s if student_s else None
        row["student_fraction_of_matmul_peak"] = (row["student_flops_per_s"] or 0.0) / peak
        row["decode_headroom"] = decode / row["images_per_s"]
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "teacher": f"{teacher_recipe.model.name} {teacher_recipe.method.name}",
        "student": recipe.student.model.name,
        "classes": classes,
        "steps": steps,
        "warmup": warmup,
        "mixed_precision": precision,
        "throughput_settings": applied,
        "matmul_size": matmul,
        "matmul_flops_per_s": peaks,
        "decode": {"images_per_s": decode, "num_workers": cfg.num_workers, "pin_memory": pin},
        "precompute": precompute,
        "recipe_cost": recipe_cost(rows, precompute, cfg.epochs) if precompute else [],
        "rows": rows,
    }


def real_size_table(figures: dict[str, Any]) -> str:
    """The figures of :func:`bench_real_size` as a Markdown header, table and whole-recipe costs."""
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in figures["matmul_flops_per_s"].items())
    settings = ", ".join(k for k, on in figures["throughput_settings"].items() if on) or "none"
    decode = figures["decode"]
    lines = [
        f"teacher {figures['teacher']}, student {figures['student']}, {figures['classes']} classes, "
        f"device {figures['device']} ({figures['threads']} threads), mixed precision {figures['mixed_precision']}, "
        f"settings applied (students and teacher image tower): {settings}; {figures['steps']} timed steps "
        f"after {figures['warmup']} warm-up",
        f"matmul ({figures['matmul_size']}^2): {peaks}; decode + augment: {decode['images_per_s']:.1f} images/s "
        f"({decode['num_workers']} workers, pin_memory {decode['pin_memory']})",
    ]
    pre = figures.get("precompute")
    if pre:
        lines.append(
            f"teacher-output precompute (decode, {pre['views']} views cut, teacher, {pre['dtype']} parts written): "
            f"{pre['images']} images x {pre['views']} views in {pre['part_seconds']:.2f} s = "
            f"{pre['image_views_per_s']:.2f} image-views/s (teacher batch {pre['teacher_batch_size']}; "
            f"one-off setup {pre['setup_seconds']:.2f} s more); "
            "cached data = replay (stored views re-cut) + rows (stored features read) + copy"
        )
    lines += [
        "",
        "| batch | student | mode | images/s | step ms | data | text | teacher | student f+b | optimiser "
        "| student GFLOP/step | student TFLOP/s | % of matmul peak | decode / step rate |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in figures["rows"]:
        ms = r["phase_ms"]
        cells = {p: f"{ms[p]:.1f}" for p in PHASES}
        if r.get("detail_ms"):
            cells["data"] += " (" + ", ".join(f"{k} {v:.1f}" for k, v in r["detail_ms"].items()) + ")"
        lines.append(
            f"| {r['batch_size']} | {r['student']} | {r['mode']} | {r['images_per_s']:.2f} | {r['step_ms']:.1f} | "
            + " | ".join(cells[p] for p in PHASES)
            + f" | {(r['student_flops_per_step'] or 0) / 1e9:.4g} | {(r['student_flops_per_s'] or 0) / 1e12:.4f}"
            f" | {100 * r['student_fraction_of_matmul_peak']:.1f} | {r['decode_headroom']:.2f}"
            + (" (decode-bound)" if r["decode_headroom"] < 1 else "")
            + " |"
        )
    lines += [cost_line(c) for c in figures.get("recipe_cost", [])]
    return "\n".join(lines)


def cost_line(c: dict[str, Any]) -> str:
    """One :func:`recipe_cost` entry as text, the formula with its figures."""
    n, v = c["epochs"], c["views"]
    return (
        f"\nwhole recipe, {c['student']} student, batch {c['batch_size']} ({n} epochs over E images, V = {v} "
        f"views):\n"
        f"  online = {n}·E/online = {n}·E/{c['online_images_per_s']:.4g} = {c['online_s_per_image']:.4g}·E s\n"
        f"  cached = V·E/precompute + {n}·E/cached = {v}·E/{c['precompute_image_views_per_s']:.4g} + "
        f"{n}·E/{c['cached_images_per_s']:.4g} = {c['cached_precompute_s_per_image']:.4g}·E + "
        f"{c['cached_train_s_per_image']:.4g}·E = {c['cached_s_per_image']:.4g}·E s\n"
        f"  whole recipe: cost online/cached = {c['recipe_speedup']:.3g}x (above 1: cached is cheaper); "
        f"per epoch cached/online images/s = {c['epoch_speedup']:.3g}x"
    )
