"""Run configuration: presets, overrides, and errors that name the key at fault."""

import pytest

from vlscale.config import ConfigError, RunConfig, list_presets, load_config, parse_overrides


def test_every_shipped_preset_loads():
    presets = list_presets()
    assert "default" in presets
    assert "paper/clip_bart_single_adapter" in presets
    for name in presets:
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.name == name


def test_paper_presets_cover_table1():
    names = {p.removeprefix("paper/clip_bart_") for p in list_presets() if p.startswith("paper/clip_bart_")}
    assert {"full_ft", "multiple_adapters", "half_shared_adapters", "single_adapter", "hyperformer",
            "multiple_compacters", "single_compacter", "multiple_lora", "single_lora",
            "multiple_prompts", "single_prompt"} <= names


def test_preset_inheritance_and_method_lr():
    full = load_config("paper/clip_bart_full_ft")
    assert full.model.backbone == "facebook/bart-base"  # from the base preset
    assert full.model.extra_special_tokens == 200
    assert full.peft.train_lm and full.lr == pytest.approx(1e-4)
    assert load_config("paper/clip_bart_single_lora").lr == pytest.approx(1e-3)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.max_steps=7", "data.tasks=[vqa,gqa]", "train.lr=3e-4",
                             "peft.method=lora", "train.gradient_checkpointing=true"])
    assert cfg.train.max_steps == 7
    assert cfg.data.tasks == ["vqa", "gqa"]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.peft.method == "lora"
    assert cfg.train.gradient_checkpointing is True
    assert load_config("tiny", ["data.tasks=vqa,nlvr2"]).data.tasks == ["vqa", "nlvr2"]


@pytest.mark.parametrize("override, words", [
    (["train.max_stepz=3"], ["train.max_stepz", "max_steps"]),
    (["peft.method=adaptor"], ["peft.method", "adaptor", "hyperformer"]),
    (["peft.sharing=some"], ["peft.sharing", "half_shared"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["data.tasks=[vqa,okvqa]"], ["data.tasks", "okvqa"]),
    (["train.max_steps=abc"], ["train.max_steps", "integer"]),
    (["modle.backbone=t5-small"], ["modle", "model"]),
    (["train.max_steps"], ["key=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="paper/clip_bart_single_adapter"):
        load_config("paper/nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))


def test_preset_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny\ntrain:\n  max_steps: 3\npeft:\n  method: lora\n")
    cfg = load_config(str(p))
    assert cfg.train.max_steps == 3 and cfg.peft.method == "lora" and cfg.model.backbone == "tiny-t5"


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="train_vision"):
        load_config("paper/clip_bart_single_adapter", ["peft.train_vision=true"])
    with pytest.raises(ConfigError, match="mixes image and video"):
        load_config("tiny", ["data.tasks=[vqa,tvqa]"])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_train_without_config_trains_the_embedded_default(launcher):
    """launchers/train.py with no --config (the Quickstart's command) builds the embedded default."""
    args = launcher("train").parse_args([])
    assert args.config is None and args.overrides == [] and args.deepspeed.endswith("ds_configs/zero3.json")
    cfg = load_config(args.config, args.overrides)
    assert cfg.name == "default" and cfg.to_dict() == load_config("default").to_dict()


@pytest.mark.parametrize("name", ["train", "evaluate", "profile_memory"])
def test_overrides_may_come_before_and_after_flags(launcher, name):
    """``train.py key=value --resume key=value`` (argparse's plain parse refuses the second override)."""
    flag = {"train": "--resume", "evaluate": "--no-progress", "profile_memory": "--json"}[name]
    base = ["--adapter", "runs/x/adapter"] if name == "evaluate" else ["--config", "tiny"]
    args = launcher(name).parse_args(base + ["train.seed=1", flag, "train.lr=0.1"])
    assert args.overrides == ["train.seed=1", "train.lr=0.1"]
