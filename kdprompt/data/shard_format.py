"""The webdataset shard layout that :mod:`~kdprompt.data.shard_writer` writes and everything else reads.

::

    out/
      train-000000.tar   members <key>.jpg|png, <key>.cls, <key>.txt (captioned samples), <key>.json
      train-000001.tar
      sizes.json         {"train-000000.tar": 1000, ...}   (all prefixes in the folder)
      classnames.json    ["class a", "class b", ...]

The reader also accepts img2dataset-style shards (``<key>.jpg``, ``<key>.txt``, ``<key>.json``, no
``cls``): labels then come from ``json["label"]`` or are -1 (unlabelled). Without ``sizes.json``, a
shard's sample count comes from img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar`` (its
``successes``), else from the tar's headers.
"""

from __future__ import annotations

import re

from PIL import Image, UnidentifiedImageError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"
CLASSNAMES_FILE = "classnames.json"
STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard stats: NNNNN.tar -> NNNNN_stats.json
END_OF_ARCHIVE = bytes(1024)  # the two zero blocks that end every whole tar; a cut one lacks them
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # tar members webdataset skips (not part of any sample)
SHOW_SHARDS = 5  # how many shard names an error message lists
# What a bad member can raise while decoding; anything else is a bug and propagates.
DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    KeyError,
)

__all__ = [
    "CLASSNAMES_FILE",
    "DECODE_ERRORS",
    "END_OF_ARCHIVE",
    "IMAGE_KEYS",
    "META_MEMBER",
    "SHOW_SHARDS",
    "SIZES_FILE",
    "STATS_SUFFIX",
]
