"""train.global_batch_size: the run derives the accumulation on any number of ranks
(vlscale.engine.deepspeed_config.resolve_batch), so a preset keeps its global batch on the GPUs there are."""

import sys
from pathlib import Path

import pytest

from vlscale.config import ConfigError, list_presets, load_config
from vlscale.engine.deepspeed_config import batch_as_given, build_deepspeed_config, global_batch_size, resolve_batch

ROOT = Path(__file__).resolve().parents[2]
ZERO2 = ROOT / "ds_configs" / "zero2.json"
TINY = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
        "model.vision_pretrained=null", "data.tasks=[vqa,gqa]", "data.synthetic_train=16", "data.synthetic_eval=4"]


def test_config_validation():
    assert load_config("tiny", TINY).train.gradient_accumulation_steps == 1  # neither set: today's behaviour
    assert load_config("tiny", TINY).train.global_batch_size is None
    glob = load_config("tiny", TINY + ["train.global_batch_size=32"]).train
    assert (glob.global_batch_size, glob.gradient_accumulation_steps) == (32, None)  # derived at start-up
    for bad, why in (("0", "must be > 0"), ("-8", "must be > 0"), ("1.5", "must be an integer")):
        with pytest.raises(ConfigError, match=rf"train\.global_batch_size={bad}.*{why}"):
            load_config("tiny", TINY + [f"train.global_batch_size={bad}"])


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (8, 1)])
def test_the_accumulation_is_derived_for_the_world_size(world, accum):
    cfg = load_config("tiny", TINY + ["train.global_batch_size=32", "train.micro_batch_size=4"])
    resolved = resolve_batch(cfg, world)
    assert resolved.train.gradient_accumulation_steps == accum
    assert cfg.train.gradient_accumulation_steps is None  # the config loaded is left as it is
    assert resolve_batch(resolved, world) is resolved  # idempotent
    assert global_batch_size(cfg, world) == 32
    ds = build_deepspeed_config(ZERO2, cfg, world, device_type="cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (4, accum, 32)


def test_the_saved_settings_derive_the_accumulation_anew_on_another_number_of_ranks():
    """run_config.yaml, checkpoints and adapter/ save train.global_batch_size, not the accumulation derived from
    it: the run of 2 ranks (accumulation 4) evaluates or resumes on 4 (accumulation 2). An accumulation given
    without a global batch is saved as given."""
    cfg = load_config("tiny", TINY + ["train.global_batch_size=32", "train.micro_batch_size=4"])
    saved = batch_as_given(resolve_batch(cfg, 2))
    assert (saved.train.global_batch_size, saved.train.gradient_accumulation_steps) == (32, None)
    assert resolve_batch(saved, 4).train.gradient_accumulation_steps == 2
    given = load_config("tiny", TINY + ["train.gradient_accumulation_steps=3"])
    assert batch_as_given(given).train.gradient_accumulation_steps == 3


def test_a_global_batch_the_ranks_do_not_divide_is_one_line_naming_the_values_and_micro_batches_that_fit():
    cfg = load_config("tiny", TINY + ["train.global_batch_size=48", "train.micro_batch_size=16"])
    with pytest.raises(ConfigError) as e:
        resolve_batch(cfg, 2)  # 48 / (16 x 2) = 1.5
    msg = str(e.value)
    assert "\n" not in msg
    assert ("train.global_batch_size=48 is not a multiple of train.micro_batch_size=16 x world_size=2 (= 32); "
            "micro-batch sizes that divide it on 2 ranks: train.micro_batch_size=12, 8, 6, 4, 3, 2") in msg
    assert resolve_batch(load_config("tiny", TINY + ["train.global_batch_size=48", "train.micro_batch_size=8"]),
                         2).train.gradient_accumulation_steps == 3  # one it names
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=500 is not a multiple of train\.micro_batch_size"
                                          r"=500 x world_size=8 .*no micro-batch size does \(500 is not a multiple of "
                                          r"8\); set train\.global_batch_size to a multiple of 8 \(e\.g\. 496 or 504\)"):
        resolve_batch(load_config("tiny", TINY + ["train.global_batch_size=500", "train.micro_batch_size=500"]), 8)
    with pytest.raises(ConfigError, match="train.global_batch_size=48"):  # what the DeepSpeed config build says too
        build_deepspeed_config(ZERO2, cfg, 2, device_type="cpu")


