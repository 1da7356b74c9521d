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

from vlscale.engine.distributed import LauncherWatch, entry_point

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
    assert lines == ["[vlscale] rank 0: DeepSpeed's runner (pid 1) is gone: stopping as on SIGTERM (a resumable "
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
