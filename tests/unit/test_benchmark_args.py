"""Benchmark command lines that cannot give a meaningful figure are refused at once, saying why, instead of
running for minutes and then reporting a failure (or a success over nothing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_args_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(capsys, fn, argv, *parts):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for part in parts:
        assert part in err, (part, err)


def test_profile_accuracy_refuses_one_measured_step(capsys, monkeypatch):
    """One step's peak is its backward before Adam's moments exist (measured: the 1r zero2 adapter row's
    buffers 15% under the estimate at --steps 1, 0.4% at 2 and 3)."""
    bench = _bench("profile_accuracy")
    monkeypatch.setattr(bench, "run_one", lambda *a: pytest.fail("a row ran"))
    monkeypatch.setattr(bench, "knobs_main", lambda *a: pytest.fail("the knobs ran"))
    for argv in (["--steps", "1"], ["--steps", "0"], ["--knobs", "--steps", "1"]):
        _refused(capsys, bench.main, argv, f"--steps {argv[-1]}", "at least 2", "Adam")


def test_profile_accuracy_refuses_an_only_that_matches_nothing(capsys, monkeypatch):
    """It printed the (empty) table and 'within 10%: yes' for a mistyped name."""
    bench = _bench("profile_accuracy")
    monkeypatch.setattr(bench, "run_one", lambda *a: pytest.fail("a row ran"))
    monkeypatch.setattr(bench, "knobs_main", lambda *a: pytest.fail("the knobs ran"))
    _refused(capsys, bench.main, ["--only", "t5 adapter 1p"], "--only t5 adapter 1p", "1r zero2 adapter mbs4")
    _refused(capsys, bench.main, ["--knobs", "--only", "1r zero2"], "t5-small images default leaf")
    # a name of the other table is no match for this one
    _refused(capsys, bench.main, ["--only", "t5-small images"], "no configuration name")


def test_profile_accuracy_only_selects_by_substring(monkeypatch):
    bench = _bench("profile_accuracy")
    ran = []
    monkeypatch.setattr(bench, "run_one", lambda name, world, overrides, steps: ran.append((name, steps)) or {
        "name": name, "exact": True, "within_10pct": True, "errors": dict.fromkeys(bench.KEYS, 0.0),
        "predicted": dict.fromkeys(bench.KEYS, 1), "measured": dict.fromkeys(bench.KEYS, 1),
        "predicted_phase": "p", "measured_phase": "p", "wall_s": 0.0})
    assert bench.main(["--only", "offload", "--steps", "2"]) == 0
    assert ran == [(n, 2) for n, *_ in bench.CONFIGS if "offload" in n] and len(ran) == 2


def test_scale_check_needs_plan_presets(capsys):
    """``--check`` alone started the full default scale run (it only means something with --plan-presets)."""
    _refused(capsys, _bench("scale").parse_args, ["--check"], "--plan-presets")
    assert _bench("scale").parse_args(["--plan-presets", "--check"]).check


def test_gpu_suite_refuses_an_unknown_section_before_any_runs(capsys, tmp_path):
    """A lent GPU has 15 minutes: a typo in --sections ran every section before it, then stopped on a KeyError."""
    suite = _bench("gpu_suite")
    _refused(capsys, suite.main, ["--out", str(tmp_path / "o"), "--sections", "methods,kernal"],
             "unknown kernal", "kernels")
    _refused(capsys, suite.main, ["--out", str(tmp_path / "o"), "--sections", ","], "none given")
    assert not (tmp_path / "o").exists()


def test_gpu_suite_runs_every_section_it_lists():
    """Each name --sections accepts reaches a runner (a training run or a branch of the dispatch)."""
    suite = _bench("gpu_suite")
    source = (ROOT / "benchmarks" / "gpu_suite.py").read_text()
    missing = [s for s in suite.SECTIONS if s not in suite.TRAIN_RUNS and f'name == "{s}"' not in source]
    assert not missing and set(suite.TRAIN_RUNS) <= set(suite.SECTIONS), missing
