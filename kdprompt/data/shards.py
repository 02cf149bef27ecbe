"""The ``shards`` data source: every sample of a split's webdataset shards, read into memory.

For small labelled splits (few-shot training, evaluation); large ones are streamed by
:mod:`~kdprompt.data.shard_reader`. Layout: :mod:`~kdprompt.data.shard_format`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from kdprompt.data.classnames import read_classnames_file
from kdprompt.data.shard_format import CLASSNAMES_FILE, DECODE_ERRORS, IMAGE_KEYS
from kdprompt.data.shard_reader import decode_sample, shard_samples
from kdprompt.data.shard_urls import expand_urls, local_path
from kdprompt.data.source import SOURCES, DataSource
from kdprompt.data.types import Sample, Split
from kdprompt.errors import KdpromptError

logger = logging.getLogger(__name__)


def load_shards_split(cfg: ShardsData, split: str) -> Split:
    """Read every sample of one split's shards into memory (for small labelled splits).

    Samples carry the encoded image bytes and the shard key. Class names come from
    ``cfg.classnames``, else ``classnames.json`` beside the first shard, else the samples' json
    ``classname`` fields. Corrupt samples are skipped with a warning and counted in
    ``split.meta["corrupt"]``.

    Raises:
        KdpromptError: no pattern for ``split``, missing shards, unlabelled samples, or labels
            without a class name.
    """
    patterns = getattr(cfg, split, None)
    if not patterns:
        raise KdpromptError(f"data.{split} is not set: give a shard pattern for the {split} split")
    urls = expand_urls(patterns)

    raw: list[tuple[bytes, int, str | None, str, str | None]] = []  # image, label, caption, key, json name
    corrupt = 0
    for sample in shard_samples(urls):
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            _, label, _ = decode_sample(sample)
            meta = json.loads(sample["json"]) if "json" in sample else {}
            meta = meta if isinstance(meta, dict) else {}
        except DECODE_ERRORS as exc:
            corrupt += 1
            logger.warning("skipping corrupt sample %s in shard %s: %s", key, url, exc)
            continue
        if label < 0:
            raise KdpromptError(
                f"sample {key} in {url} has no label (no .cls member, no json 'label'); "
                f"data.{split} must point at labelled shards"
            )
        image_key = next(k for k in IMAGE_KEYS if k in sample)
        caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
        raw.append((sample[image_key], label, caption, key, meta.get("classname")))
    if corrupt:
        logger.warning("%d corrupt sample(s) skipped in the %s shards", corrupt, split)

    if cfg.classnames is not None:
        classnames = read_classnames_file(Path(cfg.classnames), setting="data.classnames")
    elif (first := local_path(urls[0])) is not None and (Path(first).parent / CLASSNAMES_FILE).is_file():
        classnames = read_classnames_file(Path(first).parent / CLASSNAMES_FILE)
    else:
        by_label: dict[int, str] = {}
        for _, label, _, _, name in raw:
            if name is not None:
                by_label.setdefault(label, name)
        n = max((label for _, label, *_ in raw), default=-1) + 1
        missing = [i for i in range(n) if i not in by_label]
        if missing:
            raise KdpromptError(
                f"no class names for label(s) {missing[:10]} of data.{split}: set data.classnames "
                f"or put {CLASSNAMES_FILE} beside the shards"
            )
        classnames = [by_label[i] for i in range(n)]

    bad = sorted({label for _, label, *_ in raw if label >= len(classnames)})
    if bad:
        raise KdpromptError(
            f"data.{split} has label(s) {bad[:10]} but only {len(classnames)} class names are known"
        )
    samples = [
        Sample(image=img, label=label, classname=classnames[label], caption=caption, key=key)
        for img, label, caption, key, _ in raw
    ]
    return Split(samples, classnames, name=split, meta={"corrupt": corrupt, "shards": len(urls)})


__all__ = ["ShardsData", "load_shards_split"]


@SOURCES.register("shards")
class ShardsData(DataSource):
    """Webdataset shards, one brace pattern (or list of patterns) per split."""

    source: Literal["shards"] = "shards"
    train: str | list[str] | None = None
    val: str | list[str] | None = None
    test: str | list[str] | None = None
    classnames: Path | None = Field(
        default=None,
        description="class names file (one per line, or JSON list); default: classnames.json beside the shards",
    )

    def load_split(self, split: str) -> Split:
        """See :func:`load_shards_split`."""
        return load_shards_split(self, split)

    def shard_urls(self, split: str) -> list[str]:
        """The split's own shards (they are read as they are, never rewritten)."""
        pattern = getattr(self, split)
        if pattern is None:
            raise KdpromptError(f"data.{split} is not set: give the shard pattern of the {split} split")
        return expand_urls(pattern)
