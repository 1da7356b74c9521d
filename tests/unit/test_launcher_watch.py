"""A rank left behind by its launcher stops as on SIGTERM (vlscale.engine.distributed.LauncherWatch).

DeepSpeed's runner passes no signal on to the ranks on one node: SIGTERM to it ended it alone and the
ranks trained on. These tests build the runner -> deepspeed.launcher.launch -> rank tree from stand-in
processes that look like DeepSpeed's (a ``deepspeed`` console script, a ``deepspeed.launcher.launch``
module), so they run in seconds; tests/integration/test_launcher_watch.py stops a real ``deepspeed``
launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlscale.engine.distributed import LauncherWatch, StopSignal, entry_point

ROOT = Path(__file__).resolve().parents[2]

RANK = """
import os, signal, sys, time
from vlscale.engine.distributed import LauncherWatch

def stop(signum, frame):
    print("rank: SIGTERM", flush=True)
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
watch = LauncherWatch.for_this_process(period_s=0.2, log=lambda line: print(line, flush=True))
print(f"rank: watching {watch is not None} runner {watch is not None and watch.runner is not None}", flush=True)
if watch is not None:
    watch.start()
time.sleep(60)
print("rank: never stopped", flush=True)
"""

LAUNCH = """
import os, subprocess, sys, time
env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
env["PYTHONPATH"] = env.pop("VLSCALE_TEST_ROOT")
print(f"launch: pid {os.getpid()}", flush=True)
subprocess.Popen([sys.executable, "-u", "-c", RANK_CODE], env=env).wait()
"""

RUNNER = """
import os, subprocess, sys
print(f"runner: pid {os.getpid()}", flush=True)
subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch"]).wait()
"""


def fake_deepspeed(tmp_path: Path) -> dict:
    """``deepspeed`` (a console script) and ``deepspeed.launcher.launch`` stand-ins under tmp_path."""
    pkg = tmp_path / "fake" / "deepspeed" / "launcher"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "launch.py").write_text(LAUNCH.replace("RANK_CODE", repr(RANK)))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "deepspeed").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return dict(env, PYTHONPATH=str(tmp_path / "fake"), VLSCALE_TEST_ROOT=str(ROOT), PYTHONUNBUFFERED="1")


class Tree:
    """runner -> launch -> rank, output lines collected."""

    def __init__(self, tmp_path: Path, argv: list[str]):
        self.log = tmp_path / "tree.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(argv, env=fake_deepspeed(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout} s:\n{self.text()}"
            time.sleep(0.05)

    def pid(self, who: str) -> int:
        line = next(ln for ln in self.text().splitlines() if ln.startswith(f"{who}: pid "))
        return int(line.split()[-1])

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def tree(tmp_path):
    made = []

    def make(argv):
        made.append(Tree(tmp_path, argv))
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_entry_point_names_what_a_process_runs():
    py = "/usr/bin/python3.11"
    assert entry_point([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "train.py"]) \
        == "deepspeed.launcher.launch"
    assert entry_point([py, "/env/bin/deepspeed", "--num_gpus", "2", "train.py"]) == "deepspeed"
    assert entry_point([py, "-W", "ignore", "/env/bin/torchrun", "--nproc_per_node", "2", "t.py"]) == "torchrun"
    assert entry_point([py, "-m", "torch.distributed.run", "t.py"]) == "torch.distributed.run"
    assert entry_point([py, "-c", "import deepspeed.launcher.launch", "deepspeed.launcher.launch"]) == "-c"
    assert entry_point([py, "tests/preloaded.py", "/tmp/sock"]) == "preloaded.py"
    assert entry_point(["/bin/bash", "-c", "deepspeed train.py"]) == "bash"
    assert entry_point([]) == ""


def test_nothing_is_watched_without_a_launcher_parent(monkeypatch):
    """pytest, ``python launchers/train.py`` (no RANK), a rank whose parent is no launcher."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    assert LauncherWatch.for_this_process() is None
    monkeypatch.setenv("RANK", "0")  # as a launcher sets it, but this process's parent is no launcher
    assert LauncherWatch.for_this_process() is None


