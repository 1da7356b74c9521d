"""Benchmark command lines that cannot give a meaningful figure are refused at once, saying why, instead of
running for minutes and then reporting a failure (or a success over nothing)."""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
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


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmarks_help_prints_and_exits_0(path, monkeypatch, capsys):
    """Run as a script with ``--help``: adapter_load_memory.py took it for a key=value override and ended in a
    ConfigError traceback, after starting its process group. In this process, so a script must leave the
    environment as it was (half_precision_stage0.py set VLSCALE_CPU_FP16=1 as it imported, and a later test of the
    same process saw fp16 let through on the CPU)."""
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put the repository first
    environ = dict(os.environ)
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(path), run_name="__main__")
        changed = sorted(k for k in {*environ, *os.environ} if environ.get(k) != os.environ.get(k))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert stop.value.code == 0, path.name
    assert "usage:" in capsys.readouterr().out, path.name
    assert not changed, f"{path.name} --help changed the environment: {changed}"


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


def _sweep_stand_ins(monkeypatch, section, times, fail=()):
    """The sweep's kernels and device timer replaced: each call's time is ``times[name][with backward]``,
    where name is "reference" or the VARIANTS entry whose KernelConfig the fused call got."""
    import torch

    from vlscale.kernels import adapter as kernels

    ak, last = section.ak, []
    by_config = {kernels.KernelConfig(**kw): name for name, kw in section.VARIANTS.items()}
    monkeypatch.setattr(section, "HIDDEN", (16,))
    monkeypatch.setattr(ak, "make_inputs", lambda t, d, h, dtype, device, seed=0: (
        [torch.ones(2, 3, requires_grad=True) for _ in range(5)], torch.ones(2, 3)))

    def reference(x, *w):
        last.append("reference")
        return x * 1.0

    def fused(x, *w, config):
        last.append(by_config[config])
        return x * 1.0

    def timer(fn, grads):
        for g in grads:
            g.grad = None
        last.clear()
        fn()
        if last[0] in fail:
            raise RuntimeError(f"{last[0]} failed")
        return times[last[0]][grads[0].grad is not None], 0.0

    monkeypatch.setattr(kernels, "adapter_reference", reference)
    monkeypatch.setattr(kernels, "fused_adapter", fused)
    monkeypatch.setattr(ak, "gpu_and_host_time", timer)
    monkeypatch.setattr(ak, "check_low_precision", lambda *a, **kw: {"pass": True})
    monkeypatch.setattr(section, "_kernel_breakdown", lambda fn, grads: [])


def test_gpu_kernel_sweep_speedups_and_bandwidth_are_over_the_reference(monkeypatch):
    """fwd and fwd+bwd speedups are reference time / variant time, the fwd+bwd row times the backward, and
    GB/s is the op's minimum bytes at the dtype's width over the variant's time; a reference that fails
    leaves the variants' own times, without speedups."""
    import torch

    section = _bench("gpu_kernels_section")
    times = {"reference": {False: 4e-6, True: 12e-6}, **{n: {False: 2e-6, True: 3e-6} for n in section.VARIANTS}}
    _sweep_stand_ins(monkeypatch, section, times)
    rows = section.sweep(torch.float32)["16"]
    gbps = round(section.ak.op_cost(section.TOKENS, section.D_MODEL, 16, 4)["fwd_bwd"]["bytes"] / 3.0 / 1e3, 1)
    assert rows["reference"] == {"fwd_us": 4.0, "fwd_bwd_us": 12.0, "kernels": []}
    for name in section.VARIANTS:
        r = rows[name]
        assert (r["fwd_us"], r["fwd_bwd_us"], r["fwd_speedup"], r["fwd_bwd_speedup"]) == (2.0, 3.0, 2.0, 4.0), name
        assert r["fwd_bwd_GBps"] == gbps and r["lowp_pass"] is True, name
    _sweep_stand_ins(monkeypatch, section, times, fail=("reference",))
    rows = section.sweep(torch.float32)["16"]
    assert rows["reference"] == {"error": "RuntimeError: reference failed"}
    assert rows["default"]["fwd_bwd_us"] == 3.0 and "fwd_bwd_speedup" not in rows["default"]


