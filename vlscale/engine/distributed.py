"""Process-group set-up for every way a run starts, plus the guards that keep ranks from hanging.

Launch modes, all through :func:`init_distributed`:

* ``deepspeed [--num_gpus N] launchers/train.py ...`` (one node, or several through a hostfile),
* ``torchrun --nproc_per_node N launchers/train.py ...``,
* ``python launchers/train.py ...``: one process; a 1-rank process group is created on a free
  local port so DeepSpeed runs unchanged,
* any launcher that exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.

Without a GPU, DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) and the gloo backend are
selected automatically; this must happen before ``deepspeed`` is first imported.

Guards: collectives time out after ``VLSCALE_DIST_TIMEOUT`` seconds (default 300), and a
:class:`Watchdog` thread ends a rank that makes no progress for ``VLSCALE_WATCHDOG_TIMEOUT``
seconds (default: the collective timeout + 60 s), so a rank that died cannot leave the others
waiting forever. :class:`StopSignal` turns the first Ctrl-C / SIGTERM / SIGUSR1 into a request to stop at
the end of the current step (every rank agrees, then a resumable checkpoint is written); a second
one aborts at once. :class:`LauncherWatch` sends that SIGTERM to a rank whose launcher is gone
(DeepSpeed's runner killed: on one node it passes no signal on; or the rank's launcher killed).
"""

from __future__ import annotations

import datetime
import faulthandler
import functools
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlscale.engine.deepspeed_config import cpu_fp16_enabled, default_device_type

