"""The video tasks' submission files (``evaluate.py --predict-only``) in VALUE's formats, read back the way VALUE's
scorer reads them: QA ``{qid: option index}`` with every question's id (How2QA's scorer requires exactly the
ground truth's), captions one JSON line per clip keyed by a ``clip_id`` of the ground truth's type; file names
``<task>/<task>_<split>_predictions.json[l]`` with VALUE's split names (How2QA's test is ``test_public``)."""

from __future__ import annotations

import json
import logging

from vlscale.config import load_config
from vlscale.data import load_examples
from vlscale.engine.evaluation import write_submission

QA = [  # TVQA ids are numbers, as VALUE's
    {"qid": 137292, "q": "Where are they?", "a0": "A cafe", "a1": "A park", "a2": "A car", "a3": "A bus",
     "a4": "A plane", "vid_name": "friends_s01e01_seg01_clip_00", "ts": "0.0-12.0"},
    {"qid": 137304, "q": "Who sits?", "a0": "Ross", "a1": "Monica", "a2": "Joey", "a3": "Rachel", "a4": "Phoebe",
     "vid_name": "friends_s01e01_seg01_clip_00", "ts": "2.5-7.0"},
    {"qid": 137321, "q": "What opens?", "a0": "A door", "a1": "A box", "a2": "A book", "a3": "A window",
     "a4": "A bag", "vid_name": "friends_s01e01_seg01_clip_01", "ts": "NaN-NaN"},
    {"qid": 137341, "q": "Why?", "a0": "No", "a1": "Yes", "a2": "Maybe", "a3": "Never", "a4": "Later",
     "vid_name": "friends_s01e01_seg01_clip_01", "ts": "1.0-3.0"},
]
CAPTIONS = [
    {"clip_id": 102866, "vid_name": "friends_s10e10_seg02_clip_19", "ts": [80.64, 85.28]},
    {"clip_id": 103592, "vid_name": "friends_s10e10_seg02_clip_19", "ts": [81.22, 116.02]},
    {"clip_id": "yc_b_1", "vid_name": "yc_b", "ts": [8.0, 20.0]},  # an id that is not a number stays a string
]


def write_split(root, task, name, rows):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def examples(root, task, split):
    cfg = load_config("tiny", ["data.source=real", f"data.root={root}", f"data.tasks=[{task}]"])
    return load_examples(cfg, task, split, require_answers=False)


def test_multiple_choice_predictions_become_option_indices_for_every_question(tmp_path, caplog):
    write_split(tmp_path, "tvqa", "test.jsonl", QA)
    write_split(tmp_path, "how2qa", "how2qa_test_public_release.jsonl",
                [{k: v for k, v in r.items() if k != "a4"} for r in QA])
    predicted = ["a3", " a1 ", "a9", "yes"]  # a name, a padded name, no such option, an option's text
    for task, file, wanted in (("tvqa", "tvqa/tvqa_test_predictions.json", [3, 1, 0, 1]),
                               ("how2qa", "how2qa/how2qa_test_public_predictions.json", [3, 1, 0, 1])):
        ex = examples(tmp_path, task, "test")
        records = [{"uid": str(e.uid), "prediction": p} for e, p in zip(ex, predicted)]
        with caplog.at_level(logging.WARNING, logger="vlscale.engine.evaluation"):
            caplog.clear()
            path = write_submission(tmp_path / "sub", task, records, ex, "test")
        assert path == tmp_path / "sub" / file
        read = {int(k): int(v) for k, v in json.loads(path.read_text()).items()}  # as VALUE's scorer
        assert read == {r["qid"]: k for r, k in zip(QA, wanted)}
        assert f"{task} submission: 1 of 4 predictions name no option (first qids ['137321'])" in caplog.text
    # "a4" is no option of How2QA's four; val keeps its name
    ex = examples(tmp_path, "how2qa", "test")
    path = write_submission(tmp_path / "sub", "how2qa", [{"uid": str(ex[0].uid), "prediction": "a4"}], ex, "val")
    assert path.name == "how2qa_val_predictions.json" and json.loads(path.read_text()) == {"137292": 0}


def test_caption_predictions_are_one_line_per_clip_keyed_as_the_ground_truth(tmp_path):
    for task in ("tvc", "yc2c"):
        write_split(tmp_path, task, "test.jsonl", CAPTIONS)
        ex = examples(tmp_path, task, "test")
        records = [{"uid": str(e.uid), "prediction": f"caption {k}"} for k, e in enumerate(ex)]
        path = write_submission(tmp_path / "sub", task, records, ex, "test")
        assert path == tmp_path / "sub" / task / f"{task}_test_predictions.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        by_clip = {c["clip_id"]: c["descs"][0]["desc"] for c in lines}  # VALUE's scorer: clip_id -> descs[0]
        assert by_clip == {r["clip_id"]: f"caption {k}" for k, r in enumerate(CAPTIONS)}
        video = "vid_name" if task == "tvc" else "video_id"
        assert [(c[video], c.get("ts")) for c in lines] == [
            (r["vid_name"], r["ts"] if task == "tvc" else None) for r in CAPTIONS]


