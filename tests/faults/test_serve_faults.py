"""A seeded fuzz of HTTP requests against a real ``kdprompt serve``: every one answers a 4xx with JSON.

Requests are written byte by byte on raw sockets (so they can be malformed below HTTP): garbage bodies,
wrong content types, truncated or broken multipart, bad JSON, non-image files, hostile ``k`` values,
huge headers, unknown routes and methods, garbage request lines, bodies shorter than declared. Nothing
may answer a 5xx or leave a traceback in the server's log, and the server must still answer a good
request afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from kdprompt.deploy.serve.loadtest import encode_multipart
from kdprompt.deploy.serve.server import wait_healthy

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.faults

SEED = 0
REQUESTS = 160
BODY_TIMEOUT_S = 1.0


def _png(size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 90)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
HOSTILE_K = ["-1", "0", "9" * 5000, "²", "١٢", "1e3", "1.5", " ", "\u00a0", "k", "0x10", "🙂", "\x00", "nan"]
NOT_IMAGES = [b"", b"GIF89a", b"%PDF-1.4 not an image", PNG[:60], PNG[:8], os.urandom(200), b"\xff\xd8\xff"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "text/plain",
    "image/png",
    "application/x-www-form-urlencoded",
    "application/problem+json",
    "",
]


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """``kdprompt serve`` as a real process logging at info; yields (host, port, log path)."""
    log = tmp_path_factory.mktemp("serve-faults") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        *(sys.executable, "-m", "kdprompt", "serve", str(bundle_dir), "--port", "0"),
        *("--max-image-mb", "0.05", "--max-images", "8", "--body-timeout", str(BODY_TIMEOUT_S)),
        *("--log-level", "info"),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while not (found := re.search(r"on http://(127\.0\.0\.1):(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        host, port = found.group(1), int(found.group(2))
        wait_healthy(f"http://{host}:{port}")
        yield host, port, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ requests


def _request(
    method: str, path: str, headers: dict[str, str], body: bytes = b"", length: int | None = None
) -> bytes:
    """Raw HTTP/1.1 bytes; ``length`` overrides Content-Length (a body shorter or longer than declared)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or length is not None or method == "POST":
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def _classify(content_type: str, body: bytes, length: int | None = None) -> bytes:
    headers = {"Content-Type": content_type} if content_type else {}
    return _request("POST", "/v1/classify", headers, body, length)


def _multipart(rng: random.Random) -> bytes:
    files = [(f"f{i}.png", rng.choice(NOT_IMAGES)) for i in range(rng.randint(0, 3))]
    fields = {"k": rng.choice(HOSTILE_K)} if rng.random() < 0.5 or not files else {}
    field = rng.choice(["images", "image", "file", "k"])
    body, content_type = encode_multipart(files, fields, field=field)
    if rng.random() < 0.4:  # truncated: the parts stop anywhere, Content-Length matches what is sent
        body = body[: rng.randrange(len(body))]
    elif rng.random() < 0.3:  # a boundary that does not match the body's
        content_type = "multipart/form-data; boundary=" + rng.choice(["other", "x" * 80, "\u00e9", '"'])
    return _classify(content_type, body)


def _json_body(rng: random.Random) -> bytes:
    payload: dict = {
        rng.choice(["images", "image", "pictures"]): [base64.b64encode(rng.choice(NOT_IMAGES)).decode()]
    }
    if rng.random() < 0.6:
        payload["k"] = rng.choice([*HOSTILE_K, -1, 0, 10**30, 1.5, None, [], {}, True, "3" * 20])
    text = json.dumps(payload, ensure_ascii=rng.random() < 0.5)
    mutation = rng.randrange(4)
    if mutation == 0:
        text = text[: rng.randrange(len(text))]
    elif mutation == 1:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["{", "]", '"', "\\", "\x00", "é", "[" * 5000]) + text[i + 1 :]
    elif mutation == 2:
        text = rng.choice(
            ["[]", "null", "3", '"images"', '{"images": 3}', '{"images": [3]}', '{"images": []}']
        )
    return _classify(rng.choice(["application/json", "application/vnd.x+json"]), text.encode())