def test_gpu_kernel_section_verdicts(monkeypatch):
    """The acceptance rule per case: fwd+bwd speedup >= 1.5, and >= 70% of the copy bandwidth where the case is
    memory-bound (a compute-bound case is not held to it); ``pass`` needs both in every case, and
    ``correctness_pass`` every 2x-error check (3 hidden sizes + the odd gelu_tanh shape, per dtype). The copy
    bandwidth is measured once for both dtypes; a failed sweep is recorded beside the headline figures. Without
    CUDA the section says it was skipped."""
    import torch

    section = _bench("gpu_kernels_section")
    ak = section.ak
    cases = {}
    copies, floors_seen, checks = [], [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = {}
    assert section.run(out) == {"skipped": "CUDA is not available"} == out["kernels"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ak, "measure_copy_bandwidth", lambda device: copies.append(device) or 1e12)

    def run_benchmark(device, dtype, grid, activation, floors):
        floors_seen.append(dict(floors))
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        return {"cases": [{"hidden": h, "fwd_bwd": dict(zip(("speedup", "bound", "pct_copy_bw"), c))}
                          for h, c in zip(section.HIDDEN, cases[name])]}

    def check(device, dtype, tokens, d_model, hidden, activation):
        checks.append((dtype, tokens, hidden, activation))
        return {"pass": not (dtype == torch.float16 and hidden == 96)}

    monkeypatch.setattr(ak, "run_benchmark", run_benchmark)
    monkeypatch.setattr(ak, "check_low_precision", check)
    monkeypatch.setattr(section, "sweep", lambda: 1 / 0)
    cases["bf16"] = [(1.5, "memory", 70.0), (1.49, "compute", 10.0), (3.0, "memory", 69.9)]
    cases["fp16"] = [(2.0, "compute", 5.0)] * 3
    out = section.run({})
    got = [(v["dtype"], v["hidden"], v["speedup_ok"], v["bandwidth_ok"]) for v in out["acceptance"]["cases"]]
    assert got == [("bf16", 64, True, True), ("bf16", 128, False, True), ("bf16", 256, True, False),
                   ("fp16", 64, True, True), ("fp16", 128, True, True), ("fp16", 256, True, True)]
    assert out["acceptance"]["pass"] is False and out["correctness_pass"] is False
    assert len(checks) == 8 and checks[3] == (torch.bfloat16, 4099, 96, "gelu_tanh")
    assert copies == ["cuda"] and floors_seen == [{"copy_bandwidth": 1e12}] * 2
    assert "ZeroDivisionError" in out["sweep_bf16"]["error"] and out["results"]["fp16"]["cases"]
    cases["bf16"] = [(1.5, "memory", 70.0), (2.0, "compute", 10.0), (3.0, "memory", 60.0)]
    assert section.run({})["acceptance"]["pass"] is False  # the bandwidth alone fails it
    cases["bf16"][2] = (3.0, "memory", 80.0)
    assert section.run({})["acceptance"]["pass"] is True


def test_profile_accuracy_row_errors_and_verdicts(monkeypatch):
    """A row's error is (predicted - measured) / measured per component; ``exact`` needs params, grads and
    optimizer equal, ``within_10pct`` activations, buffers and peak within 10% either way (10% itself in);
    the main table passes only when every row does both."""
    from types import SimpleNamespace

    from vlscale.profiling import analytic, measure

    bench = _bench("profile_accuracy")
    measured = {"params": 100, "grads": 10, "optimizer": 40, "activations": 200, "buffers": 50, "peak": 1000,
                "peak_phase": "backward1", "rss_peak": 1}
    predicted = dict(measured, activations=220, buffers=45, peak=900)
    steps_run = []
    monkeypatch.setattr(measure, "measure_memory", lambda cfg, world, ds, steps: steps_run.append(steps) or measured)
    monkeypatch.setattr(analytic, "estimate_memory", lambda cfg, world, ds, device: SimpleNamespace(
        components=dict(predicted), peak_phase="backward"))
    row = bench.run_one("r", 1, [], 2)
    assert row["errors"] == {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "activations": 0.1, "buffers": -0.1,
                             "peak": -0.1}
    assert row["exact"] is True and row["within_10pct"] is True
    assert (row["predicted_phase"], row["measured_phase"]) == ("backward", "backward1")
    predicted["grads"] = 11
    assert bench.run_one("r", 1, [], 2)["exact"] is False
    predicted.update(grads=10, buffers=56)
    assert bench.run_one("r", 1, [], 2)["within_10pct"] is False
    predicted["buffers"] = 44  # under the measured figure by more than 10%: as much a miss
    assert bench.run_one("r", 1, [], 2)["within_10pct"] is False
    predicted["buffers"] = 45
    measured.update(buffers=0, optimizer=0)  # a component measured as 0 (no buffers; SGD's empty state)
    predicted["optimizer"] = 0
    row = bench.run_one("r", 1, [], 2)
    assert (row["errors"]["optimizer"], row["errors"]["buffers"], row["within_10pct"]) == (0.0, None, False)
    assert bench._pct(None) == "n/a" and bench._pct(-0.1234) == "-12.3%"
    measured.update(buffers=50, optimizer=40)
    predicted["optimizer"] = 40
    bench.run_one("r", 1, [], 5)
    assert steps_run == [2, 2, 2, 2, 2, 5]  # --steps reaches the measurement
    verdicts = iter([(True, True), (True, False)])

    def one(name, world, overrides, steps):
        exact, within = next(verdicts)
        return dict(row, name=name, exact=exact, within_10pct=within)

    monkeypatch.setattr(bench, "run_one", one)
    assert bench.main(["--only", "1r zero2 adapter mbs", "--json"]) == 1  # its second row misses the 10%


def test_profile_accuracy_knob_rows_compare_every_step_after_the_first(monkeypatch):
    """--knobs compares the peak of the training steps after the first (step 0 records DeepSpeed's trace)
    with the estimate's largest phase but the whole-model build's "init": error = (predicted - measured) /
    measured. The phase filter dropped every name ending in 0, so from --steps 11 on the peaks of steps 10,
    20, ... were left out too."""
    from types import SimpleNamespace

    from vlscale.profiling import analytic

    bench = _bench("profile_accuracy")
    monkeypatch.setattr(analytic, "estimate_memory", lambda cfg, world, ds, device: SimpleNamespace(
        phases={"init": 10_000, "forward": 500, "backward": 800}, detail={"zero3_gathered": 7}))
    peaks = {"init": 9_000, "forward0": 5_000, "backward0": 5_000, "step0": 5_000}
    peaks.update({f"{p}{i}": 600 + i for i in range(1, 12) for p in ("forward", "backward", "step")})
    peaks["backward10"] = 1_000
    row = bench.knob_row("t5-small", "images", "default", True, {"cfg": None, "ds_config": None},
                         {"phase_peaks": peaks}, 1.0)
    assert (row["measured_train_peak"], row["predicted_train_peak"], row["predicted_phase"]) == (1_000, 800, "backward")
    assert row["error"] == -0.2 and row["zero3_gathered"] == 7


def test_gpu_suite_training_figures_and_the_resume_comparison(monkeypatch, tmp_path):
    """A training section reports its losses, the means of the first and last five, whether every loss is
    finite, the loss scale and skipped steps where fp16 logged them, and the run_summary figures; ``resume``
    compares steps 4-6 of the straight run with the resumed run's last three."""
    import json
    from types import SimpleNamespace

    suite = _bench("gpu_suite")
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25]

    def command(cmd, timeout):
        run_dir = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        log = [{"step": i + 1, "loss": x, "loss_scale": 2.0 ** (8 - i), "skipped": i == 1}
               for i, x in enumerate(losses)]
        (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (run_dir / "run_summary.json").write_text(json.dumps({"step_time_s": 0.5, "zero_stage": 3, "other": 1}))
        return SimpleNamespace(returncode=0, stdout="done"), {"rc": 0}

    monkeypatch.setattr(suite, "_command", command)
    res = suite.run_training("t", [], tmp_path, 10.0)
    assert res["losses"] == losses and res["all_finite"] is True
    assert res["loss_first5_mean"] == 3.0 and res["loss_last5_mean"] == (3.0 + 2.0 + 1.0 + 0.5 + 0.25) / 5
    assert res["loss_scale"] == [256.0, 128.0, 64.0, 32.0, 16.0, 8.0, 4.0] and res["skipped"] == [2]
    assert res["summary"]["step_time_s"] == 0.5 and res["summary"]["zero_stage"] == 3 and "other" not in res["summary"]
    losses[3] = float("nan")
    assert suite.run_training("t2", [], tmp_path, 10.0)["all_finite"] is False
    losses[3], losses[0] = float("-inf"), 1.234567
    res = suite.run_training("t3", [], tmp_path, 10.0)
    assert res["all_finite"] is False and res["losses"][0] == 1.2346  # 4 decimals

    runs = iter([{"losses": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0]}, {"losses": [9.0, 8.0, 7.0]},
                 {"losses": [6.0, 5.5, 4.25]}])
    monkeypatch.setattr(suite, "run_training", lambda *a, **kw: next(runs))
    res = suite.run_resume(tmp_path, 10.0)
    assert (res["steps_4_6_straight"], res["steps_4_6_resumed"]) == ([6.0, 5.0, 4.0], [6.0, 5.5, 4.25])
    assert res["max_abs_diff"] == 0.5