def test_a_rank_stops_when_deepspeeds_runner_is_killed_and_not_before(tree, tmp_path):
    t = tree([sys.executable, "-u", str(tmp_path / "bin" / "deepspeed")])
    t.wait_for("rank: watching True runner True")
    time.sleep(1.0)  # five polls with the runner and the launcher alive: no false alarm
    assert "is gone" not in t.text() and "SIGTERM" not in t.text()
    os.kill(t.pid("runner"), signal.SIGTERM)  # as a scheduler or `kill PID` does: the runner alone
    t.wait_for("rank: SIGTERM", timeout=10)
    assert f"DeepSpeed's runner (pid {t.pid('runner')}) is gone" in t.text()
    assert "stopping as on SIGTERM" in t.text()


def test_a_rank_stops_when_its_launcher_is_killed(tree, tmp_path):
    """The launcher killed (SIGKILL, the OOM killer) leaves its ranks to init: they stop as well."""
    t = tree([sys.executable, "-u", str(tmp_path / "bin" / "deepspeed")])
    t.wait_for("rank: watching True runner True")
    os.kill(t.pid("launch"), signal.SIGKILL)
    t.wait_for("rank: SIGTERM", timeout=10)
    assert f"its launcher deepspeed.launcher.launch (pid {t.pid('launch')}) is gone" in t.text()


def test_a_launch_without_the_runner_above_watches_only_itself(tree, tmp_path):
    """deepspeed.launcher.launch started by something else (pdsh's remote shell on another node, a
    script): what is above it may come and go; only the launcher itself is watched."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(textwrap.dedent("""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch"])
    """))  # starts the launcher and exits at once, leaving it to init
    t = tree([sys.executable, "-u", str(wrapper)])
    t.wait_for("rank: watching True runner False")
    time.sleep(1.0)
    assert "is gone" not in t.text() and "SIGTERM" not in t.text()
    os.kill(t.pid("launch"), signal.SIGKILL)
    t.wait_for("rank: SIGTERM", timeout=10)


def test_a_watch_stays_quiet_once_the_rank_is_stopping(monkeypatch):
    """Ctrl-C reaches DeepSpeed's runner too, which ends at once: the ranks, stopping already, must not
    get the watch's SIGTERM as well (after StopSignal's debounce it would abort them without a checkpoint)."""
    import psutil

    from vlscale.engine.distributed import StopSignal

    sent, lines = [], []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))

    def watch():
        w = LauncherWatch(psutil.Process(os.getppid()), rank=0, period_s=0.02, log=lines.append)
        monkeypatch.setattr(w, "gone", lambda: "DeepSpeed's runner (pid 1) is gone")
        w.start()._thread.join(5)
        return w

    monkeypatch.setattr(StopSignal, "requested_at", time.monotonic())
    assert watch().fired is None and not sent and not lines
    monkeypatch.setattr(StopSignal, "requested_at", None)
    assert watch().fired == "DeepSpeed's runner (pid 1) is gone" and sent == [signal.SIGTERM]
    assert lines == ["vlscale: rank 0: DeepSpeed's runner (pid 1) is gone: stopping as on SIGTERM (a resumable "
                     "checkpoint after this step, then exit)"]


def test_timeouts_from_the_environment_must_be_positive(monkeypatch):
    """VLSCALE_WATCHDOG_TIMEOUT=0 (or -1) was taken as is: the watchdog ended a healthy rank at its first check
    as hung ("another rank probably died", exit 3); a NaN or infinite VLSCALE_DIST_TIMEOUT was a traceback
    inside datetime."""
    from vlscale.engine.distributed import dist_timeout_s, watchdog_timeout_s

    monkeypatch.delenv("VLSCALE_DIST_TIMEOUT", raising=False)
    for raw in ("0", "-1", "nan"):
        monkeypatch.setenv("VLSCALE_WATCHDOG_TIMEOUT", raw)
        with pytest.raises(ValueError, match=rf"VLSCALE_WATCHDOG_TIMEOUT='{raw}' must be a number of seconds > 0"):
            watchdog_timeout_s()
    monkeypatch.setenv("VLSCALE_WATCHDOG_TIMEOUT", "inf")
    assert watchdog_timeout_s() == float("inf")  # never
    monkeypatch.delenv("VLSCALE_WATCHDOG_TIMEOUT")
    assert watchdog_timeout_s() == 360.0
    for raw in ("nan", "inf", "0"):
        monkeypatch.setenv("VLSCALE_DIST_TIMEOUT", raw)
        with pytest.raises(ValueError, match=rf"VLSCALE_DIST_TIMEOUT='{raw}' must be a finite number of seconds > 0"):
            dist_timeout_s()


def test_entry_point_skips_the_values_of_pythons_options():
    """``python -X importtime -m torchrun`` runs torchrun, not a script named "importtime"; ``python -`` reads stdin."""
    py = "/usr/bin/python3"
    assert entry_point([py, "-X", "importtime", "-m", "torch.distributed.run", "t.py"]) == "torch.distributed.run"
    assert entry_point([py, "-X", "dev", "/env/bin/torchrun", "t.py"]) == "torchrun"
    assert entry_point([py, "-", "deepspeed.launcher.launch"]) == "-"


class _Proc:
    """A psutil.Process stand-in: its pid, whether it runs, its parent's pid."""

    def __init__(self, pid, running=True, ppid=1):
        self.pid, self.running, self._ppid = pid, running, ppid

    def cmdline(self):
        return ["/usr/bin/python3", "-m", "deepspeed.launcher.launch"]

    def is_running(self):
        return self.running

    def ppid(self):
        return self._ppid


