"""``kdprompt export``, ``predict`` and ``serve``: ship a distilled student, classify with it, serve it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdprompt.cli.options import (
    CONTEXT_SETTINGS,
    batching_options,
    resolve_device,
    runtime_options,
    user_errors,
)
from kdprompt.errors import KdpromptError

# kdprompt.deploy.export_clip.CLIP_TEMPLATE_SETS, spelled out so that `--help` does not import torch.
CLIP_TEMPLATE_CHOICES = ("simple", "ensemble", "promptsrc")
# kdprompt.text_features.ranking.INDEX_KINDS, likewise (it imports faiss).
INDEX_CHOICES = ("auto", "flat", "ivf", "hnsw")


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
@click.option(
    "--classes",
    "classes",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A CLIP run (clipkd, pretrain): the class names to encode with its own text tower (one per line).",
)
@click.option(
    "--templates",
    type=click.Choice(CLIP_TEMPLATE_CHOICES),
    default=None,
    help="A CLIP run: the prompts its text tower encodes each class with (default: simple).",
)
@click.option(
    "--index",
    type=click.Choice(INDEX_CHOICES),
    default="auto",
    show_default=True,
    help="The FAISS index the bundle ranks classes with: auto keeps the one the cache was built with (a "
    "cache from before kdprompt recorded it tries HNSW from 100,000 classes, kept only at 95% recall@1 "
    "and 2x the speed of exact search); flat (exact), hnsw or ivf (approximate, recall measured and "
    "recorded) rebuild it when it is another kind. See docs/VOCABULARY.md.",
)
@user_errors
def export_command(
    student_run: Path,
    out: Path,
    onnx: bool,
    opset: int,
    overwrite: bool,
    cache_dir: Path | None,
    classes: Path | None,
    templates: str | None,
    index: str,
) -> None:
    """Write a deployable bundle of a distilled student (or a whole CLIP run) to OUT.

    STUDENT_RUN is runs/<name> or runs/<name>/student (from `kdprompt distill`). The bundle holds the
    student image tower with its prompts and projector folded in (safetensors), the open_clip config to
    rebuild it offline, the preprocessing, the teacher's text-feature cache (features, FAISS index,
    class names), the logit scale and a manifest with versions, fingerprints and sha256 of every file.
    Loading it needs no teacher, no text tower, no network and no pickle. --cache ships the features of
    another class list of the same teacher instead, e.g. classes the student never saw.

    A CLIP run (runs/<name>/clipkd from `kdprompt clipkd`, or runs/<name>/pretrain) has no class list:
    --classes FILE is required, and its own text tower encodes those classes at export (--templates);
    the bundle ships its image tower, those features, its logit scale and its preprocessing.

    \b
    Examples:
      kdprompt export runs/demo-distill-student runs/demo/bundle --onnx
      kdprompt cache runs/demo-teacher-promptsrc/teacher --classes new-classes.txt --out cache/new
      kdprompt export runs/demo-distill-student runs/demo/bundle-new --cache cache/new
      kdprompt export runs/demo-clipkd-student runs/demo/clipkd-bundle --classes classes.txt --templates ensemble
      kdprompt predict runs/demo/bundle image.png
      kdprompt serve runs/demo/bundle --port 8000
    """
    from kdprompt.deploy.export_clip import export_run
    from kdprompt.text_features.manifest import describe_index

    manifest = export_run(
        student_run,
        out,
        onnx=onnx,
        overwrite=overwrite,
        opset=opset,
        cache_dir=cache_dir,
        classes=classes,
        templates=templates,
        index=index,
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
    click.echo(f"index: {describe_index(manifest['cache'].get('index'))}")
    if manifest.get("text_features_from") == "student":
        click.echo(f"class features: its own text tower, templates {manifest['templates']}")
    if manifest["onnx"]:
        click.echo(
            f"onnx: {manifest['onnx']['file']} matches torch within {manifest['onnx']['max_abs_diff']:.1e}"
        )
    click.echo(f"next: kdprompt predict {out} IMAGE... | kdprompt serve {out}")


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

    Classes are ranked through the bundle's FAISS index. Up to 10,000 classes the probabilities are a
    softmax over every class ("probabilities": "full" with --json); past that, or behind an approximate
    index that did not reach every class, over the classes retrieved ("candidates", noted once on
    stderr).

    \b
    Examples:
      kdprompt predict runs/demo/bundle photo.jpg
      kdprompt predict runs/demo/bundle photos/ --k 3 --json > predictions.jsonl
    """
    from kdprompt.deploy import load_bundle
    from kdprompt.deploy.files import Skipped, iter_input_files, predict_files

    bundle = load_bundle(bundle_dir, device=resolve_device(device), backend=backend)
    files = list(iter_input_files(inputs))
    if not files:
        raise KdpromptError(f"no files found in {', '.join(map(str, inputs))}")
    if not as_json:
        header = ["image", *(f"top-{i + 1}" for i in range(min(k, len(bundle.classnames))))]
        click.echo("| " + " | ".join(header) + " |")
        click.echo("| " + " | ".join("---" for _ in header) + " |")
    done = skipped = 0
    candidates = False
    for result in predict_files(bundle, files, k, batch_size):
        if isinstance(result, Skipped):
            skipped += 1
            click.echo(f"skipped: {result.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": result.image, "error": result.error}))
            continue
        done += 1
        if as_json:
            fields = {"labels": result.labels, "probs": result.probs, "indices": result.indices}
            click.echo(json.dumps({"image": result.source, **fields, "probabilities": result.probabilities}))
        else:
            candidates = candidates or result.probabilities == "candidates"
            cells = [f"{label} ({prob:.3f})" for label, prob in zip(result.labels, result.probs, strict=True)]
            click.echo("| " + " | ".join([result.source, *cells]) + " |")
    click.echo(f"{done} image(s) classified, {skipped} skipped", err=True)
    if candidates:
        click.echo(
            f"note: probabilities are a softmax over the classes the FAISS index retrieved, not over all "
            f"{len(bundle.classnames):,} classes (each an upper bound); see docs/VOCABULARY.md",
            err=True,
        )
    if done == 0:
        raise KdpromptError(f"none of the {skipped} file(s) could be read as an image")


