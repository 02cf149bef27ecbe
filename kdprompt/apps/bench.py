"""Benchmarks that print numbers (never timed tests): ``kdprompt bench distill``, ``predict``, ``serve``.

``distill`` times the distillation step as kdprompt runs it (distill's own setup and step; teacher class
text features read from the cache once) against the PromptKD reference's loop, which re-encodes the
teacher's class texts through the prompted text tower on every batch (the same step with
``recompute_text``). Both loops see the same preloaded batches, so data loading is not measured.

``predict`` classifies the same preprocessed images with a bundle (student image encoder + cached
class features) and with the teacher it came from (prompted image tower, its class features
computed once before timing), so the ratio is the deployment speed-up of distillation.

``serve`` load-tests ``kdprompt serve`` on a bundle, in this process on a loopback port.

``mixing`` counts distinct classes per batch streamed from a class-grouped split (CoOp lists images
class by class): shards written in split order and read one at a time, as before, against shards
written in a seeded order and read several at a time through the real loader.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdprompt.config.distill import DistillRecipe


def bench_distill(recipe: DistillRecipe, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Images/s of the distill step with cached text features vs re-encoded ones; returns the figures.

    The stage is distill's own (:class:`~kdprompt.train.distill_loop.DistillStage`: its setup, its
    accelerator and mixed precision, its step), opened without resuming a checkpoint or writing the run
    directory; the reference's variant is the same step with ``recompute_text`` on. ``warmup`` steps of
    each variant go untimed; both train the same student on the same batches, preloaded to the device.
    """
    from kdprompt.train.distill_loop import DistillStage
    from kdprompt.train.run import open_run

    stage = DistillStage(recipe)
    run, _ = open_run(stage, resume=False, tensorboard=False)
    run.stop_at = steps + warmup
    batches = [{**batch, "image": batch["image"].to(run.device)} for _, batch in stage.batches(run, None)]
    cuda = run.device.type == "cuda"

    def timed(recompute: bool) -> float:
        stage.recompute_text = recompute
        stage.model.train()
        start = 0.0
        for i, batch in enumerate(batches):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            run.step = i
            stage.step(run, batch)
        if cuda:
            torch.cuda.synchronize()
        return steps * recipe.train.batch_size / (time.perf_counter() - start)

    recomputed = timed(recompute=True)
    cached = timed(recompute=False)
    return {
        "device": run.device.type,
        "batch_size": recipe.train.batch_size,
        "classes": stage.cache.num_classes,
        "steps": steps,
        "cached_images_per_s": cached,
        "recomputed_images_per_s": recomputed,
        "speedup": cached / recomputed,
    }


