"""Real-dataset loaders on the tiny fixtures in tests/fixtures (made by make_fixtures.py): fields,
counts, restval merge, references, visual sources, HF datasets, and bad input (errors that name
file, record and key; skip mode that counts)."""

import io
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlscale.config import DataConfig, ModelConfig, RunConfig
from vlscale.data.real import (
    DataError,
    DataFileNotFound,
    RecordError,
    annotation_path,
    load_real_examples,
    real_visual_source,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = FIXTURES / "real_data"
HF = FIXTURES / "hf_multi"
IMAGE_TASKS = ("vqa", "gqa", "nlvr2", "caption")
VIDEO_TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
COUNTS = {"vqa": (3, 2, 1), "gqa": (3, 2, 1), "nlvr2": (4, 2, 1), "caption": (7, 1, 1),
          "tvqa": (3, 2, 1), "how2qa": (2, 1, 1), "tvc": (3, 1, 1), "yc2c": (2, 1, 1)}


def make_cfg(root=ROOT, tasks=("vqa",), **data):
    tasks = list(tasks)
    return RunConfig(data=DataConfig(tasks=tasks, source="real", root=str(root), **data))


def by_uid(examples):
    return {e.uid: e for e in examples}


# ----------------------------------------------------------------------------- every loader

@pytest.mark.parametrize("task", IMAGE_TASKS + VIDEO_TASKS)
def test_every_task_and_split_loads_with_well_formed_examples(task):
    cfg = make_cfg(tasks=[task])
    for split, n in zip(("train", "val", "test"), COUNTS[task]):
        examples = load_real_examples(cfg, task, split)
        assert len(examples) == n and examples.skipped == 0
        assert len({e.uid for e in examples}) == n
        for e in examples:
            assert e.task == task and e.target and e.references and e.image_ids
            assert Path(e.source).is_file()
            assert not e.text.startswith(task)  # no task prefix


def test_vqa_targets_references_and_ties():
    ex = by_uid(load_real_examples(make_cfg(), "vqa", "train"))
    assert ex["9001"].target == "2"                 # highest label score
    assert ex["9001"].text == "How many plates are there?"
    assert ex["9001"].image_ids == ["COCO_train2014_000000000009"]
    assert ex["9001"].references == ["2"] * 8 + ["3", "two"]  # the 10 raw answers, in order
    assert ex["9001"].extra["label"] == {"2": 1.0, "3": 0.3}
    assert ex["9001"].extra["answer_type"] == "number"
    assert ex["25001"].target == "blue"             # score tie red/blue: blue given 5 times, red 4
    assert ex["42001"].target == "no"               # empty label: most frequent raw answer (strings)
    assert len(ex["42001"].references) == 10


def test_gqa_references_are_the_gold_answer():
    ex = by_uid(load_real_examples(make_cfg(), "gqa", "val"))
    assert ex["201206"].target == "no" and ex["201206"].references == ["no"]
    assert ex["201206"].image_ids == ["2368326"]


def test_nlvr2_two_images_bool_targets_and_official_groups():
    ex = load_real_examples(make_cfg(), "nlvr2", "train")
    e = by_uid(ex)["nlvr2_train_0"]
    assert e.image_ids == ["train-10-0-img0", "train-10-0-img1"]
    assert e.target == "true" and e.references == ["true"]
    assert by_uid(ex)["nlvr2_train_1"].target == "false"
    groups = {e.extra["identifier"]: e.extra["group"] for e in ex}
    # Same sentence (set 10, sentence 0) on two image pairs -> one group; the pair field is blanked.
    assert groups["train-10-0-0"] == groups["train-10-1-0"] == "train-10--0"
    assert groups["train-10-0-1"] == "train-10--1"


def test_coco_karpathy_restval_merged_into_train_one_example_per_caption():
    train = load_real_examples(make_cfg(), "caption", "train")
    per_image = {}
    for e in train:
        per_image.setdefault(e.image_ids[0], []).append(e)
    assert {k: len(v) for k, v in per_image.items()} == {
        "COCO_train2014_000000000009": 3, "COCO_train2014_000000000025": 2, "COCO_val2014_000000000042": 2}
    restval = per_image["COCO_val2014_000000000042"]
    assert {e.extra["karpathy_split"] for e in restval} == {"restval"}
    assert [e.target for e in restval] == ["A dog on a couch.", "A brown dog lying down."]
    assert all(e.references == ["A dog on a couch.", "A brown dog lying down."] for e in restval)
    assert all(e.text == "" for e in train)
    (val,) = load_real_examples(make_cfg(), "caption", "val")
    assert val.uid == "COCO_val2014_000000000073" and len(val.references) == 3 and val.extra["cocoid"] == 73
    assert val.target == val.references[0] != val.references[-1]  # val/test: target = the first caption
    (test,) = load_real_examples(make_cfg(), "caption", "test")
    assert test.image_ids == ["COCO_val2014_000000000074"] and len(test.references) == 2
    from vlscale.data.caption import load_coco_karpathy

    with pytest.raises(DataError, match="'restval2'"):
        load_coco_karpathy(ROOT / "coco" / "dataset_coco.json", "restval2")


@pytest.mark.parametrize("task", ["caption", "tvc"])
def test_captioning_train_split_is_scored_once_per_image_with_all_references(task):
    """The caption tasks' train splits hold one example per reference caption; evaluate.py --split train scored
    every image once per caption (an image of 5 captions weighed 5 times, and was generated 5 times). COCO
    evaluation scores each image once against all its references, as our val and test splits do."""
    from vlscale.data import eval_examples
    from vlscale.engine.evaluation import score_records

    cfg = make_cfg(tasks=[task])
    if task == "tvc":
        cfg.model.vision = "ViT-B-32"  # the fixture's frame features are 512-d
    train = load_real_examples(cfg, task, "train")
    images = {}
    for e in train:
        images.setdefault(tuple(e.image_ids), e)
    assert len(images) < len(train)  # some image has several captions
    evaluated, _ = eval_examples(cfg, task, "train")
    assert len(evaluated) == len(images) and len({e.uid for e in evaluated}) == len(images)
    for e in evaluated:
        first = images[tuple(e.image_ids)]
        assert e.uid == first.uid.rpartition("#")[0] and e.references == first.references
        assert len(e.references) >= 1 and e.target == first.target
    assert len(eval_examples(cfg, task, "train", max_examples=2)[0]) == 2  # max_examples counts images
    # the val split is one per clip/image already: unchanged
    assert [e.uid for e in eval_examples(cfg, task, "val")[0]] == [e.uid for e in load_real_examples(cfg, task, "val")]
    # scored: each image's prediction once, against every reference of it
    records = [{"uid": e.uid, "prediction": e.references[0], "references": e.references} for e in evaluated]
    assert score_records(task, records)["cider"] > 0


def test_video_qa_text_subtitles_within_ts_and_targets():
    ex = by_uid(load_real_examples(make_cfg(tasks=["tvqa"]), "tvqa", "train"))
    e = ex["1"]
    assert e.target == "a1" and e.references == ["a1", "Hi."] and e.extra["answer_text"] == "Hi."
    assert e.text.startswith("What did Ross say first? a0: Bye. a1: Hi. a2: Hello there.")
    assert "subtitle: (Ross:) Hi. (Rachel:) Hey, how are you?" in e.text
    assert "monkey" not in e.text                   # that line is outside ts 0-5 s
    assert e.extra["ts"] == (0.0, 5.0)
    assert "monkey" in ex["2"].text and ex["2"].extra["ts"] is None   # "NaN-NaN": whole video
    assert ex["3"].extra["ts"] == (0.0, 4.0)       # ts given as a list
    how2 = load_real_examples(make_cfg(tasks=["how2qa"]), "how2qa", "train")  # *_release.jsonl names
    assert len(how2[0].extra["candidates"]) == 4 and how2[0].target == "a1"
    assert how2[0].text.endswith("subtitle: and chop the onions finely")


def test_video_captions_splits_and_missing_subtitles(caplog):
    train = load_real_examples(make_cfg(tasks=["tvc"]), "tvc", "train")
    assert [e.uid for e in train] == ["1#0", "1#1", "2#0"]
    assert train[0].references == ["Ross greets Rachel.", "Ross says hi to Rachel."]
    assert train[0].text == "(Ross:) Hi. (Rachel:) Hey, how are you?"
    (val,) = load_real_examples(make_cfg(tasks=["tvc"]), "tvc", "val")
    assert val.uid == "11" and len(val.references) == 2 and val.text == "(Ross:) I got a monkey."
    from vlscale.data import real

    real._WARNED_NO_SUBTITLES.clear()
    with caplog.at_level(logging.WARNING):
        yc = load_real_examples(make_cfg(tasks=["yc2c"]), "yc2c", "train")
    assert "yc2c: no subtitles file" in caplog.text
    assert [e.text for e in yc] == ["", ""] and yc[0].image_ids == ["yc_a"]


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_vqa_and_gqa_targets_and_references_by_the_formats_rules(tmp_path):
    """VQA: a label score tie goes to the answer given most often (here the alphabetically later one). GQA:
    references are the gold answer alone, whatever else ``label`` scores."""
    from vlscale.data.gqa import load_gqa
    from vlscale.data.vqa import load_vqa

    vqa = {"img_id": "i", "sent": "What color?", "question_id": 1, "label": {"blue": 0.6, "red": 0.6},
           "answers": ["red"] * 5 + ["blue"] * 4 + ["green"]}
    (e,) = load_vqa(_write_json(tmp_path / "vqa.json", [vqa]))
    assert e.target == "red"
    gqa = {"img_id": "i", "sent": "Is it?", "question_id": "q1", "label": {"yes": 1.0, "no": 0.5}}
    (g,) = load_gqa(_write_json(tmp_path / "gqa.json", [gqa]))
    assert g.target == "yes" and g.references == ["yes"] and g.extra["label"] == {"yes": 1.0, "no": 0.5}


def test_nlvr2_identifiers_of_fewer_than_four_fields_are_their_own_group():
    from vlscale.data.nlvr2 import consistency_group

    assert consistency_group("dev-850-0") == "dev-850-0"
    assert consistency_group("dev-850-0-3") == "dev-850--3"


def test_vqa_target_is_labels_top_answer_and_raw_answers_are_counted_stripped(tmp_path):
    """The target is ``label``'s top answer (the vocabulary's "2") where another spelling ("two") was given
    most often; raw answers are read without surrounding whitespace, so " no" and "no " count as "no" where
    an empty label falls back to the most frequent one."""
    from vlscale.data.vqa import load_vqa

    spelled = {"img_id": "i", "sent": "How many?", "question_id": 1, "label": {"2": 1.0, "3": 0.9},
               "answers": ["two"] * 4 + ["2"] * 3 + ["3"] * 3}
    unlabelled = {"img_id": "i", "sent": "Is it?", "question_id": 2, "label": {},
                  "answers": ["yes", "yes", " no", "no ", "no"]}
    first, second = load_vqa(_write_json(tmp_path / "vqa.json", [spelled, unlabelled]))
    assert first.target == "2"
    assert second.target == "no" and second.references == ["yes", "yes", "no", "no", "no"]
    assert second.extra["label"] == {}  # an empty label stays empty (a null one is read from the answers)


def test_a_vqa_record_with_raw_answers_alone_takes_the_most_frequent_and_a_soft_label_from_them(tmp_path):
    """Raw answers without ``label`` (the official annotations, converted) were refused ("key 'label' is
    missing"), though an HF dataset's rows of answers alone load: the target is the most frequent answer and the
    soft label (for data.vqa_targets=sampled) is made from the answers, as there."""
    from vlscale.data.vqa import load_vqa, vqa_soft_label

    answers = ["two"] * 2 + ["2"] * 3 + ["3"] * 1
    [e] = load_vqa(_write_json(tmp_path / "vqa.json", [{"img_id": "i", "sent": "How many?", "question_id": 1,
                                                         "answers": [{"answer": a} for a in answers]}]))
    assert (e.target, e.references) == ("2", answers)
    assert e.extra["label"] == vqa_soft_label(answers) == {"2": 1.0, "3": 0.3}


def test_gqa_gold_answer_beside_zero_scores_and_on_a_tie(tmp_path):
    """A label may score other answers 0 beside a positive one (only a label without any score above 0 is
    malformed); on a tie the gold answer is the alphabetically first, whatever the label's order."""
    from vlscale.data.gqa import load_gqa

    q = {"img_id": "i", "sent": "Is it?"}
    zero, tie = load_gqa(_write_json(tmp_path / "gqa.json", [dict(q, question_id="q1", label={"yes": 1.0, "no": 0.0}),
                                                             dict(q, question_id="q2", label={"yes": 1.0, "no": 1.0})]))
    assert (zero.target, zero.references) == ("yes", ["yes"])
    assert (tie.target, tie.references) == ("no", ["no"])


def test_gqa_record_fields_map_to_the_example_and_an_empty_image_id_is_named(tmp_path):
    """``sent`` is the question text and ``img_id`` the one image, both read stripped, answered or not (for
    --predict-only); an integer ``question_id`` is the uid as a string; an empty ``img_id`` is refused naming
    the file, the record and the key."""
    from vlscale.data.gqa import load_gqa

    rec = {"img_id": " 2354786 ", "sent": " Is the sky dark?\n", "question_id": 2930152, "label": {"yes": 1.0}}
    unlabelled = {k: v for k, v in rec.items() if k != "label"} | {"question_id": 7}
    path = _write_json(tmp_path / "gqa.json", [rec, unlabelled])
    answered, unanswered = load_gqa(path, require_answers=False)
    for e, uid in ((answered, "2930152"), (unanswered, "7")):
        assert (e.task, e.uid, e.text, e.image_ids) == ("gqa", uid, "Is the sky dark?", ["2354786"])
    with pytest.raises(RecordError, match=r"gqa\.json: record 0 \(id 2930152\): key 'img_id' is an empty string$"):
        load_gqa(_write_json(tmp_path / "gqa.json", [dict(rec, img_id="")]))
    with pytest.raises(RecordError, match=r"gqa\.json: record 0 \(id 2930152\): key 'img_id' holds only whitespace "
                                          r"\(' \\t'\)$"):  # not 'an empty string': it is not empty
        load_gqa(_write_json(tmp_path / "gqa.json", [dict(rec, img_id=" \t")]))
    with pytest.raises(RecordError, match=r"record 0 \(id ' '\): key 'question_id' holds only whitespace \(' '\)$"):
        load_gqa(_write_json(tmp_path / "gqa.json", [dict(rec, question_id=" ")]))
    with pytest.raises(RecordError, match=r"key 'img_id' holds only whitespace \('\\n {17}\)$"):  # cut, one line
        load_gqa(_write_json(tmp_path / "gqa.json", [dict(rec, img_id="\n" + " " * 500)]))


def test_nlvr2_boolean_labels_and_a_record_without_uid(tmp_path):
    """JSON's true/false labels read as they say; a record without ``uid`` takes its identifier as its uid."""
    from vlscale.data.nlvr2 import load_nlvr2

    base = {"img0": "dev-850-0-img0", "img1": "dev-850-0-img1", "sent": "There are two dogs."}
    records = [dict(base, identifier="dev-850-0-0", uid="a", label=True),
               dict(base, identifier="dev-850-1-0", uid="b", label=False),
               dict(base, identifier="dev-850-2-0", label=0)]
    ex = load_nlvr2(_write_json(tmp_path / "nlvr2.json", records))
    assert [(e.uid, e.target, e.extra["identifier"]) for e in ex] == [
        ("a", "true", "dev-850-0-0"), ("b", "false", "dev-850-1-0"), ("dev-850-2-0", "false", "dev-850-2-0")]


def test_nlvr2_string_labels_with_surrounding_whitespace_read_as_they_say(tmp_path):
    """"True"/"False" labels are read case- and whitespace-insensitively: " True " is true (not refused, and not
    false because its spaces spoil the comparison), " false\n" is false; the statement is read stripped."""
    from vlscale.data.nlvr2 import load_nlvr2

    base = {"img0": "dev-850-0-img0", "img1": "dev-850-0-img1", "sent": "There are two dogs."}
    records = [dict(base, identifier="dev-850-0-0", label=" True "),
               dict(base, identifier="dev-850-1-0", label=" false\n")]
    records[0]["sent"] = " There are two dogs.\n"
    ex = load_nlvr2(_write_json(tmp_path / "nlvr2.json", records))
    assert [(e.target, e.text) for e in ex] == [("true", "There are two dogs."), ("false", "There are two dogs.")]


def test_gqa_and_nlvr2_records_without_label_load_for_prediction_only(tmp_path):
    """With ``require_answers=False`` (evaluate.py --predict-only) a GQA or NLVR2 record without ``label`` is an
    example with an empty target, no references and its own ids and images; by default it is refused naming the
    file, the record and 'label'. Beside it a labelled record reads as ever."""
    from vlscale.data.gqa import load_gqa
    from vlscale.data.nlvr2 import load_nlvr2

    gqa = _write_json(tmp_path / "gqa.json", [
        {"img_id": "n161313", "sent": "Is it?", "question_id": "201206"},
        {"img_id": "n1", "sent": "Is it?", "question_id": "2", "label": {"no": 1}}])
    unanswered, answered = load_gqa(gqa, require_answers=False)
    assert (unanswered.uid, unanswered.target, unanswered.references, unanswered.image_ids) == (
        "201206", "", [], ["n161313"])
    assert (answered.target, answered.references) == ("no", ["no"])
    with pytest.raises(RecordError, match=r"gqa\.json: record 0 \(id '201206'\): key 'label' is missing"):
        load_gqa(gqa)
    base = {"img0": "test1-0-0-img0", "img1": "test1-0-0-img1", "sent": "There are two dogs."}
    nlvr2 = _write_json(tmp_path / "nlvr2.json", [dict(base, identifier="test1-0-0-0", uid="u0"),
                                                  dict(base, identifier="test1-0-1-0", uid="u1", label=1)])
    unanswered, answered = load_nlvr2(nlvr2, require_answers=False)
    assert (unanswered.uid, unanswered.target, unanswered.references, unanswered.image_ids) == (
        "u0", "", [], ["test1-0-0-img0", "test1-0-0-img1"])
    assert unanswered.extra == {"identifier": "test1-0-0-0", "group": "test1-0--0"}
    assert (answered.target, answered.references) == ("true", ["true"])
    with pytest.raises(RecordError, match=r"nlvr2\.json: record 0 \(id 'u0'\): key 'label' is missing"):
        load_nlvr2(nlvr2)


def test_coco_karpathy_captions_are_stripped_and_extra_keeps_the_records_ids(tmp_path):
    """A caption is its ``raw`` text without surrounding whitespace; ``extra`` keeps cocoid, imgid, filename,
    filepath and the record's split; a training image's captions are ``<id>#0``, ``<id>#1``, in order. A file
    that is not an object with an ``images`` list is refused naming it."""
    from vlscale.data.caption import load_coco_karpathy

    image = {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "imgid": 3, "cocoid": 73,
             "split": "val", "sentences": [{"raw": " A man rides a bike. \n"}, {"raw": "A cyclist."}]}
    path = _write_json(tmp_path / "coco.json", {"images": [image, dict(image, split="restval", imgid=4, cocoid=74,
                                                                       filename="COCO_val2014_000000000074.jpg")]})
    (val,) = load_coco_karpathy(path, "val")
    assert val.target == "A man rides a bike." and val.references == ["A man rides a bike.", "A cyclist."]
    assert val.extra == {"karpathy_split": "val", "filename": "COCO_val2014_000000000073.jpg", "cocoid": 73,
                         "imgid": 3, "filepath": "val2014"}
    train = load_coco_karpathy(path, "train")
    assert [(e.uid, e.target) for e in train] == [("COCO_val2014_000000000074#0", "A man rides a bike."),
                                                  ("COCO_val2014_000000000074#1", "A cyclist.")]
    assert train[0].extra["imgid"] == 4 and train[0].extra["karpathy_split"] == "restval"
    for data in ([image], {"images": {"0": image}}):
        with pytest.raises(DataError, match=r"coco\.json: expected an object with an 'images' list"):
            load_coco_karpathy(_write_json(tmp_path / "coco.json", data), "val")


def test_coco_images_without_sentences_load_for_prediction_only_one_example_per_image(tmp_path):
    """With ``require_answers=False`` (evaluate.py --predict-only) a COCO image without ``sentences`` is one
    example in any split, train too (not one per caption, so its uid is the image id, no ``#k``), with an empty
    target, no references and the record's ids in ``extra``; a captioned image beside it reads as ever. By
    default the image is refused naming the file, the image and 'sentences'."""
    from vlscale.data.caption import load_coco_karpathy

    bare = {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 0, "cocoid": 9,
            "split": "train"}
    captioned = {"filename": "COCO_val2014_000000000042.jpg", "split": "restval",
                 "sentences": [{"raw": "A dog."}, {"raw": "A brown dog."}]}
    path = _write_json(tmp_path / "coco.json", {"images": [bare, captioned]})
    unanswered, *answered = load_coco_karpathy(path, "train", require_answers=False)
    assert (unanswered.uid, unanswered.target, unanswered.references, unanswered.image_ids) == (
        "COCO_train2014_000000000009", "", [], ["COCO_train2014_000000000009"])
    assert unanswered.extra == {"karpathy_split": "train", "filename": "COCO_train2014_000000000009.jpg",
                                "cocoid": 9, "imgid": 0, "filepath": "train2014"}
    assert [(e.uid, e.target) for e in answered] == [("COCO_val2014_000000000042#0", "A dog."),
                                                     ("COCO_val2014_000000000042#1", "A brown dog.")]
    (val,) = load_coco_karpathy(_write_json(tmp_path / "val.json", {"images": [dict(bare, split="val")]}), "val",
                                require_answers=False)
    assert (val.uid, val.target, val.references) == ("COCO_train2014_000000000009", "", [])
    with pytest.raises(RecordError, match=r"coco\.json: images\[0\] \(id 'COCO_train2014_000000000009\.jpg'\): "
                                          r"key 'sentences' is missing"):
        load_coco_karpathy(path, "train")


@pytest.mark.parametrize("edit, match", [
    ({"sentences": ["A dog."]}, r"key 'sentences' item 0 needs a non-empty string 'raw', got 'A dog\.'"),
    ({"sentences": "A dog."}, r"key 'sentences' must be a list, got str 'A dog\.'"),
    ({"sentences": {"raw": "A dog."}}, r"key 'sentences' must be a list, got dict"),
    ({"filepath": 5}, r"key 'filepath' must be a string, got int 5"),
])
def test_coco_sentences_or_filepath_of_another_type_is_a_record_error_that_skip_mode_skips(tmp_path, edit, match):
    """Karpathy's ``sentences`` is a list of objects with a ``raw`` string and ``filepath`` a string: a list of
    bare strings, a string or an object there, or a numeric filepath, is a RecordError naming the file, image and
    key (not an AttributeError, nor a string read as a list of captions), and data.skip_bad_records skips it."""
    from vlscale.data.caption import load_coco_karpathy

    good = {"filename": "COCO_val2014_000000000073.jpg", "split": "val", "sentences": [{"raw": "A cat."}]}
    bad = dict(good, filename="COCO_val2014_000000000074.jpg", **edit)
    path = _write_json(tmp_path / "coco.json", {"images": [good, bad]})
    with pytest.raises(RecordError, match=r"coco\.json: images\[1\] \(id 'COCO_val2014_000000000074\.jpg'\): "
                                          + match):
        load_coco_karpathy(path, "val")
    kept = load_coco_karpathy(path, "val", skip_bad_records=True)
    assert [e.uid for e in kept] == ["COCO_val2014_000000000073"] and kept.skipped == 1


def test_ts_and_subtitle_lines_overlapping_it():
    """A subtitle line that overlaps ``ts`` only in part is the clip's too; a zero-length ts is a moment, not
    malformed; a ts holding a boolean is malformed."""
    from vlscale.data.real import Record
    from vlscale.data.video import parse_ts, subtitle_text

    lines = [(0.0, 2.0, "before"), (3.0, 6.0, "across the start"), (6.5, 7.0, "inside"),
             (8.0, 12.0, "across the end"), (12.5, 13.0, "after")]
    assert subtitle_text(lines, (5.0, 9.0)) == "across the start inside across the end"
    assert subtitle_text(lines, None).split() == "before across the start inside across the end after".split()
    ts = lambda value: parse_ts(Record("a.jsonl", "line 1", {"ts": value}, ("qid",)))  # noqa: E731
    assert ts([3, 3]) == (3.0, 3.0) and ts("2.5-4") == (2.5, 4.0)
    for bad in ([True, 5], "5-3"):
        with pytest.raises(RecordError, match="key 'ts'"):
            ts(bad)


def test_subtitle_lines_touching_ts_are_its_own_and_nan_or_no_ts_takes_every_line(tmp_path):
    """A line ending where ``ts`` starts, or starting where it ends, overlaps it; an empty line adds no blank;
    ``ts`` "NaN-NaN" (TVQA's unknown span) or none means every line. A boolean time is malformed, and so is a line
    that ends before it starts (as a ``ts`` that does: it was read, overlapping nothing or the wrong span); one
    that ends where it starts is a line."""
    from vlscale.data.real import Record
    from vlscale.data.video import load_subtitles, parse_ts, subtitle_text

    lines = [(0.0, 2.0, "ends at the start"), (2.0, 3.0, ""), (4.0, 5.0, "starts at the end"), (5.5, 6.0, "after")]
    assert subtitle_text(lines, (2.0, 4.0)) == "ends at the start starts at the end"
    assert subtitle_text(lines, None) == "ends at the start starts at the end after"
    ts = lambda data: parse_ts(Record("a.jsonl", "line 1", data, ("qid",)))  # noqa: E731
    assert ts({"ts": "NaN-NaN"}) is None and ts({}) is None and ts({"ts": ["nan", 3]}) is None
    with pytest.raises(RecordError, match=r"key 'ts'.*\[1, 2, 3\]"):
        ts({"ts": [1, 2, 3]})
    with pytest.raises(RecordError, match=r"key 'sub'.*item 0 needs 'text' \(string\), 'start' and 'end'"):
        load_subtitles(_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [
            {"text": "Hi.", "start": True, "end": 1.0}]}]))
    with pytest.raises(RecordError, match=r"subs\.jsonl: line 2 \(id 'w'\): key 'sub' item 1 ends before it starts "
                                          r"\(start 6\.5, end 4\.0\); fix its times$"):
        load_subtitles(_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [], "note": "fine"}, {
            "vid_name": "w", "sub": [{"text": "Hi.", "start": 0, "end": 1},
                                     {"text": "Bye.", "start": 6.5, "end": 4}]}]))
    # one that ends where it starts is read, as a ts [3, 3] is
    assert load_subtitles(_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [
        {"text": "Hi.", "start": 3, "end": 3}]}])) == {"v": [(3.0, 3.0, "Hi.")]}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_video_qa_answer_index_and_subtitle_files(tmp_path):
    """answer_idx "2" (a digit string) names option 2; one past the last option is refused naming the key.
    Subtitle lines are read in time order whatever the file's order; a video given twice is refused."""
    from vlscale.data.video import load_subtitles, load_video_qa

    subs = load_subtitles(_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [
        {"text": "second.", "start": 3.0, "end": 4.0}, {"text": "First.", "start": 0.0, "end": 1.0}]}]))
    assert subs["v"] == [(0.0, 1.0, "First."), (3.0, 4.0, "second.")]
    q = {"qid": 1, "q": "Q?", "a0": "x", "a1": "y", "a2": "z", "vid_name": "v", "ts": [0, 5]}
    (e,) = load_video_qa("tvqa", _jsonl(tmp_path / "a.jsonl", [dict(q, answer_idx="2")]), subs)
    assert e.target == "a2" and e.extra["answer_text"] == "z" and e.text.endswith("subtitle: First. second.")
    with pytest.raises(RecordError, match=r"line 1 \(id 1\): key 'answer_idx' must be an option index 0..2, got 3"):
        load_video_qa("tvqa", _jsonl(tmp_path / "b.jsonl", [dict(q, answer_idx=3)]), subs)
    twice = [{"vid_name": "v", "sub": []}, {"vid_name": "v", "sub": []}]
    with pytest.raises(RecordError, match=r"subs2\.jsonl: line 2 \(id 'v'\): key 'vid_name' appears twice"):
        load_subtitles(_jsonl(tmp_path / "subs2.jsonl", twice))


