"""launchers/replicate.py end to end on a tiny budget, and the row settings behind it.

The end-to-end test trains two Table 1 rows for a few steps on a few examples (the commands replicate.py
starts, feature extraction and launchers/train.py, forked from the suite's preloaded server), checks
results.json / the Markdown table / the PNG, then reruns the command to check that finished rows are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlscale.config import load_config, save_config
from vlscale.replicate import (TABLE1_METHODS, TABLES, ReplicationError, Row, aggregate_seeds, average, get_table,
                               headline_scores, markdown_table, paper_claims, parse_seeds, plan_job, row_config,
                               row_overrides, scale_peft_widths, seed_dir, select_rows, updated_params)

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "vlscale" / "assets" / "backbones"
needs_assets = pytest.mark.skipif(not (ASSETS / "mini-bart").is_dir() or not (ASSETS / "mini-clip-rn.safetensors").exists(),
                                  reason="miniature backbones not made (python scripts/pretrain_backbones.py)")


# ----------------------------------------------------------------------------- rows and settings

def test_table1_rows_are_the_paper_presets():
    names = [r.name for r in TABLES[1].rows]
    assert names == list(TABLE1_METHODS)
    for r in TABLES[1].rows:
        assert load_config(r.peft_preset).name == f"paper/clip_bart_{r.name}"


def test_unknown_table_and_method_are_named():
    with pytest.raises(ReplicationError, match="choose one of"):
        get_table(2)
    with pytest.raises(ReplicationError, match="single_adaptr"):
        select_rows(get_table(1), ["single_adaptr"])
    # what the name may have meant (it listed the valid rows only)
    for name, hint in (("single_adapters", "single_adapters: did you mean single_adapter?"),
                       ("paper/clip_bart_single_lora", "paper/clip_bart_single_lora: that preset's row is single_lora"),
                       ("projection_only", "projection_only is a row of Table 5 (--table 5)")):
        with pytest.raises(ReplicationError, match=re.escape(f"; {hint}")):
            select_rows(get_table(1), [name])
    assert [r.name for r in select_rows(get_table(1), ["single_prompt", "full_ft"])] == ["full_ft", "single_prompt"]
    with pytest.raises(ReplicationError, match="names full_ft more than once"):  # was merged silently
        select_rows(get_table(1), ["full_ft", "single_prompt", "full_ft"])


def test_widths_scale_with_d_model_and_lora_keeps_alpha_over_rank():
    paper = load_config("paper/clip_bart_single_lora").peft.__dict__
    mini = scale_peft_widths(paper, 128)
    assert mini["lora_rank"] == round(128 * 128 / 768) == 21
    assert mini["lora_alpha"] / mini["lora_rank"] == pytest.approx(paper["lora_alpha"] / paper["lora_rank"])
    assert mini["prompt_hidden_dim"] == round(800 * 128 / 768)
    assert mini["task_embedding_dim"] == round(512 * 128 / 768)
    for kept in ("reduction_factor", "n_prompts", "phm_dim", "hypernet_projected_dim", "method", "sharing"):
        assert mini[kept] == paper[kept]
    assert scale_peft_widths(paper, 768) == paper
    narrow = scale_peft_widths(paper, 2)  # every width rounds to 0 or 1 here: none may be 0
    assert min(narrow[k] for k in ("lora_rank", "prompt_hidden_dim", "task_embedding_dim", "layer_embedding_dim",
                                   "hypernet_hidden_dim")) == 1
    assert narrow["lora_alpha"] / narrow["lora_rank"] == pytest.approx(paper["lora_alpha"] / paper["lora_rank"])


def test_row_overrides_take_the_paper_peft_section_and_the_row_switches():
    t1 = {r.name: r for r in TABLES[1].rows}
    ov = row_overrides(t1["half_shared_adapters"], feature_cache="/tmp/cache", seed=3, steps=7)
    cfg = row_config(ov)
    assert (cfg.peft.method, cfg.peft.sharing, cfg.peft.half_shared) == ("adapter", "half_shared", "up")
    assert cfg.model.backbone == "mini-bart" and cfg.model.pretrained and cfg.model.feature_source == "cache"
    assert (cfg.data.feature_cache, cfg.train.seed, cfg.train.max_steps) == ("/tmp/cache", 3, 7)
    full = row_config(row_overrides(t1["full_ft"], feature_cache="/tmp/cache"))
    assert full.peft.method == "none" and full.peft.train_lm and full.lr == pytest.approx(1e-4)
    # each row is given only the widths its method reads: every train.log said "peft.lora_rank=21 has no effect"...
    lora = row_config(row_overrides(t1["single_lora"], feature_cache="/tmp/cache"))
    assert cfg.ignored_settings() == full.ignored_settings() == lora.ignored_settings() == []
    assert (lora.peft.lora_rank, cfg.peft.reduction_factor) == (21, 8)
    # ... while a --set of a width some row decides is still refused for every row, those that do not read it too
    with pytest.raises(ReplicationError, match=r"--set peft\.lora_rank conflicts .* \(full_ft\)"):
        row_overrides(t1["full_ft"], feature_cache="/c", extra=["peft.lora_rank=4"])
    t3 = {r.name: r for r in TABLES[3].rows}
    clip = row_config(row_overrides(t3["clip_ft_single_adapter"]))  # images: no cache needed
    assert clip.model.feature_source == "images" and clip.peft.train_vision and clip.peft.method == "adapter"
    t5 = {r.name: r for r in TABLES[5].rows}
    proj = row_config(row_overrides(t5["projection_only"], feature_cache="/tmp/cache"))
    assert proj.peft.method == "none" and not proj.peft.train_layer_norms and not proj.peft.train_lm
    with pytest.raises(ReplicationError, match="feature cache"):
        row_overrides(t1["single_adapter"])
    with pytest.raises(ReplicationError, match="--set train.seed"):
        row_overrides(t1["single_adapter"], feature_cache="/c", extra=["train.seed=5"])
    # a --set that only some rows take (the PEFT weights' own rate): the row that cannot is named
    tuned = row_config(row_overrides(t1["single_adapter"], feature_cache="/c", extra=["train.peft_lr=3e-3"]))
    assert (tuned.lr, tuned.train.peft_lr) == (pytest.approx(1e-3), pytest.approx(3e-3))
    with pytest.raises(ReplicationError, match=r"row 'full_ft' with --set train\.peft_lr=3e-3: .*peft\.method=none "
                                               r".*leave this one out of --methods"):
        row_overrides(t1["full_ft"], feature_cache="/c", extra=["train.peft_lr=3e-3"])


def test_parameter_regime_of_the_miniature():
    """The paper's regime: a single adapter updates < 10 %; sharing saves parameters; full FT is 100 %."""
    t1 = {r.name: r for r in TABLES[1].rows}
    pct = {n: updated_params(row_config(row_overrides(t1[n], feature_cache="/c")))["updated_pct"]
           for n in ("full_ft", "multiple_adapters", "half_shared_adapters", "single_adapter", "single_prompt")}
    assert pct["full_ft"] == pytest.approx(100.0)
    assert pct["single_adapter"] < 10.0
    assert pct["single_adapter"] < pct["half_shared_adapters"] < pct["multiple_adapters"]
    assert pct["single_prompt"] < pct["single_adapter"]


def test_table3_counts_clip_in_its_headline_and_leaves_it_out_beside():
    """Table 3's updated % counts CLIP, trained or frozen; ``updated_pct_without_vision`` is the language side's
    (it counted a trained CLIP, equal to the headline there); the dry run prints the headline first."""
    from vlscale.replicate import headline_pct, pct_without_vision

    t3 = get_table(3)
    counts = {r.name: updated_params(row_config(row_overrides(r))) for r in t3.rows}
    frozen, trained = counts["clip_frozen_single_adapter"], counts["clip_ft_single_adapter"]
    assert pct_without_vision(trained) == pytest.approx(pct_without_vision(frozen)) == pytest.approx(frozen["updated_pct"])
    assert trained["trainable_vision"] > 0 == frozen["trainable_vision"]
    assert headline_pct(trained, t3) == trained["updated_pct_with_vision"] > 2 * pct_without_vision(trained)
    assert pct_without_vision(counts["clip_ft_lm_ft"]) == pytest.approx(100.0)
    assert headline_pct(frozen, get_table(1)) == frozen["updated_pct"]


def test_a_rows_time_adds_up_over_invocations(tmp_path, monkeypatch):
    """A row trained over two invocations (stopped, resumed) is timed over both (results.json timed the last).
    Its commands run in the working directory, where --set's relative paths were read (they ran in the checkout's)."""
    import sys
    from collections import deque

    from vlscale.replicate import Job, Runner, time_spent

    monkeypatch.chdir(tmp_path)
    assert time_spent(tmp_path) == (None, None)
    for code in (130, 0):
        job = Job(row=get_table(1).rows[0], overrides=[], run_dir=tmp_path, commands=deque(
            [("train", [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
                                           f"open('ran_here', 'w')\nraise SystemExit({code})"])]))  # busy: CPU time
        Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=lambda m: None).run()
    assert (tmp_path / "ran_here").is_file()
    lines = [json.loads(line) for line in (tmp_path / "replicate_segments.jsonl").read_text().splitlines()]
    assert [(s["phase"], s["exit"]) for s in lines] == [("train", 130), ("train", 0)]
    seconds, cpu = time_spent(tmp_path)
    assert seconds == pytest.approx(sum(s["seconds"] for s in lines)) and seconds >= 0.6
    assert cpu == pytest.approx(sum(s["cpu_s"] for s in lines), abs=0.11) and cpu >= 0.6


def _run_a_command(run_dir):
    """One quick command of a row run by the Runner, which records it in the row's segments file."""
    from collections import deque

    from vlscale.replicate import Job, Runner

    job = Job(row=get_table(1).rows[0], overrides=[], run_dir=run_dir,
              commands=deque([("eval", [sys.executable, "-c", "pass"])]))
    Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=lambda m: None).run()


def test_a_segment_cut_short_by_a_crash_is_left_out_once(tmp_path, caplog, monkeypatch):
    """The segments file was appended to without a flush: a crash mid-append left a last line cut short, and every
    later rerun reported the row as "FAILED collecting the result" (a JSONDecodeError) until the file was fixed
    by hand. Now that line is left out, said once in one line naming the file; the next append drops it first (or
    it would sit in the middle), and each line is flushed to disk."""
    import logging
    import os

    from vlscale.replicate import SEGMENTS_FILE, time_spent

    path = tmp_path / SEGMENTS_FILE
    path.write_text('{"phase": "train", "seconds": 2.0, "cpu_s": 1.5, "exit": 130}\n'
                    '{"phase": "train", "seconds": 4.0, "cpu_s": 3.0, "exit": 0}\n{"phase": "eval", "seco')
    with caplog.at_level(logging.WARNING, logger="vlscale"):
        assert time_spent(tmp_path) == (6.0, 4.5)
        assert time_spent(tmp_path) == (6.0, 4.5)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and str(path) in warned[0] and "cut short" in warned[0] and "\n" not in warned[0]
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    _run_a_command(tmp_path)  # a rerun's command
    assert str(path) in synced, "the appended line is flushed to disk"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["phase"] for s in lines] == ["train", "train", "eval"] and lines[2]["exit"] == 0
    assert time_spent(tmp_path) == (round(6.0 + lines[2]["seconds"], 1), round(4.5 + lines[2]["cpu_s"], 1))
    # a line whole but for its newline (the crash came just before it) is kept
    path.write_text('{"phase": "train", "seconds": 2.0, "cpu_s": 1.5, "exit": 0}')
    assert time_spent(tmp_path) == (2.0, 1.5)
    _run_a_command(tmp_path)
    assert [json.loads(line)["phase"] for line in path.read_text().splitlines()] == ["train", "eval"]


