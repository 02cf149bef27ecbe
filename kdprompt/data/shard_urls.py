"""Where shards are and how many samples they hold.

Brace patterns are expanded and checked, local paths told from remote URLs; sample counts come from
``sizes.json`` (validated and spot-checked), img2dataset's per-shard stats, or the tar headers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from braceexpand import UnbalancedBracesError, braceexpand  # a dependency of webdataset
from webdataset.tariterators import base_plus_ext

from kdprompt.data.shard_format import END_OF_ARCHIVE, META_MEMBER, SHOW_SHARDS, SIZES_FILE, STATS_SUFFIX
from kdprompt.errors import KdpromptError

logger = logging.getLogger(__name__)

CROSS_CHECKED = 8
"""Listed counts of this many shards (spread over the list, plus any listed as 0) are checked against
their tar headers; counting every shard of a large dataset at each start would cost minutes."""
_TAR_BLOCK = 512

_REMOTE_SCHEMES = ("pipe", "http", "https", "s3", "gs", "ais", "hf")


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL, or None for pipe:/http(s)/s3/... URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme in _REMOTE_SCHEMES or (len(parsed.scheme) > 1 and "://" in url):
        return None
    return os.path.expanduser(url)


def expand_urls(patterns: str | list[str]) -> list[str]:
    """Brace-expand shard patterns and check that local shards exist.

    Args:
        patterns: a pattern such as ``"data/train-{000000..000009}.tar"`` or a list of them.
            ``pipe:``, ``http(s)://`` and ``s3://`` URLs pass through unchecked.

    Returns:
        The expanded URLs in order, duplicates removed.

    Raises:
        KdpromptError: no URL at all, unbalanced braces, or local shards that do not exist (listing
            the first few).
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        try:
            expanded = list(braceexpand(str(pattern)))
        except UnbalancedBracesError:
            raise KdpromptError(
                f"shard pattern {str(pattern)!r} has unbalanced braces: close every '{{' with a '}}' "
                "(e.g. shards/train-{000000..000009}.tar)"
            ) from None
        for url in expanded:
            if url not in urls:
                urls.append(url)
    if not urls:
        raise KdpromptError("no shard pattern given; set data.train/val/test to a shard pattern")
    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:SHOW_SHARDS])
        more = f" (and {len(missing) - SHOW_SHARDS} more)" if len(missing) > SHOW_SHARDS else ""
        raise KdpromptError(
            f"{len(missing)} of {len(urls)} shard(s) not found: {shown}{more}; check the pattern, "
            "or create shards with `kdprompt shards SRC OUT`"
        )
    return [u if local_path(u) is None else os.path.expanduser(u) for u in urls]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_sizes_file(path: str | os.PathLike) -> dict[str, int]:
    """A ``sizes.json``, validated: an object mapping shard file names to sample counts (integers >= 0).

    Raises:
        KdpromptError: unreadable, not an object, or a count that is not a whole number >= 0; the
            message names the file, the shard and the value.
    """
    fix = f"delete {path} to have the shards counted, or fix it"
    try:
        sizes = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KdpromptError(f"cannot read {path}: {exc}; {fix}") from None
    if not isinstance(sizes, dict):
        raise KdpromptError(
            f"{path} must map shard file names to sample counts, but holds a {type(sizes).__name__}; {fix}"
        )
    for name, count in sizes.items():
        if not _is_count(count):
            raise KdpromptError(
                f"{path}: shard {name} has {count!r} samples, which is not a count (a whole number >= 0); {fix}"
            )
    return sizes