def _images_per_s(
    classify: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], repeats: int
) -> float:
    """Best of ``repeats`` passes over ``batches`` (after one warm-up batch), in images/s."""
    classify(batches[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            classify(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return sum(b.shape[0] for b in batches) / best


def _sample_images(teacher: Any, count: int) -> list[Any]:
    """Up to ``count`` PIL images of the teacher's test split, else coloured noise."""
    from PIL import Image

    from kdprompt.data.sources import load_split
    from kdprompt.data.types import load_image

    if teacher.data_config is not None:
        samples = load_split(teacher.data_config, "test").samples
        if samples:
            return [load_image(samples[i % len(samples)]) for i in range(count)]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (count, 64, 64, 3), dtype=torch.uint8, generator=generator)
    return [Image.fromarray(a.numpy()) for a in noise]


@torch.no_grad()
def bench_predict(
    bundle_dir: Path,
    teacher_dir: Path | None = None,
    images: int = 512,
    batch_size: int = 64,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, Any]:
    """Top-5 classification images/s of a bundle vs its teacher on the same images; returns the figures."""
    import torch.nn.functional as F

    from kdprompt.deploy import load_bundle
    from kdprompt.deploy.export import ONNX_FILE
    from kdprompt.errors import KdpromptError
    from kdprompt.models.teacher import load_teacher

    bundle = load_bundle(bundle_dir, device=device)
    teacher_dir = Path(teacher_dir or bundle.manifest["teacher"]["path"])
    if not (teacher_dir / "teacher.json").is_file():
        raise KdpromptError(f"no teacher at {teacher_dir}; pass --teacher runs/<name>/teacher")
    teacher = load_teacher(teacher_dir, device=device).eval()
    pil = _sample_images(teacher, images)
    start = time.perf_counter()
    bundle_inputs = torch.stack([bundle.transform(im) for im in pil])
    preprocess_per_s = len(pil) / (time.perf_counter() - start)
    teacher_inputs = torch.stack([teacher.transform(im) for im in pil])

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [b.to(device) for b in x.split(batch_size)]

    text = F.normalize(teacher.class_features(bundle.classnames).float(), dim=-1)

    def teacher_classify(batch: torch.Tensor) -> Any:
        feats = F.normalize(teacher.encode_images(batch).float(), dim=-1)
        return (teacher.logit_scale * feats @ text.T).softmax(-1).topk(5)

    figures: dict[str, Any] = {
        "device": device,
        "images": len(pil),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "bundle_images_per_s": _images_per_s(
            lambda b: bundle.predict_tensor(b, 5), split(bundle_inputs), repeats
        ),
        "teacher_images_per_s": _images_per_s(teacher_classify, split(teacher_inputs), repeats),
    }
    figures["speedup"] = figures["bundle_images_per_s"] / figures["teacher_images_per_s"]
    if (Path(bundle_dir) / ONNX_FILE).is_file():
        onnx = load_bundle(bundle_dir, backend="onnx", verify=False)
        figures["bundle_onnx_images_per_s"] = _images_per_s(
            lambda b: onnx.predict_tensor(b, 5), split(bundle_inputs.cpu()), repeats
        )
    params = bundle.manifest["parameters"]
    figures.update(
        preprocess_images_per_s=preprocess_per_s,
        student_image_tower_parameters=params["image_tower"],
        student_encoder_parameters=params["total"],
        teacher_image_tower_parameters=sum(p.numel() for p in teacher.clip_model.visual.parameters()),
        bundle_bytes=sum(p.stat().st_size for p in Path(bundle_dir).rglob("*") if p.is_file()),
    )
    return figures


def bench_serve(
    bundle_dir: Path,
    *,
    images_dir: Path | None = None,
    requests: int = 500,
    concurrency: int = 8,
    backend: str = "torch",
    device: str = "cpu",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
) -> dict[str, Any]:
    """Requests/s, latency percentiles and mean images per model call of ``kdprompt serve`` on a bundle.

    The server runs in this process on a free loopback port; a few warm-up requests go first, then
    ``requests`` multipart requests of one image each, ``concurrency`` at a time. The images are the
    files under ``images_dir``, else PNG drawings at 4x the bundle's input size.
    """
    from kdprompt.deploy import load_bundle
    from kdprompt.deploy.serve import create_app, require_serve_extra
    from kdprompt.deploy.serve.loadtest import read_images, run_load_test, synthetic_images
    from kdprompt.deploy.serve.server import background_server, get_json

    require_serve_extra()  # before the bundle loads: fails fast
    bundle = load_bundle(bundle_dir, device=device, backend=backend)
    if images_dir is not None:
        payloads = read_images(images_dir)
    else:
        _, height, width = bundle.input_size
        payloads = synthetic_images((4 * height, 4 * width))
    app = create_app(bundle, max_batch=max_batch, max_wait_ms=max_wait_ms)
    with background_server(app) as url:
        run_load_test(url, payloads, requests=min(requests, 2 * concurrency), concurrency=concurrency)
        before = get_json(f"{url}/healthz")["batcher"]
        figures = run_load_test(url, payloads, requests=requests, concurrency=concurrency)
        after = get_json(f"{url}/healthz")["batcher"]
    batches = after["batches"] - before["batches"]
    figures["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else 0.0
    figures.update(
        {
            "model": bundle.name,
            "backend": backend,
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "images": str(images_dir) if images_dir is not None else "synthetic",
        }
    )
    return figures


SERVE_COLUMNS = [
    ("requests", "requests"),
    ("concurrency", "concurrency"),
    ("errors", "errors"),
    ("req/s", "req_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("mean ms", "mean_ms"),
    ("images/batch", "mean_batch"),
]


def serve_table(figures: dict[str, Any]) -> str:
    """The figures of :func:`bench_serve` as a one-row Markdown table."""
    head = "| " + " | ".join(name for name, _ in SERVE_COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in SERVE_COLUMNS) + "|"
    row = "| " + " | ".join(str(figures[key]) for _, key in SERVE_COLUMNS) + " |"
    return "\n".join([head, rule, row])


def _class_grouped_split(classes: int, per_class: int) -> Any:
    """``classes`` x ``per_class`` samples listed class by class, each a 1x1 PNG (only labels matter)."""
    import io

    from PIL import Image

    from kdprompt.data.types import Sample, Split

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = buf.getvalue()
    names = [f"class {c}" for c in range(classes)]
    samples = [Sample(png, c, names[c], key=f"{c}_{i}") for c in range(classes) for i in range(per_class)]
    return Split(samples, names, name="train")


def _distinct_per_batch(urls: list[str], *, batches: int, **stream: Any) -> float:
    """Mean distinct labels in the first ``batches`` batches of the real loader (one process, no workers)."""
    from kdprompt.data.shard_reader import make_loader

    blank = torch.zeros(1)
    loader = make_loader(urls, transform=lambda _: blank, rank=0, world_size=1, **stream)
    counts: list[int] = []
    for batch in loader:
        counts.append(len(set(batch["label"].tolist())))
        if len(counts) == batches:
            break
    return sum(counts) / max(1, len(counts))


def bench_mixing(
    workdir: Path,
    *,
    classes: int = 1000,
    per_class: int = 50,
    maxcount: int = 1000,
    shuffle_buffer: int = 1000,
    batch_size: int = 8,
    batches: int = 2000,
    interleave: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Distinct classes per batch of a class-grouped split, before and after shuffled writing and interleaving.

    Writes the split twice under ``workdir`` (in split order; in a seeded order) with ``maxcount``
    samples per shard, and reads the first ``batches`` batches of each through
    :func:`~kdprompt.data.shard_reader.make_loader`. The i.i.d. figure chunks a uniform permutation of
    the labels (what PromptKD's loader, reshuffling the whole split each epoch, would give).
    """
    import random

    from kdprompt.data.shard_writer import write_shards

    split = _class_grouped_split(classes, per_class)
    urls = {}
    for name, order_seed in (("split-order", None), ("shuffled", seed)):
        out = Path(workdir) / name
        sizes = write_shards(
            split, out, image_format="png", maxcount=maxcount, overwrite=True, shuffle_seed=order_seed
        )
        urls[name] = [str(out / shard) for shard in sorted(sizes)]
    stream = {"batch_size": batch_size, "shuffle_buffer": shuffle_buffer, "seed": seed, "batches": batches}
    labels = [s.label for s in split.samples]
    random.Random(seed).shuffle(labels)
    chunks = [labels[i : i + batch_size] for i in range(0, batch_size * batches, batch_size)]
    return {
        "classes": classes,
        "samples": len(split),
        "shards": len(urls["shuffled"]),
        "maxcount": maxcount,
        "shuffle_buffer": shuffle_buffer,
        "batch_size": batch_size,
        "batches": batches,
        "distinct_classes_per_batch": {
            "split order, one shard at a time (before)": _distinct_per_batch(
                urls["split-order"], interleave=1, **stream
            ),
            f"split order, {interleave} shards interleaved": _distinct_per_batch(
                urls["split-order"], interleave=interleave, **stream
            ),
            f"shuffled write, {interleave} shards interleaved (after)": _distinct_per_batch(
                urls["shuffled"], interleave=interleave, **stream
            ),
            "uniform shuffle (i.i.d.)": sum(len(set(c)) for c in chunks if c) / max(1, len(chunks)),
        },
    }
