"""Task registry: every V&L task is text generation with a task prefix.

Each :class:`TaskSpec` names the prefix, whether inputs are images or video, how many images an
example has (NLVR2: two), the target format, the generation settings used at evaluation and the
metric. Loaders (``vlscale.data.<source>``) turn files into :class:`Example` records; the collator
turns examples into a batch dict (``vlscale.data.collate`` has the full layout):

    batch = {
        "task": str,                       # one task per batch
        "input_ids": LongTensor (B, L),    # "<prefix> <text>" tokenised, padded
        "attention_mask": LongTensor (B, L),
        "labels": LongTensor (B, T),       # target ids + eos, pad = -100
        # images: raw CLIP grid/patch features from a cache, or images encoded on the fly
        "vis_feats": FloatTensor (B, N_img, T, D)  |  "pixel_values": FloatTensor (B, N_img, 3, S, S),
        # video: per-frame CLIP embeddings, or the frames themselves; padded frames masked
        "vis_feats": FloatTensor (B, 1, F, E)  |  "pixel_values": FloatTensor (B, 1, F, 3, S, S),
        "vis_mask": LongTensor (B, 1, F),  # video only
        "uids": list[str], "targets": list[str], "references": list[list[str]],
        "groups": list[str] | None,        # NLVR2 consistency groups
        "valid": BoolTensor (B,),          # evaluation: False for padding examples
        "loss_weights": FloatTensor (B,),  # training VQA with data.vqa_targets=sampled: the answers' scores
    }

The model pools grids and computes visual positions itself (no boxes in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class TaskSpec:
    name: str
    prefix: str
    modality: str  # "image" or "video"
    n_images: int  # images per example (NLVR2: 2); 1 for video (a frame sequence)
    target: str  # "answer", "bool", "choice", "caption"
    num_beams: int
    max_new_tokens: int
    metric: str  # name of the headline metric in vlscale.metrics
    choices: tuple[str, ...] = ()
    """Evaluation picks one of these targets instead of generating freely: the one whose first token
    (where the targets' tokenisations part) has the highest logit after one decoder step, as VL-T5 /
    VL-Adapter score NLVR2 (``true_logit > false_logit``). Listed so that a tie picks the reference's
    answer (argmax takes the first maximum; the reference says "false" on a tie)."""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        # VL-Adapter's multitask.py generates VQA/GQA answers (greedy) and captions (5 beams) with transformers'
        # max_length of 20 (gen_max_length for captions; the config's default for VQA/GQA, which pass none),
        # which counts the decoder's start token: 19 new tokens. multitask_video.py decodes TVC / YC2C captions the
        # same way (max_length=gen_max_length, default 20; its video scripts pass no --gen_max_length)
        TaskSpec("vqa", "vqa:", "image", 1, "answer", 1, 19, "vqa_score"),
        TaskSpec("gqa", "gqa:", "image", 1, "answer", 1, 19, "exact_match"),
        TaskSpec("nlvr2", "nlvr:", "image", 2, "bool", 1, 3, "accuracy", choices=("false", "true")),
        TaskSpec("caption", "caption:", "image", 1, "caption", 5, 19, "cider"),
        TaskSpec("tvqa", "tvqa:", "video", 1, "choice", 1, 3, "accuracy"),
        TaskSpec("how2qa", "how2qa:", "video", 1, "choice", 1, 3, "accuracy"),
        TaskSpec("tvc", "tvc:", "video", 1, "caption", 5, 19, "cider"),
        TaskSpec("yc2c", "yc2c:", "video", 1, "caption", 5, 19, "cider"),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


@dataclass
class Example:
    """One training/evaluation example of any task.

    ``text`` is the input without the task prefix (the collator adds it). ``target`` is the
    training target text. ``image_ids`` are keys into the task's visual source (one per image; a
    video id for video tasks). ``references`` are what the scorer compares against: VQA's 10 raw
    answers, a caption's reference list, or the single gold label.
    """

    task: str
    uid: str
    text: str
    target: str
    image_ids: list[str]
    references: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    source: Optional[str] = None  # file the record came from, for error messages
