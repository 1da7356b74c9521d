"""What the training loop does per optimizer step beyond forward, backward and the optimizer step.

Runs the real loop (``vlscale.engine.trainer.train``) for ``--warmup + --steps`` steps of a small
config (``tiny`` by default, the tiny random CLIP-RN + T5 on the synthetic world), one run per ZeRO
stage (``--stages 0,3``), each in a process of its own (1 rank; ``--nproc 2`` runs 2 ranks under
torch.distributed.run and reports rank 0's figures). Per steady-state step (after the warm-up) it reports

    wall time, split into  data       next(loader) + collate + to_device
                           forward    the engine's forward + the loss (cross-entropy)
                           backward   engine.backward
                           optimizer  engine.step (the accumulation boundary's update, and DeepSpeed's
                                      micro-step bookkeeping between micro-batches)
                           rest       everything else the loop does: the loss/token all-reduces, the
                                      NaN check, the gradient-norm read, log_step (train_log.jsonl,
                                      progress bar, TensorBoard), the watchdog, trained-buffer sync
    host-device syncs      calls of Tensor.item / .tolist / .cpu / .numpy / __float__ / __int__ /
                           __bool__ (on a GPU each waits for the queued kernels), torch.distributed
                           collectives (blocking), and torch.tensor(python data) (a host-to-device
                           copy), each counted where it is called from (the first frame outside
                           torch), in the main thread, from the end of the warm-up to the last step

Each time is also taken on the main thread's CPU clock (``cpu_seconds_per_step_median``), which the
other processes of a shared machine do not add to. Step boundaries are the ends of ``log_step`` (the loop's last call per step), so the final save and
evaluation are not counted. On this CPU a sync costs little, so the counts, not the times, are what a
GPU user pays for; the times show how much of a small step the loop's own Python takes.

    python benchmarks/loop_overhead.py [--json] [--stages 0,3] [--steps 40] [--warmup 5] [--nproc 1]
        [--config tiny] [--threads 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import vlscale  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
PHASES = ("data", "forward", "backward", "optimizer", "rest")
TENSOR_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "barrier", "all_to_all_single", "all_gather_object", "broadcast_object_list")
# the tiny preset made cheap to start: no evaluation data to check, small synthetic tasks
DEFAULT_OVERRIDES = ["model.pretrained=false", "model.vision_pretrained=null", "data.synthetic_train=64",
                     "data.synthetic_eval=8", "train.eval_every=0", "train.save_every=0", "train.test_eval=false"]


# Calls on tensors that live on the host on a GPU too, counted apart ("host"): the batch before to_device
# (the loader's collate, and the loop's count of target tokens in it) and torch.optim's per-parameter step
# counters (CPU tensors unless the optimizer is capturable or fused).
HOST_CALLERS = ("_loss_terms",)
HOST_TORCH_FILES = (f"torch{os.sep}optim{os.sep}",)


class SyncCounter:
    """Counts host-device synchronisation points by kind and call site while ``on``; those on host-only
    tensors (inside the loader, ``HOST_CALLERS``, ``HOST_TORCH_FILES``) are counted as ``host``."""

    def __init__(self):
        self.on = False
        self.in_loader = False
        self.kinds = {"device": collections.Counter(), "host": collections.Counter()}
        self.sites = {"device": collections.Counter(), "host": collections.Counter()}
        self._inside = threading.local()
        self._undo = []

    def _site(self) -> tuple[str, bool]:
        """-> (the first frame outside torch as file:line function, whether the call is on host data)."""
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename == __file__:
            f = f.f_back
        host = self.in_loader
        while f is not None and f"{os.sep}torch{os.sep}" in f.f_code.co_filename:
            host = host or any(h in f.f_code.co_filename for h in HOST_TORCH_FILES)
            f = f.f_back
        if f is None:
            return "?", host
        name = f.f_code.co_filename
        if f"{os.sep}vlscale{os.sep}" in name:  # this checkout's, or another one's
            name = "vlscale" + os.sep + name.rsplit(f"{os.sep}vlscale{os.sep}", 1)[1]
        for root in (f"site-packages{os.sep}", str(ROOT) + os.sep):
            if root in name:
                name = name.split(root, 1)[1]
        return f"{name}:{f.f_lineno} {f.f_code.co_name}", host or f.f_code.co_name in HOST_CALLERS

    def _wrap(self, owner, attr: str, kind: str) -> None:
        original = getattr(owner, attr)
        counter = self

        def wrapped(*args, **kwargs):
            inside = getattr(counter._inside, "v", False)
            if counter.on and not inside and threading.current_thread() is threading.main_thread():
                site, host = counter._site()
                where = "host" if host else "device"
                counter.kinds[where][kind] += 1
                counter.sites[where][f"{kind} @ {site}"] += 1
            counter._inside.v = True
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside.v = inside

        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, original))

    def install(self) -> "SyncCounter":
        import torch
        import torch.distributed as dist

        for attr in TENSOR_SYNCS:
            self._wrap(torch.Tensor, attr, f"Tensor.{attr}")
        for attr in COLLECTIVES:
            if hasattr(dist, attr):
                self._wrap(dist, attr, f"dist.{attr}")
        self._wrap(torch, "tensor", "torch.tensor")
        return self

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


class Phases:
    """Wall time per phase of the current step (wrappers around the loop's callees)."""

    def __init__(self):
        self.now = collections.Counter()

    def timed(self, fn, phase: str):
        def wrapped(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[phase] += time.perf_counter() - start
                self.now[f"cpu_{phase}"] += time.thread_time() - cpu
        return wrapped


class TimedLoader:
    """The run's loader, its ``next`` timed as data (its other attributes passed through)."""

    def __init__(self, loader, phases: Phases, counter: SyncCounter):
        self._loader, self._phases, self._counter = loader, phases, counter

    def __iter__(self):
        return self

    def __next__(self):
        start, cpu, self._counter.in_loader = time.perf_counter(), time.thread_time(), True
        try:
            return next(self._loader)
        finally:
            self._counter.in_loader = False
            self._phases.now["data"] += time.perf_counter() - start
            self._phases.now["cpu_data"] += time.thread_time() - cpu

    def __getattr__(self, name):
        return getattr(self._loader, name)


def step_medians(records: list[dict]) -> tuple[dict, dict]:
    """(wall clock, the main thread's CPU clock: what other processes do not add to) -> per phase, the median
    over the steps of ``records``; ``rest`` is the median of each step's time outside the timed phases (not
    the difference of the medians)."""
    per_step, cpu_per_step = {}, {}
    for clock, prefix in ((per_step, ""), (cpu_per_step, "cpu_")):
        for p in ("wall", *PHASES[:-1]):
            clock[p] = statistics.median(r[prefix + p] for r in records)
        clock["rest"] = statistics.median(r[prefix + "wall"] - sum(r[prefix + p] for p in PHASES[:-1])
                                          for r in records)
    return per_step, cpu_per_step


def measure(stage: int, steps: int, warmup: int, config: str, overrides: list[str], out_dir: str) -> dict:
    """One run at ZeRO ``stage`` in this process (or this rank): -> its per-step figures (rank 0's)."""
    import torch

    from vlscale.config import load_config
    from vlscale.engine.distributed import init_distributed

    dist = init_distributed()
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config

    total = warmup + steps
    cfg = load_config(config, [*DEFAULT_OVERRIDES, f"train.zero_stage={stage}", f"train.max_steps={total}",
                               f"output_dir={out_dir}", *overrides])
    ds = build_deepspeed_config(str(ROOT / "ds_configs" / "zero3.json"), cfg, dist.world_size,
                                device_type=dist.device_type)
    run = trainer.setup_run(cfg, ds, dist, show_progress=False)
    phases, counter = Phases(), SyncCounter().install()
    engine = run.engine
    engine.forward = phases.timed(engine.forward, "forward")
    engine.backward = phases.timed(engine.backward, "backward")
    engine.step = phases.timed(engine.step, "optimizer")
    run.loader = TimedLoader(run.loader, phases, counter)
    patched = {name: getattr(trainer, name) for name in
               ("to_device", "_token_cross_entropy_sum", "_example_cross_entropy_sum", "log_step")}
    trainer.to_device = phases.timed(patched["to_device"], "data")
    for name in ("_token_cross_entropy_sum", "_example_cross_entropy_sum"):
        setattr(trainer, name, phases.timed(patched[name], "forward"))
    records, marks = [], []

    def log_step(run, *args, **kwargs):
        patched["log_step"](run, *args, **kwargs)
        end = (time.perf_counter(), time.thread_time())
        if marks and run.step > warmup:
            records.append({"wall": end[0] - marks[-1][0], "cpu_wall": end[1] - marks[-1][1],
                            **{p: phases.now[p] for p in PHASES[:-1]},
                            **{f"cpu_{p}": phases.now[f"cpu_{p}"] for p in PHASES[:-1]}})
        marks.append(end)
        phases.now.clear()
        counter.on = warmup <= run.step < total  # from the end of the warm-up to the last step's log line

    trainer.log_step = log_step
    try:
        trainer.train(run, stop_after_steps=total)  # stops after the last step with a checkpoint: no evaluation
    except trainer.RunStopped:
        pass
    finally:
        counter.on = False
        counter.uninstall()
        for name, fn in patched.items():
            setattr(trainer, name, fn)
        trainer.close(run)
    n = len(records)
    per_step, cpu_per_step = step_medians(records)
    return {"stage": stage, "world_size": dist.world_size, "steps": n, "warmup": warmup, "config": config,
            "overrides": overrides, "threads": torch.get_num_threads(),
            "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
            "seconds_per_step_median": per_step, "cpu_seconds_per_step_median": cpu_per_step,
            "rest_fraction": per_step["rest"] / per_step["wall"],
            "syncs_per_step": sum(counter.kinds["device"].values()) / n,
            "host_calls_per_step": sum(counter.kinds["host"].values()) / n,
            "syncs_by_kind": {k: v / n for k, v in sorted(counter.kinds["device"].items())},
            "syncs_by_site": {k: v / n for k, v in counter.sites["device"].most_common()},
            "vlscale_syncs_per_step": sum(v for k, v in counter.sites["device"].items() if " @ vlscale" in k) / n,
            "host_calls_by_site": {k: v / n for k, v in counter.sites["host"].most_common()},
            "losses": [r["loss"] for r in map(json.loads, Path(out_dir, "train_log.jsonl").read_text().splitlines())]
            if dist.rank == 0 else None}


def run_child(stage: int, args, extra: list[str]) -> dict:
    """One stage's run in a fresh process (DeepSpeed and ZeRO-3's hooks start clean)."""
    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--child", str(stage), "--result", str(result),
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--config", args.config,
                  "--threads", str(args.threads), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        if args.nproc > 1:
            from vlscale.engine.distributed import free_port

            port = os.environ.get("MASTER_PORT") or str(free_port())  # a fixed default collides with a run beside it
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", *script]
        else:
            cmd = [sys.executable, *script]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not result.exists():
            raise SystemExit(f"loop_overhead: the ZeRO-{stage} run failed (exit {proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(result.read_text())


def table(results: list[dict], sites: int) -> str:
    lines = [f"{'ZeRO':>4} {'ranks':>5} {'wall ms':>8} " + " ".join(f"{p + ' ms':>12}" for p in PHASES)
             + f" {'rest %':>6} {'rest cpu ms':>11} {'syncs':>6} {'vlscale':>7} {'host':>5}"]
    for r in results:
        t = r["seconds_per_step_median"]
        lines.append(f"{r['stage']:>4} {r['world_size']:>5} {1e3 * t['wall']:8.1f} "
                     + " ".join(f"{1e3 * t[p]:12.2f}" for p in PHASES)
                     + f" {100 * r['rest_fraction']:6.1f} {1e3 * r['cpu_seconds_per_step_median']['rest']:11.2f}"
                     f" {r['syncs_per_step']:6.1f} {r['vlscale_syncs_per_step']:7.1f}"
                     f" {r['host_calls_per_step']:5.1f}")
    lines.append("(per steady-state step: medians of the times; syncs: device syncs, H2D tensors and collectives, "
                 "of which vlscale's own; host: the same calls on host-only tensors)")
    for r in results:
        lines.append(f"\nZeRO-{r['stage']}, {r['world_size']} rank(s), device syncs per step by call site:")
        for site, n in list(r["syncs_by_site"].items())[:sites]:
            lines.append(f"  {n:6.2f}  {site}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="0,3", help="ZeRO stages, one run each (default 0,3)")
    p.add_argument("--steps", type=int, default=40, help="steady-state steps measured per run")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torch.distributed.run when > 1)")
    p.add_argument("--config", default="tiny", help="preset name or YAML path (default tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) per rank")
    p.add_argument("--sites", type=int, default=12, help="call sites listed per run in the table")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error(f"--steps {args.steps} and --warmup {args.warmup} must be >= 1")
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="loop_overhead_run_") as tmp:
            out = measure(args.child, args.steps, args.warmup, args.config, args.overrides, str(Path(tmp) / "run"))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(out))
        return
    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        p.error(f"--stages {args.stages!r}: a comma-separated list of ZeRO stages (0-3)")
    results = [run_child(s, args, args.overrides) for s in stages]
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"results": results, "loadavg": load, "cpus": os.cpu_count()}, indent=1))
    else:
        print(table(results, args.sites))
        print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