def test_a_clip_without_a_clip_id_is_written_under_its_uid(tmp_path):
    """The synthetic world's TVC / YC2C clips carry no ``clip_id`` (only VALUE's files do): each line is keyed by
    the example's uid, which names the clip, so every prediction keeps its own line's key."""
    cfg = load_config("tiny", ["data.tasks=[tvc,yc2c]"])
    for task in ("tvc", "yc2c"):
        ex = load_examples(cfg, task, "test")[:2]
        assert all("clip_id" not in e.extra for e in ex)
        records = [{"uid": str(e.uid), "prediction": f"caption {k}"} for k, e in enumerate(ex)]
        path = write_submission(tmp_path / "sub", task, records, ex, "test")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(c["clip_id"], c["descs"]) for c in lines] == [
            (f"{task}_test_00000{k}", [{"desc": f"caption {k}"}]) for k in range(2)]


def test_ids_a_leaderboard_reads_as_integers_are_checked(tmp_path, caplog):
    """EvalAI, the COCO server and VALUE read these ids as integers: ids that are not numbers (an HF dataset's
    "<split>-<row>" without data.hf_columns.id) are said in a warning; numbers, and GQA's string ids, pass."""
    from vlscale.data.tasks import Example

    def ex(task, uid, **extra):
        return Example(task=task, uid=uid, text="", target="", image_ids=[f"img-{uid}"], extra=extra)

    cases = [("vqa", [ex("vqa", "test-0"), ex("vqa", "393225001")], "question_ids are not numbers (first ['test-0'])"),
             ("caption", [ex("caption", "test-7x")], "image_ids are not numbers (first ['test-7x'])"),
             ("tvqa", [ex("tvqa", "h21", candidates=["a", "b"])], "qids are not numbers (first ['h21'])"),
             ("vqa", [ex("vqa", "vqa_test_000000")], "question_ids are not numbers (first ['vqa_test_000000'])"),
             ("gqa", [ex("gqa", "n161313")], None), ("vqa", [ex("vqa", "393225001")], None)]
    for task, examples, said in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlscale.engine.evaluation"):
            write_submission(tmp_path, task, [{"uid": e.uid, "prediction": "a0"} for e in examples], examples)
        if said:
            assert f"{task} submission: 1 of {len(examples)} {said}" in caplog.text
            # the HF-dataset hint only for an HF dataset's row ids (it was said for the synthetic world's too)
            assert ("map data.hf_columns.id" in caplog.text) == (examples[0].uid == "test-0"), caplog.text
        else:
            assert "not numbers" not in caplog.text
    caplog.clear()  # --split validation: the HF loader names the rows by our split, val-<row>
    with caplog.at_level(logging.WARNING, logger="vlscale.engine.evaluation"):
        write_submission(tmp_path, "tvqa", [{"uid": "val-0", "prediction": "a0"}],
                         [ex("tvqa", "val-0", candidates=["a", "b"])], split="validation")
    assert "map data.hf_columns.id" in caplog.text


