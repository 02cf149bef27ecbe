"""``kdprompt export``: a distilled student run -> a self-contained, pickle-free bundle directory.

Layout (``FORMAT_VERSION`` 1)::

    OUT/
      manifest.json            format, versions, fingerprints, parameter counts, sha256 of every file,
                               and ``manifest_sha256``: the sha256 of the manifest's own canonical JSON
      encoder.safetensors      the image encoder: ``visual.*``, ``prompts``, ``projector.*`` (BatchNorm folded)
      open_clip_config.json    the open_clip model config the image tower is rebuilt from, offline
      preprocess.json          image size, mean / std, interpolation, resize mode (open_clip PreprocessCfg)
      cache/                   the teacher's text-feature cache: features, FAISS index, class names
      image_encoder.onnx       with ``--onnx``: the same encoder as an ONNX graph

The bundle is written beside OUT and renamed into place, so a failed or killed export leaves the old
bundle (or nothing) at OUT. Only a directory whose manifest carries this format's marker is ever replaced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kdprompt.errors import KdpromptError
from kdprompt.faults import crash_point
from kdprompt.io import file_sha256, recover_swap

FORMAT = "kdprompt-student-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "open_clip_config.json"
PREPROCESS_FILE = "preprocess.json"
CACHE_DIR = "cache"
ONNX_FILE = "image_encoder.onnx"
DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's canonical JSON (sorted keys, compact), leaving out its own digest.

    The digest is stored inside the manifest, so the bundle stays one self-describing file set: a hand
    edit or a torn write of ``manifest.json`` no longer matches it. Integrity, not authenticity: anyone
    may re-seal an edited manifest on purpose.
    """
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its ``manifest_sha256`` (re)computed."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: manifest_digest(body)}


def is_bundle_dir(path: Path) -> bool:
    """Whether ``path`` holds a manifest marked as this bundle format (any version): what kdprompt wrote."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a bundle, and a bundle without ``overwrite``.

    The final rename deletes whatever ``out`` held, so a folder that merely has a ``manifest.json``
    (a text-feature cache, someone's project) is never taken for a bundle.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise KdpromptError(f"{out} exists and is not a directory; choose another OUT")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_bundle_dir(out):
        raise KdpromptError(
            f"{out} exists and is not a kdprompt bundle (its {MANIFEST_FILE} does not say format "
            f"{FORMAT!r}); refusing to replace it even with --overwrite: choose another OUT"
        )
    if not overwrite:
        raise KdpromptError(
            f"{out} already holds a bundle; choose another OUT or pass --overwrite to replace it"
        )


def resolve_student_dir(path: Path) -> Path:
    """``runs/<name>`` or ``runs/<name>/student`` -> the directory holding ``student.json``."""
    from kdprompt.models.student import STUDENT_FILE

    path = Path(path)
    for candidate in (path, path / "student"):
        if (candidate / STUDENT_FILE).is_file():
            return candidate
    if is_bundle_dir(path):
        raise KdpromptError(f"{path} is already a bundle; export takes a student run (runs/<name>/student)")
    raise KdpromptError(
        f"{path} is not a student run: no {STUDENT_FILE} in it or in {path / 'student'}; "
        "train one with `kdprompt distill RECIPE`"
    )


def _preprocess_config(transform_cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(transform_cfg)
    size = cfg.get("size")
    cfg["size"] = list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)]
    cfg["mean"], cfg["std"] = list(cfg["mean"]), list(cfg["std"])
    return cfg


def _read_teacher_meta(student_meta: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ``teacher.json`` when it is still where the student run says, else ``{}``.

    Raises:
        KdpromptError: the file is there but is not a JSON object.
    """
    from kdprompt.models.teacher import TEACHER_FILE, read_teacher_json

    teacher_json = Path(student_meta["teacher"]["path"]) / TEACHER_FILE
    return read_teacher_json(teacher_json) if teacher_json.is_file() else {}


def _image_tower_parameters(model_name: str) -> int:
    """Parameters of a model's image tower, counted from its config alone (no weights needed)."""
    import open_clip

    from kdprompt.deploy.encoder import build_visual
    from kdprompt.models.loading import resolve_model_name

    config = open_clip.get_model_config(resolve_model_name(model_name))
    # Shapes are all a count needs: build on the meta device, with no memory and no initialisation.
    with torch.device("meta"):
        return sum(p.numel() for p in build_visual(config).parameters())


def write_encoder_files(tmp: Path, encoder: Any, config: dict[str, Any], preprocess: dict[str, Any]) -> None:
    """Create the bundle folder ``tmp`` with its encoder weights, open_clip config and preprocessing."""
    from safetensors.torch import save_file

    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # One metadata key: safetensors writes the map in a random order, and two exports of the same
    # run must be byte-identical (the version is in the manifest).
    save_file(state, str(tmp / ENCODER_FILE), metadata={"format": FORMAT})
    crash_point("export.encoder_written")
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=2) + "\n", encoding="utf-8")


