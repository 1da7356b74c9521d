"""Data for the training engine: examples, visual sources, the multitask train loader, eval batches.

    from vlscale.data import build_tokenizer, load_examples, build_visual_source, build_train_loader, eval_batches

    tok = build_tokenizer(cfg)
    loader = build_train_loader(cfg, tok, rank, world_size)
    batch = next(loader)            # one micro-batch for this rank; the gradient_accumulation_steps
                                    # micro-batches of an optimizer step share the step's task
    loader.step                     # optimizer steps consumed; loader.state_dict() / load_state_dict()
    for batch in eval_batches(cfg, tok, "vqa", "val", 32, rank, world_size):
        ...                         # batch["valid"]: False for padding (every rank gets as many batches)

Examples come from the synthetic world (``data.source=synthetic``, vlscale.data.synthetic) or the
real datasets (vlscale.data.real); the batch dict is documented in vlscale.data.collate. Before
the first batch, :func:`check_visual_ids` checks that every example's visual ids resolve in its
source (files exist, ids are in the cache index; nothing is decoded), so missing images or
features stop the run at start-up, not mid-training. Images are decoded for the next batches in threads
while the current one runs (``data.read_ahead_threads``; :mod:`vlscale.data.read_ahead`).
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

import numpy as np
import torch

from vlscale.data.collate import Collator, fetch_visuals
from vlscale.data.multitask import MultitaskSampler, check_state_keys, shard
from vlscale.data.read_ahead import ReadAhead, read_ahead_threads
from vlscale.data.tasks import TASKS, Example, TaskSpec, get_task
from vlscale.data.tokenizer import build_tokenizer

__all__ = ["build_tokenizer", "load_examples", "check_split_found", "build_visual_source", "check_visual_ids", "build_train_loader",
           "eval_examples", "eval_batches", "TrainLoader", "Collator", "MultitaskSampler", "shard", "Example", "TaskSpec", "TASKS",
           "get_task"]

logger = logging.getLogger(__name__)


def load_examples(cfg, task: str, split: str, require_answers: bool = True) -> list[Example]:
    """The examples of ``task`` / ``split`` (``train``, ``val``, ``test``) from the run's data source.
    ``require_answers=False``, for ``launchers/evaluate.py --predict-only`` alone: real records without their
    answers are read too, as examples with an empty ``target`` and no ``references`` (the synthetic world's
    all have answers); training and scoring always require them."""
    get_task(task)
    if cfg.data.source == "synthetic":
        from vlscale.data.synthetic import synthetic_split

        return synthetic_split(cfg, task, split).examples
    from vlscale.data.real import load_real_examples

    return load_real_examples(cfg, task, split, require_answers)


def check_split_found(cfg, tasks, split: str) -> None:
    """Every one of ``tasks`` has ``split`` where :func:`load_examples` will read it, checked before a long run
    reads the tasks one at a time (real files: the loaders' own ``annotation_path`` and COCO's Karpathy split
    names): one DataError naming each task without it and the file looked for. A split found twice (two files, or
    two spellings of its folder) is refused as the loader refuses it, not called missing. The synthetic world has
    every split; an HF dataset's splits are resolved when it is opened."""
    if cfg.data.source == "synthetic" or cfg.data.hf_dataset:
        return
    from vlscale.data.caption import karpathy_split
    from vlscale.data.real import DataError, DataFileNotFound, annotation_path

    problems = {}
    for task in tasks:
        try:
            path = annotation_path(cfg, task, split)  # a DataError other than a missing file (two of it) is raised
        except DataFileNotFound as e:
            problems[task] = str(e)
            continue
        try:
            if get_task(task).format == "caption":
                karpathy_split(path, split)
        except DataError as e:
            problems[task] = str(e)
    if problems:
        raise DataError(f"split {split!r} not found for {', '.join(problems)}: "
                        + "; ".join(dict.fromkeys(problems.values())))


