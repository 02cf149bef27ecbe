"""The crash-point hook: inert by default, SIGKILL at the named pass."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.faults

SCRIPT = """
from kdprompt.faults import crash_point
for i in range(3):
    crash_point("loop")
    print(i, flush=True)
"""


@pytest.mark.parametrize(
    ("wanted", "printed", "killed"),
    [("", "0\n1\n2\n", False), ("loop@2", "0\n", True), ("other", "0\n1\n2\n", False)],
)
def test_crash_point_kills_at_the_named_pass(wanted, printed, killed):
    env = {"KDPROMPT_CRASH_AT": wanted, "PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout == printed
    assert (proc.returncode == -signal.SIGKILL) == killed
