"""The teacher-output cache's layout, its identity (the spec) and the one error naming what differs.

::

    <teacher_outputs.path>/
      manifest.json                 {"spec": {...}, "spec_digest", "complete", "parts": {shard: {...}}, ...}
      parts/<shard stem>.safetensors  one per shard: features (N, V, D), params (N, V, 5) int32,
                                      image_size (N, 2) int32; metadata "kdprompt_part": JSON of keys,
                                      skipped (undecodable) keys, shard, spec_digest

The spec is what the stored features depend on: the teacher's fingerprint, the shards (name, samples,
bytes), the augmentation (:attr:`kdprompt.data.augment.ReplayableView.identity`, the student's view size
and normalisation included: the teacher sees the student's view), V, the view seed and the storage dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdprompt.data.shard_urls import local_path, read_sizes
from kdprompt.errors import KdpromptError
from kdprompt.io import write_json_atomic

FORMAT_VERSION = 1
KIND = "kdprompt-teacher-outputs"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
# Each stored view: [top, left, height, width, flip] of kdprompt.data.augment.ViewParams.
PARAM_FIELDS = ("top", "left", "height", "width", "flip")
SHOWN = 3  # shard names an error lists
# A part's metadata is one JSON string under this key: safetensors writes several metadata entries in
# hash order, and a resumed precompute must give byte-identical parts.
PART_METADATA = "kdprompt_part"


def shard_name(url: str) -> str:
    """The shard's file name (how parts and the manifest refer to it)."""
    return os.path.basename(url)


def part_file(root: Path, shard: str) -> Path:
    """``root/parts/<shard stem>.safetensors``."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    return Path(root) / PARTS_DIR / f"{stem}.safetensors"


def part_metadata(keys: list[str], skipped: list[str], shard: str, digest: str) -> dict[str, str]:
    """The safetensors metadata of a part: its sample keys (row order), skipped keys, shard and spec digest."""
    record = {"keys": keys, "skipped": skipped, "shard": shard, "spec_digest": digest}
    return {PART_METADATA: json.dumps(record, sort_keys=True)}


def read_part_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The record :func:`part_metadata` wrote ({} for a file without one)."""
    raw = (metadata or {}).get(PART_METADATA)
    return json.loads(raw) if raw else {}


def shard_entries(urls: list[str]) -> list[dict[str, Any]]:
    """``{"name", "samples", "bytes"}`` of each shard, in order.

    Raises:
        KdpromptError: a remote shard or one without a ``sizes.json`` entry (a cache needs local shards).
    """
    entries = []
    for url in urls:
        path, samples = local_path(url), read_sizes([url])
        if path is None or samples is None:
            raise KdpromptError(
                f"teacher outputs need local shards listed in a sizes.json; {url} is not; "
                "write the data with `kdprompt shards SRC OUT` first"
            )
        entries.append({"name": shard_name(url), "samples": samples, "bytes": os.path.getsize(path)})
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise KdpromptError("teacher outputs need shards with distinct file names; rename the shards")
    return entries


def recipe_spec(
    recipe: Any, teacher_fingerprint: str, urls: list[str], student_preprocess: Mapping[str, Any]
) -> dict[str, Any]:
    """The spec a distill ``recipe`` needs: everything its stored teacher features depend on.

    Args:
        recipe: a distill recipe with a ``teacher_outputs`` section.
        teacher_fingerprint: the fingerprint of ``recipe.teacher``.
        urls: the shards the recipe reads.
        student_preprocess: the student's ``visual.preprocess_cfg`` (the teacher sees the student's view).
    """
    from kdprompt.data.augment import ReplayableView

    cfg = recipe.teacher_outputs
    return {
        "teacher_fingerprint": teacher_fingerprint,
        "shards": shard_entries(urls),
        "augmentation": ReplayableView(recipe.augmentation, student_preprocess).identity,
        "views": cfg.views,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
    }


def spec_digest(spec: dict[str, Any]) -> str:
    """sha256 of the spec (what each part records, so a part of another spec is never reused)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _names(entries: list[dict[str, Any]]) -> str:
    shown = ", ".join(e["name"] for e in entries[:SHOWN])
    return shown + (", ..." if len(entries) > SHOWN else "")


def differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a stored spec and the one a recipe expects, one phrase per field."""
    out = []
    if found.get("teacher_fingerprint") != expected["teacher_fingerprint"]:
        out.append(
            f"teacher (stored: {str(found.get('teacher_fingerprint'))[:12]}, "
            f"recipe's: {expected['teacher_fingerprint'][:12]})"
        )
    stored, wanted = found.get("shards") or [], expected["shards"]
    if stored != wanted:
        if [e.get("name") for e in stored] != [e["name"] for e in wanted]:
            out.append(
                f"shards (stored: {len(stored)}: {_names(stored)}; recipe's: {len(wanted)}: {_names(wanted)})"
            )
        else:
            a, b = next((a, b) for a, b in zip(stored, wanted, strict=True) if a != b)
            out.append(
                f"shards ({a['name']}: stored {a.get('samples')} samples / {a.get('bytes')} bytes, "
                f"now {b['samples']} / {b['bytes']})"
            )
    aug_a, aug_b = found.get("augmentation") or {}, expected["augmentation"]
    changed = [k for k in sorted(set(aug_a) | set(aug_b)) if aug_a.get(k) != aug_b.get(k)]
    if changed:
        out.append(
            "augmentation ("
            + "; ".join(f"{k}: stored {aug_a.get(k)}, recipe's {aug_b.get(k)}" for k in changed)
            + ")"
        )
    for key in ("views", "seed", "dtype"):
        if found.get(key) != expected[key]:
            out.append(f"{key} (stored: {found.get(key)}, recipe's: {expected[key]})")
    return out


def mismatch_error(root: Path, found: dict[str, Any], expected: dict[str, Any]) -> KdpromptError | None:
    """The one error saying how the cache at ``root`` differs from the recipe's spec, or None if equal."""
    diff = differences(found, expected)
    if not diff:
        return None
    return KdpromptError(
        f"teacher outputs at {root} do not match the recipe: {'; '.join(diff)}; run `kdprompt "
        f"teacher-outputs RECIPE` with another teacher_outputs.path (or delete {root})"
    )


def read_manifest(root: Path) -> dict[str, Any] | None:
    """``root/manifest.json``, or None when there is none.

    Raises:
        KdpromptError: it is not a teacher-output manifest this kdprompt reads.
    """
    file = Path(root) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KdpromptError(
            f"{file} is not readable JSON ({err}); delete {root} and rerun `kdprompt teacher-outputs RECIPE`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or "spec" not in manifest:
        raise KdpromptError(
            f"{file} is not a kdprompt teacher-output manifest; choose another teacher_outputs.path"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise KdpromptError(
            f"{file} has format_version {manifest.get('format_version')}; this kdprompt reads "
            f"{FORMAT_VERSION}: rerun `kdprompt teacher-outputs RECIPE` into a new teacher_outputs.path"
        )
    return manifest


def write_manifest(root: Path, spec: dict[str, Any], info: dict[str, Any], parts: dict | None) -> Path:
    """Write ``root/manifest.json`` atomically: complete when ``parts`` (per shard: file, sha256, ...) is given."""
    return write_json_atomic(
        Path(root) / MANIFEST_FILE,
        {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "complete": parts is not None,
            "spec_digest": spec_digest(spec),
            "spec": spec,
            **info,
            "parts": parts or {},
        },
    )
