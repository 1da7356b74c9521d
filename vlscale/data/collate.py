"""Collation: examples of one task + their visual inputs -> the model's batch dict.

    batch = {
        "task": str, "uids": list[str], "targets": list[str], "references": list[list[str]],
        "groups": list[str]                                (only when examples carry extra["group"]: NLVR2)
        "input_ids", "attention_mask": LongTensor (B, L)   "<prefix> <text>", <= data.max_input_length
        "labels": LongTensor (B, T)                        target ids + eos, pad -100, <= max_target_length
        # images (N_img per example: NLVR2 2, else 1)
        "pixel_values": FloatTensor (B, N_img, 3, S, S)    when the source gives images, or
        "vis_feats": FloatTensor (B, N_img, T, D)          raw grid from a feature cache
        # video (one frame sequence, padded to the longest in the batch, <= model.max_frames;
        # longer videos are subsampled uniformly)
        "pixel_values": FloatTensor (B, 1, F, 3, S, S) + "vis_mask": LongTensor (B, 1, F), or
        "vis_feats": FloatTensor (B, 1, F, E) + "vis_mask": LongTensor (B, 1, F)
    }

Whether images or features go in follows what the visual source returns (arrays / PIL images,
or tensors). No ``vis_boxes``: the model computes grid / frame positions itself.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Callable, Optional, Sequence

import torch

from vlscale.data.tasks import Example, get_task
from vlscale.log import ALL_RANKS

logger = logging.getLogger(__name__)
_WARNED_TRUNCATION: set = set()  # (task, data.<key>, max length) already logged in this process


def frame_indices(n: int, max_frames: int) -> list[int]:
    """All ``n`` frames, or ``max_frames`` of them spread uniformly (the centre of each segment)."""
    if n <= max_frames:
        return list(range(n))
    return [int((k + 0.5) * n / max_frames) for k in range(max_frames)]


def _is_features(item) -> bool:
    return isinstance(item, torch.Tensor)


class Collator:
    """``collator(examples, visuals)`` -> batch; ``visuals[i][j]`` is ``source[examples[i].image_ids[j]]``."""

    def __init__(self, tokenizer, cfg, vision_transform: Optional[Callable] = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._transform = vision_transform
        self._transform_lock = threading.Lock()  # made once, by whichever thread reading images comes first
        self.truncated = collections.Counter()  # (task, "max_input_length" | "max_target_length") -> examples cut

    @property
    def transform(self) -> Callable:
        with self._transform_lock:
            if self._transform is None:
                from vlscale.modeling.vision import image_transform

                self._transform = image_transform(self.cfg.model.vision, self.cfg.model.vision_pretrained)
            return self._transform

    # ------------------------------------------------------------------ text
    @contextlib.contextmanager
    def _right_sides(self):
        """Pad and truncate on the right whatever the tokenizer's own settings: labels padded on the
        left would shift every target token's decoder context, and inputs cut on the left lose the
        task prefix. The tokenizer's settings are restored afterwards."""
        tok = self.tokenizer
        saved = {k: getattr(tok, k) for k in ("padding_side", "truncation_side") if getattr(tok, k, "right") != "right"}
        for k in saved:
            setattr(tok, k, "right")
        try:
            yield tok
        finally:
            for k, v in saved.items():
                setattr(tok, k, v)

    def _tokenize(self, texts: list[str], examples: Sequence[Example], task: str, key: str) -> dict:
        """``texts`` tokenised, padded to the longest and cut at ``data.<key>`` tokens; a cut is counted in
        ``self.truncated`` and logged once per task (the text is longer than the model will see)."""
        max_length = getattr(self.cfg.data, key)
        with self._right_sides() as tok:
            enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            at_limit = [i for i, n in enumerate(enc["attention_mask"].sum(1).tolist()) if n >= max_length]
            lengths = [len(ids) for ids in tok([texts[i] for i in at_limit])["input_ids"]] if at_limit else []
        cut = [(i, n) for i, n in zip(at_limit, lengths) if n > max_length]
        if cut:
            self.truncated[(task, key)] += len(cut)
            if (task, key, max_length) not in _WARNED_TRUNCATION:
                _WARNED_TRUNCATION.add((task, key, max_length))
                i, n = cut[0]
                what = "inputs" if key == "max_input_length" else "targets"
                logger.warning(f"{task}: {len(cut)} of {len(texts)} {what} in a batch are longer than "
                               f"data.{key}={max_length} tokens and are cut to it (e.g. example "
                               f"{examples[i].uid!r}: {n} tokens); raise data.{key} to keep them whole "
                               f"(logged once per task and rank; Collator.truncated counts them)",
                               extra=ALL_RANKS)  # each rank cuts its own batches
        return enc

    def encode_text(self, examples: Sequence[Example], task: str) -> dict:
        prefix = get_task(task).prefix
        texts = [f"{prefix} {e.text}" if e.text else prefix for e in examples]
        enc = self._tokenize(texts, examples, task, "max_input_length")
        lab = self._tokenize([e.target for e in examples], examples, task, "max_target_length")
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    # ------------------------------------------------------------------ visual
    @staticmethod
    def _task(examples: Sequence[Example]) -> str:
        if not examples:
            raise ValueError("Collator: empty batch")
        task = examples[0].task
        others = sorted({e.task for e in examples} - {task})
        if others:
            raise ValueError(f"Collator: a batch holds one task; got {task!r} and {others}")
        return task

    def visual_inputs(self, examples: Sequence[Example], visuals: Sequence[Sequence]) -> dict:
        """The batch's visual part (``pixel_values`` or ``vis_feats``, video: and ``vis_mask``) from ``visuals``:
        no tokenizer is used, so a thread reading ahead may make it."""
        task = self._task(examples)
        if len(visuals) != len(examples):
            raise ValueError(f"Collator: {len(examples)} examples but {len(visuals)} visual inputs")
        spec = get_task(task)
        for e, items in zip(examples, visuals):
            if len(e.image_ids) != spec.n_images or len(items) != spec.n_images:
                raise ValueError(f"{task} example {e.uid!r}: needs {spec.n_images} image id(s), has "
                                 f"{len(e.image_ids)} ids and {len(items)} visual inputs")
        return self._video(examples, visuals) if spec.modality == "video" else self._images(examples, visuals,
                                                                                            spec.n_images)

    def _images(self, examples, visuals, n_images: int) -> dict:
        flat = [item for items in visuals for item in items]
        if all(_is_features(x) for x in flat):
            shapes = {tuple(x.shape) for x in flat}
            if len(shapes) != 1:
                bad = next(e.uid for e, items in zip(examples, visuals)
                           if any(tuple(x.shape) != tuple(flat[0].shape) for x in items))
                raise ValueError(f"{examples[0].task}: cached grid features differ in shape within a batch "
                                 f"({sorted(shapes)}; e.g. example {bad!r}); was the cache made with one model?")
            feats = torch.stack([x.float() for x in flat])
            return {"vis_feats": feats.reshape(len(examples), n_images, *feats.shape[1:])}
        if any(_is_features(x) for x in flat):
            raise ValueError(f"{examples[0].task}: a batch mixes images and cached features")
        pixels = self.transform(flat)
        return {"pixel_values": pixels.reshape(len(examples), n_images, *pixels.shape[1:])}

    def _video(self, examples, visuals) -> dict:
        max_frames = self.cfg.model.max_frames
        seqs = []
        for e, items in zip(examples, visuals):
            item = items[0]
            n = item.shape[0] if _is_features(item) else len(item)
            if n == 0:
                raise ValueError(f"{e.task} example {e.uid!r}: video {e.image_ids[0]!r} has no frames")
            idx = frame_indices(n, max_frames)
            seqs.append(item[idx] if _is_features(item) else [item[i] for i in idx])
        frames = max(len(s) for s in seqs)
        mask = torch.zeros(len(seqs), 1, frames, dtype=torch.long)
        for b, s in enumerate(seqs):
            mask[b, 0, :len(s)] = 1
        if all(_is_features(s) for s in seqs):
            dims = {s.shape[1] for s in seqs}
            if len(dims) != 1:
                raise ValueError(f"{examples[0].task}: frame features of different widths {sorted(dims)} in one batch")
            feats = torch.zeros(len(seqs), 1, frames, seqs[0].shape[1])
            for b, s in enumerate(seqs):
                feats[b, 0, :len(s)] = s.float()
            return {"vis_feats": feats, "vis_mask": mask}
        if any(_is_features(s) for s in seqs):
            raise ValueError(f"{examples[0].task}: a batch mixes video frames and cached frame features")
        pixels = self.transform([f for s in seqs for f in s])
        out = pixels.new_zeros(len(seqs), 1, frames, *pixels.shape[1:])
        start = 0
        for b, s in enumerate(seqs):
            out[b, 0, :len(s)] = pixels[start:start + len(s)]
            start += len(s)
        return {"pixel_values": out, "vis_mask": mask}

    # ------------------------------------------------------------------ batch
    def __call__(self, examples: Sequence[Example], visuals: Optional[Sequence[Sequence]] = None, *,
                 visual_inputs: Optional[dict] = None) -> dict:
        """The batch of ``examples``; its visual part from ``visuals`` or, made beforehand (in a thread reading
        ahead), :meth:`visual_inputs`' result for these examples."""
        task = self._task(examples)
        if visual_inputs is None:
            visual_inputs = self.visual_inputs(examples, visuals)
        batch = {"task": task}
        batch.update(self.encode_text(examples, task))
        batch.update(visual_inputs)
        batch["uids"] = [e.uid for e in examples]
        batch["targets"] = [e.target for e in examples]
        batch["references"] = [list(e.references) or [e.target] for e in examples]
        if any("group" in e.extra for e in examples):  # NLVR2 consistency groups
            batch["groups"] = [str(e.extra.get("group", e.uid)) for e in examples]
        return batch


def fetch_visuals(source, examples: Sequence[Example]) -> list[list]:
    """``[[source[id] for id in e.image_ids] for e in examples]``, with the example named on failure
    (a missing id: KeyError; an unreadable file: the source's DataError, the example added). Features
    holding NaN or inf are refused here, naming them, rather than as a non-finite loss later."""
    from vlscale.data.real import DataError, DataFileNotFound

    out = []
    for e in examples:
        where = f"{e.task} example {e.uid!r}" + (f" (from {e.source})" if e.source else "")
        try:
            items = [source[i] for i in e.image_ids]
        except KeyError as err:
            raise KeyError(f"{where}: {err.args[0] if err.args else err}") from None
        except DataError as err:
            cls = DataFileNotFound if isinstance(err, FileNotFoundError) else DataError
            raise cls(f"{where}: {err}") from err
        for i, x in zip(e.image_ids, items):
            if _is_features(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                rows = "" if x.dim() < 2 else \
                    f" (first in row {int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])} of {len(x)})"
                raise DataError(f"{where}: the features of {i!r} in {source!r} hold NaN or inf{rows}; write them "
                                "again (launchers/extract_features.py makes a cache from the images or frames)")
        out.append(items)
    return out
