"""Replicate the VL-Adapter paper's Tables 1, 3 and 5 in miniature, offline, on the synthetic world.

    python launchers/replicate.py --table 1|3|5 [--methods a,b,...] [--seed S|S1,S2,..|A-B] [--out DIR] [--steps N]
                                  [--parallel N] [--threads-per-run T] [--set key=value ...] [--dry-run]

Table 1: every method of the paper (full_ft, multiple_adapters, half_shared_adapters, single_adapter,
hyperformer, multiple_compacters, single_compacter, multiple_lora, single_lora, multiple_prompts,
single_prompt) trained multi-task on the four image tasks with the project's pretrained miniature
CLIP-BART (preset mini/clip_bart), then evaluated on the test split. Table 5: projection only,
+ layer norms, + single adapter. Table 3: CLIP frozen or fine-tuned x BART fine-tuned or frozen
with a single adapter (CLIP runs in the loop). Rows and their settings: vlscale/replicate.py.

Writes to DIR (default runs/replicate/table<N>): results.json
(``{"methods": {name: {"updated_pct", "scores": {task: s}, "avg", ...}}, ...}``), table<N>.md,
table<N>.png (average score against updated parameters %), runs/<name>/ (each training's
output_dir, logs, eval_test/) and features/ (the CLIP feature cache). Runs ``--parallel``
trainings at once (default: the CPUs this process may use // threads per run), shows progress, and is resumable:
rows with a result are skipped, interrupted trainings resume from their last checkpoint
(Ctrl-C stops the running trainings with a checkpoint), and rows finished earlier under DIR stay in
the table. One replicate.py at a time into DIR (a second is refused). Several seeds (``--seed 0-4``): every
row once per seed, all as jobs of one queue; each seed's
rows, results.json and table in DIR/seed<S>/ as above (one feature cache, DIR/features), and in DIR the
table over the seeds: each task's mean, the average's mean ± its sample standard deviation, and
``avg_by_seed`` per row in results.json (rows some seed has not finished are left out, and named).
Earlier work made with other settings (another --steps, --seed or --set) is refused
before anything runs, naming the row and the setting: resuming it would mix two runs in one
result, keeping it would put incomparable rows in one table. Exit code 1 if a row failed, 2 if
refused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vlscale.log import logs_to_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=["1", "3", "5"], help="which of the paper's tables")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: all rows of the table)")
    p.add_argument("--seed", default="0", metavar="S",
                   help="train.seed of every row (default 0); several (0,1,2 or 0-4): each row once per seed, the "
                        "table over them (mean, ± sd) in --out and each seed's in --out/seed<S>/; at most 1000 seeds")
    p.add_argument("--out", type=lambda p: Path(p).expanduser(), default=None,  # --out=~/x: no shell expands it
                   help="output folder (default runs/replicate/table<N>)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps of every row (default: the preset's)")
    p.add_argument("--parallel", type=int, default=None, help="trainings at once (default: usable CPUs // threads)")
    p.add_argument("--threads-per-run", type=int, default=1, help="torch threads of each training (default 1)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="key=value",
                   help="an override for every row, e.g. --set data.synthetic_train=500 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print each row's updated params %% and command; run nothing")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps {args.steps} must be > 0")
    if args.parallel is not None and args.parallel <= 0:
        p.error(f"--parallel {args.parallel} must be > 0")
    if args.threads_per_run <= 0:
        p.error(f"--threads-per-run {args.threads_per_run} must be > 0")
    return args


def make_feature_cache(extra, cache: Path, threads: int, fingerprint: str, log) -> None:
    """The frozen mini-clip-rn's grid features of every synthetic split, once (resumable)."""
    from vlscale.files import write_text_atomic
    from vlscale.log import interruptible
    from vlscale.replicate import (MINI_PRESET, ReplicationError, python_cmd, read_json, stop_with_parent,
                                   subprocess_env, tail)

    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "replicate_backbones.json"  # which CLIP weights made the cache
    try:
        made = read_json(stamp, f"Delete {cache}: which CLIP weights made it is unknown") if stamp.exists() else None
    except ReplicationError as e:
        raise SystemExit(f"replicate: {e}") from None
    if made is not None and made.get("backbones") != fingerprint:
        raise SystemExit(f"replicate: the feature cache {cache} was made with other CLIP weights; delete it "
                         f"(or choose another --out)")
    write_text_atomic(stamp, json.dumps({"backbones": fingerprint}) + "\n")
    log_path = cache.parent / "features.log"
    cmd = python_cmd("extract_features.py", "--synthetic", "--config", MINI_PRESET, "--out", str(cache), "--quiet",
                     "--batch-size", "64", *extra)
    log(f"feature cache: {cache} (log {log_path})")
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=subprocess_env(threads), stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=stop_with_parent())
        with interruptible():  # SIGTERM as Ctrl-C: the extraction is stopped with this process, not orphaned
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()  # its shards are written atomically: a rerun resumes the cache
                proc.wait()
                raise
    if rc != 0:
        raise SystemExit(f"replicate: feature extraction failed (exit {rc}); last lines of {log_path}:\n"
                         f"{tail(log_path)}")


