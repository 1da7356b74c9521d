"""benchmarks/step_time.py's measurement and report: rounds, paired ratios, their bootstrap interval, targets,
parity checks."""

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time  # noqa: E402  (benchmarks/step_time.py)


def _variant(steps):
    return SimpleNamespace(times={"cpu": {"step": list(steps)}})


def test_paired_ratio_interval_brackets_the_median_and_narrows_with_agreement():
    den = [2.0 + 0.1 * (i % 5) for i in range(40)]  # drift between rounds cancels in the pairs
    same = step_time.paired_ratio_ci(_variant([1.02 * d for d in den]), _variant(den), "cpu")
    assert abs(same[0] - 1.02) < 1e-9 and abs(same[1] - 1.02) < 1e-9
    noisy = [d * (1.0 + (0.08 if i % 2 else -0.06) + 0.001 * i) for i, d in enumerate(den)]
    num, dvar = _variant(noisy), _variant(den)
    lo, hi = step_time.paired_ratio_ci(num, dvar, "cpu")
    mid = step_time.paired_ratio(num, dvar, "cpu")
    assert lo <= mid <= hi and lo < 1.0 < hi and hi - lo > 0.05
    assert step_time.paired_ratio_ci(num, dvar, "cpu") == (lo, hi)  # seeded: the same interval again


def test_rounds_are_a_multiple_of_the_variant_count():
    assert [step_time.balanced_repeats(r, 2) for r in (1, 7, 8, 100)] == [2, 8, 8, 100]
    assert step_time.balanced_repeats(5, 7) == 7 and step_time.balanced_repeats(9, 3) == 9


# ----------------------------------------------------------------------------------- what is reported
def _timed(name, cpu, wall=None, width=2):
    """A real Variant (a tiny Linear trains) holding the given per-round step times."""
    import torch

    module = torch.nn.Linear(width, 1)
    v = step_time.Variant(name, module, lambda: module(torch.ones(1, width)).sum(), 1e-3, "loop")
    v.times["cpu"]["step"] = list(cpu)
    v.times["wall"]["step"] = list(wall if wall is not None else [2 * t for t in cpu])
    for clock in step_time.CLOCKS:
        for phase in ("forward", "backward", "optimizer"):
            v.times[clock][phase] = [t / 3 for t in v.times[clock]["step"]]
    return v


def test_measure_drops_the_warm_up_rounds_and_rotates_who_leads(monkeypatch):
    """Each variant is timed once per round after ``warmup`` untimed rounds, and the order rotates so that
    each one leads the same number of rounds."""
    calls = []
    monkeypatch.setattr(step_time, "gc", SimpleNamespace(collect=lambda: None))  # 0.2 s a call with torch loaded

    class Fake:
        def __init__(self, name):
            self.name = name

        def step(self, record):
            calls.append((self.name, record))

    variants = [Fake("a"), Fake("b"), Fake("c")]
    step_time.measure(variants, repeats=6, warmup=2)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 8
    assert all(not rec for r in rounds[:2] for _, rec in r) and all(rec for r in rounds[2:] for _, rec in r)
    leaders = [r[0][0] for r in rounds[2:]]
    assert sorted(leaders) == ["a", "a", "b", "b", "c", "c"]
    assert all(sorted(n for n, _ in r) == ["a", "b", "c"] for r in rounds)


def test_paired_ratio_is_the_median_of_the_round_ratios():
    """One slow round (a descheduled step) moves a mean, not the median the report gives."""
    den = [1.0, 1.0, 1.0, 1.0, 1.0]
    num = _variant([0.5, 0.5, 0.5, 0.5, 5.0])
    assert step_time.paired_ratio(num, _variant(den), "cpu") == 0.5


def test_paired_ratio_interval_is_a_percentile_interval_not_the_range():
    """Over 9 spread-out round ratios the 95 % interval leaves out the extreme bootstrap medians (the
    smallest and largest ratio are drawn as the median in about 1 in 700 resamples), and a 50 % interval
    sits inside it."""
    ratios = [1.0 + 0.1 * i for i in range(9)]
    num, den = _variant(ratios), _variant([1.0] * 9)
    lo, hi = step_time.paired_ratio_ci(num, den, "cpu")
    assert min(ratios) < lo < 1.4 < hi < max(ratios)
    lo50, hi50 = step_time.paired_ratio_ci(num, den, "cpu", level=0.5)
    assert lo < lo50 <= 1.4 <= hi50 < hi


def test_variant_step_times_each_phase_on_both_clocks(monkeypatch):
    """step = end - start, forward = the loss, backward = loss.backward(), optimizer = optimizer.step(),
    for the wall and the CPU clock; an unrecorded step keeps nothing."""
    v = _timed("x", [])
    for clock in step_time.CLOCKS:
        for phase in step_time.PHASES:
            v.times[clock][phase] = []
    ticks = iter([(0.0, 10.0), (1.0, 10.5), (3.0, 11.5), (6.0, 13.0)] * 2)
    monkeypatch.setattr(step_time, "_now", lambda: next(ticks))
    v.step(record=False)
    assert all(v.times[c][p] == [] for c in step_time.CLOCKS for p in step_time.PHASES)
    v.step(record=True)
    got = {c: {p: v.times[c][p] for p in step_time.PHASES} for c in step_time.CLOCKS}
    assert got == {"wall": {"step": [6.0], "forward": [1.0], "backward": [2.0], "optimizer": [3.0]},
                   "cpu": {"step": [3.0], "forward": [0.5], "backward": [1.0], "optimizer": [1.5]}}


