"""``kdprompt export`` and ``kdprompt predict``: ship a distilled student and classify with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from kdprompt.cli_common import CONTEXT_SETTINGS, resolve_device, user_errors
from kdprompt.errors import KdpromptError


def runtime_options(fn: Any) -> Any:
    """``--backend`` and ``--device``: how a command runs a bundle's image encoder."""
    fn = click.option(
        "--device", default="cpu", show_default=True, help="torch backend: cpu, cuda, cuda:N or auto."
    )(fn)
    return click.option(
        "--backend",
        type=click.Choice(["torch", "onnx"]),
        default="torch",
        show_default=True,
        help="Run the image encoder with torch, or its ONNX graph on onnxruntime (CPU; bundles exported with --onnx).",
    )(fn)


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@click.command("export", context_settings=CONTEXT_SETTINGS)
@click.argument("student_run", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--onnx",
    is_flag=True,
    help="Also write image_encoder.onnx (checked against torch, needs the onnx extra).",
)
@click.option(
    "--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset version."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already a bundle.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Ship another class list of the same teacher (from `kdprompt cache TEACHER --classes FILE`).",
)
@user_errors
def export_command(
    student_run: Path, out: Path, onnx: bool, opset: int, overwrite: bool, cache_dir: Path | None
) -> None:
    """Write a deployable bundle of a distilled student to OUT.

    STUDENT_RUN is runs/<name> or runs/<name>/student (from `kdprompt distill`). The bundle holds the
    student image tower with its prompts and projector folded in (safetensors), the open_clip config to
    rebuild it offline, the preprocessing, the teacher's text-feature cache (features, FAISS index,
    class names), the logit scale and a manifest with versions, fingerprints and sha256 of every file.
    Loading it needs no teacher, no text tower, no network and no pickle. --cache ships the features of
    another class list of the same teacher instead, e.g. classes the student never saw.

    \b
    Examples:
      kdprompt export runs/demo-distill-student runs/demo/bundle --onnx
      kdprompt cache runs/demo-teacher-promptsrc/teacher --classes new-classes.txt --out cache/new
      kdprompt export runs/demo-distill-student runs/demo/bundle-new --cache cache/new
      kdprompt predict runs/demo/bundle image.png
      kdprompt serve runs/demo/bundle --port 8000
    """
    from kdprompt.deploy import export_bundle

    manifest = export_bundle(
        student_run, out, onnx=onnx, overwrite=overwrite, opset=opset, cache_dir=cache_dir
    )
    params = manifest["parameters"]
    click.echo(f"bundle written to {out} ({_human(_size(out))})")
    for name in manifest["files"]:
        click.echo(f"  {name:<36} {_human(_size(out / name))}")
    teacher = params.get("teacher_image_tower")
    ratio = f" (teacher image tower: {teacher:,}, {teacher / params['total']:.1f}x)" if teacher else ""
    click.echo(
        f"parameters: {params['total']:,} = tower {params['image_tower']:,} + prompts "
        f"{params['prompts']:,} + projector {params['projector']:,}{ratio}"
    )
    click.echo(f"classes: {manifest['classes']['num_classes']}; fingerprint {manifest['fingerprint'][:16]}")
    if manifest["onnx"]:
        click.echo(
            f"onnx: {manifest['onnx']['file']} matches torch within {manifest['onnx']['max_abs_diff']:.1e}"
        )
    click.echo(f"next: kdprompt predict {out} IMAGE... | kdprompt serve {out}")


def iter_image_files(inputs: tuple[Path, ...]) -> Iterator[Path]:
    """The files named, and every non-hidden file under the directories named (sorted, recursive).

    Raises:
        KdpromptError: an input does not exist.
    """
    for item in inputs:
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                rel = path.relative_to(item)
                if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield path
        elif item.exists():
            yield item
        else:
            raise KdpromptError(f"{item} does not exist; give image files or directories of images")


@click.command("predict", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.argument("inputs", metavar="IMAGE_OR_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image instead of a table.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch."
)
@runtime_options
@user_errors
def predict_command(
    bundle_dir: Path,
    inputs: tuple[Path, ...],
    k: int,
    as_json: bool,
    batch_size: int,
    backend: str,
    device: str,
) -> None:
    """Classify images with a BUNDLE (from `kdprompt export`): the top-k classes and probabilities.

    Directories are searched recursively. A file that is not an image is reported by name on stderr
    (and as {"image", "error"} with --json) and skipped; the rest are still classified. Exits 2 when
    no image could be classified.

    \b
    Examples:
      kdprompt predict runs/demo/bundle photo.jpg
      kdprompt predict runs/demo/bundle photos/ --k 3 --json > predictions.jsonl
    """
    import torch

    from kdprompt.deploy import load_bundle

    bundle = load_bundle(bundle_dir, device=resolve_device(device), backend=backend)
    files = list(iter_image_files(inputs))
    if not files:
        raise KdpromptError(f"no files found in {', '.join(map(str, inputs))}")
    shown = min(k, len(bundle.classnames))
    if not as_json:
        header = ["image", *(f"top-{i + 1}" for i in range(shown))]
        click.echo("| " + " | ".join(header) + " |")
        click.echo("| " + " | ".join("---" for _ in header) + " |")
    done = skipped = 0
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        names = [n for n, _ in pending]
        for p in bundle.predict_tensor(torch.stack([t for _, t in pending]), k, names):
            if as_json:
                click.echo(
                    json.dumps(
                        {"image": p.source, "labels": p.labels, "probs": p.probs, "indices": p.indices}
                    )
                )
            else:
                cells = [f"{label} ({prob:.3f})" for label, prob in zip(p.labels, p.probs, strict=True)]
                click.echo("| " + " | ".join([p.source, *cells]) + " |")
        done += len(pending)
        pending.clear()

    for path in files:
        try:
            pending.append((str(path), bundle.preprocess(path, str(path))))
        except KdpromptError as e:
            skipped += 1
            click.echo(f"skipped: {e}", err=True)
            if as_json:
                click.echo(json.dumps({"image": str(path), "error": str(e)}))
        if len(pending) >= batch_size:
            flush()
    flush()
    click.echo(f"{done} image(s) classified, {skipped} skipped", err=True)
    if done == 0:
        raise KdpromptError(f"none of the {skipped} file(s) could be read as an image")
