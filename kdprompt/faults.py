"""Named crash points, so fault tests can ``kill -9`` a real run at an exact phase.

Writers that must survive a crash call :func:`crash_point` between their phases. It does nothing unless
``$KDPROMPT_CRASH_AT`` names that point (``name`` or ``name@N`` for its N-th pass, 1-based): then the
process sends itself SIGKILL, which no handler or ``finally`` can soften, like a power cut or the OOM
killer. Tests in ``tests/faults`` use it to prove the next start resumes or recovers.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "KDPROMPT_CRASH_AT"

_passes: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die by SIGKILL here if ``$KDPROMPT_CRASH_AT`` asks for this point (and this pass)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _passes[name] += 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
