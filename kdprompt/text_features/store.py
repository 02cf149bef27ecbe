"""The teacher's class text-feature cache: what distillation and deployment read instead of a text encoder.

A cache is a directory::

    text_features.safetensors   one tensor "text_features" (C x D, rows L2-normalised); its metadata
                                carries the manifest as a JSON string under "manifest"
    index.faiss                 a FAISS inner-product index over the float32 features: exact
                                (IndexFlatIP) by default, HNSW (IndexHNSWFlat) for large vocabularies
                                where it measures faster, or HNSW or IVF (IndexIVFFlat) when asked
                                (see kdprompt.text_features.ranking)
    manifest.json               format version, teacher fingerprint, class names and their sha256,
                                embed dim, logit scale, dtype, features sha256, provenance, the
                                index (kind; for HNSW m, efSearch, for IVF nlist, nprobe, and the
                                recall measured at build time), and (optional) the exact prompt text
                                encoded for each class

Loading needs only torch, safetensors, faiss and json: no teacher, no model code. A cache built for a
different teacher or class list, or edited after it was built, is refused with a message that says
what was expected, what was found and how to rebuild it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdprompt.data.classnames import check_names, check_unique, listing
from kdprompt.errors import KdpromptError
from kdprompt.faults import crash_point
from kdprompt.io import atomic_path, recover_swap
from kdprompt.text_features.index import flat_index, index_kind, planned_index, read_index
from kdprompt.text_features.manifest import (
    CACHE_KIND,
    DTYPES,
    FEATURES_FILE,
    FLAT_ENTRY,
    INDEX_FILE,
    INDEX_KEY,
    MANIFEST_FILE,
    METADATA_KEY,
    TENSOR_KEY,
    check_expected,
    check_features,
    classnames_sha256,
    dtype_name,
    index_entry,
    make_manifest,
    read_manifest,
    rebuild_hint,
    tensor_sha256,
)
from kdprompt.text_features.ranking import plan_index

__all__ = ["TextCache", "build_cache", "copy_cache", "load_cache"]


# ------------------------------------------------------------------------------------------- the cache


@dataclass(eq=False)
class TextCache:
    """Class text features with their manifest and a FAISS index (read from ``path`` on first use).

    Attributes:
        features: C x D float32 tensor, rows L2-normalised, in class-name order.
        classnames: the C class names.
        manifest: the manifest (see the module docstring).
        path: the cache directory, or None for an in-memory cache (e.g. from ``subset``).
    """

    features: torch.Tensor
    classnames: list[str]
    manifest: dict[str, Any]
    path: Path | None = None
    _index: Any = field(default=None, repr=False)
    _on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def teacher_fingerprint(self) -> str:
        """The fingerprint of the teacher that produced the features."""
        return str(self.manifest["teacher_fingerprint"])

    @property
    def logit_scale(self) -> float:
        """The teacher's logit scale (already exponentiated)."""
        return float(self.manifest["logit_scale"])

    @property
    def embed_dim(self) -> int:
        """The feature dimension D."""
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        """The number of classes C."""
        return int(self.features.shape[0])

    @property
    def index(self) -> Any:
        """The FAISS index over the features, read on first use.

        ``index.faiss`` as the manifest describes it (flat, HNSW with its ``efSearch`` or IVF with its
        ``nprobe``); for an in-memory cache, an exact index built here.
        """
        if self._index is None:
            if self.path is not None:
                self._index = read_index(self.path, self.features, self.manifest)
            else:
                self._index = flat_index(self.features)
        return self._index

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """``logit_scale * normalize(image_features) @ features.T`` as a torch matmul (differentiable).

        Args:
            image_features: N x D (or any ... x D) image embeddings, on any device and dtype.

        Returns:
            ... x C logits on the device and dtype of ``image_features``.
        """
        self._check_dim(image_features.shape[-1], "image features")
        key = (image_features.device, image_features.dtype)
        # Keep one copy per device/dtype: a training step should not pay a host-to-device copy.
        text = self._on_device.get(key)
        if text is None:
            text = self._on_device[key] = self.features.to(device=key[0], dtype=key[1])
        return self.logit_scale * F.normalize(image_features, dim=-1) @ text.T

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The top-``k`` classes of each query by cosine similarity, through FAISS.

        Args:
            queries: N x D (or one D-vector) embeddings; they need not be normalised.
            k: how many classes per query (at most C are returned).

        Returns:
            ``(scores, indices)``: N x k float32 cosine similarities, best first, and int64 class indices.
            Through an HNSW or IVF index they are approximate (see the manifest's ``index`` recall), and a
            query may get fewer than ``k`` classes: the rest have index -1.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        # A copy: normalize_L2 works in place and must not touch the caller's array.
        x = np.array(queries, dtype=np.float32, copy=True, order="C")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"queries must be N x D, got shape {tuple(x.shape)}")
        self._check_dim(x.shape[1], "queries")
        faiss.normalize_L2(x)
        return self.index.search(x, min(k, self.num_classes))

    def subset(self, classnames: list[str]) -> TextCache:
        """An in-memory cache of the given classes, rows in the given order.

        Raises:
            KdpromptError: a name is not in this cache, or a name is repeated.
        """
        names = list(classnames)
        position = {name: i for i, name in enumerate(self.classnames)}
        unknown = [n for n in names if n not in position]
        if unknown:
            raise KdpromptError(
                f"{len(unknown)} class(es) are not in the cache {self._where()}: {listing(unknown)}; "
                f"it holds {self.num_classes} classes. Build a cache for them with "
                "`kdprompt cache TEACHER --classes FILE`"
            )
        check_unique(names, "the requested classes")
        rows = torch.tensor([position[n] for n in names], dtype=torch.long)
        features = self.features[rows].clone()
        manifest = dict(self.manifest)
        stored = features.to(DTYPES[manifest["dtype"]])
        if "prompts" in manifest:
            manifest["prompts"] = [manifest["prompts"][position[n]] for n in names]
        manifest.update(
            classnames=names,
            classnames_sha256=classnames_sha256(names),
            num_classes=len(names),
            features_sha256=tensor_sha256(stored),
            provenance={**(manifest.get("provenance") or {}), "subset_of": self._where()},
        )
        manifest[INDEX_KEY] = dict(FLAT_ENTRY)  # the subset's index is built in memory, exact
        return TextCache(features=features, classnames=names, manifest=manifest, path=None)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"

    def _check_dim(self, dim: int, what: str) -> None:
        if dim != self.embed_dim:
            raise KdpromptError(
                f"{what} have dimension {dim} but the text-feature cache {self._where()} has embed_dim "
                f"{self.embed_dim}: the cache was built for a model with another embedding width"
            )


