"""``kdprompt serve``: the HTTP API end to end on a real server process, its batcher, its load test."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kdprompt.deploy import Prediction  # noqa: E402
from kdprompt.deploy.serve.batcher import BatcherError, MicroBatcher  # noqa: E402
from kdprompt.deploy.serve.loadtest import encode_multipart, percentile, run_load_test  # noqa: E402

MAX_IMAGE_MB = 0.05  # 52428 bytes: small PNGs pass, a 256x256 noise PNG does not
MAX_IMAGES = 8


# ---------------------------------------------------------------------------------------- helpers


def _png(size: tuple[int, int], noise: bool = False, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    if noise:
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    img = Image.new("RGB", size, (20, 120, 220))
    img.paste((250, 250, 0), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(student_run) -> dict[str, bytes]:
    """Real images of the synthetic world (PNG), plus a JPEG of another size (resized by the server)."""
    files = sorted(Path(student_run["world_root"]).rglob("*.png"))[:3]
    assert files, "the synthetic world has no PNG images"
    out = {f"{p.parent.name}-{p.name}": p.read_bytes() for p in files}
    out["drawing.jpg"] = _jpeg((96, 72))
    return out


@pytest.fixture(scope="module")
def local_bundle(bundle_dir):
    from kdprompt.deploy import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """``kdprompt serve BUNDLE --port 0`` as a real process; yields its base URL."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-c",
        "from kdprompt.cli.deployment import serve_command; serve_command()",
        str(bundle_dir),
        "--port",
        "0",
        "--max-image-mb",
        str(MAX_IMAGE_MB),
        "--max-images",
        str(MAX_IMAGES),
        "--log-level",
        "warning",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = _wait_for_server(proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_server(proc: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    """The URL the server prints, once its /healthz answers."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        if url is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def _assert_same(got: list[dict], want: list[Prediction], sources: list[str]) -> None:
    assert [p["source"] for p in got] == sources
    for g, w in zip(got, want, strict=True):
        assert g["labels"] == w.labels and g["indices"] == w.indices
        assert g["probs"] == pytest.approx(w.probs, abs=1e-5)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_classify_multipart_several_images(client, images, local_bundle):
    names = list(images)
    files = [("images", (name, images[name], "application/octet-stream")) for name in names]
    response = client.post("/v1/classify", files=files, data={"k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == local_bundle.name and body["k"] == 3
    assert all(len(p["labels"]) == 3 and p["probabilities"] == "full" for p in body["predictions"])
    _assert_same(body["predictions"], local_bundle.predict([images[n] for n in names], k=3), names)
    # The singular field name works too, and k defaults to 5.
    one = client.post("/v1/classify", files={"image": ("one.png", images[names[0]])})
    assert one.status_code == 200, one.text
    _assert_same(one.json()["predictions"], local_bundle.predict(images[names[0]], k=5), ["one.png"])


@pytest.mark.slow
def test_classify_json_base64(client, images, local_bundle):
    data = list(images.values())[:2]
    encoded = [
        base64.b64encode(data[0]).decode(),
        "data:image/png;base64," + base64.b64encode(data[1]).decode(),
    ]
    response = client.post("/v1/classify", json={"images": encoded, "k": 2})
    assert response.status_code == 200, response.text
    _assert_same(response.json()["predictions"], local_bundle.predict(data, k=2), ["images[0]", "images[1]"])


@pytest.mark.slow
def test_classes_health_and_docs(client, local_bundle):
    classes = client.get("/v1/classes").json()
    assert classes["classes"] == local_bundle.classnames and classes["num_classes"] == 48
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == local_bundle.name
    assert health["fingerprint"] == local_bundle.manifest["fingerprint"] and health["num_classes"] == 48
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert local_bundle.name in spec["info"]["title"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SMALL = _png((32, 32))
BAD_REQUESTS = {
    "not-an-image": (
        {"files": {"images": ("notes.txt", b"these are not pixels")}},
        400,
        "images[0] (notes.txt) is not an image",
    ),
    "empty-file": ({"files": {"images": ("empty.png", b"")}}, 400, "images[0] (empty.png) is empty"),
    "truncated": ({"files": {"images": ("cut.png", SMALL[:60])}}, 400, "images[0] (cut.png)"),
    "oversized": (
        {"files": {"images": ("big.png", _png((256, 256), noise=True))}},
        413,
        "over the server's limit",
    ),
    "oversized-base64": ({"json": {"images": [_b64(_png((256, 256), noise=True))]}}, 413, "images[0] is"),
    "too-many": (
        {"files": [("images", (f"{i}.png", SMALL)) for i in range(MAX_IMAGES + 1)]},
        413,
        "limit of 8",
    ),
    "too-many-json": ({"json": {"images": [_b64(SMALL)] * (MAX_IMAGES + 1)}}, 413, "9 images"),
    "bad-json": (
        {"content": b'{"images": [', "headers": {"content-type": "application/json"}},
        422,
        "valid JSON",
    ),
    "json-not-object": ({"json": [_b64(SMALL)]}, 422, "must be an object"),
    "wrong-form-field": ({"files": {"file": ("a.png", SMALL)}}, 422, "unknown form field 'file'"),
    "wrong-json-field": ({"json": {"pictures": [_b64(SMALL)]}}, 422, "'pictures'"),
    "images-not-list": ({"json": {"images": 3}}, 422, "list of base64"),
    "image-not-string": ({"json": {"images": [3]}}, 422, "images[0] must be a base64 string"),
    "bad-base64": ({"json": {"images": ["not base64!"]}}, 400, "images[0] is not valid base64"),
    "no-images-json": ({"json": {"images": []}}, 400, "no images"),
    "no-images-form": ({"files": {"k": (None, "3")}}, 400, "no images"),
    "urlencoded-form": ({"data": {"k": "3"}}, 415, "unsupported content type"),
    "k-zero": ({"files": {"images": ("a.png", SMALL)}, "data": {"k": "0"}}, 400, "k must be at least 1"),
    "k-text": ({"json": {"images": [_b64(SMALL)], "k": "many"}}, 400, "k must be a whole number"),
    "k-superscript": (
        {"files": {"images": ("a.png", SMALL)}, "data": {"k": "²"}},
        400,
        "k must be a whole number",
    ),
    "k-5000-digits": (
        {"files": {"images": ("a.png", SMALL)}, "data": {"k": "9" * 5000}},
        400,
        "k must be a whole",
    ),
    "wrong-content-type": ({"content": SMALL, "headers": {"content-type": "image/png"}}, 415, "multipart"),
    "body-too-large": (
        {"content": b" " * 2**20, "headers": {"content-type": "application/json"}},
        413,
        "request body is over",
    ),
    "no-boundary": ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_answer_4xx_with_a_message(client, case):
    kwargs, status, message = BAD_REQUESTS[case]
    response = client.post("/v1/classify", **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail
    # The server is unharmed.
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/classify", files={"images": ("ok.png", SMALL)}).status_code == 200


@pytest.mark.slow
def test_load_test_has_no_errors(server, images):
    figures = run_load_test(server, list(images.values()), requests=500, concurrency=8)
    print(f"\nload test against kdprompt serve: {json.dumps(figures)}")
    assert figures["errors"] == 0, figures["error_samples"]
    assert figures["requests"] == 500 and figures["concurrency"] == 8
    assert figures["req_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    batcher = httpx.get(f"{server}/healthz").json()["batcher"]
    assert batcher["images"] >= 500 and batcher["batches"] <= batcher["images"]


@pytest.mark.slow
def test_model_failure_answers_500_with_a_message(local_bundle, monkeypatch):
    from fastapi.testclient import TestClient

    from kdprompt.deploy.serve import create_app

    def broken(batch, k, sources):
        raise RuntimeError("simulated encoder failure")

    monkeypatch.setattr(local_bundle, "predict_tensor", broken)
    with TestClient(create_app(local_bundle, max_wait_ms=0)) as c:
        response = c.post("/v1/classify", files={"images": ("a.png", SMALL)})
        assert response.status_code == 500 and "simulated encoder failure" in response.json()["detail"]
        assert c.get("/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_full_queue_answers_503_with_retry_after_and_big_bodies_413(local_bundle):
    from fastapi.testclient import TestClient

    from kdprompt.deploy.serve import create_app

    with TestClient(create_app(local_bundle, max_queue=1, max_request_bytes=4096)) as c:
        busy = c.post("/v1/classify", files=[("images", ("a.png", SMALL)), ("images", ("b.png", SMALL))])
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        big = c.post("/v1/classify", json={"images": [base64.b64encode(b"x" * 6000).decode()]})
        assert big.status_code == 413 and "4096 bytes in all" in big.json()["detail"]
        assert c.post("/v1/classify", files={"images": ("a.png", SMALL)}).status_code == 200


def test_serve_command_on_a_non_bundle_exits_2(tmp_path):
    from click.testing import CliRunner

    from kdprompt.cli.deployment import serve_command

    result = CliRunner().invoke(serve_command, [str(tmp_path), "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "is not a kdprompt bundle" in result.output and "kdprompt export" in result.output


def test_serve_command_without_the_extra_names_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    import kdprompt.deploy.serve
    from kdprompt.cli.deployment import serve_command

    real = importlib.util.find_spec
    monkeypatch.setattr(
        kdprompt.deploy.serve.importlib.util,
        "find_spec",
        lambda name: None if name == "uvicorn" else real(name),
    )
    result = CliRunner().invoke(serve_command, [str(tmp_path)])
    assert (
        result.exit_code == 2
        and "pip install 'kdprompt[serve]'" in result.output
        and "uvicorn" in result.output
    )


@pytest.mark.slow
def test_bench_serve_command(bundle_dir):
    from click.testing import CliRunner

    from kdprompt.cli.benchmarks import bench_serve_command

    result = CliRunner().invoke(
        bench_serve_command, [str(bundle_dir), "--requests", "40", "--concurrency", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["errors"] == 0 and figures["requests"] == 40 and figures["mean_batch"] >= 1


# ----------------------------------------------------------------------- clients that go or stall


class _Records(logging.Handler):
    """Keeps the log records of the server's loggers (uvicorn's and the app's)."""

    NAMES = ("uvicorn.error", "kdprompt.deploy.serve")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]

    def errors(self) -> list[str]:
        """Records at ERROR or above, or carrying a traceback."""
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


@contextmanager
def _served(app) -> Iterator[tuple[str, _Records]]:
    """``app`` under uvicorn in a thread (as ``kdprompt serve`` runs it); yields its URL and its log."""
    from kdprompt.deploy.serve.server import background_server

    records = _Records()
    with background_server(app, log_level="info") as url:
        # After uvicorn configured logging (which replaces the handlers of the loggers it names).
        for name in _Records.NAMES:
            logging.getLogger(name).addHandler(records)
        try:
            yield url, records
        finally:
            for name in _Records.NAMES:
                logging.getLogger(name).removeHandler(records)


def _send_raw(
    url: str, body: bytes, content_type: str, *, content_length: int | None = None
) -> socket.socket:
    """A connection that has sent a classify request: its headers, then ``body`` (maybe only part of it)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    length = len(body) if content_length is None else content_length
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.slow
def test_abandoned_requests_never_reach_the_model(local_bundle, monkeypatch):
    from kdprompt.deploy.serve import create_app

    abandoned, model_s = 10, 0.5
    first_call_may_end = threading.Event()
    batch_sizes: list[int] = []
    real = local_bundle.predict_tensor

    def slow_model(batch, k, sources):
        batch_sizes.append(len(batch))
        if len(batch_sizes) == 1:
            first_call_may_end.wait(20)  # hold the model while the other requests queue up behind it
        time.sleep(model_s)
        return real(batch, k, sources)

    monkeypatch.setattr(local_bundle, "predict_tensor", slow_model)
    app = create_app(local_bundle, max_batch=8, max_wait_ms=0)
    batcher = app.state.batcher
    body, content_type = encode_multipart([(f"{i}.png", SMALL) for i in range(8)])
    with _served(app) as (url, log):
        clients = [_send_raw(url, body, content_type) for _ in range(abandoned)]
        # One request's images are in the model, the other nine requests' wait in the queue.
        assert _wait_until(lambda: batch_sizes == [8] and len(batcher._pending) == (abandoned - 1) * 8)
        for sock in clients:
            sock.close()
        _wait_until(lambda: not batcher._pending, timeout=5)
        first_call_may_end.set()
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/classify", files={"images": ("real.png", SMALL)}, timeout=60)
        elapsed = time.monotonic() - start
        _wait_until(lambda: len(log.matching("disconnected while waiting for its answer")) == abandoned)
    assert response.status_code == 200, response.text
    # The model ran the batch already in it when the clients left, then the real request: nothing else.
    assert batch_sizes == [8, 1]
    # Without the fix, the nine abandoned batches (4.5 s of model time) ran before the real request.
    assert elapsed < (abandoned - 1) * model_s / 2, elapsed
    assert len(log.matching("disconnected while waiting for its answer")) == abandoned
    assert log.errors() == []


@pytest.mark.slow
def test_client_hanging_up_mid_body_logs_one_line(local_bundle):
    from kdprompt.deploy.serve import create_app

    body, content_type = encode_multipart([(f"{i}.png", SMALL) for i in range(4)])
    ports = []
    with _served(create_app(local_bundle)) as (url, log):
        for _ in range(3):
            sock = _send_raw(url, body[: len(body) // 2], content_type, content_length=len(body))
            ports.append(sock.getsockname()[1])
            time.sleep(0.1)
            sock.close()
        _wait_until(lambda: len(log.matching("disconnected while sending its request body")) == 3)
        assert httpx.post(f"{url}/v1/classify", files={"images": ("ok.png", SMALL)}).status_code == 200
    assert log.errors() == [], "a hang-up was logged as an error (with a traceback)"
    lines = log.matching("disconnected while sending its request body")
    assert [r.levelno for r in lines] == [logging.INFO] * 3
    assert (
        sorted(f"client 127.0.0.1:{port} " in r.getMessage() for port in ports for r in lines).count(True)
        == 3
    )


@pytest.mark.slow
def test_half_sent_body_answers_408_and_closes(local_bundle):
    from kdprompt.deploy.serve import create_app

    body, content_type = encode_multipart([("a.png", SMALL)])
    with _served(create_app(local_bundle, body_timeout=0.5)) as (url, log):
        start = time.monotonic()
        sock = _send_raw(url, body[: len(body) // 2], content_type, content_length=len(body))
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
        elapsed = time.monotonic() - start
        sock.close()
        assert httpx.post(f"{url}/v1/classify", files={"images": ("ok.png", SMALL)}).status_code == 200
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert "--body-timeout" in json.loads(payload)["detail"]
    assert 0.5 <= elapsed < 5
    (line,) = log.matching("sent no complete request body")
    assert line.levelno == logging.WARNING and "client 127.0.0.1:" in line.getMessage()
    assert log.errors() == []


def _photo(size: tuple[int, int]) -> bytes:
    """A JPEG with some structure (so that a draft-decoded copy could differ)."""
    img = Image.radial_gradient("L").resize(size).convert("RGB")
    img.paste((250, 250, 0), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_large_jpeg_opens_as_a_draft_other_formats_whole():
    from kdprompt.deploy.serve.inputs import decode_image, open_image

    jpeg = _photo((1024, 768))
    # 1/8 scale leaves 128x96, both sides still >= 64; a full decode would be 1024x768.
    assert open_image(jpeg, "big.jpg", 2**26, draft_size=64).size == (128, 96)
    assert decode_image(jpeg, "big.jpg", 2**26, draft_size=64).size == (128, 96)
    assert open_image(jpeg, "big.jpg", 2**26, draft_size=448).size == (1024, 768)  # 1/2 would be < 448
    assert open_image(jpeg, "big.jpg", 2**26).size == (1024, 768)
    assert open_image(_png((1024, 768)), "big.png", 2**26, draft_size=64).size == (1024, 768)


@pytest.mark.slow
def test_served_large_jpeg_is_decoded_through_a_draft(local_bundle, monkeypatch):
    from fastapi.testclient import TestClient

    import kdprompt.deploy.serve.app as serve_app
    from kdprompt.deploy.serve import create_app
    from kdprompt.deploy.serve.inputs import decode_image

    decoded_sizes = []
    real_load = serve_app.load_rgb

    def recording_load(img, name, max_pixels):
        decoded_sizes.append(img.size)
        return real_load(img, name, max_pixels)

    monkeypatch.setattr(serve_app, "load_rgb", recording_load)
    jpeg = _photo((1024, 768))
    with TestClient(create_app(local_bundle)) as c:
        response = c.post("/v1/classify", files={"images": ("big.jpg", jpeg)}, data={"k": "3"})
    assert response.status_code == 200, response.text
    # The bundle's inputs are 32x32: drafted to twice that at least, not decoded at 1024x768.
    assert local_bundle.input_size == (3, 32, 32) and decoded_sizes == [(128, 96)]
    (got,) = response.json()["predictions"]
    (want,) = local_bundle.predict(decode_image(jpeg, "big.jpg", 2**26, draft_size=64), k=3)
    assert got["indices"] == want.indices and got["probs"] == pytest.approx(want.probs, abs=1e-5)


@pytest.mark.slow
def test_request_over_the_total_pixel_limit_answers_413_before_decoding(local_bundle, monkeypatch):
    from fastapi.testclient import TestClient

    import kdprompt.deploy.serve.app as serve_app
    from kdprompt.deploy.serve import create_app

    loads = []
    monkeypatch.setattr(serve_app, "load_rgb", lambda *args: loads.append(args) or Image.new("RGB", (8, 8)))
    png = _png((100, 100))
    with TestClient(create_app(local_bundle, max_request_pixels=25_000)) as c:
        # 3 x 10,000 pixels; the last file is cut after its header: decoding it would answer 400.
        files = [("images", ("a.png", png)), ("images", ("b.png", png)), ("images", ("cut.png", png[:80]))]
        response = c.post("/v1/classify", files=files)
        within = c.post("/v1/classify", files=files[:2])
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "0.03 megapixels" in detail and "limit of 0.025 megapixels" in detail
    assert "--max-request-megapixels" in detail
    assert within.status_code == 200 and len(loads) == 2  # only the request within the limit was decoded


# ------------------------------------------------------------------------------------------ batcher


class FakeModel:
    """Stands in for ``Bundle.predict_tensor``: records batch sizes; prediction = the image's first pixel."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, batch: torch.Tensor, k: int, sources) -> list[Prediction]:
        self.calls.append((batch.shape[0], k))
        if self.fail:
            raise RuntimeError("simulated model failure")
        time.sleep(0.005)
        return [
            Prediction([str(int(x[0, 0, 0]))] * k, [1.0 / (j + 1) for j in range(k)], list(range(k)), s)
            for x, s in zip(batch, sources, strict=True)
        ]


def _image(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(value))


def _run(coro, timeout: float = 10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_batcher_batches_concurrent_requests():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=64, max_wait_ms=200)
        await batcher.start()
        try:
            # Submitted in one tick: the worker finds them all waiting and runs them together.
            return await asyncio.gather(
                *(batcher.submit([_image(i)], 1 + i % 3, [f"r{i}"]) for i in range(20))
            ), batcher.stats()
        finally:
            await batcher.stop()

    results, stats = _run(main())
    assert len(model.calls) <= 2 and sum(n for n, _ in model.calls) == 20
    assert stats["images"] == 20 and stats["batches"] == len(model.calls)
    for i, (prediction,) in enumerate(results):
        # Each request gets its own k (the model ran with the largest) and its own image's answer.
        assert prediction.labels == [str(i)] * (1 + i % 3) and prediction.source == f"r{i}"
        assert len(prediction.probs) == len(prediction.indices) == 1 + i % 3
    assert {k for _, k in model.calls} == {3}


def test_batcher_refuses_beyond_its_queue():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=1, max_queue=3)
        await batcher.start()
        try:
            with pytest.raises(BatcherError) as refused:
                await batcher.submit([_image(i) for i in range(4)], 1, [f"i{i}" for i in range(4)])
            return refused.value, await batcher.submit([_image(1)], 1, ["ok"])
        finally:
            await batcher.stop()

    refused, accepted = _run(main())
    assert refused.status == 503 and "limit 3" in str(refused)
    assert accepted[0].labels == ["1"] and model.calls == [(1, 1)]


