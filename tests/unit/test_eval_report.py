"""eval_metrics.json: what its scores come from (examples per task, data settings), merging only reports
of the same data; evaluate.py's --java-metrics refused up front without Java."""

import json
from pathlib import Path

import pytest
import torch

from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.engine.evaluation import eval_settings, write_eval_report


def _predictions(out, task, n):
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"uid": str(i), "prediction": "x", "references": ["x"]}) for i in range(n)]
    (folder / f"{task}.jsonl").write_text("".join(line + "\n" for line in lines))


def _as_rank_0_of_2(monkeypatch, evaluate, stage: int) -> None:
    """evaluate.py as rank 0 of two, its sharded build (test_evaluate_sharded's) stood in for at ZeRO ``stage``."""
    from vlscale.engine import distributed
    from vlscale.engine.distributed import DistInfo
    from vlscale.modeling.vl_model import build_model

    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "init_distributed", lambda: DistInfo(0, 2, 0, cpu, "cpu", "gloo"))
    monkeypatch.setattr(distributed, "destroy", lambda: None)
    monkeypatch.setattr(evaluate, "build_sharded", lambda cfg, ds, vocab, dtype: (build_model(cfg, vocab_size=vocab),
                                                                                  None, stage))


def _tiny_adapter(tmp_path):
    """An adapter/ of the tiny preset's (untrained) model, as a run at step 2 saves it."""
    from vlscale.data import build_tokenizer
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny")
    tokenizer = build_tokenizer(cfg)
    adapter = tmp_path / "adapter"
    ckpt.save_adapter(build_model(cfg, vocab_size=len(tokenizer)), adapter, cfg, tokenizer, extra={"step": 2})
    return adapter


def test_a_report_of_other_data_replaces_rather_than_merges(tmp_path):
    """evaluate.py on all tasks, then ``--tasks caption train.eval_max_examples=2`` into the same folder kept
    the other tasks' full-split scores beside caption's 2-example one, with nothing saying so."""
    cfg = load_config("tiny")
    adapter = tmp_path / "adapter"
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, cfg, vocab_size=10, extra={"step": 2})
    full = eval_settings(cfg.to_dict())
    assert full["eval_max_examples"] is None and "tasks" not in full["data"]
    out = tmp_path / "eval_val"
    for task in ("vqa", "caption"):
        _predictions(out, task, 5)
    # the trainer's call (no settings) records the adapter's run config's: the same as evaluate.py's
    write_eval_report(out, adapter, "val", 2, {"vqa": {"vqa_score": 0.5}, "caption": {"cider": 0.7}})
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["settings"] == full and report["examples"] == {"vqa": 5, "caption": 5}

    # a subset with the same settings merges (counts too)
    _predictions(out, "vqa", 5)
    write_eval_report(out, adapter, "val", 2, {"vqa": {"vqa_score": 0.6}}, settings=full)
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["tasks"] == {"vqa": {"vqa_score": 0.6}, "caption": {"cider": 0.7}}
    assert report["examples"] == {"vqa": 5, "caption": 5}

    # fewer examples (train.eval_max_examples) or other data: replaced, not mixed
    cfg.train.eval_max_examples = 2
    _predictions(out, "caption", 2)
    write_eval_report(out, adapter, "val", 2, {"caption": {"cider": 1.6}}, settings=eval_settings(cfg.to_dict()))
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["tasks"] == {"caption": {"cider": 1.6}} and report["examples"] == {"caption": 2}
    assert report["settings"]["eval_max_examples"] == 2
    # the replaced report's vqa predictions, unscored beside this one, went with it
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["caption.jsonl"]
    cfg.train.eval_max_examples = None
    cfg.data.synthetic_eval = 500
    write_eval_report(out, adapter, "val", 2, {"vqa": {"vqa_score": 0.1}}, settings=eval_settings(cfg.to_dict()))
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["tasks"] == {"vqa": {"vqa_score": 0.1}} and report["settings"]["data"]["synthetic_eval"] == 500
    assert not (out / "predictions" / "caption.jsonl").exists()


def test_a_write_the_disk_refuses_ends_evaluate_in_one_line_naming_the_file(tmp_path, launcher, monkeypatch, capsys):
    """A full disk (a quota, a file-size limit) at the predictions' or eval_metrics.json's write was a traceback
    after the generation; now one line with the file and the reason, exit 1. Any other OSError is still raised."""
    evaluate = launcher("evaluate")
    written = tmp_path / "eval" / "predictions.partial" / "vqa.jsonl"
    measured, disk_usage = [], ckpt.shutil.disk_usage  # the free space told is the file's file system's
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda where: measured.append(where) or disk_usage(where))
    for error in (OSError(28, "No space left on device", str(written)), OSError(5, "Input/output error")):
        monkeypatch.setattr(evaluate, "evaluate_adapter", lambda *a, e=error: (_ for _ in ()).throw(e))
        with pytest.raises(SystemExit if error.errno == 28 else OSError) as failed:
            evaluate.main(["--adapter", str(tmp_path / "adapter"), "--no-progress"])
        if error.errno == 28:
            assert failed.value.code == 1
            err = capsys.readouterr().err
            assert err.startswith(f"evaluate.py: rank 0: writing the evaluation's files failed (No space left on "
                                  f"device: {written}; ") and err.count("\n") == 1, err
            assert len(measured) == 1 and measured[0] in written.parents, measured
        else:
            assert failed.value is error
    # eval_metrics.json refused after predictions/ was replaced: the line says the two do not match
    report = tmp_path / "eval" / "eval_metrics.json"
    monkeypatch.setattr(evaluate, "evaluate_adapter", lambda *a: (_ for _ in ()).throw(
        OSError(28, "No space left on device", str(report))))
    with pytest.raises(SystemExit):
        evaluate.main(["--adapter", str(tmp_path / "adapter"), "--no-progress"])
    assert (f"free on its file system); {tmp_path / 'eval' / 'predictions'} holds this evaluation's predictions, "
            "eval_metrics.json is not theirs (the earlier one, if any); rerun the same command once it can write\n"
            ) in capsys.readouterr().err


def test_java_metrics_without_java_is_refused_before_the_model_is_built(tmp_path, launcher, monkeypatch):
    from vlscale.metrics import captioning

    adapter = tmp_path / "adapter"
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, load_config("tiny"), vocab_size=10, extra={"step": 2})
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    evaluate = launcher("evaluate")
    import vlscale.modeling.vl_model as vl_model

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(vl_model, "build_model", no_build)
    with pytest.raises(RuntimeError, match=r"^--java-metrics: no 'java' on the PATH"):
        evaluate.main(["--adapter", str(adapter), "--java-metrics", "--no-progress"])


