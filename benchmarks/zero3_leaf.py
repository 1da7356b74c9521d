"""ZeRO-3 step time with each LM layer gathered as one unit (``train.zero3_leaf_layers=true``, the
default) against DeepSpeed's module-by-module gathering (``false``), in one session.

Runs ``launchers/train.py`` under ``torchrun`` (2 ranks by default; DeepSpeed's CPU accelerator where
there is no GPU) with ``ds_configs/zero3.json`` on a preset (the embedded default: mini CLIP-RN
encoded on the fly + mini BART, one shared adapter), the two settings alternated round by round
(the order rotating), ``--steps`` steps each. A run's step time is the median of its steps
(``run_summary.json``'s ``step_time_s``); the ratio is the median of the per-round ratios. The
runs' losses are compared too: the setting changes when parameters are gathered, not what is
computed.

    python benchmarks/zero3_leaf.py [--config default] [--nproc 2] [--steps 60] [--repeats 3] [--json]
        [--out FILE] [key=value ...]
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

ROOT = Path(__file__).resolve().parents[1]


def run_once(args, leaf: bool, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(ROOT / "launchers" / "train.py"), "--no-progress", "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
           "--config", args.config, f"output_dir={out_dir}", f"train.max_steps={args.steps}", "train.save_every=0",
           f"train.zero3_leaf_layers={str(leaf).lower()}", *args.overrides]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"zero3_leaf: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    summary = json.loads((out_dir / "run_summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return {"leaf": leaf, "step_time_s": summary["step_time_s"], "wall_s": wall, "losses": losses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default="default")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if args.nproc < 2:
        ap.error("--nproc must be >= 2: on one rank ZeRO-3 gathers nothing")
    runs, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="vlscale_zero3_leaf_") as tmp:
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            pair = {}
            for leaf in order:
                res = run_once(args, leaf, Path(tmp) / f"r{r}_{'leaf' if leaf else 'module'}")
                runs.append(dict(res, round=r))
                pair[leaf] = res
                if not args.json:
                    print(f"round {r}: zero3_leaf_layers={str(leaf).lower():5s} {res['step_time_s']:.3f} s/step "
                          f"({res['wall_s']:.0f} s wall)", flush=True)
            ratios.append(pair[True]["step_time_s"] / pair[False]["step_time_s"])
    leaf_losses = [r["losses"] for r in runs if r["leaf"]]
    module_losses = [r["losses"] for r in runs if not r["leaf"]]
    max_loss_diff = max(abs(a - b) for la, lb in zip(leaf_losses, module_losses) for a, b in zip(la, lb))
    result = {
        "command": "python benchmarks/zero3_leaf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config, "nproc": args.nproc, "steps": args.steps, "repeats": args.repeats,
        "overrides": args.overrides,
        "step_time_s": {"leaf_layers": statistics.median(r["step_time_s"] for r in runs if r["leaf"]),
                        "module_by_module": statistics.median(r["step_time_s"] for r in runs if not r["leaf"])},
        "leaf_over_module": statistics.median(ratios), "ratios": ratios,
        "max_abs_loss_difference": max_loss_diff,
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        st = result["step_time_s"]
        print(f"step time: leaf layers {st['leaf_layers']:.3f} s, module by module {st['module_by_module']:.3f} s; "
              f"leaf / module {result['leaf_over_module']:.3f} (median of {len(ratios)} rounds); "
              f"largest loss difference {max_loss_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
