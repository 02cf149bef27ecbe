"""Reading a teacher-output cache: checked against the recipe, parts verified, rows looked up by key.

A part is verified (sha256 against the manifest) the first time a process opens it, so a corrupt or
missing part is named, never read as zeros; a sample the cache does not hold is an error too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdprompt.data.augment import ViewParams
from kdprompt.errors import KdpromptError
from kdprompt.io import file_sha256
from kdprompt.teacher_outputs.manifest import (
    mismatch_error,
    part_file,
    read_manifest,
    read_part_metadata,
    shard_name,
)

RERUN = "rerun `kdprompt teacher-outputs RECIPE` to rewrite it"


@dataclass
class _Part:
    """One opened part: its rows by key, view parameters and image sizes in memory, features on disk."""

    file: Path
    rows: dict[str, int]
    params: Tensor  # (N, V, 5) int32
    image_size: Tensor  # (N, 2) int32: width, height
    features: Any  # the safetensors slice of (N, V, D); rows are read on demand


class TeacherOutputs:
    """A complete teacher-output cache whose spec matched the recipe's (see :func:`open_teacher_outputs`).

    Picklable (DataLoader workers replay views from it): opened parts are not carried over.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.views: int = manifest["spec"]["views"]
        self.embed_dim: int = manifest["embed_dim"]
        self._parts: dict[str, _Part] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parts": {}}

    def _part(self, url: str) -> _Part:
        shard = shard_name(url)
        if shard in self._parts:
            return self._parts[shard]
        record = self.manifest["parts"].get(shard)
        if record is None:
            raise KdpromptError(f"teacher outputs at {self.root} hold no part for shard {url}; {RERUN}")
        file = part_file(self.root, shard)
        if not file.is_file():
            raise KdpromptError(f"teacher-output part {file} (shard {shard}) is missing; {RERUN}")
        if file_sha256(file) != record["sha256"]:
            raise KdpromptError(
                f"teacher-output part {file} (shard {shard}) is corrupt: its sha256 differs from the "
                f"manifest's; {RERUN}"
            )
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt")
        keys = read_part_metadata(handle.metadata())["keys"]
        part = _Part(
            file=file,
            rows={key: row for row, key in enumerate(keys)},
            params=handle.get_tensor("params"),
            image_size=handle.get_tensor("image_size"),
            features=handle.get_slice("features"),
        )
        self._parts[shard] = part
        return part

    def _row(self, part: _Part, url: str, key: str) -> int:
        row = part.rows.get(key)
        if row is None:
            raise KdpromptError(
                f"sample {key} of shard {url} has no stored teacher outputs in {part.file} (the shards "
                f"changed since they were made?); {RERUN}"
            )
        return row

    def view(self, url: str, key: str, view: int) -> tuple[ViewParams, tuple[int, int]]:
        """The stored view ``view`` of sample ``key``, and the (width, height) of the image it was cut from."""
        part = self._part(url)
        row = self._row(part, url, key)
        width, height = (int(v) for v in part.image_size[row])
        return ViewParams.from_row(part.params[row, view].tolist()), (width, height)

    def features(self, urls: list[str], keys: list[str], views: list[int]) -> Tensor:
        """The stored teacher features (B, D), storage dtype, of view ``views[i]`` of sample ``keys[i]``."""
        rows = []
        for url, key, view in zip(urls, keys, views, strict=True):
            part = self._part(url)
            row = self._row(part, url, key)
            rows.append(part.features[row : row + 1, view : view + 1])
        return torch.cat(rows).reshape(len(rows), -1)


def open_teacher_outputs(root: Path, expected_spec: dict[str, Any]) -> TeacherOutputs:
    """Open the cache at ``root`` for a recipe whose spec is ``expected_spec`` (see :func:`.manifest.recipe_spec`).

    Raises:
        KdpromptError: no cache there, an incomplete one, one made for another teacher / shards /
            augmentation / V / seed / dtype (one message naming each difference), or a missing or
            truncated part (named).
    """
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise KdpromptError(
            f"no teacher outputs at {root} (teacher_outputs.path); make them with "
            "`kdprompt teacher-outputs RECIPE` (same recipe and overrides), or set teacher_outputs.use=false"
        )
    error = mismatch_error(root, manifest["spec"], expected_spec)
    if error is not None:
        raise error
    if not manifest.get("complete"):
        raise KdpromptError(
            f"teacher outputs at {root} are incomplete (the precompute was interrupted); run "
            "`kdprompt teacher-outputs RECIPE` again to finish them"
        )
    for shard, record in manifest["parts"].items():
        file = part_file(root, shard)
        if not file.is_file():
            raise KdpromptError(f"teacher-output part {file} (shard {shard}) is missing; {RERUN}")
        if file.stat().st_size != record["bytes"]:
            raise KdpromptError(
                f"teacher-output part {file} (shard {shard}) is corrupt: {file.stat().st_size} bytes, "
                f"the manifest says {record['bytes']}; {RERUN}"
            )
    return TeacherOutputs(root, manifest)
