"""A fork server for the test suite's launched runs: one process imports torch, transformers,
DeepSpeed, open_clip and vlscale once, then forks a fresh process group per run.

Every launched run of the suite (a training, a 2-rank worker script) otherwise spends ~8 s of one
core importing the same modules before its first line of work (measured: a 6-step tiny training
takes 14.4 s from a new interpreter, 6.3 s forked from here, with the same losses). The server
imports and never computes, so its children start with no thread pool or process group of its own.

What a run sees is what a new interpreter given the same command sees: its own process group
(``os.killpg(run.pid, ...)`` reaches all its ranks, as with a launcher's), the environment it was
given, the ``sys.argv`` and ``sys.path[0]`` of ``python SCRIPT ARGS`` or ``python -m MODULE ARGS``,
stdout and stderr in a log file, ``OMP_NUM_THREADS`` applied, atexit handlers run at exit.
``nproc > 1`` starts the ranks as ``torchrun --standalone`` does (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT, OMP_NUM_THREADS=1; when a rank fails the others get SIGTERM,
then SIGKILL after 30 s). One process computes on one torch thread unless its environment sets
``OMP_NUM_THREADS``: the suite's other work (the background jobs, the lane's runs, the companion session) keeps
the other core busy, and two threads beside it oversubscribe the 2 cores, OpenMP's barriers then waiting on a
descheduled thread (tests/unit/test_peft.py's ZeRO-3 probe: 97 s on two threads beside a busy core, 12.6 s on one;
40-43 s in the suite). Variables read while modules import (``IMPORT_TIME_VARS``) are the
server's: a run that does not set one gets the server's value, one asking for another is refused.
``sys.path`` past its first entry is the server's (its PYTHONPATH holds the repository root). Tests
of the launchers themselves (torchrun, DeepSpeed's launcher, plain ``python``) launch those.

    server: python tests/preloaded.py SOCKET_PATH
    client: PreloadedServer(folder, env) -> .start(script, args, nproc=, env=, log_path=) -> PreloadedRun
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpu_adam_op

# Read by the preloaded modules while they import: a run must have the server's values.
IMPORT_TIME_VARS = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRITON_INTERPRET", "HF_HOME",
                    "HF_HUB_CACHE")
READY_TIMEOUT_S = 180
# each test and launched run adds a JSON line to this file (benchmarks/suite_time.py)
TIMELINE_ENV = "VLSCALE_TEST_TIMELINE"
KILL_GRACE_S = 30


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (``/proc/stat``'s first line: all but idle and iowait); for the
    suite's timeline (tests/conftest.py, benchmarks/suite_time.py)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


ROOT = Path(__file__).resolve().parents[1]


def launch_env() -> dict:
    """The environment of the suite's launched runs: CPU accelerator, no hub, the repository importable."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


# ----------------------------------------------------------------------------- server side

