"""``kdprompt shards`` (any data source's split as webdataset shards) and ``kdprompt cache``."""

from __future__ import annotations

from pathlib import Path

import click

from kdprompt.cli.options import CONTEXT_SETTINGS, SourcesHelpCommand, user_errors


@click.command(cls=SourcesHelpCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("train",),
    show_default=True,
    help="Split(s) to write (train, val, test); repeat for several.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["jpg", "png"]),
    default="jpg",
    show_default=True,
    help="Image encoding inside the shards.",
)
@click.option("--maxcount", type=int, default=1000, show_default=True, help="Samples per shard.")
@click.option("--overwrite", is_flag=True, help="Replace existing shards of the same split in OUT.")
@click.option(
    "--shuffle/--no-shuffle",
    default=True,
    show_default=True,
    help="Write samples in a seeded random order, so a split listed class by class streams as mixed "
    "batches; --no-shuffle keeps the split's order.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --shuffle order.")
@user_errors
def shards(
    src: str,
    out: Path,
    overrides: tuple[str, ...],
    splits: tuple[str, ...],
    image_format: str,
    maxcount: int,
    overwrite: bool,
    shuffle: bool,
    seed: int,
) -> None:
    """Write a data source's split(s) as webdataset shards plus sizes.json and classnames.json.

    \b
    SRC is one of:
      a directory     class-per-subfolder images (the `folder` source)
      a YAML file     a data config (the keys of a recipe's `data:` section, or a recipe with one)
      a source name   {sources}, configured with OVERRIDES

    \b
    Examples:
      kdprompt shards ~/photos shards/photos
      kdprompt shards coop shards/dtd root=~/data dataset=dtd --split train --split test
      kdprompt shards synthetic shards/pre domain=pretrain
    """
    from kdprompt.data.from_src import data_config_from_src
    from kdprompt.data.shard_writer import write_shards

    cfg = data_config_from_src(src, overrides)
    for split in splits:
        sizes = write_shards(
            cfg.load_split(split),
            out,
            prefix=split,
            image_format=image_format,
            maxcount=maxcount,
            overwrite=overwrite,
            progress=True,
            shuffle_seed=seed if shuffle else None,
        )
        click.echo(f"{split}: {sum(sizes.values())} samples in {len(sizes)} shard(s) under {out}")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("teacher_dir", metavar="TEACHER", type=click.Path(path_type=Path))
@click.option(
    "--classes",
    "classes_file",
    required=True,
    type=click.Path(path_type=Path),
    help="Class names: a text file (one per line) or a JSON list.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory to write (default: cache/<teacher run name>-<classes file stem>).",
)
@click.option("--device", default="cpu", show_default=True, help="Device to encode the class names on.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the --out directory if it is already a text-feature cache."
)
@click.option(
    "--index",
    # kdprompt.text_features.ranking.INDEX_KINDS, spelled out so that `--help` does not import faiss.
    type=click.Choice(("auto", "flat", "ivf", "hnsw")),
    default="auto",
    show_default=True,
    help="The FAISS index: flat (exact); hnsw or ivf (approximate; efSearch or nprobe tuned to 95% "
    "recall@1, the measured recall recorded in the manifest); auto (exact below 100,000 classes; from "
    "there HNSW when it reaches 95% recall@1 and searches at least 2x faster than exact, else exact, "
    "saying why). See docs/VOCABULARY.md.",
)
@user_errors
def cache(
    teacher_dir: Path, classes_file: Path, out: Path | None, device: str, overwrite: bool, index: str
) -> None:
    """Build a text-feature cache for any class list from a trained TEACHER, without retraining.

    TEACHER is a teacher directory (runs/<name>/teacher). The cache holds the teacher's prompted class
    text features (text_features.safetensors), a FAISS index and a manifest with the teacher's
    fingerprint; students and bundles classify with it alone. An existing cache at --out is replaced
    only with --overwrite; a folder that is not a cache never is.
    """
    from kdprompt.text_features.manifest import describe_index, index_entry, read_manifest
    from kdprompt.text_features.teacher import write_cache_for_teacher

    written, count = write_cache_for_teacher(teacher_dir, classes_file, out, device, overwrite, index)
    click.echo(f"cache of {count} classes written to {written}")
    click.echo(f"index: {describe_index(index_entry(read_manifest(written)))}")
