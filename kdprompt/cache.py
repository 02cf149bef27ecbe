"""The teacher's class text-feature cache: what distillation and deployment read instead of a text encoder.

A cache is a directory::

    text_features.safetensors   one tensor "text_features" (C x D, rows L2-normalised); its metadata
                                carries the manifest as a JSON string under "manifest"
    index.faiss                 faiss.IndexFlatIP over the float32 features (exact cosine search)
    manifest.json               format version, teacher fingerprint, class names and their sha256,
                                embed dim, logit scale, dtype, features sha256, provenance

Loading needs only torch, safetensors, faiss and json: no teacher, no model code. A cache built for a
different teacher or class list, or edited after it was built, is refused with a message that says
what was expected, what was found and how to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdprompt import __version__
from kdprompt.errors import KdpromptError
from kdprompt.io import atomic_path

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

FORMAT_VERSION = 1
CACHE_KIND = "kdprompt-text-cache"
FEATURES_FILE = "text_features.safetensors"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
TENSOR_KEY = "text_features"
METADATA_KEY = "manifest"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_REQUIRED_FIELDS = (
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
_SHOW = 5  # how many differing class names an error message lists


def classnames_sha256(classnames: list[str]) -> str:
    """The sha256 (hex) of the class names joined by newlines, UTF-8 encoded."""
    return hashlib.sha256("\n".join(classnames).encode("utf-8")).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """The sha256 of a tensor's raw bytes (as safetensors stores them: contiguous, little-endian)."""
    # A uint8 view works for every dtype, bfloat16 included, which numpy cannot represent.
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise KdpromptError(f"cache dtype {dtype} is not supported; use one of {', '.join(_DTYPES)}")


def _listing(names: list[str]) -> str:
    """Up to ``_SHOW`` quoted names, then how many more."""
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _rebuild_hint(path: Path | None, manifest: dict[str, Any] | None = None) -> str:
    teacher = ((manifest or {}).get("provenance") or {}).get("teacher") or "TEACHER"
    out = f" --out {path}" if path is not None else ""
    return f"rebuild it with `kdprompt cache {teacher} --classes FILE{out}` or re-run `kdprompt teacher`"


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
        """The ``faiss.IndexFlatIP`` over the features: read from ``index.faiss``, or built in memory."""
        if self._index is None:
            if self.path is not None:
                self._index = _read_index(self.path, self.features, self.manifest)
            else:
                self._index = _flat_index(self.features)
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
                f"{len(unknown)} class(es) are not in the cache {self._where()}: {_listing(unknown)}; "
                f"it holds {self.num_classes} classes. Build a cache for them with "
                "`kdprompt cache TEACHER --classes FILE`"
            )
        _check_unique(names, "the requested classes")
        rows = torch.tensor([position[n] for n in names], dtype=torch.long)
        features = self.features[rows].clone()
        manifest = dict(self.manifest)
        stored = features.to(_DTYPES[manifest["dtype"]])
        manifest.update(
            classnames=names,
            classnames_sha256=classnames_sha256(names),
            num_classes=len(names),
            features_sha256=_tensor_sha256(stored),
            provenance={**(manifest.get("provenance") or {}), "subset_of": self._where()},
        )
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
) -> TextCache:
    """Normalise and write a text-feature cache directory atomically.

    The three files are written into a temporary directory beside ``out_dir`` which then replaces
    ``out_dir`` in one move: a crash never leaves a half cache, and an existing cache is replaced only
    once the new one is complete.

    Args:
        features: C x D class text features (any float dtype, any device); rows are L2-normalised here.
        classnames: the C class names, in row order (unique, non-empty, no newlines).
        out_dir: the cache directory to create or replace.
        teacher_fingerprint: the fingerprint of the teacher that produced ``features``.
        logit_scale: the teacher's logit scale, already exponentiated.
        provenance: free JSON-serialisable facts to record (teacher path, model spec, method, ...).
        dtype: storage dtype of the features file (float32, float16 or bfloat16).

    Returns:
        The cache, as ``load_cache`` would return it.

    Raises:
        KdpromptError: invalid features, class names or arguments.
    """
    out_dir = Path(out_dir)
    dtype_name = _dtype_name(dtype)
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
    _check_names(names, "the class names")
    if not isinstance(teacher_fingerprint, str) or not teacher_fingerprint:
        raise KdpromptError("a text-feature cache needs the teacher's fingerprint (a non-empty string)")
    if not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
        raise KdpromptError(f"logit_scale must be a finite positive number, got {logit_scale}")

    # Normalise in float64 so the stored rows are as close to unit length as the dtype allows.
    wide = features.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(wide).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise KdpromptError(
            f"text features are not finite (NaN or inf) for {_listing([names[i] for i in bad])}"
        )
    norms = wide.norm(dim=1, keepdim=True)
    zero = (norms.flatten() == 0).nonzero().flatten().tolist()
    if zero:
        raise KdpromptError(
            f"text features are all zero (cannot be normalised) for {_listing([names[i] for i in zero])}"
        )
    stored = (wide / norms).to(dtype).contiguous()
    loaded = stored.float()

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": CACHE_KIND,
        "teacher_fingerprint": teacher_fingerprint,
        "classnames": names,
        "classnames_sha256": classnames_sha256(names),
        "embed_dim": int(stored.shape[1]),
        "num_classes": int(stored.shape[0]),
        "logit_scale": float(logit_scale),
        "dtype": dtype_name,
        "features_sha256": _tensor_sha256(stored),
        "created_by": __version__,
        "provenance": dict(provenance or {}),
    }
    try:
        manifest_json = json.dumps(manifest, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise KdpromptError(f"cache provenance must be JSON-serialisable: {err}") from err

    _check_replaceable(out_dir)
    # The index holds exactly the float32 rows the cache loads, so search and logits rank alike.
    index = _flat_index(loaded)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({TENSOR_KEY: stored}, str(tmp / FEATURES_FILE), metadata={METADATA_KEY: manifest_json})
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return TextCache(features=loaded, classnames=names, manifest=manifest, path=out_dir, _index=index)


def _flat_index(features: torch.Tensor) -> Any:
    vectors = np.ascontiguousarray(features.detach().float().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a cache: the atomic move deletes whatever ``out_dir`` held."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise KdpromptError(
            f"cannot write a text-feature cache to {out_dir}: it exists and is not a directory"
        )
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise KdpromptError(
            f"cannot write a text-feature cache to {out_dir}: it is a non-empty directory that is not a "
            "cache (no manifest.json) and would be replaced; choose another --out directory"
        )


def _check_names(names: list[str], what: str) -> None:
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or "\n" in n or "\r" in n]
    if bad:
        raise KdpromptError(f"{what} must be non-empty single-line strings; bad: {_listing(bad)}")
    _check_unique(names, what)