def _img2dataset_count(shard: str) -> tuple[int, str] | None:
    """``successes`` of img2dataset's ``<shard>_stats.json`` beside ``shard`` (with that file's path)."""
    stats = shard[: -len(".tar")] + STATS_SUFFIX if shard.endswith(".tar") else None
    if stats is None or not os.path.isfile(stats):
        return None
    try:
        with open(stats, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise KdpromptError(f"cannot read {stats}: {exc}; delete it to have the shard counted") from None
    successes = record.get("successes") if isinstance(record, dict) else None
    if not _is_count(successes):
        raise KdpromptError(
            f"{stats}: shard {os.path.basename(shard)} has {successes!r} successes, which is not a count "
            "(a whole number >= 0); delete it to have the shard counted"
        )
    return successes, stats


def _whole(path: str) -> bool:
    """Whether the tar at ``path`` ends with its end-of-archive blocks (a cut one does not)."""
    size = os.path.getsize(path)
    if size % _TAR_BLOCK or size < len(END_OF_ARCHIVE):
        return False
    with open(path, "rb") as f:
        f.seek(size - len(END_OF_ARCHIVE))
        return f.read() == END_OF_ARCHIVE


def count_tar_samples(path: str | os.PathLike) -> tuple[int, bool]:
    """Samples in a local tar shard, counted from its member headers alone (data is skipped, not read).

    Members are grouped by key the way webdataset groups them (the name up to the first dot of its
    base name; consecutive members with one key form a sample).

    Returns:
        ``(samples, whole)``: ``whole`` is False for a tar cut short or unreadable, whose count then
        covers the samples up to the cut (the cut one included).
    """
    path = os.fspath(path)
    count, key = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            # A compressed tar cut short fails to decompress instead (a read error below).
            plain = isinstance(tar.fileobj, io.BufferedReader)
            for info in tar:
                if not info.isreg() or META_MEMBER.match(info.name):
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is not None and prefix != key:
                    count, key = count + 1, prefix
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return count, False
    return count, not plain or _whole(path)


def _spread(items: list[str], k: int) -> list[str]:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def read_sizes(urls: list[str]) -> int | None:
    """Total number of samples in ``urls``; None when any shard is remote.

    A local shard's count is taken from the ``sizes.json`` beside it, else from img2dataset's
    ``<shard>_stats.json`` (its ``successes``), else counted from the tar's headers, so shards
    written by img2dataset or by hand are read as they are. Listed counts are validated, and
    :data:`CROSS_CHECKED` shards spread over the list (and every one listed as 0) are counted to
    check them.

    Raises:
        KdpromptError: a ``sizes.json`` or stats file that is unreadable, holds a value that is not
            a count, or disagrees with the shard it describes (the message names both, and the value).
    """
    paths: list[str] = []
    for url in urls:
        path = local_path(url)
        if path is None:
            return None
        paths.append(os.path.abspath(path))
    folders: dict[str, dict[str, int] | None] = {}
    listed: dict[str, tuple[int, str]] = {}  # shard -> (count, the file that lists it)
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in folders:
            sizes_path = os.path.join(folder, SIZES_FILE)
            folders[folder] = load_sizes_file(sizes_path) if os.path.isfile(sizes_path) else None
        sizes = folders[folder]
        if sizes is not None and name in sizes:
            listed[path] = (sizes[name], os.path.join(folder, SIZES_FILE))
        elif (stats := _img2dataset_count(path)) is not None:
            listed[path] = stats
    for path, (count, source) in listed.items():
        # A tar member takes at least one 512-byte header block: a larger count is a lie.
        if count > os.path.getsize(path) // _TAR_BLOCK:
            raise KdpromptError(
                f"{source}: shard {os.path.basename(path)} is listed with {count} samples, more than its "
                f"{os.path.getsize(path)} bytes can hold; delete it to have the shards counted, or fix it"
            )
    checked = _spread(list(listed), CROSS_CHECKED) + [p for p, (n, _) in listed.items() if n == 0]
    for path in dict.fromkeys(checked):
        count, source = listed[path]
        real, whole = count_tar_samples(path)
        if whole and real != count:
            raise KdpromptError(
                f"{source}: shard {os.path.basename(path)} is listed with {count} samples but holds {real}; "
                "delete it to have the shards counted, or rewrite the shards with `kdprompt shards`"
            )
    unlisted = [p for p in paths if p not in listed]
    if unlisted:
        logger.info(
            "counting the samples of %d shard(s) from their tar headers (no sizes.json)", len(unlisted)
        )
    return sum(n for n, _ in listed.values()) + sum(count_tar_samples(p)[0] for p in unlisted)


__all__ = ["count_tar_samples", "expand_urls", "load_sizes_file", "local_path", "read_sizes"]