def build_visual_source(cfg, task: str, split: str):
    """Where ``task`` / ``split``'s image ids resolve: synthetic images, a feature cache, real files."""
    spec = get_task(task)
    if cfg.data.source != "synthetic":
        from vlscale.data.real import real_visual_source

        return real_visual_source(cfg, task, split)
    if cfg.model.feature_source == "cache":
        from vlscale.data.features import FeatureCache, model_feature_dim
        from vlscale.data.synthetic import content_params

        if not cfg.data.feature_cache:
            from vlscale.data.real import DataError

            raise DataError("model.feature_source=cache needs data.feature_cache=DIR (make it with "
                             "python launchers/extract_features.py --synthetic --out DIR)")
        kind = "frames" if spec.modality == "video" else "grid"
        return FeatureCache(cfg.data.feature_cache, vision=cfg.model.vision, pretrained=cfg.model.vision_pretrained,
                            expect_kind=kind, synthetic=content_params(cfg), expect_dim=model_feature_dim(cfg, kind))
    from vlscale.data.synthetic import synthetic_split
    from vlscale.data.visual import SyntheticImages

    return SyntheticImages(synthetic_split(cfg, task, split).visuals, name=f"synthetic world ({task}/{split})")


def _held_without_suffix(source, missing: list) -> list[tuple[str, str]]:
    """``(id, its stem)`` for the missing ids written with a file suffix (``clip1.mp4``, ``x.jpg``) whose stem
    ``source`` holds: the layout's ids are file names without the suffix."""
    from vlscale.data.visual import missing_ids

    stems = {i: i.rpartition(".")[0] for i in missing if "." in i.rpartition("/")[2].strip(".")}
    held = set(stems.values()) - set(missing_ids(source, stems.values())) if stems else set()
    return [(i, stem) for i, stem in stems.items() if stem in held]


def check_visual_ids(cfg, task: str, split: str, examples: list, source) -> list:
    """``examples``, after checking that ``source`` holds every visual id they name.

    Only existence is checked (one folder listing, or index lookups; nothing is decoded). Missing
    ids raise DataError naming the task, split, how many, the first few and where they were looked
    for; with ``data.skip_bad_records=true`` the examples naming them are dropped instead, with a
    logged count (an ExampleList keeps counting them in ``skipped``).
    """
    from vlscale.data.real import DataError, ExampleList
    from vlscale.data.visual import missing_ids

    missing = missing_ids(source, (i for e in examples for i in e.image_ids))
    if not missing:
        return examples
    lost = set(missing)
    bad = [e for e in examples if any(i in lost for i in e.image_ids)]
    files = sorted({e.source for e in bad if e.source})
    what = (f"{task}/{split}: {len(missing)} visual id(s) named by {len(bad)} of {len(examples)} examples "
            f"{'(' + ', '.join(files[:3]) + ') ' if files else ''}are not in {source!r}: "
            f"first {missing[:5]}")
    if not cfg.data.skip_bad_records:
        from vlscale.data.features import FeatureCache, first_row_id

        column = cfg.data.hf_dataset and (cfg.data.hf_columns or {}).get("image_id")
        suffixed = dict(_held_without_suffix(source, missing))  # 'clip1.mp4' where the source holds 'clip1'
        rest = [i for i in missing if i not in suffixed]  # what else may be wrong with these, said for them alone
        if not rest:
            add = ""
        elif not isinstance(source, FeatureCache):
            from vlscale.data.visual import other_suffix_files

            other = other_suffix_files(source, rest)
            add = "add their files" if not other else (
                f"{len(other)} of them are there under another suffix ({', '.join(str(p) for p in other[:3])}), "
                f"which the layout does not read (docs/datasets.md): convert them, or extract a feature cache of "
                f"their folder (launchers/extract_features.py --images DIR --out CACHE: ids are file names without "
                f"the suffix) and train from it (model.feature_source=cache data.feature_cache=CACHE)")
        elif column:  # then the cache is not checked for rows (real._feature_cache)
            row = first_row_id(source.index)
            add = (f"the run names images by data.hf_columns.image_id={column!r}"
                   + (f" and the cache's ids number rows (e.g. {row!r})" if row else "")
                   + f": extract them into the cache with launchers/extract_features.py --hf-dataset "
                     f"{cfg.data.hf_dataset} ... --id-column {column}")
        else:
            add = "extract them into the cache (launchers/extract_features.py over this split)"
        if suffixed:  # any kind of source
            first = next(iter(suffixed.items()))
            add = (f"{len(suffixed)} of them end in a file suffix and are there without it ({first[0]!r} as "
                   f"{first[1]!r}): ids are file names without the suffix, drop it in the annotations"
                   + (f"; for the other {len(rest)}: {add}" if rest else ""))
        raise DataError(f"{what}; {add}, or set data.skip_bad_records=true to drop those examples")
    logger.warning(f"{what}; dropped those {len(bad)} examples (data.skip_bad_records=true)")
    kept = [e for e in examples if not any(i in lost for i in e.image_ids)]
    if isinstance(examples, ExampleList):
        out = ExampleList(kept, source=examples.source)
        out.merge_skips(examples)
        out.skipped += len(bad)
        if len(out.skip_messages) < 20:
            out.skip_messages.append(what)
        return out
    return kept


