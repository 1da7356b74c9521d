"""launchers/evaluate.py --predict-only: a split whose answers are withheld (a leaderboard's test split) is read
without them, predicted as an evaluation predicts it, and written as predictions/ plus the image tasks' submission
files; without the flag, and for training, such a split is refused as before, the message naming the flag.

The adapter: a tiny run (TINY, fp32) trained for one step on the real-format fixtures' image tasks. The split
predicted is ``val`` with its answers stripped (COCO's restval image 42 moved to val, without its ``cocoid``, so
the caption split holds two images and one takes its id from its file name), compared with the normal evaluation
of the same labelled split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader, load_examples
from vlscale.data.real import DataError, RecordError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
TASKS = ("vqa", "gqa", "nlvr2", "caption")
FILES = {"vqa": "vqa/karpathy_{}.json", "gqa": "gqa/{}.json", "nlvr2": "nlvr2/{}.json"}
ANSWERS = {"vqa": ("label", "answers"), "gqa": ("label",), "nlvr2": ("label",), "caption": ("sentences",),
           "tvqa": ("answer_idx",), "tvc": ("descs",)}


def rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def image_root(root: Path) -> Path:
    for name in ("vqa", "gqa", "nlvr2", "coco"):
        shutil.copytree(FIXTURE / name, root / name)

    def two_val_images(data):
        for image in data["images"]:
            if image["cocoid"] == 42:
                image["split"] = "val"
                del image["cocoid"]
    rewrite(root / "coco" / "dataset_coco.json", two_val_images)
    return root


def strip(root: Path, task: str, split_file: str, coco_split: str = "val") -> None:
    """Remove the answers of ``task``'s ``split_file`` (COCO: of its images in ``coco_split``)."""
    def drop(records):
        for r in records:
            for key in ANSWERS[task]:
                r.pop(key, None)
    if task == "caption":
        rewrite(root / "coco" / "dataset_coco.json",
                lambda d: drop([i for i in d["images"] if i["split"] == coco_split]))
    else:
        rewrite(root / FILES[task].format(split_file), drop)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, h):
    """(labelled root, the same with val's answers stripped, trained run)."""
    base = tmp_path_factory.mktemp("predict_only")
    labelled, unlabelled = image_root(base / "labelled"), image_root(base / "unlabelled")
    for task, stem in (("vqa", "val"), ("gqa", "valid"), ("nlvr2", "valid"), ("caption", "val")):
        strip(unlabelled, task, stem)
    run = base / "run"
    h.launch(h.TINY + ["data.source=real", f"data.root={labelled}", "data.tasks=[vqa,gqa,nlvr2,caption]",
                       "train.micro_batch_size=2", "train.max_steps=1", "train.eval_every=0", f"output_dir={run}"])
    return labelled, unlabelled, run


def evaluate(launcher, run, root, out, *more):
    return launcher("evaluate").main(["--adapter", str(run / "adapter"), "--split", "val", "--out", str(out),
                                      "--no-progress", f"data.root={root}", *more])


def predictions(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]


def test_predict_only_writes_the_normal_evaluations_predictions_and_the_submission_files(setup, launcher, tmp_path,
                                                                                          capsys):
    labelled, unlabelled, run = setup
    assert evaluate(launcher, run, labelled, tmp_path / "eval") == 0
    assert evaluate(launcher, run, unlabelled, tmp_path / "pred", "--predict-only") == 0
    printed = capsys.readouterr().out
    pred = tmp_path / "pred"
    assert not (pred / "eval_metrics.json").exists() and (tmp_path / "eval" / "eval_metrics.json").exists()
    cfg = load_config("tiny", ["data.source=real", f"data.root={labelled}"])
    bare = load_config("tiny", ["data.source=real", f"data.root={unlabelled}"])
    for task in TASKS:  # the same inputs and ids, without answers (the tiny model's answers hardly vary)
        with_answers = load_examples(cfg, task, "val")
        without = load_examples(bare, task, "val", require_answers=False)
        assert [(e.uid, e.text, e.image_ids, {k: v for k, v in e.extra.items() if k != "label"})
                for e in with_answers] == [(e.uid, e.text, e.image_ids, e.extra) for e in without]
        assert all(e.target and e.references for e in with_answers)
        assert all(e.target == "" and e.references == [] for e in without)
        scored, mine = predictions(tmp_path / "eval", task), predictions(pred, task)
        assert [(r["uid"], r["prediction"]) for r in mine] == [(r["uid"], r["prediction"]) for r in scored]
        assert all(r["references"] == [] for r in mine)
        assert len(mine) == len(load_examples(cfg, task, "val")) == 2
        assert f"{task:8s} 2 examples: {pred / 'predictions' / (task + '.jsonl')}; {pred / 'submission'}" in printed
    answer = {t: {r["uid"]: r["prediction"] for r in predictions(pred, t)} for t in TASKS}
    vqa = json.loads((pred / "submission" / "vqa.json").read_text())
    assert vqa == [{"question_id": 73001, "answer": answer["vqa"]["73001"]},
                   {"question_id": 73002, "answer": answer["vqa"]["73002"]}]
    gqa = json.loads((pred / "submission" / "gqa.json").read_text())
    assert gqa == [{"questionId": q, "prediction": answer["gqa"][q]} for q in ("201206", "201207")]
    nlvr2 = (pred / "submission" / "nlvr2.csv").read_text().splitlines()
    identifiers = {e.uid: e.extra["identifier"] for e in load_examples(cfg, "nlvr2", "val")}
    assert nlvr2 == [f"{identifiers[u]},{answer['nlvr2'][u].capitalize()}" for u in sorted(identifiers)]
    assert {line.split(",")[0] for line in nlvr2} == {"dev-850-0-0", "dev-850-1-0"}
    assert all(line.endswith((",True", ",False")) for line in nlvr2)
    caption = json.loads((pred / "submission" / "caption.json").read_text())
    assert caption == [{"image_id": 42, "caption": answer["caption"]["COCO_val2014_000000000042"]},
                       {"image_id": 73, "caption": answer["caption"]["COCO_val2014_000000000073"]}]


