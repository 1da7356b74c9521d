"""Train a V&L model parameter-efficiently with DeepSpeed.

    deepspeed [--num_gpus N] launchers/train.py --deepspeed ds_configs/zero3.json [--config NAME|PATH] [key=value ...] [--resume]
    torchrun --nproc_per_node N launchers/train.py ...
    python launchers/train.py ...                      (one process)
    python launchers/train.py --print-config [--config NAME|PATH] [key=value ...]   (the run's settings; starts nothing)

Supports: every launcher above (multi-node through DeepSpeed's hostfile); no GPU (DeepSpeed's CPU
accelerator with gloo, selected automatically); ZeRO stages 0-3 with CPU / NVMe offload
(``ds_configs/``); fp32, bf16 and fp16 (dynamic loss scaling; GPU, or CPU with VLSCALE_CPU_FP16=1 to check it); gradient checkpointing;
multitask batches with per-task or shared PEFT modules; periodic and final evaluation with
synced-rank generation; resumable checkpoints (``--resume``; ``--auto-resume``: resume if there is one, else
start), Ctrl-C / SIGTERM / SIGUSR1 (a scheduler's time-limit warning) leaving a resumable checkpoint; a NaN/inf
loss stopping the run. With no ``--config`` it trains the embedded default (the synthetic world, the shipped mini
CLIP-RN + mini BART, one shared adapter).

Writes to ``output_dir``: train_log.jsonl, metrics.json, run_summary.json, run_config.yaml,
tensorboard/, adapter/ (evaluate it with launchers/evaluate.py --adapter DIR; train.init_adapter=DIR starts a new
run from it), checkpoints/.
Exit codes: 0 done (or stopped by --stop-after-steps), 1 error, 3 a hung rank (watchdog),
130/143/138 stopped by SIGINT/SIGTERM/SIGUSR1 after writing a checkpoint. (``deepspeed`` on one node: the
runner's own status, killed by the signal at once, before the checkpoint: docs/scaling.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import textwrap
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vlscale.log import interruptible, logs_to_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="DeepSpeed config file (default: the config's train.deepspeed, else ds_configs/zero3.json)")
    p.add_argument("--config", default=None, help="preset name (e.g. paper/clip_bart_single_adapter) or YAML path; "
                                                  "default: the embedded default")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="--resume if output_dir holds a checkpoint (checkpoints/latest), else start the run: one "
                        "command for a job that a scheduler requeues")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="K",
                   help="stop after optimizer step K as if interrupted, leaving a resumable checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (each with its meaning, type, default and where it was set: "
                        "with no --config, the reference of every setting) and the DeepSpeed config, then exit; "
                        "--config on the printed file trains the same")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=10")
    args = p.parse_intermixed_args(argv)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        p.error(f"--stop-after-steps {args.stop_after_steps}: K must be >= 1 (the optimizer step to stop after)")
    return args


def refused_before_start(cfg, resume: bool, ds_file: str, stop_after_steps: int | None = None) -> str | None:
    """Why this run must not start, found on every rank before the process group and DeepSpeed's engine: an output_dir
    another run is still writing (its lock held), or holding another run's checkpoint (without --resume), --resume
    with none, or with one written by another number of ranks with another global batch or at a ZeRO stage that does
    not load into this run's, fails in a second instead of after start-up (an output_dir that cannot be created or
    written is :func:`output_dir_refused`'s, once the process group is up), and so does a
    --stop-after-steps K the resumed checkpoint is already at or past (the run trained on to the end), vlscale's
    environment variables with values it cannot use, and RANK without WORLD_SIZE, and a LOCAL_RANK past the machine's
    GPUs, and one of several srun tasks started with no launcher, and a data.root or annotation file that is not there,
    and a DeepSpeed file that is not JSON or holds an unknown key (output_dir not made), and weights the model's build
    would not find (a model.backbone_path or model.vision_pretrained that is not there, found after the data had
    loaded), and ZeRO-Infinity (``device: nvme``) without DeepSpeed's async_io op or with an nvme_path that is not a
    writable folder (found after the process group started), and a train.init_adapter that is missing, unreadable or
    of another model or tasks (found after the data had loaded). The DeepSpeed config is built here as start-up builds
    it, so a file that disagrees with the run config or holds a misspelt nested key is refused before the process group,
    DeepSpeed's engine and the output_dir: all the build reads is known here (the launcher's world size, the
    accelerator select_accelerator picks, the environment). Ranks that see another filesystem are left to rank 0's
    check after start-up."""
    from vlscale.engine.checkpoint import CheckpointError, check_output_dir, in_use_error, lock_holder
    from vlscale.engine.deepspeed_config import (DeepSpeedConfigError, build_deepspeed_config, check_nvme_support,
                                                 cpu_fp16_enabled, global_batch_size, load_ds_file, resolve_ds_file,
                                                 zero_stage)
    from vlscale.engine.distributed import (dist_timeout_s, launcher_world_size, local_gpu_problem, select_accelerator,
                                            srun_without_launcher, watchdog_timeout_s)
    from vlscale.kernels.adapter import env_backend

    try:  # vlscale's environment variables, read only after start-up, each a traceback there
        dist_timeout_s(), watchdog_timeout_s(), env_backend(), cpu_fp16_enabled()
    except ValueError as e:
        return str(e)
    if srun := srun_without_launcher():  # every task trained alone, the first holding output_dir's lock
        return srun
    if gpu := local_gpu_problem():  # more ranks than GPUs
        return gpu
    from vlscale.config import ConfigError

    try:  # the file's own faults (not JSON, an unknown key): they were found after start-up, output_dir made
        ds_path = resolve_ds_file(ds_file)
        ds = load_ds_file(ds_path)[0]
    except DeepSpeedConfigError as e:
        return f"{type(e).__name__}: {e}"
    try:  # a bad stage, and the file's disagreements with the run config, are the build's below
        stage = cfg.train.zero_stage if cfg.train.zero_stage is not None else zero_stage(ds)
    except Exception:
        stage = None

    if resume:  # another run's settings (another preset) are the headline, before the global batch they change
        from vlscale.engine.trainer import check_settings_early

        try:
            check_settings_early(Path(cfg.output_dir), cfg)
        except ConfigError as e:
            return f"ConfigError: {e}"
    try:
        world = launcher_world_size()
        if world is None:  # it was a TypeError here, then DeepSpeed looking for MPI
            return (f"RANK={os.environ.get('RANK')} is set but WORLD_SIZE is not: a launcher (deepspeed, torchrun) "
                    f"sets both; unset RANK to train as one process")
        if holder := lock_holder(cfg.output_dir):  # a run still writing there: not what its checkpoints say
            raise in_use_error(cfg.output_dir, holder)
        check_output_dir(cfg.output_dir, resume, world, global_batch_size(cfg, world), zero_stage=stage)
    except (CheckpointError, ConfigError) as e:  # ConfigError: a train.global_batch_size the ranks do not divide
        return f"{type(e).__name__}: {e}"
    if cfg.train.init_adapter and not resume:  # a warm start from an adapter missing, unreadable or of another model
        from vlscale.engine.checkpoint import check_init_adapter

        try:
            check_init_adapter(cfg)
        except CheckpointError as e:
            return f"{type(e).__name__}: {e}"
    if resume and stop_after_steps is not None:
        from vlscale.engine.checkpoint import latest_tag, step_number

        at = step_number(latest_tag(Path(cfg.output_dir) / "checkpoints") or "")
        if at is not None and stop_after_steps <= at:
            return (f"--stop-after-steps {stop_after_steps}: the checkpoint resumed is at step {at} already (the run "
                    f"would train on to train.max_steps={cfg.train.max_steps}); give a later step, K > {at}")
    from vlscale.data import check_split_found
    from vlscale.data.real import DataError

    try:  # data.root and the annotation files, found after start-up (train's by the loader, val's by the eval check)
        for split in ("train", "val", "test") if cfg.train.test_eval else ("train", "val"):
            check_split_found(cfg, cfg.data.tasks, split)
    except DataError as e:
        return f"{type(e).__name__}: {e}"
    from vlscale.modeling.vl_model import check_sources

    try:  # before the output_dir is made; the build reads model.vision's open_clip config too
        check_sources(cfg)
        check_nvme_support(build_deepspeed_config(ds, cfg, world, device_type=select_accelerator(), source=ds_path),
                           source=ds_path)
    except (ConfigError, DeepSpeedConfigError) as e:
        return f"{type(e).__name__}: {e}"
    except Exception:  # another fault: the same build after start-up reports it, with its traceback
        pass
    return None


def output_dir_refused(output_dir) -> str | None:
    """Why ``output_dir`` cannot be created, or written in: it is made here, once the process group is up (a run
    refused before, its MASTER_PORT in use, leaves no output_dir behind), and before the model's build."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from vlscale.files import dangling_link

        why = dangling_link(output_dir) or e.strerror or e
        return f"{type(e).__name__}: output_dir {str(output_dir)!r} cannot be created: {why}"
    if not os.access(output_dir, os.W_OK | os.X_OK):  # it exists, but this process cannot write in it
        return (f"CheckpointError: output_dir {str(output_dir)!r} cannot be written (its permissions, or a "
                f"read-only file system); make it writable or choose another output_dir (output_dir=...)")
    return None


