"""Run an app with uvicorn: in the foreground (``kdprompt serve``) or in a thread (``kdprompt bench serve``).

The listening socket is bound here rather than by uvicorn, so a busy port is a clean
:class:`KdpromptError` and port 0 (any free port) prints the real address.
"""

from __future__ import annotations

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


def serve_forever(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` with uvicorn until interrupted (Ctrl-C / SIGTERM shut it down cleanly)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on")).run(sockets=[sock])


@contextmanager
def background_server(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port of ``host``; yields its URL once healthy."""
    import uvicorn

    sock = bind_socket(host, 0)
    url = base_url(sock)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
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
