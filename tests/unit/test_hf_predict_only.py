"""``data.hf_dataset`` under ``launchers/evaluate.py --predict-only`` (``require_answers=False``): a split without
its answer columns, or rows whose answer cells are None / empty, give examples with an empty target and no
references (as the JSON loaders' records without their answer keys); with answers required (training, a normal
evaluation) they are refused, the one-line message naming the dataset, split, row and column and the flag.

Datasets: tests/fixtures/hf_multi's splits, re-saved with a test split whose answers are withheld.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlscale.config import DataConfig, RunConfig
from vlscale.data import eval_examples, load_examples
from vlscale.data.hf_dataset import load_hf_examples
from vlscale.data.real import DataError, RecordError, real_visual_source

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf_multi"
ANSWER_COLUMNS = ["multiple_choice_answer", "answers", "captions", "label"]
COLUMNS = {  # task -> (data.hf_columns, the answer column the task reads)
    "vqa": ({"image": "image", "image_id": "image_name", "question": "question", "answers": "answers", "id": "qid"},
            "answers"),
    "gqa": ({"image": "image", "question": "question", "answer": "multiple_choice_answer", "id": "qid"},
            "multiple_choice_answer"),
    "nlvr2": ({"image": ["image", "image2"], "text": "question", "label": "label", "id": "qid"}, "label"),
    "caption": ({"image": "image", "captions": "captions"}, "captions"),
}


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """(withheld: its test split has no answer columns; blank: test rows 0, 1 with None / empty answer cells,
    row 2 with its answers)."""
    import datasets

    hf = datasets.load_from_disk(str(HF))
    val = hf["validation"]
    base = tmp_path_factory.mktemp("hf_predict_only")
    withheld, blank = base / "withheld", base / "blank"
    datasets.DatasetDict({"train": hf["train"], "validation": val,
                          "test": val.remove_columns(ANSWER_COLUMNS)}).save_to_disk(str(withheld))

    def empty_answers(row, i):
        if i == 2:
            return {"qid": 13}
        if i == 0:
            return {"qid": 11, "multiple_choice_answer": None, "answers": None, "captions": None, "label": None}
        return {"qid": 12, "multiple_choice_answer": " ", "answers": [], "captions": [], "label": -1}

    test = val.select([0, 1, 1]).map(empty_answers, with_indices=True, features=val.features, keep_in_memory=True)
    datasets.DatasetDict({"train": hf["train"], "test": test}).save_to_disk(str(blank))
    no_image = test.map(lambda row, i: {"image": None} if i == 1 else {}, with_indices=True, features=val.features,
                        keep_in_memory=True)
    datasets.DatasetDict({"test": no_image}).save_to_disk(str(blank) + "_no_image")
    return str(withheld), str(blank)


@pytest.mark.parametrize("task", list(COLUMNS))
def test_a_split_without_the_answer_column(datasets_dir, task):
    withheld, _ = datasets_dir
    columns, answer_column = COLUMNS[task]
    labelled, _ = load_hf_examples(task, withheld, "val", columns)
    examples, source = load_hf_examples(task, withheld, "test", columns, require_answers=False)
    assert [e.text for e in examples] == [e.text for e in labelled] and len(examples) == 2
    assert all(e.target == "" and e.references == [] and "label" not in e.extra for e in examples)
    assert all(e.target and e.references for e in labelled)
    if task == "vqa":  # ids from the columns: the labelled split's
        assert [(e.uid, e.image_ids) for e in examples] == [(e.uid, e.image_ids) for e in labelled]
    assert all(source[i].shape == (8, 8, 3) for e in examples for i in e.image_ids)
    role = next(r for r, c in columns.items() if c == answer_column)
    with pytest.raises(DataError, match=rf"^data\.hf_columns\.{role}='{answer_column}' is not a column of "
                                        rf"{withheld}\[test\] \(its columns: .*\); a split without its answers.* "
                                        r"can only be predicted: launchers/evaluate\.py --predict-only$"):
        load_hf_examples(task, withheld, "test", columns)


@pytest.mark.parametrize("task", list(COLUMNS))
def test_rows_with_none_or_empty_answers(datasets_dir, task):
    _, blank = datasets_dir
    columns, answer_column = COLUMNS[task]
    examples, _ = load_hf_examples(task, blank, "test", columns, require_answers=False)
    assert [e.target for e in examples] == ["", "", {"vqa": "pizza", "gqa": "pizza", "nlvr2": "true",
                                                     "caption": "A pizza on a plate."}[task]]
    assert [len(e.references) for e in examples] == [0, 0, {"vqa": 10}.get(task, 1)]
    assert ["label" in e.extra for e in examples] == [False, False, task == "vqa"]  # VQA's soft label
    assert examples[0].text == ("" if task == "caption" else "Is it raining?")
    assert examples[0].image_ids == {"vqa": ["img_c"], "nlvr2": ["test/0/0", "test/0/1"]}.get(task, ["test/0"])
    rid = "" if task == "caption" else r" \(id 11\)"
    with pytest.raises(RecordError, match=rf"^{blank}\[test\]: row 0{rid}: key '{answer_column}' is missing "
                                          r"\(a split without its answers.*launchers/evaluate\.py --predict-only\)$"):
        load_hf_examples(task, blank, "test", columns)
    skipped, _ = load_hf_examples(task, blank, "test", columns, skip_bad_records=True)
    assert [e.target for e in skipped] == [examples[2].target] and skipped.skipped == 2
    # row 1's cells are there but empty: said so (it was "key ... is missing", as if the column were not there);
    # gqa's holds " ": said so (it was "an empty string")
    what = {"gqa": r"holds only whitespace \(' '\)",
            "nlvr2": r"is -1 \(the datasets library's mark of a withheld label\)"}
    rid = "" if task == "caption" else r" \(id 12\)"
    assert re.match(rf"^{blank}\[test\]: row 1{rid}: key '{answer_column}' {what.get(task, 'is an empty list')}: "
                    r"the row has no answers \(data\.skip_bad_records=true skips such rows; a split without its "
                    r"answers.*--predict-only\)$", skipped.skip_messages[1]), skipped.skip_messages[1]


def test_the_other_checks_stay(datasets_dir):
    withheld, blank = datasets_dir
    columns = COLUMNS["gqa"][0]
    with pytest.raises(RecordError, match=r"\[test\]: row 1 \(id 12\): key 'image' has no image"):
        load_hf_examples("gqa", blank + "_no_image", "test", columns, require_answers=False)
    with pytest.raises(DataError, match=r"data\.hf_columns\.question='prompt' is not a column of the dataset"):
        load_hf_examples("gqa", withheld, "test", dict(columns, question="prompt"), require_answers=False)


def test_through_the_config_and_the_visual_source(datasets_dir):
    withheld, _ = datasets_dir
    cfg = RunConfig(data=DataConfig(tasks=["vqa"], source="real", hf_dataset=withheld,
                                    hf_columns=COLUMNS["vqa"][0]))
    memo = {}  # (evaluate.py's): a read without answers does not serve one that requires them
    examples, source = eval_examples(cfg, "vqa", "test", require_answers=False, memo=memo)
    assert [(e.uid, e.target, e.references) for e in examples] == [("11", "", []), ("12", "", [])]
    assert source["img_c"].shape == (8, 8, 3)
    with pytest.raises(DataError, match=r"withheld\[test\].*--predict-only"):
        load_examples(cfg, "vqa", "test")
    with pytest.raises(DataError, match=r"withheld\[test\].*--predict-only"):
        eval_examples(cfg, "vqa", "test", memo=memo)
    # a split with its answers: the visual source reuses training's read (no second pass over the rows)
    assert len(load_examples(cfg, "vqa", "train")) == 3
    assert real_visual_source(cfg, "vqa", "train") is load_hf_examples("vqa", withheld, "train",
                                                                       COLUMNS["vqa"][0])[1]


def test_a_read_that_skipped_rows_without_answers_does_not_serve_a_read_that_keeps_them(datasets_dir):
    """Only a read that found every row's answers serves a later read not requiring them: where skip mode dropped
    the unanswered rows (training's read, or an evaluation's), the predict-only read and the visual source still
    get every row, not the answered one alone."""
    _, blank = datasets_dir
    columns = COLUMNS["gqa"][0]
    skipped, _ = load_hf_examples("gqa", blank, "test", columns, skip_bad_records=True)
    assert [e.uid for e in skipped] == ["13"] and skipped.skipped == 2
    examples, source = load_hf_examples("gqa", blank, "test", columns, skip_bad_records=True, require_answers=False)
    assert [(e.uid, e.target) for e in examples] == [("11", ""), ("12", ""), ("13", "pizza")]
    assert examples.skipped == 0 and sorted(source.ids()) == ["test/0", "test/1", "test/2"]