def test_a_malformed_segment_before_the_last_is_refused(tmp_path):
    """A line that does not read in the middle of the segments file is corruption, not a crash mid-append: refused
    naming the file and the line (a whole last line that is not a segment too)."""
    from vlscale.replicate import SEGMENTS_FILE, time_spent

    path = tmp_path / SEGMENTS_FILE
    good = '{"phase": "train", "seconds": 2.0, "cpu_s": 1.5, "exit": 0}\n'
    for text, line in [(good + '{"phase": "train", "seco\n' + good, 2), (good + good + "[1, 2]\n", 3),
                       (good + '{"phase": "eval", "seconds": "1", "cpu_s": 1}\n' + good, 2)]:
        path.write_text(text)
        with pytest.raises(ReplicationError, match=rf"{re.escape(str(path))}, line {line}: not a recorded command"):
            time_spent(tmp_path)


def test_scores_and_markdown():
    metrics = {"tasks": {"vqa": {"vqa_score": 0.5}, "gqa": {"exact_match": 0.25}, "nlvr2": {"accuracy": 0.75,
               "consistency": 0.5}, "caption": {"cider": 1.2, "bleu4": 0.3}}}
    scores = headline_scores(metrics)
    assert scores == {"vqa": 50.0, "gqa": 25.0, "nlvr2": 75.0, "caption": 120.0}
    assert average(scores) == pytest.approx(67.5)
    with pytest.raises(ReplicationError, match="lacks its metric"):
        headline_scores({"tasks": {"vqa": {"accuracy": 1.0}}})
    md = markdown_table(TABLES[1], {"single_adapter": {"updated_pct": 7.4, "scores": scores, "avg": 67.5}}, ["a note"])
    assert "| Single Adapter (`single_adapter`) | 7.40 | 50.00 | 25.00 | 75.00 | 120.00 | 67.50 |" in md
    assert md.rstrip().endswith("- a note")


def test_paper_claims_are_checked_both_ways():
    def r(avg, pct=5.0):
        return {"avg": avg, "updated_pct": pct, "scores": {}}

    good = {"full_ft": r(80.0, 100.0), "single_adapter": r(78.0, 7.4), "multiple_adapters": r(77.0, 17.0),
            "single_prompt": r(60.0)}
    checks = paper_claims(TABLES[1], good)
    assert [c["holds"] for c in checks] == [True, True, True]
    bad = dict(good, single_adapter=r(70.0, 7.4), single_prompt=r(75.0))
    assert [c["holds"] for c in paper_claims(TABLES[1], bad)] == [False, False, False]
    assert paper_claims(TABLES[1], {"full_ft": r(1.0)}) == []
    t5 = paper_claims(TABLES[5], {"projection_only": r(50.0), "projection_layer_norms": r(55.0),
                                  "single_adapter": r(54.0)})
    assert [c["holds"] for c in t5] == [True, False]


def test_plan_job_resumes_and_refuses_other_settings(tmp_path):
    from collections import deque

    from vlscale.replicate import Runner

    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    ov = row_overrides(row, feature_cache=str(tmp_path / "f"))
    run = tmp_path / "runs" / "single_adapter"
    job = plan_job(row, ov, run)
    assert [c[0] for c in job.commands] == ["train"] and "--resume" not in job.commands[0][1]
    assert "train.test_eval=true" in job.commands[0][1]  # the test split is evaluated by the training process
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step5")
    save_config(row_config([*ov, f"output_dir={run}", "train.test_eval=true"]), run / "run_config.yaml")  # train.py's
    job = plan_job(row, ov, run)
    assert "--resume" in job.commands[0][1]
    said = []  # the start of a resumed training says so (it said "train started", as a fresh one)
    job.commands = deque([("train", ["true"])])
    Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=said.append).run()
    assert said[0] == f"single_adapter: train started from its checkpoint step5 (log {run / 'train.log'})"
    (run / "train.log").unlink()
    (run / "run_summary.json").write_text(json.dumps({"completed": True}))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    assert [c[0] for c in plan_job(row, ov, run).commands] == ["eval"]
    (run / "result.json").write_text(json.dumps({"overrides": ov, "backbones": "aaaa"}))
    assert plan_job(row, ov, run, "aaaa").phase == "done"
    with pytest.raises(ReplicationError, match="other settings"):
        plan_job(row, ov[:-1] + ["train.seed=9"], run)
    with pytest.raises(ReplicationError, match="other backbone weights"):
        plan_job(row, ov, run, "bbbb")


def _trained(run: Path, overrides: list[str], step: int = 2, evaluated: bool = False) -> None:
    """What launchers/train.py leaves in a row's run folder: run_config.yaml, a checkpoint, and once
    finished run_summary.json, adapter/ and (train.test_eval) eval_test/."""
    save_config(row_config([*overrides, f"output_dir={run}", "train.test_eval=true"]), run / "run_config.yaml")
    (run / "checkpoints" / f"step{step}").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step{step}")
    if evaluated:
        (run / "run_summary.json").write_text(json.dumps({"completed": True}))
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
        (run / "eval_test").mkdir()
        (run / "eval_test" / "eval_metrics.json").write_text("{}")


def test_an_interrupted_row_is_not_resumed_under_other_settings(tmp_path):
    """A row stopped mid-training (a checkpoint in its folder) and rerun with another --steps was resumed
    under the new train.max_steps (train.py's --resume lets max_steps change, to extend a run): one result
    from two learning-rate schedules. Now refused, naming the row, the setting, both values and the ways on."""
    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    cache = str(tmp_path / "features")
    run = tmp_path / "runs" / "single_adapter"
    _trained(run, row_overrides(row, feature_cache=cache, steps=300))
    assert "--resume" in plan_job(row, row_overrides(row, feature_cache=cache, steps=300), run).commands[0][1]
    with pytest.raises(ReplicationError) as e:
        plan_job(row, row_overrides(row, feature_cache=cache, steps=100), run)
    msg = str(e.value)
    assert msg.startswith(f"row single_adapter: the interrupted training (checkpoint step2) in {run} ran with other "
                          f"settings: train.max_steps=300, this run gives train.max_steps=100")
    assert "--steps 300" in msg and "choose another --out" in msg and f"delete {run}" in msg
    assert "\n" not in msg
    # no --steps now (the preset's 2500); --seed; --set
    with pytest.raises(ReplicationError, match=r"train.max_steps=300, this run gives train.max_steps=2500"):
        plan_job(row, row_overrides(row, feature_cache=cache), run)
    with pytest.raises(ReplicationError, match=r"train.seed=0, this run gives train.seed=1 .*--seed 0"):
        plan_job(row, row_overrides(row, feature_cache=cache, steps=300, seed=1), run)
    with pytest.raises(ReplicationError, match=r"data.synthetic_train=1000, this run gives data.synthetic_train=16"):
        plan_job(row, row_overrides(row, feature_cache=cache, steps=300, extra=["data.synthetic_train=16"]), run)
    # settings that leave the model alone may differ; a run folder moved with its --out too
    assert "--resume" in plan_job(row, row_overrides(row, feature_cache=cache, steps=300,
                                                     extra=["train.log_every=7"]), run).commands[0][1]
    # a checkpoint without run_config.yaml (train.py writes it before any): its settings are unknown
    (run / "run_config.yaml").unlink()
    with pytest.raises(ReplicationError, match="has no run_config.yaml"):
        plan_job(row, row_overrides(row, feature_cache=cache, steps=300), run)


def test_a_trained_row_is_not_evaluated_or_collected_under_other_settings(tmp_path):
    """A finished training whose result.json was not written yet (stopped before or during its test
    evaluation) is only evaluated or collected by a rerun, under the rerun's settings: refused too."""
    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    cache = str(tmp_path / "features")
    run = tmp_path / "runs" / "single_adapter"
    _trained(run, row_overrides(row, feature_cache=cache, steps=300), evaluated=True)
    assert plan_job(row, row_overrides(row, feature_cache=cache, steps=300), run).phase == "collect"
    with pytest.raises(ReplicationError, match=r"the training in .* ran with other settings: train.max_steps=300, "
                                               r"this run gives train.max_steps=100.*to use it"):
        plan_job(row, row_overrides(row, feature_cache=cache, steps=100), run)
    (run / "eval_test" / "eval_metrics.json").unlink()
    assert [c[0] for c in plan_job(row, row_overrides(row, feature_cache=cache, steps=300), run).commands] == ["eval"]
    with pytest.raises(ReplicationError, match=r"train.max_steps=300, this run gives train.max_steps=100"):
        plan_job(row, row_overrides(row, feature_cache=cache, steps=100), run)
    # a finished row's result.json made with the same overrides but trained otherwise (the preset changed)
    ov = row_overrides(row, feature_cache=cache, steps=100)
    (run / "result.json").write_text(json.dumps({"overrides": ov}))
    with pytest.raises(ReplicationError, match=r"train.max_steps=300, this run gives train.max_steps=100"):
        plan_job(row, ov, run)


def _finished(out: Path, name: str, overrides: list[str], scores: dict | None = None) -> None:
    """A row's result.json as launchers/replicate.py writes it (the scores made up)."""
    from vlscale.replicate import backbone_fingerprint, write_json

    scores = scores or {"vqa": 50.0, "gqa": 40.0, "nlvr2": 50.0, "caption": 100.0}
    write_json(out / "runs" / name / "result.json",
               {"label": name, "updated_pct": 5.0, "scores": scores, "avg": average(scores), "overrides": overrides,
                "backbones": backbone_fingerprint(row_config(overrides))})