def test_the_report_records_whether_java_scored_the_captions(tmp_path, launcher, monkeypatch):
    """--java-metrics changes the caption scores (PTB tokenisation for CIDEr-D, BLEU-4, ROUGE-L; METEOR added), and
    eval_metrics.json did not say whether it was used: an evaluation with it and one without (``--tasks``) merged
    into one report. The settings now hold ``java_metrics`` and the ``precision`` the model ran in."""
    from vlscale.engine import evaluation

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    monkeypatch.setattr(evaluate, "java_metrics_problem", lambda: None)  # as on a machine with Java
    asked = []

    def scored(model, cfg, tokenizer, *, tasks, java_metrics, **kwargs):
        asked.append(java_metrics)
        return {task: {"score": 0.25 if java_metrics else 0.5} for task in tasks}
    monkeypatch.setattr(evaluation, "evaluate", scored)
    out = tmp_path / "out"

    def report(*flags):
        evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", *flags])
        return json.loads((out / "eval_metrics.json").read_text())

    with_java = report("--java-metrics")
    assert asked == [True] and with_java["settings"]["java_metrics"] is True
    assert with_java["settings"]["precision"] == "fp32"
    assert with_java["tasks"]["vqa"] == {"score": 0.25}
    without = report("--tasks", "caption")
    assert asked == [True, False] and without["settings"]["java_metrics"] is False
    assert without["tasks"] == {"caption": {"score": 0.5}}, "scored otherwise: replaced, not merged"


def test_the_report_says_which_caption_tokens_scored_when_the_ptb_tokenizer_failed(tmp_path, launcher, monkeypatch,
                                                                                    capsys):
    """--java-metrics: where coco-caption's PTB tokenizer failed at scoring time every caption metric fell back to
    Python tokens with only a log warning, and eval_metrics.json said ``"java_metrics": true``: a table made from it
    showed other numbers as coco-caption's. The report records per caption task the tokenisation its scores are of
    (``caption_tokens``) and its score line says so; a --tasks subset scored with the PTB tokens merges its own."""
    pytest.importorskip("pycocoevalcap")
    from vlscale.engine import evaluation
    from vlscale.metrics import captioning

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    monkeypatch.setattr(evaluate, "java_metrics_problem", lambda: None)  # as on a machine with Java
    monkeypatch.setattr(captioning, "java_available", lambda: True)
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res: 0.5)  # no JVM for METEOR

    def broken(predictions, references):
        raise RuntimeError("PTBTokenizer: java exited with 1")
    monkeypatch.setattr(captioning, "_ptb_tokenized", broken)
    # every example answered with its first reference: the scores are the metrics', only the decoding is skipped
    monkeypatch.setattr(evaluation, "predict_task", lambda model, tok, batches, task, **kw: [
        {"uid": str(e.uid), "prediction": e.references[0], "references": list(e.references)}
        for e in batches.examples])
    out = tmp_path / "out"
    evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", "--java-metrics",
                   "--tasks", "vqa,caption"])
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["settings"]["java_metrics"] is True and report["caption_tokens"] == {"caption": "python"}
    assert set(report["tasks"]["caption"]) == {"cider", "bleu4", "rouge_l", "meteor"}
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("  caption ")][0].endswith(
        "  (Python tokens, not coco-caption's: the PTB tokenizer failed)")
    assert not [line for line in lines if line.startswith("  vqa ")][0].endswith(")")

    monkeypatch.setattr(captioning, "_ptb_tokenized", captioning._simple_tokenized)  # as the PTB tokens, this time
    evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", "--java-metrics",
                   "--tasks", "caption"])
    report = json.loads((out / "eval_metrics.json").read_text())
    assert set(report["tasks"]) == {"vqa", "caption"} and report["caption_tokens"] == {"caption": "ptb"}
    assert "PTB tokenizer failed" not in capsys.readouterr().out


def test_evaluate_reads_each_task_s_records_once(tmp_path, launcher, monkeypatch):
    """evaluate.py reads and checks every task's records before it builds the model, and the evaluation then read
    and parsed them again (3.5 s to 5.7 s more for 100,000 VQA questions): it evaluates what the check read."""
    import vlscale.data.real as real
    import vlscale.predict
    from vlscale.engine import evaluation

    from vlscale.data import build_tokenizer

    adapter, reads, load = tmp_path / "adapter", [], real.load_real_examples
    cfg = load_config("tiny")
    ckpt.save_adapter(torch.nn.Linear(1, 1), adapter, cfg, build_tokenizer(cfg), extra={"step": 2})
    monkeypatch.setattr(real, "load_real_examples", lambda cfg, task, split, *a: reads.append(task) or
                        load(cfg, task, split, *a))
    monkeypatch.setattr(vlscale.predict, "load_trained_model", lambda *a, **k: torch.nn.Linear(1, 1))  # not built
    monkeypatch.setattr(evaluation, "predict_task", lambda model, tok, batches, task, **kw: [  # nor decoding
        {"uid": str(e.uid), "prediction": e.target, "references": list(e.references)} for e in batches.examples])
    root = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
    out = tmp_path / "out"
    assert launcher("evaluate").main(["--adapter", str(adapter), "--out", str(out), "--no-progress", "--tasks",
                                      "vqa,nlvr2", "data.source=real", f"data.root={root}"]) == 0
    assert reads == ["vqa", "nlvr2"]
    assert json.loads((out / "eval_metrics.json").read_text())["examples"] == {"vqa": 2, "nlvr2": 2}
    for extra in (["--split", "test", "train.eval_max_examples=1"], ["--predict-only"]):  # read as evaluate() asks
        reads.clear()
        assert launcher("evaluate").main(["--adapter", str(adapter), "--out", str(tmp_path / extra[0]), "--no-progress",
                                          "--tasks", "vqa,nlvr2", "data.source=real", f"data.root={root}", *extra]) == 0
        assert reads == ["vqa", "nlvr2"], extra


