"""GQA in the VL-T5 / VL-Adapter release format (``train.json``, ``valid.json``, ``testdev.json``).

Each file is a JSON list of questions::

    {"img_id": "2354786", "sent": "Is the sky dark?", "question_id": "02930152",
     "label": {"yes": 1.0}}

``target`` is the highest-scoring ``label`` answer (ties: alphabetically first), ``references``
is ``[target]`` (GQA is scored by exact match), ``extra["label"]`` keeps the scores. A record
with a ``label`` that is empty or has no positive score is malformed; one without ``label`` (the
submission split) too, except for ``launchers/evaluate.py --predict-only`` (``require_answers=False``):
an example with an empty ``target`` and no ``references``. ``uid`` is the ``question_id`` (the
submission's ``questionId``).
"""

from __future__ import annotations

from vlscale.data.real import ExampleList, Record, best_answer, parse_records, read_json_list
from vlscale.data.tasks import Example

ID_KEYS = ("question_id",)


def parse_gqa(rec: Record) -> list[Example]:
    img_id = rec.text("img_id")
    question = rec.text("sent")
    qid = rec.ident("question_id")
    if not rec.answers("label"):
        return [Example(task="gqa", uid=qid, text=question, target="", image_ids=[img_id], source=rec.path)]
    label = rec.score_map("label", allow_empty=False)
    if max(label.values()) <= 0:
        raise rec.error("label", f"has no answer with a score above 0: {label}")
    gold = best_answer(label)
    return [Example(task="gqa", uid=qid, text=question, target=gold, image_ids=[img_id],
                    references=[gold], extra={"label": label}, source=rec.path)]


def load_gqa(path, skip_bad_records: bool = False, require_answers: bool = True) -> ExampleList:
    """All questions of one GQA file, one :class:`Example` each."""
    return parse_records(path, read_json_list(path, "GQA annotations"), parse_gqa, skip_bad_records, ID_KEYS,
                         require_answers)
