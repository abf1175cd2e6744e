"""Running Triton kernel tests under the CPU interpreter.

Triton must see ``TRITON_INTERPRET=1`` before its first import, and other test modules import it earlier
(through open_clip), so a kernel test module re-runs itself in a child pytest process with the variable set.
"""

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


def run_in_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a child pytest with ``TRITON_INTERPRET=1`` and fail with its output if it fails."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", test_file]
    result = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
