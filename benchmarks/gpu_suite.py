"""The project's one GPU benchmark: everything only a GPU can show, in one short run.

    python benchmarks/gpu_suite.py [--out DIR] [--budget-s 480] [--sections a,b,...]

All sections take about 7.5 minutes on an H200 (2026-12-04's sections: 30-60 s each, most of it
start-up), inside one device call of 10 minutes. On the device image, DeepSpeed, open_clip and their
missing dependencies travel as wheels (.whl; see the BENCHMARKS.md section "The main command on a GPU").

Sections, in the order run by default (most wanted first); a section that fails is recorded and
the others still run (the trainings in processes of their own), and one is skipped when the time
budget left is too small:
  methods      (listed below)
  kernels      the fused adapter kernels vs the reference, and a sweep of kernel variants
               (benchmarks/gpu_kernels_section.py)
  cuda_tests   the test suite's CUDA-only tests (pytest -k cuda on the kernel test files: the Triton kernels'
               2x error rule in bf16/fp16/fp32, torch.func and torch.compile over the Triton path): counts,
               and the failures' last lines
  train_fp16   the main command (launchers/train.py, ZeRO-3, one GPU) in fp16 with dynamic loss
               scaling: losses, loss scale behaviour, step time, allocator peak (run_summary.json)
  train_fp16_z0 the same fp16 run at ZeRO stage 0 (DeepSpeed's FP16_UnfusedOptimizer: vlscale's
               configs use torch's AdamW) with vlscale.engine.half_precision's corrections; its
               losses and loss scales beside train_fp16's
  profiler     predicted vs allocator peak (vlscale.profiling.measure.run_gpu_section)
  profile_cli_fp16  the user's command, launchers/profile_memory.py --measure --json, on train_fp16's
               config (ZeRO-3, fp16): predicted vs measured per component, and train_fp16's own
               run_summary peak beside them
  saved_by_op  benchmarks/saved_by_op.py: autograd's saved bytes by op on the profiler's t5-base row, with
               the profiler's tape beside them (where the GPU keeps more than predicted)
  methods      every PEFT method and sharing mode (and full fine-tuning, BART, checkpointing, video) built
               on the GPU: one bf16 forward + backward per task, in this process; catches a tensor made
               on the host (the CPU tests cannot: there the host is the device)
  resume       ZeRO-3 bf16, 6 steps straight against 3 steps, a stop, and --resume (CUDA RNG state,
               optimizer, sampler): the losses of steps 4-6 compared
  zero3_init   benchmarks/zero3_random_init.py: a random-weight ZeRO-3 build against a whole build with the
               same seed (equal on CPU; on a GPU zero.Init may initialise from the GPU's generator)
  train_bf16   the same run as train_fp16 in bf16, for comparison
  train_bf16_unfused  train_bf16 with peft.fused=false (the plain PyTorch adapter): the fused kernels'
               end-to-end effect, as ``fused_over_unfused_step_time`` when both ran
  full_ft_ckpt full fine-tuning with gradient checkpointing, bf16: memory of the other regime
  loop_syncs   benchmarks/loop_overhead.py on the GPU (tiny preset, ZeRO 0 and 3): the training loop's
               host-device syncs per step by call site (the figure; its phase times are host-side only,
               the GPU runs ahead of them)
  read_ahead   train_bf16's run on 256 JPEGs 640x480 (a real VQA layout, benchmarks/read_ahead.py's) with the
               images read in the training thread (data.read_ahead_threads=0) against the GPU default (the
               CPUs' share, 1 to 4 threads): step times and their ratio, ``ahead_over_inline_step_time``
  eval_gather  benchmarks/eval_gather.py on the GPU (train_bf16's model, one rank, random weights: decoding to
               the token budget): each task's evaluation under ZeRO-3's per-module gathers against the decoding
               parameters gathered around each batch's decoding and the model gathered whole (train.eval_gather)
Writes DIR/gpu_results.json (DIR defaults to $OUT or ./runs/gpu_suite) and prints it; the trainings'
output_dirs go to DIR/runs/<start time>/<section>, so a second run into the same DIR is not refused by
the first one's checkpoints (train.py keeps another run's output_dir from being overwritten).
Random weights, the synthetic world: no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["model.backbone=t5-small", "model.vision=tiny-clip-rn", "model.pretrained=false", "model.vision_pretrained=null",
          "model.tokenizer=synthetic", "data.synthetic_train=256",
          "data.synthetic_eval=32", "train.eval_max_examples=32", "train.micro_batch_size=32",
          "train.eval_batch_size=32", "train.save_every=0"]
TRAIN_RUNS = {
    "train_fp16": ["train.precision=fp16", "train.max_steps=30"],
    "train_fp16_z0": ["train.precision=fp16", "train.max_steps=30", "train.zero_stage=0"],
    "train_bf16": ["train.precision=bf16", "train.max_steps=30"],
    "train_bf16_unfused": ["train.precision=bf16", "train.max_steps=30", "peft.fused=false"],
    "full_ft_ckpt": ["train.precision=bf16", "train.max_steps=10", "peft.method=none", "peft.train_lm=true",
                     "train.gradient_checkpointing=true"],
}


def _command(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd``; -> (the process, {cmd, rc, wall_s[, error_tail]})."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    res = {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        res["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return proc, res


def _json_command(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``, which prints an indented JSON object last (after any log lines): that object, or the
    failure's {cmd, rc, error_tail}."""
    proc, res = _command(cmd, timeout)
    if proc.returncode != 0:
        return res
    out = proc.stdout
    return json.loads(out if out.startswith("{") else out[out.rindex("\n{\n") + 1:])


