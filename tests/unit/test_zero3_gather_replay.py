"""benchmarks/zero3_gather_replay.py follows DeepSpeed's coordinator (its docstring's figures rest on that)."""

import pytest

from vlscale.profiling.analytic import ZeroSettings


@pytest.fixture(scope="module")
def replay(script):
    return script("benchmarks/zero3_gather_replay.py")


def _replay(replay, events, numel, **zero):
    """(elements all-gathered per phase, the most held gathered per phase) of replaying ``events`` under the
    ZeRO-3 settings ``zero`` (reuse distance and persistence threshold 0 unless given)."""
    volume = {}
    best = replay.replay_events(events, numel, _settings(**zero), volume)
    return volume, best


def _call(module, params, phase):
    """One call of ``module`` as the hooks see it in ``phase`` ("forward" or "backward"): fetch, then release."""
    return [("fetch", module, params, phase), ("release", module, params, phase)]


def _step(*modules):
    """Each ``(module, params)`` called once in forward, in order, then in backward in the reverse order (a
    plain chain of calls, none inside another)."""
    return ([e for m, ps in modules for e in _call(m, ps, "forward")]
            + [e for m, ps in reversed(modules) for e in _call(m, ps, "backward")])


def _settings(**zero):
    return ZeroSettings.from_ds_config({"zero_optimization": {"stage3_max_reuse_distance": 0,
                                                              "stage3_param_persistence_threshold": 0, **zero}})


def test_forward_release_waits_for_the_modules_called_inside(replay):
    """A layer L (parameter a) calls an adapter A (parameter b) inside its forward, as the PEFT hooks do in
    a leaf LM layer. DeepSpeed releases L in its post-forward hook, after A's fetch, whose prefetch has
    passed a's backward use: a stays gathered. Released right after L's fetch instead, the prefetch
    would gather a again (9 elements all-gathered in forward, not 5)."""
    events = ([("fetch", "L", ["a"], "forward")] + _call("A", ["b"], "forward") + [("release", "L", ["a"], "forward")]
              + _call("D", [], "forward") + _call("D", [], "backward")
              + [("fetch", "L", ["a"], "backward")] + _call("A", ["b"], "backward")
              + [("release", "L", ["a"], "backward")])
    volume, best = _replay(replay, events, {"a": 4, "b": 1},
                           stage3_prefetch_bucket_size=1, stage3_max_live_parameters=100)
    assert volume == {"f": 5}  # a and b once each; backward finds both gathered
    assert best == {"f": 5, "b": 5}


def test_backward_release_waits_for_the_modules_whose_backward_runs_inside(replay):
    """In backward DeepSpeed fetches a layer L (a, 4) when a gradient reaches its output, before the adapter A
    (b, 1) it called in forward, and releases L in its post-backward hook, once its inputs' gradients are made:
    after A's backward. A's fetch finds a still gathered: 5 held at once, as in forward. Released right after
    its fetch (the replay's approximation before 2026-12-06), a was gone by then: 4 at most."""
    events = ([("fetch", "L", ["a"], "forward")] + _call("A", ["b"], "forward") + [("release", "L", ["a"], "forward")]
              + [("fetch", "L", ["a"], "backward")] + _call("A", ["b"], "backward")
              + [("release", "L", ["a"], "backward")])
    volume, best = _replay(replay, events, {"a": 4, "b": 1}, stage3_prefetch_bucket_size=0)
    assert volume == {"f": 5, "b": 5}
    assert best == {"f": 5, "b": 5}


def test_a_module_not_released_in_backward_keeps_a_parameter_it_shares(replay):
    """P and the Q it calls share s (4), as a tied embedding is shared. P's inputs need no gradient, so its
    post-backward hook never runs and it holds s until backward ends (DeepSpeed's ds_active_sub_modules):
    Q's release in backward leaves s gathered, and R's fetch after it holds s and r (1), 5. Released with Q,
    s was gone by then: 4 at most."""
    events = (_call("R", ["r"], "forward") + [("fetch", "P", ["s"], "forward")] + _call("Q", ["s"], "forward")
              + [("release", "P", ["s"], "forward"), ("fetch", "P", ["s"], "backward")]
              + _call("Q", ["s"], "backward") + _call("R", ["r"], "backward"))
    volume, best = _replay(replay, events, {"s": 4, "r": 1}, stage3_prefetch_bucket_size=0)
    assert volume == {"f": 5, "b": 5}
    assert best == {"f": 4, "b": 5}