def test_the_report_records_the_zero_stage_and_ranks_it_ran_under(tmp_path, launcher, monkeypatch):
    """evaluate.py --deepspeed with a ZeRO-3 file evaluates a sharded model (in bf16 its linear layers round the
    logits otherwise: predictions shift slightly) on each rank's share of the examples, and eval_metrics.json did
    not say so: an evaluation of some tasks without DeepSpeed on one process merged into that report as if the
    scores were comparable. The settings now hold ``zero_stage`` (None without DeepSpeed) and ``world_size``."""
    from vlscale.engine import evaluation

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    _as_rank_0_of_2(monkeypatch, evaluate, stage=3)
    monkeypatch.setattr(evaluation, "evaluate", lambda model, cfg, tokenizer, *, tasks, world_size, **kw:
                        {task: {"score": world_size / 10} for task in tasks})
    out = tmp_path / "out"

    def report(*flags):
        assert evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", *flags]) == 0
        return json.loads((out / "eval_metrics.json").read_text())

    sharded = report("--deepspeed", "ds_configs/zero3.json")
    assert sharded["settings"]["zero_stage"] == 3 and sharded["settings"]["world_size"] == 2
    assert set(sharded["tasks"]) == set(load_config("tiny").data.tasks)
    alone = report("--tasks", "caption")
    assert alone["settings"]["zero_stage"] is None and alone["settings"]["world_size"] == 1
    assert alone["tasks"] == {"caption": {"score": 0.1}}, "run otherwise: replaced, not merged"


def test_the_trainers_test_report_records_the_settings_it_evaluated_with(tmp_path, monkeypatch):
    """train.test_eval on a --resume of a finished run with another train.eval_max_examples (a change --resume
    accepts): adapter/ is not written again, and eval_test/eval_metrics.json recorded the adapter's settings
    (eval_max_examples None: the whole split) beside scores of 3 examples, so a later evaluate.py --tasks of the
    whole split merged into that report."""
    from types import SimpleNamespace

    from vlscale.engine import trainer

    saved = load_config("tiny")
    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter", saved, vocab_size=10, extra={"step": 2})
    now = load_config("tiny", ["train.eval_max_examples=3"])

    def evaluated(run, split, predictions_dir):
        _predictions(predictions_dir.parent, "vqa", 3)
        return {"vqa": {"vqa_score": 0.5}}
    monkeypatch.setattr(trainer, "_evaluate", evaluated)
    run = SimpleNamespace(out=tmp_path, cfg=now, step=2, is_main=True, test_scores=None, stage=2,
                          dist=SimpleNamespace(world_size=1))
    trainer.run_test_evaluation(run)
    report = json.loads((tmp_path / "eval_test" / "eval_metrics.json").read_text())
    assert report["examples"] == {"vqa": 3}
    assert report["settings"] == eval_settings(now.to_dict(), zero_stage=2, world_size=1)
    assert report["settings"]["eval_max_examples"] == 3 and report["settings"]["zero_stage"] == 2


@pytest.mark.parametrize("accelerator,expected", [("cpu", "cpu"), (None, "cuda")])
def test_evaluate_without_a_launcher_follows_ds_accelerator(launcher, monkeypatch, accelerator, expected):
    """evaluate.py as one process took the GPU whenever one was visible, even under DS_ACCELERATOR=cpu, which
    every other entry point (train.py's ranks, profile_memory.py --measure) follows."""
    evaluate = launcher("evaluate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DS_ACCELERATOR"):
        monkeypatch.delenv(name, raising=False)
    if accelerator:
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_adapter", lambda args, rank, world, device, dist: seen.append(device) or 0)
    evaluate.main(["--adapter", "unused", "--no-progress"])
    assert seen == [torch.device(expected)]


def test_a_subset_merged_into_a_report_keeps_the_caption_tokens_of_the_tasks_it_keeps(tmp_path):
    """``evaluate.py --tasks vqa`` merged into a report that scored captions keeps the captions' ``caption_tokens``
    beside their scores (they said "python" and then nothing: scores of Python tokens read as coco-caption's)."""
    from vlscale.metrics.captioning import CaptionScores

    settings = {"data": {}, "precision": "fp32"}
    write_eval_report(tmp_path, tmp_path / "adapter", "val", 4,
                      {"caption": CaptionScores({"cider": 0.5}, "python")}, settings)
    write_eval_report(tmp_path, tmp_path / "adapter", "val", 4, {"vqa": {"vqa_score": 0.3}}, settings)
    report = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert report["tasks"] == {"caption": {"cider": 0.5}, "vqa": {"vqa_score": 0.3}}
    assert report["caption_tokens"] == {"caption": "python"}


def test_score_lines_put_each_tasks_headline_metric_first():
    """One line per task, x100, the task's own metric first (CIDEr for captions, whatever order the scorer gave)."""
    from vlscale.engine.evaluation import format_scores
    from vlscale.metrics.captioning import CaptionScores

    text = format_scores({"caption": CaptionScores({"bleu4": 0.25, "cider": 1.125}, "ptb"),
                          "nlvr2": {"consistency": 0.5, "accuracy": 0.75}})
    assert text.splitlines() == ["  caption  cider=112.50  bleu4=25.00", "  nlvr2    accuracy=75.00  consistency=50.00"]


def test_predicted_lines_count_one_example_in_the_singular(tmp_path):
    """evaluate.py --predict-only's summary said "1 examples"."""
    from vlscale.engine.evaluation import format_predicted

    text = format_predicted({"vqa": {"examples": 1, "submission": str(tmp_path / "submission" / "vqa.json")},
                             "gqa": {"examples": 2, "submission": str(tmp_path / "submission" / "gqa.json")}}, tmp_path)
    assert text.splitlines() == [
        f"  vqa      1 example: {tmp_path / 'predictions' / 'vqa.jsonl'}; {tmp_path / 'submission' / 'vqa.json'}",
        f"  gqa      2 examples: {tmp_path / 'predictions' / 'gqa.jsonl'}; {tmp_path / 'submission' / 'gqa.json'}"]


def test_a_task_name_longer_than_8_characters_widens_the_task_column(tmp_path):
    """A custom task named flickr30k (docs/datasets.md, "Your own task") pushed its row of the score table, and of
    the predict-only summary, one column right of the others."""
    from vlscale.data.tasks import declare_custom_tasks
    from vlscale.engine.evaluation import format_predicted, format_scores

    declare_custom_tasks({"flickr30k": {"like": "caption"}})
    text = format_scores({"vqa": {"vqa_score": 0.5}, "flickr30k": {"cider": 0.25}})
    assert text.splitlines() == ["  vqa       vqa_score=50.00", "  flickr30k cider=25.00"]
    lines = format_predicted({"vqa": {"examples": 2, "submission": "s/vqa.json"},
                              "flickr30k": {"examples": 2, "submission": "s/flickr30k.json"}}, tmp_path).splitlines()
    assert [line.index(" 2 examples") for line in lines] == [len("  flickr30k")] * 2