def _no_examples(cfg, task: str, split: str, examples: list, loaded: int) -> Exception:
    """The error for a split with no (usable) examples, naming the file it was read from."""
    from vlscale.data.real import DataError

    where = f"data.source={cfg.data.source}"
    if getattr(examples, "source", None):
        where += f", read from {examples.source}"
    if loaded:
        why = f"all {loaded} dropped (data.skip_bad_records=true: their images/features are missing)"
    elif getattr(examples, "skipped", 0):
        why = f"{examples.skipped} malformed record(s) skipped, none left"
    else:
        why = "the file holds none" if getattr(examples, "source", None) else "none"
    what = "training examples" if split == "train" else "examples to evaluate"
    return DataError(f"task {task!r} has no {what} in split {split!r} ({where}): {why}")


def sampled_vqa_targets(examples, seed: int, step: int, copies: Optional[list[int]] = None) -> tuple[list, list[float]]:
    """``data.vqa_targets=sampled``: each example's target drawn from its soft ``label`` in proportion to the
    scores, and the score as its loss weight (VL-T5's VQA dataset and train_step). Keyed by (seed, step,
    uid, copy): the same on every rank, for any number of ranks and after a resume; ``copies[i]`` says how
    many times example i's question came earlier in the step's global batch (a task smaller than the
    batch repeats questions), so each copy gets its own draw, as the reference's. No scored answer: target
    "" at weight 0, as the reference; no ``label`` at all: the example as it is, weight 1."""
    import dataclasses
    import zlib

    out, weights = [], []
    for e, copy in zip(examples, copies or [0] * len(examples), strict=True):
        label = e.extra.get("label")
        if label is None:
            out.append(e)
            weights.append(1.0)
            continue
        answers = [a for a, s in label.items() if s > 0]
        if not answers:
            out.append(dataclasses.replace(e, target=""))
            weights.append(0.0)
            continue
        scores = np.array([label[a] for a in answers], dtype=np.float64)
        rng = np.random.default_rng([seed, step, zlib.crc32(str(e.uid).encode())] + ([copy] if copy else []))
        k = int(rng.choice(len(answers), p=scores / scores.sum()))
        out.append(dataclasses.replace(e, target=answers[k]))
        weights.append(float(scores[k]))
    return out, weights


def _warn_unlabeled_vqa(task: str, examples) -> None:
    """Real VQA training examples without a soft ``label`` (a ``data.hf_dataset``'s rows carry none) train
    on their one target at weight 1 under ``data.vqa_targets=sampled``: said once, not silently."""
    unlabeled = sum(1 for e in examples if e.extra.get("label") is None)
    if unlabeled:
        where = getattr(examples, "source", None)
        logger.warning(f"data.vqa_targets=sampled: {unlabeled} of {len(examples)} {task} training examples"
                       f"{' (' + str(where) + ')' if where else ''} have no soft 'label' (VL-T5's VQA files do; "
                       "data.hf_dataset rows without an answers column do not), so they train on their target at weight 1, as "
                       "data.vqa_targets=best does")