def test_a_launcher_gone_by_either_sign_is_gone():
    """A rank's launcher is gone when the rank's parent is another process (reparented) or when the launcher no
    longer runs; DeepSpeed's runner when the launcher's parent is another process or the runner no longer runs:
    either sign alone suffices (a pid reused by another process still runs)."""
    me = os.getppid()
    assert LauncherWatch(_Proc(me)).gone() is None
    assert "its launcher deepspeed.launcher.launch" in LauncherWatch(_Proc(me + 1)).gone()  # reparented, pid reused
    assert "is gone" in LauncherWatch(_Proc(me, running=False)).gone()  # not yet reparented
    assert LauncherWatch(_Proc(me, ppid=77), _Proc(77)).gone() is None
    assert "DeepSpeed's runner (pid 77) is gone" in LauncherWatch(_Proc(me, ppid=1), _Proc(77)).gone()
    assert "DeepSpeed's runner (pid 77) is gone" in LauncherWatch(_Proc(me, ppid=77), _Proc(77, running=False)).gone()


def test_the_launchers_world_size_is_read_before_any_process_group(monkeypatch):
    """train.py derives the accumulation from it before DeepSpeed starts: 1 without a launcher, the launcher's
    WORLD_SIZE (torchrun, deepspeed) or OMPI_COMM_WORLD_SIZE (mpirun), None where a launcher set no size."""
    from vlscale.engine.distributed import launcher_world_size

    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_world_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert launcher_world_size() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert launcher_world_size() == 8
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_world_size() == 4


def test_a_peers_end_is_told_from_other_errors():
    """gloo's errors when another rank's process ended are echoes (that rank's own line says why); any other
    error, or one of these words in another exception type, is this rank's own."""
    from vlscale.engine.distributed import peer_gone

    for said in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"):
        assert peer_gone(RuntimeError(f"[../gloo/transport/tcp/pair.cc:534] {said} [127.0.0.1]:30461"))
        assert not peer_gone(ValueError(said))
    assert not peer_gone(RuntimeError("CUDA out of memory"))


def test_without_a_gpu_deepspeeds_cpu_accelerator_is_chosen(monkeypatch):
    """No DS_ACCELERATOR and no GPU: ``cpu`` is chosen (and exported for deepspeed); a DS_ACCELERATOR set is
    kept; a process started without a launcher runs on cuda only where DeepSpeed's accelerator is not cpu."""
    import torch

    from vlscale.engine.distributed import local_device_type, select_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert select_accelerator() == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"
    assert local_device_type() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_device_type() == "cpu"  # DS_ACCELERATOR=cpu on a GPU machine: the ranks run on the CPU
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert select_accelerator() == "cuda" and local_device_type() == "cuda"


def test_a_watchdog_fed_by_beats_stays_quiet_and_a_starved_one_ends_the_process(monkeypatch):
    """Each step's beat keeps a rank alive however long the run; a rank with no beat for the timeout is ended
    (exit 3) as hung."""
    from vlscale.engine import distributed

    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(distributed.faulthandler, "dump_traceback", lambda **kwargs: None)
    w = distributed.Watchdog(0.7, rank=2).start()
    try:
        for _ in range(15):  # 1.5 s of steps, each well within the timeout
            time.sleep(0.1)
            w.beat("step")
        assert exits == []
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits[:1] == [distributed.EXIT_HUNG]
    finally:
        w.stop()


