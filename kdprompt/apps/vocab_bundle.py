"""A student bundle over a synthetic class vocabulary of any size: serving load-tested at catalogue scale.

The student and its teacher are real (a distilled run); only the class text features are synthetic
vectors of the teacher's width (``random`` or ``clustered``, as ``kdprompt bench vocab`` makes them), so
that ``kdprompt bench serve`` measures what a 1M-class catalogue costs without encoding a million names::

    python -m kdprompt.apps.vocab_bundle runs/demo-student cache/vocab-1m bundles/vocab-1m \\
        --classes 1000000 --vocabulary clustered
    kdprompt bench serve bundles/vocab-1m --requests 300 --concurrency 8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdprompt.cli.options import user_errors


def vocabulary_bundle(
    student_run: Path,
    cache_dir: Path,
    out: Path,
    *,
    classes: int,
    vocabulary: str = "clustered",
    index: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Write a cache of ``classes`` synthetic class features for ``student_run``'s teacher, and its bundle.

    Args:
        student_run: a distilled student run (``runs/<name>`` or its ``student`` folder).
        cache_dir: where the synthetic cache goes (replaced if it is a cache).
        out: the bundle directory (replaced if it is a bundle).
        classes: vocabulary size.
        vocabulary: ``random`` unit vectors or ``clustered`` ones (about 100 per centre).
        index: the cache's FAISS index (``auto``, ``flat``, ``hnsw``, ``ivf``).
        seed: the vectors' seed.

    Returns:
        The bundle's manifest.
    """
    import torch

    from kdprompt.apps.bench_vocab import clustered_vocabulary, random_vocabulary
    from kdprompt.deploy.export import export_bundle, resolve_student_dir
    from kdprompt.models.student import load_student
    from kdprompt.text_features.store import build_cache

    _, cache = load_student(resolve_student_dir(Path(student_run)))
    dim = cache.embed_dim
    if vocabulary == "clustered":
        vectors = clustered_vocabulary(classes, dim, clusters=max(1, classes // 100), seed=seed)
    else:
        vectors = random_vocabulary(classes, dim, seed=seed)
    build_cache(
        torch.from_numpy(vectors),
        [f"class {i:07d}" for i in range(classes)],
        Path(cache_dir),
        teacher_fingerprint=cache.teacher_fingerprint,
        logit_scale=cache.logit_scale,
        provenance={"synthetic_vocabulary": vocabulary, "seed": seed},
        index=index,
    )
    return export_bundle(Path(student_run), Path(out), overwrite=True, cache_dir=Path(cache_dir))


@click.command()
@click.argument("student_run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("cache_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--classes", type=click.IntRange(1), default=1_000_000, show_default=True)
@click.option(
    "--vocabulary", type=click.Choice(("clustered", "random")), default="clustered", show_default=True
)
@click.option(
    "--index", type=click.Choice(("auto", "flat", "hnsw", "ivf")), default="auto", show_default=True
)
@user_errors
def main(student_run: Path, cache_dir: Path, out: Path, classes: int, vocabulary: str, index: str) -> None:
    """Write a synthetic-vocabulary cache for STUDENT_RUN's teacher to CACHE_DIR and its bundle to OUT."""
    manifest = vocabulary_bundle(
        student_run, cache_dir, out, classes=classes, vocabulary=vocabulary, index=index
    )
    click.echo(
        f"wrote {out}: {manifest['classes']['num_classes']} classes, index {manifest['cache']['index']}"
    )


if __name__ == "__main__":
    main()
