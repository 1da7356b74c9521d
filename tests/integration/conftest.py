"""Shared helpers for end-to-end runs of launchers/train.py: 1 process, or 2 CPU ranks (gloo).

Runs are tiny (tiny CLIP-RN + tiny T5, 64 synthetic examples per task, a few steps) and cached
for the whole session (:func:`runs`), so several tests read the same run's files. Launchers:
``torchrun --standalone``, DeepSpeed's own launcher (one node, or several through a hostfile whose
nodes are this machine), plain ``python`` (all with DeepSpeed's CPU
accelerator), and ``preloaded``: the same script forked from the suite's preloaded server
(tests/preloaded.py; 1 process, or ranks started as torchrun starts them), without ~8 s of imports
per process. Runs that test a launcher use that launcher; the others use ``preloaded``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from preloaded import launch_env
from vlscale.engine.distributed import free_port  # noqa: F401  (h.free_port for the tests)

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launchers" / "train.py")
RUN_TIMEOUT_S = 420
MULTINODE_BIN = ROOT / "tests" / "fixtures" / "multinode"  # pdsh and ssh that run each "node" on this machine

# The tiny world every engine test trains on (only the batch layout varies). Seed 3: the sampler
# draws both tasks within the 6 steps (gqa vqa gqa gqa vqa vqa), so per-task modules all train.
# The model is pinned (on top of the tiny preset): random tiny backbones without dropout, so
# runs on 1 and 2 ranks draw no random numbers that depend on the rank.
TINY = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false", "model.vision_pretrained=null",
        "model.dropout=0.0", "model.feature_source=images", "peft.method=adapter", "peft.reduction_factor=4",
        "train.precision=fp32", "train.lr=1e-3", "train.gradient_accumulation_steps=1",
        "data.tasks=[vqa,gqa]", "data.synthetic_train=64", "data.synthetic_eval=8", "train.eval_batch_size=8",
        "train.max_steps=6", "train.warmup_ratio=0.2", "train.seed=3"]
SINGLE = TINY + ["train.peft_lr=3e-3"]
# The shipped miniature pretrained backbones (from_pretrained under ZeRO-3), dropout off for exact comparison.
MINI = ["model.backbone=mini-t5", "model.pretrained=true", "model.vision=mini-clip-rn",
        "model.vision_pretrained=synthetic", "model.dropout=0.0", "peft.method=adapter", "train.precision=fp32",
        "data.tasks=[vqa,gqa]", "data.synthetic_train=64", "data.synthetic_eval=8", "train.eval_batch_size=8",
        "train.max_steps=2", "train.seed=3"]


def base_env(nproc: int = 1, **extra) -> dict:
    env = launch_env()
    env["VLSCALE_DIST_TIMEOUT"] = "120"
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


WITH_PROGRESS = "<with progress bar>"  # in a run's args: keep the progress bar (runs go without it)


def train_args(args: list[str]) -> list[str]:
    if "--config" not in args:
        args = ["--config", "tiny", *args]  # the tiny preset; TINY / MINI then pin the model
    if WITH_PROGRESS in args:
        return [a for a in args if a != WITH_PROGRESS]
    return ["--no-progress", *args]


def command(args: list[str], nproc: int = 1, launcher: str = "torchrun") -> list[str]:
    args = train_args(args)
    if launcher == "python" and nproc == 1:
        return [sys.executable, TRAIN, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                str(free_port()), TRAIN, *args]
    if launcher == "deepspeed_hostfile":  # nproc nodes of one rank each, through DeepSpeed's multi-node runner
        hostfile = Path(tempfile.mkdtemp(prefix="vlscale_hosts_")) / "hostfile"
        atexit.register(shutil.rmtree, hostfile.parent, True)
        hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(nproc)))
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), TRAIN, *args]
    raise ValueError(f"unknown launcher {launcher!r} for {nproc} process(es)")


def launch(args: list[str], nproc: int = 1, launcher: str = "preloaded", check: bool = True,
           timeout: float = RUN_TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to completion; output (stdout+stderr) in ``.stdout``; ``check`` asserts exit code 0."""
    fd, log = tempfile.mkstemp(prefix="vlscale_launch_", suffix=".log")
    os.close(fd)
    try:
        t0 = time.monotonic()
        return finish(start(args, nproc, launcher, env, Path(log)), Path(log), t0, timeout, check)
    finally:
        os.unlink(log)


