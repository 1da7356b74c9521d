"""benchmarks/step_time.py's statistics: the paired ratio's bootstrap interval and balanced rounds."""

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
