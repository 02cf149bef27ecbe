"""Turn any labelled source's split into webdataset shards once, keyed by its content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kdprompt.data.shard_writer import write_shards
from kdprompt.data.sources import load_split

# Materialised training shards are written in this seeded order (whatever the recipe's seed, so
# several seeds of a recipe share one copy; each run's stream reshuffles shards and samples).
SHUFFLE_SEED = 0


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
    the seeded order ``shuffle_seed`` (None: the split's order); the fingerprint covers the order."""
    existing = cfg.shard_urls(split)
    if existing is not None:
        return existing
    image_format = image_format or cfg.shard_image_format
    data = load_split(cfg, split)
    out = Path(shards_dir) / f"{cfg.source}-{split}-{_fingerprint(cfg, split, data.samples, shuffle_seed)}"
    if not (out / "sizes.json").is_file():
        write_shards(
            data, out, prefix=split, image_format=image_format, maxcount=maxcount, shuffle_seed=shuffle_seed
        )
    return sorted(str(p) for p in out.glob(f"{split}-*.tar"))