def user_errors() -> tuple:
    """Errors that say what to change in the run's input (a config value, a data file, the DeepSpeed
    file, the output_dir, the checkpoint, the backbone's weight files, a diverged loss): their message is the
    report, a traceback would bury it."""
    from vlscale.config import ConfigError
    from vlscale.data.real import DataError
    from vlscale.engine.checkpoint import CheckpointError
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError
    from vlscale.engine.sharded_loading import ShardedLoadError
    from vlscale.engine.trainer import NonFiniteLoss

    return ConfigError, DataError, DeepSpeedConfigError, CheckpointError, ShardedLoadError, NonFiniteLoss


def auto_resume(output_dir) -> bool:
    """--auto-resume's choice: resume when ``output_dir`` has a ``checkpoints/latest`` (readable or not: --resume's
    checks then refuse what it cannot continue), else start a new run (whose checks refuse another run's results)."""
    from vlscale.engine.checkpoint import LATEST

    return (Path(output_dir) / "checkpoints" / LATEST).exists()


def last_checkpoint(out: Path | None) -> Path | None:
    """``out``'s latest checkpoint, None without one (or one ``latest`` does not name readably)."""
    from vlscale.engine.checkpoint import CheckpointError, latest_tag

    try:
        tag = latest_tag(out / "checkpoints") if out is not None else None
    except (CheckpointError, OSError):
        tag = None
    return out / "checkpoints" / tag if tag else None


