"""Evaluation under ZeRO-3 with the model gathered whole (``train.eval_gather=auto``, where it fits) and with its
decoding parameters gathered around each batch's decoding (``decoder``) against ZeRO-3's per-module gathers at
every new token (``never``): the same evaluation code (``vlscale.engine.evaluation.evaluate``) on the same engine,
the three alternating task by task for ``--rounds`` rounds.

A run of ``--config`` (the embedded default by default) is set up as training sets it up (``setup_run``, ZeRO-3,
``--nproc`` ranks under torch.distributed.run), with the trained weights of ``--adapter DIR`` where given
(``train.init_adapter``: a trained adapter stops decoding at its answers' ``</s>``; random weights decode to the
token budget). No training step runs. Per task and policy: the median seconds of its evaluation, examples/s, and
how many module fetches DeepSpeed's coordinator made; the predictions of the policies are compared.

    python benchmarks/eval_gather.py [--adapter DIR] [--nproc 2] [--rounds 3] [--config default] [--json]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import vlscale  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
POLICIES = ("never", "decoder", "auto")


def measure(config: str, overrides: list[str], rounds: int, out_dir: str) -> dict:
    """In this rank: the run set up, then each task evaluated under each policy, alternating -> rank 0's figures."""
    from vlscale.config import load_config
    from vlscale.engine.distributed import barrier, init_distributed

    dist = init_distributed()
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.engine.evaluation import evaluate

    cfg = load_config(config, ["train.test_eval=false", f"output_dir={out_dir}", *overrides])
    ds = build_deepspeed_config(str(ROOT / "ds_configs" / "zero3.json"), cfg, dist.world_size,
                                device_type=dist.device_type)
    run = trainer.setup_run(cfg, ds, dist, show_progress=False)
    if run.stage != 3:
        raise SystemExit(f"eval_gather: the run is at ZeRO stage {run.stage}; the comparison needs stage 3")
    coordinator = run.engine.optimizer.parameter_offload.get_param_coordinator()
    fetches = [0]
    fetch = coordinator.fetch_sub_module

    def counted(*args, **kwargs):
        fetches[0] += 1
        return fetch(*args, **kwargs)

    coordinator.fetch_sub_module = counted
    times = {p: {t: [] for t in run.cfg.data.tasks} for p in POLICIES}
    fetched, scores = {p: {} for p in POLICIES}, {p: {} for p in POLICIES}
    try:
        for r in range(rounds + 1):  # round 0: the examples read, and everything warmed, untimed
            for task in run.cfg.data.tasks:
                for policy in POLICIES[r % 3:] + POLICIES[:r % 3]:  # each first in turn
                    run.cfg.train.eval_gather = policy
                    barrier()
                    n, t0 = fetches[0], time.perf_counter()
                    scores[policy][task] = evaluate(run.model, run.cfg, run.tokenizer, split="val", tasks=[task],
                                                    rank=dist.rank, world_size=dist.world_size, device=dist.device,
                                                    float_dtype=run.dtype, synced_gpus=dist.world_size > 1,
                                                    show_progress=False, memo=run.eval_data,
                                                    engine=run.engine)[task]
                    barrier()
                    if r:
                        times[policy][task].append(time.perf_counter() - t0)
                        fetched[policy][task] = fetches[0] - n
    finally:
        trainer.close(run)
    examples = {task: next((len(v[0]) for k, v in run.eval_data.items() if k[:2] == (task, "val")), None)
                for task in run.cfg.data.tasks}  # the split's examples, read once (the memo)
    return {"world_size": dist.world_size, "device": str(dist.device), "precision": run.cfg.train.precision,
            "config": config, "overrides": overrides, "rounds": rounds, "examples": examples,
            "eval_batch_size": run.cfg.train.eval_batch_size, "seconds": times, "fetches": fetched,
            "same_scores": all(scores[p] == scores["never"] for p in POLICIES), "scores": scores["auto"]}


def table(result: dict) -> str:
    gathered = POLICIES[1:]
    lines = [f"{'task':10s} {'examples':>8s} " + " ".join(f"{p + ' s':>9s} {p + ' ex/s':>12s}" for p in POLICIES)
             + "".join(f" {'never/' + p:>13s}" for p in gathered)
             + "".join(f" {'fetches ' + p:>15s}" for p in POLICIES)]
    total = {p: 0.0 for p in POLICIES}
    for task, n in result["examples"].items():
        med = {p: statistics.median(result["seconds"][p][task]) for p in POLICIES}
        for p in POLICIES:
            total[p] += med[p]
        rate = {p: f"{n / med[p]:12.1f}" if n else f"{'?':>12s}" for p in POLICIES}
        lines.append(f"{task:10s} {n if n is not None else '?':>8} "
                     + " ".join(f"{med[p]:9.3f} {rate[p]}" for p in POLICIES)
                     + "".join(f" {med['never'] / med[p]:13.2f}" for p in gathered)
                     + "".join(f" {result['fetches'][p][task]:15d}" for p in POLICIES))
    lines.append(f"{'all':10s} {'':8s} " + " ".join(f"{total[p]:9.3f} {'':12s}" for p in POLICIES)
                 + "".join(f" {total['never'] / total[p]:13.2f}" for p in gathered))
    lines.append(f"({result['world_size']} rank(s) on {result['device']}, {result['precision']}, medians of "
                 f"{result['rounds']} rounds, eval_batch_size {result['eval_batch_size']}; the same scores under "
                 f"all three: {result['same_scores']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="a trained adapter/ whose weights are evaluated (default: random)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torch.distributed.run when > 1)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed)")
    p.add_argument("--config", default="default", help="preset name or YAML path (default: the embedded default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) per rank")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.nproc < 1:
        p.error(f"--rounds {args.rounds} and --nproc {args.nproc} must be >= 1")
    overrides = list(args.overrides)
    if args.adapter:
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            p.error(f"--adapter {args.adapter}: no adapter_config.json there (a run's output_dir/adapter)")
        overrides.append(f"train.init_adapter={Path(args.adapter).resolve()}")
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="eval_gather_run_") as tmp:
            out = measure(args.config, overrides, args.rounds, str(Path(tmp) / "run"))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.child).write_text(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="eval_gather_") as tmp:
        result_path = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--child", str(result_path), "--rounds", str(args.rounds),
                  "--config", args.config, "--threads", str(args.threads), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"] \
            if args.nproc > 1 else []
        proc = subprocess.run([sys.executable, *launch, *script], env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.exists():
            raise SystemExit(f"eval_gather: the run failed (exit {proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-4000:]}")
        result = json.loads(result_path.read_text())
    result["load_average"] = list(os.getloadavg())
    print(json.dumps(result, indent=1) if args.json else table(result))


if __name__ == "__main__":
    main()