def start(args: list[str], nproc: int = 1, launcher: str = "preloaded", env: dict | None = None,
          log_path: Path | None = None):
    """Start in the background (its own process group); output to ``log_path``. -> a subprocess.Popen,
    or for ``preloaded`` a handle with the same pid / poll / wait / kill."""
    if launcher == "preloaded":
        return preloaded.start(TRAIN, train_args(args), nproc=nproc, env=env or base_env(nproc), cwd=ROOT,
                               log_path=log_path)
    env = env or base_env(nproc)
    if launcher == "deepspeed_hostfile":  # the runner reaches the "nodes" through stand-ins for pdsh and ssh
        env = dict(env, PATH=f"{MULTINODE_BIN}{os.pathsep}{env.get('PATH', '')}")
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(command(args, nproc, launcher), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path:
            out.close()  # the child has its own descriptor


def finish(proc, log_path: Path, t0: float, timeout: float = RUN_TIMEOUT_S,
           check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a run from :func:`start` -> CompletedProcess with its log as ``.stdout`` and ``.wall_s``
    from ``t0``; a run past ``timeout`` is killed (its whole group) and reported; ``check`` asserts exit 0."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{' '.join(map(str, proc.args))} did not finish in {timeout} s:\n"
                             f"{log_path.read_text()[-6000:]}")
    done = subprocess.CompletedProcess(proc.args, code, log_path.read_text())
    done.wall_s = time.monotonic() - t0
    if check and code != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} exited {code}:\n{done.stdout[-6000:]}")
    return done


