"""GQA in the VL-T5 / VL-Adapter release format (``train.json``, ``valid.json``, ``testdev.json``).

Each file is a JSON list of questions::

    {"img_id": "2354786", "sent": "Is the sky dark?", "question_id": "02930152",
     "label": {"yes": 1.0}}

``target`` is the highest-scoring ``label`` answer (ties: alphabetically first), ``references``
is ``[target]`` (GQA is scored by exact match), ``extra["label"]`` keeps the scores. A record
without a non-empty ``label`` with a positive score is malformed (the unlabeled submission split is not supported).
"""

from __future__ import annotations

from vlscale.data.real import ExampleList, Record, best_answer, parse_records, read_json_list
from vlscale.data.tasks import Example

ID_KEYS = ("question_id",)


def parse_gqa(rec: Record) -> list[Example]:
    img_id = rec.text("img_id")
    question = rec.text("sent")
    qid = rec.ident("question_id")
    label = rec.score_map("label", allow_empty=False)
    if max(label.values()) <= 0:
        raise rec.error("label", f"has no answer with a score above 0: {label}")
    gold = best_answer(label)
    return [Example(task="gqa", uid=qid, text=question, target=gold, image_ids=[img_id],
                    references=[gold], extra={"label": label}, source=rec.path)]


def load_gqa(path, skip_bad_records: bool = False) -> ExampleList:
    """All questions of one GQA file, one :class:`Example` each."""
    return parse_records(path, read_json_list(path, "GQA annotations"), parse_gqa, skip_bad_records, ID_KEYS)