def test_null_answers_are_withheld_answers(tmp_path):
    """A test file whose answers are written as null ("answer_idx": null, "descs": null) rather than left out was
    refused by evaluate.py --predict-only ("must be an integer or a string, got NoneType None"), which reads such
    files: null is withheld as absence is, predicted there; training refuses it naming --predict-only."""
    from vlscale.data.video import Subtitles, load_video_captions, load_video_qa
    from vlscale.data.vqa import load_vqa

    qa = _jsonl(tmp_path / "qa.jsonl", [{"qid": 1, "q": "Q?", "a0": "x", "a1": "y", "vid_name": "v",
                                         "answer_idx": None}])
    cap = _jsonl(tmp_path / "cap.jsonl", [{"clip_id": 3, "vid_name": "v", "descs": None}])
    (q,) = load_video_qa("tvqa", qa, Subtitles(), require_answers=False)
    (c,) = load_video_captions("tvc", cap, "test", Subtitles(), require_answers=False)
    assert (q.target, q.references, c.target, c.references) == ("", [], "", [])
    with pytest.raises(RecordError, match=r"line 1 \(id 1\): key 'answer_idx' is null \(a split without its answers, "
                                          r".* launchers/evaluate\.py --predict-only\)$"):
        load_video_qa("tvqa", qa, Subtitles())
    vqa = _write_json(tmp_path / "vqa.json", [{"img_id": "i", "sent": "Q?", "question_id": 1, "answers": None}])
    with pytest.raises(RecordError, match=r"record 0 \(id 1\): key 'answers' is null \(a split without"):
        load_vqa(vqa)  # of its two answer keys, the one written as null is named, not 'label', left out
    (v,) = load_vqa(_write_json(tmp_path / "v2.json", [{"img_id": "i", "sent": "Q?", "question_id": 2, "label": None,
                                                        "answers": ["red"] * 10}]))
    assert (v.target, v.references[0], v.extra) == ("red", "red", {"label": {"red": 1.0}})  # a null label as none


def test_a_json_list_written_as_a_jsonl_file_is_named_so(tmp_path):
    """Records dumped as one JSON list (json.dump(rows)) or pretty-printed into a .jsonl file were refused as
    'line 1: is list, expected a JSON object' / 'line 1: is not valid JSON (...)', leaving the user to guess that
    the format wants one object per line; both now say so."""
    from vlscale.data.video import Subtitles, load_video_qa

    rows = [{"qid": 1, "q": "Q?", "a0": "x", "a1": "y", "vid_name": "v", "answer_idx": 0}]
    hint = r"; a \.jsonl file holds one JSON object per line \(json\.dumps\(record\) for each\), not a JSON list$"
    (tmp_path / "one.jsonl").write_text(json.dumps(rows))
    with pytest.raises(RecordError, match=r"one\.jsonl: line 1: is a JSON list" + hint):
        load_video_qa("tvqa", tmp_path / "one.jsonl", Subtitles())
    (tmp_path / "pretty.jsonl").write_text(json.dumps(rows, indent=2))
    with pytest.raises(RecordError, match=r"pretty\.jsonl: line 1: is not valid JSON \(.*\)" + hint):
        load_video_qa("tvqa", tmp_path / "pretty.jsonl", Subtitles())


def test_a_single_option_a_negative_answer_index_and_empty_descriptions_are_refused(tmp_path):
    """A question with only a0 is no multiple choice, answer_idx -1 names no option (it made the target "a-1"),
    and a caption record with an empty ``descs`` list has no answer (it became an unlabeled example)."""
    from vlscale.data.video import Subtitles, load_video_captions, load_video_qa

    q = {"qid": 1, "q": "Q?", "a0": "x", "a1": "y", "vid_name": "v", "answer_idx": 0}
    with pytest.raises(RecordError, match=r"key 'a1' is missing \(need answer options a0, a1, \.\.\.\)"):
        load_video_qa("tvqa", _jsonl(tmp_path / "one.jsonl", [{k: v for k, v in q.items() if k != "a1"}]), Subtitles())
    with pytest.raises(RecordError, match=r"key 'answer_idx' must be an option index 0..1, got -1"):
        load_video_qa("tvqa", _jsonl(tmp_path / "neg.jsonl", [dict(q, answer_idx=-1)]), Subtitles())
    with pytest.raises(RecordError, match=r"key 'descs' is empty"):
        load_video_captions("tvc", _jsonl(tmp_path / "c.jsonl", [{"clip_id": 3, "vid_name": "v", "descs": []}]),
                            "val", Subtitles())


def test_questions_with_another_number_of_options_than_their_file_are_said_once(tmp_path, caplog):
    """A TVQA question that lost its a4 (or gained an a5) in a conversion trained silently among five-option ones:
    the file's questions of another option count than most are counted in one warning naming the file, the usual
    count and the first such question; a file whose questions agree says nothing."""
    from vlscale.data.video import Subtitles, load_video_qa

    q = {"q": "Q?", **{f"a{i}": f"o{i}" for i in range(5)}, "vid_name": "v", "answer_idx": 0}
    rows = [dict(q, qid=1), {**{k: v for k, v in q.items() if k != "a4"}, "qid": 2}, dict(q, qid=3, a5="o5"),
            dict(q, qid=4)]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vlscale.data.video"):
        load_video_qa("tvqa", path, Subtitles())
        load_video_qa("tvqa", path, Subtitles())  # read again (train, then evaluation): said once
        load_video_qa("tvqa", _jsonl(tmp_path / "ok.jsonl", [dict(q, qid=1), dict(q, qid=2)]), Subtitles())
        first = _jsonl(tmp_path / "first.jsonl", [rows[1], dict(q, qid=5), dict(q, qid=6)])  # the odd one first
        load_video_qa("tvqa", first, Subtitles())
        assert load_video_qa("tvqa", _jsonl(tmp_path / "none.jsonl", []), Subtitles()) == []  # no usual count
    said = [r.getMessage() for r in caplog.records if "answer options" in r.getMessage()]
    assert said == [f"tvqa: 2 of 4 questions of {path} have another number of answer options than the file's usual 5 "
                    "(first: qid '2', 4 options); check them for a lost or extra option",
                    f"tvqa: 1 of 3 questions of {first} have another number of answer options than the file's usual 5 "
                    "(first: qid '2', 4 options); check them for a lost or extra option"]


def test_a_ts_outside_its_videos_subtitles_is_said_once(tmp_path, caplog):
    """A ``ts`` past its video's subtitle lines (given in milliseconds, or another clip's) selected none of them:
    the input trained without its subtitle text, silently. Such examples (QA and captions) are counted in one
    warning per file naming the first with its ts and the lines' span; a ts inside the span that meets no line (a
    silent moment), a NaN ts and a video without lines say nothing."""
    from vlscale.data.video import load_subtitles, load_video_captions, load_video_qa

    subs = load_subtitles(_jsonl(tmp_path / "subs.jsonl", [
        {"vid_name": "v", "sub": [{"text": "Hi.", "start": 1.0, "end": 2.0}, {"text": "Bye.", "start": 8, "end": 9}]},
        {"vid_name": "w", "sub": []},
        {"vid_name": "x", "sub": [{"text": "Long.", "start": 1, "end": 20},
                                  {"text": "Short.", "start": 5, "end": 6}]}]))
    q = {"q": "Q?", "a0": "x", "a1": "y", "vid_name": "v", "answer_idx": 0}
    rows = [dict(q, qid=1, ts="1500-4000"), dict(q, qid=2, ts=[3, 7]), dict(q, qid=3, ts="NaN-NaN"),
            dict(q, qid=4, ts=[0, 0.5]), dict(q, qid=5, vid_name="w", ts=[50, 60]), dict(q, qid=6, ts=[1, 2]),
            dict(q, qid=7, ts=[0, 1]), dict(q, qid=8, ts=[9, 10]),  # touching the first line's start, the last's end
            dict(q, qid=9, vid_name="x", ts=[10, 15], a2="z")]  # past the last line's end, not the longest's
    qa, cap = _jsonl(tmp_path / "qa.jsonl", rows), _jsonl(tmp_path / "cap.jsonl", [
        {"clip_id": 1, "vid_name": "v", "ts": [12.0, 30.0], "descs": ["a.", "b."]}])
    with caplog.at_level(logging.WARNING, logger="vlscale.data.video"):
        examples = load_video_qa("tvqa", qa, subs)
        load_video_qa("tvqa", qa, subs)  # read again: said once
        load_video_captions("tvc", cap, "train", subs)
    assert [e.extra["subtitle"] for e in examples] == ["", "", "Hi. Bye.", "", "", "Hi.", "Hi.", "Bye.", "Long."]
    said = [r.getMessage() for r in caplog.records if "have a ts outside" in r.getMessage()]
    assert said == [f"tvqa: 2 of 9 examples of {qa} have a ts outside their video's subtitle lines (first: '1', ts "
                    "1500.0-4000.0 s, the lines 1.0-9.0 s); their inputs carry no subtitle text (ts is in seconds)",
                    f"tvc: 2 of 2 examples of {cap} have a ts outside their video's subtitle lines (first: '1#0', ts "
                    "12.0-30.0 s, the lines 1.0-9.0 s); their inputs carry no subtitle text (ts is in seconds)"]
    assert sum("answer options" in r.getMessage() for r in caplog.records) == 1  # the same file's other warning


def test_video_captions_without_clip_id_take_the_video_name_and_only_train_is_one_example_per_description(tmp_path):
    """A TVC / YC2C record without ``clip_id`` is known by its ``vid_name`` (uid, extra["clip_id"], and the
    train split's "<clip>#k" uids); val and test give one example per clip whose target is the first
    description and whose references are all of them (scored once per clip, as VALUE scores captions)."""
    from vlscale.data.video import Subtitles, load_video_captions

    path = _jsonl(tmp_path / "c.jsonl", [{"vid_name": "v1", "descs": [{"desc": "a"}, {"desc": "b"}]},
                                         {"clip_id": 7, "vid_name": "v2", "descs": ["c", "d"]}])
    for split in ("val", "test"):
        ex = load_video_captions("tvc", path, split, Subtitles())
        assert [(e.uid, e.target, e.references, e.image_ids) for e in ex] == [
            ("v1", "a", ["a", "b"], ["v1"]), ("7", "c", ["c", "d"], ["v2"])], split
        assert [e.extra["clip_id"] for e in ex] == ["v1", "7"]
    train = load_video_captions("tvc", path, "train", Subtitles())
    assert [(e.uid, e.target) for e in train] == [("v1#0", "a"), ("v1#1", "b"), ("7#0", "c"), ("7#1", "d")]
    unlabeled = _jsonl(tmp_path / "u.jsonl", [{"vid_name": "v3"}])
    (e,) = load_video_captions("tvc", unlabeled, "test", Subtitles(), require_answers=False)
    assert (e.uid, e.target, e.extra["clip_id"]) == ("v3", "", "v3")


def test_two_clips_of_one_video_without_clip_id_are_refused_naming_the_fallback(tmp_path):
    """Two records of one video without ``clip_id`` share the uid their ``vid_name`` gives: the error names
    vid_name as the uid's source and asks for clip_ids, rather than blaming the absent clip_id; a repeated
    clip_id is still named as clip_id."""
    from vlscale.data.video import Subtitles, load_video_captions

    path = _jsonl(tmp_path / "c.jsonl", [{"vid_name": "v1", "descs": ["a"]}, {"vid_name": "v1", "descs": ["b"]}])
    with pytest.raises(RecordError) as e:
        load_video_captions("tvc", path, "val", Subtitles())
    assert e.value.key == "vid_name" and str(e.value) == (
        f"{path}: line 2 (id 'v1'): key 'vid_name' gives uid 'v1' again (first from line 1); the record has no "
        "'clip_id', so its uid is its 'vid_name': give each record its own 'clip_id'")
    path = _jsonl(tmp_path / "d.jsonl", [{"clip_id": 4, "vid_name": "v1", "descs": ["a"]},
                                         {"clip_id": 4, "vid_name": "v2", "descs": ["b"]}])
    with pytest.raises(RecordError) as e:
        load_video_captions("tvc", path, "val", Subtitles())
    assert e.value.key == "clip_id" and str(e.value).endswith("key 'clip_id' gives uid '4' again (first from line 1)")


# ----------------------------------------------------------------------------- visual sources

@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_image_sources_hold_every_fixture_image(task):
    cfg = make_cfg(tasks=[task])
    for split in ("train", "val", "test"):
        source = real_visual_source(cfg, task, split)
        assert source.kind == "images"
        for e in load_real_examples(cfg, task, split):
            for image_id in e.image_ids:
                img = source[image_id]
                assert img.dtype == np.uint8 and img.shape == (8, 8, 3)


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_video_sources_hold_every_fixture_video(task):
    cfg = make_cfg(tasks=[task])
    cfg.model.vision = "ViT-B-32"  # the fixtures' frame features are 512-d CLIP ViT-B/32 embeddings
    source = real_visual_source(cfg, task, "train")
    assert source.kind == "features"
    for split in ("train", "val", "test"):
        for e in load_real_examples(cfg, task, split):
            feats = source[e.image_ids[0]]
            assert feats.dtype == torch.float32 and feats.ndim == 2 and feats.shape[1] == 512


def test_video_feature_folder_npy_safetensors_and_subsampling():
    from vlscale.data.video import VideoFeatureFolder

    raw = np.load(ROOT / "tvqa" / "features" / "friends_s01e01_seg01_clip_00.npy")
    full = VideoFeatureFolder(ROOT / "tvqa" / "features")["friends_s01e01_seg01_clip_00"]
    assert torch.equal(full, torch.from_numpy(raw).float())
    sub = VideoFeatureFolder(ROOT / "tvqa" / "features", max_frames=3)["friends_s01e01_seg01_clip_00"]
    assert torch.equal(sub, full[[0, 2, 3]])       # evenly spaced: linspace(0, 3, 3) rounded
    st = VideoFeatureFolder(ROOT / "how2qa" / "features")
    assert st["how2_v001"].shape == (4, 512) and "how2_v002" in st and "nope" not in st
    with pytest.raises(KeyError, match="nope"):
        st["nope"]


