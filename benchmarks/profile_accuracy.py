"""Predicted vs measured per-rank memory on CPU (DeepSpeed's CPU accelerator, gloo), by component.

    python benchmarks/profile_accuracy.py [--json] [--only NAME ...] [--steps 3]
    python benchmarks/profile_accuracy.py --knobs [--json] [--only NAME ...]

Configurations of the tiny CLIP-RN + T5/BART world: one process and 2-rank ZeRO-3, adapters,
LoRA and full fine-tuning, checkpointing on and off, two micro-batch sizes, fp32 and bf16, offload;
prompt tuning, Hyperformer, Compacter, per-task weights (multiple, half_shared), video frames, a
trained CLIP. For each:
the analytic prediction (vlscale.profiling.analytic.estimate_memory, device=cpu) beside a measured
run of 3 training steps (vlscale.profiling.measure.measure_memory: parameter/gradient/optimizer
bytes read from the engine's tensors, activations from saved_tensors_hooks, the peak of live tensor
bytes from a TorchDispatchMode, the process RSS beside it), with the relative error of each.
Acceptance: params/grads/optimizer exact, activations/buffers/peak within 10%.

``--knobs``: the ZeRO-3 settings users turn to fit a large model (stage3_max_reuse_distance,
stage3_prefetch_bucket_size, stage3_max_live_parameters; LM layers as leaf units or not; CLIP on the
fly or cached features) on 2 ranks, fp32, micro-batch 1, with t5-small, t5-base (one setting) and
tiny-t5-wide (T5-3B's proportions: a layer outweighs the embedding). Compared: the peak of the training steps after the
first (DeepSpeed's trace is complete then), without the set-up, against the estimate's largest
training phase. The rows of one backbone and feature source run one after the other in one 2-rank
start-up (``measure_memory_cases``; ``wall_s`` is then the group's time per row).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = [
    # name, world size, overrides
    ("1r zero2 adapter mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4"]),
    ("1r zero2 adapter mbs8 ckpt", 1, ["train.zero_stage=2", "train.micro_batch_size=8",
                                       "train.gradient_checkpointing=true"]),
    ("1r zero0 full-FT mbs4", 1, ["train.zero_stage=0", "train.micro_batch_size=4", "peft.train_lm=true"]),
    ("1r zero2 bf16 adapter mbs8", 1, ["train.zero_stage=2", "train.micro_batch_size=8", "train.precision=bf16"]),
    ("2r zero3 adapter mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4"]),
    ("2r zero3 adapter mbs8 ckpt", 2, ["train.zero_stage=3", "train.micro_batch_size=8",
                                       "train.gradient_checkpointing=true"]),
    ("2r zero3 full-FT mbs2 ckpt", 2, ["train.zero_stage=3", "train.micro_batch_size=2", "peft.train_lm=true",
                                       "train.gradient_checkpointing=true"]),
    ("2r zero3 bart lora bf16 mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4", "model.backbone=tiny-bart",
                                         "peft.method=lora", "train.precision=bf16", "model.dropout=0.1"]),
    # PEFT methods and inputs beyond adapters: prompts lengthen the encoder input; Hyperformer's shared
    # hypernetwork accumulates its gradients site after site in backward; per-task weight sets give the
    # tasks a step does not train zero gradients at ZeRO-1/2's boundary; a video is max_frames images in
    # the batch; a trained CLIP keeps its own activations (batch-norm statistics, the images)
    ("1r zero2 prompt mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.method=prompt"]),
    ("1r zero2 hyperformer mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.method=hyperformer"]),
    ("2r zero3 hyperformer mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4", "peft.method=hyperformer"]),
    ("1r zero2 compacter mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.method=compacter"]),
    ("1r zero2 multiple adapters mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.sharing=multiple"]),
    ("1r zero2 half_shared mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.sharing=half_shared"]),
    ("2r zero3 multiple adapters mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4", "peft.sharing=multiple"]),
    ("1r zero2 tvqa frames mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "data.tasks=[tvqa]"]),
    ("2r zero3 tvqa frames mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4", "data.tasks=[tvqa]"]),
    ("1r zero2 train CLIP mbs4", 1, ["train.zero_stage=2", "train.micro_batch_size=4", "peft.train_vision=true"]),
    ("2r zero3 train CLIP mbs4", 2, ["train.zero_stage=3", "train.micro_batch_size=4", "peft.train_vision=true"]),
    # ds_configs/zero3_offload.json (optimizer and parameters offloaded to the host, DeepSpeedCPUAdam): on the
    # CPU accelerator the host is the device, so the offloaded bytes count in its peak
    ("1r zero3 offload adapter mbs4", 1, ["train.deepspeed=ds_configs/zero3_offload.json", "train.micro_batch_size=4"]),
    ("2r zero3 offload adapter mbs4", 2, ["train.deepspeed=ds_configs/zero3_offload.json", "train.micro_batch_size=4"]),
]
KEYS = ("params", "grads", "optimizer", "activations", "buffers", "peak")

KNOBS = {"default": {}, "reuse 0, no prefetch": {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
         "reuse 0": {"stage3_max_reuse_distance": 0}, "prefetch 5e7": {"stage3_prefetch_bucket_size": 50_000_000}}
KNOB_ROWS = ([("t5-small", "images", k) for k in KNOBS] + [("t5-small", "cache", "reuse 0"), ("t5-base", "images", "reuse 0")]
             + [("tiny-t5-wide", "images", k) for k in KNOBS]
             + [("tiny-t5-wide", "images", "live 1e6"), ("tiny-t5-wide", "images", "live 1e6, reuse 0")])
KNOBS.update({"live 1e6": {"stage3_max_live_parameters": 1_000_000},
              "live 1e6, reuse 0": {"stage3_max_live_parameters": 1_000_000, "stage3_max_reuse_distance": 0}})


def knob_case(backbone: str, features: str, knob: str, leaf: bool, steps: int) -> dict:
    from vlscale.config import load_config
    from vlscale.profiling.analytic import resolve_ds_config

    cfg = load_config("tiny", [f"model.backbone={backbone}", f"model.feature_source={features}", "train.zero_stage=3",
                               "train.micro_batch_size=1", f"train.zero3_leaf_layers={str(leaf).lower()}"])
    ds = resolve_ds_config(cfg, 2, None, device_type="cpu")
    ds["zero_optimization"].update(KNOBS[knob])
    return {"cfg": cfg, "ds_config": ds, "steps": steps}


def after_first_step(phase: str) -> bool:
    """Whether a measured phase (forward<i> / backward<i> / step<i>) belongs to a step i >= 1: not "init", not
    step 0 (DeepSpeed records its ZeRO-3 trace then); step 10 is one."""
    i = re.search(r"\d+$", phase)
    return i is not None and int(i.group()) > 0


def knob_row(backbone: str, features: str, knob: str, leaf: bool, case: dict, meas: dict, wall_s: float) -> dict:
    from vlscale.profiling.analytic import estimate_memory

    est = estimate_memory(case["cfg"], 2, case["ds_config"], device="cpu")
    measured = max(v for k, v in meas["phase_peaks"].items() if after_first_step(k))
    train = {k: v for k, v in est.phases.items() if k != "init"}
    phase = max(train, key=train.get)
    return {"backbone": backbone, "features": features, "knob": knob, "zero_optimization": KNOBS[knob],
            "leaf_layers": leaf, "measured_train_peak": measured, "predicted_train_peak": train[phase],
            "predicted_phase": phase, "error": (train[phase] - measured) / measured,
            "zero3_gathered": est.detail["zero3_gathered"], "wall_s": round(wall_s, 1)}


def _knob_labels() -> list[tuple]:
    return [(f"{backbone} {features} {knob} {'leaf' if leaf else 'module'}", backbone, features, knob, leaf)
            for backbone, features, knob in KNOB_ROWS for leaf in (True, False)]


def knobs_main(args) -> int:
    """The rows of one backbone and feature source are measured in one 2-rank start-up
    (measure_memory_cases: the same figures as separate runs, within their run-to-run noise)."""
    from vlscale.profiling.measure import measure_memory_cases

    groups: dict[tuple, list] = {}
    for label, backbone, features, knob, leaf in _knob_labels():
        if not args.only or any(s in label for s in args.only):
            groups.setdefault((backbone, features), []).append((label, backbone, features, knob, leaf))
    rows = []
    for members in groups.values():
        cases = [knob_case(b, f, k, leaf, args.steps) for _, b, f, k, leaf in members]
        t0 = time.time()
        measured = measure_memory_cases(cases, 2)
        wall = (time.time() - t0) / len(cases)
        for (label, b, f, k, leaf), case, meas in zip(members, cases, measured):
            rows.append(knob_row(b, f, k, leaf, case, meas, wall))
            r = rows[-1]
            if not args.json:
                print(f"{label:48s} measured {r['measured_train_peak'] / 2**20:8.2f} MiB  predicted "
                      f"{r['predicted_train_peak'] / 2**20:8.2f} MiB ({r['error']:+.1%}, {r['predicted_phase']})"
                      f"  [{r['wall_s']}s]", flush=True)
    if args.json:
        print(json.dumps({"knobs": rows}, indent=1))
    return 0


def _pct(error) -> str:
    """A relative error as printed: +1.2%, or "n/a" where the measured figure is 0 and the estimate is not."""
    return "n/a" if error is None else f"{error:+.1%}"


def run_one(name: str, world: int, overrides: list[str], steps: int) -> dict:
    from vlscale.config import load_config
    from vlscale.profiling.analytic import estimate_memory, resolve_ds_config
    from vlscale.profiling.measure import measure_memory

    cfg = load_config("tiny", overrides)
    ds = resolve_ds_config(cfg, world, None, device_type="cpu")
    t0 = time.time()
    meas = measure_memory(cfg, world, ds, steps=steps)
    est = estimate_memory(cfg, world, ds, device="cpu")
    pred = est.components
    # relative to the measured figure; a component measured as 0 has none (0.0 where the estimate is 0 too)
    errors = {k: (pred[k] - meas[k]) / meas[k] if meas.get(k) else (0.0 if pred[k] == meas.get(k) else None)
              for k in KEYS}
    return {"name": name, "world_size": world, "overrides": overrides, "predicted": {k: pred[k] for k in KEYS},
            "measured": {k: meas.get(k) for k in KEYS}, "errors": errors, "predicted_phase": est.peak_phase,
            "measured_phase": meas.get("peak_phase"), "rss_peak": meas.get("rss_peak"),
            "exact": all(pred[k] == meas[k] for k in ("params", "grads", "optimizer")),
            "within_10pct": all(errors[k] is not None and abs(errors[k]) <= 0.10
                                for k in ("activations", "buffers", "peak")),
            "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="substrings of configuration names to run")
    p.add_argument("--steps", type=int, default=3, help="measured training steps, at least 2")
    p.add_argument("--knobs", action="store_true", help="the ZeRO-3 settings table instead (training-step peaks)")
    args = p.parse_args(argv)
    if args.steps < 2:  # measured: --steps 1 puts the 1r zero2 adapter row's buffers 15% off
        p.error(f"--steps {args.steps}: at least 2 are needed; the first step's forward and backward run before the "
                "optimizer has created Adam's state, so its peak is not a steady training step's (the one the estimate "
                "predicts), and --knobs compares the steps after the first")
    names = [label for label, *_ in _knob_labels()] if args.knobs else [name for name, *_ in CONFIGS]
    if args.only and not any(s in n for s in args.only for n in names):
        p.error(f"--only {' '.join(args.only)}: no configuration name contains any of these; the names are: "
                + "; ".join(names))
    if args.knobs:
        return knobs_main(args)
    from vlscale.profiling.analytic import fmt_bytes

    rows = []
    for name, world, overrides in CONFIGS:
        if args.only and not any(s in name for s in args.only):
            continue
        rows.append(run_one(name, world, overrides, args.steps))
        if not args.json:
            r = rows[-1]
            print(f"{name:30s} " + " ".join(
                f"{k}={fmt_bytes(r['predicted'][k])}/{fmt_bytes(r['measured'][k] or 0)}({_pct(r['errors'][k])})"
                for k in KEYS) + f"  [{r['predicted_phase']} / {r['measured_phase']}, {r['wall_s']}s]",
                flush=True)
    ok = all(r["exact"] and r["within_10pct"] for r in rows)
    if args.json:
        print(json.dumps({"configs": rows, "all_pass": ok}, indent=1))
        return 0 if ok else 1
    print()
    print(f"{'configuration':30s} " + " ".join(f"{k:>11}" for k in KEYS) + "   (relative error, predicted vs measured)")
    for r in rows:
        print(f"{r['name']:30s} " + " ".join(f"{r['errors'][k]:>+11.2%}" for k in KEYS))
    print(f"params/grads/optimizer exact and activations/buffers/peak within 10%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
