"""ZeRO-3 step time under different gathering settings, in one session.

Settings (``--settings``, the first is the baseline of the ratios):

    module        DeepSpeed's module-by-module gathering (``train.zero3_leaf_layers=false``; the
                  persistence threshold's "auto" is then 10 x d_model: norms and biases stay whole)
    leaf_persist  each LM layer gathered as one unit, with the 10 x d_model persistence threshold
                  (the default before 2026-12-02)
    leaf          each LM layer one unit, no persistent parameters (the default: "auto" = 0 with
                  leaf layers; DeepSpeed re-gathers every persistent parameter after each optimizer
                  step, one collective per parameter, frozen ones included)

Runs ``launchers/train.py`` under ``torchrun`` (2 ranks by default; DeepSpeed's CPU accelerator where
there is no GPU) with ``ds_configs/zero3.json`` on a preset (the embedded default: mini CLIP-RN
encoded on the fly + mini BART, one shared adapter), the settings alternated round by round (the
order rotating), ``--steps`` steps each. A run's step time is the median of its steps
(``run_summary.json``'s ``step_time_s``); a ratio is the median of the per-round ratios against the
first setting. The runs' losses are compared too: the settings change when parameters are
gathered, not what is computed.

    python benchmarks/zero3_leaf.py [--settings module,leaf_persist,leaf] [--config default] [--nproc 2]
        [--steps 60] [--repeats 3] [--json] [--out FILE] [key=value ...]
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
ZERO3 = ROOT / "ds_configs" / "zero3.json"
SETTINGS = ("module", "leaf_persist", "leaf")


def ds_file(setting: str, cfg, tmp: Path) -> Path:
    """The DeepSpeed file of a setting: ``zero3.json``, or a copy with the old explicit threshold."""
    if setting != "leaf_persist":
        return ZERO3
    from vlscale.engine.deepspeed_config import model_widths

    ds = json.loads(ZERO3.read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10 * model_widths(cfg)[0]
    path = tmp / "zero3_persist.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def run_once(args, setting: str, ds_path: Path, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(ROOT / "launchers" / "train.py"), "--no-progress", "--deepspeed", str(ds_path),
           "--config", args.config, f"output_dir={out_dir}", f"train.max_steps={args.steps}", "train.save_every=0",
           f"train.zero3_leaf_layers={str(setting != 'module').lower()}", *args.overrides]
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
    return {"setting": setting, "step_time_s": summary["step_time_s"], "wall_s": wall, "losses": losses}


def pairwise(runs: list[dict], settings: list[str]) -> dict:
    """"b / a" -> the per-round step-time ratios of every later setting b over an earlier a, and their median."""
    rounds = sorted({r["round"] for r in runs})
    step = {(r["round"], r["setting"]): r["step_time_s"] for r in runs}
    out = {}
    for i, a in enumerate(settings):
        for b in settings[i + 1:]:
            per_round = [step[(k, b)] / step[(k, a)] for k in rounds if (k, a) in step and (k, b) in step]
            out[f"{b} / {a}"] = {"median": statistics.median(per_round), "rounds": per_round}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--config", default="default")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or len(settings) < 2 or len(set(settings)) != len(settings):
        ap.error(f"--settings={args.settings!r}: give two or more distinct names of {', '.join(SETTINGS)}")
    if args.nproc < 2:
        ap.error("--nproc must be >= 2: on one rank ZeRO-3 gathers nothing")
    from vlscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    base = settings[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="vlscale_zero3_leaf_") as tmp:
        files = {s: ds_file(s, cfg, Path(tmp)) for s in settings}
        for r in range(args.repeats):
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for s in order:
                res = run_once(args, s, files[s], Path(tmp) / f"r{r}_{s}")
                runs.append(dict(res, round=r))
                if not args.json:
                    print(f"round {r}: {s:12s} {res['step_time_s']:.3f} s/step ({res['wall_s']:.0f} s wall)",
                          flush=True)
    by = {s: [r for r in runs if r["setting"] == s] for s in settings}
    pairs = pairwise(runs, settings)
    ratios = {s: pairs[f"{s} / {base}"]["rounds"] for s in settings[1:]}
    max_loss_diff = max(abs(a - b) for s in settings[1:] for ra, rb in zip(by[base], by[s])
                        for a, b in zip(ra["losses"], rb["losses"]))
    result = {
        "command": "python benchmarks/zero3_leaf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config, "nproc": args.nproc, "steps": args.steps, "repeats": args.repeats,
        "overrides": args.overrides, "settings": settings, "baseline": base,
        "step_time_s": {s: statistics.median(r["step_time_s"] for r in by[s]) for s in settings},
        "over_baseline": {s: statistics.median(v) for s, v in ratios.items()}, "ratios": ratios,
        "pairwise": pairs,
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
        print("step time: " + ", ".join(f"{s} {st[s]:.3f} s" for s in settings) + "; over " + base + ": "
              + ", ".join(f"{s} {v:.3f}" for s, v in result["over_baseline"].items())
              + f" (medians of {args.repeats} rounds); largest loss difference {max_loss_diff:.2e}")
        print("pairwise (median of the per-round ratios): "
              + ", ".join(f"{k} {v['median']:.3f}" for k, v in pairs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