def wait_for_steps(out_dir: Path, n: int, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_log(out_dir)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before logging {n} steps")
        time.sleep(0.5)
    raise AssertionError(f"no {n} logged steps in {out_dir} after {timeout}s")


def read_log(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    # a run may be writing its next line while this reads: only whole lines count
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(out_dir)]


def tb_scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars as TensorBoard reads them (every event file, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# name -> (overrides, nproc, launcher). Runs compared with each other share data, seed and global batch.
RUN_SPECS = {
    # one shared adapter: 1 process with the whole global batch of 4 vs 2 ranks (torchrun) with 2 each,
    # which also evaluate mid-run (synced-rank generation under ZeRO-3 between training steps)
    # (the adapter's weights at 3x train.lr, train.peft_lr: their optimizer groups apart from the layer
    # norms' and the projection's, through ZeRO-3 partitioning, resume and the memory model)
    "single_1p": (SINGLE + ["train.micro_batch_size=4"], 1, "preloaded"),
    # single_2r reads its images ahead in threads (training and evaluation), single_1p in the training thread
    "single_2r": (SINGLE + ["train.micro_batch_size=2", "train.test_eval=true", "train.eval_every=3",
                            "data.read_ahead_threads=2"], 2, "torchrun"),
    # ... with checkpointing, and DeepSpeed's module-by-module gathering instead of layers as units; its final
    # evaluation gathers the decoding parameters alone around each batch's decoding (train.eval_gather=decoder)
    "single_2r_gc": (SINGLE + ["train.micro_batch_size=2", "train.gradient_checkpointing=true",
                             "train.zero3_leaf_layers=false", "train.eval_gather=decoder"], 2, "preloaded"),
    # one adapter per task: 1 process accumulating 2 micro-batches vs 2 ranks (DeepSpeed's launcher on one node:
    # test_runner_sigterm.py's 2 ranks)
    "multi_1p": (TINY + ["peft.sharing=multiple", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2"],
                 1, "preloaded"),
    "multi_2r": (TINY + ["peft.sharing=multiple", "train.micro_batch_size=2"], 2, "preloaded"),
    # single_2r's run on 2 nodes of one rank each: DeepSpeed's hostfile launch (runner -> pdsh -> launch.py
    # on each node), the nodes being this machine (MULTINODE_BIN); its evaluations decode under ZeRO-3's
    # per-module gathers, single_2r's with the model gathered whole (train.eval_gather's default, auto)
    "single_2n": (SINGLE + ["train.micro_batch_size=2", "train.eval_every=3", "train.eval_gather=never"], 2,
                  "deepspeed_hostfile"),
    # pretrained miniature backbone loaded partitioned (transformers' ZeRO-3 path)
    # extra tokens: the pretrained vocabulary is resized (under ZeRO-3 inside zero.Init), as the paper presets do
    "mini_2r": (MINI + ["train.micro_batch_size=2", "model.extra_special_tokens=8"], 2, "preloaded"),
}


class RunCache:
    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}
        self.procs: dict[str, subprocess.CompletedProcess] = {}
        self.started: dict[str, tuple] = {}

    def start(self, *names: str, **env) -> None:
        """Start these runs in the background, ahead of their first use (two one-process runs started
        together use both cores); ``env``: variables added to the run's environment."""
        for name in names:
            if name in self.done or name in self.started:
                continue
            overrides, nproc, launcher = RUN_SPECS[name]
            log = self.root / f"{name}.log"
            proc = start(overrides + [f"output_dir={self.root / name}"], nproc=nproc, launcher=launcher,
                         env=base_env(nproc, **env), log_path=log)
            self.started[name] = (proc, log, time.monotonic())

    def start_early(self, name: str):
        """Start this run during the unit tests (the suite's lane, tests/conftest.py): one torch thread a
        process, as beside any background job. -> its handle, or None if it was started already."""
        if name in self.done or name in self.started:
            return None
        self.start(name, OMP_NUM_THREADS=1)
        return self.started[name][0]

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            self.start(name)
            proc, log, t0 = self.started.pop(name)
            self.procs[name], self.done[name] = finish(proc, log, t0), self.root / name
        return self.done[name]

    def close(self) -> None:
        """Stop runs started but never waited for."""
        for proc, _, _ in self.started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def assert_checkpoint_as_predicted(disk, tensors: list[int], files: list[int]) -> None:
    """What each rank wrote into a checkpoint against the profiler's prediction (``disk``, an
    ``analytic.CheckpointEstimate``; launchers/profile_memory.py's "disk" line): the tensors exactly,
    the files (headers, client state: estimated) within 5%."""
    assert tensors == disk.tensor_bytes
    for r, (p, m) in enumerate(zip(disk.file_bytes, files, strict=True)):
        assert abs(p - m) <= 0.05 * m, f"rank {r}: predicted {p} B on disk, written {m} B"


_THIS = sys.modules[__name__]  # taken now: pytest imports every conftest.py as "conftest" (the last one wins)
preloaded = None  # the session's PreloadedServer, set by the h fixture


@pytest.fixture(scope="session")
def h(preloaded):
    """This module's helpers (launch, start, read_log, TINY, RUN_SPECS, ...) for the tests."""
    _THIS.preloaded = preloaded
    return _THIS


def _run_cache(config) -> RunCache:
    if not hasattr(config, "_vlscale_runs"):
        config._vlscale_runs = RunCache(config._tmp_path_factory.mktemp("engine_runs"))
    return config._vlscale_runs


def pytest_unconfigure(config):
    """Stop the runs started (by the lane or a test) that no test waited for."""
    if hasattr(config, "_vlscale_runs"):
        config._vlscale_runs.close()


# The runs the lane starts during the unit tests, in this order: the launchers' runs first (their interpreters'
# imports leave cores idle that the unit tests fill), then the preloaded ones.
EARLY = ("single_2r", "single_2n", "multi_2r", "single_1p", "multi_1p", "single_2r_gc", "mini_2r")


def pytest_collection_finish(session):
    """With unit tests collected before tests using :func:`runs`, queue the cached runs on the suite's lane
    (tests/conftest.py) to start while the unit tests run."""
    items = session.items
    if session.config.option.collectonly or not any("/tests/unit/" in str(i.path) for i in items):
        return
    if not any("runs" in getattr(i, "fixturenames", ()) for i in items):
        return
    _THIS.preloaded = server = session.config._vlscale_preloaded
    cache, lane = _run_cache(session.config), session.config._vlscale_lane
    for name in EARLY:
        overrides, nproc, launcher = RUN_SPECS[name]
        ready = server.ready if launcher == "preloaded" else (lambda: True)
        lane.add(nproc, ready, lambda name=name: cache.start_early(name))


@pytest.fixture(scope="session")
def runs(pytestconfig, h) -> RunCache:
    """``runs("single_2r")`` -> the output_dir of that (cached) run; see RUN_SPECS. ``runs.start(...)``
    starts runs ahead of their first use; the suite starts them during the unit tests (EARLY)."""
    return _run_cache(pytestconfig)  # closed at pytest_unconfigure
