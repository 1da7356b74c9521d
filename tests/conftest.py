"""Fixtures for every test directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from preloaded import PreloadedServer

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"


def launch_env(**extra) -> dict:
    """The environment of the suite's launched runs: CPU accelerator, no hub, the repository importable."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pytest_configure(config):
    # Started before collection, so its imports overlap the suite's own (see tests/preloaded.py).
    config._vlscale_preloaded = PreloadedServer(Path(tempfile.mkdtemp(prefix="vlscale_preloaded_")), launch_env())


def pytest_unconfigure(config):
    server = getattr(config, "_vlscale_preloaded", None)
    if server is not None:
        server.close()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def preloaded(pytestconfig) -> PreloadedServer:
    """Launched runs without ~8 s of imports each: ``preloaded.run(script, args, nproc=2, env=..., timeout=...)``
    or ``.start(...)`` (a Popen-like handle); see tests/preloaded.py."""
    return pytestconfig._vlscale_preloaded


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
