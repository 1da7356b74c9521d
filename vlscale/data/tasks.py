"""Task registry: every V&L task is text generation with a task prefix.

Each :class:`TaskSpec` names the prefix, whether inputs are images or video, how many images an
example has (NLVR2: two), the target format, the generation settings used at evaluation and the
metric. Loaders (``vlscale.data.<source>``) turn files into :class:`Example` records; the collator
turns examples into a batch dict (see ``vlscale.data.collate``):

    batch = {
        "task": str,                       # one task per batch
        "input_ids": LongTensor (B, L),    # "<prefix> <text>" tokenised, padded
        "attention_mask": LongTensor (B, L),
        "labels": LongTensor (B, T),       # target ids, pad = -100 (absent at generation)
        "vis_feats": FloatTensor (B, N_img, V, D)   # precomputed features, or
        "pixel_values": FloatTensor (B, N_img, 3, H, W)  # images, encoded by frozen CLIP on the fly
        "vis_boxes": FloatTensor (B, N_img, V, 5),  # normalised x1, y1, x2, y2, area (grid/frames)
        "vis_mask": LongTensor (B, N_img, V),       # 1 for real visual tokens (video: frames present)
        "uids": list[str], "references": list[list[str]] | list[str]  # for scoring
    }
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


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("vqa", "vqa:", "image", 1, "answer", 1, 10, "vqa_score"),
        TaskSpec("gqa", "gqa:", "image", 1, "answer", 1, 10, "exact_match"),
        TaskSpec("nlvr2", "nlvr:", "image", 2, "bool", 1, 3, "accuracy"),
        TaskSpec("caption", "caption:", "image", 1, "caption", 5, 20, "cider"),
        TaskSpec("tvqa", "tvqa:", "video", 1, "choice", 1, 3, "accuracy"),
        TaskSpec("how2qa", "how2qa:", "video", 1, "choice", 1, 3, "accuracy"),
        TaskSpec("tvc", "tvc:", "video", 1, "caption", 5, 20, "cider"),
        TaskSpec("yc2c", "yc2c:", "video", 1, "caption", 5, 20, "cider"),
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