def run_training(name: str, extra: list[str], out_dir: Path, timeout: float, flags: tuple = ()) -> dict:
    run_dir = out_dir / name
    proc, res = _command([sys.executable, str(ROOT / "launchers/train.py"), "--deepspeed",
                          str(ROOT / "ds_configs/zero3.json"), "--no-progress", *flags, f"output_dir={run_dir}",
                          *COMMON, *extra], timeout)
    if proc.returncode != 0:
        return res
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    res["losses"] = [round(r["loss"], 4) for r in log]
    res["loss_first5_mean"] = sum(res["losses"][:5]) / min(5, len(res["losses"]))
    res["loss_last5_mean"] = sum(res["losses"][-5:]) / min(5, len(res["losses"]))
    res["all_finite"] = all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in log)
    if any("loss_scale" in r for r in log):
        res["loss_scale"] = [r.get("loss_scale") for r in log]
        res["skipped"] = [r["step"] for r in log if r.get("skipped")]
    res["summary"] = {k: summary.get(k) for k in (
        "world_size", "zero_stage", "precision", "trainable_params", "total_params", "param_bytes_per_rank",
        "grad_bytes_per_rank", "optimizer_state_bytes_per_rank", "peak_memory_bytes", "step_time_s",
        "read_ahead_threads", "gradient_checkpointing", "device", "final_scores", "skipped_steps")}
    res["stdout_tail"] = proc.stdout[-1500:]
    return res


METHOD_CASES = {
    "adapter single": ["peft.method=adapter", "peft.sharing=single"],
    "adapter multiple": ["peft.method=adapter", "peft.sharing=multiple"],
    "adapter half_shared": ["peft.method=adapter", "peft.sharing=half_shared"],
    "adapter unfused": ["peft.method=adapter", "peft.fused=false"],
    "hyperformer": ["peft.method=hyperformer"],
    "compacter single": ["peft.method=compacter", "peft.sharing=single"],
    "compacter multiple": ["peft.method=compacter", "peft.sharing=multiple"],
    "lora single": ["peft.method=lora", "peft.sharing=single", "peft.lora_rank=8"],
    "lora multiple": ["peft.method=lora", "peft.sharing=multiple", "peft.lora_rank=8"],
    "prompt single": ["peft.method=prompt", "peft.sharing=single"],
    "prompt multiple": ["peft.method=prompt", "peft.sharing=multiple"],
    "full fine-tuning": ["peft.method=none", "peft.train_lm=true"],
    "adapter + checkpointing": ["peft.method=adapter", "train.gradient_checkpointing=true"],
    "bart adapter": ["model.backbone=tiny-bart", "peft.method=adapter"],
    "video adapter": ["data.tasks=[tvqa,tvc]", "peft.method=adapter"],
}