def disk_failure(e: BaseException, out: Path) -> str | None:
    """A write the output_dir's disk refused (full, over quota, read-only) outside a checkpoint's save (which
    reports its own: train_log.jsonl, TensorBoard's events, metrics.json, predictions/) as one line: the
    reason, the free space and the checkpoint left; None for any other error. It was a traceback through
    TensorBoard's writer thread ending in a bare "OSError: [Errno 28] No space left on device"."""
    from vlscale.files import disk_refused

    if not disk_refused(e):
        return None
    from vlscale.engine.checkpoint import write_failure_reason

    last = last_checkpoint(out)
    kept = (f"the last checkpoint is {last} (--resume continues from it once there is room)"
            if last else "no checkpoint had been written")
    return (f"{type(e).__name__}: writing the run's files in output_dir {str(out)!r} failed "
            f"({write_failure_reason(e, out)}); {kept}")


def gpu_plan(args: argparse.Namespace, dist) -> tuple[int, str, str]:
    """What this process can have of its GPU (the driver's free memory + what torch holds: less than the GPU's total
    where another job or CUDA's context holds some), rounded down to 0.1 GiB, in bytes (the planner's budget) and in
    words, and the planner's command that finds a setting which fits it (this run's config, DeepSpeed file, world
    size and overrides)."""
    import torch

    from vlscale.files import launcher_path
    from vlscale.profiling.analytic import parse_size

    free, total = torch.cuda.mem_get_info(dist.device)
    gib = int((free + torch.cuda.memory_reserved(dist.device)) / 2 ** 30 * 10) / 10  # rounded down
    cmd = ["python", launcher_path("profile_memory.py"), *(["--config", args.config] if args.config else []),
           *(["--deepspeed", args.deepspeed] if args.deepspeed else []), "--world-size", str(dist.world_size),
           "--budget", f"{gib}GiB", *args.overrides]
    return (parse_size(f"{gib}GiB"), f"this process can have {gib} GiB of the GPU's {total / 2 ** 30:.2f} GiB",
            shlex.join(cmd))


