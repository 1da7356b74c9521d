"""Evaluate a trained adapter on a split: batched generation, predictions, scores.

    python launchers/evaluate.py --adapter runs/default/adapter [--split val|test|STEM] [--out DIR] [key=value ...]
    python launchers/evaluate.py --adapter ... --split test --predict-only   (answers withheld: leaderboard files)
    torchrun --nproc_per_node N launchers/evaluate.py --adapter ...   (data-parallel replicas)
    deepspeed --num_gpus N launchers/evaluate.py --deepspeed ds_configs/zero3.json --adapter ...
                                    (ZeRO-3: the model sharded over the ranks, for one no device holds)

Rebuilds the model from the adapter's ``adapter_config.json`` (the whole run config; random-weight
backbones are rebuilt from its ``train.seed``, pretrained ones load from ``model.backbone_path`` or
the hub id), loads ``adapter_model.safetensors`` strictly (names and shapes), and runs the same
evaluation code as training's periodic evaluation (vlscale/engine/evaluation.py). Overrides apply
on top of the saved config (e.g. ``data.synthetic_eval=500``, ``train.eval_batch_size=64``,
``train.eval_max_examples=100``, ``data.root=...``); ones that change the model are refused, except
where the same frozen weights are found now (``model.backbone_path``, ``model.vision_pretrained``: the run's
files moved). The frozen weights built, moved or not, are checked against the fingerprint the run recorded (in
the adapter, else its checkpoint), as ``--resume`` does: files replaced since training are refused, naming them.

Writes ``DIR/predictions/<task>.jsonl`` (uid, prediction, references; the folder replaced once every task is
written, keeping the earlier set's other tasks: a Ctrl-C midway leaves the earlier set, a kill between the swap's
renames leaves it at ``predictions.old/``, put back by the next run) and ``DIR/eval_metrics.json``
(scores, examples scored per task, and the settings they come from: the data, the precision, whether
``--java-metrics`` scored the captions, the ZeRO stage (null without ``--deepspeed``) and the number of ranks; a
report there of the same adapter, split, step and settings keeps the tasks not evaluated now); ``DIR`` defaults
to ``<adapter's parent>/eval_<split>``. Prints the per-task scores. A ``DIR`` holding a training run's output or
``--predict-only``'s (and, for ``--predict-only``, an evaluation's) is refused before anything is built: its files
stay as they are (``output_clash``); so is a ``DIR`` another evaluation is writing (its lock, ``out_locked``).

``--deepspeed FILE`` builds the model as training does (ZeRO-3: under ``zero.Init``, the pretrained frozen
weights loaded shard by shard, so no rank materialises the whole model) and evaluates with synced-rank
generation, as training's own evaluation; the file's optimizer is not built, and its training-only keys (batch
sizes, clipping, optimizer) are not checked against the run, so the run's own file serves on any number of ranks.
The stage is the file's (``train.zero_stage=N`` here overrides it; the run's saved ``train.zero_stage`` does not).
ZeRO-1/2 shard only optimizer state and gradients: with such a file every rank holds the whole model, as without
``--deepspeed``. In bf16, ZeRO-3's linear layers (DeepSpeed's ``zero3_linear_wrap``: the bias added after the
matmul, one more rounding) make the logits differ slightly from the unsharded model's (about one bf16 step), as
training under ZeRO-3 computed them; in fp32 the predictions are identical. ``--java-metrics`` scores the caption
tasks as coco-caption does: CIDEr-D, BLEU-4 and ROUGE-L on its PTB tokenisation, plus METEOR (needs Java).
Without it they are on Python tokenisation (training's evaluation), which splits contractions, hyphens, decimals
and symbols differently, so CIDEr-D can differ there (vlscale/metrics/captioning.py).

``--predict-only`` (a split whose answers are withheld, for a leaderboard): its records are read without
requiring answers (every other check stays; without the flag such a split is refused, as training refuses it),
predicted as an evaluation predicts them, and not scored: ``DIR/predictions/<task>.jsonl`` as above and
``DIR/submission/`` in the leaderboards' formats (``vqa.json`` for EvalAI, ``gqa.json``, ``nlvr2.csv``,
``caption.json`` for the COCO server; VALUE's ``<task>/<task>_<split>_predictions.json[l]`` for the video tasks:
vlscale.engine.evaluation.write_submission; replaced once whole, as predictions/ is, keeping the files this
command does not write: other tasks', and another split's VALUE files, so ``--split val`` then ``--split test`` into
one DIR make VALUE's zip). No ``eval_metrics.json`` is written or changed; ``DIR`` defaults to
``<adapter's parent>/predict_<split>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vlscale.log import logs_to_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--adapter", required=True, type=os.path.expanduser,  # --adapter=~/x: no shell expands it there
                   help="an adapter/ directory written by launchers/train.py")
    p.add_argument("--split", default="val",
                   help="train, val or test; with real data also any file stem (docs/datasets.md: "
                        "--split minival reads vqa/minival.json; COCO captions: train, val, test only)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the adapter's tasks (default: all)")
    p.add_argument("--out", default=None, type=os.path.expanduser,  # --out=~/x: no shell expands it there
                   help="output directory (default: <adapter parent>/eval_<split>)")
    p.add_argument("--java-metrics", action="store_true",
                   help="caption tasks: CIDEr-D, BLEU-4 and ROUGE-L on coco-caption's PTB tokenisation, plus METEOR "
                        "(needs java on the PATH; default: Python tokenisation, no METEOR)")
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="shard the model over the ranks with this DeepSpeed file (ds_configs/zero3.json: each rank "
                        "holds 1/N of the parameters; its ZeRO stage, not the run's train.zero_stage); default: "
                        "every rank holds the whole model")
    p.add_argument("--predict-only", action="store_true",
                   help="a split whose answers are withheld (a leaderboard's test split): read it without answers, "
                        "predict, write predictions/ and each task's leaderboard file in submission/; "
                        "nothing is scored (default out: <adapter parent>/predict_<split>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    if args.predict_only and args.java_metrics:
        p.error("--java-metrics scores captions; --predict-only scores nothing: leave one of them out")
    return args


def java_metrics_problem() -> None:
    """--java-metrics needs Java and pycocoevalcap: refused before the model is built, not after decoding."""
    from vlscale.metrics.captioning import java_available

    if not java_available():
        raise RuntimeError("--java-metrics: no 'java' on the PATH (METEOR and the PTB tokenizer are Java "
                           "programs); install a JRE or leave the flag out")
    try:
        import pycocoevalcap.bleu.bleu  # noqa: F401
    except ImportError:
        raise RuntimeError("--java-metrics needs pycocoevalcap: pip install 'vlscale[metrics]'") from None


# Keys of a DeepSpeed file that only training reads (batch arithmetic, clipping, the optimizer and its off-load):
# evaluation builds no optimizer and takes no step, so they are neither filled in nor checked against the run
# config (a file holding the training run's concrete batch sizes also serves on another number of ranks).
TRAINING_ONLY_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping", "optimizer", "scheduler")


def evaluation_ds_config(ds_file: str, cfg, world_size: int, device_type: str, zero_stage_override=None) -> dict:
    """The DeepSpeed config evaluation runs under: ``ds_file`` resolved against the run config as training resolves
    it (precision, ZeRO block and bucket sizes), less :data:`TRAINING_ONLY_KEYS` and ``offload_optimizer``. The ZeRO
    stage is the file's: the run's ``train.zero_stage`` (how it trained, e.g. a scale preset's stage 1 with
    zero2.json) does not override the file asked for now; ``zero_stage_override`` (``train.zero_stage=N`` on
    evaluate's command line) does. ZeRO-Infinity's async_io op is checked before the model is built."""
    import dataclasses

    from vlscale.engine.deepspeed_config import build_deepspeed_config, check_nvme_support, load_ds_file, resolve_ds_file

    ds, source = load_ds_file(resolve_ds_file(ds_file))
    for key in TRAINING_ONLY_KEYS:
        ds.pop(key, None)
    if isinstance(ds.get("zero_optimization"), dict):
        ds["zero_optimization"].pop("offload_optimizer", None)
    # no batch arithmetic either: a global batch the training ranks divided need not divide these
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=zero_stage_override,
                                                             global_batch_size=None, gradient_accumulation_steps=1))
    ds = build_deepspeed_config(ds, cfg, world_size, device_type=device_type, source=source)
    ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    check_nvme_support(ds, source=source)
    return ds


def build_sharded(cfg, ds_config: dict, vocab_size: int, dtype):
    """-> (module, keep_alive, ZeRO stage): the model built as training builds it under ``ds_config``
    (:func:`vlscale.engine.trainer.build_model_for_run`), in a DeepSpeed engine without an optimizer (its ZeRO-3
    hooks gather each module's parameters for the forward pass). ZeRO-1/2 partition only optimizer state and
    gradients, which evaluation has none of: the model is built whole, as training builds it there, in an engine
    at stage 0 (DeepSpeed refuses stages 1-2 without an optimizer)."""
    import deepspeed

    from vlscale.engine.trainer import build_model_for_run, zero_stage

    stage = zero_stage(ds_config)
    if stage < 3:
        ds_config = dict(ds_config, zero_optimization={"stage": 0})
    model, hf_ds = build_model_for_run(cfg, ds_config, vocab_size, dtype)
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.module.eval()
    return engine.module, (engine, hf_ds), stage


def held_parameters(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the model): a ZeRO-3 parameter counts its partition."""
    held = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else n
    return held, total


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    from vlscale.engine.distributed import quiet_library_warnings

    quiet_library_warnings()
    import torch

    # --- setup
    from vlscale.engine.distributed import local_device_type

    rank, world, device = 0, 1, torch.device(local_device_type())  # DS_ACCELERATOR=cpu keeps it on the host
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.deepspeed:
        from vlscale.engine.distributed import init_distributed

        dist = init_distributed()
        rank, world, device = dist.rank, dist.world_size, dist.device
    try:
        code = evaluate_adapter(args, rank, world, device, dist)
    except OSError as e:  # a full disk, a quota, a file-size limit: it was a traceback after the generation
        from vlscale.engine.checkpoint import write_failure_reason
        from vlscale.files import disk_refused

        if not disk_refused(e):
            raise
        where = Path(e.filename or ".")
        # eval_metrics.json is written after predictions/ is replaced: the new predictions beside the earlier scores
        unmatched = (f"; {where.parent / 'predictions'} holds this evaluation's predictions, {where.name} is not "
                     "theirs (the earlier one, if any)" if where.name == "eval_metrics.json" else "")
        print(f"evaluate.py: rank {rank}: writing the evaluation's files failed "
              f"({write_failure_reason(e, where.parent)}){unmatched}; rerun the same command once it can write",
              file=sys.stderr)
        exit_after_error(1)  # other ranks may wait in a collective: not through the group's teardown
    if dist is not None:  # every rank leaves together: a group left to the interpreter's exit aborted a rank at
        from vlscale.engine.distributed import destroy  # times (gloo: "terminate called without an active exception")

        destroy()
    return code


def evaluate_adapter(args, rank: int, world: int, device, dist) -> int:
    from vlscale.config import parse_overrides
    from vlscale.data import check_split_found, eval_examples
    from vlscale.data.tasks import get_task
    from vlscale.engine.evaluation import (eval_settings, evaluate, format_predicted, format_scores,
                                           predictions_replaced_whole, write_eval_report)
    from vlscale.predict import (adapter_tokenizer, cache_changed_problem, inference_dtype, load_run_config,
                                 load_trained_model)

    cfg, meta = load_run_config(args.adapter, args.overrides, who="evaluate.py" if rank == 0 else None)
    changed = cache_changed_problem(cfg, meta)
    if changed:
        raise ValueError(changed)
    kind = "predict" if args.predict_only else "eval"
    out = Path(args.out) if args.out else Path(args.adapter).resolve().parent / f"{kind}_{args.split}"
    clash = output_clash(out, args.predict_only)
    if clash:
        raise ValueError(clash)
    with out_locked(out, writer=rank == 0):  # to the end: another evaluation into it is refused
        if args.no_progress:
            import transformers

            transformers.utils.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
        tasks = cfg.data.tasks if args.tasks is None else list(dict.fromkeys(t.strip() for t in args.tasks.split(",")
                                                                            if t.strip()))
        if not tasks:
            raise ValueError(f"--tasks {args.tasks!r} names no task; omit it for every task of the adapter "
                             f"({cfg.data.tasks})")
        unknown = [t for t in tasks if t not in cfg.data.tasks]
        if unknown:
            raise ValueError(f"--tasks {unknown} were not trained by this adapter (data.tasks={cfg.data.tasks})")
        if args.java_metrics and any(get_task(t).metric == "cider" for t in tasks):
            java_metrics_problem()
        check_split_found(cfg, tasks, args.split)  # every task's, before the model is built and the first is decoded
        examples = {}  # ... and its records and images (a bad one was found after the tasks before it were decoded),
        for task in tasks:  # read once: evaluate() takes them from here
            eval_examples(cfg, task, args.split, cfg.train.eval_max_examples, not args.predict_only, examples)
        tokenizer = adapter_tokenizer(cfg, meta)
        dtype, same_dtype = inference_dtype(cfg, device, "evaluate.py" if rank == 0 else None)
        stage, keep_alive = None, None  # the ZeRO stage the model runs under: None without DeepSpeed
        build = None
        if args.deepspeed:
            given = parse_overrides(args.overrides).get("train")
            override = cfg.train.zero_stage if isinstance(given, dict) and "zero_stage" in given else None
            ds_config = evaluation_ds_config(args.deepspeed, cfg, world, dist.device_type, override)

            def build():
                nonlocal keep_alive, stage
                model, keep_alive, stage = build_sharded(cfg, ds_config, meta["vocab_size"], dtype)
                return model
        model = load_trained_model(cfg, meta, args.adapter, device, dtype, same_dtype, build,
                                   collective=world > 1)
        if args.deepspeed and rank == 0:
            held, total = held_parameters(model)
            why = ("ZeRO-1/2 partition only optimizer state and gradients, which evaluation has none of: " if stage
                   else "")
            whole = "" if stage == 3 else f" ({why}every rank holds the whole model; a ZeRO-3 file shards it)"
            print(f"evaluate.py: ZeRO-{stage} over {world} rank(s): rank 0 holds {held:,} of the model's "
                  f"{total:,} parameters{whole}", flush=True)
        # --- evaluate
        # predictions/ and submission/ each replaced once whole: a Ctrl-C midway left one task's new submission
        # file beside another's of the earlier set
        with predictions_replaced_whole(out / "predictions", writer=rank == 0, keep_others=True) as partial, \
                (predictions_replaced_whole(out / "submission", writer=rank == 0, keep_others=True)
                 if args.predict_only else contextlib.nullcontext()) as submission:
            scores = evaluate(model, cfg, tokenizer, split=args.split, tasks=tasks, rank=rank, world_size=world,
                              device=device, float_dtype=dtype, show_progress=not args.no_progress,
                              predictions_dir=partial,
                              java_metrics=args.java_metrics, synced_gpus=world > 1 and stage == 3,
                              predict_only=args.predict_only, submission_dir=submission, memo=examples,
                              engine=keep_alive[0] if keep_alive else None)
            for done in scores.values() if args.predict_only else ():  # where each file is once renamed
                if done.get("submission"):
                    done["submission"] = out / "submission" / Path(done["submission"]).relative_to(submission)
        # --- report
        if rank == 0 and args.predict_only:
            print(f"{args.split} predictions ({args.adapter}, step {meta.get('step')}; not scored):")
            print(format_predicted(scores, out))
        elif rank == 0:
            write_eval_report(out, args.adapter, args.split, meta.get("step"), scores,
                              settings=eval_settings(cfg.to_dict(), java_metrics=args.java_metrics, zero_stage=stage,
                                                     world_size=world))
            print(f"{args.split} scores ({args.adapter}, step {meta.get('step')}):\n{format_scores(scores)}")
            print(f"predictions and eval_metrics.json in {out}")
        return 0


@contextlib.contextmanager
def out_locked(out: Path, writer: bool = True):
    """Holds ``out``'s lock (:func:`vlscale.engine.evaluation.out_lock`), or refuses naming who holds it: two
    evaluations writing one --out at once (the same adapter's default eval_<split>, two --tasks subsets side by side,
    train.test_eval's eval_test/) lost one's predictions or scores. ``writer``: rank 0."""
    from vlscale.engine.evaluation import out_lock

    with out_lock(out, "evaluate.py", writer) as holder:
        if holder:
            raise ValueError(f"--out {out} is being written by another process ({holder}); wait for it to end "
                             f"or choose another --out")
        yield


def output_clash(out: Path, predict_only: bool) -> str | None:
    """Why ``out`` must not (or cannot: a folder that cannot be made) take this command's ``predictions/``, or None.
    It refuses a training run's output_dir (its predictions/ belong to the metrics.json beside them) and the other
    mode's folder: ``--predict-only`` into an evaluation's (its eval_metrics.json would no longer match the
    predictions) and an evaluation into ``--predict-only``'s (its submission/ would no longer match them). The same
    mode again replaces its files, as a rerun should."""
    from vlscale.files import out_problem

    problem = out_problem(out)  # it was a traceback once the first task was decoded
    if problem:
        return problem
    for name in ("run_summary.json", "train_log.jsonl", "checkpoints"):
        if (out / name).exists():
            return (f"--out {out} holds a training run ({out / name}); its predictions/ belong to that run's "
                    f"metrics.json and would be overwritten: choose another --out")
    other = out / ("eval_metrics.json" if predict_only else "submission")
    if other.exists():
        mode, this = ("an evaluation", "--predict-only") if predict_only else ("--predict-only", "an evaluation")
        return (f"--out {out} holds the output of {mode} ({other}), which {this} would make stale by replacing "
                f"its predictions/: choose another --out")
    return None


def exit_after_error(code: int) -> None:
    """Leave after an error: with several ranks at once (``os._exit``), not through the process group's teardown,
    where a peer that is gone or still inside a collective can leave this rank hanging or aborting."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"evaluate.py: {type(e).__name__}: {e}", file=sys.stderr)
        exit_after_error(1)