def test_feature_source_cache_needs_a_cache_folder():
    cfg = RunConfig(model=ModelConfig(feature_source="cache"),
                    data=DataConfig(tasks=["vqa"], source="real", root=str(ROOT)))
    with pytest.raises(DataError, match="data.feature_cache"):
        real_visual_source(cfg, "vqa", "train")


# ----------------------------------------------------------------------------- HF datasets

VQA_COLUMNS = {"image": "image", "image_id": "image_name", "question": "question", "answers": "answers",
               "id": "qid"}


def test_hf_vqa_examples_and_image_source():
    from vlscale.data.hf_dataset import load_hf_examples

    ex, source = load_hf_examples("vqa", str(HF), "train", VQA_COLUMNS)
    assert [e.uid for e in ex] == ["1", "2", "3"]
    e = ex[1]
    assert e.text == "How many dogs?" and e.references == ["1"] * 7 + ["one"] * 3
    assert e.target == "1"                             # most frequent of the answers
    assert e.image_ids == ["img_a"] and ex[0].image_ids == ["img_a"]
    assert len(source) == 2 and source.kind == "images"
    img = source["img_a"]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    val, _ = load_hf_examples("vqa", str(HF), "val", dict(VQA_COLUMNS, answer="multiple_choice_answer"))
    assert [e.target for e in val] == ["no", "pizza"]  # "val" is the dataset's "validation" split


def test_hf_caption_gqa_and_nlvr2_mappings():
    from vlscale.data.hf_dataset import load_hf_examples

    caps, _ = load_hf_examples("caption", str(HF), "train", {"image": "image", "captions": "captions"})
    assert len(caps) == 6 and caps[0].uid == "train-0#0" and caps[0].references == ["A dog on grass.", "A small dog."]
    caps_val, _ = load_hf_examples("caption", str(HF), "val", {"image": "image", "captions": "captions"})
    assert len(caps_val) == 2 and caps_val[0].uid == "val-0"
    both = {"image": "image", "captions": "captions", "caption": "captions"}  # captions read and checked, not caption
    assert len(load_hf_examples("caption", str(HF), "val", both)[0]) == 2
    gqa, _ = load_hf_examples("gqa", str(HF), "train", {"image": "image", "question": "question",
                                                        "answer": "multiple_choice_answer"})
    assert gqa[2].references == ["red"]
    nl, src = load_hf_examples("nlvr2", str(HF), "val", {"image": ["image", "image2"], "text": "question",
                                                         "label": "label"})
    assert [e.target for e in nl] == ["false", "true"] and nl[0].image_ids == ["val/0/0", "val/0/1"]
    assert not np.array_equal(src["val/0/0"], src["val/0/1"])


def test_hf_nlvr2_label_mapped_as_answer_and_each_example_its_own_group_without_a_group_column():
    """NLVR2's 0/1 column may be mapped as ``answer`` (the module docstring's roles: label or answer): read as the
    label is, not refused as a mapping without a label. Without a ``group`` column each example is its own
    consistency group (its uid), not one group of every example."""
    from vlscale.data.hf_dataset import load_hf_examples

    nl, _ = load_hf_examples("nlvr2", str(HF), "val", {"image": ["image", "image2"], "text": "question",
                                                       "answer": "label"})
    assert [(e.uid, e.target, e.references, e.extra["group"]) for e in nl] == [
        ("val-0", "false", ["false"], "val-0"), ("val-1", "true", ["true"], "val-1")]


def test_hf_mapping_rules_a_plausible_slip_would_break(tmp_path):
    """nlvr2's group column is its consistency group; nlvr2 with image_id and vqa with two image columns are
    refused; VQA's ``answer`` column is the target even where ``answers`` votes otherwise; a blank caption in
    ``captions`` is malformed, as it is in COCO's file."""
    from vlscale.data.hf_dataset import load_hf_examples

    nl, _ = load_hf_examples("nlvr2", str(HF), "val", {"image": ["image", "image2"], "text": "question",
                                                       "label": "label", "group": "question"})
    assert [e.extra["group"] for e in nl] == ["Is it raining?", "What is on the plate?"]
    with pytest.raises(DataError, match="image_id applies to single-image tasks only"):
        load_hf_examples("nlvr2", str(HF), "val", {"image": ["image", "image2"], "image_id": "image_name",
                                                   "text": "question", "label": "label"})
    with pytest.raises(DataError, match=r"hf_columns\.image for task 'vqa' must name 1 column"):
        load_hf_examples("vqa", str(HF), "train", dict(VQA_COLUMNS, image=["image", "image2"]))
    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    path = _hf_dict(tmp_path / "hf_rules", {"image": [image] * 2, "question": ["What?"] * 2, "answer": ["cat"] * 2,
                                            "answers": [["dog", "dog", "cat"]] * 2,
                                            "captions": [["A cat.", "A small cat."], ["A dog.", "  "]]})
    e, _ = load_hf_examples("vqa", path, "train", {"image": "image", "question": "question", "answer": "answer",
                                                   "answers": "answers"})
    assert e[0].target == "cat" and e[0].references == ["dog", "dog", "cat"]
    captions = {"image": "image", "captions": "captions"}
    with pytest.raises(RecordError, match=r"row 1: key 'captions' item 1 must be a non-empty string"):
        load_hf_examples("caption", path, "val", captions)
    (val,), _ = load_hf_examples("caption", path, "val", captions, skip_bad_records=True)
    assert val.target == "A cat." and val.references == ["A cat.", "A small cat."]  # val: target = the first


def test_hf_answers_and_captions_as_a_sequence_of_structs(tmp_path):
    """``datasets.Sequence({"answer": ..., "answer_confidence": ...})`` comes back as a dict of lists:
    read as the list of answers it stands for, as a list of such dicts is."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    answers = datasets.Sequence({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string")})
    captions = datasets.Sequence({"raw": datasets.Value("string")})
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": answers, "captions": captions})
    path = _hf_dict(tmp_path / "hf_seq", {"image": [image, image], "question": ["What color?", "How many?"],
                                          "answers": [{"answer": ["red"] * 4 + ["blue"], "answer_confidence": ["yes"] * 5},
                                                      {"answer": [], "answer_confidence": []}],
                                          "captions": [{"raw": ["A red cup.", "A cup."]}, {"raw": []}]}, features)
    assert isinstance(datasets.load_from_disk(path)["train"][0]["answers"], dict)  # what datasets hands back
    columns = {"image": "image", "question": "question", "answers": "answers"}
    with pytest.raises(RecordError, match=r"row 1: key 'answers' is an empty list: the row has no answers \(data\."
                                          r"skip_bad_records=true skips such rows; a split without its answers"):
        load_hf_examples("vqa", path, "train", columns)  # empty lists: no answers, as an empty list column
    ex, _ = load_hf_examples("vqa", path, "train", columns, skip_bad_records=True)
    assert ex[0].target == "red" and ex[0].references == ["red"] * 4 + ["blue"]
    assert ex[0].extra["label"] == {"red": 1.0, "blue": 0.3}
    caps, _ = load_hf_examples("caption", path, "val", {"image": "image", "captions": "captions"},
                               skip_bad_records=True)
    assert [c.references for c in caps] == [["A red cup.", "A cup."]]
    pred, _ = load_hf_examples("vqa", path, "train", columns, require_answers=False)
    assert [e.target for e in pred] == ["red", ""]


def test_hf_captions_as_structs_read_from_whichever_text_field_they_have(tmp_path):
    """Caption structs name their text "raw" (Karpathy's), "caption" (COCO's) or "text": each is read from
    the first of those that holds a string, so ``{"caption": ..., "sentid": ...}`` rows and a struct whose
    "raw" is null beside its "caption" load as captions rather than failing on the missing / null "raw"."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    coco = datasets.Sequence({"caption": datasets.Value("string"), "sentid": datasets.Value("int64")})
    features = datasets.Features({"image": datasets.Image(), "coco": coco,
                                  "both": [{"raw": datasets.Value("string"), "caption": datasets.Value("string")}]})
    columns = {"image": [image], "coco": [{"caption": ["A cup.", "A mug."], "sentid": [1, 2]}],
               "both": [[{"raw": None, "caption": "A red cup."}]]}
    path = _hf_dict(tmp_path / "hf_caps", columns, features)
    for column, want in (("coco", ["A cup.", "A mug."]), ("both", ["A red cup."])):
        (e,), _ = load_hf_examples("caption", path, "val", {"image": "image", "captions": column})
        assert (e.target, e.references) == (want[0], want)


def test_hf_gqa_rows_of_answers_alone_train_on_the_most_frequent(tmp_path):
    """A GQA split mapped to a list of answers without a gold ``answer`` column takes the answer given most
    often as its target and reference (ties alphabetical), not the list's first."""
    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    path = _hf_dict(tmp_path / "hf_gqa", {"image": [image] * 2, "q": ["Is it?"] * 2,
                                          "answers": [["yes", "no", "no"], ["yes", "maybe", "no", "maybe", "no"]]})
    ex, _ = load_hf_examples("gqa", path, "train", {"image": "image", "question": "q", "answers": "answers"})
    assert [(e.target, e.references) for e in ex] == [("no", ["no"]), ("maybe", ["maybe"])]


def test_hf_vqa_answer_types_are_read_where_mapped_and_a_test_split_may_lack_them(tmp_path):
    """``data.hf_columns.answer_type`` (VQA v2's "yes/no" / "number" / "other") lands in ``extra["answer_type"]``,
    where evaluation scores each type; a split without answers (--predict-only) may lack the column, one with
    answers may not (the mapping names a column the split does not have), and a row's missing type is named."""
    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    cols = {"image": "image", "question": "q", "answers": "answers", "answer_type": "kind"}
    path = _hf_dict(tmp_path / "hf_vqa", {"image": [image] * 2, "q": ["Is it?", "How many?"],
                                          "answers": [["yes"] * 10, ["2"] * 10], "kind": ["yes/no", "number"]})
    ex, _ = load_hf_examples("vqa", path, "train", cols)
    assert [e.extra["answer_type"] for e in ex] == ["yes/no", "number"]
    bare = _hf_dict(tmp_path / "hf_test", {"image": [image], "q": ["Is it?"]}, splits=("test",))
    ex, _ = load_hf_examples("vqa", bare, "test", cols, require_answers=False)
    assert len(ex) == 1 and "answer_type" not in ex[0].extra
    without = _hf_dict(tmp_path / "hf_untyped", {"image": [image], "q": ["Is it?"], "answers": [["yes"] * 10]})
    with pytest.raises(DataError, match=r"data.hf_columns.answer_type='kind' is not a column of the dataset"):
        load_hf_examples("vqa", without, "train", cols)
    blank = _hf_dict(tmp_path / "hf_blank", {"image": [image], "q": ["Is it?"], "answers": [["yes"] * 10],
                                             "kind": [None]})
    with pytest.raises(DataError, match=r"row 0.*'kind'"):
        load_hf_examples("vqa", blank, "train", cols)
    empty = _hf_dict(tmp_path / "hf_empty_type", {"image": [image], "q": ["Is it?"], "answers": [["yes"] * 10],
                                                  "kind": [" "]})
    with pytest.raises(DataError, match=r"row 0.*'kind' holds only whitespace \(' '\)"):  # not scored as type ''
        load_hf_examples("vqa", empty, "train", cols)
    # GQA has no answer types: the mapping is ignored (a warning says so), its rows carry none
    ex, _ = load_hf_examples("gqa", path, "train", cols)
    assert len(ex) == 2 and not any("answer_type" in e.extra for e in ex)


def test_only_a_dict_of_equal_length_lists_is_read_as_rows():
    """A struct of lists of different lengths is not a sequence of structs: zipped it would drop the longer lists'
    tail silently, so it is left as it is (and refused where a list is expected, naming the column)."""
    from vlscale.data.hf_dataset import _rows_of

    assert _rows_of({"answer": ["red", "blue"], "answer_confidence": ["yes", "no"]}) == [
        {"answer": "red", "answer_confidence": "yes"}, {"answer": "blue", "answer_confidence": "no"}]
    ragged = {"answer": ["red", "blue", "two"], "answer_confidence": ["yes"]}
    assert _rows_of(ragged) is ragged
    assert _rows_of({}) == {} and _rows_of({"answer": "red"}) == {"answer": "red"} and _rows_of([1]) == [1]