def test_predict_only_with_java_metrics_is_refused_on_the_command_line(launcher, capsys):
    """--java-metrics scores captions and --predict-only scores nothing: the pair is a usage error, not a run that
    silently ignores one flag."""
    with pytest.raises(SystemExit) as info:
        launcher("evaluate").parse_args(["--adapter", "a", "--predict-only", "--java-metrics"])
    assert info.value.code == 2
    assert "--java-metrics scores captions; --predict-only scores nothing" in capsys.readouterr().err


@pytest.mark.parametrize("held", ["run_summary.json", "train_log.jsonl", "checkpoints"])
def test_out_holding_any_part_of_a_training_run_is_refused(tmp_path, launcher, held):
    """A run stopped before its run_summary.json (train_log.jsonl and checkpoints/ only) is a training run's
    output_dir too: evaluate.py --out there would replace the predictions/ its metrics.json belongs to."""
    output_clash = launcher("evaluate").output_clash
    (tmp_path / held).mkdir() if held == "checkpoints" else (tmp_path / held).write_text("{}")
    for predict_only in (False, True):
        assert output_clash(tmp_path, predict_only) == (
            f"--out {tmp_path} holds a training run ({tmp_path / held}); its predictions/ belong to that run's "
            f"metrics.json and would be overwritten: choose another --out")
    assert output_clash(tmp_path / "fresh", False) is None


def test_the_default_out_and_the_tasks_asked_for(tmp_path, launcher, monkeypatch):
    """Without --out an evaluation writes <adapter's parent>/eval_<split>, --predict-only <...>/predict_<split> (so
    neither refuses the other's folder); --tasks names each task once, in the order given, however often it is
    repeated, and ``--tasks ,`` or a task the adapter was not trained on is refused before the model is built."""
    from vlscale.engine import evaluation

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    asked = []

    def scored(model, cfg, tokenizer, *, tasks, predict_only, predictions_dir, submission_dir, **kwargs):
        asked.append((tasks, predictions_dir, submission_dir))
        return {t: {"examples": 1, "submission": None} if predict_only else {"score": 0.5} for t in tasks}
    monkeypatch.setattr(evaluation, "evaluate", scored)
    assert evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", "caption,vqa, caption,"]) == 0
    assert asked == [(["caption", "vqa"], tmp_path / "eval_val" / "predictions.partial", None)]  # renamed whole
    report = json.loads((tmp_path / "eval_val" / "eval_metrics.json").read_text())
    assert report["tasks"] == {"caption": {"score": 0.5}, "vqa": {"score": 0.5}} and report["step"] == 2
    assert evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa", "--predict-only"]) == 0
    assert asked[1] == (["vqa"], tmp_path / "predict_val" / "predictions.partial",
                        tmp_path / "predict_val" / "submission.partial")  # renamed whole
    assert not (tmp_path / "predict_val" / "eval_metrics.json").exists()

    import vlscale.modeling.vl_model as vl_model

    monkeypatch.setattr(vl_model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"^--tasks ' , ' names no task; omit it for every task of the adapter"):
        evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", " , "])
    with pytest.raises(ValueError, match=r"^--tasks \['tvqa'\] were not trained by this adapter \(data\.tasks="):
        evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa,tvqa"])


def test_torchrun_without_deepspeed_evaluates_as_its_rank_of_the_group(launcher, monkeypatch):
    """``torchrun --nproc_per_node N launchers/evaluate.py`` (no --deepspeed): each process joins the group and
    evaluates as its rank of N (its share of the examples; rank 0 alone writes the report), not as N copies of rank 0
    of 1, each decoding every example and writing the same files."""
    from vlscale.engine import distributed
    from vlscale.engine.distributed import DistInfo

    evaluate = launcher("evaluate")
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "init_distributed", lambda: DistInfo(1, 2, 1, cpu, "cpu", "gloo"))
    left = []
    monkeypatch.setattr(distributed, "destroy", lambda: left.append(True))
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_adapter",
                        lambda args, rank, world, device, dist: seen.append((rank, world, dist is not None)) or 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert evaluate.main(["--adapter", "unused", "--no-progress"]) == 0
    assert seen == [(1, 2, True)] and left == [True]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert evaluate.main(["--adapter", "unused", "--no-progress"]) == 0
    assert seen[1] == (0, 1, False) and left == [True]


def test_java_metrics_needs_java_only_where_a_caption_task_is_scored(tmp_path, launcher, monkeypatch):
    """--java-metrics on a machine without Java: refused where a caption task is evaluated (its scores need the PTB
    tokenizer), not for ``--tasks vqa``, whose scores Java plays no part in."""
    from vlscale.engine import evaluation
    from vlscale.metrics import captioning

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    monkeypatch.setattr(evaluation, "evaluate", lambda model, cfg, tokenizer, *, tasks, **kw:
                        {task: {"score": 0.5} for task in tasks})
    out = tmp_path / "out"
    assert evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", "--java-metrics",
                          "--tasks", "vqa"]) == 0
    assert json.loads((out / "eval_metrics.json").read_text())["tasks"] == {"vqa": {"score": 0.5}}
    with pytest.raises(RuntimeError, match=r"^--java-metrics: no 'java' on the PATH"):
        evaluate.main(["--adapter", str(adapter), "--out", str(out), "--no-progress", "--java-metrics",
                       "--tasks", "vqa,caption"])


def test_the_deepspeed_files_stage_holds_unless_train_zero_stage_is_given_on_the_command_line(tmp_path, launcher,
                                                                                              monkeypatch):
    """evaluate.py --deepspeed zero3.json on a run trained at ZeRO-1, with another train.* override (the eval batch):
    the file's stage 3 is built, not the run's saved train.zero_stage; ``train.zero_stage=0`` given now is."""
    from vlscale.data import build_tokenizer
    from vlscale.engine import distributed, evaluation
    from vlscale.engine.distributed import DistInfo
    from vlscale.engine.trainer import zero_stage
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", ["train.zero_stage=1"])
    tokenizer = build_tokenizer(cfg)
    adapter = tmp_path / "adapter"
    ckpt.save_adapter(build_model(cfg, vocab_size=len(tokenizer)), adapter, cfg, tokenizer, extra={"step": 2})
    evaluate = launcher("evaluate")
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "init_distributed", lambda: DistInfo(0, 1, 0, cpu, "cpu", "gloo"))
    monkeypatch.setattr(distributed, "destroy", lambda: None)
    built = []

    def sharded(cfg, ds, vocab, dtype):
        built.append(zero_stage(ds))
        return build_model(cfg, vocab_size=vocab), None, zero_stage(ds)
    monkeypatch.setattr(evaluate, "build_sharded", sharded)
    monkeypatch.setattr(evaluation, "evaluate", lambda model, cfg, tokenizer, *, tasks, **kw:
                        {task: {"score": 0.5} for task in tasks})
    for override, stage in (("train.eval_batch_size=4", 3), ("train.zero_stage=0", 0)):
        assert evaluate.main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--no-progress",
                              "--tasks", "vqa", "--deepspeed", "ds_configs/zero3.json", override]) == 0
        assert built[-1] == stage, override