@pytest.mark.parametrize("timeout_s, period_s", [(3600, 5.0), (50, 5.0), (20, 2.0), (5, 0.5), (0.7, 0.5), (0.01, 0.5)])
def test_the_watchdog_looks_every_tenth_of_its_timeout_within_half_a_second_and_5s(timeout_s, period_s):
    """The watchdog checks for progress every timeout/10 seconds, but at least every 5 s (a long timeout still
    reports a hang within timeout + 5 s) and at most every 0.5 s (a tiny one does not spin)."""
    from vlscale.engine import distributed

    periods = []

    class Stop:  # the watchdog's stop event: records how long each wait is, and stops it after the first
        def wait(self, timeout):
            periods.append(timeout)
            return True

    w = distributed.Watchdog(timeout_s)
    w._stop = Stop()
    w._run()
    assert periods == [pytest.approx(period_s)]


def test_a_stop_asked_by_signal_keeps_the_launcher_watch_quiet(monkeypatch, capsys):
    """A Ctrl-C reaches DeepSpeed's runner as well, which ends: the rank's StopSignal, stopping already, keeps
    its LauncherWatch from sending the SIGTERM that would abort it after the debounce."""
    from vlscale.engine.distributed import StopSignal

    monkeypatch.setattr(StopSignal, "requested_at", None)
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    StopSignal()._handle(signal.SIGINT, None)
    assert "SIGINT received" in capsys.readouterr().err
    w = LauncherWatch(_Proc(os.getppid()), rank=0, period_s=0.02, log=lambda line: None)
    monkeypatch.setattr(w, "gone", lambda: "DeepSpeed's runner (pid 1) is gone")
    w.start()._thread.join(5)
    assert w.fired is None and not sent


def test_without_a_process_group_the_collectives_are_those_of_one_rank():
    """One process (no group, or a 1-rank one): every rank's object is a list of this one, a broadcast is the
    object, a sum is the numbers as floats; callers iterate and index them as with several ranks."""
    from vlscale.engine.distributed import all_gather_object, all_reduce_sum, broadcast_object

    assert all_gather_object(15) == [15] and all_gather_object(None) == [None]
    assert broadcast_object({"step": 3}) == {"step": 3}
    assert all_reduce_sum([1, 2.5], "cpu") == [1.0, 2.5]


def test_a_gpu_machine_keeps_deepspeeds_choice_and_a_deepspeed_imported_on_another_accelerator_is_refused(monkeypatch):
    """With a GPU and no DS_ACCELERATOR nothing is exported (DeepSpeed picks cuda); without a GPU, a deepspeed
    imported before vlscale could choose, on an accelerator other than cpu, is refused naming DS_ACCELERATOR=cpu."""
    import types

    import deepspeed.accelerator
    import torch

    from vlscale.engine.distributed import select_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_accelerator() == "cuda" and "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "deepspeed", sys.modules["deepspeed"])
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator",
                        lambda: types.SimpleNamespace(device_name=lambda: "xpu"))
    with pytest.raises(RuntimeError, match=r"deepspeed was imported before .* picked 'xpu'; set DS_ACCELERATOR=cpu"):
        select_accelerator()
    assert "DS_ACCELERATOR" not in os.environ


def test_timeouts_that_are_no_number_are_named_and_the_watchdogs_follows_the_collectives(monkeypatch):
    """A VLSCALE_*_TIMEOUT that is no number names the variable (not float()'s bare message); without
    VLSCALE_WATCHDOG_TIMEOUT the watchdog waits the collective timeout set + 60 s."""
    from vlscale.engine.distributed import dist_timeout_s, watchdog_timeout_s

    monkeypatch.setenv("VLSCALE_DIST_TIMEOUT", "5m")
    with pytest.raises(ValueError, match=r"VLSCALE_DIST_TIMEOUT='5m' must be a number of seconds"):
        dist_timeout_s()
    monkeypatch.setenv("VLSCALE_WATCHDOG_TIMEOUT", "ten")
    with pytest.raises(ValueError, match=r"VLSCALE_WATCHDOG_TIMEOUT='ten' must be a number of seconds"):
        watchdog_timeout_s()
    monkeypatch.delenv("VLSCALE_WATCHDOG_TIMEOUT")
    monkeypatch.setenv("VLSCALE_DIST_TIMEOUT", "30")
    assert dist_timeout_s() == 30.0 and watchdog_timeout_s() == 90.0