def test_prefetch_takes_a_modules_parameters_in_deepspeeds_order(replay):
    """DeepSpeed queues a module's parameters by ds_id, the order the model registers them (numel's
    order here), not by name. M0 registers z (10) before a (1): with a 5-element bucket the first prefetch
    (at the parameterless X) takes z alone and M0 gathers a on demand. By name, a and z went as one set,
    and the forward gathered 27 elements, at most 16 at once."""
    events = _step(("X", []), ("M0", ["z", "a"]), ("M1", ["m"]))
    volume, best = _replay(replay, events, {"z": 10, "a": 1, "m": 5},
                           stage3_prefetch_bucket_size=5, stage3_max_live_parameters=10)
    assert volume == {"f": 26, "b": 6}
    assert best == {"f": 15, "b": 15}


def test_persistent_parameters_are_never_gathered_and_backward_fetches_only_what_needs_a_gradient(replay):
    """A parameter of at most stage3_param_persistence_threshold elements persists (DeepSpeed's
    mark_persistent_parameters: ds_numel <= threshold), so L gathers a (3) without w (2, the threshold);
    backward fetches only the modules whose output needs a gradient (F's needs none: the trace holds no
    backward call of F), so F's f (4) is all-gathered in forward alone. Without prefetching: forward 3 then 4
    elements, backward L's 3."""
    events = _call("L", ["a", "w"], "forward") + _call("F", ["f"], "forward") + _call("L", ["a", "w"], "backward")
    volume, best = _replay(replay, events, {"a": 3, "w": 2, "f": 4},
                           stage3_param_persistence_threshold=2, stage3_prefetch_bucket_size=0)
    assert volume == {"f": 7, "b": 3}
    assert best == {"f": 4, "b": 3}


def test_a_prefetched_set_holds_its_flat_buffer_and_the_copies_until_its_last_parameter_is_fetched(replay):
    """The parameterless X prefetches p (2, M's) and q (3, N's) as one all-gather: a 5-element flat buffer.
    M's fetch waits on it: torch.cat copies of both (5 more), while the buffer lives until N fetches q, so
    forward holds 10 at once; backward gathers q alone again (its use comes after N's release) and holds
    q and p (kept: the prefetch passed its backward use), 5."""
    events = _step(("X", []), ("M", ["p"]), ("N", ["q"]))
    volume, best = _replay(replay, events, {"p": 2, "q": 3},
                           stage3_prefetch_bucket_size=10, stage3_max_live_parameters=100)
    assert volume == {"f": 5, "b": 3}
    assert best == {"f": 10, "b": 5}


def test_a_parameter_stays_gathered_when_its_next_use_lies_within_the_reuse_distance(replay):
    """A (a, 2) runs, then B (b, 3), then A again. DeepSpeed's release walks the module order from the step
    counter at the release for stage3_max_reuse_distance elements: with 4, A's release after it reaches A's
    second call (B's 3, then A's 2) and keeps a; B's release at A's second call walks A twice (4) before B's
    backward use and lets b go. Forward gathers a and b once (5, both held at once); backward gathers b again.
    With reuse distance 0 each module's release lets its parameters go: a is gathered twice in forward and
    again at each use in backward (7 and 7), never more than b's 3 at once."""
    events = _step(("A", ["a"]), ("B", ["b"]), ("A", ["a"]))
    volume, best = _replay(replay, events, {"a": 2, "b": 3}, stage3_max_reuse_distance=4, stage3_prefetch_bucket_size=0)
    assert volume == {"f": 5, "b": 3}
    assert best == {"f": 5, "b": 5}
    volume, best = _replay(replay, events, {"a": 2, "b": 3}, stage3_prefetch_bucket_size=0)
    assert volume == {"f": 7, "b": 7}
    assert best == {"f": 3, "b": 3}


def test_a_fetch_pops_off_the_queue_only_its_parameters_no_prefetch_passed(replay):
    """DeepSpeed pops a module's parameters off the trace queue only where no prefetch passed them for this
    step. X prefetches M's p (a 2-element bucket); M's fetch pops nothing, so its prefetch takes N's q and
    N's the next, O's r: each forward module finds its parameter gathered, never more than two held. Popping
    p's place again would skip q (gathered on demand by N) and prefetch r a step early."""
    events = _step(("X", []), ("M", ["p"]), ("N", ["q"]), ("O", ["r"]))
    volume, best = _replay(replay, events, {"p": 2, "q": 2, "r": 2},
                           stage3_prefetch_bucket_size=2, stage3_max_live_parameters=100)
    assert volume == {"f": 8, "b": 4}
    assert best == {"f": 4, "b": 6}
