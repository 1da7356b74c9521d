"""Fixtures of the unit tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlscale.kernels import adapter as ka


@pytest.fixture(scope="session")
def triton_interpreter() -> dict:
    """Raw results of tests/unit/triton_interpreter_checks.py under ``TRITON_INTERPRET=1`` (one process)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop(ka.BACKEND_ENV, None)
    script = Path(__file__).with_name("triton_interpreter_checks.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
