"""Task metrics. ``score_task`` gives every task's headline metric (named by ``TaskSpec.metric``).

| task | headline | others |
|---|---|---|
| vqa | ``vqa_score`` (official normalisation, 10-answer leave-one-out) | ``vqa_score_<type>`` with ``answer_types`` |
| gqa | ``exact_match`` (the string as generated, as GQA's eval.py and VL-T5) | |
| nlvr2 | ``accuracy`` | ``consistency`` when ``groups`` are given |
| tvqa, how2qa | ``accuracy`` (choice index) | |
| caption, tvc, yc2c | ``cider`` (CIDEr-D) | ``bleu4``, ``rouge_l``; ``meteor`` with ``java_metrics=True`` |

Captions are tokenised by Python (:func:`vlscale.metrics.cider.tokenize`) for every caption metric, or with
``java_metrics=True`` by coco-caption's PTB tokenizer (Java), CIDEr-D included: coco-caption's numbers.

All values are fractions (CIDEr on coco-caption's scale); papers print them x100.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Hashable, Optional

from .captioning import caption_scores
from .cider import cider, cider_per_image
from .classification import accuracy, check_types, consistency, exact_match, normalize_answer, nlvr2_scores
from .vqa import normalize_vqa_answer, vqa_accuracy, vqa_score

logger = logging.getLogger(__name__)

VQA_ANSWER_TYPE_ORDER = {"yes/no": 0, "number": 1, "other": 2}
"""The order VQA v2's evaluation reports its answer types in (any other type follows, alphabetically)."""

__all__ = ["vqa_score", "vqa_accuracy", "normalize_vqa_answer", "cider", "cider_per_image",
           "caption_scores", "exact_match", "accuracy", "consistency", "normalize_answer",
           "score_task"]


def _fast_caption_scores(predictions: dict, references: dict) -> dict[str, float]:
    """CIDEr-D, BLEU-4 and ROUGE-L with Python tokenisation: no Java, cheap enough for every eval.

    BLEU-4 and ROUGE-L come from pycocoevalcap (the ``metrics`` extra); without it they are left
    out with a warning and CIDEr-D (ours) is still computed.
    """
    out = {"cider": cider(predictions, references)}
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        logger.warning("score_task: bleu4 and rouge_l need pycocoevalcap (pip install 'vlscale[metrics]'); "
                       "reporting cider only")
        return out
    from .captioning import _simple_tokenized

    res, gts = _simple_tokenized(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["bleu4"] = float(bleu[3])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    return out


def score_task(task: str, predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
               groups: Optional[dict[Hashable, str]] = None, *, java_metrics: bool = False,
               answer_types: Optional[dict[Hashable, str]] = None) -> dict[str, float]:
    """Score one task's predictions (``uid -> text``) against ``uid -> reference list``.

    Only predicted ids are scored; references without a prediction are reported in a warning.
    ``groups`` (``uid -> group``) adds NLVR2 consistency. ``java_metrics`` runs the caption tasks
    through :func:`caption_scores` (PTB tokenizer for every caption metric + METEOR, Java) instead of the
    Java-free set. ``answer_types`` (VQA, ``uid -> "yes/no" | "number" | "other"``, as VQA v2's annotations give
    them) adds the official evaluation's per-answer-type scores, ``vqa_score_yes_no``, ``vqa_score_number``,
    ``vqa_score_other``: each over the predicted ids of that type.
    """
    from vlscale.data.tasks import get_task

    spec = get_task(task)
    check_types(predictions, references, f"score_task({task!r})")
    for name, given in (("groups", groups), ("answer_types", answer_types)):
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"score_task({task!r}): {name} must be a dict of id -> str, got {type(given).__name__}")
    if not predictions:
        raise ValueError(f"score_task({task!r}): no predictions to score")
    for uid in predictions:
        if uid not in references:
            raise KeyError(f"score_task({task!r}): prediction id {uid!r} is not in the references")
    unpredicted = len(references) - len(predictions)
    if unpredicted > 0:
        logger.warning(f"score_task({task!r}): {unpredicted} reference ids have no prediction; "
                       f"scoring the {len(predictions)} predicted ones")
    refs = {}
    for uid in predictions:
        r = references[uid]
        refs[uid] = [r] if isinstance(r, str) else list(r or [])
        if not refs[uid]:
            raise ValueError(f"score_task({task!r}): references[{uid!r}] is empty")

    if spec.metric == "vqa_score":
        out = {"vqa_score": vqa_accuracy(predictions, refs)}
        kinds = {answer_types[u] for u in predictions if u in answer_types} if answer_types else set()
        named = {}
        for kind in sorted(kinds, key=lambda k: (VQA_ANSWER_TYPE_ORDER.get(k, 3), k)):  # the official order first
            ids = [u for u in predictions if answer_types.get(u) == kind]
            key = f"vqa_score_{re.sub(r'[^0-9A-Za-z]+', '_', kind)}"
            if key in named:  # "a / b" and "a_b": one would overwrite the other's score
                raise ValueError(f"score_task({task!r}): answer types {named[key]!r} and {kind!r} would both be "
                                 f"reported as {key!r}; rename one")
            named[key] = kind
            out[key] = vqa_accuracy({u: predictions[u] for u in ids}, {u: refs[u] for u in ids})
    elif spec.metric == "exact_match":
        out = {"exact_match": exact_match(predictions, refs)}
    elif spec.metric == "accuracy":
        out = nlvr2_scores(predictions, refs, groups) if spec.format == "nlvr2" else \
            {"accuracy": accuracy(predictions, refs)}
    elif spec.metric == "cider":
        out = caption_scores(predictions, refs) if java_metrics else _fast_caption_scores(predictions, refs)
    else:  # a TaskSpec naming a metric this module does not know
        raise ValueError(f"score_task: task {task!r} names metric {spec.metric!r}, which vlscale.metrics "
                         "does not implement (vqa_score, exact_match, accuracy, cider)")
    return out
