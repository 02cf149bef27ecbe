"""The cache's format: file names, the manifest's fields, hashes, and the checks that refuse a bad cache.

Every refusal says what was expected, what was found and how to rebuild the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kdprompt.data.classnames import SHOW_NAMES, listing
from kdprompt.errors import KdpromptError
from kdprompt.text_features.ranking import MIN_APPROX_SPEEDUP, RECALL_TARGET
from kdprompt.version import __version__

FORMAT_VERSION = 1
CACHE_KIND = "kdprompt-text-cache"
FEATURES_FILE = "text_features.safetensors"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
TENSOR_KEY = "text_features"
METADATA_KEY = "manifest"
INDEX_KEY = "index"
FLAT_ENTRY: dict[str, Any] = {"kind": "flat"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
REQUIRED_FIELDS = (
    "format_version",
    "kind",
    "teacher_fingerprint",
    "classnames",
    "classnames_sha256",
    "embed_dim",
    "num_classes",
    "logit_scale",
    "dtype",
    "features_sha256",
)


def classnames_sha256(classnames: list[str]) -> str:
    """The sha256 (hex) of the class names joined by newlines, UTF-8 encoded."""
    return hashlib.sha256("\n".join(classnames).encode("utf-8")).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's raw bytes (as safetensors stores them: contiguous, little-endian)."""
    # A uint8 view works for every dtype, bfloat16 included, which numpy cannot represent.
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a storage dtype.

    Raises:
        KdpromptError: a dtype the format does not store.
    """
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise KdpromptError(f"cache dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")


def rebuild_hint(path: Path | None, manifest: dict[str, Any] | None = None) -> str:
    """The command that rebuilds the cache at ``path`` (naming its teacher when the manifest does)."""
    teacher = ((manifest or {}).get("provenance") or {}).get("teacher") or "TEACHER"
    out = f" --out {path}" if path is not None else ""
    return f"rebuild it with `kdprompt cache {teacher} --classes FILE{out}` or re-run `kdprompt teacher`"


def make_manifest(
    stored: torch.Tensor,
    classnames: list[str],
    *,
    teacher_fingerprint: str,
    logit_scale: float,
    provenance: dict[str, Any] | None,
    prompts: list[str] | None = None,
    index: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of the stored (normalised, storage-dtype) features ``stored``.

    ``prompts``, when given, are the exact texts encoded, one per class (optional: caches written before
    kdprompt recorded them have none). ``index`` describes ``index.faiss`` (see :func:`index_entry`);
    default flat.
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": CACHE_KIND,
        "teacher_fingerprint": teacher_fingerprint,
        "classnames": classnames,
        "classnames_sha256": classnames_sha256(classnames),
        "embed_dim": int(stored.shape[1]),
        "num_classes": int(stored.shape[0]),
        "logit_scale": float(logit_scale),
        "dtype": dtype_name(stored.dtype),
        "features_sha256": tensor_sha256(stored),
        "created_by": __version__,
        "provenance": dict(provenance or {}),
    }
    if prompts is not None:
        manifest["prompts"] = list(prompts)
    manifest[INDEX_KEY] = dict(index or FLAT_ENTRY)
    return manifest


def index_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's description of ``index.faiss`` (a copy); a cache without one has a flat index.

    ``{"kind": "flat"}`` (with ``hnsw_rejected`` when ``auto`` tried HNSW and kept exact search, or
    ``ivf_rejected`` from kdprompt versions whose ``auto`` tried IVF), ``{"kind": "hnsw", "m",
    "ef_construction", "ef_search", "recall@1", "recall@5", "recall_queries", "speedup"}`` or
    ``{"kind": "ivf", "nlist", "nprobe", "recall@1", "recall@5", "recall_queries"}``, with the recall
    measured against exact search when the index was built (and HNSW's search speed relative to it).
    """
    return dict(manifest.get(INDEX_KEY) or FLAT_ENTRY)