def test_hf_class_label_answers_are_read_as_their_names(tmp_path):
    """A ClassLabel answer column was read as its integers: NLVR2 took them as 0 = false / 1 = true, inverting a
    label whose names are ["True", "False"], and VQA / GQA refused them ("must be a string, got int")."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    features = datasets.Features({"image": datasets.Image(), "image2": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["True", "False"]),
                                  "answer": datasets.ClassLabel(names=["red", "two"]),
                                  "answers": datasets.Sequence(datasets.ClassLabel(names=["red", "two"])),
                                  "texts": datasets.Sequence(datasets.Value("string"))})
    path = _hf_dict(tmp_path / "hf_labels", {"image": [image] * 3, "image2": [image] * 3, "question": ["q?"] * 3,
                                             "label": [0, 1, -1], "answer": [1, 0, -1],
                                             "answers": [[0, 0, 1], [1], []],
                                             "texts": [["two", "red", "two"], ["red"], []]}, features)
    nl, _ = load_hf_examples("nlvr2", path, "train", {"image": ["image", "image2"], "text": "question",
                                                      "label": "label"}, require_answers=False)
    assert [e.target for e in nl] == ["true", "false", ""]  # 0 is "True" here; -1: withheld
    with pytest.raises(RecordError, match=r"row 2: key 'label' is -1 \(the datasets library's mark of a withheld "
                                          r"label\): the row has no answers"):  # not "is missing", once named
        load_hf_examples("nlvr2", path, "train", {"image": ["image", "image2"], "text": "question", "label": "label"})
    gqa, _ = load_hf_examples("gqa", path, "train", {"image": "image", "question": "question", "answer": "answer"},
                              require_answers=False)
    assert [e.target for e in gqa] == ["two", "red", ""]
    vqa, _ = load_hf_examples("vqa", path, "train", {"image": "image", "question": "question", "answers": "answers"},
                              require_answers=False)
    assert [e.references for e in vqa[:2]] == [["red", "red", "two"], ["two"]] and vqa[0].target == "red"
    # a ClassLabel answer beside a list of plain strings (VQA's multiple_choice_answer and answers): each column is
    # read by its own feature
    both, _ = load_hf_examples("vqa", path, "train", {"image": "image", "question": "question", "answer": "answer",
                                                      "answers": "texts"}, require_answers=False)
    assert [(e.target, e.references) for e in both] == [("two", ["two", "red", "two"]), ("red", ["red"]), ("", [])]


def test_hf_split_named_as_the_dataset_names_it_gives_our_ids():
    """``--split validation`` (evaluate.py) named its rows ``validation/<row>``, while extract_features.py
    --split validation stores them as ``val/<row>`` (ours): the cache made for it then missed every id. A
    ``dev`` split beside ``validation`` stays itself (read as dev, ids dev/<row>)."""
    import unittest.mock

    import datasets

    from vlscale.data.hf_dataset import load_hf_examples, open_hf_split

    columns = {k: v for k, v in VQA_COLUMNS.items() if k != "image_id"}
    ours, _ = load_hf_examples("vqa", str(HF), "val", columns)
    for name in ("validation", "val"):
        ex, src = load_hf_examples("vqa", str(HF), name, columns)
        assert [(e.uid, e.image_ids) for e in ex] == [(e.uid, e.image_ids) for e in ours]
        assert ex[0].image_ids == ["val/0"] and "val/0" in src
    assert [open_hf_split(str(HF), n)[1:] for n in ("validation", "val", "train")] == [
        ("validation", "val"), ("validation", "val"), ("train", "train")]
    splits = datasets.load_from_disk(str(HF))
    both = datasets.DatasetDict({"train": splits["train"], "validation": splits["validation"], "dev": splits["train"]})
    with unittest.mock.patch("datasets.load_from_disk", return_value=both):
        assert open_hf_split(str(HF), "dev")[1:] == ("dev", "dev")
        assert open_hf_split(str(HF), "val")[1:] == ("validation", "val")


def test_hf_through_the_config():
    cfg = RunConfig(data=DataConfig(tasks=["vqa"], source="real", hf_dataset=str(HF), hf_columns=VQA_COLUMNS))
    assert len(load_real_examples(cfg, "vqa", "train")) == 3
    assert real_visual_source(cfg, "vqa", "train")["img_a"].shape == (8, 8, 3)


def test_hf_roles_a_task_does_not_read_are_said_once(caplog):
    from vlscale.data.hf_dataset import load_hf_examples

    columns = {**VQA_COLUMNS, "label": VQA_COLUMNS["question"], "group": VQA_COLUMNS["question"]}
    with caplog.at_level(logging.WARNING, logger="vlscale.data.hf_dataset"):
        for split in ("train", "val"):
            assert len(load_hf_examples("vqa", str(HF), split, columns)[0]) > 0
    said = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert said == ["data.hf_columns: task 'vqa' does not read the role(s) ['group', 'label'] (its roles: "
                    "['image', 'image_id', 'question', 'text', 'answer', 'answers', 'id', 'answer_type']); "
                    "they are ignored"]


@pytest.mark.parametrize("columns, match", [
    ({"image": "image", "questions": "question", "answers": "answers"}, "unknown role 'questions'"),
    ({"image": "image", "question": "prompt", "answers": "answers"}, "'prompt' is not a column"),
    ({"image": "image", "question": "question"}, "needs answer or answers"),
    ({}, r"for task 'vqa' needs image; got \{\}: map each role to a column of .*/hf_multi\[train\] " + re.escape(
        "(['image', 'image2', 'image_name', 'qid', 'question', 'multiple_choice_answer', 'answers', 'captions', "
        "'label']), e.g. data.hf_columns=\"{image: COLUMN, question: COLUMN, answer: COLUMN}\"") + "$"),
])
def test_hf_bad_column_mappings(columns, match):
    from vlscale.data.hf_dataset import load_hf_examples

    with pytest.raises(DataError, match=match):
        load_hf_examples("vqa", str(HF), "train", columns)
    # a column mapped to the other role of its pair: the role to map it to (it was "must be a string, got list")
    with pytest.raises(DataError, match=r"row 0: key 'answers' holds a list a row, and data\.hf_columns\.answer takes "
                                        r"one string: map this column to answers instead$"):
        load_hf_examples("vqa", str(HF), "train", {"image": "image", "question": "question", "answer": "answers"})
    with pytest.raises(DataError, match=r"row 0: key 'question' holds one string a row, and data\.hf_columns\.captions "
                                        r"takes a list: map this column to caption instead$"):
        load_hf_examples("caption", str(HF), "train", {"image": "image", "captions": "question"})
    with pytest.raises(DataError, match=r"row 0: key 'multiple_choice_answer' holds one string a row, and data\.hf_col"
                                        r"umns\.answers takes a list: map this column to answer instead$"):
        load_hf_examples("vqa", str(HF), "train", {"image": "image", "question": "question",
                                                   "answers": "multiple_choice_answer"})
    # a column of neither kind (numbers) is no pair's: the value's own type is named
    with pytest.raises(DataError, match=r"row 0: key 'qid' must be a string, got int 1$"):
        load_hf_examples("vqa", str(HF), "train", {"image": "image", "question": "question", "answer": "qid"})
    with pytest.raises(DataError, match="supports tasks"):
        load_hf_examples("tvqa", str(HF), "train", VQA_COLUMNS)
    with pytest.raises(DataError, match="no split for 'test'"):
        load_hf_examples("vqa", str(HF), "test", VQA_COLUMNS)


def test_hf_bad_rows_name_the_row_and_skip_mode_counts(tmp_path):
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    ds = datasets.load_from_disk(str(HF))
    train = ds["train"].map(lambda row, i: {"question": "" if i == 1 else row["question"]}, with_indices=True,
                            keep_in_memory=True)  # no cache file written into the fixture
    path = tmp_path / "hf_bad"
    datasets.DatasetDict({"train": train}).save_to_disk(str(path))
    with pytest.raises(RecordError, match=r"hf_bad\[train\]: row 1 \(id 2\): key 'question' is an empty string"):
        load_hf_examples("vqa", str(path), "train", VQA_COLUMNS)
    ex, _ = load_hf_examples("vqa", str(path), "train", VQA_COLUMNS, skip_bad_records=True)
    assert [e.uid for e in ex] == ["1", "3"] and ex.skipped == 1


# ----------------------------------------------------------------------------- bad input

def copy_root(tmp_path, *folders):
    root = tmp_path / "root"
    for f in folders:
        shutil.copytree(ROOT / f, root / f)
    return root


def rewrite_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_annotation_file_and_root(tmp_path):
    (tmp_path / "vqa").mkdir()
    with pytest.raises(DataFileNotFound, match=r"karpathy_val\.json does not exist"):
        load_real_examples(make_cfg(tmp_path), "vqa", "val")
    with pytest.raises(DataFileNotFound, match="none of .*tvqa/val.jsonl"):
        load_real_examples(make_cfg(tmp_path, tasks=["tvqa"]), "tvqa", "val")
    with pytest.raises(DataError, match="data.root is not set"):
        load_real_examples(RunConfig(data=DataConfig(source="real")), "vqa", "train")
    # neither spelling of a dataset's folder there: the layout's own (gqa/, not VL-T5's GQA/) is named
    with pytest.raises(DataFileNotFound, match=rf"gqa train annotations: {tmp_path}/gqa/train\.json does not exist"):
        load_real_examples(make_cfg(tmp_path, tasks=["gqa"]), "gqa", "train")
    with pytest.raises(DataFileNotFound, match=rf"^vqa: image folder {tmp_path}/coco/images does not exist; layout: "):
        real_visual_source(make_cfg(tmp_path), "vqa", "train")
    # the line gives the override (a run's adapter keeps data.root: evaluate.py after the datasets moved)
    with pytest.raises(DataFileNotFound, match=r"^data\.root='.*/no_such_root' is not a directory; give data\.root="
                                               r"DIR, the folder the datasets are in \(layout: docs/datasets\.md\)$"):
        load_real_examples(make_cfg(tmp_path / "no_such_root"), "vqa", "train")
    with pytest.raises(KeyError, match="unknown task 'vqa3'"):
        load_real_examples(make_cfg(), "vqa3", "train")


def test_a_relative_path_not_there_is_named_with_the_working_directory_it_was_read_from(tmp_path, monkeypatch):
    """A run's config keeps its paths as given, so evaluate.py or predict.py started in another folder reads a
    relative data.root, data.feature_cache or data.hf_dataset there: the refusal names that working directory. A
    feature cache folder not there at all was 'meta.json is missing ...; make the cache' (evaluate.py's check of
    the cache's weights), as if the cache were there but unfinished (found by the bring-your-own-data audit)."""
    import datasets

    from vlscale.data.features import FeatureCache, cache_weights
    from vlscale.data.hf_dataset import load_hf_examples

    def offline(name, *a, **k):  # the hub is not asked: without HF_HUB_OFFLINE=1 and no network it retried ~20 s
        raise ConnectionError(f"cannot reach the hub for {name!r}")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    where = re.escape(f" (read from the working directory {tmp_path}: run from the folder it is relative to, "
                      f"or give its absolute path)")
    with pytest.raises(DataFileNotFound, match=rf"^data\.root='root' is not a directory{where}; give data\.root=DIR, "
                                               r"the folder the datasets are in \(layout: docs/datasets\.md\)$"):
        load_real_examples(make_cfg("root"), "vqa", "train")
    cfg = RunConfig(model=ModelConfig(feature_source="cache"), data=DataConfig(feature_cache="cache"))
    for read in (lambda: cache_weights(cfg), lambda: FeatureCache("cache")):
        with pytest.raises(DataFileNotFound, match=rf"^feature cache folder cache does not exist{where}; give data\."
                                                   r"feature_cache=DIR, the folder the cache is in, or make it with "
                                                   r"launchers/extract_features\.py$"):
            read()
    # '~' is not expanded there (read as ./~/cache), so it is relative to the working directory too
    with pytest.raises(DataFileNotFound, match=rf"^feature cache folder ~/cache does not exist{where}; give data\."):
        FeatureCache("~/cache")
    with pytest.raises(DataError, match=rf"^data\.hf_dataset='hf_data': not a local folder{where}, and datasets\."
                                        r"load_dataset failed \(.*cannot reach the hub for 'hf_data'"):
        load_hf_examples("vqa", "hf_data", "train", {"image": "image", "question": "q", "answer": "a"})


def test_a_data_hf_dataset_that_is_clearly_a_local_path_is_refused_without_asking_the_hub(tmp_path, monkeypatch):
    """A mistyped local folder went to datasets.load_dataset, which (without HF_HUB_OFFLINE=1, no network) retried
    the hub for ~30 s before failing. A path (absolute, ./, ../, ~) or a name whose parent folder is here is refused
    at once, naming the working directory and a near folder; a hub id still goes to the hub."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: asked.append(name) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "my_hf_ds").mkdir(parents=True)
    (tmp_path / "data" / "my_hf_dz1").write_text("")  # nearer, but a file: not a dataset folder to suggest
    cols = {"image": "image", "question": "q", "answer": "a"}
    where = re.escape(f" (read from the working directory {tmp_path}: run from the folder it is relative to, "
                      f"or give its absolute path)")
    with pytest.raises(DataError, match=rf"^data\.hf_dataset='data/my_hf_dz': no such folder{where}; not looked up "
                                        r"on the hub, as its folder 'data' is here .*; did you mean "
                                        r"'data/my_hf_ds'\?$"):
        load_hf_examples("vqa", "data/my_hf_dz", "train", cols)

    def unlisted(self):  # a folder this process may not list (root lists every one: a stand-in)
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as m:  # and one this process may not enter: a line, not a traceback
        m.setattr(Path, "exists", unlisted)
        with pytest.raises(DataError, match=r"^data\.hf_dataset='data/my_hf_ds': cannot be looked at \(Permission "
                                            r"denied\); check the permissions of the folders on its path$"):
            load_hf_examples("vqa", "data/my_hf_ds", "train", cols)
    with pytest.raises(DataError, match=r"^data\.hf_dataset='a{300}': cannot be looked at \(File name too long\)$"):
        load_hf_examples("vqa", "a" * 300, "train", cols)  # any OSError, and no word of permissions for it
    with monkeypatch.context() as m:
        m.setattr(Path, "iterdir", unlisted)
        with pytest.raises(DataError, match=rf"^data\.hf_dataset='data/my_hf_dz': no such folder{where}; not looked "
                                            r"up on the hub, as its folder 'data' is here [^;]*$"):
            load_hf_examples("vqa", "data/my_hf_dz", "train", cols)
    for path in ("./my_hf_ds", "../no_hf_ds", str(tmp_path / "no_hf_ds"), "~/no_such_hf_ds"):
        with pytest.raises(DataError, match=rf"^data\.hf_dataset='{re.escape(path)}': no such folder.*; not looked "
                                            r"up on the hub, as it is a path \(absolute, or starting with \./, \.\./ "
                                            r"or ~\)$"):
            load_hf_examples("vqa", path, "train", cols)
    for path in ("a/b/c", "my hf ds"):  # neither a hub id nor said as a path: said as what it is
        with pytest.raises(DataError, match=rf"^data\.hf_dataset='{path}': no such folder.*; not looked up on the "
                                            r"hub, as it is no hub id \(a name, or owner/name, of letters, digits"):
            load_hf_examples("vqa", path, "train", cols)
    home = re.escape(str(Path("~").expanduser() / "no_such_hf_ds"))
    with pytest.raises(DataError, match=rf"^data\.hf_dataset='~/no_such_hf_ds': no such folder \({home}\); not "):
        load_hf_examples("vqa", "~/no_such_hf_ds", "train", cols)
    assert asked == []
    for hub_id in ("owner/vqa_ds", "vqa_ds"):  # no local folder 'owner': hub ids
        with pytest.raises(DataError, match=r"not a local folder.*datasets\.load_dataset failed \(ZeroDivisionError"):
            load_hf_examples("vqa", hub_id, "train", cols)
    assert asked == ["owner/vqa_ds", "vqa_ds"]


def test_a_videos_features_folder_given_as_the_feature_cache_is_named_so(tmp_path):
    """data.feature_cache pointed at a task's features/ folder of per-video files (the VALUE release's .npz, as the
    video preset's own cache setting invites) was 'meta.json is missing ...; make the cache', as if a cache were
    unfinished: the refusal says what the folder holds and the two ways to use it (found by the video audit)."""
    from vlscale.data.features import FeatureCache

    np.savez(tmp_path / "clip_b.npz", features=np.ones((2, 4), np.float32))
    np.save(tmp_path / "clip_a.npy", np.ones((2, 4), np.float32))
    with pytest.raises(DataFileNotFound, match=rf"^feature cache {re.escape(str(tmp_path))}: meta\.json is missing "
                                               r"\(.*\); it holds video frame-features files \(clip_a\.npy, "
                                               r"clip_b\.npz\), not a cache: put them in data\.root/<task>/features/ "
                                               r"and set data\.feature_cache=null, or copy them into a cache with "
                                               r"launchers/extract_features\.py --real$"):
        FeatureCache(tmp_path)
    (tmp_path / "clip_c.safetensors").touch()  # a third file: the first two named, then ", ..."
    with pytest.raises(DataFileNotFound, match=r"\(clip_a\.npy, clip_b\.npz, \.\.\.\), not a cache"):
        FeatureCache(tmp_path)


@pytest.mark.parametrize("task, file, edit, match", [
    ("vqa", "vqa/karpathy_train.json", lambda d: d[1].pop("sent"),
     r"karpathy_train\.json: record 1 \(id 25001\): key 'sent' is missing"),
    # a field named otherwise: the record's keys show it (the audit's 'question' for 'sent')
    ("vqa", "vqa/karpathy_train.json", lambda d: d[1].update(question=d[1].pop("sent")),
     r"record 1 \(id 25001\): key 'sent' is missing \(the record's keys: \['img_id', .*'question'\]\)$"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0].update(label=["2"]),
     r"record 0 \(id 9001\): key 'label' must be an object, got list"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[2].update(answers=[]),
     r"record 2 \(id 42001\): key 'answers' is empty"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[2].update(question_id=9001),
     r"record 2 \(id 9001\): key 'question_id' gives uid '9001' again \(first from record 0\)"),
    ("gqa", "gqa/train.json", lambda d: d[1].update(label={}),
     r"train\.json: record 1 \(id '07333408'\): key 'label' is empty"),
    ("gqa", "gqa/train.json", lambda d: d[0].update(label={"yes": "high"}),
     r"record 0 .*key 'label' score of answer 'yes' must be a finite number"),
    ("nlvr2", "nlvr2/train.json", lambda d: d[3].update(label=2),
     r"record 3 \(id 'nlvr2_train_3'\): key 'label' must be 0/1"),
    ("nlvr2", "nlvr2/train.json", lambda d: d[0].pop("img1"), r"record 0 .*key 'img1' is missing"),
    ("caption", "coco/dataset_coco.json", lambda d: d["images"][2].update(split="holdout"),
     r"dataset_coco\.json: images\[2\] \(id 'COCO_val2014_000000000042.jpg'\): key 'split' must be one of"),
    ("caption", "coco/dataset_coco.json", lambda d: d["images"][0]["sentences"][1].pop("raw"),
     r"images\[0\] .*key 'sentences' item 1 needs a non-empty string 'raw'"),
    ("caption", "coco/dataset_coco.json", lambda d: d["images"][0]["sentences"][1].update(raw="  "),
     r"images\[0\] .*key 'sentences' item 1 needs a non-empty string 'raw'"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0].update(label={"2": -1.0}),
     r"record 0 \(id 9001\): key 'label' score of answer '2' must be >= 0, got -1.0"),
    ("gqa", "gqa/train.json", lambda d: d[0].update(label={"yes": 0.0, "no": 0}),
     r"record 0 .*key 'label' has no answer with a score above 0"),
    ("nlvr2", "nlvr2/train.json", lambda d: d[1].update(uid=" "),
     r"record 1 .*key 'uid' holds only whitespace \(' '\)$"),
    ("gqa", "gqa/train.json", lambda d: d[1].update(question_id=""),
     r"train\.json: record 1 .*key 'question_id' is an empty string"),
    # JSON's true is no id (nor an index): it is not read as the integer 1, nor named as the record's id
    ("vqa", "vqa/karpathy_train.json", lambda d: d[2].update(question_id=True),
     r"karpathy_train\.json: record 2: key 'question_id' must be a string or an integer, got bool True"),
    # an image with no captions is malformed (it was read as an image to caption, with an empty target)
    ("caption", "coco/dataset_coco.json", lambda d: d["images"][0].update(sentences=[]),
     r"images\[0\] \(id 'COCO_train2014_000000000009\.jpg'\): key 'sentences' is empty"),
    ("caption", "coco/dataset_coco.json", lambda d: d["images"][1].update(cocoid="25"),
     r"images\[1\] .*key 'cocoid' must be an integer, got str '25'"),
    # an answers item without its 'answer' string (not read as "", nor a TypeError)
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0]["answers"][3].pop("answer"),
     r"record 0 \(id 9001\): key 'answers' item 3 must be a string or an object with a string 'answer', got "
     r"\{'answer_confidence'"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0].update(answer_type=None),
     r"record 0 \(id 9001\): key 'answer_type' must be a string, got NoneType None"),
    ("nlvr2", "nlvr2/train.json", lambda d: d[3].update(label=-1),
     r"record 3 \(id 'nlvr2_train_3'\): key 'label' must be 0/1 \(or true/false\), got -1"),
    # a score that is no finite number (JSON's NaN, Infinity, true) would reach the soft-target weights
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0].update(label={"2": float("nan")}),
     r"record 0 \(id 9001\): key 'label' score of answer '2' must be a finite number, got nan"),
    ("gqa", "gqa/train.json", lambda d: d[0].update(label={"yes": float("inf")}),
     r"record 0 .*key 'label' score of answer 'yes' must be a finite number, got inf"),
    ("vqa", "vqa/karpathy_train.json", lambda d: d[0].update(label={"2": True}),
     r"record 0 \(id 9001\): key 'label' score of answer '2' must be a finite number, got True"),
    # label without answers: the key named is the one missing, not label
    ("vqa", "vqa/karpathy_train.json", lambda d: d[1].pop("answers"),
     r"record 1 \(id 25001\): key 'answers' is missing \(the record's keys: \['img_id', 'sent', 'question_id', "
     r"'answer_type', 'question_type', 'label'\]\)$"),
    ("gqa", "gqa/train.json", lambda d: d[0].update(sent=" \n"),
     r"record 0 \(id '02930152'\): key 'sent' holds only whitespace \(' \\n'\)$"),
    ("nlvr2", "nlvr2/train.json", lambda d: d[2].update(sent="  "),
     r"record 2 \(id 'nlvr2_train_2'\): key 'sent' holds only whitespace \('  '\)$"),
])
def test_malformed_record_names_file_record_and_key_and_skip_mode_counts(tmp_path, caplog, task, file, edit, match):
    root = copy_root(tmp_path, file.split("/")[0])
    rewrite_json(root / file, edit)
    with pytest.raises(RecordError, match=match) as info:
        load_real_examples(make_cfg(root, tasks=[task]), task, "train")
    assert str(root / file) in str(info.value)
    good = COUNTS[task][0]
    with caplog.at_level(logging.WARNING):
        examples = load_real_examples(make_cfg(root, tasks=[task], skip_bad_records=True), task, "train")
    assert examples.skipped == 1
    assert "skipped 1 malformed record" in caplog.text and str(root / file) in caplog.text
    if task == "caption":  # a skipped image drops all of its captions
        assert len(examples) < good
    else:
        assert len(examples) == good - 1


def test_jsonl_bad_line_and_bad_fields(tmp_path, caplog):
    root = copy_root(tmp_path, "tvqa")
    path = root / "tvqa" / "train.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["answer_idx"] = 7
    path.write_text("\n".join([lines[0], "{not json", json.dumps(bad)]) + "\n")
    cfg = make_cfg(root, tasks=["tvqa"])
    with pytest.raises(RecordError, match=r"train\.jsonl: line 2: is not valid JSON"):
        load_real_examples(cfg, "tvqa", "train")
    ex = load_real_examples(make_cfg(root, tasks=["tvqa"], skip_bad_records=True), "tvqa", "train")
    assert len(ex) == 1 and ex.skipped == 2
    assert any("line 3 (id 3): key 'answer_idx' must be an option index 0..4, got 7" in m for m in ex.skip_messages)
    path.write_text(lines[0].replace('"0.0-5.0"', '"soon"') + "\n")
    with pytest.raises(RecordError, match=r"line 1 \(id 1\): key 'ts' must be 'start-end'"):
        load_real_examples(cfg, "tvqa", "train")


def test_skip_mode_counts_every_skipped_record_and_keeps_the_first_20_messages(tmp_path, caplog):
    """Skip mode on a file of many bad records: all are counted, the messages kept (for the log) are the
    first 20, in file order, also when the lists of several files are merged; the warning quotes the first."""
    from vlscale.data.real import ExampleList

    root = copy_root(tmp_path, "vqa")
    path = root / "vqa" / "karpathy_train.json"
    good = json.loads(path.read_text())
    bad = [{k: v for k, v in dict(good[0], question_id=100 + i).items() if k != "sent"} for i in range(25)]
    path.write_text(json.dumps(bad + good))
    with caplog.at_level(logging.WARNING):
        ex = load_real_examples(make_cfg(root, skip_bad_records=True), "vqa", "train")
    assert len(ex) == len(good) and ex.skipped == 25
    assert (f"skipped 25 malformed record(s) (data.skip_bad_records=true); first: {path}: record 0 (id 100): "
            in caplog.text)
    assert [m.split(": ")[1] for m in ex.skip_messages] == [f"record {i} (id {100 + i})" for i in range(20)]
    merged = ExampleList()
    for first in (0, 15):
        part = ExampleList()
        for i in range(first, first + 15):
            part.note_skip(DataError(f"bad {i}"))
        merged.merge_skips(part)
    assert merged.skipped == 30 and merged.skip_messages == [f"bad {i}" for i in range(20)]


def test_text_fields_are_read_without_surrounding_whitespace(tmp_path):
    """A question or an image id with spaces around it (hand-edited files) gives the text and the id without
    them: the image is found under its id. Integer fields read as numbers; JSON's true is not a number."""
    from vlscale.data.real import Record

    root = copy_root(tmp_path, "vqa")
    rewrite_json(root / "vqa" / "karpathy_train.json",
                 lambda d: d[0].update(sent="  How many plates are there? \n", img_id=" COCO_train2014_000000000009 "))
    ex = by_uid(load_real_examples(make_cfg(root), "vqa", "train"))["9001"]
    assert ex.text == "How many plates are there?" and ex.image_ids == ["COCO_train2014_000000000009"]
    rec = Record("f.json", "record 0", {"n": 3, "flag": True})
    assert rec.get("n", float) == 3
    with pytest.raises(RecordError, match=r"f\.json: record 0: key 'flag' must be a number, got bool True"):
        rec.get("flag", float)
    twelve = {f"k{i}": i for i in range(12)}  # a missing key lists the record's keys: up to 12, then ' ...'
    with pytest.raises(RecordError, match=re.escape(f"key 's' is missing (the record's keys: {list(twelve)})") + "$"):
        Record("f.json", "record 0", twelve).get("s", str)
    with pytest.raises(RecordError, match=re.escape(f"(the record's keys: {list(twelve)} ...)") + "$"):
        Record("f.json", "record 0", dict(twelve, k12=12)).get("s", str)


def test_jsonl_blank_lines_are_not_records(tmp_path):
    """Blank lines (a trailing empty line, a gap between records) are skipped, not bad JSON; lines keep their
    numbers in messages."""
    root = copy_root(tmp_path, "tvqa")
    path = root / "tvqa" / "train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n\n   \n" + "\n".join(lines[1:]) + "\n\n")
    assert len(load_real_examples(make_cfg(root, tasks=["tvqa"]), "tvqa", "train")) == COUNTS["tvqa"][0]
    path.write_text(lines[0] + "\n\n{not json\n")
    with pytest.raises(RecordError, match=r"train\.jsonl: line 3: is not valid JSON"):
        load_real_examples(make_cfg(root, tasks=["tvqa"]), "tvqa", "train")


@pytest.mark.parametrize("split", ["../vqa/karpathy_train", "sub/train", ".karpathy_train", ""])
def test_a_split_that_is_not_a_file_stem_is_refused(split):
    """A split names a file stem under the dataset's folder: a path (or a hidden name) could read any file
    on the disk, e.g. another dataset's, as this split."""
    with pytest.raises(DataError, match=rf"split {split!r} is not valid; use one of \['train', 'val', 'test'\]"):
        load_real_examples(make_cfg(), "vqa", split)
    with pytest.raises(DataError, match="is not valid"):
        real_visual_source(make_cfg(), "vqa", split)


def test_missing_subtitles_are_said_once_per_root_and_task(caplog):
    from vlscale.data import real

    real._WARNED_NO_SUBTITLES.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            load_real_examples(make_cfg(tasks=["yc2c"]), "yc2c", "train")
    assert caplog.text.count("yc2c: no subtitles file") == 1


def test_video_qa_options_after_a_gap_are_refused(tmp_path):
    root = copy_root(tmp_path, "tvqa")
    path = root / "tvqa" / "train.jsonl"
    lines = path.read_text().splitlines()
    gap = json.loads(lines[0])
    del gap["a2"]
    path.write_text("\n".join([json.dumps(gap)] + lines[1:]) + "\n")
    with pytest.raises(RecordError, match=r"train\.jsonl: line 1 \(id 1\): key 'a2' is missing but a3 is present"):
        load_real_examples(make_cfg(root, tasks=["tvqa"]), "tvqa", "train")
    skipped = load_real_examples(make_cfg(root, tasks=["tvqa"], skip_bad_records=True), "tvqa", "train")
    assert len(skipped) == COUNTS["tvqa"][0] - 1 and skipped.skipped == 1


