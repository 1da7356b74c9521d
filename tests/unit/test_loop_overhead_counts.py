"""benchmarks/loop_overhead.py's counting and statistics, in this process: the sync counter's kinds, call sites
and host/device split, the phase timers, and the per-step medians (its full runs:
tests/integration/test_loop_syncs.py)."""

import inspect
import threading
import time
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def lo(script):
    return script("benchmarks/loop_overhead.py")


def _loss_terms(t):  # a HOST_CALLERS name: its syncs are on host data
    return t.item()


def test_step_medians_take_rest_per_step_on_both_clocks(lo):
    """rest is each step's time outside data/forward/backward/optimizer, then the median (a difference of
    medians can even come out negative)."""
    rows = [(10, 1, 2, 3, 1), (20, 1, 9, 3, 1), (30, 10, 2, 3, 1)]  # wall, data, forward, backward, optimizer
    records = []
    for wall, *phases in rows:
        r = {"wall": wall, **dict(zip(lo.PHASES[:-1], phases))}
        records.append({**r, **{f"cpu_{k}": v / 2 for k, v in r.items()}})
    wall, cpu = lo.step_medians(records)
    assert wall == {"wall": 20, "data": 1, "forward": 2, "backward": 3, "optimizer": 1, "rest": 6}
    assert cpu == {k: v / 2 for k, v in wall.items()}


def test_sync_counter_counts_each_call_once_where_it_is_made(lo):
    """A sync counts once (not again for the syncs it makes inside), at the first frame outside torch and the benchmark,
    only while ``on``, only on the main thread; inside the loader or a HOST_CALLERS function it is a host call;
    uninstall puts torch back."""
    import torch.distributed as dist

    originals = (torch.Tensor.item, torch.Tensor.__float__, torch.tensor, dist.all_reduce)
    c = lo.SyncCounter().install()
    t = torch.ones(1)
    owner = SimpleNamespace(gather=lambda: (t.item(), t.item()))  # a call that syncs inside, as collectives do
    c._wrap(owner, "gather", "x.gather")
    try:
        t.item()  # off: not counted
        c.on = True
        line = inspect.currentframe().f_lineno
        float(t)
        x = torch.tensor([2.0])
        _loss_terms(x)
        c.in_loader = True
        x.tolist()
        c.in_loader = False
        owner.gather()
        worker = threading.Thread(target=t.item)
        worker.start()
        worker.join()
    finally:
        c.on = False
        c.uninstall()
    assert (torch.Tensor.item, torch.Tensor.__float__, torch.tensor, dist.all_reduce) == originals
    assert dict(c.kinds["device"]) == {"Tensor.__float__": 1, "torch.tensor": 1, "x.gather": 1}
    assert dict(c.kinds["host"]) == {"Tensor.item": 1, "Tensor.tolist": 1}
    site, fn = "tests/unit/test_loop_overhead_counts.py", "test_sync_counter_counts_each_call_once_where_it_is_made"
    assert dict(c.sites["device"]) == {f"Tensor.__float__ @ {site}:{line + 1} {fn}": 1,
                                       f"torch.tensor @ {site}:{line + 2} {fn}": 1,
                                       f"x.gather @ {site}:{line + 7} {fn}": 1}
    assert dict(c.sites["host"]) == {f"Tensor.item @ {site}:{_loss_terms.__code__.co_firstlineno + 1} _loss_terms": 1,
                                     f"Tensor.tolist @ {site}:{line + 5} {fn}": 1}


def test_phase_timers_add_up_and_the_loader_counts_as_data(lo, monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(lo, "time",
                        SimpleNamespace(perf_counter=lambda: float(next(clock)), thread_time=time.thread_time))
    phases, counter = lo.Phases(), lo.SyncCounter()
    seen = []
    f = phases.timed(lambda: seen.append(counter.in_loader), "forward")
    f()
    f()
    with pytest.raises(ZeroDivisionError):
        phases.timed(lambda: 1 / 0, "backward")()
    loader = lo.TimedLoader(iter([lambda: None]), phases, counter)
    loader_item = next(loader)
    assert phases.now["forward"] == 2.0 and phases.now["backward"] == 1.0 and phases.now["data"] == 1.0
    assert seen == [False, False] and loader_item is not None and not counter.in_loader
    calls = []
    inner = type("L", (), {"__next__": lambda self: calls.append(counter.in_loader) or 1, "sampler": "s"})()
    loader = lo.TimedLoader(inner, phases, counter)
    assert next(loader) == 1 and calls == [True] and loader.sampler == "s"


def test_loop_overhead_refuses_no_measured_steps(lo, capsys):
    for argv in (["--steps", "0"], ["--warmup", "0"]):
        with pytest.raises(SystemExit):
            lo.main(argv)
        assert "must be >= 1" in capsys.readouterr().err


def test_loop_overhead_picks_a_free_port_unless_master_port_is_set(lo, monkeypatch):
    """Several ranks: MASTER_PORT where the user set one, else a free port (a fixed 29500 collided with a run
    beside it)."""
    import vlscale.engine.distributed as distributed

    seen = []

    def run(cmd, **kw):
        seen.append(next(a for a in cmd if a.startswith("--master_port=")))
        return SimpleNamespace(returncode=1, stdout="", stderr="")

    monkeypatch.setattr(lo.subprocess, "run", run)
    monkeypatch.setattr(distributed, "free_port", lambda: 40123)
    args = SimpleNamespace(steps=1, warmup=1, config="tiny", threads=1, nproc=2)
    for env, port in ((None, "40123"), ("34567", "34567")):
        if env is None:
            monkeypatch.delenv("MASTER_PORT", raising=False)
        else:
            monkeypatch.setenv("MASTER_PORT", env)
        with pytest.raises(SystemExit, match="ZeRO-3 run failed"):
            lo.run_child(3, args, [])
    assert seen == ["--master_port=40123", "--master_port=34567"]