def test_a_report_of_an_adapter_whose_config_cannot_be_read_has_unknown_settings(tmp_path):
    """The trainer writes its report without settings: where the adapter's run config cannot be read (no adapter
    saved yet, or a config this vlscale does not read) the settings are unknown (null), not a crash after the
    evaluation."""
    out = tmp_path / "eval"
    _predictions(out, "vqa", 3)
    for adapter in (tmp_path / "no_adapter", tmp_path / "unreadable"):
        if adapter.name == "unreadable":
            adapter.mkdir()
            (adapter / ckpt.ADAPTER_CONFIG).write_text("{not json")
        path = write_eval_report(out, adapter, "val", 2, {"vqa": {"vqa_score": 0.5}})
        report = json.loads(path.read_text())
        assert report["settings"] is None and report["tasks"] == {"vqa": {"vqa_score": 0.5}}
        assert report["examples"] == {"vqa": 3}


def test_a_report_of_another_step_replaces_rather_than_merges(tmp_path):
    """Scores of the same adapter folder at another step are of other weights: not merged into one report."""
    out, settings = tmp_path / "eval", {"data": {}}
    write_eval_report(out, tmp_path / "adapter", "val", 2, {"vqa": {"vqa_score": 0.5}}, settings=settings)
    report = json.loads(write_eval_report(out, tmp_path / "adapter", "val", 4, {"gqa": {"accuracy": 0.25}},
                                          settings=settings).read_text())
    assert (report["step"], report["tasks"]) == (4, {"gqa": {"accuracy": 0.25}})


def test_predict_only_replaces_its_submission_only_once_every_task_is_written(tmp_path, launcher, monkeypatch,
                                                                               capsys):
    """--predict-only wrote each task's leaderboard file straight into submission/: a Ctrl-C after vqa's left it
    beside the earlier set's caption file, to be uploaded together. submission/ is now replaced once whole (a --tasks
    subset keeping the earlier set's other tasks, folders too: the video tasks' files are in tvqa/ ...), and the
    printed paths are the files' once renamed."""
    from vlscale.engine import evaluation

    adapter, out = _tiny_adapter(tmp_path), tmp_path / "pred"
    version, stop = [0], [False]

    def predicted(model, cfg, tokenizer, *, tasks, predictions_dir, submission_dir, **kwargs):
        done = {}
        for task in tasks:  # caption's in a folder of its own, as tvqa's is
            path = submission_dir / ("capdir/caption.json" if task == "caption" else f"{task}.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(version[0]))
            if stop[0]:
                raise KeyboardInterrupt
            done[task] = {"examples": 1, "submission": path}
        return done
    monkeypatch.setattr(evaluation, "evaluate", predicted)
    run = ["--adapter", str(adapter), "--no-progress", "--predict-only", "--out", str(out)]
    assert launcher("evaluate").main(run + ["--tasks", "vqa,caption"]) == 0
    version[0], stop[0] = 1, True
    with pytest.raises(KeyboardInterrupt):
        launcher("evaluate").main(run + ["--tasks", "vqa"])
    assert [json.loads((out / "submission" / f).read_text()) for f in ("vqa.json", "capdir/caption.json")] == [0, 0]
    version[0], stop[0] = 2, False
    capsys.readouterr()
    assert launcher("evaluate").main(run + ["--tasks", "vqa"]) == 0
    assert [p.name for p in out.iterdir()] == ["submission"]  # no .partial / .old left (the fake writes no predictions)
    assert [json.loads((out / "submission" / f).read_text()) for f in ("vqa.json", "capdir/caption.json")] == [2, 0]
    assert f"; {out / 'submission' / 'vqa.json'}\n" in capsys.readouterr().out


def test_evaluate_replaces_its_predictions_only_once_every_task_is_written(tmp_path, launcher, monkeypatch):
    """evaluate.py wrote each task's file straight into predictions/: a Ctrl-C after vqa left this run's vqa.jsonl
    beside the earlier run's caption.jsonl. Now the earlier set stays until the new one is whole, and a --tasks
    subset's set keeps the earlier set's other tasks (their scores stay in eval_metrics.json)."""
    from vlscale.engine import evaluation
    from vlscale.engine.checkpoint import LOCK_FILE
    from vlscale.files import hold_lock

    adapter, out = _tiny_adapter(tmp_path), tmp_path / "eval_val"
    for task in ("vqa", "caption"):
        _predictions(out, task, 3)

    def stopped(model, cfg, tokenizer, *, tasks, predictions_dir, **kwargs):  # stopped after vqa is written
        predictions_dir.mkdir(exist_ok=True)
        (predictions_dir / "vqa.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluation, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        launcher("evaluate").main(["--adapter", str(adapter), "--no-progress"])
    assert sorted(p.name for p in out.iterdir()) == ["predictions"]
    assert [len((out / "predictions" / f"{t}.jsonl").read_text().splitlines()) for t in ("vqa", "caption")] == [3, 3]

    def scored(model, cfg, tokenizer, *, tasks, predictions_dir, **kwargs):
        predictions_dir.mkdir(exist_ok=True)
        (predictions_dir / "vqa.jsonl").write_text("{}\n")
        return {"vqa": {"score": 0.5}}
    monkeypatch.setattr(evaluation, "evaluate", scored)
    assert launcher("evaluate").main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval_metrics.json", "predictions"]
    assert [len((out / "predictions" / f"{t}.jsonl").read_text().splitlines()) for t in ("vqa", "caption")] == [1, 3]
    (out / "predictions.partial").mkdir()  # rank 0's set being written as rank 1 ends: rank 1 touches no folder
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: {"vqa": {"score": 0.5}})
    evaluate = launcher("evaluate")
    args = evaluate.parse_args(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa"])
    lock, _ = hold_lock(out / LOCK_FILE, "rank 0")  # rank 0 holds --out's lock meanwhile: rank 1 takes none
    assert evaluate.evaluate_adapter(args, 1, 2, torch.device("cpu"), None) == 0
    lock.close()
    (out / LOCK_FILE).unlink()
    assert sorted(p.name for p in out.iterdir()) == ["eval_metrics.json", "predictions", "predictions.partial"]
    with evaluation.predictions_replaced_whole(tmp_path / "first" / "predictions", keep_others=True) as partial:
        partial.mkdir(parents=True)  # the first set in a folder: no earlier one to keep files of
        (partial / "vqa.jsonl").write_text("{}\n")
    assert [p.name for p in (tmp_path / "first" / "predictions").iterdir()] == ["vqa.jsonl"]


def test_a_second_split_predicted_into_one_out_keeps_the_first_splits_value_files(tmp_path):
    """docs/datasets.md: VALUE scores one zip of val and test, made by ``--split val --out DIR`` then ``--split test
    --out DIR``. The second replaced submission/tvqa/ (a folder the new set has too) whole: its
    tvqa_val_predictions.json was gone from the zip. A file the new set does not write is kept at any depth; one it
    writes is the new one."""
    from vlscale.engine import evaluation

    sub = tmp_path / "DIR" / "submission"
    for split in ("val", "test"):
        with evaluation.predictions_replaced_whole(sub, keep_others=True) as partial:
            (partial / "tvqa").mkdir(parents=True)
            (partial / "tvqa" / f"tvqa_{split}_predictions.json").write_text(f'{{"{split}": 1}}')
            (partial / "vqa.json").write_text(split)
    assert sorted(str(p.relative_to(sub)) for p in sub.rglob("*") if p.is_file()) == [
        "tvqa/tvqa_test_predictions.json", "tvqa/tvqa_val_predictions.json", "vqa.json"]
    assert (sub / "vqa.json").read_text() == "test"
    assert (sub / "tvqa" / "tvqa_val_predictions.json").read_text() == '{"val": 1}'


def test_the_split_asked_for_is_evaluated_reported_and_names_the_default_out(tmp_path, launcher, monkeypatch):
    """``--split test``: the test split is evaluated, eval_metrics.json says so, and the default folders are
    eval_test / predict_test (not the val split's)."""
    from vlscale.engine import evaluation

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    asked = []

    def scored(model, cfg, tokenizer, *, split, tasks, predict_only, predictions_dir, **kwargs):
        asked.append((split, predictions_dir))
        return {t: {"examples": 1, "submission": None} if predict_only else {"score": 0.5} for t in tasks}
    monkeypatch.setattr(evaluation, "evaluate", scored)
    assert evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa", "--split", "test"]) == 0
    assert asked == [("test", tmp_path / "eval_test" / "predictions.partial")]
    assert json.loads((tmp_path / "eval_test" / "eval_metrics.json").read_text())["split"] == "test"
    assert evaluate.main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa", "--split", "test",
                          "--predict-only"]) == 0
    assert asked[1] == ("test", tmp_path / "predict_test" / "predictions.partial")