def test_summarise_reports_paired_ratios_their_targets_and_the_other_clock():
    """adapter_over_full is vl_adapter / vl_full (the baseline the denominator), the median of the round
    ratios on the chosen clock, beside the ratio of the medians and the other clock's; the target is met at
    <= target (a ratio exactly on it is met); each variant's step_ms is the median round; a targeted ratio
    whose variants did not run is null, an untargeted one absent; the FLOP ratio is adapter over full."""
    full = _timed("vl_full", [1.0, 2.0, 4.0], wall=[10.0, 10.0, 10.0])
    adapter = _timed("vl_adapter", [0.55, 1.1, 2.2], wall=[6.0, 7.0, 9.0])
    floor = _timed("vl_floor", [0.5, 2.0, 1.0], wall=[6.0, 7.0, 9.0])
    info = {"flops": {"vl_full": 4e9, "vl_adapter": 1e9}}
    res = step_time.summarise({"vl_full": full, "vl_adapter": adapter, "vl_floor": floor},
                              SimpleNamespace(clock="cpu"), info)
    assert res["clock"] == "cpu"
    assert res["variants"]["vl_full"]["step_ms"] == 2000.0 and res["variants"]["vl_full"]["step_ms_wall"] == 10000.0
    assert res["variants"]["vl_adapter"]["gflops"] == 1.0 and res["flop_ratio_adapter_over_full"] == 0.25
    assert res["adapter_over_full"] == 0.55 and res["adapter_over_full_met"] is True
    assert res["adapter_over_full_target"] == 0.55 and res["adapter_over_full_ci95"] == (0.55, 0.55)
    assert res["adapter_over_full_of_medians"] == 1.1 / 2.0
    assert res["adapter_over_full_wall"] == 0.7
    # per round 1.1, 0.55, 2.2: the median 1.1, over the 1.05 target
    assert res["adapter_over_floor"] == 1.1 and res["adapter_over_floor_met"] is False
    assert res["ours_over_adapterhub"] is None and res["ours_lora_over_peft"] is None
    assert "fused_over_unfused_vl" not in res and "flops" not in res
    res = step_time.summarise({"vl_full": full, "vl_adapter": adapter}, SimpleNamespace(clock="wall"), {})
    assert res["adapter_over_full"] == 0.7 and res["adapter_over_full_cpu"] == 0.55
    assert res["adapter_over_full_met"] is False and res["variants"]["vl_adapter"]["step_ms_cpu"] == 1100.0


def test_clock_follows_the_thread_count_and_variants_are_checked(capsys):
    assert step_time.parse_args([]).clock == "cpu"
    assert step_time.parse_args(["--threads", "2"]).clock == "wall"
    assert step_time.parse_args(["--threads", "2", "--clock", "cpu"]).clock == "cpu"
    assert step_time.parse_args(["--variants", "vl_full, vl_adapter"]).variants == ["vl_full", "vl_adapter"]
    import pytest

    with pytest.raises(SystemExit):
        step_time.parse_args(["--variants", "vl_full,vl_adaptor"])
    assert "unknown ['vl_adaptor']" in capsys.readouterr().err


class _LM:
    """Stands in for a T5: logits = inputs_embeds @ w (what the parity check reads)."""

    def __init__(self, w):
        self.w, self.training = w, True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, inputs_embeds, attention_mask, labels, use_cache):
        assert not self.training and use_cache is False
        return SimpleNamespace(logits=inputs_embeds @ self.w)


def test_parity_and_counts_refuse_a_comparison_that_is_not_like_with_like():
    import pytest
    import torch

    g = torch.Generator().manual_seed(0)
    batch = {"inputs_embeds": torch.randn(3, 4, 2, generator=g), "attention_mask": torch.ones(3, 4),
             "labels": torch.zeros(3, 1)}
    w_bare, w_peft = torch.eye(2), torch.eye(2) + 0.5
    ours, peer = _timed("lm_ours", [1.0]), _timed("lm_peer", [1.0])
    ours.module, peer.module = _LM(w_peft), _LM(w_peft + 1e-7)
    err = step_time.check_parity(ours, peer, _LM(w_bare), batch)
    assert 0 < err < 1e-5 and ours.module.training and peer.module.training
    peer.module = _LM(w_peft + 1e-2)
    with pytest.raises(step_time.BenchmarkError, match="lm_ours and lm_peer compute different logits"):
        step_time.check_parity(ours, peer, _LM(w_bare), batch)
    ours.module, peer.module = _LM(w_bare), _LM(w_bare)
    with pytest.raises(step_time.BenchmarkError, match="lm_peer: its PEFT modules barely change the logits"):
        step_time.check_parity(ours, peer, _LM(w_bare), batch)
    step_time.check_counts(_timed("a", [1.0]), _timed("b", [1.0]))
    with pytest.raises(step_time.BenchmarkError, match="trainable parameters differ: a 3 vs b 4"):
        step_time.check_counts(_timed("a", [1.0]), _timed("b", [1.0], width=3))