def _preload() -> None:
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR=cpu from the environment)
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    # imported by every ZeRO engine's optimizer check (DeepSpeed 0.19: torch._dynamo / _inductor, ~3 s a run);
    # a warm-up only, absent before DeepSpeed 0.17.6
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ModuleNotFoundError:
        pass
    import open_clip  # noqa: F401
    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers.models.bart.modeling_bart  # noqa: F401
    import transformers.models.t5.modeling_t5  # noqa: F401

    import vlscale.data  # noqa: F401
    import vlscale.engine.sharded_loading  # noqa: F401
    import vlscale.engine.trainer  # noqa: F401
    import vlscale.modeling.vl_model  # noqa: F401


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _rank(req: dict, env: dict, log_fd: int) -> None:
    """Become ``python SCRIPT ARGS`` in this process; never returns."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(req["cwd"])
        if "OMP_NUM_THREADS" in env:  # what a new interpreter's torch reads from the environment
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        if env.get(cpu_adam_op.ENV) == "standin":  # asked for by the run: tests/cpu_adam_op.py
            cpu_adam_op.install()
        argv = list(req["argv"])
        try:
            if argv[0] == "-m":  # python -m MODULE ARGS
                sys.argv, sys.path[0] = argv[1:], os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # python SCRIPT ARGS
                sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _monitor(conn: socket.socket, req: dict) -> None:
    """The run's process-group leader: start its ranks, report the pid, then the exit code; never returns."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    nproc = int(req["nproc"])
    log_fd = os.open(req["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    from vlscale.engine.distributed import free_port

    port = free_port()
    ranks = []
    for rank in range(nproc):
        env = dict(req["env"])
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            env.setdefault("OMP_NUM_THREADS", "1")
        pid = os.fork()
        if pid == 0:
            conn.close()
            _rank(req, env, log_fd)
        ranks.append(pid)
    os.close(log_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks handle it; this process reports what they did
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code, cpu_s = 0, 0.0
    try:
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        alive, deadline = set(ranks), None
        while alive:
            if deadline is not None and time.monotonic() > deadline:
                for pid in alive:
                    os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.05)
                continue
            alive.discard(pid)
            cpu_s += usage.ru_utime + usage.ru_stime
            rc = os.waitstatus_to_exitcode(status)
            if rc != 0 and code == 0:
                code = rc  # the first failure, as torchrun reports it; the others are stopped
                for other in alive:
                    os.kill(other, signal.SIGTERM)
                deadline = time.monotonic() + KILL_GRACE_S
        timeline = req["env"].get(TIMELINE_ENV)
        if timeline:  # benchmarks/suite_time.py: what each launched run cost (written before the run is seen to end)
            with open(timeline, "a") as f:
                f.write(json.dumps({"kind": "run", "argv": req["argv"], "nproc": nproc, "cpu_s": round(cpu_s, 3),
                                    "end": time.time()}) + "\n")
        conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
    finally:
        os._exit(0)


def serve(sock_path: str) -> None:
    _preload()
    # What the imports made is never garbage: out of the collector's sight, a run's collections (DeepSpeed's
    # gc.collect() as ZeRO-3 starts, Python's own) do not walk it nor write to its pages (copied on write)
    gc.collect()
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path + ".tmp")
    server.listen(16)
    os.rename(sock_path + ".tmp", sock_path)  # clients see the path only once it accepts
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped automatically
    parent = os.getppid()
    server.settimeout(5)
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the test session is gone (killed): so is the server
                return
            continue
        conn.settimeout(None)
        req = json.loads(_read_line(conn))
        if req.get("stop"):
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _monitor(conn, req)
        conn.close()


# ----------------------------------------------------------------------------- client side

class PreloadedRun:
    """One run (its ranks in one process group); the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, conn: socket.socket, args: list[str], log_path: Path):
        self.args, self.log_path, self.returncode = args, log_path, None
        self._conn, self._buf = conn, b""
        started = self._message(timeout=60)
        if started is None:
            raise RuntimeError(f"the preloaded server did not start {args}")
        self.pid = started["pid"]  # the process-group id

    def _message(self, timeout: float | None = None) -> dict | None:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._conn.recv(4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                msg = self._message(timeout)
            except socket.timeout:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            # no report: the group leader was killed (kill() / killpg SIGKILL)
            self.returncode = msg["returncode"] if msg else -signal.SIGKILL
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                return self.wait(timeout=0.001)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return Path(self.log_path).read_text()


class PreloadedServer:
    def __init__(self, folder: Path, env: dict, sock_path: str | None = None):
        """A new server, or with ``sock_path`` the running one listening there (the main session's, for the
        companion session: ~16 s of one core's imports saved; the one that started a server closes it)."""
        self.folder, self.env = Path(folder), dict(env)
        self._count, self.proc, self._log = 0, None, None
        if sock_path is not None:
            self.sock_path = sock_path
            return
        self.sock_path = str(self.folder / "server.sock")
        if len(self.sock_path) > 100:  # AF_UNIX paths hold 107 bytes: a long TMPDIR falls back to /tmp
            self.sock_path = os.path.join(tempfile.mkdtemp(prefix="vlp_", dir="/tmp"), "server.sock")
        self._log = open(self.folder / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, __file__, self.sock_path], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder)

    def one_rank_env(self, **extra) -> dict:
        """The server's environment with a one-rank process group's variables (RANK 0 of WORLD_SIZE 1, a free
        MASTER_PORT) and ``extra``: for a 1-process run whose code starts the group itself (``nproc > 1`` sets
        them for each rank)."""
        from vlscale.engine.distributed import free_port

        return dict(self.env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), **extra)

    def ready(self) -> bool:
        """Whether the server is listening (a start now does not wait for its imports)."""
        return os.path.exists(self.sock_path)

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(self.sock_path):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the preloaded server exited ({self.proc.returncode}):\n"
                                   f"{(self.folder / 'server.log').read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the preloaded server was not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.05)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.sock_path)
        return conn

    def start(self, script: str, args: list[str], nproc: int = 1, env: dict | None = None, cwd: str | None = None,
              log_path: Path | None = None) -> PreloadedRun:
        """``python SCRIPT ARGS`` (or ``python -m MODULE ARGS`` with script "-m" and the module first in args)."""
        env = dict(self.env if env is None else env)
        if nproc == 1:  # one torch thread unless asked: beside the suite's other work (module docstring)
            env.setdefault("OMP_NUM_THREADS", "1")
        for key in IMPORT_TIME_VARS:
            if key in env and env[key] != self.env.get(key):
                raise ValueError(f"{key}={env[key]!r} differs from the preloaded server's "
                                 f"{self.env.get(key)!r}, which its modules read while importing: "
                                 "launch this run in a new interpreter")
            if key in self.env:
                env[key] = self.env[key]  # what the run's modules were imported with
        if log_path is None:
            self._count += 1
            log_path = self.folder / f"run{self._count}.log"
        argv = [str(script), *map(str, args)]
        conn = self._connect()
        conn.sendall(json.dumps({"argv": argv, "nproc": nproc, "env": env, "cwd": str(cwd or os.getcwd()),
                                 "log_path": str(log_path)}).encode() + b"\n")
        return PreloadedRun(conn, [sys.executable, *argv], Path(log_path))

    def run(self, script: str, args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        """Run to completion -> CompletedProcess with the log as ``.stdout`` (stdout and stderr)."""
        run = self.start(script, args, **kw)
        try:
            code = run.wait(timeout)
        except subprocess.TimeoutExpired:
            run.kill()
            raise
        return subprocess.CompletedProcess(run.args, code, run.output())

    def close(self) -> None:
        if self.proc is None:  # another session's server: it closes it
            return
        if self.proc.poll() is None:
            try:
                conn = self._connect()
                conn.sendall(b'{"stop": true}\n')
                conn.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        sock_dir = os.path.dirname(self.sock_path)
        if sock_dir != str(self.folder):
            shutil.rmtree(sock_dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
