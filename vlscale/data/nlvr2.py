"""NLVR2 in the VL-T5 / VL-Adapter release format (``train.json``, ``valid.json``, ``test.json``).

Each file is a JSON list of statements about a pair of images::

    {"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1",
     "sent": "The left image contains twice the number of dogs as the right image.",
     "label": 0, "uid": "nlvr2_dev_0"}

``label`` is 0/1 (true/false and "True"/"False" are accepted too); ``target`` is "true" or
"false"; ``image_ids`` are ``[img0, img1]``; ``uid`` is the record's ``uid`` (else, when the key
is absent, the identifier; an empty ``uid`` is malformed); ``extra["identifier"]`` keeps the identifier
(the key of a leaderboard submission). A record without ``label`` is malformed, except for
``launchers/evaluate.py --predict-only`` (``require_answers=False``): an example with an empty
``target`` and no ``references``.

Consistency groups: an identifier is ``split-set-pair-sentence``; the official NLVR2 evaluation
(lil-lab/nlvr ``nlvr2/eval/metrics.py``) groups the examples of one *sentence* across its image
pairs by blanking the pair field, so ``extra["group"]`` of "dev-850-0-0" is "dev-850--0".
Identifiers with fewer than four fields form their own group (the whole identifier).
"""

from __future__ import annotations

from vlscale.data.real import ExampleList, Record, parse_records, read_json_list
from vlscale.data.tasks import Example

ID_KEYS = ("uid", "identifier")


def consistency_group(identifier: str) -> str:
    parts = identifier.split("-")
    if len(parts) < 4:
        return identifier
    parts[2] = ""
    return "-".join(parts)


def parse_bool_label(rec: Record, key: str = "label") -> bool:
    """0/1, true/false or "True"/"False" -> bool."""
    value = rec.get(key, (int, bool, str))
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise rec.error(key, f"must be 0/1 (or true/false), got {value!r}")


def parse_nlvr2(rec: Record) -> list[Example]:
    identifier = rec.text("identifier")
    images = [rec.text("img0"), rec.text("img1")]
    sent = rec.text("sent")
    target = ("true" if parse_bool_label(rec) else "false") if rec.answers("label") else ""
    uid = rec.ident("uid", None) or identifier  # ident refuses an empty string
    return [Example(task="nlvr2", uid=uid, text=sent, target=target, image_ids=images,
                    references=[target] if target else [],
                    extra={"identifier": identifier, "group": consistency_group(identifier)},
                    source=rec.path)]


def load_nlvr2(path, skip_bad_records: bool = False, require_answers: bool = True) -> ExampleList:
    """All statements of one NLVR2 file, one :class:`Example` each."""
    return parse_records(path, read_json_list(path, "NLVR2 annotations"), parse_nlvr2, skip_bad_records, ID_KEYS,
                         require_answers)
