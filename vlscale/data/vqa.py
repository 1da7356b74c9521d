"""VQAv2 in the VL-T5 / VL-Adapter release format (Karpathy splits: ``karpathy_{train,val,test}.json``).

Each file is a JSON list of questions::

    {"img_id": "COCO_val2014_000000393225", "sent": "What is the man holding?",
     "question_id": 393225001, "label": {"bat": 1.0, "stick": 0.3},
     "answer_type": "other", "question_type": "what is the",
     "answers": [{"answer": "bat", ...}, ... 10 raw human answers, or plain strings]}

``target`` is the highest-scoring ``label`` answer (ties: the answer given most often among the
raw answers, counted after the official normalisation, then the alphabetically first); an empty ``label``
(no answer in the vocabulary) falls back to the most frequent normalised answer (:func:`vqa_target`), and so
does a record without ``label`` (the official annotations' raw answers alone), whose soft label is made from the
answers (:func:`vqa_soft_label`, as for an HF dataset). With ``data.vqa_targets=sampled`` training draws the target
from ``label`` instead, as VL-T5 does (:func:`vlscale.data.sampled_vqa_targets`). ``references`` are the raw
answers, which the official scorer (``vlscale.metrics.vqa_score``) needs. ``extra`` keeps ``label`` (soft scores),
``answer_type`` and ``question_type``. The same loader reads LXMERT-style ``minival.json`` /
``nominival.json`` if they carry ``answers``. Records without ``label`` and ``answers`` (VL-T5's
``test.json``, split ``test2015``, whose answers EvalAI holds) are refused, except for ``launchers/evaluate.py
--predict-only`` (``require_answers=False``): an example with an empty ``target`` and no ``references``.
``uid`` is the ``question_id`` (the EvalAI submission's key).
"""

from __future__ import annotations

from collections import Counter

from vlscale.data.real import ExampleList, Record, best_answer, parse_records, read_json_list
from vlscale.data.tasks import Example

ID_KEYS = ("question_id",)


def vqa_soft_label(answers: list[str]) -> dict[str, float]:
    """A soft ``label`` from the human answers, as LXMERT / VL-T5 made theirs: each distinct answer, after the
    official normalisation, scores 0.3, 0.6, 0.9 for 1, 2, 3 annotators and 1.0 for 4 or more. (Theirs also
    drops answers outside the 3,129-answer vocabulary; here every answer is kept.)"""
    from vlscale.metrics.vqa import normalize_vqa_answer

    counts = Counter(a for a in (normalize_vqa_answer(x) for x in answers) if a)
    return {a: (0.0, 0.3, 0.6, 0.9)[c] if c < 4 else 1.0 for a, c in counts.items()}


def vqa_target(answers: list[str], label: dict[str, float] | None = None) -> str:
    """The answer to train on: ``label``'s top answer, ties going to the answer given most often; without a
    (non-empty) ``label``, the answer given most often. Answers are counted after the official normalisation,
    which ``label``'s keys went through too, so "two" and "2" count as one; answers that normalise to nothing
    ("the", ".") are not counted, unless no other is left."""
    from vlscale.metrics.vqa import normalize_vqa_answer

    if label:
        top = max(label.values())
        tied = {k: s for k, s in label.items() if s == top}
        if len(tied) == 1:  # the answers' counts only break ties
            return next(iter(tied))
    counts = Counter(n for n in map(normalize_vqa_answer, answers) if n) or Counter(answers)
    if label:
        return best_answer(tied, {k: counts[normalize_vqa_answer(k)] for k in tied})
    return best_answer({a: float(c) for a, c in counts.items()})


def raw_answers(rec: Record, key: str = "answers") -> list[str]:
    """The human answers, given as ``{"answer": str}`` objects or as strings."""
    answers = rec.get(key, list)
    if not answers:
        raise rec.error(key, "is empty (the VQA scorer needs the human answers)")
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, dict):
            a = a.get("answer")
        if not isinstance(a, str):
            raise rec.error(key, f"item {i} must be a string or an object with a string 'answer', got {answers[i]!r}")
        out.append(a.strip())
    return out


def parse_vqa(rec: Record) -> list[Example]:
    img_id = rec.text("img_id")
    question = rec.text("sent")
    qid = rec.ident("question_id")
    extra = {key: rec.get(key, str) for key in ("answer_type", "question_type") if key in rec.data}
    if not rec.answers("label", "answers"):
        return [Example(task="vqa", uid=qid, text=question, target="", image_ids=[img_id], extra=extra,
                        source=rec.path)]
    answers = raw_answers(rec)
    label = rec.score_map("label", allow_empty=True) if rec.data.get("label") is not None else None
    extra = {"label": vqa_soft_label(answers) if label is None else label, **extra}
    target = vqa_target(answers, label)
    return [Example(task="vqa", uid=qid, text=question, target=target, image_ids=[img_id],
                    references=answers, extra=extra, source=rec.path)]


def load_vqa(path, skip_bad_records: bool = False, require_answers: bool = True) -> ExampleList:
    """All questions of one VQA file, one :class:`Example` each."""
    return parse_records(path, read_json_list(path, "VQA annotations"), parse_vqa, skip_bad_records, ID_KEYS,
                         require_answers)