def test_an_out_that_is_a_file_is_refused(tmp_path, launcher):
    (tmp_path / "out").write_text("notes")
    assert launcher("evaluate").output_clash(tmp_path / "out", False) == (
        f"--out {tmp_path / 'out'} cannot be created or written: {tmp_path / 'out'} is a file, not a folder; choose "
        f"another --out")
    # a folder under it: a NotADirectoryError traceback once the first task was decoded, not refused up front
    assert launcher("evaluate").output_clash(tmp_path / "out" / "eval", False) == (
        f"--out {tmp_path / 'out' / 'eval'} cannot be created or written: {tmp_path / 'out'} is a file, not a folder; "
        f"choose another --out")
    assert launcher("evaluate").output_clash(tmp_path / "new" / "eval", False) is None
    assert not (tmp_path / "new").exists()  # the check leaves no folder behind


@pytest.mark.parametrize("stage", [1, 3])
def test_generation_is_synced_over_the_ranks_only_under_zero3(tmp_path, launcher, monkeypatch, stage):
    """Two ranks under ZeRO-3 generate in step (each forward gathers every rank's shards); under ZeRO-1/2 every rank
    holds the whole model and generates on its own."""
    from vlscale.engine import evaluation

    adapter = _tiny_adapter(tmp_path)
    evaluate = launcher("evaluate")
    _as_rank_0_of_2(monkeypatch, evaluate, stage)
    synced = []
    monkeypatch.setattr(evaluation, "evaluate", lambda model, cfg, tokenizer, *, tasks, synced_gpus, **kw:
                        synced.append(synced_gpus) or {task: {"score": 0.5} for task in tasks})
    assert evaluate.main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--no-progress", "--tasks", "vqa",
                          "--deepspeed", "ds_configs/zero3.json"]) == 0
    assert synced == [stage == 3]


