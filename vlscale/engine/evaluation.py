"""Batched generation and scoring of a split: one code path for training's periodic evaluation
and for ``launchers/evaluate.py``.

Every rank decodes its share of the split (``vlscale.data.eval_batches`` gives every rank the same
number of batches; padding rows are marked invalid), predictions are gathered on rank 0, scored
with ``vlscale.metrics.score_task`` and broadcast back, so every rank returns the same scores.
Under ZeRO-3 with several ranks, generation runs with ``synced_gpus=True``: a rank whose batch
finished keeps running forward passes until every rank is done, so the parameter all-gathers stay
matched. Generation settings (beams, max new tokens) come from the task registry. A task with
``choices`` (NLVR2's "true"/"false") is not generated: one decoder step scores the choices' first
tokens and the highest is the prediction, as the reference scores NLVR2 (:func:`choice_tokens`).

``should_stop`` (a callable, the same answer on every rank) is asked before each batch; when it says
stop, :class:`EvaluationInterrupted` is raised and nothing is scored or written for the task.

``predict_only`` (``launchers/evaluate.py --predict-only``, for splits whose answers are withheld): the
split is read without requiring answers, predicted the same way, and not scored; with
``submission_dir`` the predictions are also written in each task's leaderboard format (:func:`write_submission`:
EvalAI, GQA, NLVR2, the COCO caption server, VALUE for the video tasks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from vlscale.data.tasks import get_task, is_task
from vlscale.files import write_text_atomic

logger = logging.getLogger(__name__)


class EvaluationInterrupted(Exception):
    """A stop was requested (``should_stop``) while a split was evaluated: it stopped before batch
    ``done`` (of ``total``, None if unknown) of ``task``."""

    def __init__(self, split: str, task: str, done: int, total: Optional[int]):
        of = f" of {total}" if total is not None else ""
        super().__init__(f"evaluation of {split} stopped in task {task} after {done}{of} batches")
        self.split, self.task, self.done, self.total = split, task, done, total


def to_device(batch: dict, device, float_dtype: Optional[torch.dtype] = None) -> dict:
    """Tensors of a batch to ``device``; floating-point ones to ``float_dtype`` when given."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def _valid_rows(batch: dict, n: int) -> list[bool]:
    valid = batch.get("valid")
    if valid is None:
        return [True] * n
    if isinstance(valid, torch.Tensor):
        valid = valid.tolist()
    return [bool(v) for v in valid]


def generation_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "references", "valid", "groups")}


def choice_tokens(tokenizer, choices) -> tuple[list[int], list[int]]:
    """The target ids the choices share (``prefix``: BART's ``<s>``; none for T5) and, for each choice,
    its token at the first position where they part: the tokens :func:`predict_task` compares. The choices
    are tokenised as training tokenises targets (the collator's labels)."""
    ids = [list(tokenizer(c)["input_ids"]) for c in choices]
    k = 0
    while all(len(x) > k for x in ids) and len({x[k] for x in ids}) == 1:
        k += 1
    firsts = [x[k] if len(x) > k else None for x in ids]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"answer choices {list(choices)} cannot be told apart by one token with this tokenizer "
                         f"(target ids {ids})")
    return ids[0][:k], firsts


