"""Run configuration: presets, overrides, and errors that name the key at fault."""

import dataclasses
import re

import pytest

from vlscale.config import (ConfigError, RunConfig, config_from_dict, field_docs, flat_settings, list_presets,
                            load_config, parse_overrides, registry_backbones, registry_visions)


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


@pytest.mark.parametrize("method, lr", [("multiple_adapters", 3e-4), ("half_shared_adapters", 3e-4),
                                        ("single_adapter", 1e-3), ("hyperformer", 1e-3),
                                        ("multiple_compacters", 1e-3), ("single_compacter", 1e-3),
                                        ("multiple_lora", 1e-3), ("single_lora", 1e-3),
                                        ("multiple_prompts", 1e-3), ("single_prompt", 1e-3), ("full_ft", 1e-4)])
def test_paper_presets_take_the_reference_scripts_learning_rates(method, lr):
    # VL-Adapter's VL-T5/scripts/image/<method>.sh: lr=3e-4 for the per-task (multiple, half-shared) adapters
    assert load_config(f"paper/clip_bart_{method}").lr == pytest.approx(lr)


def test_the_video_preset_takes_the_reference_video_scripts_learning_rate():
    # VL-T5/scripts/video/single_adapter.sh: lr=3e-4, batch 50, 7 epochs (the image scripts' adapters: 1e-3)
    cfg = load_config("paper/video_clip_bart_single_adapter")
    assert cfg.lr == pytest.approx(3e-4) and cfg.train.micro_batch_size == 50


def test_paper_adapters_take_the_reference_gelu_and_the_tables_keep_theirs():
    # the reference's AdapterConfig (and MetaAdapterConfig / CompactorConfig): non_linearity = "gelu_new"
    for name in ("clip_bart_single_adapter", "clip_bart_hyperformer", "clip_bart_single_compacter",
                 "clip_t5_single_adapter", "video_clip_bart_single_adapter"):
        assert load_config(f"paper/{name}").peft.activation == "gelu_tanh", name
    from vlscale.replicate import TABLES, row_overrides

    row = next(r for r in TABLES[1].rows if r.name == "single_adapter")  # the miniature's tables: exact GELU
    assert "peft.activation=gelu" in row_overrides(row, feature_cache="cache")


def test_the_t5_preset_takes_the_reference_t5_batch_for_the_same_epochs():
    # VL-T5/scripts/image/single_adapter.sh: batch_size=300 for t5 (500 for bart), 20 epochs either way
    t5, bart = load_config("paper/clip_t5_single_adapter").train, load_config("paper/clip_bart_single_adapter").train
    assert (t5.micro_batch_size, bart.micro_batch_size) == (300, 500)
    assert t5.max_steps * 300 == pytest.approx(bart.max_steps * 500, rel=1e-4)  # the same examples seen
    assert t5.max_steps / t5.eval_every == pytest.approx(bart.max_steps / bart.eval_every, rel=1e-3)  # each epoch


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.max_steps=7", "data.tasks=[vqa,gqa]", "train.lr=3e-4",
                             "peft.method=lora", "train.gradient_checkpointing=true"])
    assert cfg.train.max_steps == 7
    assert cfg.data.tasks == ["vqa", "gqa"]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.peft.method == "lora"
    assert cfg.train.gradient_checkpointing is True
    assert load_config("tiny", ["data.tasks=vqa,nlvr2"]).data.tasks == ["vqa", "nlvr2"]
    assert load_config("tiny", ["data.tasks=vqa, nlvr2"]).data.tasks == ["vqa", "nlvr2"]  # as one writes a list
    assert load_config("tiny", ["train.max_steps=10.0"]).train.max_steps == 10  # a whole float (JSON, YAML) is an int
    assert load_config("tiny", ["peft.train_vision=true"]).lr == pytest.approx(1e-4)  # fine-tuning CLIP: 1e-4


def test_flat_settings_keeps_hf_columns_whole():
    """A column mapping is one setting (a resume compares it, and names it, as one key), not one per column."""
    flat = flat_settings({"data": {"root": "/d", "hf_columns": {"image": "img", "question": "q"}}, "name": "x"})
    assert flat == {"data.root": "/d", "data.hf_columns": {"image": "img", "question": "q"}, "name": "x"}


