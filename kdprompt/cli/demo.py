"""``kdprompt demo``: the pipeline on the built-in synthetic world, offline."""

from __future__ import annotations

from pathlib import Path

import click

from kdprompt.cli.options import CONTEXT_SETTINGS, user_errors


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Where run directories go.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cache"),
    show_default=True,
    help="Where the synthetic world, shards and pre-trained tiny CLIPs are kept.",
)
@click.option("--quick", is_flag=True, help="A much shorter run (smoke test), not for the reported figures.")
@user_errors
def demo(out: Path, cache_dir: Path, quick: bool) -> None:
    """Run the pipeline on the embedded default (synthetic world, tiny CLIPs), offline.

    Materialises the synthetic world, pre-trains the tiny teacher-size and student-size CLIPs (reused
    from the cache dir when already there), trains the PromptSRC and MaPLe teachers on 16-shot base
    classes (caching their class text features), and prints zero-shot and base / novel / HM tables.
    """
    from kdprompt.apps.demo import run_demo

    run_demo(out=out, cache_dir=cache_dir, quick=quick)