def run_methods(device: str = "cuda") -> dict:
    """``methods``: each case built on ``device`` (bf16), one forward + backward per task; -> per-case result."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vlscale.config import load_config
    from vlscale.modeling.vl_model import build_model
    from vlscale.profiling.measure import _trainer_loss, synthetic_batch

    base = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
            "model.vision_pretrained=null", "model.tokenizer=synthetic", "model.feature_source=images"]
    out = {}
    for name, overrides in METHOD_CASES.items():
        try:
            cfg = load_config(None, base + overrides)
            torch.manual_seed(0)
            model = build_model(cfg, vocab_size=64, device="cpu", dtype=torch.bfloat16).to(device)
            model.train()
            losses = {}
            for task in cfg.data.tasks:
                batch = synthetic_batch(cfg, 2, 64, device=device, dtype=torch.bfloat16, task=task)
                loss = _trainer_loss(model(batch), batch["labels"])
                loss.backward()
                losses[task] = round(float(loss.detach()), 4)
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            out[name] = {"ok": True, "losses": losses, "trainable_with_grad": sum(g is not None for g in grads),
                         "trainable": len(grads),
                         "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads if g is not None)}
        except Exception as e:  # noqa: BLE001 - one case's failure is recorded, the rest still run
            import traceback

            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                         "traceback": traceback.format_exc()[-1500:]}
    return out


def run_resume(out_dir: Path, timeout: float) -> dict:
    """``resume``: 6 steps straight; 3 steps, a stop, and --resume to 6, at ZeRO-3 bf16 with checkpoints."""
    extra = ["train.precision=bf16", "train.max_steps=6", "train.save_every=3", "train.eval_every=0"]
    t0 = time.perf_counter()
    straight = run_training("resume_straight", extra, out_dir, timeout)
    first = run_training("resume_split", extra, out_dir, timeout, flags=("--stop-after-steps", "3"))
    second = run_training("resume_split", extra, out_dir, max(1.0, timeout - (time.perf_counter() - t0)),
                          flags=("--resume",))
    res = {"straight": straight, "stopped": first, "resumed": second}
    if straight.get("losses") and second.get("losses"):
        a, b = straight["losses"][3:6], second["losses"][-3:]
        res["steps_4_6_straight"], res["steps_4_6_resumed"] = a, b
        res["max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b))
    return res


def run_read_ahead(out_dir: Path, timeout: float) -> dict:
    """``read_ahead``: train_bf16's run on made JPEGs, images read in the training thread and read ahead."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import read_ahead

    with tempfile.TemporaryDirectory(prefix="read_ahead_") as root:  # ~25 MB of JPEGs: not into $OUT
        read_ahead.make_vqa_root(Path(root), 256)
        base = [*TRAIN_RUNS["train_bf16"], "data.source=real", f"data.root={root}", "data.tasks=[vqa]"]
        sec = {"inline": run_training("read_ahead_inline", [*base, "data.read_ahead_threads=0"], out_dir,
                                      timeout / 2)}
        sec["ahead"] = run_training("read_ahead_default", base, out_dir, timeout / 2)
    inline, ahead = (sec[k].get("summary", {}).get("step_time_s") for k in ("inline", "ahead"))
    if inline and ahead:
        sec["ahead_over_inline_step_time"] = round(ahead / inline, 4)
    return sec


def run_profile_cli(extra: list[str], timeout: float, train_peak) -> dict:
    proc, res = _command([sys.executable, str(ROOT / "launchers/profile_memory.py"), "--measure", "--json",
                          "--steps", "3", "--deepspeed", str(ROOT / "ds_configs/zero3.json"), *COMMON, *extra],
                         timeout)
    if proc.returncode != 0:
        return res
    report = json.loads(proc.stdout)
    keys = ("params", "grads", "optimizer", "activations", "buffers", "peak")
    res["predicted"] = {k: report["predicted"].get(k) for k in keys + ("peak_phase",)}
    res["measured"] = {k: report["measured"].get(k) for k in keys + ("peak_phase", "device")}
    res["errors"] = report.get("errors")
    if train_peak:
        res["train_run_peak"] = train_peak
        res["predicted_over_train_run_peak"] = round(report["predicted"]["peak"] / train_peak, 4)
    return res


# most wanted first (a section is skipped when the budget left is short): issue 6's kernel figures,
# fp16 at ZeRO-3 and at stage 0, the profiler against the allocator, then the bf16 comparisons
SECTIONS = ("methods", "kernels", "cuda_tests", "train_fp16", "train_fp16_z0", "profiler", "profile_cli_fp16",
            "saved_by_op", "resume", "zero3_init", "train_bf16", "train_bf16_unfused", "full_ft_ckpt", "loop_syncs",
            "eval_gather", "read_ahead")
CUDA_TEST_FILES = ("tests/unit/test_kernels.py", "tests/unit/test_kernels_edge_cases.py")


