"""Scale benchmark: train a CLIP-T5 of a given size with one adapter under ZeRO-3 and measure it.

    python benchmarks/scale.py --model t5-large --steps K [--json] [--world-size 2] [--precision fp32|bf16]
        [--micro-batch 2] [--deepspeed ds_configs/zero3.json] [--reuse-distance 0] [--prefetch 0]
        [--max-live 1e8] [--load DIR] [--save DIR] [--out FILE.json] [key=value ...]
    python benchmarks/scale.py --plan-presets [--check]       (the vlscale/configs/scale/ presets)

On this machine (no GPU) it starts ``--world-size`` CPU ranks (torchrun, gloo, DeepSpeed's CPU
accelerator), builds the model with :func:`vlscale.engine.sharded_loading.build_model_zero3` (the
language model partitioned at construction; ``--load DIR`` reads a local sharded safetensors
checkpoint partition by partition; ``--save DIR`` first writes the random weights as one), and
trains ``--steps`` optimizer steps on the synthetic world with the trainer's own step
(``vlscale.engine.trainer.train_step``: token-mean loss over all ranks, AdamW on the trainable
parameters). Reported, per rank (max over ranks, and ``*_by_rank``):

    step_time_s                     median over steps 2..K (step 1 records ZeRO-3's trace)
    param_bytes_per_rank            ZeRO-3 partitions (+ persistent whole parameters), as run_summary.json
    total_param_bytes               every parameter at full size in the run's precision
    optimizer_state_bytes_per_rank  fp32 master partitions + Adam moments (trainable only)
    peak_rss_bytes                  the process's peak resident memory (VmHWM)
    peak_tensor_bytes               peak live tensor bytes (vlscale.profiling.measure.LiveTensorTracker),
                                    over the whole run and by phase (build, initialize, train)
    predicted_peak_bytes            the planner's analytic peak (vlscale.profiling.analytic.estimate_memory,
                                    device=cpu, the same DeepSpeed dict) over the training phases (its
                                    "init" phase assumes a whole-model build: predicted_peak_bytes_whole_build);
                                    peak_rel_error = peak_tensor_bytes / predicted_peak_bytes - 1
    losses                          per step (mean over all ranks' tokens)
    comm_bytes_per_step             all_gather / reduce_scatter / all_reduce / broadcast bytes counted from
                                    the collectives (vlscale.engine.comm.CommCounter, full-tensor convention),
                                    per step and the median over steps 2..K
    predicted_comm_bytes_per_step   the frozen-aware ZeRO-3 accounting (vlscale.engine.comm.predict_zero3_comm)

``--plan-presets`` asks the planner (vlscale.profiling.planner.plan) for the fastest setting of each
scale preset on 8 x 80 GiB and 8 x 24 GiB GPUs, restricted to the DeepSpeed files the project ships
(ZeRO 0-2: ds_configs/zero2.json; ZeRO-3: zero3.json, or zero3_offload.json for optimizer + parameter
offload to CPU), and writes vlscale/configs/scale/*.yaml; ``--check`` only compares.
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
sys.path.insert(0, str(ROOT))

# short name -> (registry backbone, CLIP model of the preset)
MODELS = {
    "t5-large": ("google-t5/t5-large", "RN101"),
    "t5-3b": ("google-t5/t5-3b", "RN101"),
    "flan-t5-xl": ("google/flan-t5-xl", "ViT-L-14-quickgelu"),
    "t5-11b": ("google-t5/t5-11b", "RN101"),
    "flan-t5-xxl": ("google/flan-t5-xxl", "ViT-L-14-quickgelu"),
}
HARDWARE = {"8x80gb": ("80GiB", 8), "8x24gb": ("24GiB", 8)}
GLOBAL_BATCH = 512  # the paper's 500, rounded to a multiple of 8 GPUs x power-of-two micro-batches
PRESET_DIR = ROOT / "vlscale" / "configs" / "scale"
DS_FILES = {"zero2": "ds_configs/zero2.json", "zero3": "ds_configs/zero3.json",
            "zero3_offload": "ds_configs/zero3_offload.json"}


def preset_name(model: str, hardware: str = "8x80gb") -> str:
    base = f"scale/clip_{model.replace('-', '_')}_single_adapter"
    return base if hardware == "8x80gb" else f"{base}_{hardware}"


# ----------------------------------------------------------------------------- presets from the planner

def model_config(model: str):
    """The hardware-independent run config of a scale preset (what the planner is asked about)."""
    from vlscale.config import load_config

    backbone, vision = MODELS[model]
    return load_config("paper/clip_t5_single_adapter", [
        f"model.backbone={backbone}", f"model.vision={vision}", f"data.feature_cache=data/clip_features/{vision}",
        f"train.micro_batch_size={GLOBAL_BATCH // 8}", f"train.global_batch_size={GLOBAL_BATCH}",
        "train.gradient_accumulation_steps=null"])


def recommend(model: str, hardware: str) -> dict:
    """The planner's fastest fitting setting among the shipped DeepSpeed files -> a dict with the
    DeepSpeed file, the train.* overrides and the predicted peak per GPU."""
    from vlscale.profiling.planner import plan

    budget, world = HARDWARE[hardware]
    cfg = model_config(model)
    options = []
    for ds_file, stages, offloads in (("zero2", (0, 1, 2), ("none",)), ("zero3", (3,), ("none",)),
                                      ("zero3_offload", (3,), ("opt_param_cpu",))):
        for o in plan(cfg, budget, world, ds_file=str(ROOT / DS_FILES[ds_file]), stages=stages, offloads=offloads):
            options.append((o, ds_file))
    # the planner's own order: fitting first, fastest first, then the smaller peak
    options.sort(key=lambda t: (not t[0].fits, -float(f"{t[0].samples_per_s:.4g}") if t[0].fits else 0, t[0].peak))
    best, ds_file = options[0]
    if not best.fits:
        raise RuntimeError(f"{model} on {hardware}: no setting fits (smallest peak {best.peak} bytes)")
    train = {}
    for item in best.overrides():
        key, value = item.split("=", 1)
        train[key.split(".", 1)[1]] = json.loads(value) if value not in ("bf16", "fp32", "fp16") else value
    # the preset keeps the global batch on any number of GPUs: the run derives the accumulation from it
    del train["gradient_accumulation_steps"]
    train["global_batch_size"] = GLOBAL_BATCH
    return {"deepspeed": DS_FILES[ds_file], "train": train, "predicted_peak_bytes": int(best.peak),
            "samples_per_s": best.samples_per_s, "label": best.label(), "budget": budget, "world_size": world}


def preset_text(model: str, hardware: str, rec: dict) -> str:
    from vlscale.profiling.analytic import fmt_bytes

    backbone, vision = MODELS[model]
    name = preset_name(model, hardware)
    t = rec["train"]
    gpus = f"{rec['world_size']} x {rec['budget']}"
    launch = (f"deepspeed --num_gpus {rec['world_size']} launchers/train.py --deepspeed {rec['deepspeed']} "
              f"--config {name}")
    lines = [
        f"# {backbone} + CLIP {vision} (cached features), one shared adapter, for {gpus} GPUs.",
        "# Written by `python benchmarks/scale.py --plan-presets` from the memory planner",
        f"# (vlscale/profiling/planner.py): {rec['label']}, predicted peak {fmt_bytes(rec['predicted_peak_bytes'])}",
        "# per GPU. Launch:",
        f"#   {launch}",
        "# Pretrained weights: model.backbone_path=DIR (a local Hugging Face folder with sharded",
        "# safetensors; under ZeRO-3 each rank reads only its partition, see docs/scaling.md).",
    ]
    if hardware == "8x80gb":
        lines.append("base: paper/clip_t5_single_adapter")
    else:
        lines.append(f"base: {preset_name(model)}")
    lines.append(f"description: \"{backbone} + CLIP {vision}, single adapter; planner for {gpus}: --deepspeed "
                 f"{rec['deepspeed']} ZeRO-{t['zero_stage']} micro-batch {t['micro_batch_size']} "
                 f"{t['precision']}, predicted peak {fmt_bytes(rec['predicted_peak_bytes'])}/GPU\"")
    lines.append(f"output_dir: runs/{name}")
    if hardware == "8x80gb":
        lines += ["model:", f"  backbone: {backbone}", f"  vision: {vision}", "data:",
                  f"  feature_cache: data/clip_features/{vision}"]
    lines.append("train:")
    for key in ("zero_stage", "micro_batch_size", "global_batch_size", "gradient_checkpointing", "precision"):
        value = t[key]
        lines.append(f"  {key}: {str(value).lower() if isinstance(value, bool) else value}")
    lines.append(f"  deepspeed: {rec['deepspeed']}  # when --deepspeed is not given")
    if hardware == "8x80gb":
        lines.append(f"  max_steps: {88000 * 500 // GLOBAL_BATCH}  # the paper's 20 epochs at a global batch of "
                     f"{GLOBAL_BATCH}")
        lines.append(f"  eval_every: {88000 * 500 // GLOBAL_BATCH // 20}  # once an epoch")
    return "\n".join(lines) + "\n"


def plan_presets(check: bool = False) -> int:
    bad = 0
    rows = []
    for model in MODELS:
        for hardware in HARDWARE:
            rec = recommend(model, hardware)
            text = preset_text(model, hardware, rec)
            path = PRESET_DIR / f"{preset_name(model, hardware).split('/', 1)[1]}.yaml"
            rows.append((model, hardware, rec))
            if check:
                if not path.exists() or path.read_text() != text:
                    print(f"{path} differs from the planner's recommendation ({rec['label']})")
                    bad += 1
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}: {rec['label']} with {rec['deepspeed']}")
    if not check:
        print(json.dumps([{"model": m, "hardware": h, **r} for m, h, r in rows], indent=1))
    elif not bad:
        print(f"the {len(rows)} presets in {PRESET_DIR.relative_to(ROOT)} are the planner's recommendations")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- the measured run (one rank)

def bench_config(args):
    from vlscale.config import load_config

    backbone, vision = MODELS.get(args.model, (args.model, args.vision or "RN101"))
    vision = args.vision or vision
    overrides = [f"model.backbone={backbone}", f"model.vision={vision}", "model.feature_source=images",
                 "model.pretrained=false", "model.vision_pretrained=null", "model.tokenizer=synthetic",
                 "model.extra_special_tokens=0",
                 "data.source=synthetic", "data.root=null", "data.feature_cache=null",
                 f"data.tasks=[{args.tasks}]", "data.synthetic_train=64", "data.synthetic_eval=8",
                 f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
                 "train.gradient_accumulation_steps=1", "train.global_batch_size=null",
                 f"train.precision={args.precision}",
                 "train.gradient_checkpointing=false", "train.zero_stage=3", "train.warmup_ratio=0",
                 f"train.lr={args.lr}", "train.eval_every=0", f"output_dir={args.workdir}"]
    if args.load:
        overrides += ["model.pretrained=true", f"model.backbone_path={args.load}"]
    return load_config("paper/clip_t5_single_adapter", overrides + list(args.overrides))


def bench_ds_config(args, cfg, world_size: int) -> dict:
    from vlscale.engine.deepspeed_config import build_deepspeed_config, load_ds_file

    raw, _ = load_ds_file(str(ROOT / args.deepspeed) if not os.path.isabs(args.deepspeed) else args.deepspeed)
    z = raw.setdefault("zero_optimization", {})
    z.update(stage3_max_reuse_distance=args.reuse_distance, stage3_prefetch_bucket_size=args.prefetch,
             stage3_max_live_parameters=args.max_live)
    return build_deepspeed_config(raw, cfg, world_size, device_type="cpu")


def steady_state(step_times: list, comm: list) -> tuple[float, dict, dict]:
    """(median step time, median bytes per collective kind, the last step's call counts) over steps 2..K: step 1
    records ZeRO-3's trace (with one step only, that one)."""
    steady = comm[1:] or comm
    med = {k: int(statistics.median(c["bytes"][k] for c in steady)) for k in steady[0]["bytes"]}
    return statistics.median(step_times[1:] or step_times), med, steady[-1]["calls"]


def merge_ranks(per_rank: list) -> dict:
    """Each rank's figures -> the largest over the ranks and ``<key>_by_rank`` (``_per_rank`` dropped from the
    list's name); a figure that is not a number only ``<key>_by_rank``."""
    out = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if all(isinstance(v, (int, float)) for v in values):
            out[key] = max(values)
            out[f"{key.replace('_per_rank', '')}_by_rank"] = values
        else:
            out[f"{key}_by_rank"] = values
    return out


def worker(args) -> None:
    import warnings

    from vlscale.engine.distributed import init_distributed

    # DeepSpeed calls collectives torch marks deprecated, once per bucket: hide that noise
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    dist_info = init_distributed()
    import deepspeed
    import torch.distributed as dist
    from torch.optim.lr_scheduler import LambdaLR

    from vlscale.config import torch_dtype
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine import accounting, trainer
    from vlscale.engine.comm import CommCounter, predict_zero3_comm
    from vlscale.engine.distributed import StopSignal
    from vlscale.engine.sharded_loading import (_rss_bytes, build_model_zero3, reset_peak_rss,
                                                save_sharded_safetensors)
    from vlscale.profiling.analytic import estimate_memory
    from vlscale.profiling.measure import LiveTensorTracker, _patched_storage_resize

    rank, world = dist_info.rank, dist_info.world_size
    cfg = bench_config(args)
    ds = bench_ds_config(args, cfg, world)
    dtype = torch_dtype(cfg.train.precision)
    tokenizer = build_tokenizer(cfg)
    vocab = len(tokenizer)
    tracker = LiveTensorTracker("cpu")
    phases = {}
    reset_peak_rss()
    rss_start = _rss_bytes("VmRSS")
    with tracker, _patched_storage_resize(tracker):
        tracker.phase("build")
        t0 = time.perf_counter()
        trainer.seed_everything(cfg.train.seed)
        model, hf_ds, load_report = build_model_zero3(cfg, ds, vocab, dtype)
        phases["build_s"] = time.perf_counter() - t0
        phases["rss_after_build_bytes"] = _rss_bytes("VmRSS")
        if args.save:
            save_sharded_safetensors(model.lm, args.save, max_shard_bytes=args.shard_bytes)
            dist.barrier()
        tracker.phase("initialize")
        schedule = trainer.lr_multiplier(cfg.train.max_steps, cfg.train.warmup_ratio)
        engine, _, _, _ = deepspeed.initialize(model=model,
                                               model_parameters=trainer.optimizer_groups(model, cfg.data.tasks),
                                               config=ds, lr_scheduler=lambda opt: LambdaLR(opt, schedule))
        loader = build_train_loader(cfg, tokenizer, rank, world)
        run = trainer.Run(cfg, ds, dist_info, tokenizer, engine, loader, Path(cfg.output_dir), dtype,
                          show_progress=False, hf_ds_config=hf_ds, task_steps=trainer.TaskSteps.install(engine))
        run.stop = StopSignal()
        phases["initialize_s"] = time.perf_counter() - t0 - phases["build_s"]
        phases["rss_after_initialize_bytes"] = _rss_bytes("VmRSS")
        phases["peak_rss_before_train_bytes"] = _rss_bytes("VmHWM")
        counter = CommCounter(world)
        losses, step_times, comm = [], [], []
        tracker.phase("train")
        for step in range(cfg.train.max_steps):
            batches = [next(loader)]
            counter.reset()
            start = time.perf_counter()
            with counter:
                loss, _ = trainer.train_step(run, batches)
            run.step += 1
            step_times.append(time.perf_counter() - start)
            losses.append(loss)
            comm.append(counter.snapshot())
            if rank == 0 and not args.quiet:
                print(f"[scale] step {run.step}/{cfg.train.max_steps} task={batches[0]['task']} loss={loss:.4f} "
                      f"{step_times[-1]:.1f}s all_gather={comm[-1]['bytes']['all_gather']} "
                      f"reduce_scatter={comm[-1]['bytes']['reduce_scatter']}", flush=True)
    counts = {"total": 0, "trainable": 0, "bytes": 0}
    for p in {id(p): p for p in engine.module.parameters()}.values():
        n = int(getattr(p, "ds_numel", p.numel()))
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        counts["bytes"] += n * p.element_size()
    local = {"param_bytes_per_rank": accounting.parameter_bytes(engine.module),
             "optimizer_state_bytes_per_rank": accounting.optimizer_state_bytes(engine),
             "grad_bytes_per_rank": run.memory.get("grad_bytes_per_rank", 0),
             "peak_rss_bytes": _rss_bytes("VmHWM"), "rss_start_bytes": rss_start,
             "peak_tensor_bytes": int(tracker.peak), "peak_tensor_phase": tracker.peak_phase,
             "tensor_phase_peaks": {k: int(v) for k, v in tracker.phase_peaks.items()},
             **phases, "rss_end_bytes": _rss_bytes("VmRSS"),
             "load": load_report.to_dict() if load_report else None}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, local)
    if rank == 0:
        est = estimate_memory(cfg, world, ds, device="cpu", vocab_size=vocab)
        pred_comm = predict_zero3_comm(cfg, ds, world, vocab_size=vocab)
        step_time_s, med, calls = steady_state(step_times, comm)
        result = {
            "model": args.model, "backbone": cfg.model.backbone, "vision": cfg.model.vision, "world_size": world,
            "precision": cfg.train.precision, "micro_batch_size": cfg.train.micro_batch_size,
            "tasks": cfg.data.tasks, "steps": len(losses), "device": "cpu",
            "deepspeed": args.deepspeed, "zero_optimization": ds["zero_optimization"],
            "offload": {k: ds["zero_optimization"].get(k, {}).get("device", "none")
                        for k in ("offload_optimizer", "offload_param")},
            "pretrained_from": args.load, "total_params": counts["total"], "trainable_params": counts["trainable"],
            "step_time_s": step_time_s, "step_times_s": step_times,
            "total_param_bytes": counts["bytes"], "losses": losses,
            "comm_bytes_per_step": med, "comm_bytes_by_step": [c["bytes"] for c in comm],
            "comm_calls_per_step": calls,
            "predicted_comm_bytes_per_step": {"all_gather": pred_comm.all_gather,
                                              "reduce_scatter": pred_comm.reduce_scatter,
                                              "detail": pred_comm.detail},
            # the estimator's "init" phase models a whole-model build; this run builds under zero.Init
            "predicted_peak_bytes": max(v for k, v in est.phases.items() if k != "init"),
            "predicted_peak_phase": max((k for k in est.phases if k != "init"), key=est.phases.get),
            "predicted_peak_bytes_whole_build": int(est.components["peak"]),
            "predicted_phases": {k: int(v) for k, v in est.phases.items()},
            "predicted_components": {k: int(v) for k, v in est.components.items()},
        }
        result.update(merge_ranks(per_rank))
        result["comm_rel_error"] = {k: (med[k] - result["predicted_comm_bytes_per_step"][k]) /
                                    max(1, result["predicted_comm_bytes_per_step"][k])
                                    for k in ("all_gather", "reduce_scatter")}
        result["peak_tensor_bytes_train"] = max(r["tensor_phase_peaks"].get("train", 0) for r in per_rank)
        result["peak_rel_error"] = (result["peak_tensor_bytes"] - result["predicted_peak_bytes"]) / \
            result["predicted_peak_bytes"]
        Path(args.result).write_text(json.dumps(result, indent=1))
    dist.barrier()
    from vlscale.engine.distributed import destroy

    destroy()