def test_bad_subtitles_and_top_level_shapes(tmp_path):
    root = copy_root(tmp_path, "tvc", "vqa")
    (root / "tvc" / "subtitles.jsonl").write_text(json.dumps({"vid_name": "v", "sub": [{"text": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match=r"subtitles\.jsonl: line 1 \(id 'v'\): key 'sub' item 0 needs"):
        load_real_examples(make_cfg(root, tasks=["tvc"]), "tvc", "train")
    assert len(load_real_examples(make_cfg(root, tasks=["tvc"], skip_bad_records=True), "tvc", "train")) == 3
    (root / "vqa" / "karpathy_val.json").write_text('{"questions": []}')
    with pytest.raises(DataError, match=r"karpathy_val\.json: expected a JSON list of records, got dict"):
        load_real_examples(make_cfg(root), "vqa", "val")
    (root / "vqa" / "karpathy_test.json").write_text("[{")
    with pytest.raises(DataError, match=r"karpathy_test\.json: not valid JSON"):
        load_real_examples(make_cfg(root), "vqa", "test")


def test_annotation_files_that_are_not_utf8_name_the_file(tmp_path):
    """A UTF-16 file (as some editors save JSON) raised a bare UnicodeDecodeError, without the file's name,
    which the launchers print with a traceback."""
    root = copy_root(tmp_path, "vqa", "tvqa")
    vqa = root / "vqa" / "karpathy_train.json"
    vqa.write_text(vqa.read_text(), encoding="utf-16")
    with pytest.raises(DataError, match=r"karpathy_train\.json: not UTF-8 text \(byte b'\\xff' at offset 0 of the "
                                        r"file\); save it as UTF-8$"):
        load_real_examples(make_cfg(root), "vqa", "train")
    path = root / "tvqa" / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + "{\"q\": \"caf\u00e9\"}\n".encode("latin-1") + b"".join(lines[1:]))
    with pytest.raises(DataError, match=r"train\.jsonl: line 2 is not UTF-8 text \(byte b'\\xe9' at offset 10 of the "
                                        r"line\)"):
        load_real_examples(make_cfg(root, tasks=["tvqa"], skip_bad_records=True), "tvqa", "train")
    path.write_bytes(b"".join(lines).replace(b"\n", b"\r\n"))  # Windows line ends still read
    assert len(load_real_examples(make_cfg(root, tasks=["tvqa"]), "tvqa", "train")) == COUNTS["tvqa"][0]
    # UTF-8 with a byte-order mark (Notepad, PowerShell's utf8BOM) reads as UTF-8: was "Unexpected UTF-8 BOM"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    assert len(load_real_examples(make_cfg(root, tasks=["tvqa"]), "tvqa", "train")) == COUNTS["tvqa"][0]
    vqa.write_bytes(b"\xef\xbb\xbf" + vqa.read_text(encoding="utf-16").encode())
    assert len(load_real_examples(make_cfg(root), "vqa", "train")) == COUNTS["vqa"][0]


def test_vlt5_folder_names_and_coco_subfolders(tmp_path):
    # VL-T5 / VL-Adapter's datasets/ layout: GQA/, nlvr/, COCO/ with images in train2014/ val2014/.
    root = tmp_path / "datasets"
    shutil.copytree(ROOT / "gqa", root / "GQA")
    shutil.copytree(ROOT / "vqa", root / "vqa")
    shutil.copytree(ROOT / "coco", root / "COCO", ignore=shutil.ignore_patterns("images"))
    for img in (ROOT / "coco" / "images").iterdir():
        sub = "train2014" if "train2014" in img.name else "val2014"
        (root / "COCO" / "images" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(img, root / "COCO" / "images" / sub / img.name)
    cfg = make_cfg(root, tasks=["vqa", "gqa", "caption"])
    assert len(load_real_examples(cfg, "gqa", "train")) == 3
    assert len(load_real_examples(cfg, "caption", "train")) == 7
    source = real_visual_source(cfg, "vqa", "train")
    for e in load_real_examples(cfg, "vqa", "train"):  # train2014 and val2014 (restval) images
        assert source[e.image_ids[0]].shape == (8, 8, 3)
    # and listed (what launchers/extract_features.py encodes): every sub-folder's ids, not the first folder's
    assert {e.image_ids[0] for e in load_real_examples(cfg, "vqa", "train")} <= set(source.ids())
    with pytest.raises(KeyError, match="COCO_val2014_000000999999"):
        source["COCO_val2014_000000999999"]
    # both spellings of a folder: one read silently was a guess; a link of one to the other is one folder
    (root / "gqa").symlink_to(root / "GQA")
    assert len(load_real_examples(cfg, "gqa", "train")) == 3
    (root / "gqa").unlink()
    shutil.copytree(ROOT / "gqa", root / "gqa")
    with pytest.raises(DataError, match=rf"the gqa data folder: both {root / 'gqa'} and {root / 'GQA'} exist as "
                                        r"two folders; keep one of them"):
        load_real_examples(cfg, "gqa", "train")


def test_video_annotation_files_under_their_value_names(tmp_path):
    """A video split's file may be ``<task>_<split>.jsonl`` (or ``_release``), and the test split's VALUE's
    ``<task>_test_public.jsonl``, as docs/datasets.md lists them."""
    cfg = make_cfg(tmp_path, tasks=["tvqa"])
    (tmp_path / "tvqa").mkdir()
    for split, name in (("val", "tvqa_val.jsonl"), ("test", "tvqa_test_public.jsonl")):
        (tmp_path / "tvqa" / name).write_text("")
        assert annotation_path(cfg, "tvqa", split) == tmp_path / "tvqa" / name


def test_two_video_annotation_files_of_one_split_are_refused(tmp_path):
    """tvqa/train.jsonl beside tvqa/tvqa_train_release.jsonl: which one trains was a silent pick. The launchers'
    check of every split says so too, not that the split is 'not found'."""
    root = tmp_path / "data"
    shutil.copytree(ROOT / "tvqa", root / "tvqa")
    cfg = make_cfg(root, tasks=["tvqa"])
    first = sorted((root / "tvqa").glob("*train*.jsonl"))
    assert len(first) == 1, first
    other = root / "tvqa" / ("tvqa_train_release.jsonl" if first[0].name == "train.jsonl" else "train.jsonl")
    other.write_text(first[0].read_text())
    with pytest.raises(DataError, match=r"tvqa train annotations: both .* and .* exist as two files; keep one of them"):
        annotation_path(cfg, "tvqa", "train")
    from vlscale.data import check_split_found

    with pytest.raises(DataError, match=r"^tvqa train annotations: both .* and .* exist as two files; keep one of"):
        check_split_found(cfg, ["tvqa"], "train")  # train.py's and evaluate.py's check: it was 'not found ... both'
    other.unlink()
    other.symlink_to(first[0])
    assert annotation_path(cfg, "tvqa", "train") in (first[0], other)


def test_nlvr2_training_images_in_the_releases_numbered_folders(tmp_path):
    """The NLVR2 release keeps training images in train/0 ... train/99 (the record's "directory"), the
    others in dev/ and test1/: every split's images are found there (train/ alone missed them all)."""
    from vlscale.data import check_visual_ids

    root = tmp_path / "data"
    shutil.copytree(ROOT / "nlvr2", root / "nlvr2", ignore=shutil.ignore_patterns("images"))
    for img in (ROOT / "nlvr2" / "images").iterdir():
        split, number = img.name.split("-")[:2]
        folder = root / "nlvr2" / "images" / split / (str(int(number) % 2) if split == "train" else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, folder / img.name)
    assert sorted(p.name for p in (root / "nlvr2" / "images" / "train").iterdir()) == ["0", "1"]
    cfg = make_cfg(root, tasks=["nlvr2"])
    for split in ("train", "val", "test"):
        examples = load_real_examples(cfg, "nlvr2", split)
        source = real_visual_source(cfg, "nlvr2", split)
        assert check_visual_ids(cfg, "nlvr2", split, examples, source) == examples
        for e in examples:
            assert all(source[i].shape[-1] == 3 for i in e.image_ids)


# ----------------------------------------------------------------------------- visual ids, up front

def test_missing_images_fail_at_start_naming_task_split_ids_and_folder_or_are_skipped(tmp_path, caplog):
    from vlscale.data import build_train_loader, check_visual_ids, eval_batches
    from vlscale.data.visual import SyntheticImages

    root = copy_root(tmp_path, "vqa", "coco")
    (root / "coco" / "images" / "COCO_train2014_000000000025.jpg").unlink()
    cfg = make_cfg(root)
    with pytest.raises(DataError, match=r"vqa/train: 1 visual id\(s\) named by 1 of 3 examples .*karpathy_train\.json.*"
                                        r"ImageFolder\('.*coco/images'.*first \['COCO_train2014_000000000025'\]"):
        build_train_loader(cfg, tokenizer=None)  # at construction, before any batch
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(make_cfg(root, skip_bad_records=True), tokenizer=None)
    assert [e.uid for e in loader.examples["vqa"]] == ["9001", "42001"]
    assert loader.examples["vqa"].skipped == 1 and "dropped those 1 examples" in caplog.text
    # eval: the same check when the batches are made
    val = load_real_examples(cfg, "vqa", "val")
    (root / "coco" / "images" / f"{val[0].image_ids[0]}.jpg").unlink()
    memo = {}  # (a training run's, eval_examples'): a split that fails its check is not kept to be served later
    with pytest.raises(DataError, match=r"vqa/val: 1 visual id"):
        eval_batches(cfg, None, "vqa", "val", 2, memo=memo)
    assert memo == {}
    for _ in range(2):  # what the memo serves is the checked list: the example without its image dropped
        made = eval_batches(make_cfg(root, skip_bad_records=True), None, "vqa", "train", 2, memo=memo)
        assert [e.uid for e in made.examples] == ["9001", "42001"]
    with pytest.raises(DataError, match=r"task 'vqa' has no examples to evaluate in split 'val'.*all 1 dropped"):
        eval_batches(make_cfg(root, skip_bad_records=True), None, "vqa", "val", 2, max_examples=1)
    # every kind of source answers in bulk: NLVR2's two images, video feature folders
    nl = load_real_examples(make_cfg(tasks=["nlvr2"]), "nlvr2", "train")
    bad = [type(e)(e.task, e.uid, e.text, e.target, [e.image_ids[0], "nope"]) for e in nl[:1]] + list(nl[1:])
    src = real_visual_source(make_cfg(tasks=["nlvr2"]), "nlvr2", "train")
    assert check_visual_ids(make_cfg(tasks=["nlvr2"]), "nlvr2", "train", list(nl), src) == list(nl)
    with pytest.raises(DataError, match=r"nlvr2/train: 1 visual id\(s\) named by 1 of 4 examples.*\['nope'\]"):
        check_visual_ids(make_cfg(tasks=["nlvr2"]), "nlvr2", "train", bad, src)
    tv = make_cfg(tasks=["tvqa"])
    tv.model.vision = "ViT-B-32"
    ex = load_real_examples(tv, "tvqa", "train")
    vids = real_visual_source(tv, "tvqa", "train")
    moved = [type(e)(e.task, e.uid, e.text, e.target, ["no_such_video"]) for e in ex[:2]] + list(ex[2:])
    with pytest.raises(DataError, match=r"tvqa/train: 1 visual id\(s\) named by 2 of 3 .*VideoFeatureFolder.*; "
                                        r"add their files, or set"):
        check_visual_ids(tv, "tvqa", "train", moved, vids)
    # a vid_name written with its file's suffix ('clip.mp4', or 'x.npy') is named so, whatever the source
    vid = ex[0].image_ids[0]
    mp4 = [type(e)(e.task, e.uid, e.text, e.target, [e.image_ids[0] + ".mp4"]) for e in ex]
    with pytest.raises(DataError, match=rf"first \['{vid}\.mp4', .*\]; 2 of them end in a file suffix and are there "
                                        rf"without it \('{vid}\.mp4' as '{vid}'\): ids are file names without the "
                                        r"suffix, drop it in the annotations, or set data\.skip_bad_records=true"):
        check_visual_ids(tv, "tvqa", "train", mp4, vids)
    # a trailing dot ('x.') and a dot in a folder's name ('a.v/c') are no file suffix, though 'x' and 'a' are there
    with pytest.raises(DataError, match=r"; 1 of them end in a file suffix and are there without it \('c\.jpg' as "
                                        r"'c'\): ids are file names without the suffix, drop it in the annotations; "
                                        r"for the other 3: add their files, or set data\.skip_bad_records=true"):
        check_visual_ids(make_cfg(), "vqa", "train", [SimpleNamespace(image_ids=[i], source=None) for i in
                                                      ("c.jpg", "d.jpg", "x.", "a.v/c")],
                         SyntheticImages(dict.fromkeys("abcx")))
    many = [SimpleNamespace(image_ids=[f"{k}.jpg"], source=None) for k in range(101)]  # counted over all, not 100
    with pytest.raises(DataError, match=r"101 visual id\(s\) .*; 101 of them end in a file suffix.* annotations, or "):
        check_visual_ids(make_cfg(), "vqa", "train", many, SyntheticImages(dict.fromkeys(map(str, range(101)))))


def test_images_there_under_another_suffix_are_named_with_what_to_do_not_called_missing(tmp_path):
    """A user's PNGs where the layout reads <id>.jpg (COCO-format annotations naming 'x.png'): the start-up check
    names the files it found and the two ways on (convert, or a cache of the folder, whose ids are file names
    without the suffix); it said 'add their files' of files that are there. An image not there at all keeps that."""
    from vlscale.data import build_train_loader, check_visual_ids
    from vlscale.data.visual import ImageFolder, other_suffix_files

    root = copy_root(tmp_path, "vqa", "coco")
    images = root / "coco" / "images"
    (images / "COCO_train2014_000000000025.jpg").rename(images / "COCO_train2014_000000000025.png")
    png = re.escape(str(images / "COCO_train2014_000000000025.png"))
    with pytest.raises(DataError, match=rf"first \['COCO_train2014_000000000025'\]; 1 of them are there under another "
                                        rf"suffix \({png}\), which the layout does not read \(docs/datasets\.md\): "
                                        r"convert them, or extract a feature cache of their folder \(launchers/extract_"
                                        r"features\.py --images DIR --out CACHE: .*model\.feature_source=cache"):
        build_train_loader(make_cfg(root), tokenizer=None)
    (images / "train2014").mkdir()  # COCO's own folder beside images/: each folder of the layout's is looked in
    png = images / "train2014" / "COCO_train2014_000000000025.png"
    (images / "COCO_train2014_000000000025.png").rename(png)
    with pytest.raises(DataError, match=rf"1 of them are there under another suffix \({re.escape(str(png))}\), "):
        build_train_loader(make_cfg(root), tokenizer=None)
    png.unlink()
    with pytest.raises(DataError, match=r"first \['COCO_train2014_000000000025'\]; add their files, or set "):
        build_train_loader(make_cfg(root), tokenizer=None)
    (tmp_path / "frames" / "clip.png").mkdir(parents=True)  # a video's frame folder named so: no image file
    assert other_suffix_files(ImageFolder(tmp_path / "frames", pattern="{id}", video=True), ["clip.jpg"]) == []
    pngs = tmp_path / "pngs"  # four: the first three named
    pngs.mkdir()
    for i in "abcd":
        (pngs / f"{i}.png").write_bytes(b"")
    listed = re.escape(", ".join(str(pngs / f"{i}.png") for i in "abc"))
    with pytest.raises(DataError, match=rf"; 4 of them are there under another suffix \({listed}\), which "):
        check_visual_ids(RunConfig(), "vqa", "train", [SimpleNamespace(image_ids=[i], source=None) for i in "abcd"],
                         ImageFolder(pngs))
    (pngs / "e.jpg").write_bytes(b"")  # 'e.jpg' named with its suffix beside 'a' there as a.png: each said
    with pytest.raises(DataError, match=r"; 1 of them end in a file suffix and are there without it \('e\.jpg' as "
                                        r"'e'\): .* drop it in the annotations; for the other 1: 1 of them are there "
                                        rf"under another suffix \({re.escape(str(pngs / 'a.png'))}\), which "):
        check_visual_ids(RunConfig(), "vqa", "train", [SimpleNamespace(image_ids=[i], source=None)
                                                       for i in ("e.jpg", "a")], ImageFolder(pngs))


def test_image_folder_bulk_check_suffix_case_and_unreadable_images(tmp_path):
    from PIL import Image

    from vlscale.data.collate import fetch_visuals
    from vlscale.data.real import FirstOf
    from vlscale.data.visual import ImageFolder, load_image, missing_ids

    img = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(img).save(tmp_path / "upper.JPG", format="JPEG")
    Image.fromarray(img).save(tmp_path / "good.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image")
    raw = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "sub").mkdir()
    folder = ImageFolder(tmp_path)
    # x.JPG is id x for extract_features.py; the {id}.jpg lookup finds it too
    assert "upper" in folder and folder["upper"].shape == (8, 8, 3) and "upper" in folder.ids()
    assert missing_ids(folder, ["good", "upper", "nope", "good", "sub"]) == ["nope", "sub"]
    assert missing_ids(FirstOf([ImageFolder(tmp_path / "sub"), folder]), ["good", "nope"]) == ["nope"]
    for name in ("garbage", "cut"):
        with pytest.raises(DataError, match=rf"image '{name}': cannot read image .*{name}\.jpg"):
            folder[name]
    (tmp_path / "empty.jpg").write_bytes(b"")  # said so: PIL's "cannot identify image file" left one guessing
    empty = r"image 'empty': cannot read image .*empty\.jpg \(the file is empty: 0 bytes\)$"
    with pytest.raises(DataError, match=empty):
        folder["empty"]
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "loop.jpg").symlink_to(tmp_path / "links" / "loop.jpg")  # opening it and its size both fail
    with pytest.raises(DataError, match=r"cannot read image .*loop\.jpg \(OSError: .*Too many levels of symbolic"):
        load_image(tmp_path / "links" / "loop.jpg")
    examples = load_real_examples(make_cfg(), "gqa", "train")[:1]
    e = type(examples[0])("gqa", "q1", "text", "yes", ["garbage"], source="ann.json")
    with pytest.raises(DataError, match=r"gqa example 'q1' \(from ann\.json\): image 'garbage': cannot read image"):
        fetch_visuals(folder, [e])
    with pytest.raises(DataFileNotFound, match=r"gqa example 'q1'.*image 'gone': file .*gone\.jpg does not exist"):
        fetch_visuals(folder, [type(e)("gqa", "q1", "text", "yes", ["gone"], source="ann.json")])


def test_first_of_holds_an_id_any_source_holds_and_reads_it_from_the_first(tmp_path):
    """COCO's images/ and its train2014/ val2014/ sub-folders as one source: an id is in it when any folder
    holds it, an id in two folders is read from the first (images/ itself), and sources of different kinds
    (images beside features) are refused naming the kinds."""
    from PIL import Image

    from vlscale.data.real import FirstOf
    from vlscale.data.visual import ImageFolder

    (tmp_path / "sub").mkdir()
    for folder, value in ((tmp_path, 10), (tmp_path / "sub", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / "both.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sub" / "only_sub.png")
    both = FirstOf([ImageFolder(tmp_path, pattern="{id}.png"), ImageFolder(tmp_path / "sub", pattern="{id}.png")])
    assert "only_sub" in both and "both" in both and "nope" not in both
    assert int(both["both"].max()) == 10
    features = type("Features", (), {"kind": "features"})()
    with pytest.raises(ValueError, match=r"FirstOf: sources of different kinds \['features', 'images'\]"):
        FirstOf([ImageFolder(tmp_path), features])


def test_a_video_of_no_frames_is_refused_naming_its_file_and_other_files_are_no_videos(tmp_path):
    """A (0, D) features file is no video (the collator would get a clip without frames): refused when read and
    at the start-up check, naming the file and video. A file of another suffix in the folder is no video id."""
    from vlscale.data.video import VideoFeatureFolder

    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    (tmp_path / "README.txt").write_text("CLIP ViT-B/32 frame features")
    folder = VideoFeatureFolder(tmp_path)
    assert folder.ids() == ["empty"]
    for check in (lambda: folder["empty"], lambda: folder.missing(["empty"])):
        with pytest.raises(DataError, match=r"empty\.npy \(video 'empty'\): frame features must be a non-empty "
                                            r"L x D matrix, got shape \(0, 8\)"):
            check()


def test_videos_without_subtitles_are_reported_once_per_pair_of_files(caplog):
    """The count of examples whose video the subtitles file lacks is logged once per annotation and subtitles
    file (every epoch's reload said it again); another annotation file is reported on its own."""
    from vlscale.data.tasks import Example
    from vlscale.data.video import Subtitles, report_uncovered

    subs = Subtitles({"v1": [(0.0, 1.0, "Hi.")]}, source="subs_once.jsonl")
    ex = [Example(task="tvqa", uid=str(k), text="", target="a0", image_ids=[v]) for k, v in enumerate(["v1", "v2"])]
    with caplog.at_level(logging.WARNING, logger="vlscale.data.video"):
        for path in ("train_once.jsonl", "train_once.jsonl", "val_once.jsonl"):
            report_uncovered("tvqa", path, ex, subs)
    said = [r.getMessage() for r in caplog.records if "has no subtitles for" in r.getMessage()]
    assert [m.split(" examples of ")[1].split(" ")[0] for m in said] == ["train_once.jsonl", "val_once.jsonl"]
    assert said[0].startswith("tvqa: 1 of 2 examples of train_once.jsonl name a video that subs_once.jsonl")


def test_the_subtitles_report_counts_and_names_the_videos_the_file_lacks_and_a_covered_file_says_nothing(caplog):
    """report_uncovered counts the examples whose video is not in the subtitles file and names those videos (once
    each, in order); annotations whose every video has subtitles are not reported."""
    from vlscale.data.tasks import Example
    from vlscale.data.video import Subtitles, report_uncovered

    subs = Subtitles({"v1": [(0.0, 1.0, "Hi.")]}, source="subs_lack.jsonl")
    ex = [Example(task="tvqa", uid=str(k), text="", target="a0", image_ids=[v])
          for k, v in enumerate(["v1", "v2", "v3", "v2"])]
    with caplog.at_level(logging.WARNING, logger="vlscale.data.video"):
        report_uncovered("tvqa", "train_lack.jsonl", ex, subs)
        report_uncovered("tvqa", "val_lack.jsonl", ex[:1], subs)
    said = [r.getMessage() for r in caplog.records if "has no subtitles for" in r.getMessage()]
    assert said == ["tvqa: 3 of 4 examples of train_lack.jsonl name a video that subs_lack.jsonl has no subtitles for "
                    "(2 video(s), first ['v2', 'v3']); their inputs carry no subtitle text (check that both files "
                    "name videos alike)"]


def test_video_feature_files_bad_content_names_the_file_and_video(tmp_path):
    from safetensors.torch import save_file

    from vlscale.data.video import VideoFeatureFolder

    good = np.ones((3, 8), np.float32)
    np.save(tmp_path / "ok.npy", good)
    np.save(tmp_path / "ints.npy", np.ones((3, 8), np.int16))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flags.npy", np.ones((3, 8), bool))
    np.save(tmp_path / "cplx.npy", np.ones((3, 8), np.complex64))
    np.save(tmp_path / "both.npy", good)
    save_file({"features": torch.ones(3, 8)}, str(tmp_path / "both.safetensors"))
    save_file({"features": torch.ones(3, 8, dtype=torch.bool)}, str(tmp_path / "st_bool.safetensors"))
    (tmp_path / "st_bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    folder = VideoFeatureFolder(tmp_path)
    assert torch.equal(folder["ints"], torch.ones(3, 8))
    for vid, match in [("corrupt", "cannot read frame features"), ("pickled", "cannot read frame features"),
                       ("flags", "dtype bool, expected real numbers"), ("cplx", "dtype complex64"),
                       ("st_bool", "dtype torch.bool"), ("st_bad", "cannot read frame features")]:
        with pytest.raises(DataError, match=rf"{vid}\.(npy|safetensors) \(video '{vid}'\): .*{match}"):
            folder[vid]
    with pytest.raises(DataError, match=r"video 'both': both .*both\.npy and .*both\.safetensors exist"):
        folder["both"]
    with pytest.raises(DataError, match=r"video 'both': both"):  # the up-front check finds it too
        folder.missing(["ok", "both"])
    with pytest.raises(DataError, match=r"ok\.npy \(video 'ok'\): frame features are 8-d, but the run's model\.vision "
                                        r"embeds frames in 512-d; extract the features with that CLIP model, or set "
                                        r"model\.vision to the one that made them$"):  # (3, 8): no D x L
        VideoFeatureFolder(tmp_path, expect_dim=512)["ok"]
    # through the config: the width model.vision's CLIP embeds frames in (tiny-clip-rn: 64)
    with pytest.raises(DataError, match=r"friends_s01e01_seg01_clip_00\.npy .*512-d, but .* 64-d"):
        real_visual_source(make_cfg(tasks=["tvqa"]), "tvqa", "train")["friends_s01e01_seg01_clip_00"]


def test_video_feature_folder_reads_value_npz_files(tmp_path):
    """The VALUE release's CLIP-ViT frame features (VL-Adapter's ``vis_features/<...>/clip-vit/<vid_name>.npz``,
    array ``features``) were not read: every video of such a ``features/`` folder was reported missing ("add
    their files") although its file was there."""
    from vlscale.data.video import VideoFeatureFolder

    feats = np.arange(24, dtype=np.float16).reshape(4, 6)
    np.savez_compressed(tmp_path / "clip_a.npz", features=feats)
    np.savez(tmp_path / "clip_b.npz", other=np.ones((2, 6), np.float32))  # its only array
    np.savez(tmp_path / "two.npz", a=np.ones((2, 6)), b=np.ones((2, 6)))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    np.save(tmp_path / "dup.npy", feats)
    np.savez(tmp_path / "dup.npz", features=feats)
    folder = VideoFeatureFolder(tmp_path, max_frames=2, expect_dim=6)
    assert folder.missing(["clip_a", "clip_b", "gone"]) == ["gone"] and "clip_a" in folder
    assert torch.equal(folder["clip_a"], torch.from_numpy(feats).float()[[1, 3]])
    assert folder["clip_b"].shape == (2, 6) and {"clip_a", "clip_b"} <= set(folder.ids())
    with pytest.raises(DataError, match=r"two\.npz: holds arrays \['a', 'b'\]; expected one named 'features'"):
        folder["two"]
    with pytest.raises(DataError, match=r"broken\.npz \(video 'broken'\): cannot read frame features"):
        folder["broken"]
    with pytest.raises(DataError, match=r"broken\.npz \(video 'broken'\): cannot read frame features"):
        folder.missing(["broken", "clip_a"])  # the start-up check reads the first video's header: named too
    with pytest.raises(DataError, match=r"video 'dup': both .*dup\.npy and .*dup\.npz exist"):
        folder["dup"]
    with pytest.raises(DataError, match=r"clip_a\.npz \(video 'clip_a'\): frame features are 6-d, but .* 512-d"):
        VideoFeatureFolder(tmp_path, expect_dim=512).missing(["clip_a"])
    # the start-up check reads the header of the first video found (in the order asked), and names it
    with pytest.raises(DataError, match=r"clip_b\.npz \(video 'clip_b'\): frame features are 6-d"):
        VideoFeatureFolder(tmp_path, expect_dim=512).missing(["gone", "clip_b", "clip_a"])


def test_video_inputs_without_subtitles_end_at_the_options_and_text_fields_are_stripped(tmp_path):
    """A question whose video has no subtitle lines reads "<q> a0: .. a1: .." with no empty "subtitle:" part (the
    synthetic world's format); subtitle lines are read without surrounding blanks; an answer_idx " 1 " names
    option 1; a description of blanks alone is refused naming its item (it trained on an empty target)."""
    from vlscale.data.video import Subtitles, load_subtitles, load_video_captions, load_video_qa

    path = _jsonl(tmp_path / "a.jsonl", [{"qid": 1, "q": "Q?", "a0": "x", "a1": "y", "vid_name": "v",
                                          "answer_idx": " 1 "}])
    (e,) = load_video_qa("tvqa", path, Subtitles())
    assert (e.text, e.target, e.extra["subtitle"]) == ("Q? a0: x a1: y", "a1", "")
    subs = load_subtitles(_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [
        {"text": "  Hi.\n", "start": 0, "end": 1}, {"text": " Bye. ", "start": 2, "end": 3}]}]))
    assert subs["v"] == [(0.0, 1.0, "Hi."), (2.0, 3.0, "Bye.")]
    (e,) = load_video_qa("tvqa", path, subs)
    assert e.text == "Q? a0: x a1: y subtitle: Hi. Bye."
    blank = _jsonl(tmp_path / "c.jsonl", [{"clip_id": 3, "vid_name": "v", "descs": [{"desc": "a"}, {"desc": "  "}]}])
    with pytest.raises(RecordError, match=r"c\.jsonl: line 1 .*key 'descs' item 1 needs a non-empty string 'desc'"):
        load_video_captions("tvc", blank, "train", Subtitles())


def test_caption_targets_and_references_are_the_descriptions_without_surrounding_blanks(tmp_path):
    """A TVC / YC2C description " Ross hugs Rachel.\\n" is the target and reference "Ross hugs Rachel." in every
    split (a target with blanks trained the model to write them, and a reference with them never matched)."""
    from vlscale.data.video import Subtitles, load_video_captions

    descs = [{"desc": " Ross hugs Rachel.\n"}, "  They smile. "]
    path = _jsonl(tmp_path / "c.jsonl", [{"clip_id": 3, "vid_name": "v", "descs": descs}])
    clean = ["Ross hugs Rachel.", "They smile."]
    train = load_video_captions("tvc", path, "train", Subtitles())
    assert [(e.uid, e.target, e.references) for e in train] == [("3#0", clean[0], clean), ("3#1", clean[1], clean)]
    (val,) = load_video_captions("tvc", path, "val", Subtitles())
    assert (val.uid, val.target, val.references) == ("3", clean[0], clean)


def test_frame_features_must_be_a_matrix_safetensors_give_their_features_tensor_and_a_missing_folder_is_named(
        tmp_path):
    """A 3-d (L, 1, D) or 1-d features array is refused naming the file, video and shape (it was read as a video);
    a .safetensors file of several tensors gives the one named 'features', not the first, and one of several
    others is refused naming them, at its batch and at the start-up check, as is a complex dtype; a features folder
    that is not there is named."""
    import re

    from safetensors.torch import save_file

    from vlscale.data.video import VideoFeatureFolder

    np.save(tmp_path / "cube.npy", np.ones((3, 1, 8), np.float32))
    np.save(tmp_path / "flat.npy", np.ones(8, np.float32))
    feats = torch.arange(24.0).reshape(4, 6)
    save_file({"a_mask": torch.ones(4, 1), "features": feats}, str(tmp_path / "multi.safetensors"))
    save_file({"a": torch.ones(2, 6), "b": torch.ones(2, 6)}, str(tmp_path / "two.safetensors"))
    folder = VideoFeatureFolder(tmp_path)
    for vid, shape in (("cube", r"\(3, 1, 8\)"), ("flat", r"\(8,\)")):
        with pytest.raises(DataError, match=rf"{vid}\.npy \(video '{vid}'\): frame features must be a non-empty "
                                            rf"L x D matrix, got shape {shape}"):
            folder[vid]
    assert torch.equal(folder["multi"], feats)
    assert VideoFeatureFolder(tmp_path, expect_dim=6).missing(["multi"]) == []  # the start-up header check too
    with pytest.raises(DataError, match=r"two\.safetensors: holds tensors \['a', 'b'\]; expected one named 'features'"):
        folder["two"]
    with pytest.raises(DataError, match=r"two\.safetensors: holds tensors \['a', 'b'\]"):
        folder.missing(["two"])
    # features saved D x L (transposed) are said to be so, not blamed on another CLIP model
    np.save(tmp_path / "turned.npy", np.ones((6, 3), np.float32))
    with pytest.raises(DataError, match=r"turned\.npy \(video 'turned'\): frame features are 3-d, but the run's "
                                        r"model\.vision embeds frames in 6-d; their shape \(6, 3\) is D x L: save "
                                        r"them transposed \(L x D, one row per frame\)$"):
        VideoFeatureFolder(tmp_path, expect_dim=6)["turned"]
    # the start-up check reads the first video's file whole: a dtype every file shares stops the run there too
    np.save(tmp_path / "wave.npy", np.ones((3, 6), np.complex64))
    with pytest.raises(DataError, match=r"wave\.npy \(video 'wave'\): frame features have dtype complex64"):
        folder.missing(["wave"])
    with pytest.raises(DataError, match=rf"^video features folder {re.escape(str(tmp_path / 'nope'))} does not exist"):
        VideoFeatureFolder(tmp_path / "nope")


def test_frame_features_of_another_width_stop_the_train_loader_at_start_up():
    """The start-up check asks a VideoFeatureFolder in bulk (``missing``), which also reads the first video's header:
    features of another CLIP than model.vision (the fixtures' are 512-d; tiny-clip-rn embeds frames in 64-d) stop
    the run when the loader is built, naming the file and both widths, not at the video's first batch."""
    from vlscale.data import build_train_loader, check_visual_ids

    cfg = make_cfg(tasks=["tvqa"])
    ex = load_real_examples(cfg, "tvqa", "train")
    with pytest.raises(DataError, match=r"\.(npy|npz|safetensors) \(video '.+'\): frame features are 512-d, but "
                                        r"the run's model\.vision embeds frames in 64-d"):
        check_visual_ids(cfg, "tvqa", "train", ex, real_visual_source(cfg, "tvqa", "train"))
    with pytest.raises(DataError, match=r"frame features are 512-d, but .* 64-d"):
        build_train_loader(cfg, tokenizer=None)


def test_subtitles_skip_mode_counts_bad_records_and_no_subtitles_file_is_no_report(tmp_path, caplog):
    """With data.skip_bad_records=true a malformed subtitles record is skipped and counted in one warning naming
    the file (not dropped silently); examples read without any subtitles file are not reported as lacking
    subtitles (there is no file to name)."""
    from vlscale.data.tasks import Example
    from vlscale.data.video import Subtitles, load_subtitles, report_uncovered

    path = _jsonl(tmp_path / "subs_skip.jsonl", [{"vid_name": "v", "sub": [{"text": "Hi.", "start": 0, "end": 1}]},
                                                 {"vid_name": "w", "sub": [{"text": 5}]}])
    with caplog.at_level(logging.WARNING):
        subs = load_subtitles(path, skip_bad_records=True)
    assert list(subs) == ["v"]
    assert re.search(r"subs_skip\.jsonl: skipped 1 malformed record\(s\) \(data\.skip_bad_records=true\); first: "
                     r".*line 2 \(id 'w'\): key 'sub' item 0 needs", caplog.text)
    caplog.clear()
    ex = [Example(task="tvqa", uid="1", text="", target="a0", image_ids=["v"])]
    with caplog.at_level(logging.WARNING, logger="vlscale.data.video"):
        report_uncovered("tvqa", "no_subs_file.jsonl", ex, Subtitles())
    assert "has no subtitles for" not in caplog.text


def test_complex_frame_features_in_a_safetensors_file_are_refused_naming_them(tmp_path):
    """Complex frame features in a .safetensors file are refused as in a .npy (``float()`` dropped the imaginary
    part, with a warning at most)."""
    from safetensors.torch import save_file

    from vlscale.data.video import VideoFeatureFolder

    save_file({"features": torch.ones(3, 8, dtype=torch.complex64)}, str(tmp_path / "st_cplx.safetensors"))
    with pytest.raises(DataError, match=r"st_cplx\.safetensors \(video 'st_cplx'\): frame features have dtype "
                                        r"torch\.complex64, expected real numbers"):
        VideoFeatureFolder(tmp_path)["st_cplx"]


def test_an_npz_name_on_a_plain_npy_file_is_a_data_error_naming_it(tmp_path):
    """A ``.npz`` file that holds a plain .npy array (np.load gives an ndarray, no archive) is refused naming the file
    and video, when read and at the start-up check; it was a TypeError traceback ("'numpy.ndarray' object does not
    support the context manager protocol") that named neither."""
    from vlscale.data.video import VideoFeatureFolder

    np.save(tmp_path / "plain.npy", np.ones((3, 8), np.float32))
    (tmp_path / "plain.npy").rename(tmp_path / "fake.npz")
    folder = VideoFeatureFolder(tmp_path)
    for check in (lambda: folder["fake"], lambda: folder.missing(["fake"])):
        with pytest.raises(DataError, match=r"fake\.npz \(video 'fake'\): cannot read frame features \(ValueError: "
                                            r"not a \.npz archive\)"):
            check()


def test_features_holding_nan_are_named_when_fetched(tmp_path):
    from vlscale.data.collate import fetch_visuals
    from vlscale.data.tasks import Example
    from vlscale.data.video import VideoFeatureFolder

    bad = np.ones((3, 8), np.float32)
    bad[1, 2], bad[2, 0] = np.nan, np.inf  # the first row holding one is named
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "ok.npy", np.ones((3, 8), np.float32))
    folder = VideoFeatureFolder(tmp_path)
    ex = [Example(task="tvqa", uid=f"q{v}", text="", target="0", image_ids=[v]) for v in ("ok", "nan")]
    assert len(fetch_visuals(folder, ex[:1])) == 1
    with pytest.raises(DataError, match=r"tvqa example 'qnan': the features of 'nan' in .* hold NaN or inf \(first "
                                        r"in row 1 of 3\); write them again \(launchers/extract_features\.py "):
        fetch_visuals(folder, ex)