def test_a_preset_s_hf_columns_are_replaced_by_a_child_s_not_merged(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("base: tiny\ndata:\n  source: real\n  hf_dataset: /data/hf\n"
                      "  hf_columns: {image: img, question: q}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\ndata:\n  hf_columns: {image: picture}\n")
    assert load_config(str(child)).data.hf_columns == {"image": "picture"}
    assert load_config(str(parent), ["data.hf_columns={image: picture}"]).data.hf_columns == {"image": "picture"}


def test_a_preset_that_includes_itself_is_refused(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\ntrain:\n  max_steps: 3\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"preset .*a\.yaml includes itself through 'base'"):
        load_config(str(a))


@pytest.mark.parametrize("override, words", [
    (["train.max_stepz=3"], ["train.max_stepz", "max_steps"]),
    (["peft.method=adaptor"], ["peft.method", "adaptor", "hyperformer"]),
    (["peft.sharing=some"], ["peft.sharing", "half_shared"]),
    (["train.precision=fp8"], ["train.precision", "bf16"]),
    (["data.tasks=[vqa,okvqa]"], ["data.tasks", "okvqa"]),
    (["train.max_steps=abc"], ["train.max_steps", "integer"]),
    (["modle.backbone=t5-small"], ["modle", "model"]),
    (["train.max_steps"], ["key=value"]),
    (["train.eval_max_examples=0"], ["train.eval_max_examples=0", "> 0"]),
    (["train.eval_max_examples=-1"], ["train.eval_max_examples=-1", "> 0"]),
    (["train.save_every=-1"], ["train.save_every=-1", ">= 0"]),
    (["train.eval_every=-5"], ["train.eval_every=-5", ">= 0"]),
    (["train.log_every=0"], ["train.log_every=0", "> 0"]),
    (["data.max_target_length=-1"], ["data.max_target_length=-1", "> 0"]),
    (["data.max_input_length=0"], ["data.max_input_length=0", "> 0"]),
    (["data.image_size=0"], ["data.image_size=0", "> 0"]),
    (["data.image_size=1"], ["data.image_size=1", "synthetic world", ">= 16"]),
    (["data.image_size=15"], ["data.image_size=15", "synthetic world", ">= 16"]),
    (["train.adam_betas=[1.5,2]"], ["train.adam_betas=[1.5, 2.0]", "[0, 1)"]),
    (["train.adam_betas=[0.9,-0.1]"], ["train.adam_betas", "[0, 1)"]),
    (["train.weight_decay=-0.01"], ["train.weight_decay=-0.01", ">= 0"]),
    (["train.adam_eps=0"], ["train.adam_eps=0.0", "> 0"]),
    (["train.clip_grad_norm=-1"], ["train.clip_grad_norm=-1.0", ">= 0"]),
    (["peft.lora_alpha=-32"], ["peft.lora_alpha=-32.0", "> 0"]),
    (["peft.bias=lora"], ["peft.bias", "lora_only", "all"]),
    (["peft.lora_train_bias=maybe"], ["peft.lora_train_bias", "maybe"]),
    (["peft.lora_train_bias=true", "peft.bias=all"], ["peft.lora_train_bias", "peft.bias", "both"]),
    (["output_dir="], ["output_dir=''", "empty"]),
    (["data.tasks=[vqa,gqa,vqa]"], ["data.tasks", "'vqa' twice"]),
    (["model.backbone=t5-smal"], ["model.backbone='t5-smal'", "did you mean 't5-small'?", "bart-base", "hub ids"]),
    (["model.vision=RN1O1"], ["model.vision='RN1O1'", "did you mean 'RN101'?", "ViT-B-32", "tiny-clip-rn"]),
    (["data.hf_dataset=/data/vqa_hf"], ["data.hf_dataset='/data/vqa_hf'", "data.source=synthetic", "data.source=real"]),
    (["data.root=/data"], ["data.root='/data'", "data.source=synthetic", "data.source=real"]),
    (["data.source=real"], ["data.source=real", "data.root", "data.hf_dataset"]),
    (["data.hf_columns={image: img}"], ["data.hf_columns={'image': 'img'}", "read only with data.hf_dataset"]),
    (["data.source=real", "data.root=/data", "data.hf_columns={image: img}"], ["data.hf_columns=", "data.hf_columns={}"]),
    (["train.max_stpes=3"], ["unknown key train.max_stpes; did you mean 'max_steps'?", "valid keys in train"]),
    (["trian.max_steps=3"], ["unknown key trian; did you mean 'train'?"]),
    # the upper ends of [0, 1) ranges, and the other checks no entry above reached (mutation audit)
    (["model.dropout=1"], ["model.dropout=1.0", "[0, 1)"]),
    (["peft.lora_dropout=1"], ["peft.lora_dropout=1.0", "[0, 1)"]),
    (["train.warmup_ratio=1"], ["train.warmup_ratio=1.0", "[0, 1)"]),
    (["train.adam_betas=[0.9,1]"], ["train.adam_betas=[0.9, 1.0]", "[0, 1)"]),
    (["train.adam_betas=[0.9]"], ["train.adam_betas=[0.9]", "two numbers"]),
    (["peft.method=prompt", "peft.sharing=half_shared"], ["peft.sharing=half_shared", "peft.method='prompt'"]),
    (["train.zero_stage=4"], ["train.zero_stage=4", "[0, 1, 2, 3]"]),
    (["model.extra_special_tokens=-1"], ["model.extra_special_tokens=-1", ">= 0"]),
    # round 2: the lower and upper ends no entry above reached, and malformed overrides (mutation audit)
    (["data.synthetic_train=0"], ["data.synthetic_train=0", "> 0"]),
    (["train.eval_batch_size=0"], ["train.eval_batch_size=0", "> 0"]),
    (["model.max_frames=65"], ["model.max_frames=65", "supported 64 frames"]),
    (["train.max_steps=null"], ["train.max_steps may not be null"]),
    (["train=5"], ["train must be a mapping, got 5"]),
    (["=5"], ["override '=5' has an empty key"]),
    (["train.max_steps=true"], ["train.max_steps=True", "must be an integer"]),
    (["train.lr=true"], ["train.lr=True", "must be a number"]),
    (["train.lr=fast"], ["train.lr='fast'", "must be a number"]),
    (["data.hf_columns=5"], ["data.hf_columns=5", "must be a mapping"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    for w in words:
        assert w in str(e.value)


def test_valid_edges_stay_accepted():
    """0 keeps its documented meaning (no clipping, no periodic eval or save, no decay); registry names in
    either form, and open_clip's hub/local-dir schemas, pass; real data with a root or an HF dataset passes."""
    cfg = load_config("tiny", ["train.clip_grad_norm=0", "train.save_every=0", "train.eval_every=0",
                               "train.weight_decay=0", "train.eval_max_examples=5", "train.adam_betas=[0,0.99]"])
    assert (cfg.train.clip_grad_norm, cfg.train.eval_max_examples) == (0.0, 5)
    for backbone in ("t5-small", "google-t5/t5-small", "facebook/bart-base", "flan-t5-xl", "mini-bart"):
        assert load_config("tiny", [f"model.backbone={backbone}"]).model.backbone == backbone
    assert load_config("tiny", ["model.backbone=t5-base", "model.backbone_path=/ckpt/t5", "model.pretrained=true"])
    for vision in ("RN101", "ViT-L-14", "tiny-clip-vit", "hf-hub:timm/some-clip", "local-dir:/models/clip"):
        assert load_config("tiny", [f"model.vision={vision}"]).model.vision == vision
    assert load_config("tiny", ["data.source=real", "data.root=/data"]).data.root == "/data"
    assert load_config("tiny", ["data.source=real", "data.hf_dataset=/data/hf"]).data.hf_dataset == "/data/hf"
    assert load_config("tiny", ["data.image_size=16"]).data.image_size == 16  # the synthetic world's smallest
    assert load_config("tiny", ["data.source=real", "data.root=/data", "data.image_size=8"]).data.image_size == 8
    # a paper preset (real data under data.root) switched to the synthetic world drops its root
    assert load_config("paper/clip_bart_single_adapter", ["data.source=synthetic", "data.root=null"]).data.root is None


def test_ranges_closed_at_zero_take_zero():
    """model.dropout, train.warmup_ratio: [0, 1), so 0 (no dropout, no warm-up) is a value, not an error."""
    cfg = load_config("tiny", ["model.dropout=0", "train.warmup_ratio=0"])
    assert (cfg.model.dropout, cfg.train.warmup_ratio) == (0.0, 0.0)


def test_string_settings_take_what_yaml_reads_as_a_number_or_cannot_parse(tmp_path):
    """``output_dir=2024`` is YAML's int 2024 and ``description=[draft`` no YAML at all: both are the text given."""
    cfg = load_config("tiny", ["output_dir=2024", "description=[draft", "name=1.5"])
    assert (cfg.output_dir, cfg.description, cfg.name) == ("2024", "[draft", "1.5")
    # YAML 1.1 changed the text of others: output_dir=12:30 trained into 750 (base 60), output_dir=007 into 7,
    # name=2024_01 was 202401; a date and 'a: b' were refused as 'must be a string' showing what YAML made of them.
    # A number setting and a null keep YAML's reading.
    cfg = load_config("tiny", ["output_dir=12:30", "name=2024_01", "description=note: x", "model.tokenizer=007",
                               "train.deepspeed=2024-01-05", "train.max_steps=1_000", "model.backbone_path=null"])
    assert (cfg.output_dir, cfg.name, cfg.description, cfg.model.tokenizer, cfg.train.deepspeed) == (
        "12:30", "2024_01", "note: x", "007", "2024-01-05")
    assert (cfg.train.max_steps, cfg.model.backbone_path) == (1000, None)
    # spaces around '=' are not the text (from Python: load_config("tiny", "output_dir = 12:30")); a key under no
    # section is refused as unknown (a TypeError from the str-setting lookup would be a traceback)
    assert parse_overrides(["output_dir = 12:30"]) == {"output_dir": "12:30"}
    with pytest.raises(ConfigError, match=r"^unknown key nope; valid keys: "):
        load_config("tiny", ["nope.a.b=7"])
    # the same in a YAML file (it trained into 750 too)
    (tmp_path / "c.yaml").write_text("base: tiny\noutput_dir: 12:30\nname: 007\nmodel:\n  tokenizer: 2024_01\n"
                                     "  backbone_path: null\ntrain:\n  max_steps: 1_000\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.output_dir, cfg.name, cfg.model.tokenizer, cfg.train.max_steps, cfg.model.backbone_path) == (
        "12:30", "007", "2024_01", 1000, None)
    # a section or a string setting from a merge key: the merged mapping's text (the first of a list that has it)
    (tmp_path / "m.yaml").write_text("base: tiny\n<<: {name: 007, train: {max_steps: 3}}\noutput_dir: 12:30\n"
                                     "model:\n  <<: [{tokenizer: 2024_01}, {tokenizer: 9}]\n")
    cfg = load_config(str(tmp_path / "m.yaml"))
    assert (cfg.name, cfg.train.max_steps, cfg.output_dir, cfg.model.tokenizer) == ("007", 3, "12:30", "2024_01")
    assert parse_overrides(["data.hf_columns={image: img}", "peft.nope=7"]) == {
        "data": {"hf_columns": {"image": "img"}}, "peft": {"nope": 7}}


def test_earlier_lora_train_bias_key_reads_as_peft_bias(caplog):
    """Run configs saved before peft.bias (adapter_config.json, run_config.yaml) still load, the key read as what
    it meant, and say so."""
    saved = load_config("tiny").to_dict()
    for old, new in ((True, "lora_only"), (False, "none")):
        data = {**saved, "peft": {k: v for k, v in saved["peft"].items() if k != "bias"} | {"lora_train_bias": old}}
        with caplog.at_level("WARNING", logger="vlscale.config"):
            assert config_from_dict(data).peft.bias == new
        assert f"peft.lora_train_bias={str(old).lower()} is an earlier name: read as peft.bias={new}" in caplog.text
    assert load_config("tiny", ["peft.lora_train_bias=false"]).peft.bias == "none"


def test_real_source_without_data_is_refused_for_saved_configs_too():
    """evaluate.py rebuilds a run from its saved dict (config_from_dict): the same check applies."""
    saved = load_config("tiny").to_dict()
    saved["data"]["source"] = "real"
    with pytest.raises(ConfigError, match="data.source=real needs data.root"):
        config_from_dict(saved)


def test_registry_names_match_the_registries():
    """config.py reads the names without importing torch or open_clip; they must be exactly what the
    registries accept."""
    import open_clip

    from vlscale.modeling.backbones import LM_REGISTRY, canonical_lm_name
    from vlscale.modeling.vision import register_tiny_models

    full = set(LM_REGISTRY)
    assert set(registry_backbones()) == full | {n.split("/")[-1] for n in full}
    for name in registry_backbones():
        canonical_lm_name(name)  # KeyError if the registry refused it
    register_tiny_models()
    assert set(registry_visions()) == set(open_clip.list_models())


def test_unknown_preset_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="paper/clip_bart_single_adapter"):
        load_config("paper/nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"  # an unknown key in a file names the file (an override's does not)
    typo.write_text("base: tiny\ntrain:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=rf"^unknown key train\.max_stpes \(written in --config {typo}, or a preset it "
                                          r"builds on\); did you mean 'max_steps'\?"):
        load_config(str(typo))


def test_preset_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny\ntrain:\n  max_steps: 3\npeft:\n  method: lora\n")
    cfg = load_config(str(p))
    assert cfg.train.max_steps == 3 and cfg.peft.method == "lora" and cfg.model.backbone == "tiny-t5"


def test_relative_base_resolves_from_the_including_file(tmp_path, monkeypatch):
    """``base: parent.yaml`` names the file beside the child, wherever the command runs from."""
    folder = tmp_path / "cfg"
    (folder / "common").mkdir(parents=True)
    (folder / "relbase_parent.yaml").write_text("base: common/grand.yaml\ntrain:\n  max_steps: 4\n")
    (folder / "common" / "grand.yaml").write_text("base: tiny\npeft:\n  method: lora\n")
    (folder / "relbase_child.yaml").write_text("base: relbase_parent.yaml\ntrain:\n  seed: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (folder, elsewhere):
        monkeypatch.chdir(cwd)
        cfg = load_config(str(folder / "relbase_child.yaml"))
        assert (cfg.train.max_steps, cfg.train.seed, cfg.peft.method, cfg.model.backbone) == (4, 3, "lora", "tiny-t5")
    monkeypatch.chdir(tmp_path)
    assert load_config("cfg/relbase_child.yaml").train.max_steps == 4  # a relative path to the child too


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="train_vision"):
        load_config("paper/clip_bart_single_adapter", ["peft.train_vision=true"])
    with pytest.raises(ConfigError, match="mixes image and video"):
        load_config("tiny", ["data.tasks=[vqa,tvqa]"])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match=r"override 'train\.max_steps' conflicts with another override"):
        parse_overrides(["train=5", "train.max_steps=3"])


def test_an_override_with_a_hash_is_taken_as_written():
    """YAML reads ' #...' (or a leading '#') as a comment: output_dir="runs/run #2" trained into runs/run, silently,
    and output_dir=#2 was 'may not be null'. A quoted value keeps its own reading; a number with a comment is
    refused naming it."""
    assert parse_overrides(["output_dir=runs/run #2", "name=#2", "description=a\t#b", "model.tokenizer='t #1'"]) == {
        "output_dir": "runs/run #2", "name": "#2", "description": "a\t#b", "model": {"tokenizer": "t #1"}}
    assert load_config("tiny", ["output_dir=runs/é x/run #2"]).output_dir == "runs/é x/run #2"
    with pytest.raises(ConfigError, match=r"^train\.max_steps='5 #x' must be an integer$"):
        load_config("tiny", ["train.max_steps=5 #x"])
    # a quoted or bracketed value after spaces keeps YAML's reading too (its comment dropped), as with none before it
    assert parse_overrides(["model.tokenizer= 't #1'", "data.tasks=[vqa, gqa] #both"]) == {
        "model": {"tokenizer": "t #1"}, "data": {"tasks": ["vqa", "gqa"]}}


def test_overrides_from_python_take_one_string_or_a_dict():
    """load_config("tiny", "train.max_steps=3") read the string one character at a time ("override 'p' is not of
    the form key=value") and a dict by its keys alone: one string is one override, a dict's keys are dotted or
    nested and its values taken as given (then checked as any override's)."""
    assert parse_overrides("train.max_steps=3") == {"train": {"max_steps": 3}}
    assert parse_overrides({"train.max_steps": 3, "peft": {"method": "lora"}, "data.tasks": ["vqa"]}) == \
        {"train": {"max_steps": 3}, "peft": {"method": "lora"}, "data": {"tasks": ["vqa"]}}
    for given in ("peft.method=lora", {"peft.method": "lora"}, {"peft": {"method": "lora"}}):
        assert load_config("tiny", given).peft.method == "lora"
    with pytest.raises(ConfigError, match=r"^train\.max_steps='3' must be an integer$"):
        load_config("tiny", {"train.max_steps": "3"})
    with pytest.raises(ConfigError, match=r"^override 3 is not of the form key=value"):
        parse_overrides(["train.max_steps=3", 3])


def test_a_section_built_in_python_refuses_a_string_for_a_number_naming_the_key():
    """TrainConfig(max_steps="3") (no YAML coercion) was a TypeError from math.isfinite naming no key."""
    from vlscale.config import PeftConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"^train\.max_steps='3' must be a number$"):
        TrainConfig(max_steps="3")
    with pytest.raises(ConfigError, match=r"^peft\.reduction_factor=True must be a number$"):
        PeftConfig(reduction_factor=True)


def test_a_key_given_twice_takes_its_last_value():
    """As argparse with a repeated flag (README, "Configuration"): the harness and replicate.py lay settings over
    a base line this way."""
    assert parse_overrides(["train.max_steps=10", "data.tasks=[vqa]", "train.max_steps=20"]) == \
        {"train": {"max_steps": 20}, "data": {"tasks": ["vqa"]}}
    assert load_config("tiny", ["train.max_steps=10", "train.max_steps=20"]).train.max_steps == 20


def test_train_without_config_trains_the_embedded_default(launcher):
    """launchers/train.py with no --config (the Quickstart's command) builds the embedded default."""
    args = launcher("train").parse_args([])
    assert args.config is None and args.overrides == [] and args.deepspeed is None
    cfg = load_config(args.config, args.overrides)
    assert cfg.name == "default" and cfg.to_dict() == load_config("default").to_dict()
    assert cfg.train.deepspeed is None  # so train.py takes ds_configs/zero3.json


def test_train_refuses_a_deepspeed_file_that_is_not_there_in_one_line(launcher, capsys, tmp_path):
    """A --deepspeed (or train.deepspeed) path that does not exist stopped launchers/train.py with a traceback
    from its pre-start check; it is one line naming the option, before any process group starts."""
    nope = tmp_path / "nope.json"
    for argv, option in ((["--deepspeed", str(nope)], "--deepspeed"), ([f"train.deepspeed={nope}"], "train.deepspeed")):
        assert launcher("train").main([*argv, f"output_dir={tmp_path / 'run'}"]) == 1
        err = capsys.readouterr().err
        assert err == (f"vlscale: rank 0: DeepSpeedConfigError: {option}: DeepSpeed config file {str(nope)!r} does not "
                       "exist (shipped: ds_configs/zero2.json, zero3.json, zero3_offload.json, zero3_nvme.json)\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["train", "evaluate", "profile_memory"])
def test_overrides_may_come_before_and_after_flags(launcher, name):
    """``train.py key=value --resume key=value`` (argparse's plain parse refuses the second override)."""
    flag = {"train": "--resume", "evaluate": "--no-progress", "profile_memory": "--json"}[name]
    base = ["--adapter", "runs/x/adapter"] if name == "evaluate" else ["--config", "tiny"]
    args = launcher(name).parse_args(base + ["train.seed=1", flag, "train.lr=0.1"])
    assert args.overrides == ["train.seed=1", "train.lr=0.1"]


def test_launchers_refuse_empty_step_and_row_choices(launcher, capsys, tmp_path):
    """--stop-after-steps 0 or -1 (the run trained on to the end) and --methods naming no row (an empty
    variable: every row ran) are refused."""
    for k in ("0", "-1"):
        with pytest.raises(SystemExit):
            launcher("train").parse_args(["--stop-after-steps", k])
        assert "K must be >= 1" in capsys.readouterr().err
    assert launcher("replicate").main(["--table", "1", "--methods", ",,,", "--dry-run", "--out", str(tmp_path)]) != 0
    assert "--methods ',,,' names no row" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "# a comment only\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    """An empty (e.g. truncated) --config file trained the bare defaults into runs/default."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: is empty"):
        load_config(str(path))


def test_train_takes_the_local_rank_flag_its_launchers_pass(launcher):
    """DeepSpeed's launcher starts each rank as ``train.py --local_rank=N ...`` and torch.distributed.launch as
    ``--local-rank=N``: either is taken (LOCAL_RANK in the environment says the same), not a parse error, and is
    kept out of the overrides."""
    for flag in ("--local_rank=1", "--local-rank=1"):
        args = launcher("train").parse_args([flag, "--config", "tiny", "train.seed=1"])
        assert args.local_rank == 1 and args.overrides == ["train.seed=1"], flag


def test_every_setting_has_its_meaning_written_beside_its_field():
    """The docstring under each field is the one place a setting's meaning is written (launchers/train.py
    --print-config reads it): a field added without one is caught. The sections' meaning is their class's docstring."""
    sections = [f.default_factory for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)]
    assert len(sections) == 4 and all(cls.__doc__ for cls in sections)
    missing = [f"{cls.__name__}.{f.name}" for cls in [RunConfig, *sections] for f in dataclasses.fields(cls)
               if f.default_factory not in sections and f.name not in field_docs(cls)]
    assert missing == []
    assert field_docs(RunConfig)["description"] == "Free text about the run."
    assert all("\n" not in doc and "  " not in doc for cls in sections for doc in field_docs(cls).values())  # 1 line
