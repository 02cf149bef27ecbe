"""The teacher's class text features, cached on disk: what students and bundles classify with.

:mod:`~kdprompt.text_features.manifest` holds the format and its checks,
:mod:`~kdprompt.text_features.index` the FAISS index, :mod:`~kdprompt.text_features.store` the
:class:`TextCache` with :func:`build_cache` and :func:`load_cache`, and
:mod:`~kdprompt.text_features.teacher` encodes class names with a prompted teacher (imported from there:
it needs the model code).
"""

from __future__ import annotations

from kdprompt.data.classnames import read_classnames_file
from kdprompt.text_features.manifest import (
    CACHE_KIND,
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    TENSOR_KEY,
    classnames_sha256,
)
from kdprompt.text_features.store import TextCache, build_cache, load_cache

__all__ = [
    "CACHE_KIND",
    "FEATURES_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "TENSOR_KEY",
    "TextCache",
    "build_cache",
    "classnames_sha256",
    "load_cache",
    "read_classnames_file",
]