def test_a_global_batch_the_ranks_do_not_divide_names_a_micro_batch_that_fits_the_batch_it_suggests():
    """The paper's 500 on 8 GPUs with the preset's micro-batch of 500: the refusal suggested 496 or 504 alone, and
    train.global_batch_size=504 was refused again (500 does not divide 63 a rank). It names both keys now, and what
    it names builds; a micro-batch that already fits both suggestions is not named."""
    cfg = load_config("paper/clip_bart_single_adapter")
    with pytest.raises(ConfigError) as e:
        resolve_batch(cfg, 8)
    assert ("set train.global_batch_size to a multiple of 8 (e.g. 496 or 504) and train.micro_batch_size to a divisor "
            "of its share per rank (62 or 63), or train on a number of ranks that divides 500") in str(e.value)
    ds = build_deepspeed_config(ZERO2, load_config("paper/clip_bart_single_adapter", [
        "train.global_batch_size=504", "train.micro_batch_size=63"]), 8, device_type="cuda")
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (504, 1)
    with pytest.raises(ConfigError) as e:  # micro-batch 1 divides any share: only the global batch to change
        resolve_batch(load_config("tiny", TINY + ["train.global_batch_size=5", "train.micro_batch_size=1"]), 8)
    assert str(e.value).endswith("set train.global_batch_size to a multiple of 8 (e.g. 8), or train on a number of "
                                 "ranks that divides 5")


def test_an_explicit_accumulation_must_agree_with_the_global_batch():
    both = TINY + ["train.global_batch_size=32", "train.micro_batch_size=4", "train.gradient_accumulation_steps=4"]
    assert resolve_batch(load_config("tiny", both), 2).train.gradient_accumulation_steps == 4  # they agree on 2 ranks
    with pytest.raises(ConfigError) as e:
        resolve_batch(load_config("tiny", both), 1)
    msg = str(e.value)
    assert "train.gradient_accumulation_steps=4 conflicts with train.global_batch_size=32" in msg
    assert "needs accumulation 8" in msg and "set one of the two (the other null)" in msg


@pytest.mark.parametrize("world", [1, 2, 8])
def test_a_scale_preset_keeps_its_global_batch_with_a_users_micro_batch(world):
    """The presets were written for 8 GPUs: on fewer the global batch (and with it max_steps' epochs and the
    learning-rate schedule) shrank with the ranks; now the accumulation makes it up, also with another
    micro-batch given on the command line."""
    name = "scale/clip_t5_large_single_adapter"
    for overrides, micro in (([], 64), (["train.micro_batch_size=16"], 16)):
        cfg = load_config(name, overrides)
        ds = build_deepspeed_config(ROOT / cfg.train.deepspeed, cfg, world, device_type="cuda")
        assert ds["train_batch_size"] == 512 and ds["train_micro_batch_size_per_gpu"] == micro
        assert ds["gradient_accumulation_steps"] == 512 // (micro * world)


