"""Fixtures for every test directory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"


@pytest.fixture(scope="session")
def launcher():
    """``launcher("evaluate").main([...])``: a launchers/ script as a module, to run its ``main`` in this
    process (the arguments are parsed as on the command line, without ~10 s of imports per launch)."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"launcher_{name}", LAUNCHERS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def triton_interpreter() -> dict:
    """Raw results of tests/unit/triton_interpreter_checks.py under ``TRITON_INTERPRET=1`` (one process)."""
    pytest.importorskip("triton")
    from vlscale.kernels import adapter as ka

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop(ka.BACKEND_ENV, None)
    script = Path(__file__).parent / "unit" / "triton_interpreter_checks.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
