"""Turn any labelled source's split into webdataset shards once, keyed by its content."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from kdprompt.data.shard_format import SIZES_FILE
from kdprompt.data.shard_writer import write_shards
from kdprompt.data.sources import load_split
from kdprompt.faults import crash_point
from kdprompt.folder_lock import folder_lock, remove_stale_temporaries
from kdprompt.io import atomic_path, recover_swap

# Materialised training shards are written in this seeded order (whatever the recipe's seed, so
# several seeds of a recipe share one copy; each run's stream reshuffles shards and samples).
SHUFFLE_SEED = 0
# atomic_path's temporary of a materialised folder: ".<source>-<split>-<fingerprint>.<8 random>.tmp"
_TEMPORARY = re.compile(r"\.(?P<name>[A-Za-z0-9_.-]+-[0-9a-f]{16})\.[a-z0-9_]{8}\.tmp")


def _fingerprint(cfg, split_name: str, samples, shuffle_seed: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    h.update(split_name.encode())
    if shuffle_seed is not None:
        # The order is part of the content: a folder written in split order is never taken for a shuffled one.
        h.update(f"order=shuffled:{shuffle_seed}\n".encode())
    for s in samples:
        size = Path(s.image).stat().st_size if isinstance(s.image, str) else len(s.image)
        h.update(f"{s.key}|{s.label}|{s.caption}|{size}\n".encode())
    return h.hexdigest()[:16]


def shards_for(
    cfg,
    split: str,
    shards_dir: Path,
    maxcount: int = 1000,
    image_format: str | None = None,
    shuffle_seed: int | None = SHUFFLE_SEED,
) -> list[str]:
    """Shard URLs holding ``split`` of the source ``cfg``: the shards themselves for a ``shards`` source,
    else shards written (once, under ``shards_dir/<source>-<split>-<fingerprint>/``) from the split, in
    the seeded order ``shuffle_seed`` (None: the split's order); the fingerprint covers the order.

    The folder is written whole beside its final name and renamed into place when complete (it is
    complete when it holds ``sizes.json``), under a lock, so concurrent runs write it once. A folder
    without ``sizes.json`` (left by an older version killed mid-write) is rebuilt; temporaries of
    killed writes are removed.
    """
    existing = cfg.shard_urls(split)
    if existing is not None:
        return existing
    image_format = image_format or cfg.shard_image_format
    data = load_split(cfg, split)
    out = Path(shards_dir) / f"{cfg.source}-{split}-{_fingerprint(cfg, split, data.samples, shuffle_seed)}"
    if not (out / SIZES_FILE).is_file():
        with folder_lock(out):
            recover_swap(out)  # a rebuild killed between its two renames (safe: we hold the lock)
            if not (out / SIZES_FILE).is_file():  # else another process wrote it while we waited
                remove_stale_temporaries(out)
                with atomic_path(out) as tmp:
                    write_shards(
                        data,
                        tmp,
                        prefix=split,
                        image_format=image_format,
                        maxcount=maxcount,
                        shuffle_seed=shuffle_seed,
                    )
                    crash_point("shards.folder_written")
    _sweep_abandoned(Path(shards_dir))
    return sorted(str(p) for p in out.glob(f"{split}-*.tar"))


def _sweep_abandoned(shards_dir: Path) -> None:
    """Remove the temporaries of killed writes that no live process is finishing (of this folder, or of
    one whose recipe has since changed and is never written again)."""
    for path in shards_dir.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None:
            continue
        with folder_lock(shards_dir / match["name"], blocking=False) as held:
            if held:
                remove_stale_temporaries(shards_dir / match["name"])
