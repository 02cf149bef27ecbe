"""Where shards are: brace patterns expanded and checked, local paths told from remote URLs, sizes.json."""

from __future__ import annotations

import json
import os
from urllib.parse import urlparse

from braceexpand import braceexpand  # a dependency of webdataset

from kdprompt.data.shard_format import SHOW_SHARDS, SIZES_FILE
from kdprompt.errors import KdpromptError

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
        KdpromptError: no URL at all, or local shards that do not exist (listing the first few).
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(str(pattern)):
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


def read_sizes(urls: list[str]) -> int | None:
    """Total number of samples in ``urls`` from the ``sizes.json`` beside each local shard.

    Returns:
        The total, or None when any shard is remote or not listed.
    """
    cache: dict[str, dict] = {}
    total = 0
    for url in urls:
        path = local_path(url)
        if path is None:
            return None
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in cache:
            sizes_path = os.path.join(folder, SIZES_FILE)
            try:
                with open(sizes_path, encoding="utf-8") as f:
                    cache[folder] = json.load(f)
            except (OSError, ValueError):
                cache[folder] = {}
        if name not in cache[folder]:
            return None
        total += int(cache[folder][name])
    return total


__all__ = ["expand_urls", "local_path", "read_sizes"]
