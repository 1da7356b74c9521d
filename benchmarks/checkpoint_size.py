"""What a resumable checkpoint writes: vlscale's (trainable state only) against DeepSpeed's default
(the whole model too), measured in one session, and the same sum for the shipped scale presets.

Measured part: ``launchers``' own setup (``vlscale.engine.trainer.setup_run``) under ``torchrun``
(``--nproc`` ranks, DeepSpeed's CPU accelerator without a GPU), one training step so that the
optimizer state exists, then per round both writers into fresh folders, alternating which goes first:

    vlscale    ``vlscale.engine.checkpoint.save_checkpoint`` (what ``checkpoints/`` gets): the trainable
               parameters, their optimizer state, the scheduler, client state with the frozen
               weights' fingerprint
    deepspeed  ``engine.save_checkpoint`` with DeepSpeed's defaults (what vlscale wrote before
               2026-12-02): the module state with every frozen weight, plus, at ZeRO-2/3, each
               rank's copy of its frozen parameters (``frozen_param_fragments``) that no load reads

Figures: bytes on disk of each folder, and save wall time (median over ``--repeats``, rank 0's
clock between two barriers). At ZeRO 1-3 also the universal copy a resume on another number of ranks
converts the checkpoint to first (``vlscale.engine.checkpoint._to_universal``, once): its bytes and
time. Random weights, the synthetic world: no downloads.

Model part (``--presets``): for each ``scale/*`` preset on 8 ranks, the model built on the ``meta``
device, bytes = frozen parameters x the precision's bytes (what vlscale no longer writes, per
checkpoint) and what vlscale writes, as the memory profiler predicts it
(``vlscale.profiling.analytic.checkpoint_bytes``: the trainable parameters in the precision at ZeRO
0-2, fp32 master weights and Adam's two moments, client state). The measured rows print the same
prediction beside the measurement.

    python benchmarks/checkpoint_size.py [--stages 1,3] [--nproc 2] [--repeats 3] [--presets]
        [--json] [--out FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = ["model.backbone=t5-base", "model.pretrained=false", "model.tokenizer=synthetic", "model.vision=RN101",
        "model.vision_pretrained=null", "peft.method=adapter", "peft.sharing=single", "peft.reduction_factor=8",
        "train.precision=bf16", "train.micro_batch_size=2", "data.synthetic_train=32", "data.synthetic_eval=8",
        "train.save_every=0", "train.max_steps=10"]
DS_FILES = {0: "zero2.json", 1: "zero2.json", 2: "zero2.json", 3: "zero3.json"}
PRESET_WORLD = 8  # the scale presets' figures are for 8 GPUs (the total barely depends on it: padding)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def predicted_bytes(cfg, ds_config: dict, world: int, vocab_size=None) -> dict:
    """{'frozen': what only DeepSpeed's default writes (frozen parameters x the precision's bytes),
    'vlscale': what vlscale writes, the profiler's ``analytic.checkpoint_bytes``} for ``cfg``."""
    from vlscale.config import PRECISION_BYTES
    from vlscale.profiling.analytic import estimate_checkpoint, parameter_inventory

    inv = parameter_inventory(cfg, vocab_size)
    disk = estimate_checkpoint(cfg, world, ds_config, inventory=inv)
    frozen = inv.total - inv.n_trainable
    return {"frozen_params": frozen, "trainable_params": inv.n_trainable,
            "frozen": frozen * PRECISION_BYTES[cfg.train.precision], "vlscale": disk.total,
            "vlscale_by_rank": disk.file_bytes, "adapter": disk.adapter, "universal": disk.universal}


# ----------------------------------------------------------------------------- worker (one rank)