# The paper's global batch (VL-T5/scripts: batch_size=500 for BART, 300 for T5; the video scripts 50).
PAPER_BATCH = {"paper/clip_t5_single_adapter": 300, "paper/video_clip_bart_single_adapter": 50}
PAPER_PRESETS = sorted(p for p in list_presets() if p.startswith("paper/"))


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_a_paper_preset_keeps_the_papers_global_batch_on_the_gpus_there_are(name):
    """The paper presets fixed the micro-batch per rank (500: the whole batch on one GPU), so on N GPUs the run
    trained a global batch N times the paper's (max_steps N times its epochs) without a word. Now the global batch
    is the paper's on any number of ranks that divides it, with the preset's micro-batch on one GPU and a user's
    on more; the preset's micro-batch on more ranks is refused, naming the sizes that keep it."""
    batch = PAPER_BATCH.get(name, 500)
    assert load_config(name).train.micro_batch_size == batch  # one GPU: the whole batch in one micro-batch
    for world in (1, 2, 4, 5):
        if batch % world:  # 50 on 4
            continue
        for micro, accum in ((batch // world, 1), (batch // world // 5, 5)):
            cfg = load_config(name, [] if (world, accum) == (1, 1) else [f"train.micro_batch_size={micro}"])
            ds = build_deepspeed_config(ZERO2, cfg, world, device_type="cuda")
            assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
                == (batch, micro, accum), (world, micro)
    with pytest.raises(ConfigError) as e:
        resolve_batch(load_config(name), 2)
    assert str(e.value).startswith(f"train.global_batch_size={batch} is not a multiple of train.micro_batch_size="
                                   f"{batch} x world_size=2 (= {2 * batch}); micro-batch sizes that divide it on 2 "
                                   f"ranks: train.micro_batch_size={batch // 2}, ")
    with pytest.raises(ConfigError, match=rf"train\.global_batch_size={batch} is not a multiple of .* world_size=8 .*"
                                          rf"set train\.global_batch_size to a multiple of 8"):
        resolve_batch(load_config(name, [f"train.micro_batch_size={batch // 10}"]), 8)  # 8 GPUs divide none of them


def test_a_paper_preset_on_ranks_that_do_not_keep_its_batch_is_refused_before_start(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "launchers"))
    import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config("paper/clip_bart_single_adapter", [f"output_dir={tmp_path / 'run'}"])
    assert train.refused_before_start(cfg, False, str(ZERO2)) == (
        "ConfigError: train.global_batch_size=500 is not a multiple of train.micro_batch_size=500 x world_size=2 "
        "(= 1000); micro-batch sizes that divide it on 2 ranks: train.micro_batch_size=250, 125, 50, 25, 10, 5")
    data = f"data.root={ROOT / 'tests/fixtures/real_data'}"  # its annotation files are checked too
    assert train.refused_before_start(load_config("paper/clip_bart_single_adapter", [
        f"output_dir={tmp_path / 'run'}", "train.micro_batch_size=125", data]), False, str(ZERO2)) is None


def test_the_planner_and_profile_memory_see_the_derived_accumulation(launcher, capsys):
    import json

    from vlscale.profiling.analytic import estimate_memory
    from vlscale.profiling.planner import plan

    cfg = load_config("tiny", TINY + ["train.global_batch_size=32", "train.micro_batch_size=4", "train.zero_stage=2"])
    one = estimate_memory(cfg, 1, device="cpu")  # accumulation 8: the held gradients are counted
    eight = estimate_memory(cfg, 8, device="cpu")  # accumulation 1
    assert one.components["peak"] > eight.components["peak"] - 1  # (no TypeError on the unresolved config)
    options = plan(cfg, "1GiB", 2, stages=(2,), offloads=("none",), checkpointing=(False,), precisions=("fp32",))
    assert {o.micro_batch_size * 2 * o.accumulation for o in options} == {32}
    assert launcher("profile_memory").main(["--config", "tiny", *TINY, "train.global_batch_size=32",
                                            "train.micro_batch_size=4", "--world-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 2
    assert launcher("profile_memory").main(["--config", "tiny", *TINY, "train.global_batch_size=30",
                                            "train.micro_batch_size=4", "--world-size", "2"]) == 2
    assert "error: train.global_batch_size=30 is not a multiple of" in capsys.readouterr().err


def test_a_resume_on_another_number_of_ranks_keeps_the_global_batch(tmp_path, monkeypatch):
    """A checkpoint of 2 ranks x micro-batch 2 x accumulation 2 (global batch 8): resumed on one rank with
    train.global_batch_size=8 it continues (accumulation 4); without, it is refused, and the hint names
    train.global_batch_size. A global batch the ranks do not divide is the launcher's one-line refusal."""
    import json

    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import _check_resumable

    folder = tmp_path / "checkpoints" / "step4"
    folder.mkdir(parents=True)
    for r in range(2):
        state = {"step": 4, "loader": {"step": 4, "micro_index": 0, "world_size": 2, "accum": 2,
                                       "sampler": {"global_batch_size": 8, "position": 4}}}
        (folder / f"client_state_rank{r}.json").write_text(json.dumps(state))
    (tmp_path / "checkpoints" / "latest").write_text("step4")
    common = TINY + [f"output_dir={tmp_path}", "train.micro_batch_size=2"]
    cfg = load_config("tiny", common + ["train.global_batch_size=8"])
    assert ckpt.check_output_dir(tmp_path, True, 1, global_batch_size(cfg, 1)) == "step4"
    _check_resumable(resolve_batch(cfg, 2), resolve_batch(cfg, 1), tmp_path)  # saved vs resumed: accepted
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_output_dir(tmp_path, True, 1, global_batch_size(load_config("tiny", common), 1))
    assert "this run has 1 rank and a global batch of 2" in str(e.value)
    assert "train.global_batch_size=8 derives the accumulation on any number of ranks that divides it" in str(e.value)

    sys.path.insert(0, str(ROOT / "launchers"))
    import train

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fresh = load_config("tiny", TINY + [f"output_dir={tmp_path / 'new'}", "train.micro_batch_size=2",
                                        "train.global_batch_size=7"])
    assert train.refused_before_start(fresh, False, str(ZERO2)).startswith(
        "ConfigError: train.global_batch_size=7 is not a multiple of train.micro_batch_size=2 x world_size=1")


def test_a_presets_zero_stage_over_the_files_is_said():
    from vlscale.engine.deepspeed_config import stage_override_note

    cfg = load_config("scale/clip_t5_11b_single_adapter_8x24gb")  # zero_stage: 3
    note = stage_override_note(ZERO2, cfg)
    assert "train.zero_stage=3 (from the config) overrides zero_optimization.stage=2 of" in note
    assert "zero2.json: the run trains at ZeRO-3" in note
    assert stage_override_note(ROOT / "ds_configs" / "zero3.json", cfg) is None
    assert stage_override_note(ZERO2, load_config("tiny", TINY)) is None


def test_evaluation_on_other_ranks_does_no_batch_arithmetic(launcher):
    """A run of global batch 32 (micro-batch 4) saved its settings; evaluate.py's DeepSpeed config on 3 ranks
    (which do not divide 32) builds: evaluation takes no optimizer step, so the global batch is not its business."""
    cfg = resolve_batch(load_config("tiny", TINY + ["train.global_batch_size=32", "train.micro_batch_size=4"]), 2)
    ds = launcher("evaluate").evaluation_ds_config(str(ZERO2), cfg, 3, "cpu")
    assert ds["zero_optimization"]["stage"] == 2


def test_planning_a_preset_whose_micro_batch_does_not_keep_the_batch_takes_one_that_does(launcher, capsys):
    """profile_memory --budget plans micro-batch sizes anyway: a paper preset (500 per step, micro-batch 500) on 4 ranks
    was refused before planning; now predicted for micro-batch 125 with a note, and the plan keeps 500. Without
    --budget the refusal stays (there is no plan to make)."""
    import json

    pm = launcher("profile_memory")
    argv = ["--config", "paper/clip_bart_single_adapter", "--world-size", "4"]
    assert pm.main(argv + ["--budget", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted"]["settings"]["micro_batch_size"] == 125
    assert "predicted for train.micro_batch_size=125, the largest that does" in out["note"]
    assert out["plan"] and {o["micro_batch_size"] * 4 * o["gradient_accumulation_steps"] for o in out["plan"]} == {500}
    assert pm.main(argv) == 2
    assert "micro-batch sizes that divide it on 4 ranks: train.micro_batch_size=125, 25, 5, 1" in capsys.readouterr().err