def mib(value: float) -> int:
    """``value`` MiB in bytes (at least 1)."""
    return max(1, int(value * 2**20))


@click.command("serve", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one)."
)
@batching_options
@click.option(
    "--max-image-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=8.0,
    show_default=True,
    help="Size of one encoded image at most (larger ones answer 413).",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images per request at most.",
)
@click.option(
    "--max-request-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="Size of one request body at most (larger ones answer 413).",
)
@click.option(
    "--max-request-megapixels",
    type=click.FloatRange(min=0, min_open=True),
    default=128.0,
    show_default=True,
    help="Decoded pixels of all the images of one request at most, in millions (more answer 413 before "
    "any is decoded). Large JPEGs count at the reduced size they are decoded at (about twice the "
    "model's input size).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds for a request's whole body to arrive; a slower or half-sent one answers 408 and its "
    "connection is closed.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Images waiting for the model at most; beyond it requests answer 503 with Retry-After.",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Classes per image when a request gives no k.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="uvicorn's log level (info logs every request).",
)
@user_errors
def serve_command(
    bundle_dir: Path,
    host: str,
    port: int,
    backend: str,
    device: str,
    max_batch: int,
    max_wait_ms: float,
    max_image_mb: float,
    max_images: int,
    max_request_mb: float,
    max_request_megapixels: float,
    body_timeout: float,
    max_queue: int,
    k: int,
    log_level: str,
) -> None:
    """Serve the bundle BUNDLE (from `kdprompt export`) as an HTTP JSON API.

    \b
    Endpoints:
      POST /v1/classify   top-k classes of one or more images, sent as multipart/form-data
                          (files in field 'images', optional 'k') or as application/json
                          {"images": ["<base64>", ...], "k": 5}
      GET  /v1/classes    the class names, in index order
      GET  /healthz       status, bundle name and fingerprint
      GET  /docs          the OpenAPI page (try the endpoints from the browser)

    Bad input (not an image, empty, too large, unknown field, malformed JSON) answers a 4xx with
    {"detail": "..."}; images of concurrent requests are classified in shared batches; when more than
    --max-queue images wait, requests answer 503 with Retry-After instead of queueing. A body that has
    not all arrived within --body-timeout answers 408; a request whose client hangs up is dropped
    before it reaches the model (one INFO line in the log).

    \b
    Examples:
      kdprompt serve bundles/dtd
      kdprompt serve bundles/dtd --host 0.0.0.0 --port 8080 --backend onnx
      curl -F images=@cat.jpg -F images=@dog.png -F k=3 http://127.0.0.1:8000/v1/classify

    Needs the serve extra: pip install 'kdprompt[serve]'.
    """
    from kdprompt.deploy import load_bundle
    from kdprompt.deploy.serve import create_app, require_serve_extra
    from kdprompt.deploy.serve.server import base_url, bind_socket, serve_forever

    require_serve_extra()  # before the bundle loads: fails fast
    bundle = load_bundle(bundle_dir, device=resolve_device(device), backend=backend)
    app = create_app(
        bundle,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_image_bytes=mib(max_image_mb),
        max_images=max_images,
        max_request_bytes=mib(max_request_mb),
        max_request_pixels=max(1, int(max_request_megapixels * 1e6)),
        body_timeout=body_timeout,
        max_queue=max_queue,
        default_k=k,
    )
    sock = bind_socket(host, port)
    url = base_url(sock)
    click.echo(f"serving {bundle.name} ({len(bundle.classnames)} classes, {backend}) on {url}")
    click.echo(f"API docs: {url}/docs   classify: curl -F images=@photo.jpg {url}/v1/classify")
    serve_forever(app, sock, log_level=log_level)
