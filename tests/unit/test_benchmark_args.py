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


def test_gpu_kernel_sweep_times_each_variant_against_the_reference(monkeypatch):
    """A lent GPU gets one call: the kernel sweep's plumbing is checked here, on CPU at a tiny size with the
    device timers swapped for host ones (the fused path is the PyTorch one on CPU). Every variant is a valid
    KernelConfig, each row has its times, the 2x-error verdict for its own config and its speedups over the
    reference timed in the same loop; a variant that fails is recorded, and the others still run."""
    import torch

    from vlscale.kernels.adapter import KernelConfig

    section = _bench("gpu_kernels_section")
    ak = section.ak
    monkeypatch.setattr(section, "TOKENS", 48)
    monkeypatch.setattr(section, "D_MODEL", 32)
    monkeypatch.setattr(section, "HIDDEN", (16,))
    make, check = ak.make_inputs, ak.check_low_precision
    monkeypatch.setattr(ak, "make_inputs", lambda t, d, h, dtype, device, seed=0: make(t, d, h, torch.float32, "cpu"))
    monkeypatch.setattr(ak, "gpu_and_host_time",
                        lambda fn, grads: (ak._time({"f": fn}, "cpu", repeats=1, grad_to_none=grads)["f"], 0.0))
    configs = []

    def checked(device, dtype, *args, config=None, **kw):
        configs.append(config)
        if config.rows_block_m == 16:
            raise RuntimeError("out of resource: shared memory")
        return check("cpu", torch.float32, *args, config=config, **kw)

    monkeypatch.setattr(ak, "check_low_precision", checked)
    monkeypatch.setattr(section, "_kernel_breakdown", lambda fn, grads: [{"kernel": "k", "us_per_call": 1.0}])
    rows = section.sweep(torch.float32)["16"]
    assert list(rows) == ["reference", *section.VARIANTS]
    assert configs == [KernelConfig(**kw) for kw in section.VARIANTS.values()]
    assert rows["rows_m16"] == {"error": "RuntimeError: out of resource: shared memory"}
    for name, row in rows.items():
        if name in ("reference", "rows_m16"):
            continue
        assert row["lowp_pass"] is True and row["fwd_us"] > 0 and row["fwd_bwd_us"] > 0, name
        assert row["fwd_bwd_speedup"] == round(rows["reference"]["fwd_bwd_us"] / row["fwd_bwd_us"], 3), name
        assert ("kernels" in row) == (name in ("default", "rows")), name
    assert "kernels" in rows["reference"]