def test_empty_training_file_is_named(tmp_path):
    from vlscale.data import build_train_loader

    root = copy_root(tmp_path, "gqa")
    (root / "gqa" / "train.json").write_text("[]")
    with pytest.raises(DataError, match=r"task 'gqa' has no training examples in split 'train' \(data\.source=real, "
                                        r"read from .*gqa/train\.json\): the file holds none"):
        build_train_loader(make_cfg(root, tasks=["gqa"]), tokenizer=None)
    # every record malformed and skipped: the error says so (not "the file holds none")
    (root / "gqa" / "train.json").write_text(json.dumps([{"bogus": 1}, {"bogus": 2}]))
    with pytest.raises(DataError, match=r"task 'gqa' has no training examples in split 'train' \(data\.source=real, "
                                        r"read from .*gqa/train\.json\): 2 malformed record\(s\) skipped, none left"):
        build_train_loader(make_cfg(root, tasks=["gqa"], skip_bad_records=True), tokenizer=None)


# ----------------------------------------------------------------------------- HF datasets: bad input

def _hf_dict(path, columns: dict, features=None, splits=("train", "validation")):
    import datasets

    datasets.DatasetDict({s: datasets.Dataset.from_dict(columns, features=features) for s in splits}).save_to_disk(
        str(path))
    return str(path)