def leading_target_tokens(tokenizer) -> int:
    """How many tokens the tokenizer puts before a target's text (BART's ``<s>``: 1; T5: 0). Training's labels
    start with them, so generation spends them first: a task's ``max_new_tokens`` counts the answer's own
    tokens, and generation gets these on top (bart-base's 3-token budget for TVQA's "a0" left one token
    between ``<s>`` and the forced ``</s>``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return 0
    ids = list(tokenizer("a")["input_ids"])
    k = 0
    while k < len(ids) and ids[k] == bos:
        k += 1
    return k


@torch.no_grad()
def predict_task(model, tokenizer, batches, task: str, *, device, float_dtype=None, synced_gpus: bool = False,
                 progress=None, heartbeat: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None, split: str = "val",
                 decode_block=None) -> list[dict]:
    """Decode this rank's batches -> [{uid, prediction, references[, group]}] for valid rows.
    ``should_stop`` (collective when it is): asked before each batch; True raises EvaluationInterrupted.
    ``decode_block``: :meth:`VLModel.generate`'s (the decoding parameters gathered around each batch's decoding)."""
    spec = get_task(task)
    if spec.choices:
        prefix, choice_ids = choice_tokens(tokenizer, spec.choices)
    else:
        budget = spec.max_new_tokens + leading_target_tokens(tokenizer)
    records = []
    total = len(batches) if hasattr(batches, "__len__") else None
    for i, batch in enumerate(batches):
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted(split, task, i, total)
        if batch.get("task", task) != task:
            raise ValueError(f"evaluation batch of task {batch.get('task')!r} in the {task!r} stream")
        uids = list(batch["uids"])
        valid = _valid_rows(batch, len(uids))
        refs = batch.get("references", [[] for _ in uids])
        groups = batch.get("groups")
        inputs = to_device(generation_inputs(batch), device, float_dtype)
        if spec.choices:  # one forward pass on every rank: the ZeRO-3 gathers stay matched
            picked = model.next_token_logits(inputs, prefix)[:, choice_ids].argmax(1).tolist()
            texts = [spec.choices[i] for i in picked]
        else:
            ids = model.generate(inputs, max_new_tokens=budget, num_beams=spec.num_beams,
                                 synced_gpus=synced_gpus, decode_block=decode_block)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for j, uid in enumerate(uids):
            if not valid[j]:
                continue
            r = refs[j]
            rec = {"uid": str(uid), "prediction": texts[j].strip(),
                   "references": [r] if isinstance(r, str) else list(r)}
            if groups is not None:
                rec["group"] = groups[j]
            records.append(rec)
        if progress is not None:
            progress.update(1)
        if heartbeat is not None:
            heartbeat(f"evaluating {task} batch {i}")
    return records


def _gather_records(records: list[dict], world_size: int) -> list[dict]:
    if world_size <= 1:
        return records
    import torch.distributed as dist

    parts = [None] * world_size
    dist.all_gather_object(parts, records)
    merged, seen = [], set()
    for part in parts:
        for rec in part:
            if rec["uid"] not in seen:
                seen.add(rec["uid"])
                merged.append(rec)
    return merged


def score_records(task: str, records: list[dict], java_metrics: bool = False, examples=()) -> dict[str, float]:
    """Score gathered records (``java_metrics``: see :func:`vlscale.metrics.score_task`); ``examples``, the
    split's, give VQA's answer types where they have them (scored per type too)."""
    from vlscale.metrics import score_task

    preds = {r["uid"]: r["prediction"] for r in records}
    refs = {r["uid"]: r["references"] for r in records}
    groups = {r["uid"]: r["group"] for r in records if "group" in r} or None
    if not records:
        raise ValueError(f"no {task} examples were evaluated")
    types = {str(e.uid): e.extra["answer_type"] for e in examples if "answer_type" in e.extra} \
        if get_task(task).format == "vqa" else None
    return score_task(task, preds, refs, groups=groups, java_metrics=java_metrics, answer_types=types or None)


def write_predictions(path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in records))


@contextlib.contextmanager
def predictions_replaced_whole(predictions_dir, writer: bool = True, keep_others: bool = False):
    """Yields ``<predictions_dir>.partial`` for :func:`evaluate` to write a set of predictions into (task by task);
    it replaces ``predictions_dir`` only once the block ends without an error, so a stop or a Ctrl-C midway keeps
    the last whole set (not one task of this set beside another task of the earlier one), and what it wrote is
    removed. The swap moves the earlier set to ``<predictions_dir>.old`` before renaming the new one into place
    (``vlscale.engine.checkpoint._replace_dir``): a process killed between the renames leaves the earlier set
    there, put back first by the next evaluation into the folder, as a ``.partial`` it left is cleared.
    ``keep_others``: the earlier set's files that the new set does not write join it, at any depth: the tasks not
    written now (``evaluate.py --tasks`` on a subset), and in a submission/'s video folders (``tvqa/...``) another
    split's files (VALUE's zip holds val and test). ``writer``: whether this process writes (rank 0); the other ranks'
    blocks touch no folder."""
    from vlscale.engine.checkpoint import _replace_dir, _restore_replaced

    predictions_dir = Path(predictions_dir)
    partial = predictions_dir.with_name(predictions_dir.name + ".partial")
    if not writer:
        yield partial
        return
    _restore_replaced(predictions_dir)  # a swap killed between its renames: the earlier set back in place
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not partial.is_dir():  # nothing written
        return
    if keep_others and predictions_dir.is_dir():
        for path in sorted(predictions_dir.rglob("*")):  # file by file: tvqa/ holds tvqa_val_... and tvqa_test_...
            kept = partial / path.relative_to(predictions_dir)
            if path.is_file() and not kept.exists():
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, kept)
    try:
        _replace_dir(partial, predictions_dir)
    except BaseException:  # failed between the renames: the earlier set back in place
        _restore_replaced(predictions_dir)
        raise


SUBMISSION_FILES = {"vqa": "vqa.json", "gqa": "gqa.json", "nlvr2": "nlvr2.csv", "caption": "caption.json",
                    "tvqa": "tvqa/tvqa_{split}_predictions.json", "how2qa": "how2qa/how2qa_{split}_predictions.json",
                    "tvc": "tvc/tvc_{split}_predictions.jsonl", "yc2c": "yc2c/yc2c_{split}_predictions.jsonl"}
"""Each task's submission file under ``submission/``: the image tasks' leaderboards take one file each; VALUE (the
video tasks) takes one zip of ``<task>/<task>_<split>_predictions.json[l]`` for val and test together. A custom task
writes its format's file under its own name (an OK-VQA like vqa: ``okvqa.json``)."""
VALUE_SPLITS = {"test": {"how2qa": "test_public"}}
"""A split's name in VALUE's file names where it differs from ours (VALUE's scorer: How2QA's test is
``test_public``, the other three tasks' is ``test``); a split not listed keeps its own name."""

