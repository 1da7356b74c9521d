"""Fixtures for every test directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# No test asks a model or dataset hub (the suite runs where there is none): set before anything imports
# huggingface_hub, which reads them once. The README's test command then runs as .ci/run's does; without them a
# lookup of a name that is not a local folder retried the hub ~20 s on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import companion
from lane import Lane
from preloaded import TIMELINE_ENV, PreloadedServer, launch_env, machine_busy_s

ROOT = Path(__file__).resolve().parents[1]


def _keep_bytecode() -> None:
    """Under ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines, this project's CI machines among them) each pytest
    session rewrote the asserts of its test modules again and each process the suite starts compiled vlscale
    again: the suite's processes write their bytecode as Python does by default (``__pycache__`` folders, which git
    ignores; a ``PYTHONPYCACHEPREFIX`` folder instead would hide the installed packages' own bytecode, and every
    process compiled torch and transformers again)."""
    if sys.dont_write_bytecode and os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        sys.dont_write_bytecode = False


def pytest_configure(config):
    _keep_bytecode()
    config.pluginmanager.register(companion, "vlscale_companion")  # tests/companion.py's hooks
    config._vlscale_lane = Lane(lambda: _busy_jobs(config))
    # Started before collection, so its imports overlap the suite's own (see tests/preloaded.py).
    if not config.option.collectonly:
        config._vlscale_preloaded = PreloadedServer(Path(tempfile.mkdtemp(prefix="vlscale_preloaded_")), launch_env(),
                                                    os.environ.get(companion.SOCKET_ENV))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``VLSCALE_TEST_TIMELINE=FILE`` (benchmarks/suite_time.py): a JSON line per test, its session, start,
    wall time, this process's CPU time and the whole machine's busy time across it (a session nested in a test,
    tests/unit/test_companion.py's, has another root and writes nothing; nor does the main session's stand-in
    for a companion's test)."""
    path = os.environ.get(TIMELINE_ENV)
    if not path or isinstance(item, companion.CompanionItem) or item.config.rootpath != ROOT:
        yield
        return
    t0, own0, busy0 = time.time(), time.process_time(), machine_busy_s()
    yield
    line = {"kind": "test", "id": item.nodeid, "session": "companion" if companion.REPORT_ENV in os.environ else "main",
            "t0": t0, "wall_s": time.time() - t0, "cpu_s": time.process_time() - own0,
            "machine_busy_s": machine_busy_s() - busy0}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def pytest_unconfigure(config):
    for job in getattr(config, "_vlscale_jobs", {}).values():
        if job is not None:
            job.stop()  # a session ended early (-x, Ctrl-C) leaves no job running
    server = getattr(config, "_vlscale_preloaded", None)
    if server is not None:
        server.close()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def preloaded(pytestconfig) -> PreloadedServer:
    """Launched runs without ~8 s of imports each: ``preloaded.run(script, args, nproc=2, env=..., timeout=...)``
    or ``.start(...)`` (a Popen-like handle); see tests/preloaded.py."""
    return pytestconfig._vlscale_preloaded


@pytest.fixture(scope="session")
def script():
    """``script("benchmarks/loop_overhead.py")``: a script of the repository (not a package module) imported as a
    module, once a session, to test its functions in this process."""
    loaded = {}

    def load(path: str, module_name: str = ""):
        if path not in loaded:
            spec = importlib.util.spec_from_file_location(module_name or f"script_{Path(path).stem}", ROOT / path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[path] = module
        return loaded[path]

    return load


@pytest.fixture(scope="session")
def launcher(script):
    """``launcher("evaluate").main([...])``: a launchers/ script as a module, to run its ``main`` in this
    process (the arguments are parsed as on the command line, without ~10 s of imports per launch)."""
    return lambda name: script(f"launchers/{name}.py", f"launcher_{name}")


@pytest.fixture(scope="session")
def frame_folders():
    """``frame_folders(task_dir, {"vid": n_frames, ...}, size=(h, w))``: ``task_dir/frames/<vid>/00000.jpg ...``,
    random JPEG frames (seeded), as a video task laid out as frame images holds them."""
    def write(task_dir: Path, videos: dict, size=(48, 64)) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for vid, frames in videos.items():
            (task_dir / "frames" / vid).mkdir(parents=True)
            for k in range(frames):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                    task_dir / "frames" / vid / f"{k:05d}.jpg")

    return write


# ----------------------------------------------------------------------------- background jobs
# Long runs whose tests only read their results start as soon as collection is done, one thread each,
# beside the serial suite: it leaves ~40% of 2 cores idle (single-threaded imports and unit tests).
# A job starts only if a collected test uses its fixture; the fixture waits for it.

