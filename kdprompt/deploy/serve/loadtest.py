"""A bounded load test of a running ``kdprompt serve``: its HTTP client is the standard library only.

``concurrency`` threads each keep one HTTP/1.1 connection open and send multipart ``POST /v1/classify``
requests (one image each, cycling through the payloads) until ``requests`` have been sent in all. The
payloads are drawn by :func:`synthetic_images` or read from a folder by :func:`read_images`.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kdprompt.data.types import IMAGE_SUFFIXES
from kdprompt.errors import KdpromptError

CLASSIFY_PATH = "/v1/classify"
MAX_BENCH_IMAGES = 256


class _Connection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off.

    http.client sends the headers and the body in two writes; with Nagle on, the body waits for the
    server's delayed ACK of the headers (~40 ms a request on Linux), which would be measured as latency.
    """

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def encode_multipart(
    files: list[tuple[str, bytes]], fields: dict[str, str] | None = None, field: str = "images"
) -> tuple[bytes, str]:
    """A multipart/form-data body with ``files`` (filename, bytes) in ``field`` plus text ``fields``.

    Returns:
        The body and its Content-Type header value.
    """
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of ascending ``sorted_values`` (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _endpoint(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"load test URL must be http://HOST[:PORT][/...], got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(CLASSIFY_PATH):
        path += CLASSIFY_PATH
    return parts.hostname, parts.port or 80, path


def run_load_test(
    url: str, payloads: list[bytes], requests: int = 500, concurrency: int = 8, timeout: float = 30
) -> dict[str, Any]:
    """Send ``requests`` classify requests, ``concurrency`` at a time, and time them.

    Args:
        url: the server (``http://HOST:PORT``) or its classify URL.
        payloads: encoded images; request ``i`` sends ``payloads[i % len(payloads)]``.
        requests: requests in all.
        concurrency: requests in flight at once (one thread and connection each).
        timeout: seconds one request may take before it counts as an error.

    Returns:
        ``requests``, ``concurrency``, ``errors`` (non-200 answers, bad bodies or connection failures),
        ``seconds``, ``req_per_s``, ``mean_ms``, ``p50_ms``, ``p99_ms``, ``max_ms`` (latencies of the
        successful requests) and ``error_samples`` (the first few error messages).
    """
    if not payloads:
        raise ValueError("run_load_test needs at least one payload image")
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests and concurrency must be >= 1, got {requests} and {concurrency}")
    host, port, path = _endpoint(url)
    bodies = [encode_multipart([(f"image{i}.png", data)]) for i, data in enumerate(payloads)]
    lock = threading.Lock()
    next_index = 0
    latencies: list[float] = []
    errors: list[str] = []

    def take() -> int | None:
        nonlocal next_index
        with lock:
            if next_index >= requests:
                return None
            next_index += 1
            return next_index - 1

    def one(conn: http.client.HTTPConnection, i: int) -> str | None:
        """Send request ``i``; None when it succeeded, else what went wrong."""
        body, content_type = bodies[i % len(bodies)]
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            return f"HTTP {response.status}: {data[:200].decode(errors='replace')}"
        if len(json.loads(data).get("predictions", [])) != 1:
            return f"HTTP 200 without one prediction: {data[:200].decode(errors='replace')}"
        return None

    def worker() -> None:
        conn = _Connection(host, port, timeout=timeout)
        try:
            while (i := take()) is not None:
                start = time.perf_counter()
                try:
                    error = one(conn, i)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    conn.close()  # reconnect on the next request
                elapsed = time.perf_counter() - start
                with lock:
                    if error is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, name=f"loadtest-{n}", daemon=True) for n in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = sorted(1000.0 * s for s in latencies)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": len(errors),
        "seconds": round(seconds, 3),
        "req_per_s": round(requests / seconds, 1) if seconds > 0 else 0.0,
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else 0.0,
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else 0.0,
        "error_samples": errors[:5],
    }


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