EXIT_HUNG = 3
DEFAULT_DIST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_type: str  # "cpu" or "cuda" (DeepSpeed's accelerator name)
    backend: str
    launched: bool = False
    """A launcher (torchrun, deepspeed, MPI) started this process; False for one started alone, whose 1-rank
    group :func:`init_distributed` made (and set RANK & co for)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: ``cpu`` when there is no GPU."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        if "deepspeed" in sys.modules:
            from deepspeed.accelerator import get_accelerator

            name = get_accelerator().device_name()
            if name != "cpu":
                raise RuntimeError(f"deepspeed was imported before vlscale could select its CPU accelerator "
                                   f"and picked {name!r}; set DS_ACCELERATOR=cpu")
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
"""What launchers (torchrun, deepspeed, MPI) set: a one-process child job must not inherit them."""


def local_device_type() -> str:
    """Where a process started without a launcher runs: ``cuda``, unless there is no GPU or DeepSpeed's accelerator is
    another (``DS_ACCELERATOR=cpu``: :func:`~vlscale.engine.deepspeed_config.default_device_type`, which launched
    ranks follow)."""
    return "cuda" if default_device_type() != "cpu" and torch.cuda.is_available() else "cpu"


def device_problem(device: str | int) -> str | None:
    """Why ``device`` (a launcher's ``--device``: ``cpu``, ``cuda``, ``cuda:N``; an int N: cuda:N, as torch reads it)
    cannot be used here, or None: a name torch does not know, or a GPU this machine does not have. Both were torch's
    errors from inside the model's build, which extract_features.py reported as a CLIP checkpoint it could not load."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a device; give cpu, cuda or cuda:N"
    count = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and not count:
        return f"{device!r}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); give cpu"
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        return f"{device!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def precision_problem(precision: str, device) -> str | None:
    """Why ``precision`` should not train on ``device``, or None: bf16 on a CUDA GPU below compute capability 8.0
    (V100, T4, RTX 20xx), which torch and DeepSpeed accept (``torch.cuda.is_bf16_supported()`` counts emulation)
    and then run emulated (slowly: no bf16 tensor cores), with no word said."""
    dev = torch.device(device)
    if precision != "bf16" or dev.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    if major >= 8:
        return None
    return (f"train.precision=bf16 on {torch.cuda.get_device_name(dev)} (compute capability {major}.{minor}): bf16 "
            f"needs 8.0+ (A100, A10, RTX 30xx and later), and torch would emulate it, slowly; set "
            f"train.precision=fp32, or fp16 (faster, but T5's activations can overflow in fp16)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_timeout_s() -> float:
    raw = os.environ.get("VLSCALE_DIST_TIMEOUT", str(DEFAULT_DIST_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"VLSCALE_DIST_TIMEOUT={raw!r} must be a number of seconds") from None
    if not 0 < value < float("inf"):  # nan and inf: a ValueError / OverflowError traceback inside datetime
        raise ValueError(f"VLSCALE_DIST_TIMEOUT={raw!r} must be a finite number of seconds > 0")
    return value


def watchdog_timeout_s() -> float:
    raw = os.environ.get("VLSCALE_WATCHDOG_TIMEOUT")
    if raw is None:
        return dist_timeout_s() + 60.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"VLSCALE_WATCHDOG_TIMEOUT={raw!r} must be a number of seconds") from None
    if not value > 0:  # 0 or less ended a healthy rank at its first check as hung (exit 3); nan never fired
        raise ValueError(f"VLSCALE_WATCHDOG_TIMEOUT={raw!r} must be a number of seconds > 0 (inf: never)")
    return value


def _single_process_env() -> str:
    """No launcher: a 1-rank group. -> its ``init_method``: a file store in a fresh temporary folder
    rather than a TCP port (runs started together, as replicate.py's rows are, could be handed the same
    "free" port, and one then failed with EADDRINUSE). The launcher variables are set as well
    (DeepSpeed requires them; the DistInfo's ``launched`` still says no launcher)."""
    import atexit
    import shutil
    import tempfile

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    folder = tempfile.mkdtemp(prefix="vlscale_group_")
    atexit.register(shutil.rmtree, folder, True)
    return f"file://{folder}/store"


CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpu_count() -> int:
    """The CPUs this process may use: those it may run on (``os.sched_getaffinity``: taskset, a container's
    cpuset; ``os.cpu_count()`` where the platform cannot say), at most its cgroup's CPU quota rounded up (docker
    ``--cpus``, Kubernetes limits: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``). ``os.cpu_count()`` alone
    counts the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            words = (CGROUP_ROOT / quota_file).read_text().split()
            if period_file:
                words.append((CGROUP_ROOT / period_file).read_text().strip())
            quota, period = int(words[0]), int(words[1])
        except (OSError, ValueError, IndexError):  # no such file, or "max" / -1: no quota
            continue
        if quota > 0 and period > 0:
            cores = min(cores, math.ceil(quota / period))
        break
    return max(1, cores)


def local_world_size() -> int:
    """How many ranks the launcher started on this machine (torchrun's LOCAL_WORLD_SIZE, MPI's LOCAL_SIZE), 1
    without a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def share_cpu_cores() -> int:
    """CPU ranks on one node split its cores (unless OMP_NUM_THREADS says otherwise): no oversubscription.

    torchrun sets OMP_NUM_THREADS=1; the deepspeed launcher and plain python set nothing.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, usable_cpu_count() // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def skip_inference_shm_kernel() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce when it starts a CPU process group.

    The kernel (a C++ extension built on first use: 53 s on a machine without the build cache,
    measured; then ~0.15 s a process to load) serves only ``inference_all_reduce``, which
    DeepSpeed-Inference's tensor parallelism calls and training never does; every collective of a
    training goes through the gloo process group either way. DeepSpeed builds it only when its
    ``deepspeed.ops.__compatible_ops__`` table (probed once per process, then a plain dict) marks it
    compatible, so it is marked not."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def declare_cpu_fp16() -> None:
    """Make DeepSpeed's CPU accelerator declare fp16 (``VLSCALE_CPU_FP16=1``, see
    :func:`vlscale.engine.deepspeed_config.cpu_fp16_enabled`); DeepSpeed's engine checks the
    declaration and nothing else."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():  # a CPU with oneDNN fp16 kernels declares it already
        return
    dtypes = list(accelerator.supported_dtypes())
    accelerator.is_fp16_supported = lambda: True
    accelerator.supported_dtypes = lambda: [*dtypes, torch.float16]


def _launched() -> bool:
    """A launcher (torchrun, deepspeed, MPI) started this process; otherwise it is a 1-rank group."""
    return "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def local_gpu_problem() -> str | None:
    """Why a rank cannot take its GPU, or None: its LOCAL_RANK names a GPU this machine does not show
    (``torchrun --nproc_per_node 8`` or ``deepspeed --num_gpus 8`` on 4 GPUs; or left in the environment of a run
    with no launcher, which takes cuda:LOCAL_RANK too), which was a CUDA "invalid device ordinal" traceback from
    DeepSpeed's set_device, after the process group started."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or select_accelerator() != "cuda":
        return None
    count = torch.cuda.device_count()
    if int(local) < count:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f"{count} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    return (f"LOCAL_RANK={local} needs a GPU cuda:{local}, but this machine shows {shown}: start at most {count} "
            f"rank(s) on it (deepspeed --num_gpus {count}, torchrun --nproc_per_node {count})")


def launcher_world_size() -> int | None:
    """The number of ranks the launcher started, read before any process group exists (1 without a
    launcher); None where a launcher set no size."""
    if not _launched():
        return 1
    size = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    return int(size) if size else None


def srun_without_launcher() -> str | None:
    """Why this process must not start: srun started it as one of several tasks of a step, and no launcher set
    RANK / WORLD_SIZE (DeepSpeed's ``init_distributed`` reads MPI's variables through mpi4py, never SLURM's). Each
    task trained as a 1-rank run: on one output_dir the first held its lock and the others failed on it. None
    elsewhere (a batch script's own process has no SLURM_STEP_NUM_TASKS, whatever its allocation's SLURM_NTASKS)."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if _launched() or not tasks.isdigit() or int(tasks) < 2:
        return None
    return (f"srun started this process as task {os.environ.get('SLURM_PROCID', '?')} of {tasks} without a "
            f"launcher's RANK / WORLD_SIZE, so each task would train alone: let srun start one launcher per node, "
            f"e.g. srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=GPUS_PER_NODE "
            f"--rdzv_backend=c10d --rdzv_endpoint=FIRST_NODE:29500 launchers/train.py ... (README: On a cluster)")


def quiet_library_warnings() -> None:
    """DeepSpeed calls collectives that torch marks deprecated, once per bucket: hide that noise."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PortInUse(RuntimeError):
    """Rank 0 could not listen on MASTER_PORT: another job on this machine (a run of a sweep started beside it)
    holds it. The launchers print its message as the rank's one line."""


def port_in_use_message() -> str:
    port, addr = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "127.0.0.1")
    return (f"MASTER_PORT {port} on {addr} is in use, by another job on this machine (deepspeed takes 29500 unless "
            f"told otherwise): give each run its own port: deepspeed --master_port P, torchrun --master_port P, "
            f"MASTER_PORT=P where you set RANK / WORLD_SIZE yourself")


def _signal_aware(call):
    """``call()`` in a helper thread while this one waits in Python. A rank waiting in the rendezvous is inside
    c10d's store (C++), where Python's signal handlers do not run: when rank 0 could not listen on MASTER_PORT, the
    SIGTERM with which DeepSpeed's launch.py (or torchrun) ends the ranks left waited for the store's 30 s timeout,
    then the launcher killed the rank (measured: 30 s between rank 0's line and the launcher's exit). Here the signal's
    handler runs at once (start-up's line, launchers/train.py); the helper, a daemon, is left waiting as the process
    ends. In the main thread only (elsewhere signals do not reach Python code anyway)."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    helper = threading.Thread(target=run, name="vlscale-rendezvous", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def init_distributed(timeout_s: float | None = None, verbose: bool = False) -> DistInfo:
    """Initialise (or reuse) the default process group through DeepSpeed and return this rank's view."""
    device_type = select_accelerator()
    launched = _launched()
    single = {} if launched else {"init_method": _single_process_env(), "rank": 0, "world_size": 1}
    import deepspeed
    import torch.distributed as dist

    backend = "gloo" if device_type == "cpu" else None  # None: the accelerator's (nccl on CUDA)
    if device_type == "cpu":
        skip_inference_shm_kernel()
        if cpu_fp16_enabled():
            declare_cpu_fp16()
    if not dist.is_initialized():
        try:
            rendezvous = functools.partial(deepspeed.init_distributed, dist_backend=backend, verbose=verbose,
                                           timeout=datetime.timedelta(seconds=timeout_s or dist_timeout_s()), **single)
            # a launched rank may wait for the others; DeepSpeed's MPI discovery (mpirun without torch's variables:
            # MPI_Init) stays in this thread
            if launched and all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
                _signal_aware(rendezvous)
            else:
                rendezvous()
        except dist.DistNetworkError as e:
            if "address already in use" not in str(e).lower():  # torch's libuv store and its older one say so
                raise
            raise PortInUse(port_in_use_message()) from None
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cpu":
        share_cpu_cores()
        device = torch.device("cpu")
    else:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(local_rank)
        device = torch.device(get_accelerator().device_name(local_rank))
    return DistInfo(rank, world, local_rank, device, device_type, dist.get_backend(), launched)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks (one collective), as float64. One rank: the numbers as floats, without
    the trip through a ``device`` tensor (on a GPU a host-to-device copy and a sync, the training loop's every step)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (one collective; nothing on one rank) -> ``t``, left on its device:
    the caller reads it when it needs the numbers, with whatever else it reads then."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (one collective; ``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()  # every rank leaves together: a peer's teardown must not find others mid-collective
        dist.destroy_process_group()


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_gone(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank's process ended (gloo's "Connection
    closed by peer" / "Connection reset by peer" / "Broken pipe"): that rank's own line says why, this
    rank's error is only the echo."""
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_GONE)


class Watchdog:
    """Ends this process when :meth:`beat` has not been called for ``timeout_s`` seconds.

    A rank whose peer died may block in a collective that the backend does not time out (or times
    out only much later); the watchdog prints where it was, dumps every thread's stack and exits
    with code 3 so the launcher tears the job down.
    """

    def __init__(self, timeout_s: float, rank: int = 0):
        self.timeout_s, self.rank = float(timeout_s), rank
        self._last = time.monotonic()
        self._where = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlscale-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self, where: str = "") -> None:
        self._last = time.monotonic()
        if where:
            self._where = where

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = max(0.5, min(5.0, self.timeout_s / 10))
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                sys.stderr.write(
                    f"vlscale: rank {self.rank}: no progress for {idle:.0f}s (last: {self._where}); another "
                    f"rank probably died or hung. Exiting (VLSCALE_WATCHDOG_TIMEOUT={self.timeout_s:.0f}s).\n")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop a run with a checkpoint. SIGUSR1 is a scheduler's warning before the time limit (SLURM's
``--signal=USR1@120``); its default action ended the run at once, with no checkpoint."""


class StopSignal:
    """First SIGINT/SIGTERM/SIGUSR1: ask to stop after the current step; another one (more than
    ``DEBOUNCE_S`` later, so a launcher forwarding the terminal's Ctrl-C does not count): abort.

    Installed over a SIG_IGN too, unlike Python's own Ctrl-C handling: a run a script started with ``&`` inherits
    SIGINT ignored, and a ``kill -INT`` sent to it on purpose should still end it with a checkpoint."""

    DEBOUNCE_S = 3.0
    requested_at: float | None = None
    """When a StopSignal of this process was first asked to stop (monotonic s): a LauncherWatch then
    stays quiet (a Ctrl-C ends DeepSpeed's runner too; its SIGTERM after the debounce would abort)."""

    def __init__(self, announce: bool = True):
        self._first = 0.0
        self.requested = False
        self.signum = None
        self._previous = {}
        self.announce = announce  # the "received" line: rank 0's (a terminal's Ctrl-C reaches every rank)

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.DEBOUNCE_S:
                return  # the same request forwarded by a launcher (torchrun/deepspeed re-send the terminal's)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.requested, self.signum, self._first = True, signum, time.monotonic()
        StopSignal.requested_at = self._first
        if self.announce:
            sys.stderr.write(f"\nvlscale: {signal.Signals(signum).name} received: stopping after this step (in an "
                             f"evaluation: after this batch) with a resumable checkpoint (send it again to abort "
                             f"at once)\n")

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------- launcher ancestry

DEEPSPEED_RUNNERS = ("deepspeed.launcher.runner", "deepspeed", "ds", "deepspeed.pt")
"""What DeepSpeed's runner runs as: the module, or its console scripts."""
DEEPSPEED_LAUNCH = ("deepspeed.launcher.launch",)
TORCHRUN = ("torch.distributed.run", "torch.distributed.launch", "torchrun")
WATCH_PERIOD_S = 1.0


def entry_point(cmdline: list[str]) -> str:
    """What a process runs: ``python [options] -m MODULE`` -> MODULE, ``python [options] SCRIPT`` (a
    console script such as ``deepspeed`` or ``torchrun``) -> the script's file name, ``python -c ...``
    -> "-c", anything else -> the executable's file name ("" for none)."""
    if not cmdline:
        return ""
    if not os.path.basename(cmdline[0]).startswith("python"):
        return os.path.basename(cmdline[0])
    args = iter(cmdline[1:])
    for a in args:
        if a == "-m":
            return next(args, "")
        if a in ("-c", "-"):
            return a
        if a in ("-W", "-X"):
            next(args, None)  # the option's value
        elif not a.startswith("-"):
            return os.path.basename(a)
    return ""


class LauncherWatch:
    """Sends this rank SIGTERM (a resumable checkpoint after the current step, as on Ctrl-C) when the
    launcher that started it is gone.

    ``deepspeed launchers/train.py`` runs as three generations: DeepSpeed's runner, its child
    ``deepspeed.launcher.launch``, and the ranks. On one node the runner passes no signal on (it does
    only for pdsh): SIGTERM to it (a scheduler's, ``kill PID``) ends it alone, and the ranks trained
    on with nobody waiting for them. So a rank checks once a ``period_s``, in a daemon thread (a few
    system calls), that its parent is still the launcher it started under (DeepSpeed's or torchrun's,
    which a SIGKILL also ends alone) and, under DeepSpeed's runner, that the runner is alive (by pid
    and start time) and still the launcher's parent.

    :meth:`for_this_process` gives None, and nothing is watched, for a process whose parent is no such
    launcher: ``python launchers/train.py``, a test, a rank forked by anything else. A launcher with no
    DeepSpeed runner above it (started on its own, or on another node through pdsh, where the runner
    passes signals on) is watched itself, not what is above it."""

    def __init__(self, launcher, runner=None, rank=None, period_s: float = WATCH_PERIOD_S, log=None):
        self.launcher, self.runner = launcher, runner  # psutil.Process objects, taken at start
        self.launcher_name = entry_point(launcher.cmdline())
        self.rank = os.environ.get("RANK", "0") if rank is None else rank
        self.period_s = period_s
        self.log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlscale-launcher-watch", daemon=True)

    @classmethod
    def for_this_process(cls, **kwargs) -> "LauncherWatch | None":
        """A watch of this process's launcher, or None where no launcher is its parent (see the class)."""
        if not _launched():
            return None
        try:
            import psutil  # a DeepSpeed requirement
        except ImportError:
            return None
        try:
            launcher = psutil.Process(os.getppid())
            entry = entry_point(launcher.cmdline())
            if entry not in DEEPSPEED_LAUNCH + TORCHRUN:
                return None
            runner = None
            if entry in DEEPSPEED_LAUNCH:
                above = launcher.parent()
                if above is not None and entry_point(above.cmdline()) in DEEPSPEED_RUNNERS:
                    runner = above
            if launcher.pid != os.getppid() or (runner is not None and launcher.ppid() != runner.pid):
                return None  # it changed while we looked: nothing sure to compare with
            return cls(launcher, runner, **kwargs)
        except (OSError, psutil.Error):
            return None

    def start(self) -> "LauncherWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def gone(self) -> str | None:
        """Why this rank is left behind (its launcher, or DeepSpeed's runner, is gone); None while both live."""
        import psutil

        if os.getppid() != self.launcher.pid or not self.launcher.is_running():
            return f"its launcher {self.launcher_name} (pid {self.launcher.pid}) is gone"
        if self.runner is not None:
            try:
                moved = self.launcher.ppid() != self.runner.pid
            except psutil.Error:
                moved = True
            if moved or not self.runner.is_running():
                return (f"DeepSpeed's runner (pid {self.runner.pid}) is gone, and it passes no signal on to the "
                        f"ranks")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                why = self.gone()
            except Exception:  # a watch that cannot look must not stop the run
                continue
            if why and StopSignal.requested_at is not None:
                return  # stopping already (Ctrl-C reaches the runner as well, and ends it)
            if why:
                self.fired = why
                self.log(f"vlscale: rank {self.rank}: {why}: stopping as on SIGTERM (a resumable checkpoint "
                         f"after this step, then exit)")
                os.kill(os.getpid(), signal.SIGTERM)
                return


def sibling_ended() -> bool:
    """Whether a rank that this rank's launcher (DeepSpeed's launch.py, torchrun) started beside it on this machine
    has ended: the launcher then ends the ranks left with SIGTERM, and the rank that ended has said why (rank 0 of a
    run whose MASTER_PORT is in use). False where no such launcher is the parent, or it cannot be looked at."""
    local = local_world_size()
    watch = LauncherWatch.for_this_process() if local > 1 else None
    try:
        return watch is not None and len(watch.launcher.children()) < local
    except Exception:  # noqa: BLE001 - psutil's errors: a line too many rather than none
        return False


def watch_launcher() -> LauncherWatch | None:
    """Start a :class:`LauncherWatch` for this rank where a launcher is its parent (None elsewhere)."""
    watch = LauncherWatch.for_this_process()
    return watch.start() if watch is not None else None