_OPTION = re.compile(r"^\s*a(\d)\s*$")


@contextlib.contextmanager
def out_lock(out: Path, who: str, writer: bool = True):
    """Holds the evaluation folder ``out``'s ``.vlscale.lock`` (a training run's lock file too; made, and removed
    after, with ``out`` if this made it and it is left empty) while the block runs, and yields None; where another
    process holds it, yields what that one wrote in it (``who``, its pid, since when) and takes nothing: the caller
    refuses, naming it. Two evaluations writing one folder at once (evaluate.py's default eval_<split> twice, or
    beside train.test_eval's eval_test/) cleared each other's ``predictions.partial/`` midway, and each rewrote
    eval_metrics.json from what it had read before. ``writer``: rank 0; the other ranks write nothing there."""
    from vlscale.engine.checkpoint import LOCK_FILE
    from vlscale.files import hold_lock

    if not writer:
        yield None
        return
    made, path = not out.exists(), out / LOCK_FILE
    out.mkdir(parents=True, exist_ok=True)
    f, holder = hold_lock(path, f"{who}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:
        yield holder
    finally:
        if f is not None:
            path.unlink(missing_ok=True)  # still held: whoever opens it next opens a new one
            f.close()
        if made:
            with contextlib.suppress(OSError):  # not empty: what was written stays
                out.rmdir()


def _number_or_text(value: str):
    """``"393225001"`` -> 393225001; an id that is not a plain number stays a string."""
    return int(value) if value.isascii() and value.isdigit() else value


def option_index(prediction: str, candidates: list[str]) -> Optional[int]:
    """A multiple-choice prediction as the option's index: its name (``"a2"``, the target) or, failing that, an
    option's text; None when it names none. Both are compared as the accuracy compares them
    (:func:`vlscale.metrics.normalize_answer`: case, punctuation, spaces), so a prediction scored right locally
    ("a2." against "a2") is written as that option, not as 0."""
    from vlscale.metrics import normalize_answer

    pred = normalize_answer(prediction)
    m = _OPTION.match(pred)
    if m and int(m.group(1)) < len(candidates):
        return int(m.group(1))
    texts = [normalize_answer(c) for c in candidates]
    return texts.index(pred) if pred in texts else None


NUMERIC_IDS = {"vqa": ("question_id", "EvalAI"), "caption": ("image_id", "the COCO caption server"),
               "tvqa": ("qid", "VALUE's scorer"), "how2qa": ("qid", "VALUE's scorer"),
               "tvc": ("clip_id", "VALUE's scorer"), "yc2c": ("clip_id", "VALUE's scorer")}
"""The submissions whose leaderboard reads the ids as integers: the id's name there, and who reads it."""


def _hf_row_uids(split: str) -> re.Pattern:
    """The uids the HF loader gives ``split``'s rows without ``data.hf_columns.id``: ``<split>-<row>``."""
    from vlscale.data.hf_dataset import SPLIT_NAMES

    ours = [o for o, names in SPLIT_NAMES.items() if split in (o, *names)]  # the loader names rows by ours
    return re.compile(rf"({'|'.join(re.escape(s) for s in [split, *ours])})-\d+")


def _warn_non_numeric_ids(task: str, ids: list, split: str) -> None:
    """Log a warning when ``task``'s submission holds ids (as written) that its leaderboard cannot read as
    integers; with a hint where they are an HF dataset's row ids (``<split>-<row>``, no ``data.hf_columns.id``)."""
    fmt = get_task(task).format
    if fmt not in NUMERIC_IDS:
        return
    key, reader = NUMERIC_IDS[fmt]
    bad = [i for i in ids if not isinstance(_number_or_text(str(i)), int)]
    if bad:
        rows = _hf_row_uids(split)
        hint = " (an HF dataset's row numbers: map data.hf_columns.id to the id column)" \
            if any(rows.fullmatch(str(i)) for i in bad) else ""
        logger.warning(f"{task} submission: {len(bad)} of {len(ids)} {key}s are not numbers (first {bad[:3]}); "
                       f"{reader} reads them as integers{hint}")


def write_submission(directory, task: str, records: list[dict], examples, split: str = "test") -> Optional[Path]:
    """``records`` (uid, prediction) as ``task``'s leaderboard expects them, in ``<directory>/SUBMISSION_FILES[task]``
    (None for a task without one); ``examples`` (those predicted, or more) give the ids:

    - vqa (EvalAI, as LXMERT / VL-T5's ``dump_result``): ``[{"question_id": int, "answer": str}]``
    - gqa (as LXMERT / VL-T5): ``[{"questionId": str, "prediction": str}]``
    - nlvr2 (as LXMERT's ``dump_result``): one line ``<identifier>,True`` or ``<identifier>,False`` per example
    - caption (the COCO caption server): ``[{"image_id": <cocoid>, "caption": str}]`` (without a ``cocoid``: the
      number the image's name ends in; an HF dataset's row uid ``<split>-<row>`` names no image and is written
      whole, with the warning to map ``data.hf_columns.id``)
    - tvqa, how2qa (VALUE's scorer, as VL-Adapter's ``multitask_video.py``): ``{"<qid>": option index}``; a
      prediction naming no option (neither ``a0``.. nor an option's text) is written as 0, as the reference
      does, and counted in a logged warning
    - tvc, yc2c (VALUE): one JSON line per clip, ``{"vid_name", "clip_id", "ts", "descs": [{"desc"}]}`` for TVC,
      ``{"video_id", "clip_id", "descs": [{"desc"}]}`` for YC2C (VALUE's sample files)

    ``split`` names the video tasks' files (VALUE's name for it: :data:`VALUE_SPLITS`). A custom task is written as
    its format (``get_task(task).format``) is, in a file named after it."""
    fmt = get_task(task).format if is_task(task) else task
    name = SUBMISSION_FILES.get(fmt)
    if name is None:
        return None
    name = name.replace(fmt, task)
    by_uid = {str(e.uid): e for e in examples}
    missing = [r["uid"] for r in records if r["uid"] not in by_uid]
    if missing:
        raise ValueError(f"{task} submission: predictions for uids the split does not hold: first {missing[:3]}")
    rows = [(by_uid[r["uid"]], r["prediction"]) for r in records]
    name = name.format(split=VALUE_SPLITS.get(split, {}).get(fmt, split))
    if fmt == "nlvr2":
        text = "".join(f"{e.extra.get('identifier', e.uid)},{'True' if p == 'true' else 'False'}\n" for e, p in rows)
        ids: list = []  # identifiers are strings there
    elif fmt in ("tvqa", "how2qa"):
        picked = {str(e.uid): option_index(p, e.extra["candidates"]) for e, p in rows}
        unnamed = [uid for uid, k in picked.items() if k is None]
        if unnamed:
            logger.warning(f"{task} submission: {len(unnamed)} of {len(rows)} predictions name no option "
                           f"(first qids {unnamed[:3]}); written as option 0, as VL-Adapter's reference does")
        text, ids = json.dumps({uid: k or 0 for uid, k in picked.items()}), list(picked)
    elif fmt in ("tvc", "yc2c"):
        def line(e, p):
            clip = _number_or_text(str(e.extra.get("clip_id", e.uid)))
            if fmt == "tvc":
                return {"vid_name": e.image_ids[0], "clip_id": clip, "ts": e.extra.get("ts"), "descs": [{"desc": p}]}
            return {"video_id": e.image_ids[0], "clip_id": clip, "descs": [{"desc": p}]}
        lines = [line(e, p) for e, p in rows]
        text, ids = "".join(json.dumps(c) + "\n" for c in lines), [c["clip_id"] for c in lines]
    else:
        if fmt == "vqa":
            entries = [{"question_id": _number_or_text(str(e.uid)), "answer": p} for e, p in rows]
        elif fmt == "gqa":
            entries = [{"questionId": str(e.uid), "prediction": p} for e, p in rows]
        else:  # an HF row's uid ends in its row number, no image's id: written whole, and warned of
            row = _hf_row_uids(split)
            entries = [{"image_id": e.extra["cocoid"] if isinstance(e.extra.get("cocoid"), int) else
                        str(e.uid) if row.fullmatch(str(e.uid)) else
                        _number_or_text(re.sub(r"^.*?(\d+)$", r"\1", str(e.uid))), "caption": p} for e, p in rows]
        key = NUMERIC_IDS.get(fmt, (None,))[0]
        text, ids = json.dumps(entries), [entry[key] for entry in entries] if key else []
    _warn_non_numeric_ids(task, ids, split)
    return write_text_atomic(Path(directory) / name, text)


def evaluate(model, cfg, tokenizer, *, split: str = "val", tasks: Optional[Sequence[str]] = None, rank: int = 0,
             world_size: int = 1, device="cpu", float_dtype=None, synced_gpus: bool = False,
             batch_size: Optional[int] = None, max_examples: Optional[int] = None, show_progress: bool = True,
             predictions_dir=None, heartbeat: Optional[Callable[[str], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None, java_metrics: bool = False,
             predict_only: bool = False, submission_dir=None, memo: Optional[dict] = None,
             engine=None) -> dict[str, dict]:
    """Generate and score ``split`` for each task -> {task: metric dict} (the same on every rank).

    ``model`` is the VLModel (``engine.module`` under DeepSpeed). With ``predictions_dir``, rank 0
    writes ``<predictions_dir>/<task>.jsonl`` (uid, prediction, references). ``should_stop``: see
    the module docstring (raises EvaluationInterrupted). ``java_metrics``: caption tasks are scored as
    coco-caption scores them (PTB tokenizer for every metric, METEOR; Java), see :func:`vlscale.metrics.score_task`.
    ``predict_only``: records without answers are read too (a leaderboard's test split), nothing is scored,
    and the result is {task: {"examples": n, "submission": path or None}}, the path of the file
    :func:`write_submission` wrote into ``submission_dir`` (None without one, or for a task without a format).
    ``memo``: each task's examples, read at the first call that needs them and reused by the next with the same
    dict (:func:`vlscale.data.eval_examples`). ``engine``: the DeepSpeed engine of ``model``; under ZeRO-3 the
    model is gathered whole for the evaluation, or its decoding parameters for each batch's decoding, where
    ``train.eval_gather`` says so (:func:`vlscale.engine.gathered.gathered_for_generation`).
    """
    from vlscale.data import eval_batches
    from vlscale.engine.distributed import broadcast_object
    from vlscale.engine.gathered import gathered_for_generation
    from vlscale.log import progress_bar

    tasks = list(tasks or cfg.data.tasks)
    batch_size = batch_size or cfg.train.eval_batch_size
    max_examples = max_examples if max_examples is not None else cfg.train.eval_max_examples
    was_training = model.training
    model.eval()
    scores: dict[str, dict] = {}
    try:
        with gathered_for_generation(engine, cfg.train.eval_gather, device) as plan:
            for task in tasks:
                batches = eval_batches(cfg, tokenizer, task, split, batch_size, rank, world_size, max_examples,
                                       require_answers=not predict_only, memo=memo)
                bar = progress_bar(total=len(batches), desc=f"eval {task}/{split}",
                                   disable=not (show_progress and rank == 0), leave=False, dynamic_ncols=True)
                try:
                    records = predict_task(model, tokenizer, batches, task, device=device, float_dtype=float_dtype,
                                           synced_gpus=synced_gpus and plan.synced, progress=bar, heartbeat=heartbeat,
                                           should_stop=should_stop, split=split, decode_block=plan.decode_block)
                finally:
                    bar.close()
                records = _gather_records(records, world_size)
                if rank == 0:
                    position = {str(e.uid): i for i, e in enumerate(batches.examples)}  # the data's own order
                    records.sort(key=lambda r: position[r["uid"]])
                    if predict_only:  # the examples' ids and references (the batches carry neither)
                        examples = {str(e.uid): e for e in batches.examples}
                        for r in records:  # an unlabeled example's are none (the collator's [target] is [""])
                            r["references"] = list(examples[r["uid"]].references)
                        path = write_submission(submission_dir, task, records, examples.values(), split) \
                            if submission_dir is not None else None
                        scores[task] = {"examples": len(records), "submission": str(path) if path else None}
                    else:
                        scores[task] = score_records(task, records, java_metrics, batches.examples)
                    if predictions_dir is not None:
                        write_predictions(Path(predictions_dir) / f"{task}.jsonl", records)
    finally:
        model.train(was_training)
    return broadcast_object(scores)


def eval_settings(run_config: dict, java_metrics: bool = False, zero_stage: Optional[int] = None,
                  world_size: int = 1) -> dict:
    """What a report's scores depend on besides the adapter: which examples (a run config's ``data`` section but
    its task list, and ``train.eval_max_examples``, normalised as :func:`vlscale.config.config_from_dict` gives
    them), the precision the model ran in (``train.precision``: bf16 predictions differ from fp32's), how
    captions were to be scored (``java_metrics``: coco-caption's PTB tokenizer and METEOR, :func:`evaluate`; the
    report's ``caption_tokens`` says which tokenisation each task's scores are of), and how
    the model was spread: the DeepSpeed ZeRO stage it ran under (``zero_stage``, None without DeepSpeed: ZeRO-3's
    linear layers round bf16 logits otherwise) over ``world_size`` ranks (each rank's batches, padded to their own
    longest example)."""
    from vlscale.config import config_from_dict

    cfg = config_from_dict(run_config).to_dict()
    data = {k: v for k, v in cfg["data"].items() if k != "tasks"}
    return json.loads(json.dumps({"data": data, "eval_max_examples": cfg["train"]["eval_max_examples"],
                                  "precision": cfg["train"]["precision"], "java_metrics": bool(java_metrics),
                                  "zero_stage": None if zero_stage is None else int(zero_stage),
                                  "world_size": int(world_size)}))


def _adapter_eval_settings(adapter_dir) -> Optional[dict]:
    try:
        from vlscale.engine.checkpoint import read_adapter_config

        return eval_settings(read_adapter_config(adapter_dir)["run_config"])
    except Exception:  # no adapter (yet), or a config this vlscale does not read: settings unknown
        return None


def _adapter_sha256(adapter_dir, step=None) -> Optional[str]:
    """sha256 of the adapter's weights file: what a report's scores are of, wherever the folder is now. None where
    the file records a step other than ``step`` (the one evaluated): a run still training saved its next step
    there meanwhile, and the digest would name weights the scores are not of."""
    import hashlib

    from vlscale.engine.checkpoint import ADAPTER_WEIGHTS

    try:
        with open(Path(adapter_dir) / ADAPTER_WEIGHTS, "rb") as f:
            if step is not None:  # the safetensors header (its length, then JSON) of this same open file
                size = int.from_bytes(f.read(8), "little")  # of no safetensors file, any: 7e18 was a MemoryError
                header = json.loads(f.read(min(size, 100_000_000)))  # safetensors' own limit on its header
                if str(step) != header.get("__metadata__", {}).get("step", str(step)):
                    return None
                f.seek(0)
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError, AttributeError):  # no adapter (yet), or no safetensors: known by its path alone
        return None


def _count_predictions(predictions_dir: Path, tasks) -> dict[str, int]:
    counts = {}
    for task in tasks:
        path = predictions_dir / f"{task}.jsonl"
        if path.is_file():
            with open(path) as f:
                counts[task] = sum(1 for line in f if line.strip())
    return counts


def write_eval_report(out_dir, adapter_dir, split: str, step: Optional[int], scores: dict[str, dict],
                      settings: Optional[dict] = None) -> Path:
    """``<out_dir>/eval_metrics.json`` (adapter path and the sha256 of its weights, split, step, evaluation
    settings, per-task scores and number of examples scored, counted in ``<out_dir>/predictions/<task>.jsonl``;
    ``caption_tokens``: the tokenisation of each caption task scored with ``java_metrics``,
    :func:`caption_tokens`), beside ``predictions/``.

    ``settings``: :func:`eval_settings` of the config the scores were computed with (default: the adapter's
    run config). A report there of the same adapter (its weights' sha256, wherever the folder is now), split, step
    and settings keeps the scores of the tasks
    not evaluated now (``evaluate.py --tasks`` on a subset); one of another adapter, split, step or settings
    (other data, ``train.eval_max_examples``) is replaced, so one report never mixes scores of other data, and
    the replaced report's predictions of tasks not evaluated now are removed with it (said in a warning)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings is None:
        settings = _adapter_eval_settings(adapter_dir)
    report = {"adapter": str(Path(adapter_dir).resolve()), "split": split, "step": step, "settings": settings,
              "tasks": scores, "examples": _count_predictions(out_dir / "predictions", scores)}
    tokens = caption_tokens(scores)
    path = out_dir / "eval_metrics.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        old = None
    sha = _adapter_sha256(adapter_dir, step)
    if sha is not None:
        report["adapter_sha256"] = sha
    # the same weights wherever they are now (a moved run folder), else (no weights file) the same path
    same = ("adapter_sha256",) if sha is not None and isinstance(old, dict) and "adapter_sha256" in old \
        else ("adapter",)
    if isinstance(old, dict) and all(old.get(k) == report[k] for k in (*same, "split", "step", "settings")) \
            and isinstance(old.get("tasks"), dict):
        report["tasks"] = {**old["tasks"], **scores}
        old_counts = old.get("examples") if isinstance(old.get("examples"), dict) else {}
        report["examples"] = {**{t: n for t, n in old_counts.items() if t in report["tasks"]}, **report["examples"]}
        old_tokens = old.get("caption_tokens") if isinstance(old.get("caption_tokens"), dict) else {}
        tokens = {**old_tokens, **tokens}
    elif isinstance(old, dict) and isinstance(old.get("tasks"), dict):
        # the replaced report's predictions of tasks not evaluated now would sit beside this report unscored
        stale = [t for t in old["tasks"] if t not in scores and (out_dir / "predictions" / f"{t}.jsonl").is_file()]
        for task in stale:
            (out_dir / "predictions" / f"{task}.jsonl").unlink()
        if stale:
            logger.warning(f"{path}: replaced the earlier report (adapter {old.get('adapter')}, split "
                           f"{old.get('split')}, step {old.get('step')}); its predictions of {stale}, which this "
                           f"evaluation did not make, were removed with it")
    if tokens:
        report["caption_tokens"] = tokens
    write_text_atomic(path, json.dumps(report, indent=1))
    return path


def caption_tokens(scores: dict[str, dict]) -> dict[str, str]:
    """{task: "ptb" | "python"}: the tokenisation each caption task scored by
    :func:`vlscale.metrics.caption_scores` (``java_metrics``) used; "python" where coco-caption's PTB tokenizer
    failed or Java was off, so its scores are not coco-caption's."""
    return {task: metrics.tokens for task, metrics in scores.items() if getattr(metrics, "tokens", None)}


def _task_column(tasks) -> int:
    """The width of the task-name column of the tables below: 8 (the paper's tasks' names fit), or the longest
    name (a custom task's, such as ``flickr30k``) so that every row stays in line."""
    return max([8, *map(len, tasks)])


def format_scores(scores: dict[str, dict]) -> str:
    """One line per task: headline metric first, x100 like the papers (and where captions asked to be scored by
    the PTB tokenizer were not, that they were scored on Python tokens)."""
    lines, width = [], _task_column(scores)
    tokens = caption_tokens(scores)
    for task, metrics in scores.items():
        head = get_task(task).metric
        ordered = [head] + [k for k in metrics if k != head] if head in metrics else list(metrics)
        fell_back = "  (Python tokens, not coco-caption's: the PTB tokenizer failed)" if tokens.get(task) == "python" else ""
        lines.append(f"  {task:{width}s} " + "  ".join(f"{k}={100 * metrics[k]:.2f}" for k in ordered) + fell_back)
    return "\n".join(lines)


def format_predicted(predicted: dict[str, dict], out: Path) -> str:
    """One line per task of a ``predict_only`` :func:`evaluate`'s result: how many examples, the predictions file in
    ``out`` and the submission file."""
    width = _task_column(predicted)
    return "\n".join(f"  {task:{width}s} {done['examples']} example{'' if done['examples'] == 1 else 's'}: "
                     f"{out / 'predictions' / (task + '.jsonl')}; {done['submission']}"
                     for task, done in predicted.items())