def test_a_starved_watchdog_names_its_rank_and_the_last_place_it_heard_from(monkeypatch, capsys):
    """A beat without a place keeps the last place named: the hung rank's line says where it stopped."""
    from vlscale.engine import distributed

    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(distributed.faulthandler, "dump_traceback", lambda **kwargs: None)
    w = distributed.Watchdog(0.2, rank=3)
    w.beat("step 7: all-reduce of the loss")
    w.beat()
    w.start()
    try:
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert exits[:1] == [distributed.EXIT_HUNG]
    err = capsys.readouterr().err
    assert "vlscale: rank 3: no progress for " in err and "(last: step 7: all-reduce of the loss); another" in err


def test_a_launcher_watch_that_cannot_look_once_keeps_watching(monkeypatch):
    """A failed look (a psutil error while /proc changes) is skipped, not the end of the watch: the launcher's
    end, seen at a later look, still stops the rank."""
    sent, looks = [], []
    monkeypatch.setattr(StopSignal, "requested_at", None)
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    w = LauncherWatch(_Proc(os.getppid()), rank=0, period_s=0.02, log=lambda line: None)

    def gone():
        looks.append(1)
        if len(looks) == 1:
            raise OSError("/proc/1234/stat: No such process")
        return "its launcher torchrun (pid 1234) is gone"

    monkeypatch.setattr(w, "gone", gone)
    w.start()._thread.join(5)
    assert w.fired == "its launcher torchrun (pid 1234) is gone" and sent == [signal.SIGTERM] and len(looks) == 2


class _Parent(_Proc):
    """A launcher stand-in as psutil.Process(os.getppid()) gives it: its command line and its own parent."""

    def __init__(self, cmdline, pid, ppid=1, parent=None):
        super().__init__(pid, ppid=ppid)
        self._cmdline, self._parent = cmdline, parent

    def cmdline(self):
        return self._cmdline

    def parent(self):
        return self._parent


@pytest.mark.parametrize("cmdline, watched", [
    (["/usr/bin/python3", "/env/bin/torchrun", "--nproc_per_node", "2", "t.py"], True),
    (["/usr/bin/python3", "-m", "torch.distributed.run", "t.py"], True),
    (["/usr/bin/python3", "-m", "deepspeed.launcher.launch", "--world_info=x", "t.py"], True),
    (["/bin/bash", "-c", "python t.py"], False),
    (["/usr/bin/python3", "-m", "pytest"], False),
])
def test_a_rank_is_watched_under_torchrun_or_deepspeeds_launch_and_under_nothing_else(monkeypatch, cmdline, watched):
    import psutil

    monkeypatch.setenv("RANK", "1")
    parent = _Parent(cmdline, os.getppid())
    monkeypatch.setattr(psutil, "Process", lambda pid: parent if pid == os.getppid() else None)
    watch = LauncherWatch.for_this_process(rank=1)
    assert (watch is not None) is watched
    if watched:
        assert watch.launcher is parent and watch.runner is None and watch.launcher_name == entry_point(cmdline)


def test_a_launcher_that_changes_while_it_is_looked_at_is_not_watched(monkeypatch):
    """The rank's parent and DeepSpeed's runner above it are read one after the other; where either link changed
    meanwhile (the runner gone after the launcher named it, or this rank reparented after its parent was read), a
    watch would compare with processes that may no longer be the rank's launcher or runner: none is built."""
    import psutil

    monkeypatch.setenv("RANK", "1")
    me = os.getppid()
    runner = _Parent(["/usr/bin/python3", "/env/bin/deepspeed", "--num_gpus", "2", "t.py"], 4321)
    launcher = _Parent(["/usr/bin/python3", "-m", "deepspeed.launcher.launch", "t.py"], me, ppid=4321, parent=runner)
    monkeypatch.setattr(psutil, "Process", lambda pid: launcher if pid == me else None)
    watch = LauncherWatch.for_this_process(rank=1)
    assert watch.launcher is launcher and watch.runner is runner  # all in place: both watched
    launcher._ppid = 1  # the runner ended after parent() named it: the launcher's parent is now init
    assert LauncherWatch.for_this_process(rank=1) is None
    launcher._ppid = 4321
    # this rank reparented between reading its parent and checking it: os.getppid() moved on (to init, pid 1,
    # or to a subreaper; another pid than ``me`` in any case: a suite started by an exited shell runs under init)
    asked = []
    monkeypatch.setattr(os, "getppid", lambda: (asked.append(1), me if len(asked) == 1 else me + 1)[1])
    assert LauncherWatch.for_this_process(rank=1) is None and len(asked) == 2


