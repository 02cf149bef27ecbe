"""What the command modules share: context settings, error handling, devices and common options.

Imports nothing from the command modules, so each of them can import it without a cycle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from kdprompt.errors import KdpromptError

# Every command: -h as well as --help, and help text wrapped at 100 columns.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Where a help text says this, `--help` shows the registered data-source names (see SourcesHelpCommand).
SOURCES_PLACEHOLDER = "{sources}"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`KdpromptError` as one message and exit 2, instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdpromptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def echo_main(text: str) -> None:
    """Echo on the main process only (commands may run under ``accelerate launch``)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(text)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other value must name a usable device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise KdpromptError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise KdpromptError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


class SourcesHelpCommand(click.Command):
    """A command whose help text lists the registered data sources where it says ``{sources}``.

    The names are looked up (importing the sources) only when this command's own help is shown, so
    ``kdprompt --help`` stays fast.
    """

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from kdprompt.data.sources import source_names

        written = self.help
        if written:
            self.help = written.replace(SOURCES_PLACEHOLDER, "|".join(source_names()))
        try:
            super().format_help_text(ctx, formatter)
        finally:
            self.help = written


def recipe_arguments(dry_run: bool = True) -> Callable[[Any], Any]:
    """RECIPE and OVERRIDES arguments (plus ``--dry-run`` unless ``dry_run`` is false)."""

    def decorate(fn: Any) -> Any:
        if dry_run:
            fn = click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")(fn)
        fn = click.argument("overrides", nargs=-1)(fn)
        return click.argument("recipe")(fn)

    return decorate


def recipe_command(fn: Callable[..., Any]) -> click.Command:
    """A training command: RECIPE, OVERRIDES and ``--dry-run``; the function's docstring is its help."""
    return click.command(context_settings=CONTEXT_SETTINGS)(recipe_arguments()(user_errors(fn)))


def runtime_options(fn: Any) -> Any:
    """``--backend`` and ``--device``: how a command runs a bundle's image encoder."""
    fn = click.option(
        "--device", default="cpu", show_default=True, help="torch backend: cpu, cuda, cuda:N or auto."
    )(fn)
    return click.option(
        "--backend",
        type=click.Choice(["torch", "onnx"]),
        default="torch",
        show_default=True,
        help="Run the image encoder with torch, or its ONNX graph on onnxruntime (CPU; bundles exported with --onnx).",
    )(fn)


def batching_options(fn: Any) -> Any:
    """Options shared by ``serve`` and ``bench serve``: how the bundle runs and batches."""
    options = [
        click.option(
            "--max-batch",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Images per model call at most (concurrent requests share calls).",
        ),
        click.option(
            "--max-wait-ms",
            type=click.FloatRange(min=0),
            default=5.0,
            show_default=True,
            help="How long an image waits for others to share its model call.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return runtime_options(fn)
