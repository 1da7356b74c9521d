"""Fixtures for every test directory."""

from __future__ import annotations

import importlib.util
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
