"""The attention kernel (``circuitkit.core.kernels``), checked in a process of its own.

``tests/_kernel_cases.py`` compares the kernel with its PyTorch reference and the engine using
it with the engine's reference path. On the CPU it runs under Triton's interpreter, which must
be on before Triton is first imported, so it runs in a new Python process; on a GPU
(``CIRCUITKIT_TEST_DEVICE=cuda``) the same process runs the kernel compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _device import DEVICE

pytest.importorskip("triton", reason="Triton has no build for this platform")

TESTS = Path(__file__).parent


def test_kernel_cases():
    env = dict(os.environ, CIRCUITKIT_TEST_DEVICE=DEVICE)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    result = subprocess.run(
        [*command, str(TESTS / "_kernel_cases.py")],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report