def out_of_memory_advice(e: BaseException, args: argparse.Namespace, dist) -> str:
    """For a rank out of GPU memory: the planner's command that finds a setting which fits what this process can
    have of its GPU (:func:`gpu_plan`), to end the error's line; "" for any other error."""
    import torch

    if not isinstance(e, torch.OutOfMemoryError):  # a GPU's (the CPU's allocator raises a RuntimeError)
        return ""
    _, said, cmd = gpu_plan(args, dist)
    return f"; {said}, a setting that fits it: {cmd} (--write-config FILE writes it)"


def memory_warning(cfg, ds_config: dict, args: argparse.Namespace, dist) -> str | None:
    """On a GPU, before the model's build: a warning where this run's setting does not fit what this process can have
    of its GPU as the planner judges it (its estimate of the per-rank peak + the headroom it keeps free, over the
    budget its command below is given), naming both and the planner's command (the out-of-memory error came minutes
    later, after the model built and the data loaded); None where it fits, on CPU, or where the estimate does not
    model the run's settings. A warning, not a refusal: the estimate can be high (docs/scaling.md). An estimate that
    fails otherwise (a fault of its own) is said in one line and the run starts: it does not need the estimate."""
    if dist.device.type != "cuda":
        return None
    from vlscale.profiling.analytic import estimate_memory, fmt_bytes
    from vlscale.profiling.planner import default_headroom

    try:  # ~0.1-0.6 s on CPU (a scale preset, the default) beside the imports the model's build needs anyway
        peak = estimate_memory(cfg, dist.world_size, ds_config, device="cuda").components["peak"]
    except ValueError:  # a setting it does not model (profile_memory.py says which): no warning
        return None
    except Exception as e:  # noqa: BLE001 - said, not dropped, and the run starts
        return f"the memory estimate failed ({type(e).__name__}: {e}): this run's memory is not checked against its GPU"
    budget, said, cmd = gpu_plan(args, dist)
    need = peak + default_headroom(budget)  # the planner's "fits" for the same budget: peak + headroom <= budget
    if need <= budget:
        return None
    return (f"warning: this run's memory estimate is {fmt_bytes(peak)} per GPU ({fmt_bytes(need)} with the headroom "
            f"the planner keeps free) and {said}: it may run out of memory (it starts: the estimate can be high, "
            f"docs/scaling.md); a setting that fits: {cmd} (--write-config FILE writes it)")


def start_notes(cfg, ds_file, ds_config: dict, world_size: int) -> list[str]:
    """The notes said before a run starts: a ZeRO stage the config overrides, ZeRO-3 on one process, fp16 on a
    pretrained T5, the settings given that the run does not read."""
    from vlscale.engine.deepspeed_config import single_process_note, stage_override_note
    from vlscale.modeling.backbones import fp16_note

    notes = (stage_override_note(ds_file, cfg), single_process_note(ds_config, world_size),
             fp16_note(cfg.model.backbone, cfg.model.pretrained, cfg.train.precision), *cfg.ignored_settings())
    return [note for note in notes if note]


def print_config(args: argparse.Namespace) -> int:
    """--print-config: the run's settings as YAML (``config_text``: ``--config`` on it trains the same), the
    start-up notes, and the DeepSpeed config the run would build, on stdout; nothing started, built or written.
    Under a launcher, rank 0 alone prints. A refusal is start-up's line."""
    from vlscale.config import ConfigError, config_text, load_config, printable
    from vlscale.engine.deepspeed_config import (CPU_FP16_ERROR, DeepSpeedConfigError, build_deepspeed_config,
                                                 default_device_type, default_ds_file)
    from vlscale.engine.distributed import launcher_world_size

    rank = os.environ.get("RANK", "0")
    world = launcher_world_size() or 1
    device = default_device_type()
    try:
        sources: dict = {}
        cfg = load_config(args.config, args.overrides, sources)
        ds_file = default_ds_file(cfg, args.deepspeed)
        ds_config = build_deepspeed_config(ds_file, cfg, world, device_type=device)
    except (ConfigError, DeepSpeedConfigError) as e:
        # fp16 is refused on DeepSpeed's CPU accelerator: a GPU run previewed on a login node without a GPU
        gpu = ("; to see a GPU run's config on a machine without one, set DS_ACCELERATOR=cuda"
               if CPU_FP16_ERROR in str(e) else "")
        print(f"vlscale: rank {rank}: {type(e).__name__}: {e}{gpu}", file=sys.stderr, flush=True)
        return 1
    if rank != "0":
        return 0
    given = shlex.join(["launchers/train.py", *(["--config", args.config] if args.config else []), *args.overrides])
    ranks = "the launcher's WORLD_SIZE" if "RANK" in os.environ else "one process; under a launcher, its WORLD_SIZE"

    def comment(*texts: str) -> str:
        return "".join(f"{line}\n" for text in texts
                       for line in textwrap.wrap(printable(text), 118, initial_indent="# ", subsequent_indent="#   "))

    text = "\n".join([comment(f"{given}: the resolved settings (--config on this file trains the same)",
                               *start_notes(cfg, ds_file, ds_config, world)),
                       config_text(cfg, sources),
                       comment(f"The DeepSpeed config {ds_file} resolves to for world_size={world} ({ranks}), "
                               f"on {device}:")
                       + "".join(f"#   {line}\n" for line in json.dumps(ds_config, indent=2).splitlines())])
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped (`--print-config | head`): what it read is what it wanted
        with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    # SIGTERM, or SLURM's SIGUSR1, before the run's stop handler (imports, the model's build) ended it without a line
    with interruptible() as release:
        return start_and_train(args, release)