def test_gpu_suite_budget_skips_and_the_fused_over_unfused_ratio(monkeypatch, tmp_path):
    """A section starts only while 60% of its usual time is left of --budget-s, otherwise it is recorded as
    skipped; one that raises is recorded and the next still runs; fused_over_unfused_step_time is the bf16
    fused run's step time over the unfused one's; cuda_tests reports pytest's counts."""
    import json
    import subprocess
    from types import SimpleNamespace

    suite = _bench("gpu_suite")
    monkeypatch.setenv("VLSCALE_CACHE", str(tmp_path / "cache"))  # main() sets a default in os.environ
    clock = [0.0]
    monkeypatch.setattr(suite, "time", SimpleNamespace(perf_counter=lambda: clock[0], strftime=lambda f: "t"))

    def training(name, extra, runs_dir, timeout):
        clock[0] += 10.0
        if name == "full_ft_ckpt":
            raise RuntimeError("boom")
        return {"summary": {"step_time_s": {"train_bf16": 0.3, "train_bf16_unfused": 0.4}.get(name, 1.0)}}

    monkeypatch.setattr(suite, "run_training", training)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: SimpleNamespace(
        returncode=1, stdout="F..\n1 failed, 5 passed, 2 skipped, 40 deselected in 3.0s", stderr=""))
    # budget 100: after 3 x 10 s, 70 s are left; train_fp16 needs 0.6 x 60 = 36 s, cuda_tests 0.6 x 40 = 24 s
    suite.main(["--out", str(tmp_path), "--budget-s", "100", "--sections",
                "train_bf16,train_bf16_unfused,full_ft_ckpt,cuda_tests,train_fp16"])
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    sec = res["sections"]
    assert res["fused_over_unfused_step_time"] == 0.75
    assert "boom" in sec["full_ft_ckpt"]["error"] and "section_s" in sec["full_ft_ckpt"]
    assert sec["cuda_tests"] == {"returncode": 1, "tests_failed": 1, "tests_passed": 5, "tests_skipped": 2,
                                 "tests_deselected": 40,
                                 "tail": "F..\n1 failed, 5 passed, 2 skipped, 40 deselected in 3.0s",
                                 "section_s": sec["cuda_tests"]["section_s"]}  # "skipped" alone: a skipped section
    assert "skipped" not in sec["train_fp16"]
    for budget, skipped in (("56", None), ("55", "time budget: 35s left")):  # train_fp16 with 36 s left runs
        clock[0] = 0.0
        suite.main(["--out", str(tmp_path), "--budget-s", budget,
                    "--sections", "train_bf16,train_bf16_unfused,train_fp16"])
        sec = json.loads((tmp_path / "gpu_results.json").read_text())["sections"]
        assert sec["train_fp16"].get("skipped") == skipped, budget
    assert suite.main(["--out", str(tmp_path), "--sections", "train_bf16"]) == 0  # no unfused run: no ratio
    assert "fused_over_unfused_step_time" not in json.loads((tmp_path / "gpu_results.json").read_text())