@needs_assets
def test_rows_finished_with_other_settings_are_not_kept_in_the_table(tmp_path, launcher, capsys):
    """A rerun of some rows keeps the rows finished earlier under --out in the table: made with another
    --steps, they were kept beside the new ones as if comparable. Now the rerun is refused before anything
    runs, naming the row and the setting."""
    t1 = {r.name: r for r in TABLES[1].rows}
    out = tmp_path / "table1"
    cache = str(out / "features")
    _finished(out, "single_adapter", row_overrides(t1["single_adapter"], feature_cache=cache, steps=3))
    _finished(out, "single_prompt", row_overrides(t1["single_prompt"], feature_cache=cache, steps=5))
    replicate = launcher("replicate")
    args = ["--table", "1", "--methods", "single_prompt", "--out", str(out), "--no-progress"]
    assert replicate.main(args + ["--steps", "5", "--dry-run"]) == 2  # --dry-run refuses what the run would
    dry = capsys.readouterr().err.strip()
    assert replicate.main(args + ["--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert dry == err
    assert err == (f"replicate: row single_adapter is in the table this run writes, but "
                   f"{out / 'runs' / 'single_adapter' / 'result.json'} was made with other settings: "
                   f"train.max_steps=3, this run gives train.max_steps=5; rerun with the settings it was made with "
                   f"(--steps 3) to use it, choose another --out, or delete {out / 'runs' / 'single_adapter'} to "
                   f"train the row again")
    assert not (out / "results.json").exists() and not (out / "features").exists()
    # the same settings: both rows in the table, nothing trained
    _finished(out, "single_prompt", row_overrides(t1["single_prompt"], feature_cache=cache, steps=3))
    assert replicate.main(args + ["--steps", "3", "--dry-run"]) == 0
    assert "single_prompt: updated 5.12% " in capsys.readouterr().out  # and says the row is done
    assert replicate.main(args + ["--steps", "3"]) == 0
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"single_adapter", "single_prompt"}
    # a full disk when the tables are written (after every training): one line naming the file, not a traceback
    # through write_text_atomic; results.json as it was
    before, _ = (out / "results.json").read_text(), capsys.readouterr()

    def full(fd):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", full)
        assert replicate.main(args + ["--steps", "3"]) == 1
    assert capsys.readouterr().err.startswith(f"replicate: writing the tables in {out} failed (No space left on "
                                              f"device: {out / 'results.json'}; ")
    assert (out / "results.json").read_text() == before
    # another OSError (a disk's EIO) is raised as it is, not told as a refused write

    def broken(fd):
        raise OSError(5, "Input/output error")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", broken)
        with pytest.raises(OSError, match="Input/output error"):
            replicate.main(args + ["--steps", "3"])
    assert (out / "results.json").read_text() == before
    # the same rows under a moved --out (their overrides name the old feature cache), asked for with the
    # step count as a --set and a logging setting added: still the same settings, kept (each was refused)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    capsys.readouterr()
    assert replicate.main(["--table", "1", "--methods", "single_prompt", "--out", str(moved), "--no-progress",
                           "--set", "train.log_every=7", "--set", "train.max_steps=3", "--dry-run"]) == 0, \
        capsys.readouterr().err
    assert replicate.main(["--table", "1", "--methods", "single_prompt", "--out", str(moved), "--no-progress",
                           "--steps", "4", "--dry-run"]) == 2
    assert "train.max_steps=3, this run gives train.max_steps=4" in capsys.readouterr().err


@needs_assets
def test_an_interrupted_row_under_other_steps_is_refused_before_anything_runs(tmp_path, launcher, capsys):
    t1 = {r.name: r for r in TABLES[1].rows}
    out = tmp_path / "table1"
    run = out / "runs" / "single_adapter"
    _trained(run, row_overrides(t1["single_adapter"], feature_cache=str(out / "features"), steps=3))
    args = ["--table", "1", "--methods", "single_adapter", "--out", str(out), "--no-progress"]
    assert launcher("replicate").main([*args, "--steps", "5", "--dry-run"]) == 2
    assert "ran with other settings: train.max_steps=3, this run gives train.max_steps=5" in capsys.readouterr().err
    assert launcher("replicate").main([*args, "--steps", "3", "--dry-run"]) == 0  # resumed, and said so
    assert ("single_adapter: updated 7.40% (with CLIP 4.51%), 157,632 of 2,129,472 parameters, lr 0.001; train: "
            in capsys.readouterr().out) and (run / "checkpoints").is_dir()
    code = launcher("replicate").main([*args, "--steps", "5"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"replicate: row single_adapter: the interrupted training (checkpoint step2) in {run} ran with other " \
           f"settings: train.max_steps=3, this run gives train.max_steps=5" in err
    assert not (out / "features").exists() and not (run / "train.log").exists()  # nothing started


# ----------------------------------------------------------------------------- several seeds

def test_seeds_are_parsed_and_named_when_wrong():
    assert parse_seeds("3") == [3] and parse_seeds(4) == [4]
    assert parse_seeds("0,1,2") == parse_seeds("0-2") == [0, 1, 2]
    assert parse_seeds("5, 0-1") == [5, 0, 1]
    for bad, said in (("x", "'x' is not a seed"), ("-1", "'-1' is not a seed"), ("3-1", "'3-1' is not a seed"),
                      ("1-0", "'1-0' is not a seed"),  # an empty range, not no seeds
                      ("0-", "'0-' is not a seed"), ("-", "'-' is not a seed"),  # "0-" ran seed 0 alone
                      ("0,,1", "'' is not a seed"), ("0-2,1", "seed 1 is given twice")):
        with pytest.raises(ReplicationError, match=f"--seed {re.escape(bad)}: {re.escape(said)}"):
            parse_seeds(bad)
    assert len(parse_seeds("0-998,5000")) == 1000  # MAX_SEEDS
    for bad, count in (("0-999,5000", 1001), ("0-100000000", 100000001)):  # the latter planned for minutes
        with pytest.raises(ReplicationError, match=f"--seed {bad}: {count} seeds, at most 1000"):
            parse_seeds(bad)
    assert seed_dir(Path("/o"), 3, [3]) == Path("/o") and seed_dir(Path("/o"), 3, [1, 3]) == Path("/o/seed3")


def test_rows_over_seeds_are_averaged_with_their_spread():
    def r(avg, **scores):
        return {"label": "x", "updated_pct": 7.4, "scores": scores, "avg": avg, "overrides": ["o"], "cpu_seconds": 1}

    per_seed = {0: {"full_ft": r(200.0, vqa=60.0, gqa=340.0), "single_adapter": r(190.0, vqa=50.0, gqa=330.0),
                    "single_prompt": r(10.0, vqa=0.0, gqa=20.0)},
                1: {"full_ft": r(220.0, vqa=80.0, gqa=360.0), "single_adapter": r(216.0, vqa=72.0, gqa=360.0)}}
    rows, partial = aggregate_seeds(per_seed)
    assert list(rows) == ["full_ft", "single_adapter"] and partial == ["single_prompt"]
    single = rows["single_adapter"]
    assert single["scores"] == {"vqa": 61.0, "gqa": 345.0} and single["avg"] == 203.0
    assert single["avg_sd"] == pytest.approx(18.384776, rel=1e-6)  # the sample sd of 190 and 216
    assert single["scores_sd"]["vqa"] == pytest.approx(15.556349, rel=1e-6)
    assert single["avg_by_seed"] == {"0": 190.0, "1": 216.0}
    assert single["updated_pct"] == 7.4 and "overrides" not in single and "cpu_seconds" not in single
    md = markdown_table(TABLES[1], rows)
    assert "| Single Adapter (`single_adapter`) | 7.40 | 61.00 | 345.00 | 203.00 ± 18.38 |" in md
    # the claim on the means (203 / 210 = 96.7 %), each seed's ratio beside it
    (claim,) = [c for c in paper_claims(TABLES[1], rows) if "97%" in c["claim"]]
    assert claim["value"] == "96.7% of full FT at 7.40% updated; per seed 95.0%, 98.2%" and not claim["holds"]
    assert aggregate_seeds({4: per_seed[0]})[0]["single_adapter"]["avg_sd"] == 0.0


@needs_assets
def test_a_replication_over_seeds_tabulates_each_seed_and_their_mean(tmp_path, launcher, capsys):
    """Rows finished under --out/seed<S>/ (no training here): each seed's table in its folder, the table over
    the seeds in --out; a seed not yet run is planned beside the finished ones; one --out does not mix a
    one-seed replication with one over seeds."""
    t1 = {r.name: r for r in TABLES[1].rows}
    out = tmp_path / "table1"
    cache = str(out / "features")
    for seed, (full, single) in {0: (200.0, 188.0), 1: (240.0, 236.0)}.items():
        for name, avg in (("full_ft", full), ("single_adapter", single)):
            _finished(out / f"seed{seed}", name, row_overrides(t1[name], feature_cache=cache, seed=seed, steps=3),
                      {"vqa": avg, "gqa": avg})
    replicate = launcher("replicate")
    args = ["--table", "1", "--methods", "full_ft,single_adapter", "--steps", "3", "--out", str(out), "--no-progress"]
    assert replicate.main(args + ["--seed", "0-1"]) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert "2 rows x 2 seeds (4 already done)" in printed and "0 of 4 trainings run now" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["partial_rows"] == []
    single = data["methods"]["single_adapter"]
    assert (single["avg"], single["avg_by_seed"]) == (212.0, {"0": 188.0, "1": 236.0})
    assert single["avg_sd"] == pytest.approx(33.941125, rel=1e-6)
    assert "| Single Adapter (`single_adapter`) | 5.00 | 212.00 | 212.00 | 212.00 ± 33.94 |" in \
        (out / "table1.md").read_text()
    assert "per seed 94.0%, 98.3%" in data["paper_claims"][0]["value"]
    for seed, avg in ((0, 188.0), (1, 236.0)):  # each seed's own table, as a one-seed run writes it
        own = json.loads((out / f"seed{seed}" / "results.json").read_text())
        assert own["seed"] == seed and own["methods"]["single_adapter"]["avg"] == avg
        assert (out / f"seed{seed}" / "table1.md").exists()
    # another seed: planned (trained), the finished ones kept
    assert replicate.main(args + ["--seed", "0-2", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in plan] == [f"{n} (seed {s})" for s in (0, 1, 2) for n in
                                                      ("full_ft", "single_adapter")]
    assert [("done: its result is kept" in line) for line in plan] == [True] * 4 + [False] * 2
    assert f"output_dir={out / 'seed2' / 'runs' / 'single_adapter'}" in plan[-1] and "train.seed=2" in plan[-1]
    # ... and run: each seed's own results.json lists the rows run now for that seed only (a stand-in Runner
    # finishes them), the table over the seeds all of them
    class FinishingRunner:
        def __init__(self, jobs, *args, **kwargs):
            self.jobs = jobs

        def run(self):
            for job in self.jobs:
                if job.phase != "done":
                    _finished(out / f"seed{job.seed}", job.row.name, job.overrides, {"vqa": 220.0, "gqa": 220.0})
                    job.phase = "done"

    import vlscale.replicate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlscale.replicate, "Runner", FinishingRunner)
        mp.setattr(replicate, "make_feature_cache", lambda *a, **k: None)
        assert replicate.main(args + ["--seed", "0-2"]) == 0, capsys.readouterr().err[-3000:]
    assert "2 of 6 trainings run now" in capsys.readouterr().out
    ran = {seed: json.loads((out / f"seed{seed}" / "results.json").read_text())["invocations"][-1]["rows_run_now"]
           for seed in (0, 1, 2)}
    assert ran == {0: [], 1: [], 2: ["full_ft", "single_adapter"]}
    over = json.loads((out / "results.json").read_text())
    assert over["seeds"] == [0, 1, 2] and over["invocations"][-1]["rows_run_now"] == [
        "full_ft (seed 2)", "single_adapter (seed 2)"]
    # one seed into a folder of several, and several into a one-seed folder: refused
    assert replicate.main(args + ["--seed", "0"]) == 2
    assert "holds a replication over several seeds (seed0, seed1, seed2)" in capsys.readouterr().err
    _finished(tmp_path / "one", "single_adapter", row_overrides(t1["single_adapter"], feature_cache=cache, steps=3))
    assert replicate.main(["--table", "1", "--methods", "single_adapter", "--out", str(tmp_path / "one"),
                           "--seed", "0,1", "--steps", "3"]) == 2
    assert "holds a one-seed replication" in capsys.readouterr().err


@needs_assets
def test_methods_are_split_on_commas_and_naming_none_is_refused(tmp_path, launcher, capsys):
    """--methods ignores blanks around and between its commas ("single_prompt, ," is the one row); one that names
    no row at all is refused in one line, not taken as every row of the table."""
    replicate = launcher("replicate")
    args = ["--table", "1", "--out", str(tmp_path / "out"), "--steps", "3", "--no-progress", "--dry-run"]
    assert replicate.main([*args, "--methods", "single_prompt, ,"]) == 0, capsys.readouterr().err
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["single_prompt"]
    assert replicate.main([*args, "--methods", " , "]) == 2
    assert capsys.readouterr().err.strip() == ("replicate: --methods ' , ' names no row; omit it for every row of "
                                               "the table")


@needs_assets
def test_a_failed_row_exits_1_and_the_default_out_is_the_tables(tmp_path, launcher, capsys, monkeypatch):
    """Without --out the rows go to runs/replicate/table<N> of the checkout; a row that failed makes the exit code 1
    and is named with its error and log (the table is still written); a row finished earlier under the folder and
    not run now stays in the table, and the run says so (a stand-in Runner: nothing trains)."""
    import vlscale.replicate

    replicate = launcher("replicate")
    monkeypatch.setattr(replicate, "ROOT", tmp_path)  # the checkout whose runs/ the default --out is in
    monkeypatch.setattr(vlscale.replicate, "ROOT", vlscale.replicate.ROOT)  # main() points it at replicate.ROOT
    out = tmp_path / "runs" / "replicate" / "table5"
    t5 = {r.name: r for r in TABLES[5].rows}
    earlier, failing = list(t5)[:2]
    _finished(out, earlier, row_overrides(t5[earlier], feature_cache=str(out / "features"), steps=3))

    class FailingRunner:
        def __init__(self, jobs, *args, **kwargs):
            self.jobs = jobs

        def run(self):
            for job in self.jobs:
                job.phase, job.error, job.log = "failed", "exit 1", out / "runs" / job.row.name / "train.log"

    monkeypatch.setattr(vlscale.replicate, "Runner", FailingRunner)
    monkeypatch.setattr(replicate, "make_feature_cache", lambda *a, **k: None)
    assert replicate.main(["--table", "5", "--methods", failing, "--steps", "3", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"replicate: failed rows: {failing} (exit 1; log "
                                    f"{out / 'runs' / failing / 'train.log'})")
    assert f"replicate: the table also holds ['{earlier}'], finished earlier under {out}" in captured.out
    assert "replicate: 0 of 1 trainings run now, 1 failed, in " in captured.out  # it said "1 of 1 ... run now"
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {earlier}
    assert (out / "table5.md").exists()


@needs_assets
def test_an_interrupted_row_exits_130_and_a_one_seed_run_records_its_rows(tmp_path, launcher, capsys, monkeypatch):
    """A one-seed run's results.json lists the rows run now in its invocation; a row whose training a signal stopped
    makes the exit code 130 and is named, with the command to resume (a stand-in Runner: nothing trains)."""
    import vlscale.replicate

    out = tmp_path / "table1"
    done, stopped = "single_adapter", "single_prompt"

    class InterruptingRunner:
        def __init__(self, jobs, *args, **kwargs):
            self.jobs = jobs

        def run(self):
            for job in self.jobs:
                if job.row.name == done:
                    _finished(out, done, job.overrides)
                    job.phase = "done"
                else:
                    job.phase = "interrupted"

    monkeypatch.setattr(vlscale.replicate, "Runner", InterruptingRunner)
    replicate = launcher("replicate")
    monkeypatch.setattr(replicate, "make_feature_cache", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)  # the command recorded names replicate.py as it runs from here
    code = replicate.main(["--table", "1", "--methods", f"{done},{stopped}", "--steps", "3", "--out", str(out),
                           "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 130, err
    assert "replicate: 1 of 2 trainings run now, 1 interrupted, in " in printed
    assert f"replicate: interrupted rows: {stopped} (their trainings were stopped by a signal" in err
    assert f"rerun the same command to resume them ({out})" in err
    data = json.loads((out / "results.json").read_text())
    assert data["invocations"][-1]["rows_run_now"] == [done, stopped] and set(data["methods"]) == {done}
    assert data["invocations"][-1]["command"].startswith(f"python {ROOT / 'launchers' / 'replicate.py'} --table 1 ")


@needs_assets
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_replicate_stopped_by_a_signal_exits_128_plus_it(tmp_path, launcher, capsys, monkeypatch, signum):
    """Ctrl-C (130), SIGTERM (143, as train.py's) or SLURM's SIGUSR1 warning (138; it ended replicate.py at once, its
    trainings orphaned to their parent-death SIGTERM): the status a scheduler reads; SIGTERM's was 130."""
    import vlscale.replicate
    from vlscale.log import Interrupted

    class StoppedRunner:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            raise Interrupted(signum) if signum != signal.SIGINT else KeyboardInterrupt

    monkeypatch.setattr(vlscale.replicate, "Runner", StoppedRunner)
    replicate = launcher("replicate")
    monkeypatch.setattr(replicate, "make_feature_cache", lambda *a, **k: None)
    out = tmp_path / "table1"
    code = replicate.main(["--table", "1", "--methods", "single_adapter", "--steps", "3", "--out", str(out),
                           "--no-progress"])
    assert code == 128 + signum
    assert f"replicate: interrupted ({signal.Signals(signum).name}); rerun the same command to resume ({out})" in (
        capsys.readouterr().err)


def test_rows_run_as_their_own_jobs(monkeypatch):
    """Launcher variables of the calling process (run under torchrun, an MPI job...) do not reach a row's
    commands, which are one-process jobs each."""
    from vlscale.replicate import subprocess_env

    for var, value in (("RANK", "3"), ("WORLD_SIZE", "8"), ("MASTER_PORT", "29500"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(var, value)
    env = subprocess_env(2)
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"} & set(env)
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"


# ----------------------------------------------------------------------------- end to end

@needs_assets
def test_tiny_replication_end_to_end(tmp_path, launcher, preloaded, monkeypatch, capsys):
    """The first run in this process, the commands it starts (the feature extraction, each row's training) each
    forked from the suite's preloaded server instead of a new interpreter (tests/fixtures/preloaded_relay.py stands
    in for it: the same command, environment and exit code); the reruns, which train nothing: the first from the
    command line (forked too), the other in this process."""
    from preloaded import IMPORT_TIME_VARS

    out = tmp_path / "table1"
    args = ["--table", "1", "--methods", "single_adapter,single_prompt", "--steps", "3", "--out", str(out),
            "--no-progress", "--set", "data.synthetic_train=16", "--set", "data.synthetic_eval=4",
            "--set", "train.eval_batch_size=8"]
    real_popen, relayed = subprocess.Popen, []

    def popen(cmd, **kw):  # python launchers/<script> ...: relayed
        if cmd[0] != sys.executable or Path(cmd[1]).parent != ROOT / "launchers":
            return real_popen(cmd, **kw)
        assert {k: kw["env"].get(k) for k in IMPORT_TIME_VARS} == {k: preloaded.env.get(k) for k in IMPORT_TIME_VARS}
        relayed.append(Path(cmd[1]).name)
        return real_popen([sys.executable, str(ROOT / "tests" / "fixtures" / "preloaded_relay.py"),
                           preloaded.sock_path, *cmd[1:]], **kw)

    replicate = launcher("replicate")
    with monkeypatch.context() as mp:
        mp.setattr(subprocess, "Popen", popen)
        assert replicate.main(args) == 0, capsys.readouterr().err[-3000:]
    assert relayed == ["extract_features.py", "train.py", "train.py"]

    data = json.loads((out / "results.json").read_text())
    assert data["table"] == 1 and set(data["methods"]) == {"single_adapter", "single_prompt"}
    for name, r in data["methods"].items():
        assert set(r["scores"]) == {"vqa", "gqa", "nlvr2", "caption"}
        assert all(0.0 <= s <= 1000.0 for s in r["scores"].values())
        assert r["avg"] == pytest.approx(sum(r["scores"].values()) / 4)
        assert 0.0 < r["updated_pct"] < 10.0
        assert (out / "runs" / name / "eval_test" / "eval_metrics.json").exists()
        log = [json.loads(line) for line in (out / "runs" / name / "train_log.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in log] == [1, 2, 3]
    assert data["methods"]["single_prompt"]["updated_pct"] < data["methods"]["single_adapter"]["updated_pct"]
    md = (out / "table1.md").read_text()
    assert "| Single Adapter (`single_adapter`) |" in md and "| Single Prompt (`single_prompt`) |" in md
    png = out / "table1.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumable: a rerun finds both rows done and trains nothing
    before = {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in data["methods"]}
    start = time.time()
    proc = preloaded.run(str(ROOT / "launchers" / "replicate.py"), args, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 rows (2 already done)" in proc.stdout
    assert {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in data["methods"]} == before
    assert json.loads((out / "results.json").read_text())["methods"].keys() == data["methods"].keys()
    assert time.time() - start < 120
    # a rerun of one row keeps the other finished row in the table (it was dropped from results.json and the md)
    one = [a if a != "single_adapter,single_prompt" else "single_prompt" for a in args]
    assert replicate.main(one) == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "results.json").read_text())["methods"].keys() == data["methods"].keys()
    assert "| Single Adapter (`single_adapter`) |" in (out / "table1.md").read_text()


def test_sigterm_stops_the_running_trainings(tmp_path):
    """SIGTERM to replicate.py ends its trainings as Ctrl-C does (they checkpoint on SIGTERM); it used to
    leave them running, orphaned. (This process's own SIGTERM handler, while the test runs, fails the test
    instead of ending the suite if the Runner installs none.)"""
    import os
    import signal
    import sys
    import threading
    from collections import deque

    from vlscale.replicate import Job, Runner

    def unhandled(signum, frame):
        raise AssertionError("the Runner left SIGTERM unhandled")

    job = Job(row=get_table(1).rows[0], overrides=[], run_dir=tmp_path,
              commands=deque([("train", [sys.executable, "-c", "import time; time.sleep(20)"])]))
    original = signal.signal(signal.SIGTERM, unhandled)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.1, echo=lambda m: None).run()
        assert job.proc.poll() == -signal.SIGTERM  # the training got SIGTERM and ended
        assert json.loads((tmp_path / "replicate_segments.jsonl").read_text())["exit"] == -signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        timer.cancel()  # a failure before it fired: no SIGTERM into the rest of the run
        signal.signal(signal.SIGTERM, original)
        if job.proc is not None and job.proc.poll() is None:
            job.proc.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_replicate_leaves_no_training_running(tmp_path):
    """SIGKILL to replicate.py (or its crash) left its trainings running, orphaned: its rerun's trainings of those
    rows FAILED on their output_dir's lock (found in h140's user audit). Now each gets SIGTERM when it ends
    (train.py checkpoints on it). The Runner runs in a process of its own, without torch (its env stubbed)."""
    import os
    import signal
    import textwrap

    def alive(pid):  # neither ended nor a zombie its new parent has yet to reap
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import sys, os
        from collections import deque
        from pathlib import Path
        import vlscale.replicate as r
        r.subprocess_env, r.visible_gpus = lambda threads: dict(os.environ), lambda: []
        child = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
        job = r.Job(row=r.TABLES[1].rows[0], overrides=[], run_dir=Path({str(tmp_path)!r}),
                    commands=deque([("train", [sys.executable, "-c", child])]))
        r.Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.1, echo=print).run()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runner = subprocess.Popen([sys.executable, "-c", script], env=env)
    child = None
    try:
        deadline = time.time() + 20
        while child is None and time.time() < deadline and runner.poll() is None:
            time.sleep(0.05)
            child = int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text() else None
        assert child is not None, "the stand-in training did not start"
        runner.kill()
        runner.wait()
        deadline = time.time() + 5
        while time.time() < deadline and alive(child):
            time.sleep(0.05)
        assert not alive(child), "the training outlived replicate.py"
    finally:
        if runner.poll() is None:
            runner.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_training_stopped_alone_by_a_signal_is_interrupted_not_failed(tmp_path, capsys):
    """A training that exits 130 / 143 / 138 (train.py after a checkpoint on SIGINT / SIGTERM / SIGUSR1 sent to it
    alone), or that SIGUSR1 killed before train.py's handler was in place (-10, as -2 / -15), is an interrupted row a
    rerun resumes, not a FAILED one; another exit code is still a failure."""
    import sys
    from collections import deque

    from vlscale.replicate import Job, Runner

    rows = get_table(1).rows
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)"  # before train.py's handler: -10
    jobs = [Job(row=rows[i], overrides=[], run_dir=tmp_path / str(i),
                commands=deque([("train", [sys.executable, "-c", code if isinstance(code, str) else
                                           f"raise SystemExit({code})"])]))
            for i, code in enumerate((130, 143, 138, killed, 3))]
    for job in jobs:
        job.run_dir.mkdir()
    jobs.append(Job(row=rows[5], overrides=[], run_dir=tmp_path / "5", phase="done"))  # a rerun's row done before
    said = []
    Runner(jobs, 2, 1, on_done=lambda j: None, progress=True, poll_s=0.05, echo=said.append).run()
    assert [j.phase for j in jobs] == ["interrupted", "interrupted", "interrupted", "interrupted", "failed", "done"]
    out, err = capsys.readouterr()  # its bar in a log file: whole lines (tqdm's in place of progress_bar survived)
    assert "\r" not in err and err.splitlines()[-1].startswith("trainings") and "6/6 [" in err, err
    # the done row counts from the start
    assert err.splitlines()[0].startswith("trainings:  17%|") and "1/6 [" in err, err
    assert "interrupted (train.log stopped by a signal (exit 130)); a rerun resumes it\n" in out  # tqdm.write's stdout


def test_its_lines_reach_a_log_file_when_written_as_the_bars_do(tmp_path, monkeypatch, launcher):
    """`replicate.py ... > log 2>&1`: the bars (stderr) went out at once, its own lines (stdout, block-buffered in a
    file) at exit, so the log read: both bar lines, then the header and every row's "train started" and "done"
    (measured, table 5, two rows). Its stdout is line-buffered: each line is in the log as it is written."""
    import io

    log = tmp_path / "log"
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(open(log, "wb")))  # as Python opens a redirected stdout
    args = ["--table", "5", "--methods", "projection_only", "--out", str(tmp_path / "t5"), "--dry-run"]
    assert launcher("replicate").main(args) == 0
    assert log.read_text().startswith("projection_only: updated "), "still in stdout's buffer"
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a stream with no reconfigure (a Jupyter kernel's) is left be
    assert launcher("replicate").main(args[:3] + ["bogus"] + args[4:]) == 2  # a refused row: its line, no traceback


def test_sigterm_while_the_feature_cache_is_made_stops_the_extraction(tmp_path, monkeypatch, launcher):
    """SIGTERM during make_feature_cache ended replicate.py and left extract_features.py running, orphaned
    (Ctrl-C gave a traceback): now the extraction is stopped and KeyboardInterrupt reaches main's handler."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    replicate = launcher("replicate")
    started, cwds = [], []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # the extraction, stood in for by a sleeping process
        assert kw["preexec_fn"] is not None  # it ends with replicate.py, however that ends (SIGKILL: orphaned)
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(30)"], **kw)
        started.append(proc)
        cwds.append(kw.get("cwd"))
        return proc

    def unhandled(signum, frame):  # the timer's SIGTERM fails the test, not the whole pytest run
        raise AssertionError("make_feature_cache left SIGTERM unhandled")

    monkeypatch.setattr(replicate.subprocess, "Popen", popen)
    original = signal.signal(signal.SIGTERM, unhandled)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            replicate.make_feature_cache([], tmp_path / "features", 1, "fp", print)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, original)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
    assert len(started) == 1 and started[0].poll() == -signal.SIGTERM
    assert cwds == [None]  # it runs in the working directory, where --set's relative paths were checked


def test_an_out_that_is_a_file_is_one_line(tmp_path, launcher, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("kept")
    assert launcher("replicate").main(["--table", "1", "--out", str(a_file), "--dry-run"]) == 2  # was a traceback
    assert (f"replicate: --out {a_file} cannot be created or written: {a_file} is a file, not a folder"
            in capsys.readouterr().err)
    # a folder under it: a NotADirectoryError traceback from the feature cache's mkdir
    assert launcher("replicate").main(["--table", "1", "--methods", "single_adapter", "--out", str(a_file / "t1")]) == 2
    assert (f"replicate: --out {a_file / 't1'} cannot be created or written: {a_file} is a file, not a folder"
            in capsys.readouterr().err)
    assert a_file.read_text() == "kept"
    # a second replicate.py into an --out in use: it cleared the first's rows before their first checkpoint
    import os

    from vlscale.replicate import lock_out

    held = lock_out(tmp_path / "t5")
    args = ["--table", "5", "--methods", "projection_only", "--out", str(tmp_path / "t5"), "--no-progress"]
    assert launcher("replicate").main(args) == 2
    assert (f"replicate: {tmp_path / 't5'} is in use by another replicate.py (pid {os.getpid()}, since "
            in capsys.readouterr().err) and not (tmp_path / "t5" / "runs").exists()
    held.close()


def test_a_refused_set_leaves_no_out_behind(tmp_path, launcher, capsys):
    """A mistyped --set key was refused after --out's lock was taken: a new --out was left holding only
    .replicate.lock. The rows' settings are checked before the lock, which alone makes --out."""
    out = tmp_path / "t1"
    assert launcher("replicate").main(["--table", "1", "--methods", "single_adapter", "--set", "train.peft_lrr=3e-3",
                                       "--out", str(out)]) == 2
    assert "unknown key train.peft_lrr; did you mean 'peft_lr'?" in capsys.readouterr().err
    assert not out.exists()


def test_parallel_jobs_share_out_the_gpus(tmp_path, monkeypatch):
    """Each job is a one-process run on its first visible GPU: on a machine with several, every parallel job
    ran on GPU 0 and the others idled. Jobs now get the least used GPU (CUDA_VISIBLE_DEVICES), kept for
    all their commands."""
    import sys
    from collections import deque

    from vlscale import replicate
    from vlscale.replicate import Job, Runner

    monkeypatch.setattr(replicate, "visible_gpus", lambda: ["2", "5"])
    rows = get_table(1).rows
    show = [sys.executable, "-c", "import os, time; print('GPU', os.environ.get('CUDA_VISIBLE_DEVICES')); "
                                  "time.sleep(0.3)"]
    jobs = [Job(row=rows[i], overrides=[], run_dir=tmp_path / str(i),
                commands=deque([("train", show), ("eval", show)])) for i in range(3)]
    Runner(jobs, 2, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=lambda m: None).run()
    seen = [[line for line in (j.run_dir / "train.log").read_text().splitlines() + (j.run_dir / "eval.log")
             .read_text().splitlines() if line.startswith("GPU")] for j in jobs]
    assert [j.phase for j in jobs] == ["done"] * 3
    assert seen[0] == ["GPU 2", "GPU 2"] and seen[1] == ["GPU 5", "GPU 5"]  # the two first run side by side
    assert seen[2][0] == seen[2][1] and seen[2][0] in ("GPU 2", "GPU 5")
    monkeypatch.setattr(replicate, "visible_gpus", lambda: ["0"])  # one GPU (or none): the environment as it was
    job = Job(row=rows[0], overrides=[], run_dir=tmp_path / "one", commands=deque([("train", show)]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    Runner([job], 1, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=lambda m: None).run()
    assert "GPU 7" in (job.run_dir / "train.log").read_text()


def test_a_truncated_result_or_stamp_is_refused_in_one_line(tmp_path, launcher, capsys):
    """A row's result.json, --out's results.json or the feature cache's stamp cut short (a crash or a power loss
    mid-write; the stamp was written in place, with no flush) ended a rerun in a JSONDecodeError traceback: for
    results.json after every training had run, with no table written. Now each is refused before anything runs,
    naming the file and what to do; the stamp and table<N>.md are written whole or not at all."""
    import os

    from vlscale.replicate import check_layout, check_result, write_outputs

    row = TABLES[1].rows[0]
    run = tmp_path / "runs" / row.name
    run.mkdir(parents=True)
    (run / "result.json").write_text('{"label": "full_ft", "scores": {"vqa": 5')
    with pytest.raises(ReplicationError, match=rf"^{run / 'result.json'} is not valid JSON \(.*\): cut short by a "
                                               rf"crash\? Delete it: a rerun collects the row again from {run}"):
        check_result(row, [], run)
    (tmp_path / "results.json").write_text('{"table": 1, "invocations": [')
    with pytest.raises(ReplicationError, match=rf"^{tmp_path / 'results.json'} is not valid JSON \(.*\): cut "
                                               r"short by a crash\? Delete it: a rerun writes it again"):
        check_layout(tmp_path, [0])

    cache = tmp_path / "features"
    cache.mkdir()
    (cache / "replicate_backbones.json").write_text("")
    stamp = cache / "replicate_backbones.json"
    with pytest.raises(SystemExit, match=rf"^replicate: {stamp} is not valid JSON \(.*\): cut short by a crash\? "
                                         rf"Delete {cache}: which CLIP weights made it is unknown$"):
        launcher("replicate").make_feature_cache([], cache, 1, "fp", print)

    # written through a flushed temporary file renamed into place: a crash leaves the old file or the new one
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(Path(dst).name)
        return real_replace(src, dst)

    import vlscale.files
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlscale.files.os, "replace", replace)
        write_outputs(TABLES[1], tmp_path / "new", {}, {})
        (cache / "replicate_backbones.json").unlink()
        mp.setattr(launcher("replicate").subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            launcher("replicate").make_feature_cache([], cache, 1, "fp", print)
    assert {"results.json", "table1.md", "replicate_backbones.json"} <= set(renamed)
    assert json.loads((cache / "replicate_backbones.json").read_text()) == {"backbones": "fp"}


def test_paper_claims_hold_at_their_bounds_and_compare_the_best_prompt():
    """The claims' own words at their edges: >= 97 % of full fine-tuning holds at 97 %, < 10 % updated fails at
    10 %; prompts *below* every adapter fails on a tie, a single adapter that *does not lose* holds on one; a
    Table 5 addition that *improves* fails on a tie. The best prompt row is the one compared, not any."""
    def r(avg, pct=5.0):
        return {"avg": avg, "updated_pct": pct, "scores": {}}

    def holds(table, results):
        return [c["holds"] for c in paper_claims(TABLES[table], results)]

    assert holds(1, {"full_ft": r(100.0, 100.0), "single_adapter": r(97.0, 9.99)}) == [True]
    assert holds(1, {"full_ft": r(100.0, 100.0), "single_adapter": r(97.0, 10.0)}) == [False]
    tie = {"single_adapter": r(70.0), "multiple_adapters": r(70.0), "single_prompt": r(70.0)}
    assert holds(1, tie) == [False, True]
    best_prompt_above = {"single_adapter": r(70.0), "multiple_prompts": r(71.0), "single_prompt": r(50.0)}
    checks = paper_claims(TABLES[1], best_prompt_above)
    assert [c["holds"] for c in checks] == [False] and "best prompt multiple_prompts 71.00" in checks[0]["value"]
    assert holds(5, {"projection_only": r(50.0), "projection_layer_norms": r(50.0)}) == [False]


def test_a_task_some_seed_lacks_is_left_out_of_the_mean():
    """A row's mean over seeds covers the tasks every seed scored; one seed's extra task is not averaged with
    the others' missing one (a KeyError before any table was written, had it been)."""
    def r(avg, **scores):
        return {"label": "x", "updated_pct": 7.4, "scores": scores, "avg": avg}

    rows, partial = aggregate_seeds({0: {"full_ft": r(50.0, vqa=40.0, gqa=60.0)}, 1: {"full_ft": r(40.0, vqa=40.0)}})
    assert rows["full_ft"]["scores"] == {"vqa": 40.0} and rows["full_ft"]["avg"] == 45.0 and partial == []


def test_a_training_stopped_early_is_resumed_not_evaluated(tmp_path):
    """A training stopped by a signal writes its adapter and a run_summary.json with ``completed: false``: the
    rerun resumes it from its checkpoint; evaluating that adapter would put a short training in the table."""
    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    ov = row_overrides(row, feature_cache=str(tmp_path / "features"), steps=300)
    run = tmp_path / "runs" / "single_adapter"
    _trained(run, ov)
    (run / "run_summary.json").write_text(json.dumps({"completed": False, "steps": 2}))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (cmd,) = plan_job(row, ov, run).commands
    assert cmd[0] == "train" and "--resume" in cmd[1]


def test_a_run_stopped_before_its_first_checkpoint_is_cleared_but_not_on_a_dry_run(tmp_path):
    """A row's folder without a checkpoint is cleared before it trains afresh, its command logs kept (they say
    why the earlier attempt stopped); --dry-run plans the same and removes nothing."""
    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    ov = row_overrides(row, feature_cache=str(tmp_path / "features"), steps=300)
    run = tmp_path / "runs" / "single_adapter"
    (run / "tensorboard").mkdir(parents=True)
    for name in ("train.log", "eval.log", "train_log.jsonl", "run_config.yaml"):
        (run / name).write_text("x\n")
    before = sorted(p.name for p in run.iterdir())
    (cmd,) = plan_job(row, ov, run, dry_run=True).commands
    assert cmd[0] == "train" and "--resume" not in cmd[1] and sorted(p.name for p in run.iterdir()) == before
    (cmd,) = plan_job(row, ov, run).commands
    assert cmd[0] == "train" and "--resume" not in cmd[1]
    assert sorted(p.name for p in run.iterdir()) == ["eval.log", "train.log"]


def test_a_training_ended_by_the_signal_itself_is_interrupted_not_failed(tmp_path):
    """A training the signal ends before train.py handles it (SIGTERM during start-up: exit -15, or SIGINT's -2)
    is interrupted too: a rerun resumes or restarts it, as after 130 / 143."""
    import signal
    import sys
    from collections import deque

    from vlscale.replicate import Job, Runner

    rows = get_table(1).rows
    jobs = [Job(row=rows[i], overrides=[], run_dir=tmp_path / str(i), commands=deque([(
        # the default disposition, so the signal itself ends the process: the child inherits pytest's SIGINT
        # disposition, and where that is "ignored" (so it was once in a full CI run; what set it is not known)
        # Python installs no handler and the child ran on to exit 0 ("done")
        "train", [sys.executable, "-c", f"import os, signal; signal.signal({int(sig)}, signal.SIG_DFL); "
                                        f"os.kill(os.getpid(), {int(sig)})"])]))
        for i, sig in enumerate((signal.SIGTERM, signal.SIGINT))]
    for job in jobs:
        job.run_dir.mkdir()
    said = []
    Runner(jobs, 2, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=said.append).run()
    assert [j.phase for j in jobs] == ["interrupted", "interrupted"], said
    assert any(f"stopped by a signal (exit {-signal.SIGTERM})" in m for m in said)


def test_a_truncated_results_json_of_any_seed_is_refused_before_anything_runs(tmp_path):
    """Over several seeds each seed<S>/results.json is read at the end as --out's is: one cut short is refused
    up front, naming it, not after the trainings."""
    from vlscale.replicate import check_layout

    check_layout(tmp_path, [0, 1])
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "results.json").write_text('{"table": 1, "methods": {')
    with pytest.raises(ReplicationError, match=rf"^{tmp_path / 'seed1' / 'results.json'} is not valid JSON"):
        check_layout(tmp_path, [0, 1])


@pytest.mark.parametrize("flag", ["--steps", "--parallel", "--threads-per-run"])
def test_counts_of_zero_or_less_are_refused_naming_the_flag(flag, launcher, capsys):
    """--steps 0 (no training), --parallel 0 (no job ever starts) and --threads-per-run 0 are refused by the
    command line, naming the flag and the value; 1 is the smallest taken."""
    replicate = launcher("replicate")
    for value in ("0", "-2"):
        with pytest.raises(SystemExit) as stop:
            replicate.parse_args(["--table", "1", flag, value])
        assert stop.value.code == 2 and f"{flag} {value} must be > 0" in capsys.readouterr().err
    assert getattr(replicate.parse_args(["--table", "1", flag, "1"]), flag[2:].replace("-", "_")) == 1


def test_invocations_are_appended_to_the_earlier_ones(tmp_path, launcher):
    """results.json keeps every invocation's command, rows, wall and CPU time: a rerun appends its own."""
    replicate = launcher("replicate")
    first = replicate.invocation_log(tmp_path, "python launchers/replicate.py --table 1", ["a"], 61.04, 120.26, 2, 1)
    assert [{k: v for k, v in i.items() if k != "finished"} for i in first] == [
        {"command": "python launchers/replicate.py --table 1", "rows_run_now": ["a"], "elapsed_s": 61.0,
         "cpu_s": 120.3, "parallel": 2, "threads_per_run": 1}]
    (tmp_path / "results.json").write_text(json.dumps({"invocations": first}))
    second = replicate.invocation_log(tmp_path, "again", [], 1.0, 0.5, 1, 4)
    assert second[0] == first[0] and len(second) == 2 and second[1]["command"] == "again"


def test_a_feature_cache_of_other_clip_weights_or_a_failed_extraction_stops_the_run(tmp_path, monkeypatch, launcher):
    """The cache's stamp names the CLIP weights that made it: other weights are refused, naming the cache (its
    features would feed every row the wrong vision); the same weights extract (resuming); an extraction that
    fails stops the replication with its exit code and its log's last lines."""
    import subprocess

    replicate = launcher("replicate")
    cache = tmp_path / "features"
    cache.mkdir()
    (cache / "replicate_backbones.json").write_text(json.dumps({"backbones": "old"}))
    ran = []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # the extraction, stood in for by a process exiting with 3
        ran.append(cmd)
        return real_popen([sys.executable, "-c", "print('extraction broke'); raise SystemExit(3)"], **kw)

    monkeypatch.setattr(replicate.subprocess, "Popen", popen)
    with pytest.raises(SystemExit, match=rf"^replicate: the feature cache {cache} was made with other CLIP weights"):
        replicate.make_feature_cache([], cache, 1, "new", print)
    assert not ran
    with pytest.raises(SystemExit, match=r"^replicate: feature extraction failed \(exit 3\); last lines of") as stop:
        replicate.make_feature_cache(["data.synthetic_train=8"], cache, 1, "old", print)
    assert "extraction broke" in str(stop.value)
    assert len(ran) == 1 and ran[0][-1] == "data.synthetic_train=8"


# ----------------------------------------------------------------------------- rarer inputs (mutation audit)

def test_widths_round_to_nearest_and_a_rank_of_zero_keeps_its_alpha():
    """Scaled widths round to the nearest integer (11 x 128 / 768 = 1.83 is 2, not 1); a section with LoRA rank 0
    (no LoRA) keeps its lora_alpha rather than dividing by zero; a table number that is not a number is named."""
    section = {"lora_rank": 11, "lora_alpha": 44.0, "prompt_hidden_dim": 17, "task_embedding_dim": 5,
               "layer_embedding_dim": 1, "hypernet_hidden_dim": 23}
    scaled = scale_peft_widths(section, 128)
    assert {k: scaled[k] for k in section} == {"lora_rank": 2, "lora_alpha": 8.0, "prompt_hidden_dim": 3,
                                               "task_embedding_dim": 1, "layer_embedding_dim": 1,
                                               "hypernet_hidden_dim": 4}
    assert scale_peft_widths(dict(section, lora_rank=0), 128)["lora_alpha"] == 44.0
    with pytest.raises(ReplicationError, match=r"--table 'one': choose one of \[1, 3, 5\]"):
        get_table("one")


@needs_assets
def test_a_rows_result_takes_the_last_validation_and_the_run_summary(tmp_path):
    """make_result: the test split's headline scores, the validation scores of the last evaluation (not the first),
    the run's steps and step time, and the timings and settings it was made with."""
    from vlscale.replicate import backbone_fingerprint, make_result

    row = {r.name: r for r in TABLES[1].rows}["single_adapter"]
    ov = row_overrides(row, feature_cache=str(tmp_path / "features"), steps=3)
    run = tmp_path / "run"
    (run / "eval_test").mkdir(parents=True)
    (run / "eval_test" / "eval_metrics.json").write_text(json.dumps({"tasks": {"vqa": {"vqa_score": 0.5},
                                                                              "gqa": {"exact_match": 0.25}}}))
    (run / "metrics.json").write_text(json.dumps([{"tasks": {"vqa": {"vqa_score": 0.1}}},
                                                  {"tasks": {"vqa": {"vqa_score": 0.3}}}]))
    (run / "run_summary.json").write_text(json.dumps({"completed": True, "steps": 3, "step_time_s": 0.25}))
    r = make_result(row, TABLES[1], ov, run, 12.5, 20.0)
    assert (r["scores"], r["avg"], r["split"]) == ({"vqa": 50.0, "gqa": 25.0}, 37.5, "test")
    assert (r["val_scores"], r["val_avg"]) == ({"vqa": 30.0}, 30.0)
    assert (r["steps"], r["step_time_s"], r["train_eval_seconds"], r["cpu_seconds"]) == (3, 0.25, 12.5, 20.0)
    assert r["overrides"] == ov and r["backbones"] == backbone_fingerprint(row_config(ov))
    with pytest.raises(ReplicationError, match=r"eval_metrics\.json has no per-task scores: keys \['tasks'\]"):
        headline_scores({"tasks": {}})


def test_tables_and_claims_over_rows_of_unequal_tasks_and_a_zero_baseline(tmp_path):
    """A task only some rows scored is a column, '-' where a row lacks it; the per-seed ratios of the 97 % claim
    are left out where full fine-tuning scored 0 in a seed (not a ZeroDivisionError); the notes name the rows
    left out and only the invocations that ran rows."""
    from vlscale.replicate import write_outputs

    rows = {"full_ft": {"updated_pct": 100.0, "scores": {"vqa": 10.0, "caption": 30.0}, "avg": 20.0,
                        "avg_by_seed": {"0": 0.0, "1": 40.0}},
            "single_adapter": {"updated_pct": 5.0, "scores": {"vqa": 20.0}, "avg": 20.0,
                               "avg_by_seed": {"0": 10.0, "1": 30.0}}}
    md = markdown_table(TABLES[1], rows)
    assert "| Method | Updated params (%) | VQA | COCO cap. (CIDEr) | Avg |" in md
    assert "| Single Adapter (`single_adapter`) | 5.00 | 20.00 | - | 20.00 |" in md
    (claim,) = [c for c in paper_claims(TABLES[1], rows) if "97%" in c["claim"]]
    assert claim["value"] == "100.0% of full FT at 5.00% updated" and claim["holds"]
    inv = {"command": "python launchers/replicate.py --table 1", "elapsed_s": 90.0, "cpu_s": 150.0, "parallel": 2}
    (tmp_path / "table1.png").write_bytes(b"an earlier invocation's plot")  # of rows no longer in results.json
    meta = {"partial_rows": ["single_prompt"], "invocations": [dict(inv, rows_run_now=["full_ft"]),
                                                               dict(inv, command="again", rows_run_now=[])]}
    assert write_outputs(TABLES[1], tmp_path, {}, meta)["plot"] == "no results to plot"
    assert not (tmp_path / "table1.png").exists()
    notes = (tmp_path / "table1.md").read_text()
    assert "- Left out: single_prompt (not finished for every seed)." in notes
    assert ("- `python launchers/replicate.py --table 1`: 1.5 min wall, 2 trainings at a time, 2.5 CPU-minutes, "
            "for full_ft.") in notes and "`again`" not in notes


def test_check_layout_counts_only_seed_folders_with_runs(tmp_path):
    """A folder named seed* without runs/ (notes, a seed's folder before any row ran) is not a replication over
    seeds: a one-seed run may use --out."""
    from vlscale.replicate import check_layout

    (tmp_path / "seed_notes").mkdir()
    (tmp_path / "seed3").mkdir()
    check_layout(tmp_path, [0])
    (tmp_path / "seed3" / "runs").mkdir()
    with pytest.raises(ReplicationError, match=r"holds a replication over several seeds \(seed3\)"):
        check_layout(tmp_path, [0])


def test_settings_are_read_from_the_adapter_where_run_config_yaml_is_gone(tmp_path):
    """A row whose run_config.yaml is gone is checked against the run config its adapter records."""
    from vlscale.config import flat_settings
    from vlscale.replicate import trained_settings

    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    cfg = row_config(row_overrides(row, feature_cache=str(tmp_path / "features"), steps=7))
    assert trained_settings(tmp_path) is None
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"run_config": cfg.to_dict()}))
    saved = trained_settings(tmp_path)
    assert saved == flat_settings(cfg.to_dict()) and saved["train.max_steps"] == 7


def test_job_environment_gpus_status_and_a_failed_collection(tmp_path, monkeypatch):
    """Each row's command finds vlscale first on PYTHONPATH and the inherited entries after it, one thread for MKL
    as for OpenMP; CUDA_VISIBLE_DEVICES's entries are the GPUs, blanks dropped; more threads per run than CPUs
    still runs one training at a time; a running job's status is its last logged step; a result that cannot be
    collected fails its row, and the other rows are collected."""
    import os
    from collections import deque

    import vlscale.engine.distributed as distributed
    from vlscale import replicate
    from vlscale.replicate import Job, Runner, default_parallel, run_status, subprocess_env, visible_gpus

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = subprocess_env(3)
    assert env["PYTHONPATH"] == str(replicate.ROOT) + os.pathsep + "/elsewhere"
    assert env["MKL_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "3" and env["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setattr(distributed, "local_device_type", lambda: "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1, 3,")
    assert visible_gpus() == ["1", "3"]
    monkeypatch.setattr(distributed, "usable_cpu_count", lambda: 2)
    assert default_parallel(4) == 1
    monkeypatch.setattr(replicate, "visible_gpus", lambda: [])

    rows = get_table(1).rows
    job = Job(row=rows[0], overrides=[], run_dir=tmp_path / "a", phase="train")
    job.run_dir.mkdir()
    (job.run_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.25}\n')
    assert run_status(job) == "full_ft: step 2 loss 1.250"
    jobs = [Job(row=rows[i], overrides=[], run_dir=tmp_path / str(i),
                commands=deque([("eval", [sys.executable, "-c", "pass"])])) for i in range(2)]

    def on_done(j):
        if j is jobs[0]:
            raise ValueError("no eval_metrics.json")

    said = []
    Runner(jobs, 1, 1, on_done=on_done, progress=False, poll_s=0.05, echo=said.append).run()
    assert [j.phase for j in jobs] == ["failed", "done"] and jobs[0].error == "ValueError: no eval_metrics.json"
    assert "full_ft: FAILED collecting the result: ValueError: no eval_metrics.json" in said


def test_a_result_of_other_settings_names_the_first_and_counts_the_rest(tmp_path, monkeypatch):
    """check_result's refusal names the first differing setting and how many more there are (the others named);
    a new segments file is made durable with its folder."""
    from vlscale import replicate
    from vlscale.replicate import SEGMENTS_FILE, check_result, record_segment, write_json

    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    write_json(tmp_path / "result.json", {"overrides": ["train.max_steps=3", "train.seed=0", "lr=0.001"]})
    with pytest.raises(ReplicationError, match=r"row single_adapter: .*result\.json was made with other settings: "
                                               r"lr=0\.001, this run gives lr=0\.002 \(and 2 more: train\.max_steps, "
                                               r"train\.seed\); rerun with the settings it was made with to use it"):
        check_result(row, ["train.max_steps=4", "train.seed=1", "lr=0.002"], tmp_path)
    synced = []
    monkeypatch.setattr(replicate, "fsync_path", synced.append)
    for _ in range(2):
        record_segment(tmp_path / SEGMENTS_FILE, {"phase": "train", "seconds": 1.0, "cpu_s": 1.0, "exit": 0})
    assert synced == [tmp_path]


@needs_assets
def test_the_backbone_fingerprint_covers_the_lm_only_where_the_run_loads_it():
    """A run that builds its language model from scratch (model.pretrained=false) is fingerprinted by its CLIP
    weights alone; one that loads the pretrained LM by both."""
    from vlscale.replicate import backbone_fingerprint

    pretrained, scratch = row_config([]), row_config(["model.pretrained=false"])
    assert backbone_fingerprint(scratch) == backbone_fingerprint(pretrained, vision_only=True)
    assert backbone_fingerprint(pretrained) != backbone_fingerprint(scratch)


# ----------------------------------------------------------------------------- mutation audit, round 2

def test_table3_and_table5_rows_train_what_their_labels_say():
    """Each Table 3 / 5 row trains the parts its label names and no other: CLIP where it is 'fine-tuned', the whole
    of BART or only its adapters, and Table 5's visual projection, then layer norms, then adapter. (The updated %
    alone let a row that lost its CLIP switch, took another preset or kept the adapter pass.)"""
    from vlscale.modeling.vl_model import build_model
    from vlscale.peft.trainable import parameter_groups

    lm = {"lm", "bias", "layer_norm", "layer_norm_bias", "projection"}
    adapter = {"peft", "layer_norm", "layer_norm_bias", "projection"}
    expected = {3: {"clip_frozen_lm_ft": lm, "clip_ft_lm_ft": lm | {"vision"},
                    "clip_frozen_single_adapter": adapter, "clip_ft_single_adapter": adapter | {"vision"}},
                5: {"projection_only": {"projection"}, "projection_layer_norms": {"projection", "layer_norm",
                                                                                  "layer_norm_bias"},
                    "single_adapter": adapter}}
    for number, rows in expected.items():
        table = get_table(number)
        assert [r.name for r in table.rows] == list(rows)
        for row in table.rows:
            groups = parameter_groups(build_model(row_config(row_overrides(row, feature_cache="/c")), device="meta"))
            trained = {g for g, params in groups.items() if any(p.requires_grad for _, p in params)}
            assert trained == rows[row.name], (number, row.name, trained)
            if "lm" in trained:  # fine-tuned: every weight of BART
                assert all(p.requires_grad for _, p in groups["lm"]), row.name


@needs_assets
def test_a_table3_rows_result_counts_clip_in_its_updated_pct_and_its_totals(tmp_path):
    """make_result's updated_pct is the table's headline: with CLIP for Table 3 (CLIP runs in the model, frozen here),
    without it for Table 1 (cached features); trainable_params / total_params are the model's own counts, CLIP in
    them where the model holds it."""
    from vlscale.replicate import make_result

    run = tmp_path / "run"
    (run / "eval_test").mkdir(parents=True)
    (run / "eval_test" / "eval_metrics.json").write_text(json.dumps({"tasks": {"vqa": {"vqa_score": 0.5}}}))
    t3 = {r.name: r for r in TABLES[3].rows}["clip_frozen_single_adapter"]
    ov = row_overrides(t3, steps=3)
    counts = updated_params(row_config(ov))
    r = make_result(t3, TABLES[3], ov, run, None)
    assert r["updated_pct"] == r["updated_pct_with_vision"] == counts["updated_pct_with_vision"] < counts["updated_pct"]
    assert r["updated_pct_without_vision"] == pytest.approx(counts["updated_pct"])  # CLIP frozen: the language side's
    assert (r["trainable_params"], r["total_params"]) == (counts["trainable"], counts["total"])
    assert counts["total"] > counts["total_without_vision"]  # guard: CLIP is in this model
    t1 = {r.name: r for r in TABLES[1].rows}["single_adapter"]
    ov1 = row_overrides(t1, feature_cache=str(tmp_path / "features"), steps=3)
    r1 = make_result(t1, TABLES[1], ov1, run, None)
    assert r1["updated_pct"] == updated_params(row_config(ov1))["updated_pct"] > r1["updated_pct_with_vision"]


def test_the_markdown_tables_rule_has_a_cell_per_column_and_the_note_says_whether_clip_counts(tmp_path):
    """The rule under the header has one cell per column (with one fewer, Markdown renders no table at all); the
    note under a table says how its updated % counts CLIP: Table 3 includes it, Tables 1 and 5 leave it out."""
    from vlscale.replicate import write_outputs

    rows = {"single_adapter": {"updated_pct": 5.0, "scores": {"vqa": 20.0, "gqa": 30.0}, "avg": 25.0}}
    head, rule, row = markdown_table(TABLES[1], rows).splitlines()[2:5]
    assert head == "| Method | Updated params (%) | VQA | GQA | Avg |"
    assert rule == "|---|---:|---:|---:|---:|"
    assert row.count("|") == head.count("|") == rule.count("|")
    said = {1: "all parameters except CLIP's (features precomputed).", 3: "all parameters including CLIP's.",
            5: "all parameters except CLIP's (features precomputed)."}
    for number, note in said.items():
        write_outputs(TABLES[number], tmp_path / str(number), {}, {})
        md = (tmp_path / str(number) / f"table{number}.md").read_text()
        assert f"- Updated params: trainable / {note}" in md, md
        assert md.count("- Updated params:") == 1


def test_a_plot_the_disk_refuses_leaves_the_earlier_one_and_no_half_written_file(tmp_path, monkeypatch):
    """A full disk while the PNG is written: the earlier table1.png as it was, the half-written table1.tmp.png
    removed (it was left beside it), the error raised (write_outputs' caller reports it)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from vlscale.replicate import plot

    (tmp_path / "table1.png").write_bytes(b"earlier plot")

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"half a PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError, match="No space left on device"):
        plot(TABLES[1], {"single_prompt": {"updated_pct": 0.5, "avg": 40.0}}, tmp_path / "table1.png")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("table1.png", b"earlier plot")]

    def interrupted(self, fname, *args, **kwargs):  # Ctrl-C while it writes: replicate.py's own stop
        Path(fname).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot(TABLES[1], {"single_prompt": {"updated_pct": 0.5, "avg": 40.0}}, tmp_path / "table1.png")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("table1.png", b"earlier plot")]


def test_the_plot_puts_each_row_at_its_updated_pct_and_average_with_its_spread(tmp_path, monkeypatch):
    """One point per row (in the table's order) at (updated %, average score), on a log x axis, named in the legend
    with both figures; an error bar of ± the spread over seeds where a row has one; the PNG written whole."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from vlscale.replicate import plot

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to be read
    results = {"single_prompt": {"updated_pct": 0.5, "avg": 40.0},
               "full_ft": {"updated_pct": 100.0, "avg": 60.0, "avg_sd": 2.5}}
    try:
        assert plot(TABLES[1], results, tmp_path / "table1.png") is None
        (fig,) = figures
        ax = fig.axes[0]
        assert [c.get_offsets().tolist() for c in ax.collections if hasattr(c, "get_offsets")
                and not hasattr(c, "get_segments")] == [[[100.0, 60.0]], [[0.5, 40.0]]]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full_ft (100.00 %, 60.0 ± 2.5)",
                                                                        "single_prompt (0.50 %, 40.0)"]
        assert ax.get_xscale() == "log"
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert [[seg.tolist() for seg in c.lines[2][0].get_segments()] for c in bars] == [[[[100.0, 57.5],
                                                                                          [100.0, 62.5]]]]
    finally:
        for fig in figures:
            close(fig)
    assert (tmp_path / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table1.png"]


def test_the_runner_runs_at_most_parallel_trainings_at_once(tmp_path):
    """--parallel N: N trainings at a time and never more (3 rows at 2: two, the third once one has ended);
    --parallel 1 runs them one after the other."""
    from collections import deque

    from vlscale.replicate import Job, Runner

    rows = get_table(1).rows
    span = [sys.executable, "-c", "import time; t = time.time(); time.sleep(0.8); print('SPAN', t, time.time())"]
    for parallel, n in ((2, 3), (1, 2)):
        jobs = [Job(row=rows[i], overrides=[], run_dir=tmp_path / f"{parallel}-{i}", commands=deque([("train", span)]))
                for i in range(n)]
        Runner(jobs, parallel, 1, on_done=lambda j: None, progress=False, poll_s=0.05, echo=lambda m: None).run()
        assert [j.phase for j in jobs] == ["done"] * n
        spans = [tuple(float(v) for v in next(line for line in (j.run_dir / "train.log").read_text().splitlines()
                                              if line.startswith("SPAN")).split()[1:]) for j in jobs]
        at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
        assert at_once == parallel, (parallel, spans)


def test_a_finished_row_is_evaluated_on_the_test_split_where_its_result_is_read(tmp_path):
    """A row trained but not evaluated gets one command: evaluate.py on its adapter, the test split, written to
    eval_test/ (where make_result reads the scores)."""
    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    ov = row_overrides(row, feature_cache=str(tmp_path / "features"), steps=300)
    run = tmp_path / "runs" / "single_adapter"
    _trained(run, ov)
    (run / "run_summary.json").write_text(json.dumps({"completed": True}))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    ((kind, cmd),) = plan_job(row, ov, run).commands
    assert kind == "eval" and Path(cmd[1]).name == "evaluate.py"
    args = dict(zip(cmd[2::], cmd[3::]))
    assert (args["--adapter"], args["--split"], args["--out"]) == (str(run / "adapter"), "test", str(run / "eval_test"))


def test_a_finished_row_is_kept_under_other_logging_saving_and_folder_settings(tmp_path):
    """Where a row ran, how often it logged and saved leave its model and scores alone: its result.json is used; a
    setting that changes the training is not."""
    from vlscale.replicate import check_result, write_json

    row = Row("single_adapter", "Single Adapter", "paper/clip_bart_single_adapter")
    write_json(tmp_path / "result.json", {"overrides": ["train.max_steps=3", "output_dir=/old/run",
                                                        "train.save_every=500", "train.log_every=10"]})
    check_result(row, ["train.max_steps=3", "output_dir=/new/run", "train.save_every=1", "train.log_every=7"], tmp_path)
    with pytest.raises(ReplicationError, match=r"train\.max_steps=3, this run gives train\.max_steps=4"):
        check_result(row, ["train.max_steps=4", "train.save_every=1"], tmp_path)
    # a row made when every row was given every method's widths (peft.lora_rank=21 on an adapter row), with its
    # run_config.yaml: the same training
    run = tmp_path / "old"
    ov = row_overrides(row, feature_cache="/c", steps=3)
    old = [*ov, "peft.lora_rank=21", "peft.n_prompts=40"]
    write_json(run / "result.json", {"overrides": old})
    save_config(row_config([*old, f"output_dir={run}", "train.test_eval=true"]), run / "run_config.yaml")
    check_result(row, ov, run)
    with pytest.raises(ReplicationError, match="peft.reduction_factor=8, this run gives peft.reduction_factor=4"):
        check_result(row, [*ov, "peft.reduction_factor=4"], run)  # a width it reads still counts


def test_rows_over_three_seeds_take_the_mean_not_the_middle_seed():
    """A row's average over seeds is their mean (with two seeds the median is the same number; with three not)."""
    per_seed = {s: {"full_ft": {"updated_pct": 100.0, "scores": {"vqa": v}, "avg": v}}
                for s, v in ((0, 10.0), (1, 20.0), (2, 60.0))}
    rows, partial = aggregate_seeds(per_seed)
    full = rows["full_ft"]
    assert (full["avg"], full["scores"], partial) == (30.0, {"vqa": 30.0}, [])
    assert full["avg_sd"] == pytest.approx(700 ** 0.5)  # sample sd of 10, 20, 60


def test_a_feature_caches_fingerprint_follows_the_clip_weights_bytes(tmp_path, monkeypatch):
    """The fingerprint a feature cache is stamped with (CLIP's alone) reads the weight file's bytes: other weights
    under the same name give another one, so make_feature_cache refuses the old cache; no weights, another again."""
    import vlscale.modeling.backbones as backbones
    from vlscale.replicate import backbone_fingerprint

    monkeypatch.setattr(backbones, "ASSET_DIR", tmp_path)
    cfg = row_config([])
    assert cfg.model.vision_pretrained == "synthetic"  # guard: the miniature's CLIP is read from ASSET_DIR
    weights = tmp_path / f"{cfg.model.vision}.safetensors"
    weights.write_bytes(b"one set of weights")
    first = backbone_fingerprint(cfg, vision_only=True)
    assert backbone_fingerprint(cfg, vision_only=True) == first
    weights.write_bytes(b"another set of weights")
    second = backbone_fingerprint(cfg, vision_only=True)
    assert second != first
    assert backbone_fingerprint(row_config(["model.vision_pretrained=null"]), vision_only=True) not in (first, second)


def test_a_rows_command_log_keeps_the_earlier_invocations_output(tmp_path):
    """A rerun's command appends to the row's log: the interrupted or failed attempt's output (why it stopped) is
    kept above the new one, as _clear_partial keeps the logs for that reason."""
    _run_a_command(tmp_path)
    _run_a_command(tmp_path)
    assert [line for line in (tmp_path / "eval.log").read_text().splitlines() if line.startswith("$ ")] == [
        f"$ {sys.executable} -c pass"] * 2