def worker(args) -> None:
    from vlscale.engine.distributed import init_distributed

    dist = init_distributed()
    from vlscale.config import load_config
    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config, resolve_ds_file
    from vlscale.engine.distributed import barrier

    out = Path(args.out_dir)
    cfg = load_config("tiny", BASE + [f"train.zero_stage={args.stage}", f"output_dir={out / 'run'}",
                                      *args.overrides])
    ds_config = build_deepspeed_config(resolve_ds_file(str(ROOT / "ds_configs" / DS_FILES[args.stage])), cfg,
                                       dist.world_size, device_type=dist.device_type)
    run = trainer.setup_run(cfg, ds_config, dist, show_progress=False)
    trainer.train_step(run, [next(run.loader)])
    run.step = 1
    writers = {
        "vlscale": lambda d: ckpt.save_checkpoint(run.engine, d, run.step, {"step": 1, "frozen": run.frozen},
                                                  dist.rank),
        "deepspeed": lambda d: run.engine.save_checkpoint(str(d / "checkpoints"), tag="step1", save_latest=False),
    }
    times = {name: [] for name in writers}
    sizes = {}
    for r in range(args.repeats):
        for name in (list(writers) if r % 2 == 0 else list(writers)[::-1]):
            target = out / f"{name}_{r}"
            barrier()
            t0 = time.perf_counter()
            writers[name](target)
            barrier()
            times[name].append(time.perf_counter() - t0)
            if dist.is_main:
                sizes[name] = folder_bytes(target / "checkpoints")
                shutil.rmtree(target)
            barrier()
    if args.stage > 0:  # a resume on another number of ranks converts the checkpoint to the universal format first
        target = out / "universal"
        writers["vlscale"](target)
        t0 = time.perf_counter()
        folder = ckpt._to_universal(target / "checkpoints", "step1", dist.rank)
        times["universal"] = [time.perf_counter() - t0]
        if dist.is_main:
            sizes["universal"] = folder_bytes(folder)
            shutil.rmtree(target)
        barrier()
    if dist.is_main:
        result = {"stage": args.stage, "world_size": dist.world_size, "precision": cfg.train.precision,
                  "backbone": cfg.model.backbone, "vision": cfg.model.vision,
                  "bytes": sizes, "save_s": {k: statistics.median(v) for k, v in times.items()},
                  "save_s_all": times, "zero_stage": trainer.zero_stage(ds_config),
                  "predicted": predicted_bytes(cfg, ds_config, dist.world_size,
                                               run.model.lm.get_input_embeddings().num_embeddings)}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    trainer.close(run)


# ----------------------------------------------------------------------------- driver

def measure(args) -> list[dict]:
    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        with tempfile.TemporaryDirectory(prefix="vlscale_ckpt_bench_") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--worker", "--stage", str(stage), "--out-dir", tmp, "--repeats", str(args.repeats),
                   *args.overrides]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
            row = json.loads((Path(tmp) / "result.json").read_text())
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
    return rows


def presets() -> list[dict]:
    from vlscale.config import list_presets, load_config
    from vlscale.profiling.analytic import ZeroSettings, resolve_ds_config

    rows = []
    for name in [p for p in list_presets() if p.startswith("scale/")]:
        cfg = load_config(name)
        ds = resolve_ds_config(cfg, PRESET_WORLD, None)
        rows.append({"preset": name, "precision": cfg.train.precision, "world_size": PRESET_WORLD,
                     "zero_stage": ZeroSettings.from_ds_config(ds, stage=cfg.train.zero_stage).stage,
                     **predicted_bytes(cfg, ds, PRESET_WORLD)})
    return rows


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1,3", help="ZeRO stages to measure (0-3; '' for none)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", action="store_true", help="also the scale presets, from their parameter counts")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the measured run")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    result = {"cmd": " ".join(sys.argv), "measured": measure(args) if args.stages else [],
              "presets": presets() if args.presets else []}
    for r in result["measured"]:
        b, s, p = r["bytes"], r["save_s"], r["predicted"]
        print(f"ZeRO-{r['stage']} x{r['world_size']} {r['backbone']} + {r['vision']} {r['precision']}: "
              f"deepspeed {gib(b['deepspeed'])} in {s['deepspeed']:.2f} s, vlscale {gib(b['vlscale'])} in "
              f"{s['vlscale']:.2f} s: bytes x{b['vlscale'] / b['deepspeed']:.3f}, time x{s['vlscale'] / s['deepspeed']:.3f}"
              f" (predicted: frozen {gib(p['frozen'])}, vlscale {gib(p['vlscale'])}, "
              f"{(p['vlscale'] - b['vlscale']) / b['vlscale']:+.2%})"
              + (f"; universal copy {gib(b['universal'])} in {s['universal']:.2f} s (predicted {gib(p['universal'])}, "
                 f"{(p['universal'] - b['universal']) / b['universal']:+.2%})" if "universal" in b else ""))
    for r in result["presets"]:
        print(f"{r['preset']:48s} {r['precision']} ZeRO-{r['zero_stage']} x{r['world_size']}: no longer written "
              f"{gib(r['frozen'])} per checkpoint; written {gib(r['vlscale'])} ({r['trainable_params'] / 1e6:.1f} M "
              f"trainable; adapter/ {gib(r['adapter'])})")
    if args.json:
        print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