class TrainLoader:
    """Iterator of this rank's micro-batches; one task per optimizer step, the same on every rank."""

    def __init__(self, cfg, tokenizer, rank: int = 0, world_size: int = 1, vision_transform=None):
        from vlscale.config import check_run_config

        check_run_config(cfg, "build_train_loader")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        from vlscale.engine.deepspeed_config import global_batch_size, resolve_batch

        cfg = resolve_batch(cfg, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.micro = cfg.train.micro_batch_size
        self.accum = cfg.train.gradient_accumulation_steps
        self.examples = {t: load_examples(cfg, t, "train") for t in cfg.data.tasks}
        for t, ex in self.examples.items():
            if not ex:
                raise _no_examples(cfg, t, "train", ex, 0)
        self.sources = {t: build_visual_source(cfg, t, "train") for t in cfg.data.tasks}
        for t, ex in self.examples.items():
            self.examples[t] = check_visual_ids(cfg, t, "train", ex, self.sources[t])
            if not self.examples[t]:
                raise _no_examples(cfg, t, "train", self.examples[t], len(ex))
        vqa_like = [t for t in cfg.data.tasks if get_task(t).format == "vqa"]
        if cfg.data.vqa_targets == "sampled" and vqa_like:
            if cfg.data.source == "synthetic":  # no warning: nothing is lost, but said
                logger.info("data.vqa_targets=sampled: the synthetic world's questions carry no soft 'label' (their "
                            "target is the majority of their 10 annotators' answers), so training draws that target "
                            "at weight 1, as data.vqa_targets=best does")
            else:
                for t in vqa_like:
                    _warn_unlabeled_vqa(t, self.examples[t])
        self.collator = Collator(tokenizer, cfg, vision_transform)
        self.sampler = MultitaskSampler({t: len(ex) for t, ex in self.examples.items()},
                                        global_batch_size(cfg, world_size), seed=cfg.train.seed,
                                        sampling=cfg.data.sampling, temperature=cfg.data.temperature)
        self.step = 0  # optimizer steps fully consumed
        self._micro_index = 0  # micro-batches of the current step already handed out
        self._parts: dict[int, tuple[str, list[list[tuple[int, int]]]]] = {}  # steps' parts, from the current on
        self._micro_batches: dict[tuple[int, int], tuple] = {}  # _micro_batch's, from the current position on
        self.read_ahead = ReadAhead(read_ahead_threads(cfg, self.sources.values()), "vlscale-train-images")

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        position = (self.step, self._micro_index)
        task, examples, weights = self._micro_batch(*position)
        visual_inputs = self.read_ahead.get(position, lambda: self._visual_inputs(task, examples), self._upcoming)
        batch = self.collator(examples, visual_inputs=visual_inputs)
        if weights is not None:
            batch["loss_weights"] = torch.tensor(weights, dtype=torch.float32)
        self._micro_index += 1
        if self._micro_index == self.accum:
            self.step += 1
            self._micro_index = 0
            self._parts = {s: p for s, p in self._parts.items() if s >= self.step}
        self._micro_batches.pop(position, None)
        return batch

    def _micro_batch(self, step: int, micro_index: int) -> tuple[str, list, Optional[list[float]]]:
        """Micro-batch ``micro_index`` of step ``step`` on this rank: its task, examples (VQA's sampled targets
        drawn) and loss weights (None but for sampled targets); kept from when it is read ahead until it is handed
        out (drawing a micro-batch's 16 sampled targets took ~0.5 ms)."""
        position = (step, micro_index)
        if position in self._micro_batches:
            return self._micro_batches[position]
        if step not in self._parts:
            self._parts[step] = self._step_parts(step)
        task, parts = self._parts[step]
        examples = [self.examples[task][i] for i, _ in parts[micro_index]]
        weights = None
        if get_task(task).format == "vqa" and self.cfg.data.vqa_targets == "sampled":
            examples, weights = sampled_vqa_targets(examples, self.cfg.train.seed, step,
                                                    [copy for _, copy in parts[micro_index]])
        self._micro_batches[position] = task, examples, weights
        return task, examples, weights

    def _visual_inputs(self, task: str, examples: list) -> dict:
        return self.collator.visual_inputs(examples, fetch_visuals(self.sources[task], examples))

    def _upcoming(self):
        """(position, reading) of those of the next ``read_ahead.ahead`` micro-batches whose images are read (not
        cached features): what :class:`~vlscale.data.read_ahead.ReadAhead` starts ahead."""
        step, micro = self.step, self._micro_index
        for _ in range(self.read_ahead.ahead):
            micro += 1
            if micro == self.accum:
                step, micro = step + 1, 0
            task, examples, _ = self._micro_batch(step, micro)
            if self.sources[task].kind == "images":
                yield (step, micro), (lambda task=task, examples=examples: self._visual_inputs(task, examples))

    def close(self) -> None:
        """Stop the threads reading ahead (the loader reads in its own thread afterwards)."""
        self.read_ahead.close()

    def _step_parts(self, step: int) -> tuple[str, list[list[tuple[int, int]]]]:
        """Step ``step``'s task and this rank's micro-batches of (index, copy): copy counts the index's
        earlier occurrences in the step's global batch (the same for any number of ranks)."""
        task, indices = self.sampler.step(step)
        seen: dict[int, int] = {}
        pairs = []
        for i in indices:
            pairs.append((i, seen.get(i, 0)))
            seen[i] = pairs[-1][1] + 1
        return task, shard(pairs, self.rank, self.world_size, self.micro, self.accum)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_index": self._micro_index, "sampler": self.sampler.state_dict(),
                "world_size": self.world_size, "accum": self.accum}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly; across world sizes too when the global batch is the same (at a step boundary). A state
        without ``sampler`` or ``step`` is a DataError naming it."""
        check_state_keys(state, ("sampler", "step"), "TrainLoader", "loader")
        sampler_state = dict(state["sampler"], position=state["step"])
        self.sampler.load_state_dict(sampler_state)
        if state.get("micro_index", 0) and (state.get("world_size"), state.get("accum")) != (self.world_size, self.accum):
            raise ValueError(f"TrainLoader.load_state_dict: saved mid-step (micro-batch {state['micro_index']}) with "
                             f"world_size={state.get('world_size')}, accum={state.get('accum')}; resume with those, "
                             "or from a step boundary")
        self.step = int(state["step"])
        self._micro_index = int(state.get("micro_index", 0))
        self._parts, self._micro_batches = {}, {}


def build_train_loader(cfg, tokenizer, rank: int = 0, world_size: int = 1, vision_transform=None) -> TrainLoader:
    """The multitask train loader over ``cfg.data.tasks`` (see :class:`TrainLoader`)."""
    return TrainLoader(cfg, tokenizer, rank, world_size, vision_transform)


def one_per_input(examples: list) -> list:
    """A captioning split as COCO evaluation scores it: one example per image (or clip) with all its references.
    The train splits of the caption tasks hold one example per reference caption (uid ``<id>#<k>``, the target
    that caption, the references all of them), so scoring them counted each image once per caption; those are
    merged into the first, with uid ``<id>`` (as val and test name an image). Other examples are kept as they are."""
    import dataclasses

    from vlscale.data.real import ExampleList

    out, seen = [], set()
    for e in examples:
        base, sep, k = str(e.uid).rpartition("#")
        if sep and k.isdigit():
            if (base, tuple(e.image_ids), e.text) in seen:
                continue
            seen.add((base, tuple(e.image_ids), e.text))
            e = dataclasses.replace(e, uid=base)
        out.append(e)
    if isinstance(examples, ExampleList):
        out = ExampleList(out, source=examples.source)
        out.merge_skips(examples)
    return out


def eval_examples(cfg, task: str, split: str, max_examples: Optional[int] = None,
                  require_answers: bool = True, memo: Optional[dict] = None) -> tuple[list, object]:
    """The (first ``max_examples``) examples of ``task`` / ``split`` to evaluate and their visual source,
    checked: some examples, every visual id present (:func:`check_visual_ids`). The trainer calls it at
    start-up for the splits it will evaluate, so a bad file shows before training, not after.
    ``require_answers``: see :func:`load_examples`. A captioning task's examples are one per image
    (:func:`one_per_input`), in any split, so ``max_examples`` counts images. ``memo``: a dict (of one config's
    reads) that keeps the result for the next call: a training run's periodic evaluations read the split once
    (a VQAv2-sized val file took ~13 s and ~0.9 GB to parse, each time)."""
    key = (task, split, max_examples, require_answers)
    if memo is not None and key in memo:
        return memo[key]
    examples = load_examples(cfg, task, split, require_answers)
    if get_task(task).metric == "cider":
        examples = one_per_input(examples)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise _no_examples(cfg, task, split, examples, 0)
    source = build_visual_source(cfg, task, split)
    loaded, examples = len(examples), check_visual_ids(cfg, task, split, examples, source)
    if not examples:
        raise _no_examples(cfg, task, split, examples, loaded)
    if memo is not None:
        memo[key] = examples, source
    return examples, source


class EvalBatches:
    """:func:`eval_batches`' result: an iterator over this rank's batches with ``len()`` (their number, for a
    progress bar's total) and ``examples``: every example of the split evaluated, on all ranks."""

    def __init__(self, examples: list, batches: Iterator[dict], count: int):
        self.examples, self._batches, self._count = examples, batches, count

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def __len__(self) -> int:
        return self._count


def eval_batches(cfg, tokenizer, task: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_examples: Optional[int] = None, vision_transform=None,
                 require_answers: bool = True, memo: Optional[dict] = None) -> EvalBatches:
    """Batches of this rank's share (strided) of ``task`` / ``split``; ``batch["valid"]`` marks real examples.
    ``require_answers``: see :func:`load_examples`; ``memo``: see :func:`eval_examples`.

    Every rank gets the same number of equally sized batches: short shards are padded by repeating
    examples, flagged ``valid=False``, so synchronised generation on all ranks never hangs.
    """
    if batch_size <= 0:
        raise ValueError(f"eval batch_size={batch_size} must be > 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    examples, source = eval_examples(cfg, task, split, max_examples, require_answers, memo)
    collator = Collator(tokenizer, cfg, vision_transform)
    per_rank = math.ceil(len(examples) / world_size)
    mine = list(range(rank, len(examples), world_size))
    fill = mine or [0]
    order = mine + [fill[k % len(fill)] for k in range(per_rank - len(mine))]
    valid = [True] * len(mine) + [False] * (per_rank - len(mine))

    starts = range(0, per_rank, batch_size)
    chunks = [[examples[i] for i in order[start:start + batch_size]] for start in starts]

    def reading(k: int):
        return lambda: collator.visual_inputs(chunks[k], fetch_visuals(source, chunks[k]))

    def generate():
        ahead = ReadAhead(read_ahead_threads(cfg, [source]), "vlscale-eval-images")
        try:
            for k, start in enumerate(starts):
                inputs = ahead.get(k, reading(k), lambda k=k: ((j, reading(j)) for j in range(k + 1, len(chunks))))
                batch = collator(chunks[k], visual_inputs=inputs)
                batch["valid"] = torch.tensor(valid[start:start + batch_size], dtype=torch.bool)
                yield batch
        finally:
            ahead.close()

    return EvalBatches(examples, generate(), math.ceil(per_rank / batch_size))