def test_an_hf_datasets_caption_rows_are_not_written_as_coco_images_of_their_row_numbers(tmp_path, caplog):
    """An HF caption dataset without data.hf_columns.id names its rows ``<split>-<row>``: the number that uid ends
    in is the row's, no COCO image's, yet it was written as the image_id (row 1 as COCO image 1), silently. The uid
    is written whole and said, with the hint to map the id column; a mapped id column is written as before."""
    from pathlib import Path

    from vlscale.data.hf_dataset import load_hf_examples

    hf = str(Path(__file__).resolve().parents[1] / "fixtures" / "hf_multi")
    for split in ("val", "validation"):  # ours or the dataset's name: the loader names the rows by ours
        ex, _ = load_hf_examples("caption", hf, split, {"image": "image", "captions": "captions"})
        assert [e.uid for e in ex] == ["val-0", "val-1"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlscale.engine.evaluation"):
            path = write_submission(tmp_path, "caption", [{"uid": e.uid, "prediction": "a cat"} for e in ex], ex,
                                    split)
        assert [c["image_id"] for c in json.loads(path.read_text())] == ["val-0", "val-1"]
        assert ("caption submission: 2 of 2 image_ids are not numbers (first ['val-0', 'val-1']); the COCO caption "
                "server reads them as integers (an HF dataset's row numbers: map data.hf_columns.id") in caplog.text
    ex, _ = load_hf_examples("caption", hf, "val", {"image": "image", "captions": "captions", "id": "qid"})
    path = write_submission(tmp_path, "caption", [{"uid": e.uid, "prediction": "a cat"} for e in ex], ex, "val")
    assert [c["image_id"] for c in json.loads(path.read_text())] == [int(e.uid) for e in ex]


def test_a_prediction_the_accuracy_counts_as_an_option_is_written_as_that_option(tmp_path):
    """The submission reads an option's name as the scorer of ``evaluate.py`` does (normalize_answer: case,
    punctuation, spaces), so a prediction scored right locally is never written as option 0 for VALUE."""
    from vlscale.metrics import accuracy

    write_split(tmp_path, "tvqa", "test.jsonl", QA)
    ex = examples(tmp_path, "tvqa", "test")
    predicted = ["a2.", "A3", "(a1)", "Yes."]  # T5 may add a full stop within 3 tokens; an option's text too
    wanted = [2, 3, 1, 1]
    for p, k in zip(predicted[:3], wanted):
        assert accuracy({"q": p}, {"q": [f"a{k}"]}) == 1.0  # the local score counts it as option k
    records = [{"uid": str(e.uid), "prediction": p} for e, p in zip(ex, predicted)]
    path = write_submission(tmp_path / "sub", "tvqa", records, ex, "test")
    read = {int(k): int(v) for k, v in json.loads(path.read_text()).items()}
    assert read == {r["qid"]: k for r, k in zip(QA, wanted)}


def test_the_local_accuracy_counts_what_the_submission_writes_as_the_answer(tmp_path):
    """An option's text is written to VALUE as that option, so the local accuracy counts it right too (it
    counted only the option's name "aN"); an answer whose text an earlier option also has is written as that
    earlier option, so there only the name counts."""
    from vlscale.metrics import accuracy

    rows = [dict(r, answer_idx=k) for r, k in zip(QA, [0, 3, 1, 1])]
    rows[2] = dict(rows[2], a0="A box")  # the answer (a1, "A box") shares its text with a0
    write_split(tmp_path, "tvqa", "val.jsonl", rows)
    ex = examples(tmp_path, "tvqa", "val")
    predicted = ["a cafe.", "Rachel", "A box", "a1"]
    local = [accuracy({0: p}, {0: e.references}) for e, p in zip(ex, predicted)]
    assert local == [1.0, 1.0, 0.0, 1.0]
    path = write_submission(tmp_path / "sub", "tvqa", [{"uid": str(e.uid), "prediction": p}
                                                        for e, p in zip(ex, predicted)], ex, "val")
    written = {int(k): int(v) for k, v in json.loads(path.read_text()).items()}
    assert [float(written[r["qid"]] == r["answer_idx"]) for r in rows] == local  # as VALUE's scorer counts


def test_image_tasks_submissions_in_their_leaderboards_formats(tmp_path):
    """EvalAI's VQA file (integer question ids), GQA's (string ids), NLVR2's ``<identifier>,True|False`` lines
    (only the prediction "true" is True), the COCO server's captions (the ``cocoid``, else the number the
    image's name ends in); a prediction for a uid the split does not hold is refused, naming it."""
    import pytest

    from vlscale.data.tasks import Example

    def ex(task, uid, **extra):
        return Example(task=task, uid=uid, text="", target="", image_ids=[f"img-{uid}"], extra=extra)

    def write(task, examples, predictions):
        records = [{"uid": str(e.uid), "prediction": p} for e, p in zip(examples, predictions)]
        return write_submission(tmp_path, task, records, examples).read_text()

    assert json.loads(write("vqa", [ex("vqa", "393225001"), ex("vqa", "7")], ["yes", "2"])) == \
        [{"question_id": 393225001, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    assert json.loads(write("gqa", [ex("gqa", "201307251")], ["left"])) == \
        [{"questionId": "201307251", "prediction": "left"}]
    nlvr2 = [ex("nlvr2", "u0", identifier="test1-0-1-0"), ex("nlvr2", "u1", identifier="test1-0-1-1"),
             ex("nlvr2", "u2")]
    assert write("nlvr2", nlvr2, ["true", "false", "maybe"]) == "test1-0-1-0,True\ntest1-0-1-1,False\nu2,False\n"
    captions = [ex("caption", "val-3", cocoid=391895), ex("caption", "COCO_test2015_000000000016")]
    assert json.loads(write("caption", captions, ["a man", "a dog"])) == \
        [{"image_id": 391895, "caption": "a man"}, {"image_id": 16, "caption": "a dog"}]
    with pytest.raises(ValueError, match=r"vqa submission: predictions for uids the split does not hold: "
                                         r"first \['404'\]"):
        write_submission(tmp_path, "vqa", [{"uid": "404", "prediction": "yes"}], [ex("vqa", "7")])
    assert write_submission(tmp_path, "vqa_unknown_task", [], []) is None


def test_ids_in_digits_of_other_scripts_stay_text_and_are_said(tmp_path, caplog):
    """Only ASCII digits make an integer id: "³" (a digit to str.isdigit, which int() refuses) crashed the
    submission after the whole generation, and "١٢" (Arabic-Indic) was written as 12, another id than the split's."""
    from vlscale.data.tasks import Example

    examples = [Example(task="vqa", uid=uid, text="", target="", image_ids=["img"], extra={}) for uid in ("³", "١٢")]
    with caplog.at_level(logging.WARNING, logger="vlscale.engine.evaluation"):
        path = write_submission(tmp_path, "vqa", [{"uid": e.uid, "prediction": "yes"} for e in examples], examples)
    assert json.loads(path.read_text()) == [{"question_id": "³", "answer": "yes"}, {"question_id": "١٢", "answer": "yes"}]
    assert "vqa submission: 2 of 2 question_ids are not numbers" in caplog.text
