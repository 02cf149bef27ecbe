"""Class-name lists: reading them from a file, checking them, naming a few of them in messages, and
the text form of a class name in prompts and labels.

Kept free of heavy imports: the data sources, the text-feature cache and deployed bundles read class lists.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

from kdprompt.errors import KdpromptError

SHOW_NAMES = 5  # how many names an error message lists

ClassnameForm = Literal["spaces", "verbatim"]
"""``spaces``: underscores become spaces (every reference); ``verbatim``: the name as given (teachers saved
before kdprompt recorded a form were trained and cached that way)."""
CLASSNAME_FORM: ClassnameForm = "spaces"


def prompt_classname(name: str, form: ClassnameForm = CLASSNAME_FORM) -> str:
    """The text of class ``name`` inside a prompt, and its readable label.

    Class names stay as given everywhere they identify a class (splits, caches, their sha256); this is
    the one place a name becomes text. Underscores become spaces, as every reference does before
    tokenising (PromptSRC ``trainers/promptsrc.py``, PromptKD ``trainers/promptkd.py``, CoOp
    ``trainers/zsclip.py``): open_clip's tokenizer would otherwise make ``_`` a token of its own.
    """
    return name.replace("_", " ") if form == "spaces" else name


def listing(names: list[str]) -> str:
    """Up to ``SHOW_NAMES`` quoted names, then how many more."""
    shown = ", ".join(repr(n) for n in names[:SHOW_NAMES])
    return shown + (f" ... and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else "")


def check_names(names: list[str], what: str) -> None:
    """Refuse empty, multi-line or repeated class names; ``what`` names the list in the message.

    Raises:
        KdpromptError: a bad or repeated name.
    """
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or "\n" in n or "\r" in n]
    if bad:
        raise KdpromptError(f"{what} must be non-empty single-line strings; bad: {listing(bad)}")
    check_unique(names, what)


def check_unique(names: list[str], what: str) -> None:
    """Refuse a class list that repeats a name.

    Raises:
        KdpromptError: a repeated name.
    """
    duplicates = [n for n, count in Counter(names).items() if count > 1]
    if duplicates:
        raise KdpromptError(f"{what} repeat {listing(duplicates)}; each class must appear once")


def read_classnames_file(path: Path, *, setting: str | None = None) -> list[str]:
    """Read class names from a text file (one per line) or a JSON file.

    Text: one name per line; blank lines and lines starting with ``#`` are ignored, surrounding spaces
    are stripped. JSON (a file whose first character is ``[`` or ``{``, or named ``*.json``): a list of
    strings, or an object ``{"classnames": [...]}``.

    Args:
        path: the file.
        setting: the recipe setting that named the file (e.g. ``data.classnames``), said when it is missing.

    Raises:
        KdpromptError: the file is missing, unreadable, malformed, empty or repeats a name.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (set by {setting})" if setting else ""
        raise KdpromptError(f"class names file {path} does not exist (or is not a file){where}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise KdpromptError(f"cannot read class names file {path} as UTF-8 text: {err}") from err

    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise KdpromptError(
                f"class names file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                f"{err.colno}); write a JSON list of names, or plain text with one name per line"
            ) from err
        if isinstance(data, dict):
            data = data.get("classnames")
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise KdpromptError(
                f"class names file {path} must hold a JSON list of strings or an object "
                '{"classnames": [...]}'
            )
        names = [n.strip() for n in data]
        if any(not n for n in names):
            raise KdpromptError(f"class names file {path} contains an empty name")
    else:
        lines = (line.strip() for line in text.splitlines())
        names = [line for line in lines if line and not line.startswith("#")]

    if not names:
        raise KdpromptError(f"class names file {path} lists no class names")
    check_names(names, f"the class names in {path}")
    return names