# --------------------------------------------------------------------------------------------- build


def build_cache(
    features: torch.Tensor,
    classnames: list[str],
    out_dir: Path,
    *,
    teacher_fingerprint: str,
    logit_scale: float,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    prompts: list[str] | None = None,
    overwrite: bool = True,
    index: str = "auto",
) -> TextCache:
    """Normalise and write a text-feature cache directory atomically.

    The three files are written into a temporary directory beside ``out_dir`` which then replaces
    ``out_dir`` in one move: a crash never leaves a half cache, and an existing cache is replaced only
    once the new one is complete. Only a cache (its manifest's ``kind``) is ever replaced.

    Args:
        features: C x D class text features (any float dtype, any device); rows are L2-normalised here.
        classnames: the C class names, in row order (unique, non-empty, no newlines).
        out_dir: the cache directory to create or replace.
        teacher_fingerprint: the fingerprint of the teacher that produced ``features``.
        logit_scale: the teacher's logit scale, already exponentiated.
        provenance: free JSON-serialisable facts to record (teacher path, model spec, method, ...).
        dtype: storage dtype of the features file (float32, float16 or bfloat16).
        prompts: the exact text encoded for each class, in row order (recorded in the manifest).
        overwrite: replace a cache already at ``out_dir`` (False: refuse it).
        index: the FAISS index to build: ``auto`` (exact below
            :data:`~kdprompt.text_features.ranking.APPROX_MIN_CLASSES` classes; from there HNSW if it
            reaches the recall target and searches at least
            :data:`~kdprompt.text_features.ranking.MIN_APPROX_SPEEDUP` times faster than exact, else
            exact), ``flat``, ``hnsw`` or ``ivf`` (``efSearch`` or ``nprobe`` tuned to a recall target,
            the figures recorded in the manifest).

    Returns:
        The cache, as ``load_cache`` would return it.

    Raises:
        KdpromptError: invalid features, class names or arguments, ``out_dir`` holds something that
            is not a cache, or a cache and not ``overwrite``.
    """
    out_dir = Path(out_dir)
    dtype_name(dtype)  # refuse an unsupported dtype or index kind before any other work
    plan_index(1, index)
    features = torch.as_tensor(features)
    names = list(classnames)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise KdpromptError(
            f"text features must be a non-empty C x D matrix, got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise KdpromptError(f"text features must be floating point, got {features.dtype}")
    if features.shape[0] != len(names):
        raise KdpromptError(
            f"text features have {features.shape[0]} rows but {len(names)} class names were given: "
            "there must be one row per class"
        )
    check_names(names, "the class names")
    if prompts is not None and len(prompts) != len(names):
        raise KdpromptError(f"{len(prompts)} prompts were given for {len(names)} class names: one per class")
    if not isinstance(teacher_fingerprint, str) or not teacher_fingerprint:
        raise KdpromptError("a text-feature cache needs the teacher's fingerprint (a non-empty string)")
    if not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
        raise KdpromptError(f"logit_scale must be a finite positive number, got {logit_scale}")

    # Normalise in float64 so the stored rows are as close to unit length as the dtype allows.
    wide = features.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(wide).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise KdpromptError(
            f"text features are not finite (NaN or inf) for {listing([names[i] for i in bad])}"
        )
    norms = wide.norm(dim=1, keepdim=True)
    zero = (norms.flatten() == 0).nonzero().flatten().tolist()
    if zero:
        raise KdpromptError(
            f"text features are all zero (cannot be normalised) for {listing([names[i] for i in zero])}"
        )
    stored = (wide / norms).to(dtype).contiguous()
    loaded = stored.float()

    _manifest_json({"provenance": provenance})  # refused before the (maybe slow) index is built
    recover_swap(out_dir)
    check_replaceable(out_dir, overwrite)
    # The index holds exactly the float32 rows the cache loads, so search and logits rank alike.
    built, entry = planned_index(loaded, index)
    manifest = make_manifest(
        stored,
        names,
        teacher_fingerprint=teacher_fingerprint,
        logit_scale=logit_scale,
        provenance=provenance,
        prompts=None if prompts is None else list(prompts),
        index=entry,
    )
    return _write_cache(out_dir, stored, manifest, built)


def _write_cache(out_dir: Path, stored: torch.Tensor, manifest: dict[str, Any], index: Any) -> TextCache:
    """Write the three files of a cache into a temporary directory, then move it to ``out_dir``."""
    manifest_json = _manifest_json(manifest)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({TENSOR_KEY: stored}, str(tmp / FEATURES_FILE), metadata={METADATA_KEY: manifest_json})
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        crash_point("cache.written")  # complete, not yet renamed into place
    names = list(manifest["classnames"])
    return TextCache(features=stored.float(), classnames=names, manifest=manifest, path=out_dir, _index=index)


def _manifest_json(manifest: dict[str, Any]) -> str:
    """The manifest as the features file's metadata stores it (compact, sorted keys)."""
    try:
        return json.dumps(manifest, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise KdpromptError(f"cache provenance must be JSON-serialisable: {err}") from err


def copy_cache(cache: TextCache, out_dir: Path, index: str = "auto") -> TextCache:
    """Write the on-disk ``cache`` to the new directory ``out_dir`` with the index ``index`` asks for.

    ``flat``, ``hnsw`` or ``ivf``: the cache's own index when it is that kind, else a new one (the
    features and their hashes are unchanged; the manifest records the new index). ``auto``: the index the
    cache was built with; a cache from before kdprompt recorded its index gets the one ``auto`` plans for
    its size.

    Raises:
        KdpromptError: an unknown index kind, or an in-memory cache.
    """
    if cache.path is None:
        raise KdpromptError("an in-memory text-feature cache cannot be copied; build it with build_cache")
    recorded = INDEX_KEY in cache.manifest
    want = index_entry(cache.manifest)["kind"] if index == "auto" and recorded else index
    if plan_index(cache.num_classes, want).kind == index_kind(cache.index):
        shutil.copytree(cache.path, out_dir)  # byte for byte: checked when the cache was loaded
        return TextCache(cache.features, list(cache.classnames), cache.manifest, Path(out_dir))
    stored = cache.features.to(DTYPES[cache.manifest["dtype"]]).contiguous()
    if tensor_sha256(stored) != cache.manifest["features_sha256"]:  # a widened dtype narrows back exactly
        raise KdpromptError(f"the features of {cache.path} changed in memory; reload the cache")
    built, entry = planned_index(cache.features, want)
    return _write_cache(Path(out_dir), stored, {**cache.manifest, INDEX_KEY: entry}, built)


def is_cache_dir(path: Path) -> bool:
    """Whether ``path`` holds a manifest marked as a text-feature cache (any version): what kdprompt wrote."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == CACHE_KIND


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a cache, and a cache without ``overwrite``.

    The atomic move deletes whatever ``out_dir`` held, so a folder that merely has a ``manifest.json``
    (a bundle, someone's project) is never taken for a cache.
    """
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise KdpromptError(
            f"cannot write a text-feature cache to {out_dir}: it exists and is not a directory"
        )
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not is_cache_dir(out_dir):
        raise KdpromptError(
            f"cannot write a text-feature cache to {out_dir}: it is a non-empty directory that is not a "
            f"cache (its {MANIFEST_FILE} does not say kind {CACHE_KIND!r}) and would be replaced, even with "
            "--overwrite; choose another --out directory"
        )
    if not overwrite:
        raise KdpromptError(
            f"{out_dir} already holds a text-feature cache; choose another --out or pass --overwrite to "
            "replace it"
        )


# ---------------------------------------------------------------------------------------------- load


def load_cache(
    path: Path,
    *,
    expect_fingerprint: str | None = None,
    expect_classnames: list[str] | None = None,
    load_index: bool = True,
) -> TextCache:
    """Read and verify a text-feature cache directory.

    Args:
        path: the cache directory.
        expect_fingerprint: refuse a cache built for another teacher.
        expect_classnames: refuse a cache for another class list (or another order).
        load_index: keep ``index.faiss`` in memory now; with False it is still read and checked here
            (a damaged index is refused when the cache is opened, not at export), then dropped and read
            again on first ``index`` use (training only needs the features).

    Returns:
        The cache.

    Raises:
        KdpromptError: a missing file, an unsupported format, a manifest that disagrees with the
            features file, edited features, a stale index, or a fingerprint / class-list mismatch.
    """
    path = Path(path)
    # A rebuild killed between its two renames left the previous cache aside as .NAME.old.
    recover_swap(path)
    if not path.is_dir():
        raise KdpromptError(f"no text-feature cache at {path} (not a directory); {rebuild_hint(path)}")
    if not (path / MANIFEST_FILE).is_file():
        raise KdpromptError(
            f"text-feature cache {path} is incomplete: {MANIFEST_FILE} is missing; {rebuild_hint(path)}"
        )
    manifest = read_manifest(path)
    hint = rebuild_hint(path, manifest)
    for name in (FEATURES_FILE, INDEX_FILE):
        if not (path / name).is_file():
            raise KdpromptError(f"text-feature cache {path} is incomplete: {name} is missing; {hint}")
    try:
        with safe_open(str(path / FEATURES_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
            if TENSOR_KEY not in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raise KdpromptError(f"{path / FEATURES_FILE} holds no {TENSOR_KEY!r} tensor; {hint}")
            stored = f.get_tensor(TENSOR_KEY)
    except SafetensorError as err:
        raise KdpromptError(
            f"{path / FEATURES_FILE} is not a readable safetensors file ({err}); {hint}"
        ) from err

    try:
        embedded = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise KdpromptError(
            f"{path / FEATURES_FILE} carries no valid manifest in its metadata; {hint}"
        ) from err
    check_features(path, manifest, embedded, stored)
    check_expected(path, manifest, expect_fingerprint=expect_fingerprint, expect_classnames=expect_classnames)

    cache = TextCache(
        features=stored.float(), classnames=list(manifest["classnames"]), manifest=manifest, path=path
    )
    index = read_index(path, cache.features, manifest)
    if load_index:
        cache._index = index
    return cache