def run_cuda_tests(timeout: float) -> dict:
    """pytest -k cuda over the kernel test files (their CUDA-only tests skip on a CPU): pass/fail/skip counts
    from pytest's summary line as ``tests_<outcome>`` (``skipped`` alone marks a section the budget skipped), and
    the output's tail where something failed."""
    import re
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                           *CUDA_TEST_FILES], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = {f"tests_{k}": int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    out = {"returncode": proc.returncode, **counts}
    if proc.returncode != 0:
        out["tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_suite"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in this order (default: all)")
    ap.add_argument("--smoke", action="store_true", help="2 steps of the tiny model (check the plumbing on CPU)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:  # a typo used to run every section before it and then stop on a KeyError
        ap.error(f"--sections {args.sections!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                 f"choose from {','.join(SECTIONS)}")
    if args.smoke:
        COMMON[:2] = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn"]
        for extra in TRAIN_RUNS.values():
            extra[:] = [e for e in extra if not e.startswith("train.max_steps")] + ["train.max_steps=2"]
        import torch

        if not torch.cuda.is_available():  # vlscale runs fp16 on a CPU only when asked (VLSCALE_CPU_FP16): the fp16
            os.environ.setdefault("VLSCALE_CPU_FP16", "1")  # sections' plumbing is checked too (launchers/train.py)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLSCALE_CACHE", "/tmp/vlscale_cache")
    t_start = time.perf_counter()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    runs_dir = out_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        results["device_error"] = repr(e)
    needs = {"train_fp16": 60, "train_fp16_z0": 40, "train_bf16": 45, "train_bf16_unfused": 45, "full_ft_ckpt": 40,
             "kernels": 120, "cuda_tests": 40, "profiler": 60,
             "profile_cli_fp16": 40, "saved_by_op": 30, "methods": 30, "resume": 75, "zero3_init": 30, "loop_syncs": 40,
             "eval_gather": 60, "read_ahead": 90}

    def save():
        (out_dir / "gpu_results.json").write_text(json.dumps(results, indent=1))

    for name in sections:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < needs.get(name, 30) * 0.6:
            results["sections"][name] = {"skipped": f"time budget: {left:.0f}s left"}
            continue
        t0 = time.perf_counter()
        try:
            if name in TRAIN_RUNS:
                results["sections"][name] = run_training(name, TRAIN_RUNS[name], runs_dir, timeout=left)
            elif name == "profile_cli_fp16":
                peak = results["sections"].get("train_fp16", {}).get("summary", {}).get("peak_memory_bytes")
                extra = [e for e in TRAIN_RUNS["train_fp16"] if not e.startswith("train.max_steps")]
                results["sections"][name] = run_profile_cli(extra, left, peak)
            elif name == "kernels":
                sys.path.insert(0, str(ROOT / "benchmarks"))
                import gpu_kernels_section

                sec: dict = {}
                gpu_kernels_section.run(sec)
                results["sections"][name] = sec.get("kernels", sec)
            elif name == "cuda_tests":
                results["sections"][name] = run_cuda_tests(left)
            elif name == "resume":
                results["sections"][name] = run_resume(runs_dir, left)
            elif name == "methods":
                import torch

                results["sections"][name] = run_methods("cuda" if torch.cuda.is_available() else "cpu")
            elif name == "zero3_init":
                results["sections"][name] = _json_command(
                    [sys.executable, str(ROOT / "benchmarks/zero3_random_init.py")], left)
            elif name == "loop_syncs":
                results["sections"][name] = _json_command(
                    [sys.executable, str(ROOT / "benchmarks/loop_overhead.py"), "--json", "--steps", "20"], left)
            elif name == "eval_gather":
                results["sections"][name] = _json_command(
                    [sys.executable, str(ROOT / "benchmarks/eval_gather.py"), "--json", "--nproc", "1", "--rounds", "2",
                     *COMMON, "train.precision=bf16"], left)
            elif name == "read_ahead":
                results["sections"][name] = run_read_ahead(runs_dir, left)
            elif name == "saved_by_op":
                results["sections"][name] = _json_command([sys.executable, str(ROOT / "benchmarks/saved_by_op.py")],
                                                          left)
            elif name == "profiler":  # in a process of its own: it initialises a process group on a fixed port
                code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from vlscale.profiling import measure; "
                        "sec = {}; measure.run_gpu_section(sec); print(json.dumps(sec, indent=1))")
                results["sections"][name] = _json_command([sys.executable, "-c", code, str(ROOT)], left)
            else:
                raise ValueError(f"section {name!r} is in SECTIONS but has no runner here")
        except Exception as e:  # noqa: BLE001 - one section's failure is recorded, the rest still run
            import traceback

            results["sections"][name] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
        results["sections"][name]["section_s"] = round(time.perf_counter() - t0, 1)
        save()
    fused, plain = (results["sections"].get(k, {}).get("summary", {}).get("step_time_s")
                    for k in ("train_bf16", "train_bf16_unfused"))
    if fused and plain:
        results["fused_over_unfused_step_time"] = round(fused / plain, 4)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps(results, indent=1)[-20000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
