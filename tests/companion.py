"""The suite's second stream: part of the integration tests runs in a companion pytest session, beside the
main session's integration tests, on the cores they leave idle.

The integration tests mostly wait for launched runs, and their launches leave one of the 2 cores idle much of
the time (measured with vmstat over the whole suite: the unit phase 15 % idle, the integration phase 45 %).
The files in :data:`COMPANION_FILES` (those sharing no run or job with the main session's tests) are collected
as usual; the main session then puts stand-ins in their place, at the end of its order (:class:`CompanionItem`,
the same node ids), starts ``python -m pytest NODEIDS`` when its integration tests begin, and each stand-in
reports its test's outcome as the companion session reported it: passed, failed (with the companion's
traceback and captured output), skipped, xfailed; ``--durations`` shows the companion's times. Both sessions'
launched runs compute on one thread a process while both run (two 2-thread processes on 2 cores spin in
OpenMP's barriers).

It starts between unit tests once the suite's lane and background jobs (tests/conftest.py) are done (a core then
idled ~40 s before the integration tests: vmstat), or with the first integration test. Measured back to back
(2026-12-06): the suite 480 s starting it with the first integration test, 406 s starting it this way (430 s
against 469 s in an earlier pair). ``VLSCALE_TEST_COMPANION=0`` runs every test in the main session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# tests/integration/ files the companion runs: they use none of the main session's cached runs or jobs (the
# ``runs``, ``learning_job`` and ``triton_interpreter`` fixtures). Balanced by measured time (timelines of the whole
# suite, 2026-12-06): started with the first integration test and holding test_cache_vision, test_global_batch and
# test_resume_data_early too (12 s in one session), the companion ended 20 s after the main session's own
# integration tests; started earlier (below) and holding test_runner_sigterm too (26 s), it ended with them. With
# more unit tests before it (2026-12-07) it ended 39 s before them (576 s against 537 s into the suite); with
# test_cache_vision, test_custom_task_training and test_loop_syncs too (18 s), 1 s before (600 s against 599 s).
COMPANION_FILES = ("test_adapter_buffers.py", "test_cache_vision.py", "test_custom_task_training.py",
                   "test_evaluate_sharded.py", "test_half_precision.py", "test_loop_syncs.py", "test_loss_reduction.py",
                   "test_paper_preset_real.py", "test_predict_only.py", "test_replicate.py", "test_resume_errors.py",
                   "test_resume_unstepped_tasks.py", "test_runner_sigterm.py", "test_sharded_loading.py")
SWITCH_ENV = "VLSCALE_TEST_COMPANION"  # "0": no companion session
REPORT_ENV = "VLSCALE_COMPANION_REPORT"  # set in the companion session: where its reports go (JSON lines)
SOCKET_ENV = "VLSCALE_PRELOADED_SOCKET"  # set in the companion session: the main session's preloaded server
SHARED_FIXTURES = ("runs", "learning_job", "triton_interpreter")  # the main session's: never in the companion


class CompanionFailure(Exception):
    """A test that failed in the companion session; the message is its report there."""


class Companion:
    def __init__(self, config, nodeids: list[str]):
        self.config, self.nodeids = config, nodeids
        self.folder = Path(config._tmp_path_factory.mktemp("companion"))
        self.report_path, self.log_path = self.folder / "reports.jsonl", self.folder / "log.txt"
        self.proc: subprocess.Popen | None = None
        self.reports: dict[str, dict[str, dict]] = {}  # nodeid -> when -> report
        self._read = 0  # bytes of the report file taken

    def start(self) -> None:
        """``python -m pytest NODEIDS`` in the repository, its launched runs (and this session's from now on) on one
        thread a process."""
        os.environ["OMP_NUM_THREADS"] = "1"  # read by tests/preloaded.py's launch_env for every later run
        env = dict(os.environ, **{REPORT_ENV: str(self.report_path)})
        server = getattr(self.config, "_vlscale_preloaded", None)
        if server is not None:  # its launched runs fork from this session's preloaded server (tests/conftest.py)
            env[SOCKET_ENV] = server.sock_path
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(self.folder / "tmp"),
               "--rootdir", str(self.config.rootpath), *self.nodeids]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def _take(self) -> None:
        if not self.report_path.exists():
            return
        with open(self.report_path, "rb") as f:
            f.seek(self._read)
            text = f.read()
        whole = text[:text.rfind(b"\n") + 1]  # a line being written is taken at the next look
        self._read += len(whole)
        for line in whole.decode().splitlines():
            rep = json.loads(line)
            self.reports.setdefault(rep["nodeid"], {})[rep["when"]] = rep

    def result(self, nodeid: str) -> dict[str, dict]:
        """Wait for the companion's reports of ``nodeid`` (setup, call, teardown) -> them by phase."""
        if self.proc is None:
            self.start()  # a session whose first test is a stand-in
        while True:
            exited = self.proc.poll() is not None  # before the look: an exit's last reports are read
            self._take()
            if "teardown" in self.reports.get(nodeid, {}):
                return self.reports[nodeid]
            if exited:
                raise CompanionFailure(f"the companion session (tests/companion.py) exited {self.proc.returncode} "
                                       f"without reporting {nodeid}; its output ({self.log_path}):\n"
                                       f"{self.log_path.read_text()[-6000:]}")
            time.sleep(0.1)


class CompanionItem(pytest.Item):
    """In the main session, a test the companion session runs: its outcome there."""

    def __init__(self, *, companion: Companion, location, **kwargs):
        super().__init__(**kwargs)
        self.companion, self._location = companion, location
        self.reps: dict[str, dict] = {}  # the companion's reports of this test, by phase
        self.durations: dict[str, float] = {}  # the companion's, by phase (for --durations)

    def reportinfo(self):
        return self._location

    def _replay(self, when: str) -> None:
        """Raise as the companion's ``when`` phase ended: its failure, skip or xfail (nothing if it passed)."""
        rep = self.reps.get(when)
        if rep is None or rep["outcome"] == "passed":
            return
        if rep["outcome"] == "failed":
            raise CompanionFailure(f"[in the companion session, {when}]\n{rep['longrepr']}"
                                   + "".join(f"\n{'-' * 8} {title} {'-' * 8}\n{content}"
                                             for title, content in rep["sections"]))
        if rep["wasxfail"] is not None:
            pytest.xfail(rep["wasxfail"])
        pytest.skip(rep["skip_reason"])

    def setup(self) -> None:
        """Wait for the companion's reports of this test; each phase here ends as it ended there (a fixture's error
        is an error here too)."""
        self.reps = self.companion.result(self.nodeid)
        self.durations = {when: rep["duration"] for when, rep in self.reps.items()}
        self._replay("setup")

    def runtest(self) -> None:
        self._replay("call")

    def teardown(self) -> None:
        self._replay("teardown")

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance(CompanionFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


# ----------------------------------------------------------------------------- hooks (tests/conftest.py registers them)

@pytest.hookimpl(trylast=True)  # after the other conftests' ordering and -k / -m deselection
def pytest_collection_modifyitems(config, items):
    config._vlscale_companion = split(config, items)


def pytest_runtest_setup(item):
    """The companion session starts with the main session's first integration test, if not started earlier."""
    mate = getattr(item.config, "_vlscale_companion", None)
    if mate is not None and mate.proc is None and "/tests/unit/" not in str(item.path):
        mate.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if isinstance(item, CompanionItem):
        report.duration = item.durations.get(report.when, report.duration)  # --durations: the companion's times
    return report


def pytest_runtest_logreport(report):
    path = os.environ.get(REPORT_ENV)
    if path:  # this is the companion session
        write_report(path, report)


def pytest_unconfigure(config):
    mate = getattr(config, "_vlscale_companion", None)
    if mate is not None:
        mate.stop()  # a session ended early (-x, Ctrl-C)


def split(config, items: list) -> Companion | None:
    """Put stand-ins for the companion's tests in place, at the end of ``items`` (in place) -> the companion, or
    None where there is nothing to share out (none of its files, or only they, collected; switched off; or this
    is the companion)."""
    if os.environ.get(SWITCH_ENV) == "0" or REPORT_ENV in os.environ or config.option.collectonly:
        return None
    moved = [i for i in items if i.path.parent.name == "integration" and i.path.name in COMPANION_FILES]
    if not moved or len(moved) == len(items):
        return None
    for item in moved:
        shared = set(SHARED_FIXTURES) & set(getattr(item, "fixturenames", ()))
        if shared:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(shared)}, which the companion session does not share: "
                                    f"take {item.path.name} out of tests/companion.py's COMPANION_FILES")
    companion = Companion(config, [i.nodeid for i in moved])
    moved_ids = {id(i) for i in moved}
    kept = [i for i in items if id(i) not in moved_ids]
    items[:] = kept + [CompanionItem.from_parent(i.parent, name=i.name, companion=companion, location=i.reportinfo())
                       for i in moved]
    return companion


def write_report(path: str, report) -> None:
    """In the companion session: one JSON line per phase of each test (what :class:`CompanionItem` replays)."""
    longrepr = report.longrepr
    skip_reason = longrepr[2] if isinstance(longrepr, tuple) else ""
    if skip_reason.startswith("Skipped: "):
        skip_reason = skip_reason[len("Skipped: "):]
    rep = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "duration": report.duration,
           "longrepr": "" if longrepr is None or isinstance(longrepr, tuple) else str(longrepr),
           "skip_reason": skip_reason, "wasxfail": getattr(report, "wasxfail", None),
           "sections": [list(s) for s in report.sections]}
    with open(path, "a") as f:
        f.write(json.dumps(rep) + "\n")
