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

Custom tasks. A run may add tasks of its own in a built-in task's format (``data.custom_tasks`` in the run config,
e.g. ``okvqa: {like: vqa}``): :func:`custom_task` makes the new task's spec, the built-in's with the new name and
prefix, and ``format`` naming the built-in, whose loader, file names, evaluation and submission format every
other module picks by ``get_task(name).format`` (never by the task's name). :func:`get_task` is the one place a
name becomes a spec, for built-in and custom tasks alike. The run config's validation (``DataConfig``) declares its
custom tasks here (:func:`declare_custom_tasks`), so the config need not be passed to the 60-odd callers: every
process that reads a run's config (each rank of training, ``evaluate.py`` and ``predict.py`` from the adapter's
``adapter_config.json``, ``replicate.py``'s rows) builds a ``RunConfig`` before it looks a task up. Declarations
add up in a process (a later one of the same name replaces the earlier): a config loaded later that does not
declare a name cannot drop it from under a run, and the config's own validation, not this registry, decides which
names its ``data.tasks`` may hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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
    format: str = ""
    """The built-in task whose files, loader, evaluation and submission format this task uses: its own name for a
    built-in (filled in), the ``like`` of a custom task."""

    def __post_init__(self):
        if not self.format:
            object.__setattr__(self, "format", self.name)


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


_CUSTOM: dict[str, TaskSpec] = {}
"""The custom tasks declared in this process (:func:`declare_custom_tasks`)."""
CUSTOM_KEYS = ("like", "prefix")
"""What a custom task's declaration may set; everything else is its ``like``'s."""
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
"""A task name: a folder name under data.root and a part of parameter names (no dots, no path separators)."""


def get_task(name: str) -> TaskSpec:
    """The spec of a built-in task or of a custom task a run config declared in this process."""
    spec = TASKS.get(name) or _CUSTOM.get(name)
    if spec is None:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}"
                       + (f", declared custom tasks: {sorted(_CUSTOM)}" if _CUSTOM else ""))
    return spec


def is_task(name) -> bool:
    """Whether ``name`` is a built-in task or a custom task declared in this process."""
    return isinstance(name, str) and (name in TASKS or name in _CUSTOM)


def custom_task(name: str, declaration, declared=()) -> TaskSpec:
    """The spec of custom task ``name`` declared as ``declaration`` (``{like: BUILTIN, prefix: "..."}``, prefix
    defaulting to ``"<name>:"``): its ``like``'s spec under the new name and prefix; ``declared``: the names of the
    custom tasks declared beside it (not a ``like``). Raises ValueError naming
    ``data.custom_tasks.<name>`` and the value at fault."""
    key = f"data.custom_tasks.{name}"
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or name == "shared":
        raise ValueError(f"data.custom_tasks: task name {name!r} is not usable: letters, digits, '_' and '-' "
                         "(a folder under data.root and a part of parameter names; no dots), not 'shared'")
    if name in TASKS:
        raise ValueError(f"{key}: {name!r} is a built-in task; give the new task a name of its own "
                         f"(built-in tasks: {sorted(TASKS)})")
    if not isinstance(declaration, dict):
        raise ValueError(f"{key}={declaration!r} must be a mapping, e.g. {{like: vqa, prefix: '{name}:'}}")
    unknown = [k for k in declaration if k not in CUSTOM_KEYS]
    if unknown:
        raise ValueError(f"unknown key {key}.{unknown[0]}; valid keys: {list(CUSTOM_KEYS)}")
    like = declaration.get("like")
    if like is None:
        raise ValueError(f"{key} needs 'like': the built-in task whose format it has, one of {list(TASKS)}")
    if like not in TASKS:
        why = " but a custom task: a custom task reads the files of a built-in one" \
            if isinstance(like, str) and (like in declared or like in _CUSTOM) else ""
        raise ValueError(f"{key}.like={like!r} is not a built-in task{why}; choose one of {list(TASKS)}")
    prefix = declaration.get("prefix", f"{name}:")
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"{key}.prefix={prefix!r} must be a non-empty string (default '{name}:')")
    return replace(TASKS[like], name=name, prefix=prefix, format=like)


def declare_custom_tasks(declarations: dict) -> dict[str, TaskSpec]:
    """Check ``data.custom_tasks``' ``declarations`` and make them known to :func:`get_task` in this process
    (replacing an earlier declaration of the same name); -> their specs."""
    specs = {name: custom_task(name, d, declarations) for name, d in (declarations or {}).items()}
    _CUSTOM.update(specs)
    return specs


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
