"""Benchmarks that print numbers (never timed tests): ``kdprompt bench distill``.

``distill`` times the distillation step as kdprompt runs it (teacher class text features read from
the cache once) against the PromptKD reference's loop, which re-encodes the teacher's class texts
through the prompted text tower on every batch. Both loops see the same preloaded batches, so data
loading is not measured.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kdprompt.config import DistillRecipe


def bench_distill(recipe: DistillRecipe, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Images/s of the distill step with cached text features vs re-encoded ones; returns the figures."""
    from kdprompt.cache import load_cache
    from kdprompt.data.materialize import shards_for
    from kdprompt.data.shards import make_loader
    from kdprompt.models.loading import create_clip
    from kdprompt.models.student import Student
    from kdprompt.models.teacher import load_teacher
    from kdprompt.objectives import DistillBatch, DistillObjectives
    from kdprompt.train.distill import cache_of, view_converter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(recipe.seed)
    teacher = load_teacher(recipe.teacher, device=device)
    teacher.requires_grad_(False)
    cache = load_cache(cache_of(recipe), expect_fingerprint=teacher.fingerprint, load_index=False)
    student = Student(create_clip(recipe.student.model), recipe.student, out_dim=cache.embed_dim).to(device)
    objectives = DistillObjectives(recipe.objectives).to(device)
    params = [p for p in [*student.parameters(), *objectives.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4)
    to_teacher = view_converter(student.train_transform, teacher.train_transform)
    urls = shards_for(recipe.data, recipe.split, recipe.shards_dir, recipe.shard_maxcount)
    loader = make_loader(
        urls,
        batch_size=recipe.train.batch_size,
        transform=student.train_transform,
        shuffle_buffer=0,
        batches_per_epoch=steps + warmup,
        rank=0,
        world_size=1,
    )
    batches = [b["image"].to(device) for b in loader]
    cached_text = cache.features.to(device)
    scale = torch.tensor(cache.logit_scale, device=device)

    def run(recompute: bool) -> float:
        student.train()
        start = 0.0
        for i, images in enumerate(batches):
            if i == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.no_grad():
                text = teacher.class_features(cache.classnames).float() if recompute else cached_text
                t = teacher.encode_images(to_teacher(images)).float()
            out = objectives(DistillBatch(student=student(images), teacher=t, text=text, logit_scale=scale))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * recipe.train.batch_size / (time.perf_counter() - start)

    recomputed = run(recompute=True)
    cached = run(recompute=False)
    return {
        "device": device,
        "batch_size": recipe.train.batch_size,
        "classes": cache.num_classes,
        "steps": steps,
        "cached_images_per_s": cached,
        "recomputed_images_per_s": recomputed,
        "speedup": cached / recomputed,
    }
