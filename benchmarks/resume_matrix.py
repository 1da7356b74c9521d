"""Resume on another number of ranks, across ZeRO stages and precisions: how far the resumed run's
losses are from the uninterrupted one's.

For each case: the tiny model (the test suite's, dropout off) trains 6 steps at a global batch of 4
on ``from`` ranks (the reference), the same run stops after step 3 (``--stop-after-steps``), and
``--resume`` continues it on ``to`` ranks with the micro-batch that keeps the global batch. Printed:
the largest relative difference of the losses and of the gradient norms over the 6 steps, and the
fp16 loss scales. One process against 2 ranks differ by rounding only in fp32 (~1e-7); in bf16/fp16
by their precision's noise. Runs ``launchers/train.py`` (``torchrun`` for 2 ranks), DeepSpeed's CPU
accelerator without a GPU.

    python benchmarks/resume_matrix.py [--cases NAME,...] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false", "model.vision_pretrained=null",
        "model.dropout=0.0", "model.feature_source=images", "peft.method=adapter", "peft.reduction_factor=4",
        "train.precision=fp32", "train.lr=1e-3", "data.tasks=[vqa,gqa]", "data.synthetic_train=64",
        "data.synthetic_eval=8", "train.eval_batch_size=8", "train.max_steps=6", "train.warmup_ratio=0.2",
        "train.seed=3"]
GLOBAL_BATCH = 4
# name -> (DeepSpeed file, ranks before, ranks after, overrides)
CASES = {
    "zero3_2to1": ("zero3.json", 2, 1, []),
    "zero3_1to2": ("zero3.json", 1, 2, []),
    "zero3_2to1_multiple": ("zero3.json", 2, 1, ["peft.sharing=multiple"]),
    # 4 tasks, 3 steps before the stop: the per-task groups' Adam step counts differ (and some are 0)
    "zero3_2to1_multiple_4tasks": ("zero3.json", 2, 1, ["peft.sharing=multiple", "data.tasks=[vqa,gqa,nlvr2,caption]",
                                                        "train.max_steps=8"]),
    "zero3_offload_2to1": ("zero3_offload.json", 2, 1, []),
    "zero2_2to1": ("zero2.json", 2, 1, []),
    "zero1_1to2_multiple": ("zero2.json", 1, 2, ["train.zero_stage=1", "peft.sharing=multiple"]),
    "zero0_2to1": ("zero2.json", 2, 1, ["train.zero_stage=0"]),
    "zero3_2to1_bf16": ("zero3.json", 2, 1, ["train.precision=bf16"]),
    "zero0_2to1_bf16": ("zero2.json", 2, 1, ["train.zero_stage=0", "train.precision=bf16"]),
    "zero3_2to1_fp16": ("zero3.json", 2, 1, ["train.precision=fp16"]),  # VLSCALE_CPU_FP16=1 on CPU
}


def train(nproc: int, ds: str, out: Path, overrides: list[str], flags: list[str]) -> None:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    cmd = [*launch, str(ROOT / "launchers" / "train.py"), "--config", "tiny", "--deepspeed",
           str(ROOT / "ds_configs" / ds), "--no-progress", *flags, f"output_dir={out}", *TINY, *overrides,
           f"train.micro_batch_size={GLOBAL_BATCH // nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if "train.precision=fp16" in overrides:
        env.setdefault("VLSCALE_CPU_FP16", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def rel(a, b) -> float:
    return abs(a - b) / max(abs(a), 1e-30) if a is not None and b is not None else 0.0


def run_case(name: str, tmp: Path) -> dict:
    ds, before, after, overrides = CASES[name]
    reference, resumed = tmp / f"{name}_reference", tmp / f"{name}_resumed"
    train(before, ds, reference, overrides, [])
    train(before, ds, resumed, overrides, ["--stop-after-steps", "3"])
    train(after, ds, resumed, overrides, ["--resume"])
    a, b = log(reference), log(resumed)
    if [r["step"] for r in b] != [r["step"] for r in a]:
        raise RuntimeError(f"{name}: resumed steps {[r['step'] for r in b]}")
    return {"case": name, "ds": ds, "ranks": f"{before} -> {after}", "overrides": overrides,
            "loss_rel": max(rel(x["loss"], y["loss"]) for x, y in zip(a, b)),
            "grad_norm_rel": max(rel(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b)),
            "loss_scales": [[x.get("loss_scale"), y.get("loss_scale")] for x, y in zip(a, b)]
            if "loss_scale" in a[0] else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlscale_resume_matrix_") as tmp:
        for name in args.cases.split(","):
            row = run_case(name, Path(tmp))
            rows.append(row)
            print(f"{name:22s} {row['ds']:20s} {row['ranks']}: losses within {row['loss_rel']:.1e}, "
                  f"gradient norms within {row['grad_norm_rel']:.1e}"
                  + (f", loss scales {row['loss_scales'][3:]}" if row["loss_scales"] else ""), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"cmd": " ".join(sys.argv), "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
