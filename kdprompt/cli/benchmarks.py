"""``kdprompt bench``: benchmarks that print figures (distill step, bundle vs teacher, the HTTP server,
class mixing of streamed batches)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdprompt.cli.options import (
    CONTEXT_SETTINGS,
    batching_options,
    recipe_arguments,
    resolve_device,
    user_errors,
)


@click.group(context_settings=CONTEXT_SETTINGS)
def bench() -> None:
    """Benchmarks that print figures (images/s, classes per batch), for the notes of a change."""


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in _names(value)]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers separated by commas, e.g. 8,64")
    return sizes


@bench.command("distill", context_settings=CONTEXT_SETTINGS)
@recipe_arguments(dry_run=False)
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Timed steps per loop.")
@click.option(
    "--warmup", type=click.IntRange(1), default=3, show_default=True, help="Untimed steps per loop first."
)
@click.option(
    "--real-size",
    is_flag=True,
    help="Randomly initialised real architectures side by side (see below) instead of RECIPE's run.",
)
@click.option(
    "--teacher-recipe",
    default="base2novel/oxford_pets/promptsrc-vit-l-14",
    show_default=True,
    help="--real-size: the teacher recipe whose model and prompt method build the teacher.",
)
@click.option(
    "--teacher-set",
    "teacher_overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="--real-size: an override of the teacher recipe (repeatable), e.g. model.name=kd-tiny-teacher.",
)
@click.option(
    "--batch-sizes",
    default="8,64",
    show_default=True,
    callback=_sizes,
    help="--real-size: batch sizes, comma-separated.",
)
@click.option(
    "--students",
    default="prompts,full",
    show_default=True,
    help="--real-size: student adaptations, comma-separated (prompts: PromptKD's; full).",
)
@click.option(
    "--modes",
    default="promptkd,online,cached",
    show_default=True,
    help="--real-size: loops, comma-separated (promptkd, online, cached).",
)
@click.option(
    "--classes", type=click.IntRange(1), default=37, show_default=True, help="--real-size: class prompts."
)
@click.option(
    "--decode-images",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="--real-size: JPEGs decoded to time the loader.",
)
@click.option("--device", default="auto", show_default=True, help="--real-size: cpu, cuda, cuda:N or auto.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the figures to this JSON file.",
)
@user_errors
def bench_distill_command(
    recipe: str,
    overrides: tuple[str, ...],
    steps: int,
    warmup: int,
    real_size: bool,
    teacher_recipe: str,
    teacher_overrides: tuple[str, ...],
    batch_sizes: list[int],
    students: str,
    modes: str,
    classes: int,
    decode_images: int,
    device: str,
    json_path: Path | None,
) -> None:
    """Distill-step throughput: cached teacher text features vs re-encoding them every batch.

    RECIPE is a distill recipe (its teacher, cache, student and data); the second loop re-encodes the
    teacher's class texts per batch as the PromptKD reference does. Prints images/s and the ratio.

    With --real-size nothing is read but the recipes: the teacher (--teacher-recipe, PromptKD's PromptSRC
    ViT-L-14 by default) and RECIPE's student, with its own adaptation and with full adaptation, are
    built with random weights, and for each batch size, student and loop (promptkd: class texts
    re-encoded every batch; online: cached text features, the teacher's image tower every step;
    cached: teacher image features read, not computed) it prints a Markdown table of images/s, the
    milliseconds of each phase of a step (data, text, teacher, student forward+backward, optimiser),
    the student's FLOP/s as a share of a matmul's measured here, and how many times over JPEG
    decoding in train.num_workers loader workers keeps up. RECIPE's train.mixed_precision,
    allow_tf32, channels_last, compile, num_workers and pin_memory apply (override them as usual).
    On a CPU a ViT-L-14 step takes tens of seconds: use --batch-sizes 8 --steps 2 --warmup 1.

    \b
    Examples:
      kdprompt bench distill base2novel/oxford_pets/distill-vit-b-16 --real-size
      kdprompt bench distill base2novel/oxford_pets/distill-vit-b-16 --real-size --batch-sizes 8 \\
          --steps 2 --warmup 1 --json bench.json train.compile=true
    """
    from kdprompt.config.distill import DistillRecipe
    from kdprompt.config.loading import load_recipe

    distill = load_recipe(DistillRecipe, recipe, overrides)
    if real_size:
        from kdprompt.apps.bench_real_size import bench_real_size, real_size_table
        from kdprompt.config.teacher import TeacherRecipe

        figures = bench_real_size(
            distill,
            load_recipe(TeacherRecipe, teacher_recipe, teacher_overrides),
            batch_sizes=batch_sizes,
            students=_names(students),
            modes=_names(modes),
            steps=steps,
            warmup=warmup,
            classes=classes,
            device=resolve_device(device),
            decode_images=decode_images,
        )
        click.echo(real_size_table(figures))
    else:
        from kdprompt.apps.bench import bench_distill

        figures = bench_distill(distill, steps=steps, warmup=warmup)
        click.echo(json.dumps(figures, indent=2))
    if json_path is not None:
        from kdprompt.io import write_json_atomic

        write_json_atomic(json_path, figures)


@bench.command("mixing", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--classes", type=click.IntRange(1), default=1000, show_default=True, help="Classes of the split."
)
@click.option("--per-class", type=click.IntRange(1), default=50, show_default=True, help="Samples per class.")
@click.option(
    "--maxcount", type=click.IntRange(1), default=1000, show_default=True, help="Samples per shard."
)
@click.option(
    "--shuffle-buffer", type=click.IntRange(0), default=1000, show_default=True, help="Loader buffer."
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Samples per batch.")
@click.option("--batches", type=click.IntRange(1), default=1000, show_default=True, help="Batches counted.")
@click.option(
    "--interleave", type=click.IntRange(1), default=16, show_default=True, help="Shards read at once (after)."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the shards go (default: a temporary folder, removed afterwards).",
)
@user_errors
def bench_mixing_command(workdir: Path | None, **settings: int) -> None:
    """Distinct classes per batch of a class-grouped split: split-order shards vs shuffled and interleaved.

    Writes a split listed class by class (as CoOp's are; tiny images, only labels matter) as shards in
    split order and in a seeded order, streams batches through the training loader, and prints the
    mean number of distinct classes per batch for each, next to a uniform shuffle's.
    """
    import tempfile

    from kdprompt.apps.bench import bench_mixing

    with tempfile.TemporaryDirectory(prefix="kdprompt-mixing-") as tmp:
        figures = bench_mixing(workdir or Path(tmp), **settings)
    click.echo(json.dumps(figures, indent=2))


@bench.command("predict", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--teacher",
    "teacher_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Teacher to compare with (default: the one the bundle's manifest names).",
)
@click.option(
    "--images", type=click.IntRange(1), default=512, show_default=True, help="Images classified per pass."
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per batch.")
@click.option(
    "--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed passes (best kept)."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@user_errors
def bench_predict_command(
    bundle_dir: Path, teacher_dir: Path | None, images: int, batch_size: int, repeats: int, device: str
) -> None:
    """Classification images/s of a BUNDLE vs its teacher on the same images, and their sizes.

    Both classify the same preprocessed images (the teacher's test split when it records its data)
    to top-5; the teacher's class features are computed once, before timing. Prints JSON: images/s of
    the bundle (torch, and ONNX when exported), of the teacher, their ratio, parameters and bundle bytes.
    """
    from kdprompt.apps.bench import bench_predict

    figures = bench_predict(
        bundle_dir,
        teacher_dir,
        images=images,
        batch_size=batch_size,
        repeats=repeats,
        device=resolve_device(device),
    )
    click.echo(json.dumps(figures, indent=2))


@bench.command("serve", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option(
    "--requests",
    "n_requests",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Requests in all (one image each).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Requests in flight."
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A folder of image files to send (default: PNG drawings at 4x the bundle's input size).",
)
@batching_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
@user_errors
def bench_serve_command(
    bundle_dir: Path,
    n_requests: int,
    concurrency: int,
    images_dir: Path | None,
    backend: str,
    device: str,
    max_batch: int,
    max_wait_ms: float,
    as_json: bool,
) -> None:
    """Load-test `kdprompt serve` on BUNDLE: requests/s and p50 / p99 latency of POST /v1/classify.

    Starts the server in this process on a free loopback port, sends a few warm-up requests, then
    --requests multipart requests of one image each, --concurrency at a time (one connection each),
    and prints requests/s, latency percentiles, errors and the mean images per model call.

    \b
    Examples:
      kdprompt bench serve bundles/dtd
      kdprompt bench serve bundles/dtd --requests 2000 --concurrency 32 --images ~/photos --json
    """
    from kdprompt.apps.bench import bench_serve, serve_table

    figures = bench_serve(
        bundle_dir,
        images_dir=images_dir,
        requests=n_requests,
        concurrency=concurrency,
        backend=backend,
        device=resolve_device(device),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        click.echo(serve_table(figures))
        for sample in figures["error_samples"]:
            click.echo(f"error: {sample}", err=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 1000,100000, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise click.BadParameter(f"every value must be at least 1, got {text!r}")
    return values


@bench.command("vocab", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--classes",
    default="1000,100000,1000000",
    show_default=True,
    help="Vocabulary sizes, comma-separated (1M classes of width 768 take 3 GiB per copy).",
)
@click.option("--dims", default="512,768", show_default=True, help="Feature widths, comma-separated.")
@click.option(
    "--vocabulary",
    "vocabularies",
    type=click.Choice(["random", "clustered"]),
    multiple=True,
    default=("random",),
    show_default=True,
    help="Class vectors: random (no structure; the worst case for IVF) or clustered (~100 per centre). Repeatable.",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Queries per batch."
)
@click.option(
    "--k",
    "top_k",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Classes returned (predict and serve search 100 past 10,000 classes).",
)
@click.option(
    "--approximate",
    default="ivf,hnsw",
    show_default=True,
    help="Approximate indexes built and timed, comma-separated (ivf, hnsw; empty: none).",
)
@click.option(
    "--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs (best kept)."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the rows as JSON here.",
)
@user_errors
def bench_vocab_command(
    classes: str,
    dims: str,
    vocabularies: tuple[str, ...],
    batch_size: int,
    top_k: int,
    approximate: str,
    repeats: int,
    json_path: Path | None,
) -> None:
    """Top-k over large vocabularies: matrix product + softmax vs exact search vs FAISS IVF and HNSW.

    Unit class vectors, random (the worst case for an approximate index) or clustered, and a batch of
    unit queries at cosine 0.3 to random classes. Prints a markdown table: ms per batch and MiB per method,
    whether exact search screened with bfloat16, each approximate index's search breadth (tuned to
    recall@1 >= 0.95 against exact search), its measured recall and build time.

    \b
    Examples:
      kdprompt bench vocab
      kdprompt bench vocab --classes 1000,1000000 --dims 128 --k 100 --vocabulary clustered
    """
    from kdprompt.apps.bench_vocab import APPROXIMATE, bench_vocab, vocab_table

    kinds = tuple(a.strip() for a in approximate.split(",") if a.strip())
    unknown = [a for a in kinds if a not in APPROXIMATE]
    if unknown:
        raise click.BadParameter(
            f"unknown index {', '.join(unknown)}; use {', '.join(APPROXIMATE)}", param_hint="--approximate"
        )
    rows = bench_vocab(
        _int_list(classes),
        _int_list(dims),
        batch=batch_size,
        k=top_k,
        repeats=repeats,
        vocabularies=vocabularies,
        approximate=kinds,
    )
    click.echo(vocab_table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
