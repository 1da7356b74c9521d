"""benchmarks/zero3_gather_replay.py follows DeepSpeed's coordinator (its docstring's figures rest on that)."""

import importlib.util
from pathlib import Path

import pytest

from vlscale.profiling.analytic import ZeroSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def replay():
    spec = importlib.util.spec_from_file_location("zero3_gather_replay", ROOT / "benchmarks" / "zero3_gather_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings(**zero):
    return ZeroSettings.from_ds_config({"zero_optimization": {"stage3_max_reuse_distance": 0,
                                                              "stage3_param_persistence_threshold": 0, **zero}})


def test_forward_release_waits_for_the_modules_called_inside(replay):
    """A layer L (parameter a) calls an adapter A (parameter b) inside its forward, as the PEFT hooks do in
    a leaf LM layer. DeepSpeed releases L in its post-forward hook, after A's fetch, whose prefetch has
    passed a's backward use: a stays gathered. Released right after L's fetch instead, the prefetch
    would gather a again (9 elements all-gathered in forward, not 5)."""
    events = [["pre", "L", ["a"], True], ["pre", "A", ["b"], True], ["post", "A", None, True],
              ["post", "L", None, True], ["pre", "D", [], True], ["post", "D", None, True]]
    volume = {}
    best = replay.replay_events(events, {"a": 4, "b": 1}, _settings(stage3_prefetch_bucket_size=1,
                                                                     stage3_max_live_parameters=100), volume)
    assert volume == {"f": 5}  # a and b once each; backward finds both gathered
    assert best == {"f": 5, "b": 5}


def test_prefetch_takes_a_modules_parameters_in_deepspeeds_order(replay):
    """DeepSpeed queues a module's parameters by ds_id, the order the model registers them (numel's
    order here), not by name. M0 registers z (10) before a (1): with a 5-element bucket the first prefetch
    (at the parameterless X) takes z alone and M0 gathers a on demand. By name, a and z went as one set,
    and the forward gathered 27 elements, at most 16 at once."""
    events = [["pre", "X", [], True], ["post", "X", None, True], ["pre", "M0", ["z", "a"], True],
              ["post", "M0", None, True], ["pre", "M1", ["m"], True], ["post", "M1", None, True]]
    volume = {}
    best = replay.replay_events(events, {"z": 10, "a": 1, "m": 5}, _settings(stage3_prefetch_bucket_size=5,
                                                                             stage3_max_live_parameters=10), volume)
    assert volume == {"f": 26, "b": 6}
    assert best == {"f": 15, "b": 15}