class Job:
    def __init__(self, proc, log_path: Path, timeout_s: float):
        self.proc, self.log_path, self.timeout_s = proc, Path(log_path), timeout_s
        self.folder = self.log_path.parent

    def output(self) -> str:
        """Wait for the job; its output (stdout and stderr), asserting it exited 0."""
        try:
            code = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.proc.args} did not finish in {self.timeout_s} s:\n"
                                 f"{self.log_path.read_text()[-4000:]}")
        text = self.log_path.read_text()
        assert code == 0, f"{self.proc.args} exited {code}:\n{text[-6000:]}"
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _start_triton_job(config) -> Job | None:
    """tests/unit/triton_interpreter_checks.py under TRITON_INTERPRET=1: a new interpreter (triton reads
    the variable when it defines kernels)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from vlscale.kernels import adapter as ka

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop(ka.BACKEND_ENV, None)
    folder = Path(tempfile.mkdtemp(prefix="triton_", dir=config._vlscale_preloaded.folder))
    with open(folder / "out.json", "w") as out, open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "unit" / "triton_interpreter_checks.py")],
                                env=env, stdout=out, stderr=log, stdin=subprocess.DEVNULL)
    return Job(proc, folder / "log.txt", 600)


def _start_learning_job(config) -> Job:
    """tests/integration/learning_run.py (the embedded default's short training), forked from the
    preloaded server with one torch thread."""
    server = config._vlscale_preloaded
    folder = Path(tempfile.mkdtemp(prefix="learning_", dir=server.folder))
    run = server.start(ROOT / "tests" / "integration" / "learning_run.py", [folder],
                       env=dict(server.env, OMP_NUM_THREADS="1"), cwd=ROOT, log_path=folder / "log.txt")
    return Job(run, folder / "log.txt", 900)


BACKGROUND_JOBS = {"triton_interpreter": _start_triton_job, "learning_job": _start_learning_job}


def pytest_collection_modifyitems(items):
    """Unit tests first: the background jobs run beside them (mostly one busy core), not beside the
    integration tests' 2-rank runs, which keep both cores busy."""
    items.sort(key=lambda item: 0 if "/tests/unit/" in str(item.path) else 1)  # stable: file order kept


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    session.config._vlscale_jobs = {name: start(session.config) for name, start in BACKGROUND_JOBS.items()
                                    if name in used}


def _busy_jobs(config) -> int:
    """The cores the background jobs keep busy now (one each), the companion session's counted as one."""
    jobs = getattr(config, "_vlscale_jobs", None) or {}
    mate = getattr(config, "_vlscale_companion", None)
    return (sum(1 for job in jobs.values() if job is not None and job.proc.poll() is None)
            + int(mate is not None and mate.running()))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The lane (tests/lane.py, ``config._vlscale_lane``: other conftests queue runs on it at collection) goes on
    between unit tests and closes at the first other test; once it and the background jobs are done, the companion
    session starts (it starts at the first integration test otherwise). Last, after pytest's own teardown of the
    test's fixtures: a run started here copies this process's environment, and before it took a test's
    ``monkeypatch.setenv`` along (RANK alone, from test_log.py or test_provenance.py: the lane's 1-process run then
    took itself for a launched rank and failed in DeepSpeed's MPI discovery, "No module named 'mpi4py'")."""
    if "/tests/unit/" in str(item.path) and nextitem is not None and "/tests/unit/" in str(nextitem.path):
        lane = item.config._vlscale_lane
        lane.advance()
        mate = getattr(item.config, "_vlscale_companion", None)
        if mate is not None and mate.proc is None and lane.drained() and not _busy_jobs(item.config):
            mate.start()  # tests/companion.py: its session on the core that the lane and the jobs no longer use
    else:
        item.config._vlscale_lane.close()


def _job(config, name: str) -> Job | None:
    jobs = config.__dict__.setdefault("_vlscale_jobs", {})
    if name not in jobs:
        jobs[name] = BACKGROUND_JOBS[name](config)
    return jobs[name]


@pytest.fixture(autouse=True)
def _one_thread_beside_the_background_jobs(pytestconfig):
    """While a background job or the lane's run runs (beside the unit tests), this process's torch computes
    on one thread: two threads beside them oversubscribe the 2 cores, and OpenMP's barriers then wait on a
    descheduled thread (measured: test_choice_scoring's tests 0.5 s alone, 12-13 s beside the jobs)."""
    if not pytestconfig._vlscale_lane.busy():
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _custom_tasks_end_with_the_test():
    """The custom tasks a test's configs declare (data.custom_tasks: vlscale.data.tasks' registry, one a process)
    are forgotten after it: another test's unknown task lists the built-in tasks alone, whatever ran before."""
    from vlscale.data import tasks

    declared = dict(tasks._CUSTOM)
    yield
    tasks._CUSTOM.clear()
    tasks._CUSTOM.update(declared)


@pytest.fixture(scope="session")
def triton_interpreter(pytestconfig) -> dict:
    """Raw results of tests/unit/triton_interpreter_checks.py under ``TRITON_INTERPRET=1`` (one process,
    a background job)."""
    job = _job(pytestconfig, "triton_interpreter")
    if job is None:
        pytest.skip("triton is not installed")
    job.output()
    return json.loads((job.folder / "out.json").read_text().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def learning_job(pytestconfig) -> Job:
    """The finished short training of tests/integration/learning_run.py (a background job): its folder
    holds run/ (the output_dir); ``.output()`` is what it printed."""
    job = _job(pytestconfig, "learning_job")
    job.output()
    return job
