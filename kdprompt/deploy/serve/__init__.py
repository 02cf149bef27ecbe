"""``kdprompt serve``: a bundle behind an HTTP JSON API (FastAPI + uvicorn, the ``serve`` extra).

:func:`create_app` builds the app (imported lazily, so ``import kdprompt.deploy.serve`` works without the
extra); :class:`~kdprompt.deploy.serve.batcher.MicroBatcher` batches concurrent requests;
:func:`~kdprompt.deploy.serve.loadtest.run_load_test` measures a running server with the standard library.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kdprompt.errors import KdpromptError

SERVE_EXTRA_HINT = "kdprompt serve needs the serve extra: pip install 'kdprompt[serve]'"


def require_serve_extra() -> None:
    """Raise a :class:`KdpromptError` naming the fix when FastAPI, uvicorn or python-multipart is missing."""
    multipart = importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if multipart is None:
        missing.append("python-multipart")
    if missing:
        raise KdpromptError(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")


def __getattr__(name: str) -> Any:
    if name == "create_app":
        require_serve_extra()
        from kdprompt.deploy.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SERVE_EXTRA_HINT", "create_app", "require_serve_extra"]