def test_a_stop_signal_installed_off_the_main_thread_installs_nothing():
    """Python lets only the main thread set signal handlers: a loop run in another thread (a notebook's, a
    test's) gets a StopSignal that never fires instead of a ValueError."""
    import threading

    before = signal.getsignal(signal.SIGTERM)
    out = []
    t = threading.Thread(target=lambda: out.append(StopSignal().install()))
    t.start()
    t.join(5)
    assert len(out) == 1 and not out[0].requested and signal.getsignal(signal.SIGTERM) == before


def test_the_process_groups_timeout_is_the_callers_or_vlscale_dist_timeout(monkeypatch):
    """init_distributed(timeout_s=...) (the tests' short waits) wins over VLSCALE_DIST_TIMEOUT, which applies
    otherwise: a collective that waits longer fails instead of hanging."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    from vlscale.engine.distributed import init_distributed

    class Started(Exception):
        pass

    timeouts = []

    def init(**kwargs):
        timeouts.append(kwargs["timeout"])
        raise Started

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RANK", "0")  # launched: no 1-rank store is made
    monkeypatch.setenv("VLSCALE_DIST_TIMEOUT", "42")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", init)
    for given in (7.5, None):
        with pytest.raises(Started):
            init_distributed(timeout_s=given)
    assert timeouts == [datetime.timedelta(seconds=7.5), datetime.timedelta(seconds=42)]


def test_a_starved_watchdog_ends_the_rank_at_its_first_look_past_the_timeout(monkeypatch, capsys):
    """The watchdog's exit is bounded: a rank with no beat for timeout_s is ended (exit 3) at the first look after
    that, so within timeout + one period (a tenth of the timeout), not at some later look, and its stderr holds
    the stack of every thread (where each one waits). The clock is a stand-in: no test waits the timeout."""
    from types import SimpleNamespace

    from vlscale.engine import distributed

    now = [100.0]
    monkeypatch.setattr(distributed, "time", SimpleNamespace(monotonic=lambda: now[0]))
    exits, dumps, looks = [], [], []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(distributed.faulthandler, "dump_traceback", lambda **kwargs: dumps.append(kwargs))

    class Clock:  # the watchdog's stop event: each wait moves the clock on by the period, until the rank is ended
        def wait(self, timeout):
            if exits or len(looks) > 100:
                return True
            now[0] += timeout
            looks.append(now[0] - 100.0)
            return False

    w = distributed.Watchdog(20, rank=1)  # looks every 2 s
    w._stop = Clock()
    now[0] = 100.25
    w.beat("step 4")
    now[0] = 100.0
    w._run()
    assert looks == [pytest.approx(2.0 * i) for i in range(1, 12)]  # idle 19.75 s at the 10th look, 21.75 s at the 11th
    assert exits == [distributed.EXIT_HUNG]
    assert dumps == [{"file": sys.stderr, "all_threads": True}]
    assert "vlscale: rank 1: no progress for 22s (last: step 4)" in capsys.readouterr().err


def test_a_ranks_place_is_one_rank_without_a_launcher_and_the_launchers_under_one(monkeypatch):
    """``python launchers/train.py``: init_distributed starts a 1-rank group (rank 0 of 1, through a file store);
    under torchrun or deepspeed (RANK, WORLD_SIZE, LOCAL_RANK set) the rendezvous is left to the launcher's
    variables, and the rank's place is the group's, its local rank LOCAL_RANK; on the CPU over gloo. The DistInfo says
    whether a launcher started the process: not for the 1-rank group, though RANK & co are set for it then."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from vlscale.engine import distributed

    keep = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS and k != "VLSCALE_CPU_FP16"}
    monkeypatch.setattr(os, "environ", keep)  # what the 1-rank set-up exports must not reach later tests
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls, group = [], {"rank": 0, "world": 1}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: group["rank"])
    monkeypatch.setattr(dist, "get_world_size", lambda: group["world"])
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")

    cpu = torch.device("cpu")
    assert distributed.init_distributed() == distributed.DistInfo(0, 1, 0, cpu, "cpu", "gloo", launched=False)
    assert calls[-1]["rank"] == 0 and calls[-1]["world_size"] == 1 and calls[-1]["dist_backend"] == "gloo"
    assert calls[-1]["init_method"].startswith("file://")
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["LOCAL_RANK"] == "0"

    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        os.environ[name] = value  # torchrun's (and the deepspeed launcher's) variables: rank 3 of 4, 2 a node
    group.update(rank=3, world=4)
    assert distributed.init_distributed() == distributed.DistInfo(3, 4, 1, cpu, "cpu", "gloo", launched=True)
    assert calls[-1]["dist_backend"] == "gloo" and not {"init_method", "rank", "world_size"} & set(calls[-1])


