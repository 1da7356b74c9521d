"""ZeRO stage 0 in half precision: DeepSpeed's optimizer wrapper against ZeRO-1, with and without
vlscale's corrections (vlscale/engine/half_precision.py).

    python benchmarks/half_precision_stage0.py [--out benchmarks/results/half_precision_stage0.json]

One process, the tiny model, the same first batch. Per setting, one optimizer step, and:
  grad_factor   the factor the loss reached the parameters with (the gradient DeepSpeed's step sees,
                before it divides by the loss scale, over the one an fp32 step sees); it must equal
                the loss scale for the division to give the true gradient
  update_ratio  the norm of the first update of the fp32 master weights, over fp32 stage 0's (the
                reference; ZeRO-1 computes the same)
  loss_scale    fp16's (1024, static, so that no step overflows)
fp16 runs on DeepSpeed's CPU accelerator through VLSCALE_CPU_FP16=1 (set by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
             "model.vision_pretrained=null", "model.dropout=0.0", "model.feature_source=images",
             "peft.method=adapter", "train.lr=1e-3", "data.tasks=[vqa,gqa]", "data.synthetic_train=64",
             "data.synthetic_eval=8", "train.max_steps=8", "train.warmup_ratio=0.2", "train.seed=3",
             "train.micro_batch_size=16", "train.clip_grad_norm=1000"]


def one_step(stage: int, precision: str, corrected: bool, ds_file: Path, out: Path, dist) -> dict:
    import torch

    from vlscale.config import load_config
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config

    saved = trainer.stage0_corrections
    if not corrected:  # DeepSpeed as it is
        trainer.stage0_corrections = lambda engine, precision: False
    try:
        cfg = load_config("tiny", OVERRIDES + [f"train.zero_stage={stage}", f"train.precision={precision}",
                                               f"output_dir={out}"])
        shutil.rmtree(out, ignore_errors=True)
        run = trainer.setup_run(cfg, build_deepspeed_config(ds_file, cfg, 1), dist, show_progress=False)
    finally:
        trainer.stage0_corrections = saved
    inner = getattr(run.engine.optimizer, "optimizer", run.engine.optimizer)
    masters = lambda: torch.cat([p.detach().float().reshape(-1) for g in inner.param_groups for p in g["params"]])
    raw = []  # the gradient norm the wrapper's step receives, before it unscales
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    step = run.engine.step

    def step_and_record(*a, **k):
        if run.engine.is_gradient_accumulation_boundary() and all(p.grad is not None for p in trainable):
            raw.append(float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in trainable]))))
        return step(*a, **k)

    run.engine.step = step_and_record
    before = masters()
    loss, _ = trainer.train_step(run, [next(run.loader)])
    update = float((masters() - before).norm())
    scale = float(run.engine.optimizer.loss_scale) if precision == "fp16" else None
    trainer.close(run)
    return {"stage": stage, "precision": precision, "corrected": corrected, "optimizer": type(run.engine.optimizer).__name__,
            "loss": loss, "applied": run.engine.was_step_applied(), "loss_scale": scale,
            "raw_grad_norm": raw[0] if raw else None, "update_norm": update}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    os.environ["VLSCALE_CPU_FP16"] = "1"  # before vlscale.engine.distributed selects the accelerator
    sys.path.insert(0, str(ROOT))
    from vlscale.engine.distributed import init_distributed

    dist = init_distributed()
    tmp = Path(tempfile.mkdtemp(prefix="vlscale_hp_"))
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["fp16"]["loss_scale"] = 1024
    (tmp / "ds.json").write_text(json.dumps(ds))
    settings = [(0, "fp32", True), (1, "fp32", True)]
    for precision in ("bf16", "fp16"):
        settings += [(1, precision, True), (0, precision, False), (0, precision, True)]
    rows = [one_step(*s, tmp / "ds.json", tmp / "run", dist) for s in settings]
    ref = rows[0]
    print(f"{'stage':>5} {'precision':>9} {'corrected':>9} {'optimizer':>24} {'grad_factor':>11} {'update_ratio':>12}")
    for r in rows:
        r["grad_factor"] = r["raw_grad_norm"] / ref["raw_grad_norm"] if r["raw_grad_norm"] else None
        r["update_ratio"] = r["update_norm"] / ref["update_norm"]
        factor = f"{r['grad_factor']:.1f}" if r["grad_factor"] else "-"
        print(f"{r['stage']:>5} {r['precision']:>9} {str(r['corrected']):>9} {r['optimizer']:>24} {factor:>11} "
              f"{r['update_ratio']:>12.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/half_precision_stage0.py", "rows": rows},
                                             indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