def peft_lr(cfg) -> str:
    return "" if cfg.train.peft_lr is None else f" (PEFT weights {cfg.train.peft_lr:g})"


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process (trainings, evaluations, features)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@logs_to_console
def main(argv=None) -> int:
    held = []  # --out's lock, released on return (a caller in this process may run the next replication)
    try:
        return _main(argv, held)
    finally:
        for f in held:
            f.close()


def _main(argv, held: list) -> int:
    args = parse_args(argv)
    # its lines and the bars' (stderr) in the order written in one log file (`> log 2>&1`): there, block-buffered,
    # they came out after the bars, at exit (a Jupyter kernel's stream has no reconfigure, and needs none)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    import vlscale.replicate
    from vlscale.config import ConfigError
    from vlscale.files import launcher_path, out_problem

    vlscale.replicate.ROOT = ROOT  # the rows run this checkout's launchers (an installed vlscale has none beside it)
    from vlscale.replicate import (RESULT_FILE, ReplicationError, Runner, aggregate_seeds, backbone_fingerprint,
                                   check_layout, check_result, default_parallel, get_table, headline_pct, lock_out,
                                   make_result, parse_seeds, pct_without_vision, plan_job, row_config, row_overrides,
                                   seed_dir, select_rows, time_spent, updated_params, uses_cache, write_json,
                                   write_outputs)

    log = print
    # --- setup: rows and seeds, their settings, what is left to do
    try:
        table = get_table(args.table)
        names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
        if names == []:
            raise ReplicationError(f"--methods {args.methods!r} names no row; omit it for every row of the table")
        rows = select_rows(table, names)
        seeds = parse_seeds(args.seed)
        out = (args.out or ROOT / "runs" / "replicate" / f"table{table.number}").resolve()
        problem = out_problem(out)  # it was a traceback from the feature cache's mkdir
        if problem:
            raise ReplicationError(problem)
        check_layout(out, seeds)
        cache = out / "features"  # the frozen CLIP's features: one cache for every seed

        def overrides(row, seed):
            return row_overrides(row, feature_cache=str(cache), seed=seed, steps=args.steps, extra=args.extra)

        plans = {(seed, r.name): overrides(r, seed) for seed in seeds for r in rows}
        configs = {key: row_config(ov) for key, ov in plans.items()}  # a --set at fault: refused, --out not made
        held += [] if args.dry_run else [lock_out(out)]  # until main returns; before the rows' folders are read
        fingerprints = {}  # a row's backbone weights (hashed from their files once): the same for every seed

        def fingerprint(row, cfg):
            if row.name not in fingerprints:
                fingerprints[row.name] = backbone_fingerprint(cfg)
            return fingerprints[row.name]

        def config_of(job):
            return configs[(seeds[0] if job.seed is None else job.seed, job.row.name)]

        jobs = []
        for seed in seeds:
            for r in rows:
                job = plan_job(r, plans[(seed, r.name)], seed_dir(out, seed, seeds) / "runs" / r.name,
                               fingerprint(r, configs[(seed, r.name)]), dry_run=args.dry_run)
                job.seed = seed if len(seeds) > 1 else None
                jobs.append(job)
            for r in table.rows:  # rows finished earlier stay in the table: only if made with this run's settings
                run_dir = seed_dir(out, seed, seeds) / "runs" / r.name
                if r not in rows and (run_dir / RESULT_FILE).exists():
                    ov = overrides(r, seed)
                    check_result(r, ov, run_dir, fingerprint(r, row_config(ov)), kept=True)
        if args.dry_run:
            for job in jobs:
                cfg = config_of(job)
                counts = updated_params(cfg)
                said = {"done": "done: its result is kept", "collect": "trained and evaluated: its result is collected"}
                other = (f"without CLIP {pct_without_vision(counts):.2f}%" if table.count_vision else
                         f"with CLIP {counts['updated_pct_with_vision']:.2f}%")
                log(f"{job.name}: updated {headline_pct(counts, table):.2f}% ({other}), {counts['trainable']:,} of "
                    f"{counts['total']:,} parameters, lr {cfg.lr:g}{peft_lr(cfg)}; "
                    + (said.get(job.phase) or "; ".join(f"{kind}: {shlex.join(cmd)}" for kind, cmd in job.commands)))
            return 0
    except (ReplicationError, ConfigError) as e:
        print(f"replicate: {e}", file=sys.stderr)
        return 2
    parallel = args.parallel or default_parallel(args.threads_per_run)
    todo = [j for j in jobs if j.phase != "done"]
    any_cfg = configs[(seeds[0], rows[0].name)]
    over = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
    log(f"replicate: Table {table.number}, {len(rows)} rows{over} ({len(jobs) - len(todo)} already done) -> {out}; "
        f"{any_cfg.train.max_steps} steps x batch {any_cfg.train.micro_batch_size} each, {parallel} at a time, "
        f"{args.threads_per_run} thread(s) each")
    start, cpu_start = time.time(), children_cpu_s()
    needs_cache = [j for j in todo if j.commands and any(c[0] == "train" for c in j.commands) and uses_cache(j.overrides)]

    # --- train and evaluate
    def on_done(job):
        seconds, cpu = time_spent(job.run_dir)  # every invocation's commands: a resumed row's first part too
        write_json(job.run_dir / RESULT_FILE, make_result(job.row, table, job.overrides, job.run_dir, seconds, cpu))

    try:
        if needs_cache:
            make_feature_cache(args.extra, cache, max(1, parallel * args.threads_per_run),
                               backbone_fingerprint(config_of(needs_cache[0]), vision_only=True), log)
        Runner(jobs, parallel, args.threads_per_run, on_done, progress=not args.no_progress).run()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (vlscale.log.interruptible): 128 + the signal, as train.py
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\nreplicate: interrupted ({signal.Signals(signum).name}); rerun the same command to resume ({out})",
              file=sys.stderr)
        return 128 + signum
    elapsed, cpu = time.time() - start, children_cpu_s() - cpu_start

    # --- tables, plot: each seed's (in its folder), then over the seeds
    try:
        command = shlex.join(["python", launcher_path("replicate.py"), *(sys.argv[1:] if argv is None else argv)])
        per_seed, earlier = {}, set()
        for seed in seeds:
            where = seed_dir(out, seed, seeds)
            results = {}
            for r in table.rows:  # every finished row under --out: a rerun of some rows keeps the others in the table
                path = where / "runs" / r.name / RESULT_FILE
                if path.exists():  # each was read when planned, or written whole since
                    results[r.name] = json.loads(path.read_text())
            per_seed[seed] = results
            earlier |= set(results) - {r.name for r in rows}
            ran = [j.row.name for j in todo if j.seed in (seed, None)]
            meta = {"steps": any_cfg.train.max_steps, "seed": seed, "test_examples": any_cfg.data.synthetic_eval,
                    "invocations": invocation_log(where, command, ran, elapsed, cpu, parallel, args.threads_per_run)}
            written = write_outputs(table, where, results, meta)
        if len(seeds) > 1:
            results, partial = aggregate_seeds(per_seed)
            meta = {"steps": any_cfg.train.max_steps, "seeds": seeds, "test_examples": any_cfg.data.synthetic_eval,
                    "partial_rows": partial,
                    "invocations": invocation_log(out, command, sorted({j.name for j in todo}), elapsed, cpu, parallel,
                                                  args.threads_per_run)}
            written = write_outputs(table, out, results, meta)
    except OSError as e:  # a full disk after hours of training: its traceback hid that nothing trained is lost
        from vlscale.engine.checkpoint import write_failure_reason
        from vlscale.files import disk_refused

        if not disk_refused(e):
            raise
        print(f"replicate: writing the tables in {out} failed ({write_failure_reason(e, out)}); every finished row's "
              "result.json is kept and each table file is whole (the earlier one or the new): rerun the same command, "
              "once it can write, to write them (nothing is trained again)", file=sys.stderr)
        return 1
    if earlier:
        log(f"replicate: the table also holds {sorted(earlier)}, finished earlier under {out} (their own result.json)")
    print((out / f"table{table.number}.md").read_text())
    failed = [j for j in jobs if j.phase == "failed"]
    stopped = [j for j in jobs if j.phase == "interrupted"]
    ended = "".join(f", {len(js)} {what}" for js, what in ((failed, "failed"), (stopped, "interrupted")) if js)
    log(f"replicate: {sum(j.phase == 'done' for j in todo)} of {len(jobs)} trainings run now{ended}, in "
        f"{elapsed / 60:.1f} min; " + ", ".join(f"{k}: {v}" for k, v in written.items()))
    if failed:
        print("replicate: failed rows: " + ", ".join(f"{j.name} ({j.error}; log {j.log})" for j in failed),
              file=sys.stderr)
        return 1
    if stopped:
        print(f"replicate: interrupted rows: {', '.join(j.name for j in stopped)} (their trainings were stopped by a "
              f"signal and checkpointed); rerun the same command to resume them ({out})", file=sys.stderr)
        return 130
    return 0


def invocation_log(where: Path, command: str, ran: list, elapsed: float, cpu: float, parallel: int,
                   threads: int) -> list:
    """results.json's ``invocations`` in ``where``: the earlier ones, and this one."""
    previous = where / "results.json"
    invocations = json.loads(previous.read_text()).get("invocations", []) if previous.exists() else []
    invocations.append({"command": command, "rows_run_now": ran, "elapsed_s": round(elapsed, 1),
                        "cpu_s": round(cpu, 1), "parallel": parallel, "threads_per_run": threads,
                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return invocations


if __name__ == "__main__":
    sys.exit(main())
