"""``kdprompt serve`` (a bundle behind an HTTP JSON API) and ``kdprompt bench serve`` (its load test).

Kept apart from :mod:`kdprompt.cli`, which registers the commands; FastAPI and uvicorn (the ``serve``
extra) are imported inside the commands, so ``kdprompt --help`` works without them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import click

from kdprompt.bundle_cli import runtime_options
from kdprompt.cli_common import CONTEXT_SETTINGS, resolve_device, user_errors
from kdprompt.errors import KdpromptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_BENCH_IMAGES = 256


def _load(bundle_dir: Path, backend: str, device: str) -> Any:
    """The serve extra checked first (fails fast), then the bundle loaded on ``device``."""
    from kdprompt.deploy import load_bundle
    from kdprompt.deploy.serve import require_serve_extra

    require_serve_extra()
    return load_bundle(bundle_dir, device=resolve_device(device), backend=backend)


def _app(bundle: Any, max_batch: int, max_wait_ms: float, **limits: Any) -> Any:
    """The app with the shared batching options; ``limits`` are further :func:`create_app` arguments."""
    from kdprompt.deploy.serve import create_app

    return create_app(bundle, max_batch=max_batch, max_wait_ms=max_wait_ms, **limits)


def _mib(value: float) -> int:
    return max(1, int(value * 2**20))


def _bundle_options(fn: Any) -> Any:
    """Options shared by ``serve`` and ``bench serve``: how the bundle runs and batches."""
    options = [
        click.option(
            "--max-batch",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Images per model call at most (concurrent requests share calls).",
        ),
        click.option(
            "--max-wait-ms",
            type=click.FloatRange(min=0),
            default=5.0,
            show_default=True,
            help="How long an image waits for others to share its model call.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return runtime_options(fn)


@click.command("serve", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one)."
)
@_bundle_options
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
    --max-queue images wait, requests answer 503 with Retry-After instead of queueing.

    \b
    Examples:
      kdprompt serve bundles/dtd
      kdprompt serve bundles/dtd --host 0.0.0.0 --port 8080 --backend onnx
      curl -F images=@cat.jpg -F images=@dog.png -F k=3 http://127.0.0.1:8000/v1/classify

    Needs the serve extra: pip install 'kdprompt[serve]'.
    """
    from kdprompt.deploy.serve.server import base_url, bind_socket, serve_forever

    bundle = _load(bundle_dir, backend, device)
    app = _app(
        bundle,
        max_batch,
        max_wait_ms,
        max_image_bytes=_mib(max_image_mb),
        max_images=max_images,
        max_request_bytes=_mib(max_request_mb),
        max_queue=max_queue,
        default_k=k,
    )
    sock = bind_socket(host, port)
    url = base_url(sock)
    click.echo(f"serving {bundle.name} ({len(bundle.classnames)} classes, {backend}) on {url}")
    click.echo(f"API docs: {url}/docs   classify: curl -F images=@photo.jpg {url}/v1/classify")
    serve_forever(app, sock, log_level=log_level)


def synthetic_images(size: tuple[int, int], count: int = 16, seed: int = 0) -> list[bytes]:
    """``count`` PNGs of random shapes on random backgrounds, ``size`` = (H, W)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    height, width = size
    out = []
    for _ in range(count):
        img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            x1, y1 = sorted((x0, rng.randrange(width))), sorted((y0, rng.randrange(height)))
            box = (x1[0], y1[0], x1[1] + 1, y1[1] + 1)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def read_images(folder: Path) -> list[bytes]:
    """The bytes of the image files under ``folder`` (by suffix, sorted, at most ``MAX_BENCH_IMAGES``).

    Raises:
        KdpromptError: no image files there.
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise KdpromptError(
            f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under it"
        )
    return [p.read_bytes() for p in files[:MAX_BENCH_IMAGES]]


def _table(figures: dict[str, Any]) -> str:
    cols = [
        ("requests", "requests"),
        ("concurrency", "concurrency"),
        ("errors", "errors"),
        ("req/s", "req_per_s"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("mean ms", "mean_ms"),
        ("images/batch", "mean_batch"),
    ]
    head = "| " + " | ".join(name for name, _ in cols) + " |"
    rule = "|" + "|".join("---:" for _ in cols) + "|"
    row = "| " + " | ".join(str(figures[key]) for _, key in cols) + " |"
    return "\n".join([head, rule, row])


@click.command("serve", context_settings=CONTEXT_SETTINGS)
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option(
    "--requests",
    "n_requests",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Requests in all (one image each).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Requests in flight."
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A folder of image files to send (default: PNG drawings at 4x the bundle's input size).",
)
@_bundle_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
@user_errors
def bench_serve_command(
    bundle_dir: Path,
    n_requests: int,
    concurrency: int,
    images_dir: Path | None,
    backend: str,
    device: str,
    max_batch: int,
    max_wait_ms: float,
    as_json: bool,
) -> None:
    """Load-test `kdprompt serve` on BUNDLE: requests/s and p50 / p99 latency of POST /v1/classify.

    Starts the server in this process on a free loopback port, sends a few warm-up requests, then
    --requests multipart requests of one image each, --concurrency at a time (one connection each),
    and prints requests/s, latency percentiles, errors and the mean images per model call.

    \b
    Examples:
      kdprompt bench serve bundles/dtd
      kdprompt bench serve bundles/dtd --requests 2000 --concurrency 32 --images ~/photos --json
    """
    from kdprompt.deploy.serve.loadtest import run_load_test
    from kdprompt.deploy.serve.server import background_server, get_json

    bundle = _load(bundle_dir, backend, device)
    if images_dir is not None:
        payloads = read_images(images_dir)
    else:
        _, height, width = bundle.input_size
        payloads = synthetic_images((4 * height, 4 * width))
    app = _app(bundle, max_batch, max_wait_ms)
    with background_server(app) as url:
        run_load_test(url, payloads, requests=min(n_requests, 2 * concurrency), concurrency=concurrency)
        before = get_json(f"{url}/healthz")["batcher"]
        figures = run_load_test(url, payloads, requests=n_requests, concurrency=concurrency)
        after = get_json(f"{url}/healthz")["batcher"]
    batches = after["batches"] - before["batches"]
    figures["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else 0.0
    figures.update(
        {
            "model": bundle.name,
            "backend": backend,
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "images": str(images_dir) if images_dir is not None else "synthetic",
        }
    )
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        click.echo(_table(figures))
        for sample in figures["error_samples"]:
            click.echo(f"error: {sample}", err=True)