def test_the_evaluation_ds_config_drops_the_files_training_only_keys(tmp_path, launcher):
    """A training run's own DeepSpeed file (its batch sizes, clipping, optimizer and its off-load) serves evaluation
    on another number of ranks: those keys are neither checked against the run nor kept."""
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({
        "train_batch_size": 999, "train_micro_batch_size_per_gpu": 7, "gradient_accumulation_steps": 5,
        "gradient_clipping": 0.5, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    ds = launcher("evaluate").evaluation_ds_config(str(ds_file), load_config("tiny"), 2, "cpu")
    assert ds["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in ds["zero_optimization"]
    assert "optimizer" not in ds and ds["train_micro_batch_size_per_gpu"] != 7 and ds["gradient_clipping"] != 0.5


def test_an_fp16_adapter_is_evaluated_on_a_cpu_in_fp32_without_its_fp16_fingerprint(tmp_path, launcher,
                                                                                     monkeypatch, capsys):
    """fp16 has no CPU kernels: the model is built in fp32, whose frozen weights are not the fp16 run's bit for
    bit, so the run's fingerprint (of fp16 weights) is not compared with them (it would refuse every such
    evaluation as 'files changed since training'); evaluate.py and the Predictor alike."""
    from vlscale.data import build_tokenizer
    from vlscale.engine import evaluation
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", ["train.precision=fp16"])
    tokenizer = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab_size=len(tokenizer), dtype=torch.float16)
    adapter = tmp_path / "adapter"
    old = [{"versions": {"vlscale": "0.0.1"}}]  # trained by another vlscale (vlscale.provenance): a note
    ckpt.save_adapter(model, adapter, cfg, tokenizer, extra={"step": 2, "frozen": ckpt.frozen_fingerprint(model),
                                                             "provenance": old})
    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda model, cfg, tokenizer, *, tasks, float_dtype, **kw:
                        seen.append(float_dtype) or {task: {"score": 0.5} for task in tasks})
    assert launcher("evaluate").main(["--adapter", str(adapter), "--no-progress", "--tasks", "vqa"]) == 0
    assert seen == [torch.float32]
    from vlscale.predict import Predictor  # predict.py's model: the same rule

    capsys.readouterr()
    assert Predictor(adapter, device="cpu").dtype == torch.float32
    assert ": note: the adapter was trained with vlscale 0.0.1 (this is " in capsys.readouterr().err
    assert Predictor(adapter, device="cpu", batch_size=3).batch_size == 3  # the batches predict() answers in


def test_an_error_on_several_ranks_leaves_at_once(launcher, monkeypatch):
    """With WORLD_SIZE > 1 evaluate.py leaves through os._exit (a peer inside a collective would hang the process
    group's teardown); alone, through sys.exit."""
    import os

    evaluate = launcher("evaluate")
    class Exited(Exception):
        pass

    def _exit(code):
        raise Exited(code)
    monkeypatch.setattr(os, "_exit", _exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as e:
        evaluate.exit_after_error(1)
    assert e.value.args == (1,)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        evaluate.exit_after_error(1)
    assert e.value.code == 1


def test_reports_know_an_adapter_by_its_weights_not_its_path(tmp_path):
    """A run folder moved (or copied) after evaluation: ``--tasks`` on a subset there merges into the report, as
    before the move (it replaced it, the absolute path differing); an adapter trained again into the same folder
    at the same step is another adapter (it was merged with the old weights' scores)."""
    cfg, settings = load_config("tiny"), {"data": {}}
    run = tmp_path / "run"
    ckpt.save_adapter(torch.nn.Linear(2, 2), run / "adapter", cfg, vocab_size=10, extra={"step": 2})
    write_eval_report(run / "eval_val", run / "adapter", "val", 2, {"vqa": {"vqa_score": 0.5}}, settings=settings)
    moved = run.rename(tmp_path / "moved")
    report = json.loads(write_eval_report(moved / "eval_val", moved / "adapter", "val", 2,
                                          {"gqa": {"accuracy": 0.25}}, settings=settings).read_text())
    assert report["tasks"] == {"vqa": {"vqa_score": 0.5}, "gqa": {"accuracy": 0.25}}
    assert report["adapter"] == str((moved / "adapter").resolve())

    torch.manual_seed(1)
    ckpt.save_adapter(torch.nn.Linear(2, 2), moved / "adapter", cfg, vocab_size=10, extra={"step": 2})
    report = json.loads(write_eval_report(moved / "eval_val", moved / "adapter", "val", 2,
                                          {"nlvr2": {"accuracy": 0.5}}, settings=settings).read_text())
    assert report["tasks"] == {"nlvr2": {"accuracy": 0.5}}


def test_a_report_without_the_digest_or_an_adapter_without_weights_is_matched_by_path(tmp_path):
    """A report written before the digest was recorded merges a subset of the same adapter folder, as it did (it
    was replaced: no digest equals none); one with the digest, its adapter's weights file gone since, is matched by
    path too (it was a KeyError)."""
    cfg, settings, out = load_config("tiny"), {"data": {}}, tmp_path / "eval_val"
    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter", cfg, vocab_size=10, extra={"step": 2})
    path = write_eval_report(out, tmp_path / "adapter", "val", 2, {"vqa": {"vqa_score": 0.5}}, settings=settings)
    old = json.loads(path.read_text())
    del old["adapter_sha256"]  # as an older vlscale wrote it
    path.write_text(json.dumps(old))
    write_eval_report(out, tmp_path / "adapter", "val", 2, {"gqa": {"accuracy": 0.25}}, settings=settings)
    assert set(json.loads(path.read_text())["tasks"]) == {"vqa", "gqa"}
    (tmp_path / "adapter" / ckpt.ADAPTER_WEIGHTS).unlink()
    report = json.loads(write_eval_report(out, tmp_path / "adapter", "val", 2, {"nlvr2": {"accuracy": 0.5}},
                                          settings=settings).read_text())
    assert set(report["tasks"]) == {"vqa", "gqa", "nlvr2"} and "adapter_sha256" not in report


def test_a_second_evaluation_into_an_out_another_is_writing_is_refused_before_its_model_is_built(tmp_path, launcher,
                                                                                                  monkeypatch):
    """Two evaluate.py into one --out at once (the same adapter's default eval_<split>, two --tasks side by side):
    the second cleared the first's predictions.partial/ midway, and each rewrote eval_metrics.json from what it read
    before, so one's predictions or scores were lost. The --out is now locked as a run's output_dir is, and a second
    is refused, naming the holder, before its model is built."""
    import vlscale.predict
    from vlscale.engine.checkpoint import LOCK_FILE
    from vlscale.files import hold_lock

    adapter = tmp_path / "adapter"
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, load_config("tiny"), vocab_size=10, extra={"step": 2})
    out = tmp_path / "out"
    out.mkdir()
    held, _ = hold_lock(out / LOCK_FILE, "pid 4242 on here, since 12:00")  # the first evaluation, as it writes
    monkeypatch.setattr(vlscale.predict, "load_trained_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=rf"^--out {out} is being written by another process \(pid 4242 on here, "):
        launcher("evaluate").main(["--adapter", str(adapter), "--out", str(out), "--tasks", "vqa", "--no-progress"])
    held.close()


def test_a_report_names_no_digest_of_weights_a_live_run_saved_after_those_evaluated(tmp_path):
    """eval_metrics.json's adapter_sha256 was read as the report was written: of a run still training, that is the
    weights of a later save than the step the scores are of. A weights file of another step gives no digest (the
    report is known by the adapter's path); of the same step, its digest."""
    import hashlib

    cfg, adapter = load_config("tiny"), tmp_path / "adapter"
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, cfg, vocab_size=10, extra={"step": 3})  # saved meanwhile
    settings = eval_settings(cfg.to_dict())
    report = json.loads(write_eval_report(tmp_path / "out", adapter, "val", 2, {"vqa": {"s": 1.0}}, settings)
                        .read_text())
    assert report["step"] == 2 and "adapter_sha256" not in report
    report = json.loads(write_eval_report(tmp_path / "out", adapter, "val", 3, {"vqa": {"s": 1.0}}, settings)
                        .read_text())
    digest = hashlib.sha256((adapter / ckpt.ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert report["step"] == 3 and report["adapter_sha256"] == digest


def test_an_evaluation_refused_after_it_locked_its_out_removes_the_lock_and_an_out_it_made(tmp_path, launcher):
    """out_locked's end (here, --tasks refused after the lock is taken): the lock file removed, and with it an --out
    the evaluation made and left empty; an --out that was there stays."""
    adapter, made, there = tmp_path / "adapter", tmp_path / "made", tmp_path / "there"
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, load_config("tiny"), vocab_size=10, extra={"step": 2})
    there.mkdir()
    for out in (made, there):
        with pytest.raises(ValueError, match=r"^--tasks \['bogus'\] were not trained by this adapter"):
            launcher("evaluate").main(["--adapter", str(adapter), "--out", str(out), "--tasks", "bogus",
                                       "--no-progress"])
    assert not made.exists() and list(there.iterdir()) == []


def test_an_out_lock_its_holder_removed_as_it_was_taken_is_taken_again(tmp_path, launcher, monkeypatch):
    """A holder removes the lock file as it ends: an evaluation that opened the file just before then locked a file
    no longer there, and a third would lock a new one at the path beside it. out_locked locks the file there
    (vlscale.files.hold_lock takes it again)."""
    import fcntl

    from vlscale.engine.checkpoint import LOCK_FILE
    from vlscale.files import hold_lock

    out, held = tmp_path / "out", []
    out.mkdir()
    flock = fcntl.flock

    def as_the_first_ends(f, how):
        flock(f, how)
        if not held:
            (out / LOCK_FILE).unlink()  # the first evaluation's end, between this one's open and its lock
        held.append(f)

    monkeypatch.setattr(fcntl, "flock", as_the_first_ends)
    with launcher("evaluate").out_locked(out):
        monkeypatch.setattr(fcntl, "flock", flock)
        third, by = hold_lock(out / LOCK_FILE, "a third")
    assert third is None and by.startswith("evaluate.py, pid ") and len(held) == 2


def test_train_test_eval_takes_the_lock_evaluate_py_takes_on_eval_test(tmp_path, monkeypatch, launcher):
    """train.test_eval wrote RUN/eval_test/ without the lock evaluate.py takes on its --out: an `evaluate.py --adapter
    RUN/adapter --split test` (its default --out, RUN/eval_test) at the same moment shared its predictions.partial/.
    Now the training's test evaluation holds eval_test/'s lock (evaluate.py is refused meanwhile), and where another
    holds it, refuses before evaluating, every rank together, saying the training is kept."""
    from types import SimpleNamespace

    from vlscale.engine import trainer
    from vlscale.engine.checkpoint import LOCK_FILE
    from vlscale.files import hold_lock

    run = SimpleNamespace(out=tmp_path, is_main=True, step=6, cfg=load_config("tiny"), stage=3,
                          dist=SimpleNamespace(world_size=1))
    eval_test, seen = tmp_path / "eval_test", []
    eval_test.mkdir()  # a finished run's, evaluated again by a --resume

    def evaluate(run, split, predictions_dir):
        seen.append(hold_lock(eval_test / LOCK_FILE, "evaluate.py, pid 4242")[1])  # evaluate.py's try, meanwhile
        return {"vqa": {"vqa_score": 1.0}}

    monkeypatch.setattr(trainer, "_evaluate", evaluate)
    # the report is written under the lock too (eval_metrics.json: an evaluate.py's rewrite lost the other's scores)
    monkeypatch.setattr(trainer, "write_eval_report", lambda out, *a, **k: seen.append((out / LOCK_FILE).exists()))
    assert trainer.run_test_evaluation(run) == {"vqa": {"vqa_score": 1.0}}
    assert seen[0].startswith("train.py's train.test_eval, pid ") and seen[1] is True, seen
    assert not (eval_test / LOCK_FILE).exists()  # released
    held, _ = hold_lock(eval_test / LOCK_FILE, "evaluate.py, pid 4242, since 12:00")  # evaluate.py writing it
    with pytest.raises(ckpt.CheckpointError, match=rf"^{eval_test} is being written by another process \(evaluate.py, "
                                                   rf"pid 4242, since 12:00\): the test split is not evaluated; the "
                                                   rf"training is complete and checkpointed, and --resume runs"):
        trainer.run_test_evaluation(run)
    assert len(seen) == 2 and (eval_test / LOCK_FILE).exists()  # not evaluated; evaluate.py's lock left to it
    held.close()
    # rank 1 (it takes no lock) stops on rank 0's answer, naming the holder rank 0 found
    monkeypatch.setattr(trainer, "broadcast_object", lambda holder: "evaluate.py, pid 4242, since 12:00")
    run.is_main = False
    with pytest.raises(ckpt.CheckpointError, match=r"being written by another process \(evaluate.py, pid 4242, "):
        trainer.run_test_evaluation(run)
    assert len(seen) == 2
    # where rank 0 took it, rank 1 evaluates holding nothing: had it locked first, rank 0 would refuse itself
    monkeypatch.setattr(trainer, "broadcast_object", lambda holder: None)
    trainer.run_test_evaluation(run)
    assert seen[2:] == [None], seen
    held, _ = hold_lock(eval_test / LOCK_FILE, "evaluate.py, pid 4242, since 12:00")  # and so does evaluate.py's
    with launcher("evaluate").out_locked(eval_test, writer=False):
        pass
    held.close()


def test_the_digest_of_weights_that_record_no_step_is_reported_and_of_a_file_that_is_no_safetensors_none(tmp_path):
    """Weights saved before they recorded their step (their metadata: the format alone) have their digest reported,
    as they had, and so does a report of no step; a weights file that is no safetensors file (its first 8 bytes read
    as a header length of 7e18: a MemoryError; a header that is no JSON object) has none: known by its path."""
    import hashlib

    from safetensors.torch import save_file

    cfg, adapter = load_config("tiny"), tmp_path / "adapter"
    settings, weights = eval_settings(cfg.to_dict()), adapter / ckpt.ADAPTER_WEIGHTS
    ckpt.save_adapter(torch.nn.Linear(2, 2), adapter, cfg, vocab_size=10, extra={"step": 3})

    def digest(step):
        report = write_eval_report(tmp_path / "out", adapter, "val", step, {"vqa": {"s": 1.0}}, settings)
        return json.loads(report.read_text()).get("adapter_sha256"), hashlib.sha256(weights.read_bytes()).hexdigest()

    said = [digest(None)]
    save_file(torch.nn.Linear(2, 2).state_dict(), str(weights), metadata={"format": ckpt.ADAPTER_FORMAT})
    said.append(digest(3))
    big = {f"{'w' * 100}{i}": torch.zeros(1) for i in range(1000)}  # a 150 kB header (a cap of 100_000 survived)
    save_file(big, str(weights), metadata={"format": ckpt.ADAPTER_FORMAT, "step": "3"})
    said.append(digest(3))
    assert [got == sha for got, sha in said] == [True, True, True], said
    for data in (b"not safetensors", (2).to_bytes(8, "little") + b"[]"):
        weights.write_bytes(data)
        assert digest(3)[0] is None, data
