"""Settings a run does not read are said, not dropped silently: a method's widths under another method,
peft.half_shared without half_shared sharing, model.pool_size on a ViT or past an RN's grid, the synthetic
world's sizes with real data. launchers/train.py prints them once at start-up; presets switched by an
override and saved run configs still load."""

import logging

import pytest
import torch

from vlscale.config import config_from_dict, list_presets, load_config

# (override that is not read, the override that makes it read)
UNREAD = [
    ("peft.half_shared=up", "peft.sharing=half_shared"),
    ("peft.shared_phm_rule=true", "peft.method=compacter"),
    ("peft.factorized_phm=true", "peft.method=compacter"),
    ("peft.phm_dim=4", "peft.method=compacter"),
    ("peft.lora_rank=8", "peft.method=lora"),
    ("peft.lora_alpha=8.0", "peft.method=lora"),
    ("peft.lora_dropout=0.0", "peft.method=lora"),
    ("peft.n_prompts=4", "peft.method=prompt"),
    ("peft.prompt_hidden_dim=16", "peft.extra_prompts=true"),
    ("peft.task_embedding_dim=16", "peft.method=hyperformer"),
    ("peft.hypernet_hidden_dim=16", "peft.method=hyperformer"),
    ("model.max_frames=8", "data.tasks=[tvqa]"),
]


PLAIN = ["peft.reduction_factor=8", "model.pool_size=6"]  # the tiny preset's adapter width and pooling: the defaults


@pytest.mark.parametrize("unread,reader", UNREAD)
def test_a_setting_the_run_does_not_read_is_noted_naming_it(unread, reader):
    notes = load_config("tiny", PLAIN + [unread]).ignored_settings()
    assert len(notes) == 1 and notes[0].startswith(f"{unread} has no effect: it is read only with ")
    assert load_config("tiny", PLAIN + [unread, reader]).ignored_settings() == []


@pytest.mark.parametrize("unread", ["peft.reduction_factor=2", "peft.activation=gelu_tanh", "peft.fused=false"])
def test_adapter_settings_are_noted_under_lora_and_prompts(unread):
    for method in ("lora", "prompt", "none"):
        (note,) = load_config("tiny", PLAIN + [f"peft.method={method}", unread]).ignored_settings()
        assert note.startswith(f"{unread} has no effect") and f"(this run: peft.method={method})" in note
    assert load_config("tiny", PLAIN + ["peft.method=hyperformer", unread]).ignored_settings() == []


def test_phm_rank_is_noted_without_factorized_phm():
    (note,) = load_config("tiny", ["peft.method=compacter", "peft.phm_rank=2"]).ignored_settings()
    assert note == ("peft.phm_rank=2 has no effect: it is read only with peft.method=compacter and "
                    "peft.factorized_phm=true (this run: peft.method=compacter, peft.factorized_phm=false)")
    assert load_config("tiny", ["peft.method=compacter", "peft.phm_rank=2",
                                "peft.factorized_phm=true"]).ignored_settings() == []


def test_synthetic_world_sizes_are_noted_with_real_data(tmp_path):
    (note,) = load_config("tiny", ["data.source=real", f"data.root={tmp_path}", "data.synthetic_eval=7"]
                          ).ignored_settings()
    assert note == ("data.synthetic_eval=7 has no effect: it is read only with data.source=synthetic "
                    "(this run: data.source=real)")


def test_pool_size_on_a_vit_or_past_an_rn_grid_is_noted():
    (vit,) = load_config("tiny", ["model.vision=tiny-clip-vit", "model.pool_size=2"]).ignored_settings()
    assert vit.startswith("model.pool_size=2 has no effect: model.vision=tiny-clip-vit is a ViT")
    (capped,) = load_config("tiny", ["model.pool_size=9"]).ignored_settings()  # tiny-clip-rn: a 4x4 grid
    assert capped == ("model.pool_size=9 is capped at model.vision=tiny-clip-rn's 4x4 grid: the run takes 16 "
                      "visual tokens per image, not 81")
    assert load_config("tiny", ["model.pool_size=3"]).ignored_settings() == []
    # an open_clip model from the hub or a folder: its grid is known once built, so nothing is said (it looked the
    # hub up, offline too, and raised LocalEntryNotFoundError)
    assert load_config("tiny", ["model.vision=hf-hub:timm/some-clip", "model.pool_size=3"]).ignored_settings() == []


def test_shipped_presets_set_nothing_they_do_not_read():
    assert {n: load_config(n).ignored_settings() for n in list_presets()} == {n: [] for n in list_presets()}


def test_a_preset_switched_by_an_override_and_a_saved_config_still_load(caplog, capsys):
    """Noted, not refused: the half-shared preset's `half_shared: up` under peft.sharing=single, and a saved
    run config (adapter_config.json's run_config) holding a value its method does not read."""
    cfg = load_config("paper/clip_bart_half_shared_adapters", ["peft.sharing=single"])
    assert cfg.ignored_settings() == ["peft.half_shared=up has no effect: it is read only with "
                                      "peft.sharing=half_shared (this run: peft.sharing=single)"]
    with caplog.at_level(logging.INFO):
        saved = config_from_dict(load_config("tiny", ["peft.method=lora", "peft.phm_dim=4"]).to_dict())
    assert saved.peft.phm_dim == 4 and not caplog.records and capsys.readouterr() == ("", "")


def test_train_prints_each_note_once_at_start_up(monkeypatch, tmp_path, launcher, capsys):
    import vlscale.engine.distributed as distributed
    from vlscale.engine import trainer

    class Started(Exception):
        pass

    def setup_run(*args, **kwargs):
        raise Started  # nothing trains

    monkeypatch.setattr(trainer, "setup_run", setup_run)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(0, 1, 0, torch.device("cpu"), "cpu", "gloo"))
    monkeypatch.chdir(tmp_path)
    launcher("train").main(["--no-progress", "--config", "tiny", "output_dir=runs/é x/", "peft.method=lora",
                            "peft.half_shared=up", "model.pool_size=9"])
    out = capsys.readouterr().out.splitlines()
    # the banner says which folder a relative output_dir is in (launched from elsewhere, it named runs/é x/ only)
    assert out[0].startswith(f"vlscale: tiny -> runs/é x/ (in {tmp_path}) | world_size=1 (cpu, gloo) | "), out
    for key in ("peft.reduction_factor=4", "peft.half_shared=up", "model.pool_size=9"):
        assert sum(line.startswith(f"vlscale: {key} ") for line in out) == 1, (key, out)
    # an absolute one is where it says, with no working directory
    launcher("train").main(["--no-progress", "--config", "tiny", f"output_dir={tmp_path / 'abs'}"])
    assert capsys.readouterr().out.startswith(f"vlscale: tiny -> {tmp_path / 'abs'} | world_size=1 (cpu, gloo) | ")


def test_a_custom_task_data_tasks_does_not_name_is_noted():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
    real = ["data.source=real", f"data.root={root}", "data.custom_tasks={okvqa: {like: vqa}, viz: {like: vqa}}"]
    assert load_config("tiny", real + ["data.tasks=[vqa,okvqa,viz]"]).ignored_settings() == []
    (note,) = load_config("tiny", real + ["data.tasks=[vqa,okvqa]"]).ignored_settings()
    assert note == ("data.custom_tasks declares ['viz'], which data.tasks=['vqa', 'okvqa'] does not name: not "
                    "trained or evaluated in this run")