def _check_unique(names: list[str], what: str) -> None:
    duplicates = [n for n, count in Counter(names).items() if count > 1]
    if duplicates:
        raise KdpromptError(f"{what} repeat {_listing(duplicates)}; each class must appear once")


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
        load_index: read and check ``index.faiss`` now; with False it is read on first ``index`` use
            (training only needs the features).

    Returns:
        The cache.

    Raises:
        KdpromptError: a missing file, an unsupported format, a manifest that disagrees with the
            features file, edited features, a stale index, or a fingerprint / class-list mismatch.
    """
    path = Path(path)
    if not path.is_dir():
        raise KdpromptError(f"no text-feature cache at {path} (not a directory); {_rebuild_hint(path)}")
    if not (path / MANIFEST_FILE).is_file():
        raise KdpromptError(
            f"text-feature cache {path} is incomplete: {MANIFEST_FILE} is missing; {_rebuild_hint(path)}"
        )
    manifest = _read_manifest(path)
    hint = _rebuild_hint(path, manifest)
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
    if _DTYPES.get(manifest["dtype"]) != stored.dtype:
        raise KdpromptError(
            f"{path / FEATURES_FILE} is {stored.dtype} but the manifest says {manifest['dtype']}; {hint}"
        )
    if classnames_sha256(names) != manifest["classnames_sha256"]:
        raise KdpromptError(
            f"the class names in {path / MANIFEST_FILE} do not match their classnames_sha256; {hint}"
        )
    if _tensor_sha256(stored) != manifest["features_sha256"]:
        raise KdpromptError(
            f"{path / FEATURES_FILE} does not match the features_sha256 in its manifest: the features were "
            f"changed after the cache was built and cannot be trusted; {hint}"
        )

    if expect_fingerprint is not None and manifest["teacher_fingerprint"] != expect_fingerprint:
        raise KdpromptError(
            f"text-feature cache {path} was built for another teacher: expected teacher fingerprint "
            f"{expect_fingerprint}, found {manifest['teacher_fingerprint']}; {hint}"
        )
    if expect_classnames is not None and list(expect_classnames) != names:
        raise KdpromptError(
            f"text-feature cache {path} is for another class list: {_class_diff(list(expect_classnames), names)}; "
            f"{_rebuild_hint(path, manifest)}"
        )

    cache = TextCache(features=stored.float(), classnames=list(names), manifest=manifest, path=path)
    if load_index:
        cache._index = _read_index(path, cache.features, manifest)
    return cache


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdpromptError(f"{file} is not readable JSON ({err}); {_rebuild_hint(path)}") from err
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
            + ("; upgrade kdprompt" if newer else f"; {_rebuild_hint(path, manifest)}")
        )
    missing = [k for k in _REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise KdpromptError(
            f"{file} lacks the field(s) {', '.join(missing)}; {_rebuild_hint(path, manifest)}"
        )
    names = manifest["classnames"]
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or not all(isinstance(manifest[k], int) for k in ("num_classes", "embed_dim"))
        or not isinstance(manifest["logit_scale"], (int, float))
        or manifest["dtype"] not in _DTYPES
    ):
        raise KdpromptError(
            f"{file} has malformed fields (classnames, sizes, logit_scale or dtype); "
            f"{_rebuild_hint(path, manifest)}"
        )
    return manifest


def _read_index(path: Path, features: torch.Tensor, manifest: dict[str, Any]) -> Any:
    file = path / INDEX_FILE
    hint = _rebuild_hint(path, manifest)
    if not file.is_file():
        raise KdpromptError(f"text-feature cache {path} is incomplete: {INDEX_FILE} is missing; {hint}")
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as err:
        raise KdpromptError(f"{file} is not a readable FAISS index; {hint}") from err
    num_classes, dim = features.shape
    if index.ntotal != num_classes or index.d != dim:
        raise KdpromptError(
            f"{file} holds {index.ntotal} vectors of dimension {index.d} but the cache has {num_classes} "
            f"classes x {dim} dims: the index is stale; {hint}"
        )
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        # A flat index stores the vectors themselves: check they are this cache's features.
        vectors = index.reconstruct_n(0, index.ntotal)
        if not np.allclose(vectors, features.numpy(), rtol=0, atol=1e-6):
            raise KdpromptError(f"{file} does not hold this cache's features: the index is stale; {hint}")
    return index


def _class_diff(expected: list[str], found: list[str]) -> str:
    """Say how two class lists differ: missing, extra, or the first positions where the order differs."""
    found_set, expected_set = set(found), set(expected)
    missing = [n for n in expected if n not in found_set]
    extra = [n for n in found if n not in expected_set]
    parts = []
    if missing:
        parts.append(f"missing from the cache: {_listing(missing)}")
    if extra:
        parts.append(f"in the cache but not expected: {_listing(extra)}")
    if not parts:
        if len(expected) != len(found):
            parts.append(f"expected {len(expected)} names, the cache has {len(found)} (repeated names)")
        else:
            moved = [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]
            shown = "; ".join(
                f"position {i}: expected {expected[i]!r}, found {found[i]!r}" for i in moved[:_SHOW]
            )
            more = f" ... and {len(moved) - _SHOW} more" if len(moved) > _SHOW else ""
            parts.append(f"same classes in a different order ({shown}{more})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------- class lists


def read_classnames_file(path: Path) -> list[str]:
    """Read class names from a text file (one per line) or a JSON file.

    Text: one name per line; blank lines and lines starting with ``#`` are ignored, surrounding spaces
    are stripped. JSON (a file whose first character is ``[`` or ``{``, or named ``*.json``): a list of
    strings, or an object ``{"classnames": [...]}``.

    Raises:
        KdpromptError: the file is missing, unreadable, malformed, empty or repeats a name.
    """
    path = Path(path)
    if not path.is_file():
        raise KdpromptError(f"class names file {path} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise KdpromptError(f"cannot read class names file {path} as UTF-8 text: {err}") from err

    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise KdpromptError(
                f"class names file {path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                f"{err.colno}); write a JSON list of names, or plain text with one name per line"
            ) from err
        if isinstance(data, dict):
            data = data.get("classnames")
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise KdpromptError(
                f"class names file {path} must hold a JSON list of strings or an object "
                '{"classnames": [...]}'
            )
        names = [n.strip() for n in data]
        if any(not n for n in names):
            raise KdpromptError(f"class names file {path} contains an empty name")
    else:
        lines = (line.strip() for line in text.splitlines())
        names = [line for line in lines if line and not line.startswith("#")]

    if not names:
        raise KdpromptError(f"class names file {path} lists no class names")
    _check_names(names, f"the class names in {path}")
    return names