def finish_bundle(
    tmp: Path,
    name: str,
    encoder: Any,
    fields: dict[str, Any],
    *,
    features_sha256: str,
    onnx: bool,
    opset: int,
) -> dict[str, Any]:
    """ONNX (when asked), the file list and the sealed ``manifest.json`` of a bundle whose cache is written.

    ``fields`` are what the exporter knows (model, parameters, preprocess, teacher, cache, ...); the
    format header, the fingerprint, the ONNX record and every file's sha256 are added here.
    """
    from kdprompt.version import __version__

    crash_point("export.cache_copied")
    onnx_info = None
    if onnx:
        from kdprompt.deploy.onnx import export_onnx

        size = fields["preprocess"]["size"]
        onnx_info = export_onnx(encoder, tmp / ONNX_FILE, image_size=(size[0], size[1]), opset=opset)
    files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = seal_manifest(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kdprompt_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "name": name,
            **fields,
            "fingerprint": hashlib.sha256((files[ENCODER_FILE] + features_sha256).encode()).hexdigest(),
            "onnx": onnx_info,
            "files": files,
        }
    )
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    crash_point("export.manifest_written")  # complete, not yet renamed into place
    return manifest


def export_bundle(
    student_run: Path,
    out: Path,
    *,
    onnx: bool = False,
    overwrite: bool = False,
    opset: int = 18,
    cache_dir: Path | None = None,
    index: str = "auto",
) -> dict[str, Any]:
    """Export a distilled student as a bundle directory.

    Args:
        student_run: ``runs/<name>`` or ``runs/<name>/student``.
        out: the bundle directory to create.
        onnx: also write ``image_encoder.onnx`` (checked against torch with onnxruntime).
        overwrite: replace ``out`` when it is a bundle (nothing else is ever replaced).
        opset: ONNX opset version.
        cache_dir: ship this text-feature cache instead of the one the student trained with: another
            class list of the same teacher (``kdprompt cache TEACHER --classes FILE``).
        index: the shipped cache's FAISS index: ``auto`` (the cache's own), ``flat``, ``hnsw`` or ``ivf``
            (rebuilt when the cache's is another kind; see :func:`kdprompt.text_features.store.copy_cache`).

    Returns:
        The bundle's manifest.

    Raises:
        KdpromptError: not a student run, a missing or stale cache, ``out`` is a bundle and no
            ``overwrite``, ``out`` holds something else, or an ONNX graph that does not match torch.
    """

    from kdprompt.deploy.encoder import ImageEncoder, open_clip_config
    from kdprompt.io import atomic_path
    from kdprompt.models.student import STUDENT_FILE, STUDENT_WEIGHTS, load_student
    from kdprompt.text_features.manifest import index_entry
    from kdprompt.text_features.store import copy_cache

    student_dir = resolve_student_dir(student_run)
    out = Path(out)
    # A previous export killed between its two renames left the old bundle aside: put it back first.
    recover_swap(out)
    _check_replaceable(out, overwrite)
    meta = json.loads((student_dir / STUDENT_FILE).read_text(encoding="utf-8"))
    student, cache = load_student(student_dir, cache_path=cache_dir)
    if cache.path is None:
        raise KdpromptError(f"student {student_dir} has no cache directory to ship")
    encoder, projector_specs = ImageEncoder.from_student(student)
    config = open_clip_config(student.spec.name, encoder.visual)
    preprocess = _preprocess_config(student.visual.preprocess_cfg)
    size = preprocess["size"]
    counts = encoder.parameter_counts()
    teacher_meta = _read_teacher_meta(meta)
    teacher_model = (teacher_meta.get("model") or {}).get("name")

    with atomic_path(out, exclusive=True) as tmp:
        write_encoder_files(tmp, encoder, config, preprocess)
        shipped = copy_cache(cache, tmp / CACHE_DIR, index)
        fields = {
            "model": {
                "name": student.spec.name,
                "adaptation": meta["student"]["adaptation"],
                "open_clip_config": CONFIG_FILE,
                "prompts": None
                if encoder.prompts is None
                else {"depth": encoder.prompts.shape[0], "n_ctx": encoder.prompts.shape[1]},
                "projector": projector_specs,
                "embed_dim": cache.embed_dim,
                "input_size": [3, size[0], size[1]],
            },
            "parameters": {
                **counts,
                "teacher_image_tower": _image_tower_parameters(teacher_model) if teacher_model else None,
            },
            "preprocess": preprocess,
            "logit_scale": cache.logit_scale,
            "classes": {
                "num_classes": cache.num_classes,
                "classnames_sha256": cache.manifest["classnames_sha256"],
            },
            "teacher": {
                "fingerprint": meta["teacher"]["fingerprint"],
                "path": meta["teacher"]["path"],
                "model": teacher_model,
                # lets `kdprompt eval --bundle` default to the data the teacher was trained on
                "data": teacher_meta.get("data"),
            },
            "cache": {
                "dir": CACHE_DIR,
                "teacher_fingerprint": cache.teacher_fingerprint,
                "features_sha256": cache.manifest["features_sha256"],
                "index": index_entry(shipped.manifest),
            },
            "source": {
                "student_run": str(student_dir),
                "student_sha256": file_sha256(student_dir / STUDENT_WEIGHTS),
            },
        }
        return finish_bundle(
            tmp,
            student_dir.resolve().parent.name,
            encoder,
            fields,
            features_sha256=cache.manifest["features_sha256"],
            onnx=onnx,
            opset=opset,
        )