def describe_index(entry: dict[str, Any] | None) -> str:
    """One line on an index entry for users: ``flat (exact search)`` and why, or the approximate figures."""
    entry = entry or FLAT_ENTRY
    kind = entry.get("kind")
    if kind == "hnsw":
        speedup = entry.get("speedup")
        speed = f", {speedup:.1f}x as fast as exact search" if _is_number(speedup) else ""
        return f"hnsw (approximate: M {entry['m']}, efSearch {entry['ef_search']}, {_recall(entry)}{speed})"
    if kind == "ivf":
        return f"ivf (approximate: {entry['nlist']} lists, nprobe {entry['nprobe']}, {_recall(entry)})"
    return f"flat (exact search{_why_exact(entry)})"


def _recall(entry: dict[str, Any]) -> str:
    return (
        f"recall@1 {entry['recall@1']:.3f} and recall@5 {entry['recall@5']:.3f} against exact search on "
        f"{entry['recall_queries']} queries"
    )


def _why_exact(entry: dict[str, Any]) -> str:
    """Why ``auto`` kept exact search, from the rejected approximate index's figures ('' if none)."""
    hnsw = entry.get("hnsw_rejected")
    if isinstance(hnsw, dict) and {"ef_search", "recall@1", "speedup"} <= set(hnsw):
        tried = f"; HNSW at efSearch {hnsw['ef_search']} "
        if hnsw["recall@1"] < RECALL_TARGET:
            return tried + f"reached only recall@1 {hnsw['recall@1']:.3f}, short of {RECALL_TARGET:.2f}"
        if hnsw["speedup"] < MIN_APPROX_SPEEDUP:
            return tried + f"searched only {hnsw['speedup']:.2f}x as fast, short of {MIN_APPROX_SPEEDUP:g}x"
        return tried + "was not kept"
    ivf = entry.get("ivf_rejected")
    if isinstance(ivf, dict) and {"nprobe", "nlist"} <= set(ivf):
        return (
            f"; an IVF index would have needed {ivf['nprobe']} of its {ivf['nlist']} lists per query for "
            "the recall target, no faster than exact"
        )
    return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _index_fits(entry: Any) -> bool:
    """Absent (older caches: flat), ``{kind: flat}``, IVF with 1 <= nprobe <= nlist, HNSW with m, efs >= 1."""
    if entry is None:
        return True
    if not isinstance(entry, dict):
        return False
    kind = entry.get("kind")
    if kind == "flat":
        return True
    if kind == "hnsw":
        return all(_is_count(entry.get(k)) for k in ("m", "ef_construction", "ef_search"))
    return (
        kind == "ivf"
        and all(_is_count(entry.get(k)) for k in ("nlist", "nprobe"))
        and entry["nprobe"] <= entry["nlist"]
    )


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of the cache directory ``path``.

    Raises:
        KdpromptError: unreadable JSON, not a cache manifest, another format version, or missing or
            malformed fields.
    """
    file = path / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdpromptError(f"{file} is not readable JSON ({err}); {rebuild_hint(path)}") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != CACHE_KIND:
        raise KdpromptError(
            f"{file} is not a kdprompt text-feature cache manifest (kind is not {CACHE_KIND!r})"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise KdpromptError(
            f"text-feature cache {path} has format_version {version!r}; this kdprompt ({__version__}) reads "
            f"version {FORMAT_VERSION}"
            + ("; upgrade kdprompt" if newer else f"; {rebuild_hint(path, manifest)}")
        )
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise KdpromptError(f"{file} lacks the field(s) {', '.join(missing)}; {rebuild_hint(path, manifest)}")
    names = manifest["classnames"]
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or not all(isinstance(manifest[k], int) for k in ("num_classes", "embed_dim"))
        or not isinstance(manifest["logit_scale"], (int, float))
        or manifest["dtype"] not in DTYPES
        or not _prompts_fit(manifest.get("prompts"), names)
        or not _index_fits(manifest.get(INDEX_KEY))
    ):
        raise KdpromptError(
            f"{file} has malformed fields (classnames, prompts, sizes, logit_scale, dtype or index); "
            f"{rebuild_hint(path, manifest)}"
        )
    return manifest


def _prompts_fit(prompts: Any, names: list[str]) -> bool:
    """Absent (an older cache), or one string per class name."""
    if prompts is None:
        return True
    return (
        isinstance(prompts, list) and len(prompts) == len(names) and all(isinstance(p, str) for p in prompts)
    )


def check_features(
    path: Path, manifest: dict[str, Any], embedded: dict[str, Any], stored: torch.Tensor
) -> None:
    """Check the features file against the manifest: its embedded copy, shape, dtype and hashes.

    Args:
        path: the cache directory.
        manifest: ``manifest.json`` (from :func:`read_manifest`).
        embedded: the manifest carried in the features file's metadata.
        stored: the features tensor as stored.

    Raises:
        KdpromptError: the two manifests differ, or the tensor or class names do not match them.
    """
    hint = rebuild_hint(path, manifest)
    if embedded != manifest:
        differ = sorted(k for k in set(manifest) | set(embedded) if manifest.get(k) != embedded.get(k))
        raise KdpromptError(
            f"{path / MANIFEST_FILE} disagrees with the manifest inside {FEATURES_FILE} (fields: "
            f"{', '.join(differ)}): one of them was edited or comes from another cache; {hint}"
        )
    names = manifest["classnames"]
    expected_shape = (manifest["num_classes"], manifest["embed_dim"])
    if tuple(stored.shape) != expected_shape or len(names) != expected_shape[0]:
        raise KdpromptError(
            f"{path / FEATURES_FILE} holds a {tuple(stored.shape)} tensor but the manifest describes "
            f"{len(names)} classes x {manifest['embed_dim']} dims; {hint}"
        )
    if DTYPES.get(manifest["dtype"]) != stored.dtype:
        raise KdpromptError(
            f"{path / FEATURES_FILE} is {stored.dtype} but the manifest says {manifest['dtype']}; {hint}"
        )
    if classnames_sha256(names) != manifest["classnames_sha256"]:
        raise KdpromptError(
            f"the class names in {path / MANIFEST_FILE} do not match their classnames_sha256; {hint}"
        )
    if tensor_sha256(stored) != manifest["features_sha256"]:
        raise KdpromptError(
            f"{path / FEATURES_FILE} does not match the features_sha256 in its manifest: the features were "
            f"changed after the cache was built and cannot be trusted; {hint}"
        )


def check_expected(
    path: Path,
    manifest: dict[str, Any],
    *,
    expect_fingerprint: str | None,
    expect_classnames: list[str] | None,
) -> None:
    """Refuse a cache of another teacher or another class list (when either is expected).

    Raises:
        KdpromptError: the fingerprint or the class list (names or order) differs.
    """
    if expect_fingerprint is not None and manifest["teacher_fingerprint"] != expect_fingerprint:
        raise KdpromptError(
            f"text-feature cache {path} was built for another teacher: expected teacher fingerprint "
            f"{expect_fingerprint}, found {manifest['teacher_fingerprint']}; {rebuild_hint(path, manifest)}"
        )
    if expect_classnames is not None and list(expect_classnames) != manifest["classnames"]:
        diff = class_diff(list(expect_classnames), manifest["classnames"])
        raise KdpromptError(
            f"text-feature cache {path} is for another class list: {diff}; {rebuild_hint(path, manifest)}"
        )


def class_diff(expected: list[str], found: list[str]) -> str:
    """Say how two class lists differ: missing, extra, or the first positions where the order differs."""
    found_set, expected_set = set(found), set(expected)
    missing = [n for n in expected if n not in found_set]
    extra = [n for n in found if n not in expected_set]
    parts = []
    if missing:
        parts.append(f"missing from the cache: {listing(missing)}")
    if extra:
        parts.append(f"in the cache but not expected: {listing(extra)}")
    if not parts:
        if len(expected) != len(found):
            parts.append(f"expected {len(expected)} names, the cache has {len(found)} (repeated names)")
        else:
            moved = [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]
            shown = "; ".join(
                f"position {i}: expected {expected[i]!r}, found {found[i]!r}" for i in moved[:SHOW_NAMES]
            )
            more = f" ... and {len(moved) - SHOW_NAMES} more" if len(moved) > SHOW_NAMES else ""
            parts.append(f"same classes in a different order ({shown}{more})")
    return "; ".join(parts)