def test_hf_unreadable_images_name_dataset_split_row_and_column(tmp_path):
    import datasets

    from vlscale.data.collate import fetch_visuals
    from vlscale.data.hf_dataset import load_hf_examples

    cols = {"image": "image", "question": "q", "answer": "a"}
    rows = {"q": ["a?", "b?"], "a": ["x", "y"]}
    raw = datasets.Features({"image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                             "q": datasets.Value("string"), "a": datasets.Value("string")})
    garbage = _hf_dict(tmp_path / "garbage", dict(rows, image=[{"bytes": b"garbage", "path": None}] * 2), raw)
    ex, src = load_hf_examples("gqa", garbage, "train", cols)
    with pytest.raises(DataError, match=r"garbage\[train\]: row 0, column 'image' \(image id 'train/0'\): cannot read "
                                        r"an image from 7 bytes \(UnidentifiedImageError"):
        src["train/0"]
    with pytest.raises(DataError, match=r"gqa example 'train-1' .*garbage\[train\]: row 1"):
        fetch_visuals(src, ex[1:])
    as_image = _hf_dict(tmp_path / "as_image", dict(rows, image=[{"bytes": b"garbage", "path": None}] * 2),
                        datasets.Features(dict(raw, image=datasets.Image())))
    with pytest.raises(DataError, match=r"as_image\[validation\]: row 1, column 'image'"):
        load_hf_examples("gqa", as_image, "val", cols)[1]["val/1"]
    paths = _hf_dict(tmp_path / "paths", dict(rows, image=["/nonexistent/a.png"] * 2))
    # a path to no file is found when the split is read (test_hf_image_files_that_are_not_there_...)
    with pytest.raises(RecordError, match=r"paths\[train\]: row 0: key 'image' holds '/nonexistent/a\.png', which "
                                          r"is neither image data nor an existing image file"):
        load_hf_examples("gqa", paths, "train", cols)
    with pytest.raises(RecordError, match=r"paths\[train\]: row 0: key 'q' holds 'a\?', which is neither"):
        load_hf_examples("gqa", paths, "train", dict(cols, image="q"))
    real = str(sorted((FIXTURES / "real_data" / "gqa" / "images").glob("*.jpg"))[0])
    moved = _hf_dict(tmp_path / "moved", dict(rows, image=[real, real + ".gone"]))
    ex, src = load_hf_examples("gqa", moved, "train", cols, skip_bad_records=True)
    assert ex.skipped == 1 and src["train/0"].ndim == 3
    src.locations["train/1"] = (1, "image")  # a file gone after the split was read: named when it is decoded
    with pytest.raises(DataFileNotFound, match=r"moved\[train\]: row 1, column 'image' .*\.gone', which "
                                               r"is neither image data nor an existing image file"):
        src["train/1"]


def test_hf_rows_sharing_an_image_id_but_not_the_image_are_refused(tmp_path):
    """data.hf_columns.image_id says rows share an image: a row whose id names another row's image but whose
    image column holds another image was silently given the first row's image (and its cached features)."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    jpgs = sorted((FIXTURES / "real_data" / "gqa" / "images").glob("*.jpg"))
    data = [p.read_bytes() for p in jpgs[:2]]
    assert len(data[0]) != len(data[1])
    cols = {"image": "image", "image_id": "name", "question": "q", "answer": "a"}
    rows = {"q": ["a?", "b?", "c?"], "a": ["x", "y", "z"], "name": ["img0", "img1", "img0"]}
    for kind, cells in (("bytes", [{"bytes": d, "path": None} for d in (data[0], data[1], data[1])]),
                        ("paths", [str(jpgs[0]), str(jpgs[1]), str(jpgs[1])])):
        path = _hf_dict(tmp_path / kind, dict(rows, image=cells), datasets.Features(
            {"image": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string"),
             "name": datasets.Value("string")}))
        with pytest.raises(RecordError, match=rf"{kind}\[train\]: row 2: key 'name' is 'img0', the id of row 0's "
                                              r"image, but column 'image' holds another image here"):
            load_hf_examples("gqa", path, "train", cols)
        ex, src = load_hf_examples("gqa", path, "train", cols, skip_bad_records=True)
        assert [e.uid for e in ex] == ["train-0", "train-1"] and ex.skipped == 1
    # two images of one byte length (uncompressed, one pixel apart) are told apart too: the length alone was not
    from PIL import Image

    flat = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)]
    flat[1][0, 0, 0] = 1
    bmps = []
    for a in flat:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="BMP")
        bmps.append(buffer.getvalue())
    assert len(bmps[0]) == len(bmps[1])
    path = _hf_dict(tmp_path / "one_size", dict(rows, image=[{"bytes": b, "path": None} for b in (bmps[0], bmps[1],
                                                                                                   bmps[1])]),
                    datasets.Features({"image": datasets.Image(), "q": datasets.Value("string"),
                                       "a": datasets.Value("string"), "name": datasets.Value("string")}))
    with pytest.raises(RecordError, match=r"row 2: key 'name' is 'img0'.* holds another image here "
                                          r"\(\d+ bytes, blake2b"):
        load_hf_examples("gqa", path, "train", cols)
    same = _hf_dict(tmp_path / "same", dict(rows, image=[str(jpgs[0]), str(jpgs[1]), str(jpgs[0])]))
    ex, src = load_hf_examples("gqa", same, "train", cols)  # the same image under its id: one image
    assert [e.image_ids for e in ex] == [["img0"], ["img1"], ["img0"]] and len(src) == 2



def test_hf_dataset_paths_and_image_columns_that_cannot_be_read_are_named(tmp_path):
    """data.hf_dataset naming a file, or a folder holding one Dataset without splits, is refused saying so (not
    the datasets library's error about something else); nlvr2 mapped to one image column is refused too."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples

    cols = {"image": "image", "question": "q", "answer": "a"}
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"^data\.hf_dataset='.*data\.parquet' is a file; give a dataset folder"):
        load_hf_examples("gqa", str(tmp_path / "data.parquet"), "train", cols)
    datasets.Dataset.from_dict({"image": ["a.png"], "q": ["q?"], "a": ["x"]}).save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(DataError, match=r"flat' holds one Dataset without splits; save a DatasetDict"):
        load_hf_examples("gqa", str(tmp_path / "flat"), "train", cols)
    with pytest.raises(DataError, match=r"hf_columns\.image for task 'nlvr2' must name 2 column\(s\), got 'image'"):
        load_hf_examples("nlvr2", str(HF), "val", {"image": "image", "text": "question", "label": "label"})


def test_hf_which_answer_column_each_task_reads(tmp_path):
    """nlvr2 reads ``label`` where ``answer`` is mapped too; GQA's reference is its target alone (VQA's are the
    human answers); answers are stripped before they are counted; a row whose ``answer`` is there but whose
    ``answers`` list is empty is malformed, not a row without answers (read with an empty target under
    require_answers=False, its gold answer was dropped)."""
    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    path = _hf_dict(tmp_path / "answers", {"image": [image] * 2, "image2": [image] * 2, "question": ["What?"] * 2,
                                           "label": [1, 0], "said": ["false", ""], "answer": ["cat", "dog"],
                                           "answers": [[" dog", "dog ", "cat"], []]})
    nl, _ = load_hf_examples("nlvr2", path, "train", {"image": ["image", "image2"], "text": "question",
                                                      "label": "label", "answer": "said"})
    assert [e.target for e in nl] == ["true", "false"]  # label's 1 / 0; a blank answer cell is not read
    both = {"image": "image", "question": "question", "answer": "answer", "answers": "answers"}
    (gqa,), _ = load_hf_examples("gqa", path, "train", both, skip_bad_records=True)
    assert gqa.target == "cat" and gqa.references == ["cat"]
    (vqa,), _ = load_hf_examples("vqa", path, "train", {k: v for k, v in both.items() if k != "answer"},
                                 skip_bad_records=True)
    assert vqa.references == ["dog", "dog", "cat"] and vqa.target == "dog"
    with pytest.raises(RecordError, match=r"answers\[train\]: row 1: key 'answers' is empty"):
        load_hf_examples("vqa", path, "train", both, require_answers=False)


def test_hf_image_cells_holding_bytes_and_the_name_of_their_file_decode_the_bytes(tmp_path):
    """datasets' Image feature keeps an image's bytes with the name of the file it came from, which is not there
    where the dataset is read: the bytes are the image (not a missing file). A row holding an image's bytes and
    one naming a file under the same image_id are not compared (one cannot tell them apart undecoded)."""
    import datasets
    from PIL import Image

    from vlscale.data.hf_dataset import load_hf_examples

    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    jpg = str(sorted((FIXTURES / "real_data" / "gqa" / "images").glob("*.jpg"))[0])
    rows = {"image": [{"bytes": buffer.getvalue(), "path": "shot_0001.png"}, {"bytes": None, "path": jpg}],
            "q": ["a?", "b?"], "a": ["x", "y"], "name": ["one", "one"]}
    features = datasets.Features({"q": datasets.Value("string"), "a": datasets.Value("string"),
                                  "name": datasets.Value("string")})
    as_image = _hf_dict(tmp_path / "as_image", rows, datasets.Features(dict(features, image=datasets.Image())))
    ex, src = load_hf_examples("gqa", as_image, "train", {"image": "image", "question": "q", "answer": "a"})
    assert len(ex) == 2 and np.array_equal(src["train/0"], pixels)
    # saved as an Image feature, the file's bytes are embedded; as {bytes, path} structs the path stays a path
    raw = _hf_dict(tmp_path / "raw", rows, datasets.Features(
        dict(features, image={"bytes": datasets.Value("binary"), "path": datasets.Value("string")})))
    ex, src = load_hf_examples("gqa", raw, "train", {"image": "image", "image_id": "name", "question": "q",
                                                     "answer": "a"})
    assert [e.image_ids for e in ex] == [["one"], ["one"]] and np.array_equal(src["one"], pixels)

@pytest.mark.parametrize("kind", ["struct", "string", "binary"])
def test_hf_rows_without_image_are_the_rows_training_skips(tmp_path, kind):
    """extract_features' Arrow scan (``rows_without_image``) finds exactly the rows training's loader
    refuses as "has no image" (and skips with data.skip_bad_records), for each way a cell can hold none."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples, rows_without_image

    path = str(sorted((FIXTURES / "real_data" / "gqa" / "images").glob("*.jpg"))[0])
    cells = {"struct": [{"bytes": None, "path": path}, None, {"bytes": None, "path": None}, {"bytes": b"", "path": ""},
                        {"bytes": b"x", "path": None}, {"bytes": None, "path": ""}],
             "string": [path, None, "", path, path, ""],
             "binary": [b"x", None, b"x", b"x", b"", None]}[kind]
    n = len(cells)
    kinds = {"struct": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
             "string": datasets.Value("string"), "binary": datasets.Value("binary")}
    features = datasets.Features({"image": kinds[kind], "q": datasets.Value("string"), "a": datasets.Value("string")})
    hf = _hf_dict(tmp_path / kind, {"image": cells, "q": ["q?"] * n, "a": ["a"] * n}, features)
    ex, _ = load_hf_examples("gqa", hf, "train", {"image": "image", "question": "q", "answer": "a"},
                             skip_bad_records=True)
    kept = {e.extra["row"] for e in ex}
    ds = datasets.load_from_disk(hf)["train"]
    for batch_size in (4, 10_000):
        assert rows_without_image(ds, ["image"], batch_size=batch_size) == [
            (r, "image", "has no image") for r in range(n) if r not in kept]
    assert ex.skipped == n - len(kept) and 0 < ex.skipped < n


def test_hf_rows_without_image_name_the_first_empty_image_column(tmp_path):
    """With two image columns (NLVR2's pair) a row is reported once, under the first column that holds no
    image, as training's loader names it; a row missing only its second image names the second."""
    import datasets

    from vlscale.data.hf_dataset import load_hf_examples, rows_without_image

    path = str(sorted((FIXTURES / "real_data" / "gqa" / "images").glob("*.jpg"))[0])
    left, right = [path, None, None, path], [path, None, path, None]
    hf = _hf_dict(tmp_path / "pair", {"left": left, "right": right, "s": ["s."] * 4, "label": ["true"] * 4})
    ds = datasets.load_from_disk(hf)["train"]
    assert rows_without_image(ds, ["left", "right"]) == [(1, "left", "has no image"), (2, "left", "has no image"),
                                                         (3, "right", "has no image")]
    cols = {"image": ["left", "right"], "text": "s", "label": "label"}
    for row, column in ((1, "left"), (3, "right")):
        one = _hf_dict(tmp_path / f"row{row}", {"left": [left[row]], "right": [right[row]], "s": ["s."],
                                                 "label": ["true"]})
        with pytest.raises(RecordError, match=rf"row 0: key '{column}' "):
            load_hf_examples("nlvr2", one, "train", cols)


@pytest.mark.parametrize("cell", ["string", "struct"])
def test_hf_image_files_that_are_not_there_are_found_when_the_split_is_read(tmp_path, monkeypatch, cell):
    """A path cell naming a missing file is refused when the split is read (not when a batch reaches it, after
    training), naming the row, column and the places looked at; data.skip_bad_records drops and counts it, and
    extract_features' scan (``rows_without_image``) finds the same rows."""
    import datasets
    from PIL import Image

    from vlscale.data.hf_dataset import load_hf_examples, missing_image_file, rows_without_image

    (tmp_path / "images").mkdir()
    for i in (0, 2):
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    ds = tmp_path / "ds"
    ds.mkdir()
    as_cell = (lambda p: p) if cell == "string" else (lambda p: {"bytes": None, "path": p})
    rows = [{"img": as_cell(f"../images/{i}.png"), "q": f"q{i}?", "a": "x"} for i in range(3)]
    (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = {"image": "img", "question": "q", "answer": "a"}
    with pytest.raises(RecordError, match=r"ds\[train\]: row 1: key 'img' holds '\.\./images/1\.png', which is "
                                          r"neither image data nor an existing image file \(looked for .*ds/\.\./images/"
                                          r"1\.png and "):
        load_hf_examples("gqa", str(ds), "train", cols)
    ex, src = load_hf_examples("gqa", str(ds), "train", cols, skip_bad_records=True)
    assert [e.extra["row"] for e in ex] == [0, 2] and ex.skipped == 1
    assert src["train/2"].shape == (6, 6, 3) and "train/1" not in src
    split = datasets.load_dataset("json", data_files=str(ds / "train.jsonl"), split="train")
    [(row, column, why)] = rows_without_image(split, ["img"], base_dir=ds)
    assert (row, column) == (1, "img") and why.startswith("holds '../images/1.png', which is neither image data nor")
    # an empty file (0 bytes, a copy that never happened) is found there too, not when a batch reaches it
    (tmp_path / "images" / "1.png").write_bytes(b"")
    empty = rf"holds '\.\./images/1\.png', whose file {re.escape(str(ds))}/\.\./images/1\.png is empty \(0 bytes\)$"
    with pytest.raises(RecordError, match=rf"ds\[train\]: row 1: key 'img' {empty}"):
        load_hf_examples("gqa", str(ds), "train", cols)
    [(row, column, why)] = rows_without_image(split, ["img"], base_dir=ds)
    assert (row, column) == (1, "img") and re.match(empty, why)
    monkeypatch.chdir(tmp_path)  # without the dataset's folder, ../images/ from here is nowhere
    assert [r for r, _, _ in rows_without_image(split, ["img"])] == [0, 1, 2]
    assert missing_image_file("images/0.png", ds) is None  # not in the dataset's folder: then the current one
    for odd in ("images", "images/\0.png"):  # a folder; a path no file can have (ValueError: embedded null byte)
        assert missing_image_file(odd, ds).startswith(f"holds {odd!r}, which is neither image data nor an existing")


def test_hf_relative_image_paths_resolve_against_the_dataset_folder(tmp_path, monkeypatch):
    from PIL import Image

    from vlscale.data.hf_dataset import load_hf_examples

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).save(tmp_path / "imgs" / "a.png")
    ds = tmp_path / "ds"
    ds.mkdir()
    for split in ("train", "validation"):
        (ds / f"{split}.jsonl").write_text(json.dumps({"img": "../imgs/a.png", "q": "what?", "a": "x"}) + "\n")
    elsewhere = tmp_path / "run" / "here"  # ../imgs from here is not tmp_path/imgs
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    _, src = load_hf_examples("gqa", str(ds), "train", {"image": "img", "question": "q", "answer": "a"})
    assert src["train/0"].shape == (6, 6, 3) and (src["train/0"] == 9).all()


def test_hf_grayscale_and_rgba_images_come_as_rgb(tmp_path):
    """``source[image_id]`` is an (H, W, 3) RGB array whatever the stored image's mode: a grayscale PNG ("L",
    common in document and medical sets) came back (H, W) and an RGBA one (H, W, 4), which the image
    processor's 3-channel normalisation cannot take. Gray g becomes (g, g, g); RGBA drops its alpha."""
    from PIL import Image

    from vlscale.data.hf_dataset import load_hf_examples

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    gray = png(Image.fromarray(np.full((4, 5), 77, np.uint8), mode="L"))
    rgba = png(Image.fromarray(np.full((4, 5, 4), (10, 20, 30, 128), np.uint8), mode="RGBA"))
    path = _hf_dict(tmp_path / "modes", {"image": [gray, rgba], "q": ["What?"] * 2, "a": ["x"] * 2})
    _, src = load_hf_examples("gqa", path, "train", {"image": "image", "question": "q", "answer": "a"})
    assert src["train/0"].shape == src["train/1"].shape == (4, 5, 3)
    assert (src["train/0"] == 77).all() and (src["train/1"] == [10, 20, 30]).all()


def test_hf_image_cells_as_arrays_keep_their_layout_and_an_absolute_path_is_looked_for_once(tmp_path):
    """decode_image takes an (H, W, C) or (H, W) array cell as the image it holds, pixel for pixel (a non-square one
    would show a transpose); an absolute path names one place, whatever the dataset's folder, and a missing one is
    said once ("looked for /x and /x" said it twice)."""
    from vlscale.data.hf_dataset import decode_image, find_image_file, missing_image_file

    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(decode_image(rgb), rgb)
    gray = np.arange(4 * 5, dtype=np.uint8).reshape(4, 5)
    assert np.array_equal(decode_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    gone = str(tmp_path / "elsewhere" / "a.png")
    assert find_image_file(gone, base_dir=tmp_path / "ds") == (None, [Path(gone)])
    assert missing_image_file(gone, base_dir=tmp_path / "ds") == (f"holds {gone!r}, which is neither image data nor "
                                                                  f"an existing image file (looked for {gone})")


def test_hf_array3d_image_columns_decode_from_the_nested_lists_datasets_gives(tmp_path):
    """An ``Array3D`` (or ``Array2D``) image column reaches the image source as nested Python lists: read as the
    pixels they hold (was refused: "cannot read an image from list"); values outside 0-255 are named."""
    import datasets

    from vlscale.data.hf_dataset import decode_image, load_hf_examples

    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    features = datasets.Features({"image": datasets.Array3D(shape=(4, 5, 3), dtype="uint8"),
                                  "q": datasets.Value("string"), "a": datasets.Value("string")})
    path = _hf_dict(tmp_path / "arrays", {"image": [rgb, rgb[::-1]], "q": ["q0", "q1"], "a": ["x", "y"]}, features)
    ex, source = load_hf_examples("gqa", path, "train", {"image": "image", "question": "q", "answer": "a"})
    assert np.array_equal(source[ex[0].image_ids[0]], rgb) and np.array_equal(source[ex[1].image_ids[0]], rgb[::-1])
    assert np.array_equal(decode_image(rgb[:, :, 0].tolist()), np.repeat(rgb[:, :, :1], 3, axis=2))
    with pytest.raises(DataError, match=r"row 3: an array image cell must hold 0-255 integers, got float64 values "
                                        r"in \[0.5, 0.5\]"):
        decode_image([[0.5]], where="row 3")
    # an array cell (numpy formatting) is held to the same: PIL read floats in [0, 1] as black and clipped
    # 16-bit values to 255 without a word, and refused int64 pixels that are in range
    for bad, got in ((np.full((2, 2), 0.5, np.float32), r"float32 values in \[0.5, 0.5\]"),
                     (np.full((2, 2), 1000, np.uint16), r"uint16 values in \[1000, 1000\]"),
                     (np.array([["a"]]), r"<U1$")):
        with pytest.raises(DataError, match=r"row 3: an array image cell must hold 0-255 integers, got " + got):
            decode_image(bad, where="row 3")
    with pytest.raises(DataError, match=r"row 3: an array image cell holds no pixels \(shape \(0, 3\)\)"):
        decode_image(np.zeros((0, 3), np.uint8), where="row 3")
    assert np.array_equal(decode_image(rgb.astype(np.int64)), rgb)


def test_hf_a_path_cell_naming_a_truncated_image_file_names_the_whole_file(tmp_path):
    """A path cell (or a {bytes: None, path} dict) naming a half-written image file is refused naming the file it
    opened, whole: the cell's repr cut at 60 characters lost the file's name in a deep folder."""
    from PIL import Image

    from vlscale.data.hf_dataset import decode_image

    folder = tmp_path / ("a_folder_deep_enough_that_the_cell_is_long" * 2) / "train2014"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(folder / "whole.jpg")
    raw = (folder / "whole.jpg").read_bytes()
    (folder / "COCO_train2014_000000000009.jpg").write_bytes(raw[:len(raw) // 2])
    cut = str(folder / "COCO_train2014_000000000009.jpg")
    for cell in (cut, {"bytes": None, "path": cut}):
        with pytest.raises(DataError, match=rf"^row 3: cannot read image {re.escape(cut)} \(OSError: .*[Tt]runcated"):
            decode_image(cell, where="row 3")
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^row 3: cannot read image .*empty\.jpg \(the file is empty: 0 bytes\)$"):
        decode_image(str(folder / "empty.jpg"), where="row 3")


def test_images_decoded_padded_because_other_code_allows_it_are_said_once(tmp_path, monkeypatch, caplog):
    """PIL's ImageFile.LOAD_TRUNCATED_IMAGES, turned on by other code in the process, makes a cut image decode
    padded with grey instead of being refused: the image folder's and the HF cells' decoders say so, once."""
    from PIL import Image, ImageFile

    from vlscale.data import visual
    from vlscale.data.hf_dataset import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the cut lands in the scan
    Image.fromarray(pixels).save(tmp_path / "whole.jpg")
    raw = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[:len(raw) // 2])
    with caplog.at_level("WARNING", logger="vlscale.data.visual"):
        visual.load_image(tmp_path / "whole.jpg")  # off (vlscale never sets it): nothing said
        assert not caplog.records
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        monkeypatch.setattr(visual, "_SAID_TRUNCATED", [])
        assert visual.load_image(tmp_path / "cut.jpg").shape == (64, 64, 3)  # decoded, not refused
        decode_image(str(tmp_path / "cut.jpg"), where="row 1")
    assert [r.getMessage() for r in caplog.records] == [
        "PIL's ImageFile.LOAD_TRUNCATED_IMAGES is on (set by other code in this process): a cut (half-written) image "
        "file is decoded padded with grey, not refused naming it"]
    monkeypatch.setattr(visual, "_SAID_TRUNCATED", [])
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlscale.data.visual"):
        decode_image(str(tmp_path / "cut.jpg"), where="row 1")
    assert len(caplog.records) == 1  # the HF cells' decoder says it too


def test_hf_datasets_library_errors_become_data_errors(tmp_path, monkeypatch):
    from vlscale.data.hf_dataset import load_hf_examples, open_hf_split

    cols = {"image": "image", "question": "q", "answer": "a"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"hf_dataset='.*empty': the datasets library cannot load it "
                                        r"\(EmptyDatasetError.*holds nothing \(an empty folder\)"):
        load_hf_examples("gqa", str(tmp_path / "empty"), "train", cols)
    # a split of 0 rows: save_to_disk writes no data file, and load_from_disk failed on every split (IndexError)
    no_rows = _hf_dict(tmp_path / "no_rows", {"image": [], "q": [], "a": []})
    with pytest.raises(DataFileNotFound, match=r"^data\.hf_dataset='[^']*no_rows': its split 'train' has no rows "
                                               r"\(saved without a data file: train/state\.json lists none\); give "
                                               r"it rows, or save the DatasetDict without it$"):
        load_hf_examples("gqa", no_rows, "train", cols)
    import datasets

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    one = datasets.Dataset.from_dict({"image": [image], "q": ["q"], "a": ["a"]})
    datasets.DatasetDict({"train": one, "validation": one.select([])}).save_to_disk(str(tmp_path / "no_val"))
    with monkeypatch.context() as m:  # saved, not a folder of data files: not looked through for empty ones
        m.setattr(datasets, "load_dataset_builder", lambda *a, **k: pytest.fail("read as a folder of data files"))
        assert [e.target for e in load_hf_examples("gqa", str(tmp_path / "no_val"), "train", cols)[0]] == ["a"]
    # missing, as a split not there is (extract_features.py --real skips it, saying so)
    with pytest.raises(DataFileNotFound, match=r"no_val': its split 'validation' has no rows \(saved without"):
        load_hf_examples("gqa", str(tmp_path / "no_val"), "val", cols)
    datasets.DatasetDict({"train": one, "validation": one.select([]), "dev": one}).save_to_disk(str(tmp_path / "dev"))
    datasets.DatasetDict({"train": one, "validation": one.select([]), "dev": one.select([])}).save_to_disk(
        str(tmp_path / "both"))  # every name of val's empty: each named
    with pytest.raises(DataFileNotFound, match=r"both': its splits 'validation', 'dev' have no rows \(saved without a "
                                               r"data file: validation/state\.json lists none\); give them rows, or "
                                               r"save the DatasetDict without them$"):
        load_hf_examples("gqa", str(tmp_path / "both"), "val", cols)
    examples = load_hf_examples("gqa", str(tmp_path / "dev"), "val", cols)[0]  # the next name of val's: dev's rows
    assert [(e.target, e.uid) for e in examples] == [("a", "val-0")]  # numbered as val's (ids: the dataset's first)
    assert open_hf_split(str(tmp_path / "dev"), "dev")[1:] == ("dev", "val")  # asked by its name too (--split dev)
    broken = _hf_dict(tmp_path / "broken", {"image": ["a.png"], "q": ["q"], "a": ["a"]})
    for arrow in Path(broken).rglob("*.arrow"):
        arrow.write_bytes(b"not an arrow file")
    with pytest.raises(DataError, match=r"broken': the datasets library cannot load it .*a saved DatasetDict with "
                                        r"splits 'train' \(1 data file\), 'validation' \(1 data file\)$"):
        load_hf_examples("gqa", broken, "train", cols)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.jsonl").write_text(json.dumps({"image": "a.png", "q": "q", "a": "a"}) + "\n")
    (mixed / "validation.csv").write_text("image,q,a\na.png,q,a\n")
    with pytest.raises(DataError, match=r"mixed': the datasets library cannot load it \(ValueError: Couldn't infer "
                                        r"the same data file format.*2 entries \['train\.jsonl', 'validation\.csv'\]"):
        load_hf_examples("gqa", str(mixed), "train", cols)
    for k in range(9):  # 11 entries: counted, the first 10 (by name) listed
        (mixed / f"train-{k}.jsonl").write_text(json.dumps({"image": "a.png", "q": "q", "a": "a"}) + "\n")
    listed = ", ".join(f"'train-{k}\\.jsonl'" for k in range(9))
    with pytest.raises(DataError, match=rf"the folder holds 11 entries \[{listed}, 'train\.jsonl'\]$"):
        load_hf_examples("gqa", str(mixed), "train", cols)
    # an empty data file: the library said only "An error occurred while generating the dataset"
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = tmp_path / "files"
    files.mkdir()
    table = pa.Table.from_pylist([{"image": "a.png", "q": "q", "a": "a"}])
    pq.write_table(table, files / "train.parquet")
    pq.write_table(table.slice(0, 0), files / "validation.parquet")
    # the other split loads from its own files; the empty one is a missing split (as a saved split of 0 rows)
    assert open_hf_split(str(files), "train")[0]["a"] == ["a"]
    with pytest.raises(DataFileNotFound, match=r"files': its split 'validation' has no rows \(its data file "
                                               r"'validation\.parquet' is empty\); give it rows, or remove that file$"):
        load_hf_examples("gqa", str(files), "val", cols)
    (files / "train.parquet").unlink()  # every split of none: the folder cannot load
    with pytest.raises(DataError, match=r"files': its data file 'validation\.parquet' is empty \(no rows\), and the "
                                        r"datasets library cannot load the folder with it \(DatasetGenerationError: "
                                        r"An error occurred while generating the dataset, from ArrowInvalid: .*\); "
                                        r"remove it or give it rows$"):
        load_hf_examples("gqa", str(files), "val", cols)
    (files / "validation.parquet").write_bytes(b"")  # 0 bytes: 'Parquet file size is 0 bytes', naming no file
    with pytest.raises(DataError, match=r"files': its data file 'validation\.parquet' is empty \(no rows\), and"):
        load_hf_examples("gqa", str(files), "val", cols)
    # a 0-byte data file of any format is named too (the library's error is a bare StopIteration)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "train.jsonl").write_text("")
    (blank / "validation.jsonl").write_text(json.dumps({"image": "a.png", "q": "q", "a": "a"}) + "\n")
    with pytest.raises(DataFileNotFound, match=r"blank': its split 'train' has no rows \(its data file 'train\.jsonl' "
                                               r"is empty\); give it rows, or remove that file$"):
        load_hf_examples("gqa", str(blank), "train", cols)
    (blank / "validation.jsonl").unlink()
    with pytest.raises(DataError, match=r"blank': its data file 'train\.jsonl' is empty \(no rows\), and the "
                                        r"datasets library cannot load the folder with it \(.+\); remove it or give it "
                                        r"rows$"):
        load_hf_examples("gqa", str(blank), "train", cols)


def test_hf_an_empty_data_file_is_named_wherever_it_lies_in_the_folder(tmp_path, caplog):
    """A 0-byte data file (or a parquet file of no rows) in a folder of data files: the library's error names no
    file (a bare StopIteration for a JSON file; 'Instruction "validation" corresponds to no data' for a split of
    one), and the folder's listing marked it '(empty)' only among its first 10 entries, in its top folder. The
    error names each such file, by its path in the folder. A split whose files all hold none is a missing split
    (as a saved split of 0 rows), the others loaded from their own files; the library failed every split with it."""
    from vlscale.data.hf_dataset import _files_are, _why, load_hf_examples, open_hf_split

    cols = {"image": "image", "question": "q", "answer": "a"}
    row = json.dumps({"image": "a.png", "q": "q", "a": "a"}) + "\n"
    many = tmp_path / "many"  # the empty file is the 13th entry
    many.mkdir()
    for k in range(12):
        (many / f"train-{k:02d}.jsonl").write_text(row)
    (many / "validation.jsonl").write_text("")
    assert open_hf_split(str(many), "train")[0].num_rows == 12
    with pytest.raises(DataFileNotFound, match=r"^data\.hf_dataset='[^']*many': its split 'validation' has no rows "
                                               r"\(its data file 'validation\.jsonl' is empty\); give it rows, or "
                                               r"remove that file$"):
        load_hf_examples("gqa", str(many), "val", cols)
    assert "empty (0 bytes)" not in caplog.text  # validation.jsonl is not train's
    (many / "train-00.jsonl").write_text("")  # one empty file of a split of rows: the split loads, without it ...
    assert open_hf_split(str(many), "train")[0].num_rows == 11
    # ... said, as it was read silently: an empty file beside files of rows is a download or copy that failed
    assert re.search(r"many': its data file 'train-00\.jsonl' is empty \(0 bytes\) where split 'train''s other "
                     r"files hold rows \(a download or copy that failed\?\): the split is read without it", caplog.text)
    val = tmp_path / "val"  # in a subfolder, the split asked by our name for it (val), two of its files
    (val / "data").mkdir(parents=True)
    for k, text in enumerate((row, "", "")):
        (val / "data" / f"validation-{k}.jsonl").write_text(text)
    assert open_hf_split(str(val), "val")[0].num_rows == 1
    assert re.search(r"val': its data files \['data/validation-1\.jsonl', 'data/validation-2\.jsonl'\] are empty "
                     r"\(0 bytes\) where split 'validation''s other files hold rows \(a download or copy that "
                     r"failed\?\): the split is read without them; copy them again, or remove them if they should hold "
                     r"no rows", caplog.text)
    nested = tmp_path / "nested"  # in a subfolder (data/, as hub datasets lay their files out)
    (nested / "data").mkdir(parents=True)
    (nested / "data" / "train.jsonl").write_text("")
    (nested / "data" / "validation.jsonl").write_text(row)
    with pytest.raises(DataFileNotFound, match=r"^data\.hf_dataset='[^']*nested': its split 'train' has no rows \(its "
                                               r"data file 'data/train\.jsonl' is empty\); give it rows, or remove "
                                               r"that file$"):
        load_hf_examples("gqa", str(nested), "train", cols)
    (nested / "data" / "validation.jsonl").write_text("")  # every split of none: the folder cannot load
    (nested / "data" / "test.jsonl").write_text("")
    (nested / ".cache").mkdir()  # hidden: the library does not read it
    (nested / ".cache" / "x.json").write_text("")
    with pytest.raises(DataError, match=r"^data\.hf_dataset='[^']*nested': its data files "
                                        r"\['data/test\.jsonl', 'data/train\.jsonl', 'data/validation\.jsonl'\] are "
                                        r"empty \(no rows\), and the "
                                        r"datasets library cannot load the folder with them \(.+\); remove them or "
                                        r"give them rows$"):
        load_hf_examples("gqa", str(nested), "train", cols)
    eleven = tmp_path / "eleven"  # more than 10: counted, the first 10 named
    eleven.mkdir()
    for k in range(11):
        (eleven / f"train-{k:02d}.jsonl").write_text("")
    (eleven / "validation.jsonl").write_text(row)
    first = ", ".join(f"'train-{k:02d}\\.jsonl'" for k in range(10))
    with pytest.raises(DataFileNotFound, match=rf"^data\.hf_dataset='[^']*eleven': its split 'train' has no rows "
                                               rf"\(its 11 data files \(the first 10: \[{first}\]\) are empty\); give "
                                               r"it rows, or remove those files$"):
        load_hf_examples("gqa", str(eleven), "train", cols)
    (eleven / "validation.jsonl").write_text("")
    with pytest.raises(DataError, match=rf"^data\.hf_dataset='[^']*eleven': its 12 data files \(the first 10: "
                                        rf"\[{first}\]\) are empty \(no rows\), and the datasets library cannot load "
                                        r"the folder with them \(.+\); remove them or give them rows$"):
        load_hf_examples("gqa", str(eleven), "train", cols)
    header = tmp_path / "header"  # a CSV file of its header alone has no rows either ('corresponds to no data')
    header.mkdir()
    (header / "train.csv").write_text("image,q,a\na.png,q,a\n")
    (header / "validation.csv").write_text("image,q,a\n\n")
    assert open_hf_split(str(header), "train")[0]["a"] == ["a"]  # the folder failed
    with pytest.raises(DataFileNotFound, match=r"^data\.hf_dataset='[^']*header': its split 'validation' has no rows "
                                               r"\(its data file 'validation\.csv' is empty\); give it rows, or remove "
                                               r"that file$"):
        load_hf_examples("gqa", str(header), "val", cols)
    with pytest.raises(DataFileNotFound, match=r"header' has no split for 'test' \(tried \['test'\]\); its splits: "
                                               r"\['train', 'validation'\]$"):  # named as a saved dataset's are
        open_hf_split(str(header), "test")
    columns = tmp_path / "columns"  # no split of none: the library's refusal stands (not loaded split by split)
    columns.mkdir()
    (columns / "train.csv").write_text("image,q,a\na.png,q,a\n")
    (columns / "validation.csv").write_text("image,q,b\na.png,q,a\n")
    with pytest.raises(DataError, match=r"columns': the datasets library cannot load it \(DatasetGenerationError"):
        open_hf_split(str(columns), "train")
    tsv = tmp_path / "tsv"  # a TSV file too
    tsv.mkdir()
    (tsv / "train.tsv").write_text("image\tq\ta\na.png\tq\ta\n")
    (tsv / "validation.tsv").write_text("image\tq\ta\n")
    assert open_hf_split(str(tsv), "train")[0]["a"] == ["a"]
    with pytest.raises(DataFileNotFound, match=r"tsv': its split 'validation' has no rows \(its data file "
                                               r"'validation\.tsv' is empty\)"):
        load_hf_examples("gqa", str(tsv), "val", cols)
    lines = tmp_path / "lines"  # JSON(L) of blank lines, or [], has no rows either
    lines.mkdir()
    (lines / "train.jsonl").write_text(row)
    (lines / "validation.jsonl").write_text("\n \n")
    (lines / "test.json").write_text("[ \n]\n")
    assert open_hf_split(str(lines), "train")[0]["a"] == ["a"]
    for split, file in (("val", "validation.jsonl"), ("test", "test.json")):
        with pytest.raises(DataFileNotFound, match=rf"lines': its split '[a-z]+' has no rows \(its data file '{file}'"):
            load_hf_examples("gqa", str(lines), split, cols)
    assert _why(StopIteration()) == "StopIteration"  # not "StopIteration: "
    ten = [f"f{k}" for k in range(10)]
    assert _files_are(ten) == f"data files {ten} are"  # 10 listed; 11 counted, the first 10 listed
    assert _files_are([*ten, "g"]) == f"11 data files (the first 10: {ten}) are"


def test_frame_images_are_taken_in_number_order(tmp_path):
    """Frames named 1.jpg ... 10.jpg (no zero padding) came as 1, 10, 2, ... (plain name order): the video's
    frames silently out of order. Numbers in names compare by value; zero-padded names keep their order."""
    from PIL import Image

    from vlscale.data.visual import ImageFolder

    for k in (1, 2, 10, 11):
        (tmp_path / "v").mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k * 10, dtype=np.uint8)).save(tmp_path / "v" / f"{k}.png")
        (tmp_path / "w").mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k * 10, dtype=np.uint8)).save(tmp_path / "w" / f"{k:05d}.png")
    for vid in ("v", "w"):
        frames = ImageFolder(tmp_path, video=True)[vid]
        assert [int(f[0, 0, 0]) for f in frames] == [10, 20, 100, 110], vid


def test_a_split_missing_for_some_tasks_is_one_error_naming_each_before_any_loads(tmp_path):
    """launchers/evaluate.py checks every task's split up front: one DataError naming each task without it and
    the file looked for (COCO's captions: a name that is no Karpathy split, or no captions file); the synthetic
    world and an HF dataset (its splits resolved when opened) are not checked here."""
    from vlscale.data import check_split_found

    cfg = make_cfg(tasks=["vqa", "gqa", "caption"])
    check_split_found(cfg, ["vqa", "gqa", "caption", "tvqa"], "val")  # every fixture task has a val split
    with pytest.raises(DataError, match=r"^split 'restval' not found for gqa, caption: gqa restval annotations: "
                                        r".*gqa/restval\.json does not exist .*; .*coco/dataset_coco\.json: COCO "
                                        r"Karpathy split 'restval' is not one of \['train', 'val', 'test'\]$"):
        check_split_found(cfg, ["gqa", "caption"], "restval")
    with pytest.raises(DataError, match=r"^split 'dev' not found for vqa: .*vqa/dev\.json does not exist"):
        check_split_found(cfg, ["vqa"], "dev")
    with pytest.raises(DataError, match=r"^split 'val' not found for caption: COCO Karpathy captions: "
                                        r".*coco/dataset_coco\.json does not exist"):  # no file: no split to name
        check_split_found(make_cfg(tmp_path, tasks=["caption"]), ["caption"], "val")
    check_split_found(RunConfig(data=DataConfig(tasks=["vqa"])), ["vqa"], "dev")  # synthetic: every split
    check_split_found(RunConfig(data=DataConfig(tasks=["vqa"], source="real", hf_dataset="/no/such/hf")), ["vqa"], "dev")


def test_skipping_drops_each_example_naming_a_missing_id_and_keeps_the_skip_count():
    """data.skip_bad_records: an example goes when any of its ids is missing (NLVR2: one of its two images),
    and the ExampleList returned keeps its file, the earlier skips and this one."""
    from vlscale.data import check_visual_ids
    from vlscale.data.real import ExampleList
    from vlscale.data.tasks import Example

    listed = ExampleList([Example("nlvr2", "a", "t", "true", ["l0", "r0"]),
                          Example("nlvr2", "b", "t", "false", ["l1", "gone"]),
                          Example("nlvr2", "c", "t", "true", ["gone", "r2"])], source="train.json")
    listed.skipped, listed.skip_messages = 2, ["bad 1", "bad 2"]
    cfg = make_cfg(tasks=["nlvr2"], skip_bad_records=True)
    kept = check_visual_ids(cfg, "nlvr2", "train", listed, {"l0", "r0", "l1", "r2"})
    assert [e.uid for e in kept] == ["a"]
    assert isinstance(kept, ExampleList) and kept.source == "train.json" and kept.skipped == 4
    assert kept.skip_messages[:2] == ["bad 1", "bad 2"] and len(kept.skip_messages) == 3
    assert kept.skip_messages[2].startswith("nlvr2/train: 1 visual id(s) named by 2 of 3 examples")


def test_only_a_numbered_uid_suffix_merges_caption_examples():
    """one_per_input merges ``<id>#<k>`` (one example per reference caption); a uid with another ``#`` suffix is
    an example of its own."""
    from vlscale.data import one_per_input
    from vlscale.data.tasks import Example

    own = [Example("tvc", "clip#intro", "", "a", ["v1"], ["a"]), Example("tvc", "clip#outro", "", "b", ["v1"], ["b"])]
    assert [e.uid for e in one_per_input(own)] == ["clip#intro", "clip#outro"]
    per_caption = [Example("tvc", "clip#0", "", "a", ["v1"], ["a", "b"]), Example("tvc", "clip#1", "", "b", ["v1"], ["a", "b"])]
    assert [(e.uid, e.references) for e in one_per_input(per_caption)] == [("clip", ["a", "b"])]
    from vlscale.data.real import ExampleList

    listed = ExampleList(per_caption, source="tvc/train.jsonl")
    listed.skipped = 1
    merged = one_per_input(listed)  # the file and the skips stay said (errors and reports name them)
    assert isinstance(merged, ExampleList) and (merged.source, merged.skipped, len(merged)) == ("tvc/train.jsonl", 1, 1)


def test_vqa_answers_are_counted_after_normalising_for_the_target(tmp_path):
    """ "two" and "2" are one answer to the scorer and to ``label`` (whose keys are normalised), so they are one
    answer when the target is chosen: on a ``label`` tie, in a record without ``label``, and in an HF dataset's
    rows. Counted raw, "2" (4 of 10) lost the tie to "3" (5), and "dog" (2 raw) beat "a dog"/"dogs"/"dog." (1 each).
    Answers that normalise to nothing (".") are not counted while others remain."""
    from vlscale.data.vqa import load_vqa, vqa_target

    answers = ["two"] * 3 + ["2"] * 4 + ["3"] * 5
    tie = {"img_id": "i", "sent": "How many?", "question_id": 1, "label": {"3": 1.0, "2": 1.0}, "answers": answers}
    dogs = {"img_id": "i", "sent": "What?", "question_id": 2,
            "answers": ["cat", "cat", "dog", "a dog", "dog.", "Dog", ".", ".", "."]}
    first, second = load_vqa(_write_json(tmp_path / "vqa.json", [tie, dogs]))
    assert (first.target, first.references) == ("2", answers)
    assert second.target == "dog" and second.extra["label"] == {"dog": 1.0, "cat": 0.6}
    assert vqa_target([".", ".", "the"]) == "."  # nothing survives normalising: counted as given
    assert vqa_target(["yes", "no"], {}) == "no"  # an empty label: the answers alone, ties alphabetical
    from vlscale.data.hf_dataset import load_hf_examples

    image = str(ROOT / "coco" / "images" / "COCO_val2014_000000000042.jpg")
    path = _hf_dict(tmp_path / "hf", {"image": [image], "question": ["How many?"], "answers": [answers]})
    (hf,), _ = load_hf_examples("vqa", path, "train", {"image": "image", "question": "question", "answers": "answers"})
    assert (hf.target, hf.references) == ("2", answers)


def test_vqa_target_is_labels_answer_its_ties_counted_normalised_and_predict_only_keeps_the_question(tmp_path):
    """``label`` (the answer vocabulary's scores) decides the target, not the raw answers' majority: a label
    that kept "skateboard" trains on it though "skateboarding" (outside the vocabulary) was given more often.
    A tie between a label's keys as written ("Two") counts the raw answers normalised ("two", "2" -> 7 against
    "3"'s 5). ``extra`` keeps ``question_type``; a record without answers, read for ``--predict-only``
    (``require_answers=False``), is one example with an empty target, no references and its types kept."""
    from vlscale.data.vqa import load_vqa

    q = {"img_id": "i", "sent": "What?"}
    vocab = dict(q, question_id=1, label={"skateboard": 1.0}, answers=["skateboarding"] * 6 + ["skateboard"] * 4,
                 question_type="what is")
    tie = dict(q, question_id=2, label={"Two": 1.0, "3": 1.0}, answers=["two"] * 3 + ["2"] * 4 + ["3"] * 5)
    withheld = dict(q, question_id=3, answer_type="number", question_type="how many")
    path = _write_json(tmp_path / "vqa.json", [vocab, tie, withheld])
    first, second, third = load_vqa(path, require_answers=False)
    assert first.target == "skateboard" and first.extra["question_type"] == "what is"
    assert second.target == "Two"
    assert (third.uid, third.target, third.references) == ("3", "", [])
    assert third.extra == {"answer_type": "number", "question_type": "how many"}