def test_vqa_split_test2015_predicts_evalais_test_json_on_test2015_images(setup, launcher, tmp_path):
    """VL-T5's vqa/test.json (EvalAI's test-dev/test-std questions, no answers, on COCO's test2015 images) had no
    split name (``test`` is karpathy_test.json) and coco/images/test2015/ was not searched: split ``test2015``
    reads it, and the submission holds test.json's question ids."""
    _, unlabelled, run = setup
    root = tmp_path / "data"
    shutil.copytree(unlabelled, root)
    images = root / "coco" / "images"
    (images / "test2015").mkdir()
    for n in (1, 2):
        shutil.copy(images / "COCO_val2014_000000000073.jpg", images / "test2015" / f"COCO_test2015_00000000000{n}.jpg")
    questions = [{"img_id": "COCO_test2015_000000000001", "sent": "What is this?", "question_id": 1000},
                 {"img_id": "COCO_test2015_000000000002", "sent": "Is it red?", "question_id": 2000},
                 {"img_id": "COCO_test2015_000000000002", "sent": "How many?", "question_id": 2001}]
    (root / "vqa" / "test.json").write_text(json.dumps(questions))
    out = tmp_path / "evalai"
    assert launcher("evaluate").main(["--adapter", str(run / "adapter"), "--split", "test2015", "--tasks", "vqa",
                                      "--out", str(out), "--no-progress", "--predict-only", f"data.root={root}"]) == 0
    answer = {r["uid"]: r["prediction"] for r in predictions(out, "vqa")}
    assert json.loads((out / "submission" / "vqa.json").read_text()) == [
        {"question_id": q["question_id"], "answer": answer[str(q["question_id"])]} for q in questions]


def test_an_out_folder_holding_other_output_is_refused_and_kept(setup, launcher, tmp_path):
    """--out never makes another command's files stale: --predict-only into an evaluation's folder (its
    eval_metrics.json was scored on the predictions/ there), an evaluation into --predict-only's (its submission/),
    either into a training run's output_dir; the same mode again replaces its own files, as a rerun should."""
    labelled, unlabelled, run = setup
    scored, pred = tmp_path / "eval", tmp_path / "pred"
    assert evaluate(launcher, run, labelled, scored, "--tasks", "vqa") == 0
    assert evaluate(launcher, run, unlabelled, pred, "--tasks", "vqa", "--predict-only") == 0
    before = {p: p.read_bytes() for p in (*scored.rglob("*"), *pred.rglob("*"), *run.rglob("*")) if p.is_file()}
    with pytest.raises(ValueError, match=rf"--out {scored} holds the output of an evaluation \({scored}/eval_metrics"
                                         r"\.json\), which --predict-only would make stale"):
        evaluate(launcher, run, unlabelled, scored, "--tasks", "vqa", "--predict-only")
    with pytest.raises(ValueError, match=rf"--out {pred} holds the output of --predict-only \({pred}/submission\)"):
        evaluate(launcher, run, labelled, pred, "--tasks", "vqa")
    for mode in ((), ("--predict-only",)):
        with pytest.raises(ValueError, match=rf"--out {run} holds a training run \({run}/run_summary\.json\); "
                                             r"its predictions/ belong to that run's metrics\.json"):
            evaluate(launcher, run, labelled, run, "--tasks", "vqa", *mode)
    assert {p: p.read_bytes() for p in before} == before
    assert evaluate(launcher, run, labelled, scored, "--tasks", "vqa") == 0  # a rerun into its own folder
    a_file = tmp_path / "f.pt"
    a_file.write_bytes(b"kept")
    with pytest.raises(ValueError, match=rf"--out {a_file} cannot be created or written: {a_file} is a file, not a "
                                         r"folder"):
        evaluate(launcher, run, labelled, a_file, "--tasks", "vqa")  # was a traceback after the generation
    assert a_file.read_bytes() == b"kept"


