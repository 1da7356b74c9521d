"""How per-task PEFT weights (sharing=multiple) are stepped when their task is not the step's.

    python benchmarks/task_param_steps.py [--steps 60] [--method adapter] [--json]

VL-Adapter's reference trainer (VL-T5/src/multitask.py: one task per batch, ``param.grad = None``
after every step, AdamW) leaves the weight sets of the other tasks without a gradient, so AdamW
skips them: no update, no weight decay, their moments frozen. DeepSpeed (every ZeRO stage, measured
on stage 0 and 3: identical losses) gives them a zero gradient instead, and AdamW moves them with
their stale moments and decays them. This runs the tiny model (4 image tasks, per-task adapters,
the trainer's batches) in a plain PyTorch loop both ways, the same batches and initial weights, and
prints the losses side by side. Figures (2026-12-02, 60 steps, adapter): mean loss of the last 20
steps 6.586 (reference: skipped) vs 6.034 (zero gradient: vlscale's engine before
``vlscale.engine.trainer.TaskSteps``, which now leaves those groups out of the step;
tests/unit/test_peft.py::test_zero3_matches_plain_pytorch_with_per_task_modules checks the engine
against the skipping loop at ZeRO 0, 2 and 3).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="adapter")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    from vlscale.config import load_config
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine.trainer import lr_multiplier, optimizer_groups, seed_everything
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", [f"peft.method={args.method}", "peft.sharing=multiple",
                               "data.tasks=[vqa,gqa,nlvr2,caption]", "train.micro_batch_size=8",
                               "model.feature_source=images"])
    tok = build_tokenizer(cfg)
    seed_everything(0)
    base = build_model(cfg, vocab_size=len(tok))
    loader = iter(build_train_loader(cfg, tok, rank=0, world_size=1))
    batches = [next(loader) for _ in range(args.steps)]

    def run(zero_fill: bool) -> list[float]:
        model = copy.deepcopy(base)
        model.train()
        opt = torch.optim.AdamW(optimizer_groups(model), lr=cfg.lr, weight_decay=cfg.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(args.steps, cfg.train.warmup_ratio))
        losses = []
        for b in batches:
            out = model(b)
            out.loss.backward()
            if zero_fill:  # what DeepSpeed does
                for g in opt.param_groups:
                    for q in g["params"]:
                        if q.grad is None:
                            q.grad = torch.zeros_like(q)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
        return losses

    skipped, zeroed = run(False), run(True)
    tail = max(1, args.steps // 3)
    result = {"tasks": [b["task"] for b in batches], "skipped": skipped, "zero_gradient": zeroed,
              "mean_last_skipped": statistics.mean(skipped[-tail:]),
              "mean_last_zero_gradient": statistics.mean(zeroed[-tail:])}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for i, (t, a, b) in enumerate(zip(result["tasks"], skipped, zeroed)):
        if i % 6 == 0:
            print(f"step {i + 1:4d} {t:8s} skipped {a:.4f}  zero gradient {b:.4f}")
    print(f"mean loss of the last {tail} steps: skipped (reference) {result['mean_last_skipped']:.3f}, "
          f"zero gradient (vlscale) {result['mean_last_zero_gradient']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
