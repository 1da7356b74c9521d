"""Per-GPU memory of a run before spending GPU hours: predicted, measured, and a plan for a budget.

    python launchers/profile_memory.py --config NAME --world-size N [--zero-stage S] [--deepspeed FILE]
        [--budget SIZE] [--measure] [--json] [--plot FILE.png] [--write-config FILE] [key=value ...]

* default: the analytic prediction per rank (params, grads, optimizer, activations, buffers, peak)
  for the run config and its DeepSpeed file (the one launchers/train.py takes), and
  the disk a checkpoint takes (``checkpoints/`` per save and rank, ``adapter/``, output_dir's peak);
* ``--measure``: also run ``--steps`` real training steps (GPU when there is one, else DeepSpeed's
  CPU accelerator; several ranks through torchrun; under fp16 steps skipped for overflow do not
  count) and print measured beside predicted with the relative error of each component, and what
  the run's checkpoint wrote beside the disk prediction; refused up front when this machine's
  memory cannot hold it (every rank builds the whole model before DeepSpeed partitions it);
* ``--budget 24GiB``: search ZeRO stage, offload, checkpointing, micro-batch and precision for the
  fastest setting that fits (see vlscale/profiling/planner.py for what "fastest" assumes), print
  the ranked options; ``--write-config FILE`` writes the chosen DeepSpeed JSON and prints the
  overrides to pass to launchers/train.py;
* ``--json``: one JSON object ``{"predicted": {...}, "checkpoint": {...}, "measured": {...}, "errors": {...},
  "plan": [...]}`` (byte counts per rank; ``measured`` and ``plan`` only when asked for);
* ``--plot FILE.png``: stacked bars per component (predicted, measured, or the top plan options).

Exit status: 0 with the report, also when no setting fits ``--budget`` (the table says so; ``--json``:
``settings_fit`` is 0, and ``fit_hint`` the table's line of what would fit, else null); 1 when ``--write-config``
has no fitting setting to write; 2 for a bad argument, config or DeepSpeed file, or a --plot / --write-config file
that cannot be written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vlscale.config import ConfigError, load_config  # noqa: E402
from vlscale.log import logs_to_console  # noqa: E402

COMPONENTS = ("params", "grads", "optimizer", "activations", "buffers", "peak")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--config", default=None, help="preset name or YAML path (default: the embedded default)")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="override the DeepSpeed file's ZeRO stage (same as train.zero_stage=S)")
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed JSON (default, as launchers/train.py: the config's train.deepspeed, else "
                        "ds_configs/zero3.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="predict for GPU (default) or DeepSpeed's CPU accelerator (default with --measure on CPU)")
    p.add_argument("--budget", default=None, help="per-GPU memory budget, e.g. 24GiB or 80GB: run the planner")
    p.add_argument("--headroom", default=None, help="memory kept free by the planner (default 5%% + 0.5 GiB)")
    # '~' expanded: --write-config=~/ds.json (no shell expands it there) wrote ./~/ds.json and printed a command
    # whose --deepspeed ~/ds.json the shell reads as the home folder's, where no file was
    p.add_argument("--write-config", default=None, type=os.path.expanduser,
                   help="with --budget: write the chosen DeepSpeed JSON here")
    p.add_argument("--measure", action="store_true", help="also measure real training steps")
    p.add_argument("--steps", type=int, default=None, help="steps of the measured run (default 3; needs --measure)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", default=None, type=os.path.expanduser,
                   help="write stacked bars per component to this PNG (matplotlib)")
    p.add_argument("--top", type=int, default=None, help="with --budget: plan options to print / plot (default 15)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def check_args(args) -> str | None:
    """What is wrong with the command line's own values (the run config is checked by load_config)."""
    if args.steps is not None and not args.measure:
        return f"--steps={args.steps} is the length of the measured run; it needs --measure"
    args.steps = 3 if args.steps is None else args.steps
    for flag, value in (("--world-size", args.world_size), ("--steps", args.steps), ("--top", args.top)):
        if value is not None and value < 1:
            return f"{flag}={value} must be >= 1"
    if args.write_config and args.budget is None:
        return (f"--write-config {args.write_config} writes the setting the planner picks for a memory budget; "
                f"give --budget SIZE too (e.g. --budget 24GiB)")
    if args.top is not None and args.budget is None:
        return f"--top={args.top} is how many of the planner's settings to show; it needs --budget SIZE"
    if args.headroom is not None and args.budget is None:
        return f"--headroom {args.headroom} is what the planner keeps free within a budget; it needs --budget SIZE"
    args.top = 15 if args.top is None else args.top
    if args.plot is not None:  # before the prediction and any measured run, not at the end of them
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return f"--plot {args.plot} draws with matplotlib, which is not installed: pip install -e '.[plot]'"
        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(args.plot).suffix.lstrip(".").lower() not in kinds:
            return f"--plot {args.plot}: name a file matplotlib writes, ending in .{', .'.join(sorted(kinds))}"
    from vlscale.files import folder_problem

    for flag, path in (("--write-config", args.write_config), ("--plot", args.plot)):
        # before the plan and any measured run (was after them, and a file in the way read "File exists")
        problem = path is not None and ("a folder" if Path(path).is_dir() else folder_problem(Path(path).parent))
        if problem:
            return f"{flag} {path}: cannot write it ({problem})"
    from vlscale.config import parse_overrides

    given = (parse_overrides(args.overrides).get("train") or {}).get("zero_stage")
    if args.zero_stage is not None and given is not None and given != args.zero_stage:
        return f"--zero-stage {args.zero_stage} and train.zero_stage={given} disagree; give one of them"
    if args.measure:  # read by the measured run's ranks: a traceback from each of them there
        from vlscale.engine.deepspeed_config import cpu_fp16_enabled
        from vlscale.engine.distributed import dist_timeout_s
        from vlscale.kernels.adapter import env_backend

        try:
            dist_timeout_s(), env_backend(), cpu_fp16_enabled()
        except ValueError as e:
            return str(e)
    return None