def _garbage_body(rng: random.Random) -> bytes:
    return _classify(rng.choice(CONTENT_TYPES), os.urandom(rng.randrange(1, 4096)))


def _huge_headers(rng: random.Random) -> bytes:
    """Headers of tens of kB on a bad classify request: refused by the HTTP parser, else by the app."""
    if rng.random() < 0.5:
        headers = {"X-Big": "a" * rng.choice([20_000, 70_000, 300_000])}
    else:
        headers = {f"X-H{i}": "v" * 200 for i in range(rng.choice([100, 400, 1500]))}
    return _request("POST", "/v1/classify", {"Content-Type": "application/json", **headers}, b"{")


def _unknown_route(rng: random.Random) -> bytes:
    path = rng.choice(
        [
            "/v2/classify",
            "/v1/classify/x",
            "/../../etc/passwd",
            "/%00",
            "/v1/%ff",
            "/" + "a" * 8000,
            "/é",
            "/docs/x",
        ]
    )
    return _request(rng.choice(["GET", "POST"]), path, {})


def _unknown_method(rng: random.Random) -> bytes:
    method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "TRACE"])
    return _request(method, rng.choice(["/v1/classify", "/healthz", "/v1/classes"]), {})


def _bad_request_line(rng: random.Random) -> bytes:
    line = rng.choice(
        [
            os.urandom(rng.randrange(1, 200)).replace(b"\r", b"").replace(b"\n", b""),
            b"GET",
            b"GET / HTTP/9.9",
            b"POST /v1/classify HTTP/1.1\r\nContent-Length: -5",
            b"POST /v1/classify HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            b"POST /v1/classify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n",
        ]
    )
    return line.lstrip(b"\r\n") + b"\r\n\r\n" if line.strip() else b"X\r\n\r\n"


def _short_body(rng: random.Random) -> bytes:
    """A body cut short of its Content-Length: the server waits --body-timeout, then answers 408."""
    body, content_type = encode_multipart([("a.png", PNG)])
    return _classify(content_type, body[: len(body) // 2], length=len(body))


KINDS = [
    (_multipart, 30),
    (_json_body, 30),
    (_garbage_body, 20),
    (_huge_headers, 8),
    (_unknown_route, 10),
    (_unknown_method, 10),
    (_bad_request_line, 10),
]


def _requests(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    generators = [g for g, weight in KINDS for _ in range(weight)]
    out = [(g.__name__, g(rng)) for g in (rng.choice(generators) for _ in range(count))]
    return out + [("_short_body", _short_body(rng))] * 2


def _exchange(host: str, port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send ``raw``; read the answer, until its Content-Length or until the server closes the connection."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        # The server may answer and close before reading it all (a huge header, a refused body).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
                head, sep, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):
                    break
    return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, body[: int(headers.get("content-length", len(body)))]


def test_fuzzed_requests_answer_4xx_json_and_leave_no_traceback(server):
    host, port, log = server
    failures = []
    statuses: dict[int, int] = {}
    for kind, raw in _requests(SEED, REQUESTS):
        answer = _exchange(host, port, raw)
        try:
            status, headers, body = _parse(answer)
            detail = json.loads(body)["detail"]
            statuses[status] = statuses.get(status, 0) + 1
            assert 400 <= status < 500, status
            assert headers.get("content-type") == "application/json"
            assert isinstance(detail, str) and detail
        except Exception as exc:  # collect them all: one report names every bad answer
            failures.append(f"{kind}: {raw[:120]!r} -> {answer[:300]!r} ({type(exc).__name__}: {exc})")
    print(f"\nfuzz answers by status: {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures)
    assert statuses.get(408) == 2 and len(statuses) > 4, statuses  # the fuzz reached many kinds of answer

    good, content_type = encode_multipart([("ok.png", PNG)], {"k": "2"})
    status, _, body = _parse(_exchange(host, port, _classify(content_type, good)))
    assert status == 200 and len(json.loads(body)["predictions"][0]["labels"]) == 2

    text = Path(log).read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-5000:]
