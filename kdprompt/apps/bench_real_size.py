"""``kdprompt bench distill --real-size``: distillation loops side by side at real sizes, randomly initialised.

The teacher is built from a teacher recipe (by default PromptKD's: PromptSRC on ViT-L-14, 4 + 4 prompts at
depth 9), the students from a distill recipe (by default PromptKD's ViT-B-16 with 4 visual prompts at
depth 9 and the MLP projector 512 -> 768) with its ``prompts`` adaptation and with ``full`` adaptation.
The architectures are shaped as their recipes' weights would shape them (an open_clip tag's QuickGELU
and preprocessing) but their weights are random and nothing is read or downloaded: speed does not depend
on the weights. Batches are random images at the student's input size, preloaded on the host.

Each loop is a step callable of :data:`MODES`, timed phase by phase (the device is synchronised between
phases): ``data`` (host-to-device copy), ``text`` (class text features), ``teacher`` (teacher image
features), ``student`` (student forward + backward, FLOPs counted with
:class:`~torch.utils.flop_counter.FlopCounterMode`) and ``optimiser``. The operations are those of
:meth:`~kdprompt.train.distill_loop.DistillStage.step`:

- ``promptkd``: the PromptKD reference's loop, which re-encodes the class texts through the teacher's
  prompted text tower at every batch (``DistillStage(recompute_text=True)``);
- ``online``: kdprompt's loop, class text features read from the cache (computed once here) and the
  teacher's image tower run at every step;
- ``cached``: teacher image features read, not computed. Until a teacher-output cache exists they are
  computed once before timing and held in host memory (:meth:`StepContext.teacher_store`), so the row is
  the bound such a cache can reach; a cache reader replaces that one method, or registers its own mode.

The recipe's throughput settings (``train.mixed_precision``, ``allow_tf32``, ``channels_last``,
``compile``) apply to each student as in training (:func:`~kdprompt.train.runtime.apply_throughput_settings`),
and ``num_workers`` / ``pin_memory`` to a decode benchmark: JPEG photos decoded and augmented in loader
workers, whose images/s must stay above what each loop consumes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

PHASES = ("data", "text", "teacher", "student", "optimiser")
STUDENTS = ("prompts", "full")
DEFAULT_TEACHER_RECIPE = "base2novel/oxford_pets/promptsrc-vit-l-14"
PHOTO_SIZE = (500, 375)  # a typical OxfordPets photo, as the rehearsal writes them


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseClock:
    """Seconds per phase of the steps it times; ``count`` names a phase whose FLOPs are counted once."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    count: str | None = None
    flops: int | None = None

    def __call__(self, phase: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` as ``phase`` (synchronised before and after); returns its result."""
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
        self.seconds[phase] += time.perf_counter() - start
        return out


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
    _stored: list[Tensor] | None = None

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

    def teacher_store(self) -> list[Tensor]:
        """Teacher image features of every batch on the host, computed once (a teacher-output cache's stand-in)."""
        if self._stored is None:
            self._stored = [self.encode_images(b.to(self.device)).cpu() for b in self.batches]
        return self._stored

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
    """kdprompt cached: teacher image features read (host to device), never computed."""
    store = ctx.teacher_store()  # built before the clock runs
    images = clock("data", lambda: ctx.load(i))
    features = clock("teacher", lambda: store[i % len(store)].to(ctx.device, non_blocking=True))
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


def _optimizer(cfg: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The distill recipe's optimiser (as :class:`~kdprompt.train.distill_loop.DistillStage` builds it)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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

    Raises:
        KdpromptError: an unknown mode or student, or ``warmup`` below 1.
    """
    from kdprompt.data.augment import train_transform
    from kdprompt.errors import KdpromptError
    from kdprompt.models.loading import create_clip
    from kdprompt.models.student import Student
    from kdprompt.models.teacher import PromptedClip
    from kdprompt.objectives import DistillObjectives
    from kdprompt.train.distill_loop import DistillModule, view_converter
    from kdprompt.train.runtime import apply_throughput_settings, resolve_mixed_precision, resolve_pin_memory

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
    teacher.requires_grad_(False)
    teacher.eval().to(dev)
    classnames = [f"class {c}" for c in range(classes)]
    with torch.no_grad(), autocast():
        text = teacher.class_features(classnames).float()
    logit_scale = teacher.logit_scale.detach()
    teacher_view = train_transform(recipe.augmentation, teacher.clip_model.visual.preprocess_cfg)

    rows: list[dict[str, Any]] = []
    applied: dict[str, bool] = {}
    augment: Any = None
    for kind in students:
        spec = recipe.student.model_copy(update={"adaptation": kind})
        for batch_size in batch_sizes:
            torch.manual_seed(recipe.seed)
            student = Student(create_clip(spec.model, load_weights=False), spec, out_dim=text.shape[-1])
            model = DistillModule(student, DistillObjectives(recipe.objectives)).to(dev)
            applied = apply_throughput_settings(model, cfg, dev)
            augment = train_transform(recipe.augmentation, student.visual.preprocess_cfg)
            height, width = student.visual.preprocess_cfg["size"]
            generator = torch.Generator().manual_seed(recipe.seed)
            batches = [
                torch.randn(batch_size, 3, height, width, generator=generator)
                for _ in range(min(warmup + steps, 4))
            ]
            if resolve_pin_memory(cfg.pin_memory) and dev.type == "cuda":
                batches = [b.pin_memory() for b in batches]
            ctx = StepContext(
                teacher=teacher,
                model=model,
                optimizer=_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]),
                classnames=classnames,
                text=text,
                logit_scale=logit_scale,
                to_teacher=view_converter(augment, teacher_view),
                batches=batches,
                device=dev,
                autocast=autocast,
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
        "rows": rows,
    }


def real_size_table(figures: dict[str, Any]) -> str:
    """The figures of :func:`bench_real_size` as a Markdown header and table."""
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in figures["matmul_flops_per_s"].items())
    settings = ", ".join(k for k, on in figures["throughput_settings"].items() if on) or "none"
    decode = figures["decode"]
    lines = [
        f"teacher {figures['teacher']}, student {figures['student']}, {figures['classes']} classes, "
        f"device {figures['device']} ({figures['threads']} threads), mixed precision {figures['mixed_precision']}, "
        f"settings applied: {settings}; {figures['steps']} timed steps after {figures['warmup']} warm-up",
        f"matmul ({figures['matmul_size']}^2): {peaks}; decode + augment: {decode['images_per_s']:.1f} images/s "
        f"({decode['num_workers']} workers, pin_memory {decode['pin_memory']})",
        "",
        "| batch | student | mode | images/s | step ms | data | text | teacher | student f+b | optimiser "
        "| student GFLOP/step | student TFLOP/s | % of matmul peak | decode / step rate |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in figures["rows"]:
        ms = r["phase_ms"]
        lines.append(
            f"| {r['batch_size']} | {r['student']} | {r['mode']} | {r['images_per_s']:.2f} | {r['step_ms']:.1f} | "
            + " | ".join(f"{ms[p]:.1f}" for p in PHASES)
            + f" | {(r['student_flops_per_step'] or 0) / 1e9:.4g} | {(r['student_flops_per_s'] or 0) / 1e12:.4f}"
            f" | {100 * r['student_fraction_of_matmul_peak']:.1f} | {r['decode_headroom']:.2f}"
            + (" (decode-bound)" if r["decode_headroom"] < 1 else "")
            + " |"
        )
    return "\n".join(lines)