def start_and_train(args: argparse.Namespace, release_signals) -> int:
    try:  # the first seconds, torch's and DeepSpeed's imports: Ctrl-C there was a traceback through an import
        from vlscale.engine.distributed import quiet_library_warnings, srun_without_launcher, watch_launcher

        quiet_library_warnings()

        watch_launcher()  # a rank whose launcher is gone (DeepSpeed's runner killed) stops as on SIGTERM
        from vlscale.config import load_config
        from vlscale.engine.deepspeed_config import DeepSpeedConfigError, default_ds_file

        try:
            cfg = load_config(args.config, args.overrides)
        except Exception:
            cfg = None  # loaded again after start-up, where the error is reported with its context
        if args.auto_resume and cfg is not None:  # then every check of --resume, or of a new run, as given
            args.resume = args.resume or auto_resume(cfg.output_dir)
        try:  # a --deepspeed (or train.deepspeed) file that is not there was a traceback here
            refusal = cfg is not None and refused_before_start(cfg, args.resume, default_ds_file(cfg, args.deepspeed),
                                                               args.stop_after_steps)
        except DeepSpeedConfigError as e:
            refusal = f"{type(e).__name__}: {e}"
        if refusal:  # srun's is about the launch: no rank (each task's "rank 0" beside "task 1 of 2")
            who = "" if srun_without_launcher() else f"rank {os.environ.get('RANK', '0')}: "
            print(f"vlscale: {who}{refusal}", file=sys.stderr, flush=True)
            return 1
        # --- setup
        from vlscale.engine.distributed import PortInUse, init_distributed  # selects the CPU accelerator first

        try:
            dist = init_distributed()
        except PortInUse as e:  # a second run of a sweep on the launcher's default port: torch's traceback: EADDRINUSE
            print(f"vlscale: rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr, flush=True)
            return 1
        if refusal := cfg is not None and output_dir_refused(cfg.output_dir):
            print(f"vlscale: rank {dist.rank}: {refusal}", file=sys.stderr, flush=True)
            return 1
        from vlscale.engine import trainer
        from vlscale.engine.deepspeed_config import build_deepspeed_config
    except KeyboardInterrupt as e:  # the line a Ctrl-C or SIGTERM later in start-up gives (below)
        kept = "no new checkpoint was written" if args.resume else "no checkpoint was written"
        signum = getattr(e, "signum", signal.SIGINT)
        distributed = sys.modules.get("vlscale.engine.distributed")  # None: the signal came in its imports
        if signum == signal.SIGTERM and distributed is not None and distributed.sibling_ended():
            return 128 + signum  # the launcher ending the ranks left: the rank that ended says why, in one line
        print(f"vlscale: rank {os.environ.get('RANK', '0')}: aborted ({signal.Signals(signum).name} during start-up, "
              f"before training began: {kept})", file=sys.stderr, flush=True)
        return 128 + signum

    run, stopped = None, False
    try:
        cfg = cfg or load_config(args.config, args.overrides)
        ds_file = default_ds_file(cfg, args.deepspeed)
        ds_config = build_deepspeed_config(ds_file, cfg, dist.world_size, device_type=dist.device_type)
        if dist.is_main:  # a relative output_dir is in the working directory: said so, for a job started elsewhere
            out = cfg.output_dir if Path(cfg.output_dir).is_absolute() else f"{cfg.output_dir} (in {os.getcwd()})"
            print(f"vlscale: {cfg.name} -> {out} | world_size={dist.world_size} ({dist.device_type}, "
                  f"{dist.backend}) | ZeRO-{trainer.zero_stage(ds_config)} | {cfg.train.precision} | global batch "
                  f"{ds_config['train_batch_size']} (micro-batch {ds_config['train_micro_batch_size_per_gpu']} x "
                  f"{dist.world_size} x accumulation {ds_config['gradient_accumulation_steps']}) | "
                  f"{cfg.train.max_steps} steps | peft={cfg.peft.method}/"
                  f"{cfg.peft.sharing}", flush=True)
            for note in (*start_notes(cfg, ds_file, ds_config, dist.world_size),
                         memory_warning(cfg, ds_config, args, dist)):
                if note:
                    print(f"vlscale: {note}", flush=True)
        run = trainer.setup_run(cfg, ds_config, dist, resume=args.resume, show_progress=not args.no_progress)
        # --- train
        trainer.train(run, stop_after_steps=args.stop_after_steps)
        trainer.finish(run)
        code = 0
    except trainer.RunStopped as stop:
        stopped = True
        run.stopped = trainer.stop_record(run, str(stop))  # run_summary.json says why: the signal, --stop-after-steps
        trainer.finish(run, completed=False)
        if dist.is_main:
            print(f"vlscale: {stop}; resume with --resume (checkpoint in {run.out / 'checkpoints'})", flush=True)
        code = 0 if stop.signum is None else 128 + int(stop.signum)
    except Exception as e:  # one readable line per rank, and the traceback once where it is a fault
        from vlscale.engine.distributed import peer_gone

        disk = disk_failure(e, Path(cfg.output_dir)) if cfg is not None else None
        echo = "stopped: another rank's process ended (its own line says why)" if peer_gone(e) else None
        if dist.is_main and not disk and not echo and not isinstance(e, user_errors()):
            traceback.print_exc()
        kept = ""
        if run is not None:  # an unreadable image, a diverged loss, a refused write: run_summary.json says why
            try:
                kept = trainer.record_stop(run, e)
            except Exception as err:  # noqa: BLE001 - the error's line is the report; the summary is extra
                kept = f" (run_summary.json not written: {type(err).__name__}: {err})"
        oom = out_of_memory_advice(e, args, dist)
        print(f"vlscale: rank {dist.rank}: {disk or echo or f'{type(e).__name__}: {e}{oom}'}{kept}", file=sys.stderr,
              flush=True)
        code = 1
    except KeyboardInterrupt as e:  # a second signal (its message), or Ctrl-C/SIGTERM before the stop handler
        last = last_checkpoint(Path(cfg.output_dir) if cfg is not None else None)  # a --resume's is kept
        kept = f"no new checkpoint was written; {last} is intact" if last else "no checkpoint was written"
        signum = getattr(e, "signum", signal.SIGINT)
        why = str(e) or f"{signal.Signals(signum).name} during start-up, before training began: {kept}"
        print(f"vlscale: rank {dist.rank}: aborted ({why})", file=sys.stderr, flush=True)
        code = 128 + signum
    # --- cleanup: the outcome is said; a SIGTERM from here (DeepSpeed's launch.py ending the ranks left once one
    # exits non-zero) ends the process at once, as before interruptible(), not with a traceback from a close
    if run is not None and run.stop is not None:  # first: it gives back what it found, start-up's handlers
        run.stop.uninstall()
    release_signals()
    trainer.close(run)
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0 and dist.world_size > 1:
        if stopped:
            # every rank stopped together and is here: none leaves before the others are done (rank 0 writes
            # run_summary.json last), since DeepSpeed's launch.py terminates the ranks left once one exits non-zero
            # (a second signal: a rank aborts at once)
            from vlscale.engine.distributed import barrier

            try:
                barrier()
            except Exception:  # noqa: BLE001 - a peer gone meanwhile: leave as below
                pass
        os._exit(code)  # peers may be gone: do not wait in process-group teardown
    from vlscale.engine.distributed import destroy

    destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
