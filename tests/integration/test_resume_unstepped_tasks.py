"""A checkpoint written before every task was drawn resumes on another number of ranks: the per-task optimizer
groups of a task no step has drawn hold no Adam state, and DeepSpeed's universal conversion failed on them
(``KeyError: 'exp_avg'`` at ZeRO-1/2, ``KeyError: <group>`` at ZeRO-3) with a traceback."""

import shutil

import pytest

from vlscale.engine import checkpoint as ckpt


def test_a_checkpoint_before_every_task_was_drawn_resumes_on_two_ranks(h, tmp_path):
    # seed 3 draws gqa first: after step 1, vqa's adapter groups have never been stepped
    args = h.TINY + ["peft.sharing=multiple", "train.max_steps=3", "train.eval_every=0", "train.eval_max_examples=2",
                     "--deepspeed", str(h.ROOT / "ds_configs" / "zero2.json")]
    whole = tmp_path / "whole"
    h.launch(args + [f"output_dir={whole}", "train.micro_batch_size=8"])
    out = tmp_path / "run"
    h.launch(args + [f"output_dir={out}", "train.micro_batch_size=8", "--stop-after-steps", "1"])
    assert ckpt.latest_tag(out / "checkpoints") == "step1"
    assert [r["task"] for r in h.read_log(out)] == ["gqa"]
    proc = h.launch(args + [f"output_dir={out}", "train.micro_batch_size=4", "--resume"], nproc=2, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    resumed, reference = h.read_log(out), h.read_log(whole)
    assert [r["task"] for r in resumed] == [r["task"] for r in reference] and "vqa" in [r["task"] for r in resumed]
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"


def test_zero3_resume_on_another_number_of_ranks_keeps_each_task_groups_adam_step(h, tmp_path):
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every param group group 0's Adam step count. Per-task groups
    step only when their task is drawn, so after a 2 -> 1 rank resume each task's adapter took another group's
    bias correction: the losses after the resume were 1.5e-3 (relative, fp32) from the uninterrupted run's.
    Each group's own count is now put back from the checkpoint (0 for a task not drawn yet)."""
    args = h.TINY + ["peft.sharing=multiple", "data.tasks=[vqa,gqa,nlvr2,caption]", "train.max_steps=6",
                     "train.eval_every=0", "train.eval_max_examples=2", "model.dropout=0.0",
                     "--deepspeed", str(h.ROOT / "ds_configs" / "zero3.json")]
    whole, out = tmp_path / "whole", tmp_path / "run"
    h.launch(args + [f"output_dir={whole}", "train.micro_batch_size=2", "train.save_every=3"], nproc=2)
    shutil.copytree(whole, out)  # its step-3 checkpoint is the run's at that step: resumed from it, as the
    (out / "checkpoints" / "latest").write_text("step3")  # refusal of a bad one advises (test_resume_errors.py)
    counts, flats = ckpt._zero3_group_steps(out / "checkpoints" / "step3")
    assert len({counts.get(g, 0.0) for g in range(len(flats))}) > 1, counts  # the groups' counts differ at the stop
    proc = h.launch(args + [f"output_dir={out}", "train.micro_batch_size=4", "--resume"], check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    resumed, reference = h.read_log(out), h.read_log(whole)
    assert [r["task"] for r in resumed] == [r["task"] for r in reference]
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