def test_batcher_splits_at_max_batch():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=50)
        await batcher.start()
        try:
            return await batcher.submit([_image(i) for i in range(10)], 2, [f"i{i}" for i in range(10)])
        finally:
            await batcher.stop()

    predictions = _run(main())
    assert [n for n, _ in model.calls] == [4, 4, 2]
    assert [p.labels[0] for p in predictions] == [str(i) for i in range(10)]


def test_batcher_model_failure_answers_the_waiting_requests():
    model = FakeModel(fail=True)

    async def main():
        batcher = MicroBatcher(model, max_batch=8, max_wait_ms=20)
        await batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.submit([_image(i)], 1, [f"r{i}"]) for i in range(3)), return_exceptions=True
            )
            model.fail = False  # the batcher keeps serving after a failed batch
            after = await batcher.submit([_image(7)], 1, ["after"])
            return results, after
        finally:
            await batcher.stop()

    results, after = _run(main())
    assert all(isinstance(r, BatcherError) and "simulated model failure" in str(r) for r in results)
    assert results[0].status == 500
    assert after[0].labels == ["7"]


def test_batcher_stop_answers_pending_and_refuses_new():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=8, max_wait_ms=10_000)
        await batcher.start()
        pending = asyncio.ensure_future(batcher.submit([_image(1)], 1, ["r"]))
        await asyncio.sleep(0.05)  # the worker is waiting for more images to join the batch
        await batcher.stop()
        with pytest.raises(BatcherError) as refused:
            await batcher.submit([_image(2)], 1, ["late"])
        return await asyncio.gather(pending, return_exceptions=True), refused.value

    (result,), refused = _run(main())
    assert isinstance(result, BatcherError) and result.status == 503
    assert refused.status == 503 and model.calls == []