def test_a_cpu_group_never_builds_deepspeeds_shared_memory_kernel_and_declares_fp16_only_when_asked(monkeypatch):
    """On the CPU, init_distributed marks DeepSpeed's shared-memory all-reduce not compatible, so DeepSpeed never
    builds it (a C++ extension built on first use, 53 s without the build cache, that only DeepSpeed-Inference
    calls); with VLSCALE_CPU_FP16=1 it makes DeepSpeed's CPU accelerator declare fp16 (DeepSpeed's engine refuses
    fp16 otherwise), and without it leaves the accelerator's declaration as it was. Most CPUs have no oneDNN fp16
    kernels, so the accelerator does not declare fp16 (the first part, on a CPU made to look like one); an
    AVX512-FP16 CPU declares it already, and asking again adds nothing (the second part)."""
    import deepspeed.ops
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from vlscale.engine import distributed

    keep = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS and k != "VLSCALE_CPU_FP16"}
    monkeypatch.setattr(os, "environ", keep)  # what the 1-rank set-up exports must not reach later tests
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # a group already there: only the set-up around it
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    accelerator = get_accelerator()
    kernel = accelerator.get_op_builder("ShareMemCommBuilder").NAME
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, kernel, True)  # as DeepSpeed's probe finds it here
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)  # a CPU without oneDNN fp16 kernels
    monkeypatch.setattr(accelerator, "supported_dtypes", lambda: [torch.float32, torch.bfloat16])

    distributed.init_distributed()
    assert deepspeed.ops.__compatible_ops__[kernel] is False
    assert not accelerator.is_fp16_supported() and accelerator.supported_dtypes() == [torch.float32, torch.bfloat16]
    monkeypatch.setenv("VLSCALE_CPU_FP16", "1")
    distributed.init_distributed()
    assert accelerator.is_fp16_supported()
    assert accelerator.supported_dtypes() == [torch.float32, torch.bfloat16, torch.float16]  # none dropped

    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)  # an AVX512-FP16 CPU
    monkeypatch.setattr(accelerator, "supported_dtypes", lambda: [torch.float32, torch.bfloat16, torch.float16])
    distributed.init_distributed()
    assert accelerator.supported_dtypes() == [torch.float32, torch.bfloat16, torch.float16]  # not declared twice


def test_every_test_worker_that_starts_its_own_gloo_group_skips_the_shared_memory_kernel():
    """A test's worker process that calls dist.init_process_group itself (not init_distributed) must mark DeepSpeed's
    shared-memory kernel first: the first DeepSpeed collective set-up after it builds the kernel otherwise (53 s on
    a machine without the build cache; 2 min in the full suite, in test_tied_head_checkpoint's worker)."""
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                 if "init_process_group(" in (text := p.read_text()) and "skip_inference_shm_kernel()" not in text]
    assert offenders == []


