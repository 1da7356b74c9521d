"""What a --resume, a save and a stop do when something is wrong: one line naming the folder or file
and what to do, never DeepSpeed's empty AssertionError or a JSON traceback.

One tiny run at ZeRO-2 stopped after step 2 of 3 (checkpoints step1 and step2) is copied for each
case: a resume at another ZeRO stage, a checkpoint missing DeepSpeed's files, a truncated client
state (the previous step folder is named, and resuming from it works), ``run_config.yaml`` gone.
A save that fails while writing (a full disk) and Ctrl-C during the final evaluation run through
launchers/train.py with the failure injected (a probe script forked from the preloaded server).
"""

import json
import shutil
import signal

import pytest

from vlscale.engine import checkpoint as ckpt
from vlscale.engine import trainer

ARGS = ["train.micro_batch_size=4", "train.max_steps=3", "train.save_every=1"]
ZERO2 = ["--deepspeed", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def stopped(h, tmp_path_factory):
    """A ZeRO-2 run (the ds file's stage; train.zero_stage null) stopped after step 2 of 3."""
    out = tmp_path_factory.mktemp("resume_errors") / "run"
    h.launch([*ZERO2, *h.TINY, *ARGS, f"output_dir={out}", "--stop-after-steps", "2"])
    assert ckpt.latest_tag(out / "checkpoints") == "step2"
    assert (out / "checkpoints" / "step1").is_dir()
    return out


@pytest.fixture
def run_copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    (out / ckpt.LOCK_FILE).unlink(missing_ok=True)
    return out


def refused(h, flags, out, *overrides) -> str:
    """Launch a resume that must be refused: exit 1, one line, no traceback, the checkpoint left alone."""
    proc = h.launch([*flags, *h.TINY, *ARGS, f"output_dir={out}", "--resume", *overrides], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert ckpt.latest_tag(out / "checkpoints") == "step2"
    return proc.stdout


def client_state(out, tag="step2") -> dict:
    return json.loads((out / "checkpoints" / tag / "client_state_rank0.json").read_text())


def test_a_checkpoint_of_another_zero_stage_or_missing_a_file_is_refused_naming_it(h, run_copy):
    out, step2 = run_copy, run_copy / "checkpoints" / "step2"
    # the default DeepSpeed file (ZeRO-3): refused before the model is built (was DeepSpeed's empty AssertionError)
    log = refused(h, [], out)
    assert (f"CheckpointError: {step2} was written at ZeRO stage 2 and this run is at ZeRO stage 3: DeepSpeed's "
            f"checkpoints of stage 0, of stages 1-2 and of stage 3 do not load into one another. Resume at the run's "
            f"stage: with the --deepspeed file it ran with") in log
    # it also advised train.zero_stage=2, which --resume refuses as a changed setting (the run had null: the file's)
    refused(h, [], out, "train.zero_stage=2")
    assert "vlscale: rank 0: CheckpointError" in log and " -> " not in log  # before start-up: no run banner
    assert client_state(out)["zero_stage"] == 2  # rank 0 records the stage and DeepSpeed's files
    assert set(client_state(out)["deepspeed_files"]) == {"mp_rank_00_model_states.pt",
                                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    with pytest.raises(ckpt.CheckpointError, match="written at ZeRO stage 2 and this run is at ZeRO stage 0"):
        ckpt.check_output_dir(out, True, 1, 4, zero_stage=0)
    assert ckpt.check_output_dir(out, True, 1, 4, zero_stage=1) == "step2"  # stages 1 and 2 share their files

    # a deleted model-states file: named, with the earlier checkpoint to resume instead
    (step2 / "mp_rank_00_model_states.pt").unlink()
    log = refused(h, ZERO2, out)
    assert (f"CheckpointError: {step2} is incomplete (mp_rank_00_model_states.pt is missing); the previous "
            f"checkpoint is {out / 'checkpoints' / 'step1'}: write 'step1' into {out / 'checkpoints' / 'latest'} to "
            f"resume from it") in log
    (step2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK")  # and a truncated one
    with pytest.raises(ckpt.CheckpointError, match=r"\(mp_rank_00_model_states\.pt is missing; zero_pp_rank_0_mp_"
                                                   r"rank_00_optim_states\.pt is 2 bytes, \d+ when written\)"):
        ckpt.check_output_dir(out, True, 1, 4, zero_stage=2)

    # a checkpoint of an earlier vlscale (no stage or file list recorded): the stage DeepSpeed's model-states
    # file holds, the files DeepSpeed names for it
    step1 = out / "checkpoints" / "step1"
    state = client_state(out, "step1")
    del state["zero_stage"], state["deepspeed_files"]
    (step1 / "client_state_rank0.json").write_text(json.dumps(state))
    (out / "checkpoints" / "latest").write_text("step1")
    with pytest.raises(ckpt.CheckpointError, match=f"^{step1} was written at ZeRO stage 2 and this run is at ZeRO "
                                                   "stage 3"):
        ckpt.check_output_dir(out, True, 1, 4, zero_stage=3)
    (step1 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"step1 is incomplete \(zero_pp_rank_0_mp_rank_00_optim_states"
                                                   r"\.pt is missing\); no earlier checkpoint is kept"):
        ckpt.check_output_dir(out, True, 1, 4, zero_stage=2)


def test_a_corrupt_client_state_names_the_file_and_the_checkpoint_before_it(h, run_copy):
    out, step2 = run_copy, run_copy / "checkpoints" / "step2"
    text = (step2 / "client_state_rank0.json").read_text()
    (step2 / "client_state_rank0.json").write_text(text[:len(text) // 2])  # a save cut short
    log = refused(h, ZERO2, out)  # was a JSONDecodeError traceback
    assert f"CheckpointError: {step2 / 'client_state_rank0.json'} is not valid JSON, truncated or corrupt (" in log
    assert (f"the previous checkpoint is {out / 'checkpoints' / 'step1'}: write 'step1' into "
            f"{out / 'checkpoints' / 'latest'} to resume from it") in log
    # what it says works: the run continues from step 1
    (out / "checkpoints" / "latest").write_text("step1")
    h.launch([*ZERO2, *h.TINY, *ARGS, f"output_dir={out}", "--resume"])
    assert [r["step"] for r in h.read_log(out)] == [1, 2, 3]
    assert h.read_json(out / "run_summary.json")["completed"] is True


def test_settings_are_checked_without_run_config_yaml(h, run_copy):
    """The checkpoint records the run's settings (rank 0's client state); a checkpoint of an earlier vlscale
    falls back on adapter/adapter_config.json; with neither, the resume is refused naming the missing file."""
    out = run_copy
    (out / "run_config.yaml").unlink()
    log = refused(h, ZERO2, out, "train.lr=0.5")  # was resumed with the changed learning rate
    assert (f"ConfigError: --resume: train.lr=0.5 differs from the checkpointed run's train.lr=0.001 "
            f"({out / 'checkpoints' / 'step2' / 'client_state_rank0.json'})") in log

    state = client_state(out)
    del state["run_config"]
    (out / "checkpoints" / "step2" / "client_state_rank0.json").write_text(json.dumps(state))
    saved, source = trainer.saved_settings(out, "step2")
    assert source == out / "adapter" / ckpt.ADAPTER_CONFIG and saved.train.lr == 0.001
    shutil.rmtree(out / "adapter")
    with pytest.raises(trainer.ConfigError) as no_settings:
        trainer.saved_settings(out, "step2")
    assert str(no_settings.value).startswith(f"--resume: {out / 'run_config.yaml'} is missing, and neither ")
    assert "restore run_config.yaml" in str(no_settings.value)


def test_a_checkpoint_that_trained_other_parameters_is_refused_naming_them(h, run_copy):
    """A checkpoint whose run trained another set of parameters (before 4fe43e5 a CLIP-training image run
    also trained CLIP's never-run attention pool) is refused in one line naming them, before DeepSpeed's
    optimizer load fails on a size mismatch. The set is read from DeepSpeed's own model-states file, so a
    checkpoint of any earlier vlscale is checked."""
    import torch

    out, step2 = run_copy, run_copy / "checkpoints" / "step2"
    states = step2 / "mp_rank_00_model_states.pt"
    saved = ckpt.saved_trained_shapes(step2)
    assert len(saved) == 61 and saved["projector.feat.0.weight"] == (64, 256)
    model = torch.load(states, map_location="cpu", weights_only=False)
    model["param_shapes"][0]["clip.visual.attnpool.positional_embedding"] = torch.Size([50, 64])
    del model["param_shapes"][1]["lm.decoder.final_layer_norm.weight"]
    torch.save(model, states)
    state = client_state(out)
    state["deepspeed_files"]["mp_rank_00_model_states.pt"] = states.stat().st_size
    (step2 / "client_state_rank0.json").write_text(json.dumps(state))
    log = refused(h, ZERO2, out)
    assert (f"CheckpointError: {step2} was written by a run that trained other parameters than this one does: "
            f"1 trained then, frozen or absent now (clip.visual.attnpool.positional_embedding); 1 trained now, not "
            f"then (lm.decoder.final_layer_norm.weight). Its optimizer state does not fit this run") in log


def test_a_cache_re_extracted_with_other_weights_is_refused_on_resume(h, launcher, tmp_path, capsys):
    """A cache-trained run (model.feature_source=cache) resumed after its data.feature_cache was re-extracted with
    other CLIP weights trained on the other CLIP's features, silently. The checkpoint records the fingerprint of
    the cache the run started on; a resume whose cache records another is refused in one line naming the key and
    the cache, before the model is built. A cache that records none now is noted and resumed; the same cache resumes."""
    cache, out = tmp_path / "features", tmp_path / "run"
    tiny = [a for a in h.TINY if a != "model.feature_source=images"]
    assert launcher("extract_features").main(["--synthetic", "--quiet", "--out", str(cache), "--config", "tiny",
                                              *tiny]) == 0
    uses_cache = ["model.feature_source=cache", f"data.feature_cache={cache}"]
    h.launch([*ZERO2, *h.TINY, *ARGS, *uses_cache, f"output_dir={out}", "--stop-after-steps", "2"])
    meta_file = cache / "meta.json"
    made = meta_file.read_text()
    meta = json.loads(made)
    assert client_state(out)["feature_cache"]["fingerprint"] == meta["fingerprint"]
    first = sorted(meta["fingerprint"])[0]
    meta["fingerprint"][first] = [v * 1.5 for v in meta["fingerprint"][first]]
    meta_file.write_text(json.dumps(meta))
    log = refused(h, ZERO2, out, *uses_cache)
    assert (f"vlscale: rank 0: DataError: resume: data.feature_cache={str(cache)!r} holds features of other "
            f"tiny-clip-rn weights than the cache the run was trained on ({cache}, pretrained=None): {first} "
            f"differs (") in log
    assert log.count("data.feature_cache=") == 1  # one line

    del meta["fingerprint"]  # re-extracted by a vlscale that records none: unchecked, said
    meta_file.write_text(json.dumps(meta))
    cfg, _ = trainer.saved_settings(out, "step2")
    trainer.check_resumed_cache(out, "step2", cfg)
    assert "vlscale: resume: note: data.feature_cache=" in capsys.readouterr().err

    meta_file.write_text(made)  # the cache the run started on
    h.launch([*ZERO2, *h.TINY, *ARGS, *uses_cache, f"output_dir={out}", "--resume"])
    assert [r["step"] for r in h.read_log(out)] == [1, 2, 3]


FULL_DISK_PROBE = """
import runpy, sys, torch
real = torch.save
def save(obj, f, *args, **kwargs):  # DeepSpeed's TorchCheckpointEngine writes with torch.save
    if ".tmp-step2" in str(f):  # torch's error when the disk fills while it writes
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368")
    return real(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_disk_filling_during_a_save_is_one_line_and_the_previous_checkpoint_is_kept(h, preloaded, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(FULL_DISK_PROBE)
    args = ["--no-progress", "--config", "tiny", *h.TINY, *ARGS, "train.zero_stage=0", f"output_dir={out}"]
    proc = preloaded.run(script, [h.TRAIN, *args], env=h.base_env(), cwd=h.ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    root = out / "checkpoints"
    assert (f"CheckpointError: the checkpoint at step 2 could not be written to {root} (RuntimeError: [enforce fail at "
            f"inline_container.cc:664] . unexpected pos 4480 vs 4368; ") in proc.stdout, proc.stdout[-3000:]
    assert (f"the previous checkpoint {root / 'step1'} is intact (--resume continues from it), and the temporary "
            f"folder .tmp-step2 is removed") in proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step1"]
    assert ckpt.check_output_dir(out, True, 1, 4, zero_stage=0) == "step1"


ONE_RANK_FULL_PROBE = """
import os, runpy, sys, safetensors.torch, torch
rank, what = os.environ["RANK"], os.environ["PROBE_FAIL"]
real_save, real_file = torch.save, safetensors.torch.save_file
def save(obj, f, *args, **kwargs):  # DeepSpeed's TorchCheckpointEngine writes with torch.save
    if what == "checkpoint" and rank == "1" and ".tmp-step2" in str(f):  # one node's local disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368")
    return real_save(obj, f, *args, **kwargs)
calls = []
def save_file(tensors, f, *args, **kwargs):  # the adapter is rank 0's to write; its second save is step 2's
    calls.append(f)
    if what == "adapter" and rank == "0" and len(calls) == 2:
        raise OSError(28, "No space left on device")
    return real_file(tensors, f, *args, **kwargs)
torch.save, safetensors.torch.save_file = save, save_file
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what", ["checkpoint", "adapter"])
def test_a_write_failing_on_one_rank_is_the_same_one_line_on_every_rank(h, preloaded, tmp_path, what):
    """Rank 1's part of the checkpoint (its ZeRO-3 optimizer partition) or rank 0's adapter cannot be
    written at step 2 of 3. Every rank stops with the failing rank's reason; raised on that rank alone, the
    other ended inside DeepSpeed's barrier on gloo's "Connection closed by peer", with a traceback."""
    out = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(ONE_RANK_FULL_PROBE)
    args = ["--no-progress", "--config", "tiny", *h.TINY, *ARGS, f"output_dir={out}"]
    proc = preloaded.run(script, [h.TRAIN, *args], nproc=2, env=dict(h.base_env(), PROBE_FAIL=what), cwd=h.ROOT,
                         timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "Connection closed" not in proc.stdout, proc.stdout[-3000:]
    root = out / "checkpoints"
    if what == "checkpoint":
        line = (f"CheckpointError: the checkpoint at step 2 could not be written to {root} (rank 1: RuntimeError: "
                f"[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368; ")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step1"]
    else:
        line = (f"CheckpointError: the adapter at step 2 could not be written to {out / 'adapter'} (rank 0: No space "
                f"left on device; ")
        assert ckpt.read_adapter_config(out / "adapter")["step"] == 1
    for rank in (0, 1):
        assert f"vlscale: rank {rank}: {line}" in proc.stdout, proc.stdout[-3000:]


RANK0_LOG_FULL_PROBE = """
import os, runpy, sys
import vlscale.engine.trainer as trainer
log_step, calls = trainer.log_step, []
def full(run, *args, **kwargs):  # rank 0's own write (train_log.jsonl), outside any collective, at step 2
    calls.append(1)
    if os.environ["RANK"] == "0" and len(calls) == 2:
        raise OSError(28, "No space left on device")
    return log_step(run, *args, **kwargs)
trainer.log_step = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_rank_ending_alone_leaves_the_others_a_line_that_points_to_it(h, preloaded, tmp_path):
    """Rank 0 fails on its own (train_log.jsonl's disk fills) and exits; rank 1, waiting in the next step's
    collective, printed gloo's "Read error ... Connection reset by peer ... GLHF!" as its reason. It says now
    that another rank's process ended, and rank 0's line gives the reason."""
    out = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(RANK0_LOG_FULL_PROBE)
    args = ["--no-progress", "--config", "tiny", *h.TINY, *ARGS, f"output_dir={out}"]
    proc = preloaded.run(script, [h.TRAIN, *args], nproc=2, env=h.base_env(), cwd=h.ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"vlscale: rank 0: OSError: writing the run's files in output_dir '{out}' failed (No space" in proc.stdout
    assert "vlscale: rank 1: stopped: another rank's process ended (its own line says why)" in proc.stdout, \
        proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "GLHF" not in proc.stdout, proc.stdout[-3000:]


EVAL_INTERRUPT_PROBE = """
import os, runpy, signal, sys
from vlscale.engine.distributed import Watchdog
beat = Watchdog.beat
def beat_then_interrupt(self, where=""):  # Ctrl-C once the final evaluation's first batch is done
    beat(self, where)
    if where.startswith("evaluating") and not getattr(Watchdog, "interrupted", False):
        Watchdog.interrupted = True
        os.kill(os.getpid(), signal.SIGINT)
Watchdog.beat = beat_then_interrupt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_during_the_final_evaluation_stops_it_and_resume_evaluates(h, preloaded, tmp_path):
    """The final evaluation (4 batches of each of 2 tasks) stops after the batch the signal came in, with
    the interrupt's exit code, run_summary.json saying what was interrupted; --resume of the run, whose steps
    are all trained and checkpointed, evaluates without saving the checkpoint again."""
    out = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(EVAL_INTERRUPT_PROBE)
    args = [*h.TINY, *ARGS, "train.zero_stage=0", "train.eval_batch_size=2", f"output_dir={out}"]
    proc = preloaded.run(script, [h.TRAIN, "--no-progress", "--config", "tiny", *args], env=h.base_env(), cwd=h.ROOT,
                         timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stdout[-3000:]  # was 0: the evaluation ran to its end
    assert ("vlscale: stopped at step 3 (SIGINT during the final evaluation (evaluation of val stopped in task vqa "
            "after 1 of 4 batches); the training is complete and checkpointed, and --resume runs the final evaluation "
            "again); resume with --resume") in proc.stdout, proc.stdout[-3000:]
    summary = h.read_json(out / "run_summary.json")
    assert summary["completed"] is False and summary["final_scores"] == {}
    assert summary["interrupted_evaluation"] == {"step": 3, "split": "val", "task": "vqa", "batches_done": 1,
                                                 "batches": 4}
    assert not (out / "metrics.json").exists()
    assert ckpt.latest_tag(out / "checkpoints") == "step3"
    written = {f.name: f.stat().st_mtime_ns for f in (out / "checkpoints" / "step3").iterdir()}

    done = h.launch([*args, "--resume"])
    assert "the run's 3 steps are trained and checkpointed; running its final evaluation" in done.stdout
    assert "resuming at step" not in done.stdout  # nothing is left to train
    assert [(m["step"], m["split"], sorted(m["tasks"])) for m in h.read_json(out / "metrics.json")] == [
        (3, "val", ["gqa", "vqa"])]
    summary = h.read_json(out / "run_summary.json")
    assert summary["completed"] is True and summary["interrupted_evaluation"] is None
    assert sorted(summary["final_scores"]) == ["gqa", "vqa"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["gqa.jsonl", "vqa.jsonl"]
    assert {f.name: f.stat().st_mtime_ns for f in (out / "checkpoints" / "step3").iterdir()} == written
    assert [r["step"] for r in h.read_log(out)] == [1, 2, 3]


def test_ctrl_c_during_a_mid_run_evaluation_stops_it_with_a_checkpoint(h, preloaded, tmp_path):
    """Ctrl-C in the evaluation of step 2 (train.eval_every=2) ends it after the batch it came in
    (before: the whole evaluation ran, then another training step): step 2 is checkpointed, and
    --resume trains step 3 without that evaluation."""
    out = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(EVAL_INTERRUPT_PROBE)
    args = [*h.TINY, *ARGS, "train.zero_stage=0", "train.eval_batch_size=2", "train.eval_every=2",
            f"output_dir={out}"]
    proc = preloaded.run(script, [h.TRAIN, "--no-progress", "--config", "tiny", *args], env=h.base_env(), cwd=h.ROOT,
                         timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stdout[-3000:]
    assert "vlscale: stopped at step 2 (SIGINT during the evaluation at step 2" in proc.stdout, proc.stdout[-3000:]
    assert ckpt.latest_tag(out / "checkpoints") == "step2"
    assert [r["step"] for r in h.read_log(out)] == [1, 2]
    done = h.launch([*args, "--resume"])
    assert [r["step"] for r in h.read_log(out)] == [1, 2, 3], done.stdout[-2000:]
    assert [(m["step"], m["split"]) for m in h.read_json(out / "metrics.json")] == [(3, "val")]


def test_a_resume_with_other_max_steps_says_the_schedule_changes(capsys):
    """train.max_steps may change on --resume (to extend a run); the learning-rate schedule then changes
    with it, which the resume says (before: not a word)."""
    from vlscale.config import load_config
    from vlscale.engine.trainer import _note_new_schedule

    saved = load_config("tiny", ["train.max_steps=3", "train.lr=0.001", "train.warmup_ratio=0.05"])
    _note_new_schedule(saved, load_config("tiny", ["train.max_steps=3", "train.lr=0.001"]), 2)
    assert capsys.readouterr().out == ""
    _note_new_schedule(saved, load_config("tiny", ["train.max_steps=4", "train.lr=0.001"]), 2)
    assert ("--resume with train.max_steps=4 (the run had 3): the learning-rate schedule is recomputed for 4 "
            "steps; the lr of step 3 is 0.000667 (it would have been 0.0005)") in capsys.readouterr().out
    _note_new_schedule(saved, load_config("tiny", ["train.max_steps=2", "train.lr=0.001"]), 2)  # no lr to speak of
    assert capsys.readouterr().out == ("vlscale: --resume with train.max_steps=2 (the run had 3): the checkpoint is "
                                       "at step 2, so no step is left to train\n")


def test_a_resume_into_another_runs_folder_names_the_model_first_and_counts_the_rest(tmp_path):
    """Another preset's run resumed into this folder: its backbone is the headline (the keys were named in
    alphabetical order: data.* first), the count and the next differences follow; an unset train.lr shows the
    method's default it stands for."""
    from vlscale.config import ConfigError, load_config
    from vlscale.engine.trainer import _check_resumable

    saved = load_config("tiny")
    other = load_config("tiny", ["model.backbone=mini-bart", "data.synthetic_eval=7", "peft.sharing=multiple"])
    with pytest.raises(ConfigError, match=r"--resume: model\.backbone='mini-bart' differs from the checkpointed run's "
                                          r"model\.backbone='tiny-t5' \(.*run_config\.yaml\); 2 more setting\(s\) "
                                          r"differ: \['peft\.sharing', 'data\.synthetic_eval'\]"):
        _check_resumable(saved, other, tmp_path / "run_config.yaml")
    assert saved.train.lr is None
    with pytest.raises(ConfigError, match=r"train\.lr=0\.01 differs from the checkpointed run's train\.lr=None \(the "
                                          r"method's default, 0\.001\)"):
        _check_resumable(saved, load_config("tiny", ["train.lr=0.01"]), tmp_path / "run_config.yaml")


def test_a_resume_with_other_max_steps_runs_its_first_step_at_the_new_schedules_lr(h, run_copy):
    """The run stopped at step 2 of 3 resumed with train.max_steps=6: every resumed step (the first too) at the
    new schedule's lr, as the note says. The loaded optimizer groups held the old schedule's lr after step 2;
    the first resumed step ran at it (with max_steps=2 extended: at lr 0, a step that changed nothing)."""
    from vlscale.config import load_config
    from vlscale.engine.trainer import lr_multiplier

    out = run_copy
    proc = h.launch([*ZERO2, *h.TINY, *ARGS, f"output_dir={out}", "--resume", "train.max_steps=6"])
    cfg = load_config(str(out / "run_config.yaml"))
    new, old = lr_multiplier(6, cfg.train.warmup_ratio), lr_multiplier(3, cfg.train.warmup_ratio)
    assert new(2) != old(2)
    assert f"the lr of step 3 is {cfg.lr * new(2):.3g} (it would have been {cfg.lr * old(2):.3g})" in proc.stdout
    log = h.read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in log] == pytest.approx([cfg.lr * old(s) for s in (0, 1)] + [cfg.lr * new(s) for s in
                                                                                          range(2, 6)], rel=1e-9)


def test_another_runs_settings_are_the_headline_before_its_global_batch(h, run_copy):
    """A resume of another preset into this folder: its model is named, not the global batch it also changes
    (which came first, before the settings were compared)."""
    log = refused(h, ZERO2, run_copy, "model.backbone=mini-bart", "train.micro_batch_size=2")
    assert "--resume: model.backbone='mini-bart' differs from the checkpointed run's model.backbone='tiny-t5'" in log
    assert "global batch" not in log


def test_a_checkpoint_from_before_per_task_optimizer_groups_is_refused_naming_it(h, tmp_path):
    """Per-task weights (sharing=multiple) have optimizer groups of their own since TaskSteps; a checkpoint
    written before (no task_groups in its client state) holds 2 groups' state: refused in one line, not
    inside DeepSpeed's optimizer load. The same checkpoint with the record resumes."""
    out = tmp_path / "run"
    multi = [*h.TINY, *ARGS, "peft.sharing=multiple", "train.zero_stage=0", f"output_dir={out}"]
    h.launch([*multi, "--stop-after-steps", "2"])
    path = out / "checkpoints" / "step2" / "client_state_rank0.json"
    state = json.loads(path.read_text())
    assert state["task_groups"] is True
    path.write_text(json.dumps({k: v for k, v in state.items() if k != "task_groups"}))
    proc = h.launch([*multi, "--resume"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "was written by a vlscale that stepped every task's weights in every step" in proc.stdout
    path.write_text(json.dumps(state))
    h.launch([*multi, "--resume"])
    assert [r["step"] for r in h.read_log(out)] == [1, 2, 3]