def test_a_split_some_task_lacks_is_refused_before_any_task_is_evaluated(setup, launcher, tmp_path):
    """--split minival where vqa/minival.json exists and the other tasks have no such split: evaluate.py decoded
    vqa (minutes on real data) before failing on gqa's file; now one line names every task lacking it, and the file
    looked for, before the model is built."""
    labelled, _, run = setup
    root = tmp_path / "data"
    shutil.copytree(labelled, root)
    shutil.copy(root / "vqa" / "karpathy_val.json", root / "vqa" / "minival.json")
    out = tmp_path / "minival"
    with pytest.raises(DataError) as refused:
        launcher("evaluate").main(["--adapter", str(run / "adapter"), "--split", "minival", "--out", str(out),
                                   "--no-progress", f"data.root={root}"])
    message = str(refused.value)
    assert message.startswith("split 'minival' not found for gqa, nlvr2, caption: ") and "\n" not in message
    for looked_for in (root / "gqa" / "minival.json", root / "nlvr2" / "minival.json",
                       f"{root / 'coco' / 'dataset_coco.json'}: COCO Karpathy split 'minival' is not one of"):
        assert str(looked_for) in message
    assert not out.exists()  # nothing decoded, nothing written
    assert launcher("evaluate").main(["--adapter", str(run / "adapter"), "--split", "minival", "--tasks", "vqa",
                                      "--out", str(out), "--no-progress", f"data.root={root}"]) == 0


def test_an_unlabelled_split_is_refused_without_the_flag_and_for_training(setup, launcher, tmp_path):
    labelled, unlabelled, run = setup
    with pytest.raises(DataError, match=r"karpathy_val\.json: record 0 \(id 73001\): key 'label' is missing \(.*"
                                        r"launchers/evaluate\.py --predict-only\)"):
        evaluate(launcher, run, unlabelled, tmp_path / "refused", "--tasks", "vqa")
    assert not (tmp_path / "refused").exists()
    train = tmp_path / "train"
    image_root(train)
    for task, stem in (("vqa", "train"), ("gqa", "train"), ("nlvr2", "train"), ("caption", "train")):
        strip(train, task, stem, coco_split="train")
        cfg = load_config("tiny", ["data.source=real", f"data.root={train}", f"data.tasks=[{task}]",
                                   "model.feature_source=images"])
        with pytest.raises(RecordError, match=rf"key '{ANSWERS[task][0]}' is missing \(.*--predict-only\)"):
            build_train_loader(cfg, build_tokenizer(cfg))


def test_video_records_without_answers_load_for_prediction_only(tmp_path):
    """TVQA without answer_idx, TVC without descs: refused by default (naming the flag), read with
    require_answers=False as one example per question / clip, every other check kept."""
    for task in ("tvqa", "tvc"):
        shutil.copytree(FIXTURE / task, tmp_path / task)
        path = tmp_path / task / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        labelled = load_examples(load_config("tiny", ["data.source=real", f"data.root={tmp_path}",
                                                      f"data.tasks=[{task}]"]), task, "test")
        for r in rows:
            r.pop(ANSWERS[task][0])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = load_config("tiny", ["data.source=real", f"data.root={tmp_path}", f"data.tasks=[{task}]"])
        with pytest.raises(RecordError, match=rf"line 1 .*key '{ANSWERS[task][0]}' is missing \(.*--predict-only"):
            load_examples(cfg, task, "test")
        examples = load_examples(cfg, task, "test", require_answers=False)
        assert [(e.uid, e.text, e.image_ids, e.target, e.references) for e in examples] == \
            [(e.uid, e.text, e.image_ids, "", []) for e in labelled]
        rows[0]["vid_name"] = ""
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(RecordError, match=r"key 'vid_name' is an empty string"):
            load_examples(cfg, task, "test", require_answers=False)


def test_predict_only_under_deepspeed_zero3_on_two_ranks_writes_the_same_files(setup, launcher, tmp_path, h):
    """The sharded path (--deepspeed ds_configs/zero3.json, 2 ranks): the predictions and submission files of
    the single-process run, gathered on rank 0, and no eval_metrics.json."""
    _, unlabelled, run = setup
    assert evaluate(launcher, run, unlabelled, tmp_path / "one", "--predict-only") == 0
    proc = h.preloaded.run(str(h.ROOT / "launchers" / "evaluate.py"),
                           ["--adapter", str(run / "adapter"), "--split", "val", "--out", str(tmp_path / "two"),
                            "--no-progress", "--predict-only", "--deepspeed", "ds_configs/zero3.json",
                            f"data.root={unlabelled}"],
                           timeout=h.RUN_TIMEOUT_S, nproc=2, env=h.base_env(2), cwd=str(h.ROOT))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "ZeRO-3 over 2 rank(s)" in proc.stdout and "caption  2 examples" in proc.stdout
    for name in [f"predictions/{t}.jsonl" for t in TASKS] + ["submission/vqa.json", "submission/gqa.json",
                                                           "submission/nlvr2.csv", "submission/caption.json"]:
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert not (tmp_path / "two" / "eval_metrics.json").exists()
