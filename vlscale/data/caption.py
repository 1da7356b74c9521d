"""COCO captions, Karpathy split (``dataset_coco.json`` from Karpathy's NeuralTalk release).

The file is one JSON object ``{"images": [...], "dataset": "coco"}``; each image::

    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
     "split": "test", "cocoid": 391895, "sentids": [...],
     "sentences": [{"raw": "A man with a red helmet on a small moped.", "tokens": [...], ...}]}

``split`` is train / restval / val / test; restval (the rest of val2014) is merged into train,
as in VL-T5 and every Karpathy-split paper (113,287 training images, 5,000 val, 5,000 test).
The image id is the file name without its extension (the same ids as the VQA files, so
``coco/images/<id>.jpg`` serves both tasks).

- ``split="train"``: one example per reference caption (``uid`` "<image id>#<k>", ``target`` that
  caption); ``references`` hold all the image's captions.
- ``split="val"`` / ``"test"``: one example per image (``uid`` = image id) with every caption in
  ``references`` (``target`` = the first, for a validation loss).

``text`` is empty: the task prefix ("caption:") is the whole text input. ``extra`` keeps ``cocoid``
(the COCO caption server's ``image_id``), ``imgid``, ``filename``, ``filepath`` and the record's split.

An image without ``sentences`` is malformed, except for ``launchers/evaluate.py --predict-only``
(``require_answers=False``: images to caption for a submission): one example per image, in any split,
with an empty ``target`` and no ``references``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from vlscale.data.real import DataError, ExampleList, Record, parse_records, read_json
from vlscale.data.tasks import Example

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
RECORD_SPLITS = ("train", "restval", "val", "test")
ID_KEYS = ("filename", "cocoid", "imgid")


def _captions(rec: Record) -> list[str]:
    sentences = rec.get("sentences", list)
    if not sentences:
        raise rec.error("sentences", "is empty")
    out = []
    for i, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise rec.error("sentences", f"item {i} needs a non-empty string 'raw', got {s!r:.80}")
        out.append(raw.strip())
    return out


def karpathy_split(path, split: str) -> tuple:
    """The record splits ``split`` reads from ``path`` (``train``: train and restval); another name is refused."""
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{path}: COCO Karpathy split {split!r} is not one of {list(KARPATHY_SPLITS)}")
    return KARPATHY_SPLITS[split]


def load_coco_karpathy(path, split: str, skip_bad_records: bool = False, require_answers: bool = True) -> ExampleList:
    """Examples of one Karpathy split (``train`` includes restval)."""
    wanted = karpathy_split(path, split)
    data = read_json(path, "COCO Karpathy captions")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected an object with an 'images' list (Karpathy dataset_coco.json)")
    train = split == "train"

    def parse(rec: Record) -> list[Example]:
        record_split = rec.text("split")
        if record_split not in RECORD_SPLITS:
            raise rec.error("split", f"must be one of {list(RECORD_SPLITS)}, got {record_split!r}")
        if record_split not in wanted:
            return []
        filename = rec.text("filename")
        image_id = PurePosixPath(filename).stem
        captions = _captions(rec) if rec.answers("sentences") else []
        extra = {"karpathy_split": record_split, "filename": filename}
        for key in ("cocoid", "imgid"):
            value = rec.get(key, int, None)
            if value is not None:
                extra[key] = value
        if rec.get("filepath", str, None):
            extra["filepath"] = rec.data["filepath"]
        if not captions:
            return [Example(task="caption", uid=image_id, text="", target="", image_ids=[image_id], extra=extra,
                            source=rec.path)]
        if train:
            return [Example(task="caption", uid=f"{image_id}#{k}", text="", target=c, image_ids=[image_id],
                            references=list(captions), extra=dict(extra), source=rec.path)
                    for k, c in enumerate(captions)]
        return [Example(task="caption", uid=image_id, text="", target=captions[0], image_ids=[image_id],
                        references=captions, extra=extra, source=rec.path)]

    records = [(f"images[{i}]", d) for i, d in enumerate(data["images"])]
    return parse_records(path, records, parse, skip_bad_records, ID_KEYS, require_answers)