# ----------------------------------------------------------------------------- the launcher side

def _count(text: str) -> int:
    """``1e9``, ``100000000`` -> an integer count."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 0")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t5-large", help=f"{sorted(MODELS)} or any registry backbone (tiny-t5)")
    p.add_argument("--vision", default=None, help="CLIP model (default: the preset's; RN101 for other backbones)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--tasks", default="vqa", help="synthetic tasks, comma-separated")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--deepspeed", default="ds_configs/zero3.json")
    p.add_argument("--reuse-distance", type=_count, default=0,
                   help="stage3_max_reuse_distance in elements (0: release each parameter after use)")
    p.add_argument("--prefetch", type=_count, default=0, help="stage3_prefetch_bucket_size in elements")
    p.add_argument("--max-live", type=_count, default=10 ** 8, help="stage3_max_live_parameters")
    p.add_argument("--load", default=None, help="local HF directory with (sharded) safetensors to load the LM from")
    p.add_argument("--save", default=None, help="write the LM's random weights here as sharded safetensors first")
    p.add_argument("--shard-bytes", type=_count, default=5 * 10 ** 8, help="with --save: bytes per safetensors shard")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--mmap-threshold", type=_count, default=2 ** 20,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks (e.g. 1048576: buffers of 1 MiB and more are "
                        "mapped and returned to the system when freed, so RSS follows the live tensors; 0: glibc's "
                        "default, whose growing threshold keeps freed gathered parameters in the heap)")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--plan-presets", action="store_true", help="(re)write vlscale/configs/scale/*.yaml")
    p.add_argument("--check", action="store_true", help="with --plan-presets: compare only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra run-config overrides key=value")
    args = p.parse_args(argv)
    if args.check and not args.plan_presets:  # it used to start the full default scale run instead
        p.error("--check compares the presets with the planner: give it with --plan-presets")
    return args


def launch(args, argv: list[str]) -> dict:
    import socket

    with tempfile.TemporaryDirectory(prefix="vlscale_scale_") as tmp:
        result = Path(tmp) / "result.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        forwarded = [a for a in argv if a not in ("--json",)]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world_size}",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__).resolve()),
               "--worker", "--result", str(result), "--workdir", str(Path(tmp) / "run"), *forwarded]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("VLSCALE_DIST_TIMEOUT", "1800")
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=None if not args.json else subprocess.PIPE,
                              stderr=subprocess.STDOUT if args.json else None, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not result.exists():
            tail = proc.stdout[-6000:] if proc.stdout else ""
            raise SystemExit(f"benchmarks/scale.py: the {args.world_size}-rank run failed "
                             f"(exit {proc.returncode})\n{tail}")
        return json.loads(result.read_text())


def summary_table(r: dict) -> str:
    from vlscale.profiling.analytic import fmt_bytes

    c, pc = r["comm_bytes_per_step"], r["predicted_comm_bytes_per_step"]
    rows = [
        ("model", f"{r['backbone']} + {r['vision']}, {r['world_size']} CPU ranks, {r['precision']}, "
                  f"micro-batch {r['micro_batch_size']}, {r['deepspeed']}"),
        ("parameters", f"{r['total_params']:,} ({r['trainable_params']:,} trainable)"),
        ("step_time_s", f"{r['step_time_s']:.2f}"),
        ("losses", " ".join(f"{x:.3f}" for x in r["losses"])),
        ("param_bytes_per_rank", f"{fmt_bytes(r['param_bytes_per_rank'])} of {fmt_bytes(r['total_param_bytes'])} "
                                 f"({r['param_bytes_per_rank'] / r['total_param_bytes']:.3f})"),
        ("optimizer_state_bytes_per_rank", fmt_bytes(r["optimizer_state_bytes_per_rank"])),
        ("peak_rss_bytes", fmt_bytes(r["peak_rss_bytes"])),
        ("peak_tensor_bytes", f"{fmt_bytes(r['peak_tensor_bytes'])} ({r['peak_tensor_phase_by_rank'][0]})"),
        ("predicted_peak_bytes", f"{fmt_bytes(r['predicted_peak_bytes'])} ({r['predicted_peak_phase']}): measured "
                                 f"{100 * r['peak_rel_error']:+.1f}%"),
        ("all_gather / step", f"{c['all_gather']:,} vs predicted {pc['all_gather']:,} "
                              f"({100 * r['comm_rel_error']['all_gather']:+.2f}%)"),
        ("reduce_scatter / step", f"{c['reduce_scatter']:,} vs predicted {pc['reduce_scatter']:,} "
                                  f"({100 * r['comm_rel_error']['reduce_scatter']:+.2f}%)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plan_presets:
        return plan_presets(check=args.check)
    if args.worker:
        worker(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # results are written; skip C++ static teardown, where gloo rarely aborts
    result = launch(args, argv)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if args.json else summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
