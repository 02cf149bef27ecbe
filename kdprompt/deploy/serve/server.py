"""Run an app with uvicorn: in the foreground (``kdprompt serve``) or in a thread (``kdprompt bench serve``).

The listening socket is bound here rather than by uvicorn, so a busy port is a clean
:class:`KdpromptError` and port 0 (any free port) prints the real address. The app's own log lines
(``kdprompt.deploy.serve.*``) go where uvicorn's do, and HTTP that uvicorn cannot parse is answered
with a JSON error like the app's.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kdprompt.errors import KdpromptError


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), ready for uvicorn.

    Raises:
        KdpromptError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP,
    # and accepted sockets inherit it; with proto 0 every keep-alive answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As uvicorn does: a restarted server may rebind while old connections are in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KdpromptError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from None
    return sock


def base_url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url`` and parse its JSON body (raises ``urllib.error.URLError`` / ``OSError`` on failure)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(url: str, timeout: float = 60.0, alive: threading.Thread | None = None) -> dict[str, Any]:
    """Poll ``url/healthz`` until it answers 200; returns its JSON.

    Raises:
        KdpromptError: no answer within ``timeout`` seconds, or the ``alive`` thread died.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get_json(f"{url}/healthz", timeout=2.0)
        except (OSError, ValueError):
            pass
        if alive is not None and not alive.is_alive():
            raise KdpromptError(f"the server at {url} stopped while starting; see the log above")
        if time.monotonic() > deadline:
            raise KdpromptError(f"the server at {url} did not answer /healthz within {timeout:.0f} s")
        time.sleep(0.05)


APP_LOGGER = "kdprompt.deploy.serve"


def _json_error_protocol() -> type:
    """uvicorn's h11 protocol, answering a request it cannot parse with JSON ``{"detail": ...}``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(
                {"detail": f"malformed HTTP request ({msg.rstrip('.')}); send a well-formed HTTP/1.1 request"}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorH11Protocol


def uvicorn_config(app: Any, log_level: str) -> Any:
    """The ``uvicorn.Config`` serving ``app``: its lifespan, JSON protocol errors, the app's log lines."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    # Propagating too: harmless without root handlers (the CLI has none), and lets pytest capture it.
    log_config["loggers"][APP_LOGGER] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": True,
    }
    return uvicorn.Config(
        app, log_level=log_level, lifespan="on", http=_json_error_protocol(), log_config=log_config
    )


def serve_forever(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` with uvicorn until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])


@contextmanager
def background_server(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port of ``host``; yields its URL once healthy."""
    import uvicorn

    sock = bind_socket(host, 0)
    url = base_url(sock)
    server = uvicorn.Server(uvicorn_config(app, log_level))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="kdprompt-serve", daemon=True
    )
    thread.start()
    try:
        wait_healthy(url, alive=thread)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
