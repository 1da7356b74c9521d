"""The DeepSpeed training run: setup, the loop, logging, evaluation, checkpoints, the run summary.

``launchers/train.py`` reads ``setup_run -> train -> finish``; everything the loop needs is a named
function here. What one optimizer step does (k = train.gradient_accumulation_steps, W = world size):

    k micro-batches of one task (the multitask sampler draws the same task on every rank)
    N = all-reduce(number of target tokens in the global batch)
    per micro-batch: sum of token cross-entropies, backward of sum * W*k/N  (DeepSpeed divides by
        k and averages over W, so the gradient is that of the global per-token mean: runs on 1 and
        on W ranks see the same examples and give the same losses and updates)
    loss = all-reduce(sums) / N, read with the stop flag (and the gradient norm where DeepSpeed keeps none)
        in one host-device sync; a NaN/inf stops the run before the update
    DeepSpeed step: gradient clipping, AdamW over the trainable parameters only, LR schedule
        (linear warm-up over train.warmup_ratio of the steps, then linear decay)

Model building under ZeRO-3 (:func:`vlscale.engine.sharded_loading.build_model_zero3`): the
language model is built inside ``deepspeed.zero.Init``, so no rank ever holds it whole; pretrained
weights are read from the local safetensors rank by rank (each reads only its partition's rows);
random weights equal a whole build's from ``train.seed`` (so ``launchers/evaluate.py`` rebuilds the
very same frozen weights). Stages 0-2 build the model whole on every rank. Frozen parameters get no fp32 master copy, gradient or
Adam state: only ``requires_grad`` parameters are handed to the optimizer.

Half precision: ZeRO stage 0's fp16 / bf16 optimizer wrappers get the corrections of
:mod:`vlscale.engine.half_precision` (set up in :func:`setup_run`, applied in :func:`train_step`).

Files (rank 0): ``train_log.jsonl`` (per step: step, task, loss, lr, samples_per_s, grad_norm,
skipped, and under fp16 loss_scale; see :func:`log_step`),
``metrics.json`` (per evaluation), ``predictions/<task>.jsonl`` (the final evaluation's),
``run_summary.json`` (with :mod:`vlscale.provenance`'s record, as adapter/ has), ``run_config.yaml``, ``tensorboard/``,
``adapter/`` and ``checkpoints/`` (see :mod:`vlscale.engine.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vlscale import provenance
from vlscale.config import (ADAPTER_METHODS, ConfigError, RunConfig, config_from_dict, flat_settings, load_config,
                            save_config, torch_dtype)
from vlscale.engine import checkpoint as ckpt
from vlscale.engine.accounting import gradient_bytes, optimizer_state_bytes, parameter_bytes
from vlscale.engine.deepspeed_config import batch_as_given, check_nvme_support, resolve_batch, zero_stage
from vlscale.engine.distributed import (DistInfo, StopSignal, Watchdog, all_gather_object, all_reduce_sum,
                                        all_reduce_sum_, barrier, broadcast_object, precision_problem,
                                        watchdog_timeout_s)
from vlscale.engine.evaluation import (EvaluationInterrupted, eval_settings, evaluate, format_scores, out_lock,
                                       predictions_replaced_whole, to_device, write_eval_report)
from vlscale.engine.half_precision import stage0_corrections, unscaled_grad_norm
from vlscale.files import write_text_atomic

IGNORE_INDEX = -100
# run_summary's step_time_s is the median of the last STEP_TIMES_KEPT steps' times: each checkpoint's client state
# holds them, and a list of every step's grew with the run (1M steps: 21 MB of JSON per rank in each save, 2.3 s)
STEP_TIMES_KEPT = 10_000

# Keys that may change between a run and its resumption. Where the frozen weights load from may (the
# same files moved, another cache): the resume compares what it builds with the checkpoint's fingerprint.
# The micro-batch, accumulation and train.global_batch_size may, as long as ranks x micro-batch x accumulation (the
# global batch, and with it the data order) stays the checkpoint's: checkpoint.check_output_dir checks.
RESUMABLE_CHANGES = ("output_dir", "name", "description", "train.max_steps", "train.eval_every", "train.test_eval",
                     "train.log_every", "train.save_every", "train.eval_batch_size", "train.eval_max_examples",
                     "train.zero3_leaf_layers", "model.backbone_path", "model.vision_pretrained",
                     "train.micro_batch_size", "train.gradient_accumulation_steps", "train.global_batch_size",
                     "train.init_adapter",  # read at the run's start only: a resume continues the checkpoint
                     "data.read_ahead_threads")


class NonFiniteLoss(RuntimeError):
    """The loss of a step is NaN or infinite; the run stops before applying the update."""


class EvaluationLocked(ckpt.CheckpointError):
    """train.test_eval's eval_test/ is being written by another process (evaluate.py): the run, complete and
    checkpointed, stops before its test evaluation; --resume runs it again."""


class RunStopped(Exception):
    """The run stopped early on request (signal or --stop-after-steps) after writing a checkpoint."""

    def __init__(self, step: int, reason: str, signum: Optional[int] = None):
        super().__init__(f"stopped at step {step} ({reason})")
        self.step, self.reason, self.signum = step, reason, signum


@dataclass
class Run:
    cfg: RunConfig
    ds_config: dict
    dist: DistInfo
    tokenizer: Any
    engine: Any
    loader: Any
    out: Path
    dtype: torch.dtype
    step: int = 0
    watchdog: Optional[Watchdog] = None
    stop: Optional[StopSignal] = None
    writer: Any = None
    step_times: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    last_scores: dict = field(default_factory=dict)
    test_scores: dict = field(default_factory=dict)
    show_progress: bool = True
    hf_ds_config: Any = None  # keeps transformers' ZeRO-3 awareness alive while the run exists
    scale_loss: bool = False  # multiply the loss by the fp16 loss scale here (vlscale.engine.half_precision)
    loss_scale: Optional[float] = None  # fp16: the loss scale of the last step's backward
    grad_norm: Optional[float] = None  # the last step's, where DeepSpeed does not keep one (see train_step)
    frozen: dict = field(default_factory=dict)  # checkpoint.frozen_fingerprint: checkpoints hold no frozen weights
    feature_cache: Optional[dict] = None  # rank 0's features.cache_weights: the CLIP weights the run learned from
    lock: Any = None  # rank 0's lock on output_dir (checkpoint.lock_output_dir)
    trained_stats: Optional[list] = None  # sync_trained_buffers' tensors, found once
    trainable: Optional[list] = None  # _plain_grad_norm's parameters (the trainable ones, in module order), found once
    task_steps: Optional["TaskSteps"] = None  # per-task optimizer groups: only the step's task is updated
    lr_groups: dict = field(default_factory=lambda: {"lr": 0})  # train_log key -> the optimizer group it reads
    stoppable_evaluation: bool = False  # a stop request ends the evaluation running (checked per batch)
    interrupted_evaluation: Optional[dict] = None  # what a stop request ended (run_summary.json)
    stopped: Optional[dict] = None  # why the run stopped before it completed (stop_record; run_summary.json)
    provenance: Optional[list] = None  # rank 0's: vlscale.provenance's segments (run_summary.json, adapter/)
    eval_data: dict = field(default_factory=dict)  # the evaluated splits' examples, read once (eval_examples' memo)

    @property
    def model(self):
        return self.engine.module

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def global_batch(self) -> int:
        return int(self.ds_config["train_batch_size"])


# ----------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(total_steps: int, warmup_ratio: float):
    """Linear warm-up to 1 over ceil(warmup_ratio * total) steps, then linear decay towards 0.

    ``f(s)`` scales the learning rate of update ``s`` (0-based); no update runs at lr 0.
    """
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    return f


def optimizer_groups(model, tasks=(), peft_lr: Optional[float] = None) -> list[dict]:
    """Trainable parameters only: weight decay on matrices, none on biases / norms / vectors; each task's
    own PEFT weight sets (sharing multiple / half_shared) in groups of their own, tagged ``task``
    (:func:`vlscale.peft.trainable.optimizer_group_layout`), for :class:`TaskSteps`. ``peft_lr``
    (``train.peft_lr``): the PEFT weights in groups of their own at that learning rate, tagged ``peft``."""
    from vlscale.peft.trainable import optimizer_group_layout

    named = ckpt.trainable_parameters(model)
    layout = optimizer_group_layout([n for n, _ in named], [len(ckpt.full_shape(p)) for _, p in named], tasks,
                                    split_peft=peft_lr is not None)
    groups = []
    for task, decay, peft, idx in layout:
        group = {"params": [named[i][1] for i in idx]}
        if not decay:
            group["weight_decay"] = 0.0
        if task is not None:
            group["task"] = task
        if peft:
            group["lr"], group["peft"] = float(peft_lr), True
        groups.append(group)
    if not groups:
        raise ConfigError("the model has no trainable parameters (check peft.method and the peft.train_* flags)")
    return groups


NOTHING_TRAINS = ("peft.method=none adds no PEFT modules (nor peft.extra_prompts) and peft.train_layer_norms, "
                  "peft.train_projection, peft.train_lm and peft.train_vision are all false; choose a PEFT method or "
                  "set one of them true (or, on BART, peft.bias=all: its biases alone, BitFit)")


def check_something_trains(cfg: RunConfig) -> None:
    """Refuse a run that would train nothing, before data and model load (optimizer_groups checks the model)."""
    from vlscale.modeling.backbones import LM_REGISTRY, canonical_lm_name

    p = cfg.peft
    t5 = LM_REGISTRY[canonical_lm_name(cfg.model.backbone)]["model_type"] == "t5"  # no biases in its layers
    bitfit = p.bias == "all" and not t5
    if p.method == "none" and not (p.extra_prompts or p.train_layer_norms or p.train_projection or p.train_lm
                                   or p.train_vision or bitfit):
        why = "; peft.bias=all trains no bias of T5, whose layers have none" if p.bias == "all" else ""
        raise ConfigError(f"nothing to train: {NOTHING_TRAINS}{why}")


class TaskSteps:
    """Leaves the optimizer groups of the tasks a step does not train out of its update.

    The reference trainer (VL-Adapter's multitask.py: one task a batch, gradients set to None after
    each step, AdamW) gives another task's weight sets no gradient, so AdamW skips them: no update, no
    weight decay, their moments and step count unchanged. DeepSpeed gives them a zero gradient, and
    AdamW then moves them with their stale moments and decays them (benchmarks/task_param_steps.py:
    60 tiny steps, last-20 mean loss 6.03 against the reference's 6.59). Installed on the innermost
    torch optimizer (under DeepSpeed's ZeRO / mixed-precision wrappers, which step it a group at a
    time or all at once), it steps only the untagged groups and those of ``task``."""

    _wrapped_by_lr_sched = True  # it calls the step the LR scheduler wrapped: no "overridden" warning

    def __init__(self, optimizer):
        self.optimizer, self.task = optimizer, None
        self._step = optimizer.step
        optimizer.step = self

    @classmethod
    def install(cls, engine) -> "Optional[TaskSteps]":
        opt = engine.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, torch.optim.Optimizer) or not any("task" in g for g in opt.param_groups):
            return None
        return cls(opt)

    def __call__(self, *args, **kwargs):
        groups = self.optimizer.param_groups
        keep = [g for g in groups if g.get("task") in (None, self.task)]
        if len(keep) == len(groups):
            return self._step(*args, **kwargs)
        if not any(len(g["params"]) for g in keep):
            return None  # only other tasks' groups hold parameters now (ZeRO steps a group at a time)
        self.optimizer.param_groups = keep
        try:
            return self._step(*args, **kwargs)
        finally:
            self.optimizer.param_groups = groups


def build_model_for_run(cfg: RunConfig, ds_config: dict, vocab_size: int, dtype: torch.dtype):
    """-> (model, HfDeepSpeedConfig or None). See the module docstring for ZeRO-3 construction."""
    from vlscale.modeling.vl_model import build_model

    seed_everything(cfg.train.seed)
    if zero_stage(ds_config) == 3:
        from vlscale.engine.sharded_loading import build_model_zero3

        try:
            model, hf_ds, _ = build_model_zero3(cfg, ds_config, vocab_size, dtype)
        except ImportError as e:  # PackageNotFoundError is an ImportError
            if "accelerate" not in str(e):
                raise
            raise RuntimeError("building under ZeRO-3 goes through transformers' DeepSpeed integration, which "
                               "needs the 'accelerate' package: pip install 'accelerate>=1.1'") from e
        return model, hf_ds
    return build_model(cfg, vocab_size=vocab_size, device="cpu", dtype=dtype), None


def _check_resumable(saved: RunConfig, cfg: RunConfig, path: Path) -> None:
    """Refuse a --resume whose settings differ from the checkpointed run's (but RESUMABLE_CHANGES, and settings
    neither run reads: ``RunConfig.unread_settings``), naming the most telling difference first (the model, then
    the method, the data, the training) and how many more."""
    a, b = flat_settings(saved.to_dict()), flat_settings(cfg.to_dict())
    order = ("model.", "peft.", "data.", "train.")

    def rank(key: str) -> tuple:
        return next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order)), key

    unread = saved.unread_settings() & cfg.unread_settings()  # neither run reads them (peft.lora_rank, no LoRA)
    diff = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
                   and k not in unread), key=rank)
    if diff:
        k = diff[0]

        def shown(conf: RunConfig, flat: dict) -> str:
            if k == "train.lr" and flat.get(k) is None:
                return f"None (the method's default, {conf.lr:g})"
            return repr(flat.get(k))

        note = " (null: the --deepspeed file's stage)" if k == "train.zero_stage" else ""
        more = f"; {len(diff) - 1} more setting(s) differ: {diff[1:6]}" if len(diff) > 1 else ""
        # the --config and overrides of the run's start left out (a plain `--resume output_dir=...`): its own file
        own = Path(cfg.output_dir) / "run_config.yaml"
        own = f" (the run's own: --config {own} --resume)" if own.is_file() else ""
        raise ConfigError(f"--resume: {k}={shown(cfg, b)} differs from the checkpointed run's {k}={shown(saved, a)}"
                          f"{note} ({path}){more}; resume with the same settings{own} (only {list(RESUMABLE_CHANGES)} "
                          f"may change)")


def _note_new_schedule(saved: RunConfig, cfg: RunConfig, step: Optional[int]) -> None:
    """A --resume with another train.max_steps (to extend or shorten a run) recomputes the learning-rate
    schedule (warm-up, then linear decay to 0 at max_steps): say so, with the lr jump it makes."""
    old, new = saved.train.max_steps, cfg.train.max_steps
    if old == new or step is None:
        return
    if new <= step:
        print(f"vlscale: --resume with train.max_steps={new} (the run had {old}): the checkpoint is at step {step}, "
              f"so no step is left to train", flush=True)
        return
    lr, warm = cfg.lr, cfg.train.warmup_ratio
    before, after = lr * lr_multiplier(old, warm)(step), lr * lr_multiplier(new, warm)(step)
    print(f"vlscale: --resume with train.max_steps={new} (the run had {old}): the learning-rate schedule is "
          f"recomputed for {new} steps; the lr of step {step + 1} is {after:.3g} (it would have been {before:.3g})",
          flush=True)


def check_settings_early(out: Path, cfg: RunConfig) -> None:
    """``_check_resumable`` against the latest checkpoint's settings when they can be read, then that metrics.json
    reads (``read_metrics``); a checkpoint that cannot be read is left to ``check_output_dir``, which names what is
    wrong with it."""
    try:
        tag = ckpt.latest_tag(out / "checkpoints")
        if tag is None:
            return
        saved, source = saved_settings(out, tag)
    except (ckpt.CheckpointError, ValueError, OSError):
        return
    _check_resumable(saved, cfg, source)
    read_metrics(out)


def read_metrics(out: Path) -> list:
    """metrics.json's records ([] without one). It is written whole (atomically), so one that does not read was
    edited by hand: refused in one line naming it (it was a JSONDecodeError traceback after the model loaded),
    its records kept, not dropped as a torn train_log.jsonl line is."""
    path = out / "metrics.json"
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
        why = "not a list of records with a step"
        if isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
            return history
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        why = f"not JSON ({e})"
    raise ConfigError(f"{path} is {why}: vlscale writes it whole, so it was edited by hand; mend it, or move it "
                      f"away (the run then starts a new one)")


def saved_settings(out: Path, tag: str) -> tuple[RunConfig, Path]:
    """The settings of the run a ``--resume`` continues -> (RunConfig, the file they come from): those rank 0
    recorded in the checkpoint's client state, else ``run_config.yaml``, else ``adapter/adapter_config.json``
    (a checkpoint of an earlier vlscale). With none of them, changed settings could not be checked: refused."""
    client = out / "checkpoints" / tag / "client_state_rank0.json"
    yaml_file, adapter = out / "run_config.yaml", out / "adapter" / ckpt.ADAPTER_CONFIG
    recorded = ckpt.read_client_state(client).get("run_config")
    try:
        if recorded is not None:
            return config_from_dict(ckpt._from_jsonable(recorded)), client
        if yaml_file.is_file():
            return load_config(str(yaml_file)), yaml_file
        if adapter.is_file():
            return config_from_dict(ckpt.read_adapter_config(adapter.parent)["run_config"]), adapter
    except (ConfigError, ckpt.CheckpointError, OSError) as e:
        path = client if recorded is not None else yaml_file if yaml_file.is_file() else adapter
        raise ConfigError(f"--resume: the run's settings in {path} do not load ({e}); restore the file, or start "
                          f"a new run in another output_dir") from e
    raise ConfigError(f"--resume: {yaml_file} is missing, and neither {client} nor {adapter} records the run's "
                      f"settings, so changed settings cannot be checked against them; restore run_config.yaml "
                      f"(the run's settings, which vlscale writes at its start), or start a new run in another "
                      f"output_dir")


def _logged_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
        return None


def _truncate_logs(out: Path, step: int) -> None:
    """After a resume, drop log lines of steps past the checkpoint (they will be redone), and a line that is not a
    whole record: an append cut short (SIGKILL, a full disk) was a JSONDecodeError traceback after the model loaded."""
    log = out / "train_log.jsonl"
    if log.exists():
        torn, past = 0, []

        def kept():  # line by line: a multi-day run's log (1M steps: 170 MB) was held whole, ~4x its size
            nonlocal torn
            with open(log) as f:
                for ln in filter(str.strip, f):
                    s = _logged_step(ln)
                    if s is None:
                        torn += 1
                    elif s > step:
                        past.append(s)
                    else:
                        yield ln.rstrip("\n") + "\n"

        write_text_atomic(log, kept())
        if torn:
            print(f"vlscale: {log}: dropping {torn} line(s) that are not a whole record (a write cut short: the "
                  f"process killed, or a full disk)", flush=True)
        if past:  # a run killed (SIGKILL, a crash) after its last checkpoint: they vanished from the log unsaid
            print(f"vlscale: {log}: dropping step(s) {min(past)}-{max(past)}, logged after the checkpoint of step "
                  f"{step}; they are trained again", flush=True)
    metrics = out / "metrics.json"
    if metrics.exists():
        write_text_atomic(metrics, json.dumps([m for m in read_metrics(out) if m["step"] <= step], indent=1))


DISK_MARGIN = 1.05  # over the predicted checkpoint bytes (files within 3 % of the prediction)


def check_disk_space(cfg: RunConfig, ds_config: dict, world_size: int, vocab_size: int, out: Path,
                     resume: bool = False, universal: bool = False) -> None:
    """Refuse a run whose output_dir cannot hold its checkpoints, which would otherwise fail at its
    first save, possibly hours in. The need is the memory profiler's (``analytic.checkpoint_bytes``,
    as ``launchers/profile_memory.py`` prints it): up to ``kept + 1`` checkpoints at once (fewer when
    the run saves fewer times), or on ``--resume`` the one written next (and the universal copy when it
    resumes on another number of ranks: ``universal``), and ``adapter/`` twice while it is replaced."""
    import shutil

    from vlscale.profiling.analytic import estimate_checkpoint, fmt_bytes

    disk = estimate_checkpoint(cfg, world_size, ds_config, vocab_size=vocab_size)
    t = cfg.train
    saves = 1 + ((t.max_steps - 1) // t.save_every if t.save_every else 0)
    if resume:
        need = disk.total + (disk.universal if universal else 0)
        what = f"the next checkpoint {fmt_bytes(disk.total)}" + (
            f" and the universal copy a resume on another number of ranks converts it to, {fmt_bytes(disk.universal)}"
            if universal else "")
    else:
        held = min(saves, disk.kept + 1)
        need = held * disk.total
        what = f"{held} checkpoint(s) of {fmt_bytes(disk.total)} at once ({saves} save(s), {disk.kept} kept + the one written)"
    need += 2 * disk.adapter
    root = out
    while not root.exists() and root != root.parent:
        root = root.parent
    free = shutil.disk_usage(root).free
    if free < need * DISK_MARGIN:
        raise ckpt.CheckpointError(
            f"output_dir {str(out)!r}: {fmt_bytes(free)} free on its file system, and this run needs about "
            f"{fmt_bytes(need)} there: {what}, and adapter/ ({fmt_bytes(disk.adapter)}) twice while it is replaced "
            f"(launchers/profile_memory.py prints the same). Free space, choose another output_dir, or save less "
            f"often (train.save_every)")


def check_resumed_data(out: Path, tag: str, loader) -> None:
    """--resume: refuse a checkpoint whose run trained on other data (a task's size, the tasks' order) as soon
    as the loader is built, before the model is and DeepSpeed reads the checkpoint: the loader's sampler
    compares itself with the one rank 0's client state records (``MultitaskSampler.load_state_dict``, a
    DataError) on a copy, so the loader keeps its position until :func:`setup_run` restores it."""
    import copy

    saved = ckpt.read_client_state(out / "checkpoints" / tag / "client_state_rank0.json").get("loader") or {}
    if "sampler" not in saved:
        return  # no sampler recorded: the loader's own load_state_dict reports it after the checkpoint loads
    state = ckpt._from_jsonable(saved)
    copy.copy(loader.sampler).load_state_dict(dict(state["sampler"], position=state.get("step", 0)))


def check_resumed_cache(out: Path, tag: str, cfg: RunConfig) -> None:
    """--resume of a cache-trained run: refuse a ``data.feature_cache`` whose meta.json records other CLIP weights
    than the cache the run started on (the fingerprint rank 0's client state records: a cache re-extracted at the
    path between stop and resume trained on other features, silently). Read from meta.json, before the model is
    built; a checkpoint or cache without a fingerprint is not compared."""
    from vlscale.data.features import cache_changed
    from vlscale.data.real import DataError

    if tag is None:
        return  # nothing to resume from
    recorded = ckpt.read_client_state(out / "checkpoints" / tag / "client_state_rank0.json").get("feature_cache")
    problem = cache_changed(cfg, recorded, "resume with that cache (or one extracted with the same weights), or "
                                           "start a new run in another output_dir", who="vlscale: resume")
    if problem:
        raise DataError(f"resume: {problem}")


def check_cache_vision(cfg: RunConfig) -> Optional[dict]:
    """A cache-trained run: refuse a ``model.vision_pretrained`` that gives other CLIP weights than its
    ``data.feature_cache`` was extracted with (the fingerprint its meta.json records). The run trains on the
    cache's features, but records model.vision_pretrained as the CLIP its adapter's images are encoded with
    (:class:`vlscale.predict.Predictor`, which refuses the mismatch only then, after training); the loader compares
    the checkpoint's file name only (one of that name elsewhere, or replaced in place, passes). Checked where the
    weights build offline (a local file, the shipped ``synthetic`` ones, or null: random, seeded), by building the
    visual tower on the host (ViT-L-14: ~5 s); an open_clip tag is compared by name only (another of the model's
    tags than the cache's is refused; building it could need the network), a cache without a fingerprint not at all.
    Returns what it read of the cache (:func:`~vlscale.data.features.cache_weights`; None: the run encodes its
    images), which the run records, so meta.json is read once for both."""
    from vlscale.data.features import cache_encoder_problem, cache_weights
    from vlscale.modeling.vision import build_vision_encoder, check_tag_activation, is_tag

    vp = cfg.model.vision_pretrained
    cache = cache_weights(cfg)
    tag = is_tag(cfg.model.vision, vp)
    if cache and tag:  # the tower is not built here; its activation is checked as a build checks it
        check_tag_activation(cfg.model.vision, vp, then=f"; data.feature_cache={cache['folder']!r} holds features "
                                                         f"made by the tower named: extract them with the name given "
                                                         f"(launchers/extract_features.py)")
    if not (cache and cache["fingerprint"]):
        return cache
    if tag:  # an open_clip tag: building it may download
        import open_clip

        held, tags = cache.get("pretrained"), open_clip.list_pretrained_tags_by_model(cfg.model.vision)
        if vp in tags and held in tags and held != vp:  # two tags of one model: two sets of weights
            raise ConfigError(f"model.vision_pretrained={vp!r} names other {cfg.model.vision} weights than "
                              f"data.feature_cache={cache['folder']!r} was extracted with (pretrained={held!r}): the "
                              f"run would record CLIP weights its adapter never saw features of: set "
                              f"model.vision_pretrained={held!r}, or extract a cache with {vp!r} "
                              "(launchers/extract_features.py)")
        return cache
    problem = cache_encoder_problem(
        build_vision_encoder(cfg.model.vision, vp), cfg, cache,
        f"data.feature_cache={cache['folder']!r} was extracted with",
        "the run would record CLIP weights its adapter never saw features of: point model.vision_pretrained at the "
        "weights the cache was made with, or extract a cache with these (launchers/extract_features.py)")
    if problem:
        raise ConfigError(problem)
    return cache


def check_init_frozen(cfg: RunConfig, meta: dict, frozen: dict, announce: bool = True) -> None:
    """After a warm start's load (``train.init_adapter``; ``meta``: its adapter_config.json): refuse frozen weights
    built now (``frozen``: :func:`ckpt.frozen_fingerprint`, the same on every rank) that are not those the adapter was
    trained on, as evaluate.py refuses them; its weights were trained on those. Fingerprints are of a run's precision:
    an adapter of another ``train.precision`` is not compared, and (``announce``) a note says so and what the run
    starts from (a bf16 run's adapter holds bf16 tensors: an fp32 run starts from those bf16-rounded weights)."""
    then = ckpt.trained_with(meta, "train.precision")
    now = cfg.train.precision
    where = f"train.init_adapter={str(cfg.train.init_adapter)!r}"
    if then != now:
        if announce:
            held = f" (exact in {now})" if now == "fp32" else f", rounded to {now}"
            print(f"vlscale: note: {where} was trained with train.precision={then}, this run has {now}: it starts "
                  f"from the adapter's {then} weights{held}, and the frozen weights are not compared with the "
                  f"adapter's run's (its fingerprint is of {then})", flush=True)
        return
    problem = ckpt.frozen_mismatch(meta.get("frozen"), frozen, then="in the adapter's run")
    if problem:
        seed = ckpt.trained_with(meta, "train.seed")
        hint = (f"; random frozen weights are drawn from train.seed, which is {cfg.train.seed} here and was {seed} in "
                f"the adapter's run" if seed is not None and seed != cfg.train.seed else "")
        raise ckpt.CheckpointError(f"{where}: the frozen weights built now are not those the adapter was trained on: "
                                   f"{problem}{hint}; a warm start needs the adapter's frozen weights")


def _as_input_error(e: Exception) -> Exception:
    """A check's failure as the error it reports: ConfigError, DataError, CheckpointError as they are,
    any other ValueError as a CheckpointError (the checkpoint is what does not fit)."""
    from vlscale.data.real import DataError

    return e if isinstance(e, (ConfigError, DataError, ckpt.CheckpointError)) else ckpt.CheckpointError(str(e))


def import_model_code(cfg: RunConfig) -> None:
    """Import the modules the model's build runs: transformers' modelling of model.backbone's family, BART's or
    T5's (the class the build takes: :func:`~vlscale.modeling.backbones.lm_class`), open_clip when CLIP runs.
    :func:`setup_run` calls it on every rank before rank 0's checks, whose :func:`check_disk_space` builds the model
    on the meta device: the other ranks import while rank 0 checks, not after, in the build, where rank 0 waited
    for them (2 CPU ranks, the default: 2.5 s less to the first step, BART's and T5's imported then)."""
    from vlscale.modeling.backbones import lm_class, lm_config

    lm_class(lm_config(cfg.model.backbone))
    if cfg.model.feature_source == "images":
        import open_clip  # noqa: F401


def _raise_on_every_rank(error: Optional[Exception]) -> None:
    """Collective: rank 0's ``error`` (None: none) raised on every rank, as the class it is."""
    error = broadcast_object(error)
    if error:
        raise error


def setup_run(cfg: RunConfig, ds_config: dict, dist: DistInfo, *, resume: bool = False,
              show_progress: bool = True) -> Run:
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from vlscale.data import build_tokenizer, build_train_loader

    check_something_trains(cfg)
    problem = precision_problem(cfg.train.precision, dist.device)  # before the model's build, on every rank
    if problem:
        raise ConfigError(problem)
    cfg = resolve_batch(cfg, dist.world_size)  # a concrete accumulation for everything below (saved as given)
    out = Path(cfg.output_dir)
    tokenizer = build_tokenizer(cfg)
    # another number of ranks' ZeRO partitions: read through DeepSpeed's universal format
    universal = resume and zero_stage(ds_config) > 0 and ckpt.needs_universal(out, dist.world_size)
    import_model_code(cfg)
    error, lock, tag, eval_data, init, started_from = None, None, None, {}, None, None
    warm = bool(cfg.train.init_adapter) and not resume  # a --resume continues the checkpoint's weights
    if dist.is_main:
        try:
            lock = ckpt.lock_output_dir(out)  # held while this process lives: one run per output_dir
            if resume:  # another run's settings (another preset) first: its global batch would be the headline
                check_settings_early(out, cfg)
            tag = ckpt.check_output_dir(out, resume, dist.world_size, int(ds_config["train_batch_size"]),
                                        zero_stage(ds_config), verify=True)
            if resume:
                saved, source = saved_settings(out, tag)
                _check_resumable(saved, cfg, source)
                _note_new_schedule(saved, cfg, ckpt.step_number(tag) if tag else None)
                check_resumed_cache(out, tag, cfg)
            if warm:
                init = ckpt.check_init_adapter(cfg)
                # its fingerprint before the load, which refuses a weights file of another step than this config's
                started_from = provenance.init_adapter(cfg.train.init_adapter, init)
                note = ckpt.redeclared_tasks_note(cfg, init)
                if note:
                    print(f"vlscale: note: {note}", flush=True)
            check_disk_space(cfg, ds_config, dist.world_size, len(tokenizer), out, resume, universal)
            check_eval_data(cfg, eval_data)
        except (ckpt.CheckpointError, ValueError) as e:
            error = _as_input_error(e)
    _raise_on_every_rank(error)
    if warm:  # rank 0's read: every rank loads the weights of the step it names (load_adapter)
        init = broadcast_object(init)
    check_nvme_support(ds_config)  # launchers/train.py refuses it before start-up; this is for direct callers
    # the training data before the model: a bad file or id fails here, not after minutes of loading
    loader = build_train_loader(cfg, tokenizer, dist.rank, dist.world_size)
    error, feature_cache = None, None
    if dist.is_main:
        try:
            if resume:  # ... and other training data than the checkpoint's too (every rank loads the same examples)
                check_resumed_data(out, tag, loader)
            feature_cache = check_cache_vision(cfg)  # after the loader, which names a missing or malformed cache
        except (ckpt.CheckpointError, ValueError) as e:
            error = _as_input_error(e)
    _raise_on_every_rank(error)

    if not show_progress:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    dtype = torch_dtype(cfg.train.precision)
    if cfg.peft.fused and cfg.peft.method in ADAPTER_METHODS:  # fused_adapter's users
        from vlscale.kernels.adapter import check_requested_backend

        try:
            check_requested_backend(dist.device, dtype)
        except ValueError as e:  # the same on every rank: each refuses before the build
            raise ConfigError(str(e)) from None
    model, hf_ds = build_model_for_run(cfg, ds_config, len(tokenizer), dtype)
    if init is not None:  # before the engine: its fp32 copies (and ZeRO's partitions of them) are made from these
        ckpt.load_adapter(model, cfg.train.init_adapter, meta=init, collective=True,  # every rank reads it
                          tasks=list(cfg.data.tasks))  # the run's tasks: a subset of the adapter's leaves the rest
    if universal:
        ds_config = dict(ds_config, checkpoint=dict(ds_config.get("checkpoint") or {}, load_universal=True))
    schedule = lr_multiplier(cfg.train.max_steps, cfg.train.warmup_ratio)
    groups = optimizer_groups(model, cfg.data.tasks, cfg.train.peft_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           lr_scheduler=lambda opt: LambdaLR(opt, schedule))
    task_steps = TaskSteps.install(engine)
    engine.train()  # from_pretrained returns modules in eval mode: dropout must be on (VLModel keeps CLIP in eval)
    scale_loss = stage0_corrections(engine, cfg.train.precision)
    run = Run(cfg, ds_config, dist, tokenizer, engine, loader, out, dtype, show_progress=show_progress,
              hf_ds_config=hf_ds, scale_loss=scale_loss, frozen=ckpt.frozen_fingerprint(engine.module, dist.device),
              lock=lock, task_steps=task_steps, lr_groups=logged_lr_groups(groups), feature_cache=feature_cache,
              eval_data=eval_data)
    if init is not None:
        check_init_frozen(cfg, init, run.frozen, announce=run.is_main)
    if resume:
        _check_task_groups(out, task_steps is not None)
        state = ckpt.load_checkpoint(engine, out, dist.rank, dist.world_size, frozen=run.frozen,
                                     quiet=not show_progress)
        run.loader.load_state_dict(state["loader"])
        run.step = int(state["step"])
        if run.is_main and run.step < cfg.train.max_steps:
            print(f"vlscale: resuming at step {run.step} of {cfg.train.max_steps} from "
                  f"{out / 'checkpoints' / str(ckpt.latest_tag(out / 'checkpoints'))}", flush=True)
        if int(state.get("world_size") or dist.world_size) == dist.world_size:  # another number of ranks: another
            run.step_times = list(state.get("step_times", []))  # step time; run_summary's median is of this one's
    devices = all_gather_object(provenance.device_name(dist.device))
    if run.is_main:
        segment = provenance.provenance(cfg, dist, devices, started_from)
        earlier = (ckpt.read_client_state(out / "checkpoints" / tag / "client_state_rank0.json").get("provenance")
                   if resume and tag else None)
        run.provenance = provenance.with_resumed(earlier, segment, run.step) if resume else [segment]
        out.mkdir(parents=True, exist_ok=True)
        save_config(batch_as_given(cfg), out / "run_config.yaml")
        if resume:
            _truncate_logs(out, run.step)
        else:
            for name in ("train_log.jsonl", "metrics.json", "run_summary.json"):
                (out / name).unlink(missing_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        quiet_tensorboard_thread_failures()
        run.writer = SummaryWriter(str(out / "tensorboard"), purge_step=run.step + 1 if resume else None)
    barrier()
    run.stop = StopSignal(announce=run.is_main).install()
    run.watchdog = Watchdog(watchdog_timeout_s(), dist.rank).start()
    return run


# ----------------------------------------------------------------------------- one step

def _token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def _example_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The sum over examples of each example's mean token cross-entropy (an example without target
    tokens adds 0, as the reference's ``clamp(min=1)`` makes it), each times its weight when given
    (``data.vqa_targets=sampled``: the answer's soft score)."""
    tokens = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    per_example = tokens.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    if weights is not None:
        per_example = per_example * weights.to(per_example)
    return per_example.sum()


def _loss_terms(batch: dict, reduction: str) -> int:
    """What the step's loss is a mean over, in this micro-batch: target tokens, or examples."""
    return int(batch["labels"].shape[0]) if reduction == "example" else int((batch["labels"] != IGNORE_INDEX).sum())


def train_step(run: Run, batches: list[dict]) -> tuple[float, bool]:
    """Forward/backward the step's micro-batches, check the loss, update. -> (mean loss, stop requested)."""
    engine, k, world = run.engine, len(batches), run.dist.world_size
    task = batches[0]["task"]
    if any(b["task"] != task for b in batches):
        raise RuntimeError(f"step {run.step + 1}: the micro-batches of one step mix tasks "
                           f"{sorted({b['task'] for b in batches})}; the loader must keep one task per step")
    reduction = run.cfg.train.loss_reduction
    (n_terms,) = all_reduce_sum([sum(_loss_terms(b, reduction) for b in batches)], run.dist.device)
    scale = world * k / max(n_terms, 1.0)
    # what the step reads back, in one sync: the loss's sum and the stop flag (summed over the ranks), and the
    # gradient norm where DeepSpeed keeps none
    reads = torch.zeros(3, dtype=torch.float64, device=run.dist.device)
    loss_sum = reads[0]
    run.loss_scale = float(engine.optimizer.loss_scale) if run.cfg.train.precision == "fp16" else None
    if run.scale_loss:
        scale *= run.loss_scale
    for i, batch in enumerate(batches):
        weights = batch.get("loss_weights")  # fp32, not cast to the run's precision with the batch
        batch = to_device({k: v for k, v in batch.items() if k != "loss_weights"}, run.dist.device, run.dtype)
        out = engine(batch)
        ce = (_example_cross_entropy_sum(out.logits, batch["labels"], weights) if reduction == "example"
              else _token_cross_entropy_sum(out.logits, batch["labels"]))  # weights come with "example" only
        engine.backward(ce * scale)
        loss_sum += ce.detach().double()
        if i < k - 1:
            engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
    reads[1] = float(run.stop.requested)
    all_reduce_sum_(reads[:2])
    norm = None if hasattr(engine.optimizer, "_global_grad_norm") else _plain_grad_norm(run)
    if norm is not None:
        reads[2] = norm
    total, stop, read_norm = reads.tolist()
    loss = total / max(n_terms, 1.0)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at step {run.step + 1} (task {task!r}); stopping before the update; "
                            f"{_last_good(run)}")
    if not run.memory:
        run.memory["grad_bytes_per_rank"] = gradient_bytes(engine, run.stage)
    run.grad_norm = None if norm is None else read_norm
    if run.task_steps is not None:
        run.task_steps.task = task
    engine.step()
    return loss, stop > 0


def _last_good(run: Run) -> str:
    """What a diverged run leaves: its last checkpoint, and what to change."""
    tag = ckpt.latest_tag(run.out / "checkpoints") if (run.out / "checkpoints").exists() else None
    keep = (f"the last good checkpoint is {run.out / 'checkpoints' / tag} (--resume continues from it with the "
            "same settings; a run that diverges needs a lower train.lr, a new run in another output_dir)"
            ) if tag else "no checkpoint had been written yet"
    if run.cfg.train.precision == "fp16":  # loss scaling protects the gradients, not the forward pass
        keep += "; under fp16 the forward pass itself can overflow: train.precision=bf16 or fp32 cannot"
    return keep


def _plain_grad_norm(run: Run) -> Optional[torch.Tensor]:
    """The gradient norm under a plain torch optimizer (ZeRO stage 0 in fp32), where DeepSpeed computes
    it only to clip and drops it, as a tensor on the device (read with the loss). Taken before the step:
    averaged over ranks, not yet clipped, as DeepSpeed's own optimizers report theirs. The trainable set
    does not change during a run: the model is walked for it once, not every step."""
    if run.trainable is None:
        run.trainable = [p for _, p in ckpt.trainable_parameters(run.model)]
    grads = [p.grad for p in run.trainable if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


# ----------------------------------------------------------------------------- the loop

def train(run: Run, stop_after_steps: Optional[int] = None) -> dict:
    """Train to ``train.max_steps`` (from ``run.step``), evaluating and checkpointing on schedule.

    Returns the final evaluation's scores. Raises :class:`RunStopped` after writing a checkpoint
    when a stop was requested (Ctrl-C/SIGTERM on any rank, or ``stop_after_steps``); during the final
    evaluation (the last step checkpointed) at its next batch, recorded in ``run.interrupted_evaluation``.
    A resumed run whose steps were all done skips the save it already has and evaluates.
    """
    from vlscale.log import progress_bar

    t = run.cfg.train
    bar = progress_bar(total=t.max_steps, initial=run.step, desc="train", dynamic_ncols=True,
                       disable=not (run.is_main and run.show_progress))
    first_step = run.step
    try:
        while run.step < t.max_steps:
            start = time.perf_counter()
            batches = [next(run.loader) for _ in range(t.gradient_accumulation_steps)]
            lrs = run.engine.get_lr()
            lr = {key: None if i is None else lrs[i] for key, i in run.lr_groups.items()}
            loss, stop = train_step(run, batches)
            sync_trained_buffers(run)
            run.step += 1
            run.step_times.append(time.perf_counter() - start)
            del run.step_times[:-STEP_TIMES_KEPT]
            run.watchdog.beat(f"step {run.step}")
            log_step(run, batches[0]["task"], loss, lr, bar)
            evaluated = t.eval_every and run.step % t.eval_every == 0 and run.step < t.max_steps
            if evaluated:
                run.stoppable_evaluation = True
                try:
                    run_evaluation(run)
                except EvaluationInterrupted as e:  # Ctrl-C/SIGTERM mid-evaluation: checkpoint the step and stop
                    run.last_scores = {}  # an earlier step's are no final scores (finish, run_summary.json)
                    save_training_state(run)
                    bar.close()
                    agree_on_signal(run)
                    raise RunStopped(run.step, f"{signal_name(run.stop.signum)} during the evaluation at step "
                                               f"{run.step} ({e}); step {run.step} is checkpointed, and --resume "
                                               f"continues training without that evaluation", run.stop.signum) from None
                finally:
                    run.stoppable_evaluation = False
            saved = t.save_every and run.step % t.save_every == 0 and run.step < t.max_steps
            if saved:
                save_training_state(run)
            # a signal during that save or evaluation stops at this step: it had a step trained and saved again first
            stop = stop or (saved or evaluated) and all_reduce_sum([float(run.stop.requested)], run.dist.device)[0] > 0
            if stop or run.step == stop_after_steps:
                if not evaluated:  # they were an earlier step's, printed as "final scores (val, step <this one>)"
                    run.last_scores = {}
                if not saved:
                    save_training_state(run)
                bar.close()
                raise RunStopped(run.step, "signal" if stop else "--stop-after-steps", agree_on_signal(run))
    finally:
        close = getattr(run.loader, "close", None)  # a TrainLoader's threads reading images ahead
        if close is not None:
            close()
    bar.close()
    if run.step > first_step or not _saved_at_this_step(run):
        save_training_state(run)
    elif run.is_main:
        print(f"vlscale: the run's {run.step} steps are trained and checkpointed; running its final evaluation",
              flush=True)
    # The training is complete and checkpointed: a stop request (Ctrl-C, SIGTERM) now ends the evaluations
    # at the next batch, and a --resume runs them again.
    run.stoppable_evaluation = True
    try:
        scores = run_evaluation(run, final=True)
        if t.test_eval:
            run_test_evaluation(run)
    except EvaluationInterrupted as e:
        run.interrupted_evaluation = {"step": run.step, "split": e.split, "task": e.task, "batches_done": e.done,
                                      "batches": e.total}
        if e.split == "val":
            run.last_scores = {}  # not the final evaluation's: there is none
        name = signal_name(agree_on_signal(run))
        raise RunStopped(run.step, f"{name} during the final evaluation ({e}); the training is complete and "
                                   f"checkpointed, and --resume runs the final evaluation again",
                         run.stop.signum) from None
    finally:
        run.stoppable_evaluation = False
    return scores


def agree_on_signal(run: Run) -> Optional[int]:
    """Collective: the signal that stopped the run (the lowest rank's that received one; None: none did), set
    as every rank's ``run.stop.signum``. A stop request reaches the other ranks as the all-reduced flag alone:
    with SIGTERM sent to one rank's pid, that rank exited 143 while the others took signum None for a clean
    exit 0 into the process group's teardown, and failed there on the exited rank ("Connection reset by peer")."""
    signum = next((s for s in all_gather_object(run.stop.signum) if s is not None), None)
    run.stop.signum = signum
    return signum


def signal_name(signum: Optional[int]) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return "a stop request"


def _saved_at_this_step(run: Run) -> bool:
    """Whether the checkpoint and adapter/ of ``run.step`` are written (a --resume of a run whose steps were
    all done: its final evaluation was interrupted, or it is evaluated again). Rank 0's answer, on every rank."""
    saved = False
    if run.is_main:
        try:
            saved = (ckpt.latest_tag(run.out / "checkpoints") == f"step{run.step}"
                     and ckpt.read_adapter_config(run.out / "adapter").get("step") == run.step)
        except ckpt.CheckpointError:
            saved = False
    return bool(broadcast_object(saved))


def logged_lr_groups(groups: list[dict]) -> dict:
    """Which optimizer group's learning rate ``train_log.jsonl`` records: ``lr`` (train.lr's groups; None
    where only PEFT weights train and train.peft_lr is set) and, with train.peft_lr, ``peft_lr``."""
    base = next((i for i, g in enumerate(groups) if not g.get("peft")), None)
    peft = next((i for i, g in enumerate(groups) if g.get("peft")), None)
    return {"lr": base} if peft is None else {"lr": base, "peft_lr": peft}


def log_step(run: Run, task: str, loss: float, lr: dict, bar) -> None:
    """One ``train_log.jsonl`` line (strict JSON), the bar's postfix and the TensorBoard scalars.

    ``lr``: the learning rate of this step's update, ``{"lr": x}`` (and ``"peft_lr"``, :func:`logged_lr_groups`).

    ``skipped``: the update was dropped because the gradients overflowed (fp16's dynamic loss
    scaling; DeepSpeed then lowers the scale, after ``fp16.hysteresis`` overflows in a row at ZeRO
    stages 1-3, and does not advance the schedule); ``grad_norm`` (unscaled) is null there.
    ``loss_scale`` (fp16 only): the scale this step's backward used.
    """
    engine = run.engine
    skipped = not engine.was_step_applied()
    if skipped:
        grad_norm = None
    elif run.grad_norm is not None:
        grad_norm = run.grad_norm
    else:
        grad_norm = unscaled_grad_norm(engine, run.loss_scale)
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteLoss(f"the gradient norm is {grad_norm} at step {run.step} (task {task!r}) while the loss is "
                            f"{loss:.4g}; the update was applied, so the weights may no longer be finite; "
                            f"{_last_good(run)}")
    record = {"step": run.step, "task": task, "loss": loss, **lr,
              "samples_per_s": run.global_batch / run.step_times[-1], "grad_norm": grad_norm,
              "skipped": skipped}
    if run.loss_scale is not None:
        record["loss_scale"] = run.loss_scale
    if not run.is_main:
        return
    log = run.out / "train_log.jsonl"
    try:
        with open(log, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
    except OSError as e:  # a full disk: the write's error names no file
        e.filename = e.filename or str(log)
        raise
    bar.update(1)
    postfix = {"task": task, "loss": f"{loss:.4f}", "samples_s": f"{record['samples_per_s']:.1f}"}
    if "loss_scale" in record:
        postfix["scale"] = f"{record['loss_scale']:g}"
    bar.set_postfix(**postfix)
    if run.writer is not None and run.step % max(1, run.cfg.train.log_every) == 0:
        for key in ("loss", "lr", "peft_lr", "samples_per_s", "grad_norm", "loss_scale"):
            if record.get(key) is not None:
                run.writer.add_scalar(f"train/{key}", record[key], run.step)
        run.writer.add_scalar(f"train/loss_{task}", loss, run.step)


def check_eval_data(cfg: RunConfig, memo: Optional[dict] = None) -> None:
    """Every task's validation split (and test split with ``train.test_eval``) loads, holds examples,
    and has every visual id it names, before training (``vlscale.data.eval_examples``): a missing or
    empty file would otherwise show at the first evaluation, possibly at the end of the run. The
    synthetic world's images cannot be missing. ``memo`` keeps what was read for the evaluations."""
    from vlscale.data import eval_examples

    if cfg.data.source == "synthetic" and cfg.model.feature_source == "images":
        return
    for split in ("val", "test") if cfg.train.test_eval else ("val",):
        for task in cfg.data.tasks:
            eval_examples(cfg, task, split, cfg.train.eval_max_examples, memo=memo)


def _check_task_groups(out: Path, task_groups: bool) -> None:
    """A checkpoint of a run with per-task weights written before each task's weights had optimizer
    groups of their own (no ``task_groups`` in its client state) holds 2 groups' optimizer state where
    this run has more: refused here, naming it, instead of inside DeepSpeed's optimizer load."""
    tag = ckpt.latest_tag(out / "checkpoints")
    saved = ckpt.read_client_state(out / "checkpoints" / tag / "client_state_rank0.json").get("task_groups")
    if task_groups and saved is None:
        raise ckpt.CheckpointError(
            f"{out / 'checkpoints' / tag} was written by a vlscale that stepped every task's weights in every step "
            f"(before per-task optimizer groups, 2026-12-02): its optimizer state does not fit this run's groups. "
            f"Finish it with that version, or start a new run in another output_dir")


def sync_trained_buffers(run: Run) -> None:
    """Average the running statistics that training changes (a trained CLIP ResNet's batch norms) over
    the ranks, in one collective. DeepSpeed syncs no buffers: each rank's followed its own batches, so
    ranks evaluated with different statistics and adapter/ kept rank 0's. After every step, so a run's
    statistics do not depend on where it stopped and resumed."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if run.dist.world_size < 2:
        return
    if run.trained_stats is None:  # num_batches_tracked is the same count on every rank
        run.trained_stats = [b for _, b in ckpt.trained_buffers(run.model) if b.is_floating_point()]
    stats = run.trained_stats
    if not stats:
        return
    flat = _flatten_dense_tensors([b.data for b in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(run.dist.world_size)
    for b, avg in zip(stats, _unflatten_dense_tensors(flat, [b.data for b in stats])):
        b.data.copy_(avg)


def _evaluate(run: Run, split: str, predictions_dir: Optional[Path]) -> dict:
    """Scores of ``split``; with ``predictions_dir``, its files replace what is there only once every task is written
    (:func:`vlscale.engine.evaluation.predictions_replaced_whole`): a stop midway keeps the last whole set, of one
    step, where it mixed another step's files (a finished run extended) with this one's, or cleared a whole set."""
    import contextlib

    synced = run.dist.world_size > 1 and run.stage == 3
    should_stop = (lambda: all_reduce_sum([float(run.stop.requested)], run.dist.device)[0] > 0
                   ) if run.stoppable_evaluation and run.stop is not None else None
    with contextlib.nullcontext() if predictions_dir is None else \
            predictions_replaced_whole(predictions_dir, writer=run.dist.rank == 0) as partial:
        return evaluate(run.model, run.cfg, run.tokenizer, split=split, rank=run.dist.rank,
                        world_size=run.dist.world_size, device=run.dist.device, float_dtype=run.dtype,
                        synced_gpus=synced, show_progress=run.show_progress, heartbeat=run.watchdog.beat,
                        predictions_dir=partial, should_stop=should_stop, memo=run.eval_data, engine=run.engine)


def run_test_evaluation(run: Run) -> dict:
    """``train.test_eval``: the test split into eval_test/, as launchers/evaluate.py --split test writes it
    (the same evaluation code on the trained model, without a second process rebuilding it). The report records
    this run's settings, not adapter/'s: a --resume of a finished run does not write adapter/ again, and may
    change train.eval_max_examples."""
    out = run.out / "eval_test"
    with out_lock(out, "train.py's train.test_eval", writer=run.is_main) as holder:  # as evaluate.py's --out
        holder = broadcast_object(holder)
        if holder:  # every rank stops here: the evaluation is collective
            raise EvaluationLocked(
                f"{out} is being written by another process ({holder}): the test split is not evaluated; the "
                f"training is complete and checkpointed, and --resume runs the final evaluations again once it ends")
        run.test_scores = _evaluate(run, "test", out / "predictions")
        if run.is_main:
            write_eval_report(out, run.out / "adapter", "test", run.step, run.test_scores,
                              settings=eval_settings(run.cfg.to_dict(), zero_stage=run.stage,
                                                     world_size=run.dist.world_size))
    return run.test_scores


def run_evaluation(run: Run, split: str = "val", final: bool = False) -> dict:
    """Generate and score ``split``; append to metrics.json. The final one also writes predictions/."""
    scores = _evaluate(run, split, run.out / "predictions" if final else None)
    run.last_scores = scores
    if run.is_main:
        path = run.out / "metrics.json"
        # one entry per step and split: a resumed finished run evaluates its last step again
        history = [h for h in read_metrics(run.out) if (h["step"], h["split"]) != (run.step, split)]
        history.append({"step": run.step, "split": split, "tasks": scores})
        write_text_atomic(path, json.dumps(history, indent=1))
        if run.writer is not None:
            for task, metrics in scores.items():
                for name, value in metrics.items():
                    run.writer.add_scalar(f"eval_{split}/{task}/{name}", value, run.step)
            run.writer.flush()
    return scores


def save_training_state(run: Run) -> None:
    """Resumable checkpoint + the adapter (both collective)."""
    run.watchdog.beat(f"saving checkpoint at step {run.step}")
    state = {"step": run.step, "loader": run.loader.state_dict(), "world_size": run.dist.world_size,
             "step_times": run.step_times, "frozen": run.frozen, "task_groups": run.task_steps is not None}
    if run.is_main:  # what a --resume is checked against (trainer.saved_settings, check_resumed_cache)
        state.update(run_config=batch_as_given(run.cfg).to_dict(), feature_cache=run.feature_cache,
                     provenance=run.provenance)
    ckpt.save_checkpoint(run.engine, run.out, run.step, state, run.dist.rank)
    ckpt.save_adapter(run.model, run.out / "adapter", run.cfg, run.tokenizer, rank=run.dist.rank,
                      # evaluate.py checks moved weights by "frozen"; Predictor its CLIP by "feature_cache"
                      extra={"step": run.step, "frozen": run.frozen, "feature_cache": run.feature_cache,
                             "provenance": run.provenance})
    run.watchdog.beat(f"saved checkpoint at step {run.step}")


# ----------------------------------------------------------------------------- accounting

def peak_memory_bytes(device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_rss_bytes": int(rss)}
    return {"peak_memory_bytes": int(rss), "peak_rss_bytes": int(rss)}


def run_summary(run: Run, completed: bool = True, gather: bool = True) -> dict:
    """Measured per-rank figures (collective: gathers every rank's numbers; with ``gather=False`` this rank's
    only, the others' null)."""
    local = {"param_bytes_per_rank": parameter_bytes(run.model),
             "grad_bytes_per_rank": run.memory.get("grad_bytes_per_rank", 0),
             "optimizer_state_bytes_per_rank": optimizer_state_bytes(run.engine),
             **peak_memory_bytes(run.dist.device)}
    per_rank = [local]
    if run.dist.world_size > 1:
        import torch.distributed as dist

        per_rank = [None] * run.dist.world_size
        if gather:
            dist.all_gather_object(per_rank, local)
        else:
            per_rank[run.dist.rank] = local
    from vlscale.peft.trainable import count_parameters

    counts = count_parameters(run.model)  # full shapes, partitioned parameters included
    summary = {"world_size": run.dist.world_size, "zero_stage": run.stage, "precision": run.cfg.train.precision,
               "trainable_params": counts["trainable"], "total_params": counts["total"],
               # the paper's convention (a frozen CLIP is not counted), as inspect_model.py and replicate.py
               "total_params_without_frozen_vision": counts["total_without_vision"],
               "updated_pct": round(counts["updated_pct"], 4),
               "global_batch": run.global_batch, "steps": run.step, "completed": completed,
               # what the engine runs (the accumulation derived from train.global_batch_size where that is set)
               "micro_batch_size": int(run.engine.train_micro_batch_size_per_gpu()),
               "gradient_accumulation_steps": int(run.engine.gradient_accumulation_steps()),
               "skipped_steps": int(run.engine.skipped_steps),
               "step_time_s": statistics.median(run.step_times) if run.step_times else None,
               "step_time_steps": len(run.step_times),  # the steps that median is of (at this world_size)
               "gradient_checkpointing": run.cfg.train.gradient_checkpointing,
               # the threads that read the training images ahead (data.read_ahead_threads, or the machine's default
               # where unset: run_config.yaml holds null), which the step time depends on
               "read_ahead_threads": getattr(getattr(run.loader, "read_ahead", None), "threads", 0),
               "device": run.dist.device_type,
               # the resolved ZeRO block (stage, buckets, persistence, offload devices): which DeepSpeed file the
               # run used is not in run_config.yaml (--deepspeed is a flag), and an offloaded run looked like a
               # plain one here
               "zero_optimization": copy.deepcopy(run.ds_config.get("zero_optimization", {}))}
    for key in local:
        summary[key] = max(r[key] for r in per_rank if r)
        summary[f"{key.replace('_per_rank', '')}_by_rank"] = [r and r[key] for r in per_rank]
    summary["final_scores"] = run.last_scores
    # a stop request during the final evaluation: {step, split, task, batches_done, batches}; --resume evaluates
    summary["interrupted_evaluation"] = run.interrupted_evaluation
    summary["stopped"] = run.stopped  # why a run that did not complete stopped: {reason, rank, checkpoint}
    summary["provenance"] = run.provenance  # versions, git, command lines, devices, data files (vlscale.provenance)
    return summary


def stop_record(run: Run, reason: str) -> dict:
    """run_summary.json's ``stopped`` for a run that stops before it completes: ``reason`` (the error's line, or the
    stop request's), the rank that stopped it and the checkpoint left (None: none yet)."""
    root = run.out / "checkpoints"
    try:
        tag = ckpt.latest_tag(root)
    except ckpt.CheckpointError:
        tag = None
    return {"reason": reason, "rank": run.dist.rank, "checkpoint": str(root / tag) if tag else None}


def record_stop(run: Run, error: Exception) -> str:
    """run_summary.json (``completed`` false) after an error in the run's input stopped it mid-run: an unreadable
    image or other DataError (from the rank that met it, reading its share of a batch or of an evaluation), a
    non-finite loss, train.test_eval's eval_test/ locked by another process once the training completed, or a write
    the disk refused (train_log.jsonl, metrics.json, TensorBoard's events: a resumed run's earlier run_summary.json,
    completed true at the step it resumed from, stayed; where this write is refused too, train.py's line says so)
    (rank 0 for all but a DataError: every rank stops on them); ``stopped``: :func:`stop_record` of the error's
    line. Not gathered, as another rank may be waiting in a collective: others' figures are null. Written through a
    file of this rank's own, as two ranks may stop on bad images at once. -> for a DataError, what is kept, to end
    its line (the other errors' lines say it already); else ''."""
    from vlscale.data.real import DataError
    from vlscale.files import disk_refused

    if not (isinstance(error, DataError) or (isinstance(error, (NonFiniteLoss, EvaluationLocked))
                                             or disk_refused(error)) and run.is_main):
        return ""
    run.stopped = stop_record(run, f"{type(error).__name__}: {error}")
    mine = write_text_atomic(run.out / f"run_summary.rank{run.dist.rank}.json",
                             json.dumps(run_summary(run, completed=False, gather=False), indent=1))
    os.replace(mine, run.out / "run_summary.json")
    if not isinstance(error, DataError):
        return ""
    kept = run.stopped["checkpoint"]
    return f"; stopped after step {run.step}: " + (f"the last checkpoint is {kept} (--resume goes on from it once the "
                                                   "input is readable)" if kept else "no checkpoint had been written")


def finish(run: Run, completed: bool = True) -> dict:
    """Write run_summary.json; print the per-task scores (rank 0)."""
    summary = run_summary(run, completed)
    if run.is_main:
        write_text_atomic(run.out / "run_summary.json", json.dumps(summary, indent=1))
        if run.last_scores:
            print(f"final scores (val, step {run.step}):\n{format_scores(run.last_scores)}", flush=True)
        if run.test_scores:
            print(f"test scores (step {run.step}, {run.out / 'eval_test'}):\n{format_scores(run.test_scores)}",
                  flush=True)
    return summary


def quiet_tensorboard_thread_failures() -> None:
    """TensorBoard's writer thread keeps a failed write (a full disk) for the run's next ``add_scalar`` /
    ``flush`` / ``close``, which raise it where the launcher reports it in one line, yet the thread also
    printed its own traceback first ("Exception in thread Thread-2 ... [Errno 28] No space left on device").
    That print is left out; any other thread's failure prints as before."""
    import threading

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    default = threading.excepthook
    if getattr(default, "vlscale_quiet_tensorboard", False):
        return

    def hook(args):
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            default(args)

    hook.vlscale_quiet_tensorboard = True
    threading.excepthook = hook


def close(run: Optional[Run]) -> None:
    if run is None:
        return
    if run.watchdog is not None:
        run.watchdog.stop()
    if run.stop is not None:
        run.stop.uninstall()
    if run.writer is not None:
        try:
            run.writer.close()
        except OSError as e:  # its thread's failed write (a full disk), raised again: the rest must still close
            print(f"vlscale: {run.out / 'tensorboard'}: TensorBoard's events could not all be written ({e})",
                  file=sys.stderr, flush=True)
    if run.lock is not None:
        run.lock.close()  # output_dir free for the next run