def rel_errors(pred: dict, meas: dict) -> dict:
    return {k: (pred[k] - meas[k]) / meas[k] if meas.get(k) else None for k in COMPONENTS if k in meas}


def component_table(pred: dict, meas=None) -> str:
    from vlscale.profiling.analytic import fmt_bytes

    head = f"{'component':12s} {'predicted':>12}" + (f" {'measured':>12} {'error':>8}" if meas else "")
    lines = [head]
    for k in COMPONENTS:
        line = f"{k:12s} {fmt_bytes(pred[k]):>12}"
        if meas:
            m = meas.get(k)
            err = (pred[k] - m) / m if m else None
            line += f" {fmt_bytes(m) if m is not None else '-':>12} {f'{err:+.1%}' if err is not None else '-':>8}"
        lines.append(line)
    return "\n".join(lines)


def at_peak(components: dict, activations_at_peak, grads_at_peak) -> dict:
    """The components live at the peak moment (they add up to the peak), for stacked bars."""
    out = dict(components)
    if activations_at_peak is not None:
        out["activations"] = activations_at_peak
    if grads_at_peak is not None:
        out["grads"] = grads_at_peak
    return out


def plot(path: str, bars: dict) -> None:
    """``bars``: label -> components live at the peak; one stacked bar per label (the bar's top is the peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(bars)
    top = max(bars[lab].get("peak", 0) for lab in labels)
    unit, scale = ("GiB", 2 ** 30) if top >= 2 ** 30 else ("MiB", 2 ** 20)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 5))
    bottom = [0.0] * len(labels)
    for comp in COMPONENTS[:-1]:
        vals = [max(0, bars[lab].get(comp, 0)) / scale for lab in labels]
        ax.bar(range(len(labels)), vals, bottom=bottom, label=comp)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{unit} per rank at the peak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.json:
        return profile(args)
    # --json: the object alone on stdout; what DeepSpeed prints (its accelerator warning without a GPU) to stderr
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return profile(args, json_out=stdout)


def fitting_micro_batch(cfg, world_size: int):
    """The largest micro-batch up to ``train.micro_batch_size`` that keeps ``train.global_batch_size`` on
    ``world_size`` ranks (None: the ranks do not divide it)."""
    from vlscale.engine.deepspeed_config import micro_batch_sizes

    glob = cfg.train.global_batch_size
    if glob is None or glob % world_size:
        return None
    return micro_batch_sizes(glob // world_size, cfg.train.micro_batch_size)[0]


def profile(args, json_out=None) -> int:
    overrides = list(args.overrides)
    if args.zero_stage is not None:
        overrides.append(f"train.zero_stage={args.zero_stage}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from vlscale.engine.deepspeed_config import default_ds_file, resolve_batch

    batch_note = None
    try:  # train.global_batch_size: the accumulation on --world-size ranks, as the run derives it
        cfg = resolve_batch(cfg, args.world_size)
    except ConfigError as e:
        fit = fitting_micro_batch(cfg, args.world_size)
        if args.budget is None or fit is None:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # planning searches micro-batch sizes anyway: the prediction takes the largest that keeps the batch
        batch_note = (f"train.micro_batch_size={cfg.train.micro_batch_size} does not keep train.global_batch_size="
                      f"{cfg.train.global_batch_size} on {args.world_size} ranks; predicted for "
                      f"train.micro_batch_size={fit}, the largest that does (the plan searches the others)")
        cfg = resolve_batch(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=fit)),
                            args.world_size)
    from vlscale.profiling.analytic import (PREDICTED_NVME_PATH, estimate_checkpoint, estimate_memory, fmt_bytes,
                                            parse_size, resolve_ds_config)

    budget = headroom = None
    if args.budget is not None:  # before the prediction and any measured run ("": an unset variable, refused)
        sizes = {}
        for flag, text in (("--budget", args.budget), ("--headroom", args.headroom)):
            try:
                sizes[flag] = None if text is None else parse_size(text)
            except ValueError as e:
                print(f"error: {flag}: {e}", file=sys.stderr)
                return 2
        budget, headroom = sizes["--budget"], sizes["--headroom"]
        if budget <= 0:
            print(f"error: --budget={args.budget!r} must be a positive size, e.g. 24GiB", file=sys.stderr)
            return 2
        # "--budget 24" (or 2.4e1): 24 bytes; a unit is the letters the size ends in (the exponent's e is none)
        if budget < 2 ** 26 and not str(args.budget).strip()[-1:].isalpha():
            digits = str(args.budget).strip()  # "24" -> "e.g. 24GiB"; "1e6" or "0.5" -> the usual example
            example = f"{digits}GiB" if digits.isdigit() else "24GiB"
            print(f"error: --budget={args.budget!r} is {budget} bytes per GPU; give a unit, e.g. {example}",
                  file=sys.stderr)
            return 2
        if headroom is not None and headroom >= budget:
            print(f"error: --headroom {args.headroom} is not less than --budget {args.budget}: nothing could fit",
                  file=sys.stderr)
            return 2
    from vlscale.profiling.measure import measured_device_type

    measured_on = measured_device_type()
    if args.measure and args.device not in (None, measured_on):  # a prediction for one device, a run on the other
        print(f"error: --device {args.device} with --measure: the measured run trains on {measured_on} on this "
              f"machine, so its figures would be compared with a prediction for another device; drop --device "
              f"(or --measure)", file=sys.stderr)
        return 2
    if args.measure and measured_on == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if args.world_size > gpus:  # each rank takes GPU LOCAL_RANK: the others failed ("invalid device ordinal")
            print(f"error: --measure --world-size {args.world_size}: the measured run starts its ranks on this "
                  f"machine, one GPU each, and it has {gpus}; measure on {gpus} rank(s) or fewer, or without "
                  f"--measure predict for {args.world_size}", file=sys.stderr)
            return 2
    device = args.device or ("cpu" if args.measure and measured_on == "cpu" else "cuda")
    try:
        args.deepspeed = default_ds_file(cfg, args.deepspeed)  # the file launchers/train.py takes
        # an "auto" nvme_path (zero3_nvme.json): a prediction swaps nothing; the measured run needs VLSCALE_NVME_PATH
        ds = resolve_ds_config(cfg, args.world_size, args.deepspeed, device_type=device,
                               nvme_path=None if args.measure else PREDICTED_NVME_PATH)
        est = estimate_memory(cfg, args.world_size, ds, device=device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    disk = estimate_checkpoint(cfg, args.world_size, ds)
    out = {"config": cfg.name, "world_size": args.world_size, "predicted": est.to_dict(), "checkpoint": disk.to_dict()}
    if batch_note:
        out["note"] = batch_note
    bars = {"predicted": at_peak(est.components, est.at_peak["activations"], est.at_peak["grads"])}
    if args.measure:
        from vlscale.engine.deepspeed_config import check_nvme_support
        from vlscale.profiling.measure import available_host_bytes, measure_memory, measured_run_host_bytes

        try:  # as launchers/train.py, before any rank starts: ZeRO-Infinity without libaio
            check_nvme_support(ds)
        except ValueError as e:
            print(f"error: --measure: {args.deepspeed}: {e}", file=sys.stderr)
            return 2
        need, have = measured_run_host_bytes(est, args.world_size), available_host_bytes()
        if have is not None and need > have:
            print(f"error: --measure builds the whole model ({est.detail['total_params']:,} parameters) on each of "
                  f"the {args.world_size} rank(s) before DeepSpeed partitions it{' and trains on the CPU' if device == 'cpu' else ''}: "
                  f"about {fmt_bytes(need)} of host memory, and this machine has {fmt_bytes(have)} available. "
                  f"Measure a smaller backbone with the same method, or fewer ranks; without --measure the prediction needs no run.",
                  file=sys.stderr)
            return 2
        meas = measure_memory(cfg, args.world_size, ds, steps=args.steps)
        out["measured"] = meas
        out["errors"] = rel_errors(est.components, meas)
        bars["measured"] = at_peak({k: meas.get(k) or 0 for k in COMPONENTS}, meas.get("activations_at_peak"),
                                   meas.get("grads_at_peak"))
    options = None
    if budget is not None:
        from vlscale.profiling.planner import fit_hint, format_table, plan, write_ds_config

        # fp16 in bf16's place where the run asks for it (GPUs without bf16: V100, T4)
        precisions = ("fp16", "fp32") if cfg.train.precision == "fp16" else ("bf16", "fp32")
        options = plan(cfg, budget, args.world_size, ds_file=args.deepspeed, headroom=headroom, device=device,
                       precisions=precisions)
        out["plan"] = [o.to_dict() for o in options[: args.top]]
        out["budget"] = budget
        out["settings_searched"], out["settings_fit"] = len(options), sum(o.fits for o in options)
        out["fit_hint"] = fit_hint(options, budget) if not out["settings_fit"] else None  # the table's
        if args.write_config:
            best = next((o for o in options if o.fits), None)
            if best is None:
                print(f"error: no setting fits {fmt_bytes(budget)}; nothing written to {args.write_config} "
                      f"({fit_hint(options, budget)})", file=sys.stderr)
                return 1
            try:
                write_ds_config(best, args.write_config, ds_file=args.deepspeed)
            except OSError as e:
                print(f"error: --write-config {args.write_config}: cannot write it ({e.strerror or e})", file=sys.stderr)
                return 2
            # the command line's own overrides (the model, the PEFT method, ...) train too; the plan's replace theirs
            planned = {o.split("=", 1)[0] for o in best.overrides()}
            own = [o for o in args.overrides if o.split("=", 1)[0].strip() not in planned]
            # with train.global_batch_size the run derives the accumulation for the ranks it has: pinned here, the
            # command was refused on any other number of GPUs (a resume on fewer, the docs' case)
            kept = [o for o in best.overrides() if cfg.train.global_batch_size is None
                    or not o.startswith("train.gradient_accumulation_steps=")]
            out["written"] = {"deepspeed": args.write_config, "overrides": own + kept}
        bars = {o.label().replace(" offload=", "\noffload="): at_peak(o.estimate.components,
                                                                      o.estimate.at_peak["activations"],
                                                                      o.estimate.at_peak["grads"])
                for o in options[: args.top] if o.fits} or bars
    if args.plot:
        try:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            plot(args.plot, bars)
        except OSError as e:
            print(f"error: --plot {args.plot}: cannot write it ({e.strerror or e})", file=sys.stderr)
            return 2
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out, default=str), file=json_out)
        return 0
    s = est.settings
    if batch_note:
        print(f"note: {batch_note}")
    print(f"{cfg.name}: {s['backbone']} + {s['vision']}, peft={s['peft']}{' + full LM' if s['train_lm'] else ''}, "
          f"ZeRO-{s['zero_stage']}, {args.world_size} rank(s), {s['precision']}, micro-batch {s['micro_batch_size']}, "
          f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, device {device}")
    print(f"trainable {est.detail['trainable_params']:,} of {est.detail['total_params']:,} parameters; "
          f"encoder {s['encoder_length']} tokens, decoder {s['decoder_length']}")
    print(component_table(est.components, out.get("measured")))
    print(f"peak phase: {est.peak_phase}" + (f" (measured: {out['measured'].get('peak_phase')})"
                                             if args.measure else ""))
    if s["zero_stage"] == 3 and (args.world_size > 1 or est.detail["zero3_gathered_backward"]):
        from vlscale.profiling.analytic import ZeroSettings

        z = ZeroSettings.from_ds_config(ds, stage=3)
        d = est.detail
        print(f"ZeRO-3 gathered parameters per rank: {fmt_bytes(d['zero3_gathered'])} at the end of forward, "
              f"{fmt_bytes(d['zero3_gathered_backward'])} while backward runs the layers, "
              f"+{fmt_bytes(d['zero3_gather_transient'])} all-gather buffer mid-forward "
              f"(stage3_max_reuse_distance {z.max_reuse_distance:.3g}, stage3_prefetch_bucket_size "
              f"{z.prefetch_bucket_size:.3g}, stage3_max_live_parameters {z.max_live_parameters:.3g}, LM layers "
              f"gathered {'as units' if cfg.train.zero3_leaf_layers else 'module by module'}; docs/scaling.md)")
        policy = cfg.train.eval_gather
        whole, dec = fmt_bytes(d["eval_gathered"]), fmt_bytes(d["eval_gathered_decoder"])
        if policy in ("auto", "always"):
            print(f"evaluation: generating with the model gathered whole holds {whole} per rank beside the partitions"
                  f", its decoding parameters alone {dec} (train.eval_gather={policy}"
                  + (": the whole model where it fits in half of the memory free then, else the decoding parameters "
                     "around each batch's decoding, else ZeRO-3's per-module gathers" if policy == "auto" else "")
                  + "; docs/scaling.md)")
        elif policy == "decoder":
            print(f"evaluation: generating with the decoding parameters gathered around each batch's decoding holds "
                  f"{dec} per rank beside the partitions (train.eval_gather=decoder; docs/scaling.md)")
    if est.host or est.nvme:
        to_cpu = "cpu" in (s["offload_optimizer"], s["offload_param"])
        print(f"offloaded per rank: host {fmt_bytes(est.host)}, nvme {fmt_bytes(est.nvme)}"
              + (" (on the CPU accelerator the host is the device: what is offloaded to cpu is in the peak)"
                 if device == "cpu" and to_cpu else ""))
    infinity = est.detail["zero_infinity"]
    if infinity:
        print("ZeRO-Infinity host memory per rank: " + ", ".join(
            f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in infinity.items() if not k.endswith("_nvme"))
            + " (pools: offload_param.buffer_count x buffer_size, offload_optimizer.buffer_count x the largest "
              "sub-group; docs/scaling.md)")
    ranks = f", {fmt_bytes(max(disk.file_bytes))} from the largest rank" if args.world_size > 1 else ""
    print(f"disk: a checkpoint writes {fmt_bytes(disk.total)}{ranks}, adapter/ {fmt_bytes(disk.adapter)}; "
          f"output_dir holds up to {fmt_bytes(disk.peak_on_disk)} while saving ({disk.kept} kept + the one written)")
    if disk.universal:
        print(f"disk: a resume on another number of ranks first converts the checkpoint to DeepSpeed's universal "
              f"format: {fmt_bytes(disk.universal)} more while it loads")
    written = out.get("measured", {}).get("checkpoint_file_bytes_by_rank")
    if written:
        print(f"disk measured: the checkpoint wrote {fmt_bytes(sum(written))} (predicted {fmt_bytes(disk.total)}, "
              f"{(disk.total - sum(written)) / sum(written):+.1%}); per rank " + ", ".join(map(fmt_bytes, written)))
    if args.measure and out["measured"].get("skipped_steps"):
        print(f"measured: {out['measured']['skipped_steps']} step(s) overflowed and were skipped (fp16 loss scaling) "
              f"before the {args.steps} measured")
    if args.measure and out["measured"].get("rss_peak"):
        print(f"process peak RSS (rank max): {fmt_bytes(out['measured']['rss_peak'])}")
    if options is not None:
        print()
        print(format_table(options, out["budget"], args.top))
        if "written" in out:
            from vlscale.files import launcher_path

            print(f"wrote {args.write_config}; train with: deepspeed --num_gpus {args.world_size} "
                  f"{launcher_path('train.py')} --deepspeed {args.write_config} --config {args.config or 'default'} "
                  + " ".join(map(shlex.quote, out["written"]["overrides"])))
        elif out["settings_fit"]:  # a row's setting is no file ds_configs/ ships (zero2 with offload=opt_cpu ...)
            print("to train setting 1: add --write-config FILE.json (writes its DeepSpeed file and prints the "
                  "train command with its overrides)")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