def test_sigusr1_a_scheduler_s_time_limit_warning_asks_to_stop_with_a_checkpoint(monkeypatch, capsys):
    """SLURM's ``--signal=USR1@120`` warns a job before its time limit: SIGUSR1's default action ended the run
    at once with no checkpoint (exit 138, measured); it now stops after the step as SIGTERM does."""
    monkeypatch.setattr(StopSignal, "requested_at", None)
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal().install()
    try:
        assert signal.getsignal(signal.SIGUSR1) == stop._handle  # else raising it ends pytest
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
        assert "SIGUSR1 received: stopping after this step" in capsys.readouterr().err
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.parametrize("libuv", [True, False])  # the store's two servers word EADDRINUSE differently
def test_a_master_port_another_job_holds_is_one_line_naming_it_and_how_to_choose_another(monkeypatch, libuv):
    """Two deepspeed (or torchrun) jobs on one machine, neither given a port: both take 29500, and the second's
    rank 0 failed with torch's DistNetworkError traceback (EADDRINUSE). Now a PortInUse names the port and the
    launchers' flags; torch's own store, on a port a socket holds here, gives the error."""
    import socket

    import deepspeed
    import torch.distributed as dist

    from vlscale.engine.distributed import PortInUse, init_distributed

    def init(**kwargs):  # what torch's env:// rendezvous does on rank 0
        dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), 1, True, wait_for_workers=False,
                      use_libuv=libuv)

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for name, value in (("DS_ACCELERATOR", "cpu"), ("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(deepspeed, "init_distributed", init)
        with pytest.raises(PortInUse) as e:
            init_distributed()
    assert f"MASTER_PORT {port} on 127.0.0.1 is in use" in str(e.value) and "deepspeed --master_port P" in str(e.value)

    def other(**kwargs):
        raise dist.DistNetworkError("Connection refused")

    monkeypatch.setattr(deepspeed, "init_distributed", other)
    with pytest.raises(dist.DistNetworkError):  # any other network error is torch's, as it was
        init_distributed()


def test_a_master_port_in_use_is_train_pys_one_line_and_exit_code_1(tmp_path, monkeypatch, launcher, capsys):
    """init_distributed's PortInUse (rank 0 of a second job on deepspeed's default port: the rank that listens) is
    the rank's one line and exit code 1: it was torch's DistNetworkError traceback. The run never started: its
    output_dir is not made (it was, empty, by the checks before start-up)."""
    import vlscale.engine.distributed as distributed

    def in_use(*args, **kwargs):
        raise distributed.PortInUse("MASTER_PORT 29500 on 127.0.0.1 is in use")

    monkeypatch.setattr(distributed, "init_distributed", in_use)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert launcher("train").main(["--config", "tiny", f"output_dir={tmp_path / 'run' / 'x'}"]) == 1
    assert capsys.readouterr().err == "vlscale: rank 0: MASTER_PORT 29500 on 127.0.0.1 is in use\n"
    assert not (tmp_path / "run").exists()


def test_a_rank_the_launcher_ends_after_rank_0_refused_its_port_adds_no_line(tmp_path, monkeypatch, launcher, capsys):
    """README: a second run on a port in use "stops with one line saying so", rank 0's. Rank 1, still starting when
    rank 0 ended, got DeepSpeed's launch.py's SIGTERM there and said "aborted (SIGTERM during start-up, ...)" too.
    A rank whose launcher has fewer ranks left than it started (one ended: its own line says why) ends quietly;
    a SIGTERM with every rank there (a scheduler's) is still each rank's line."""
    import psutil

    import vlscale.engine.distributed as distributed

    parent = _Parent(["/usr/bin/python3", "-m", "deepspeed.launcher.launch", "t.py"], os.getppid())
    monkeypatch.setattr(psutil, "Process", lambda pid: parent if pid == os.getppid() else None)
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_SIZE", "2")):
        monkeypatch.setenv(name, value)
    parent.children = lambda: [_Proc(11)]  # rank 0 ended (reaped by the launcher), this rank left
    assert distributed.sibling_ended()
    parent.children = lambda: [_Proc(10), _Proc(11)]
    assert not distributed.sibling_ended()
    monkeypatch.delenv("LOCAL_SIZE")  # one rank on this machine: no sibling to end
    assert not distributed.sibling_ended()
    monkeypatch.setenv("LOCAL_SIZE", "2")

    def in_start_up():  # the launcher's SIGTERM while this rank starts
        signal.raise_signal(signal.SIGTERM)

    train = launcher("train")
    monkeypatch.setattr(train, "refused_before_start", lambda *a: None)
    monkeypatch.setattr(distributed, "init_distributed", in_start_up)
    monkeypatch.setattr(distributed, "watch_launcher", lambda: None)  # no thread watching the stand-in
    for children, said in (([_Proc(11)], ""), ([_Proc(10), _Proc(11)], "vlscale: rank 1: aborted (SIGTERM during "
                                                "start-up, before training began: no checkpoint was written)\n")):
        parent.children = lambda: children
        assert train.main(["--config", "tiny", f"output_dir={tmp_path / 'run'}"]) == 128 + signal.SIGTERM
        assert capsys.readouterr().err == said
    assert not (tmp_path / "run").exists()
