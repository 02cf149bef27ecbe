"""Helpers shared by the command modules (kept apart from cli.py so command modules avoid import cycles)."""

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