def test_scale_reports_steady_steps_and_the_largest_rank(monkeypatch):
    """step_time_s and the collectives' bytes per step are medians over steps 2..K (step 1 records ZeRO-3's trace;
    a one-step run keeps its step); per-rank figures report the largest rank beside the list, text ones the
    list only; counts of elements must be whole numbers >= 0; a model that fits nowhere is refused by name."""
    import argparse
    from types import SimpleNamespace

    from vlscale.profiling import planner

    scale = _bench("scale")
    comm = [{"bytes": {"all_gather": b, "reduce_scatter": b // 2}, "calls": {"all_gather": n}}
            for b, n in ((900, 9), (100, 3), (600, 4), (200, 5))]
    assert scale.steady_state([50.0, 1.0, 3.0, 2.0], comm) == (2.0, {"all_gather": 200, "reduce_scatter": 100},
                                                                {"all_gather": 5})
    assert scale.steady_state([50.0], comm[:1]) == (50.0, {"all_gather": 900, "reduce_scatter": 450}, {"all_gather": 9})
    merged = scale.merge_ranks([{"param_bytes_per_rank": 10, "peak_rss_bytes": 7, "peak_tensor_phase": "train"},
                                {"param_bytes_per_rank": 12, "peak_rss_bytes": 5, "peak_tensor_phase": "build"}])
    assert merged == {"param_bytes_per_rank": 12, "param_bytes_by_rank": [10, 12], "peak_rss_bytes": 7,
                      "peak_rss_bytes_by_rank": [7, 5], "peak_tensor_phase_by_rank": ["train", "build"]}
    assert [scale._count(t) for t in ("1e8", "0", "1048576")] == [10 ** 8, 0, 1048576]
    for bad, why in (("1.5", "whole number"), ("-1", "whole number"), ("x", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            scale._count(bad)
    monkeypatch.setattr(planner, "plan",
                        lambda *a, **kw: [SimpleNamespace(fits=False, samples_per_s=0.0, peak=2 ** 40)])
    with pytest.raises(RuntimeError,
                       match=r"t5-large on 8x24gb: no setting fits \(smallest peak 1099511627776 bytes\)"):
        scale.recommend("t5-large", "8x24gb")


def test_eval_gather_refuses_a_folder_without_an_adapter_and_tabulates_the_ratio(capsys, tmp_path):
    """benchmarks/eval_gather.py: ``--adapter`` that holds no adapter_config.json is refused before the ranks
    start; the table's ratios are the per-module policy's median over each gathering one's, per task and in all."""
    bench = _bench("eval_gather")
    _refused(capsys, bench.main, ["--adapter", str(tmp_path)], f"--adapter {tmp_path}: no adapter_config.json")
    result = {"world_size": 2, "device": "cpu", "precision": "fp32", "rounds": 3, "eval_batch_size": 50,
              "examples": {"vqa": 100, "caption": 100}, "same_scores": True,
              "seconds": {"never": {"vqa": [3.0, 2.0, 9.0], "caption": [4.0, 4.0, 4.0]},
                          "decoder": {"vqa": [1.5, 1.5, 1.0], "caption": [2.0, 2.0, 5.0]},
                          "auto": {"vqa": [1.0, 1.0, 1.0], "caption": [2.0, 1.0, 3.0]}},
              "fetches": {"never": {"vqa": 535, "caption": 500}, "decoder": {"vqa": 40, "caption": 30},
                          "auto": {"vqa": 0, "caption": 0}}}
    rows = {line.split()[0]: line.split() for line in bench.table(result).splitlines()[1:3]}
    assert rows["vqa"][1:] == ["100", "3.000", "33.3", "1.500", "66.7", "1.000", "100.0", "2.00", "3.00", "535", "40",
                               "0"]
    assert rows["caption"][8:10] == ["2.00", "2.00"]
    assert bench.table(result).splitlines()[3].split() == ["all", "7.000", "3.500", "3.000", "2.00", "2.33"]