def test_percentile():
    values = sorted(float(v) for v in range(1, 101))
    assert (
        percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    )
    assert percentile([], 50) == 0.0 and percentile([3.0], 99) == 3.0


def test_batcher_forgets_cancelled_requests():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=8, max_wait_ms=200, max_queue=7)
        await batcher.start()
        try:
            # A request whose client went away is cancelled while its images wait for others to join.
            gone = asyncio.ensure_future(batcher.submit([_image(i) for i in range(7)], 1, ["gone"] * 7))
            await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            # Its images no longer fill the queue (this was a 503 "busy") nor reach the model.
            return await batcher.submit([_image(5)], 1, ["real"])
        finally:
            await batcher.stop()

    (prediction,) = _run(main())
    assert prediction.labels == ["5"] and model.calls == [(1, 1)]


def test_truncating_a_batched_prediction_keeps_how_its_probabilities_were_computed():
    from kdprompt.deploy import Prediction
    from kdprompt.deploy.serve.batcher import truncate

    wide = Prediction(
        labels=["a", "b", "c"],
        probs=[0.5, 0.3, 0.1],
        indices=[0, 1, 2],
        source="x",
        probabilities="candidates",
    )
    assert truncate(wide, 2) == Prediction(["a", "b"], [0.5, 0.3], [0, 1], "x", "candidates")
