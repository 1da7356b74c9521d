"""Where a run's weights come from, as the config says it (model.backbone / backbone_path / pretrained), and
numbers that are not numbers: each wrong setting is one ConfigError naming the key, before anything builds."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from vlscale.config import ConfigError, config_from_dict, load_config
from vlscale.modeling.backbones import LM_REGISTRY


def _folder(path, name, **changed):
    """A local model folder as save_pretrained writes it, reduced to its config.json (all the check reads)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(LM_REGISTRY[name], vocab_size=721, **changed)))
    return path


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.lr=.inf", "train.weight_decay=.nan",
                                      "train.clip_grad_norm=.inf", "train.adam_eps=.nan", "peft.lora_alpha=.nan",
                                      "data.temperature=.inf"])
def test_non_finite_numbers_are_refused(override):
    """NaN passes every `< 0` / `== 0` comparison: a YAML .nan learning rate trained until the loss went NaN."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=(nan|inf) must be a finite number$"):
        load_config("tiny", [override])


def test_a_backbone_path_without_pretrained_is_refused(tmp_path):
    """model.pretrained=false (tiny's default) built random weights and ignored the folder, without a word."""
    folder = _folder(tmp_path / "t5", "tiny-t5")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"model.backbone_path={folder}"])
    for word in (f"model.backbone_path={str(folder)!r}", "model.pretrained=true", "random weights"):
        assert word in str(e.value)
    assert load_config("tiny", [f"model.backbone_path={folder}", "model.pretrained=true"]).model.pretrained


@pytest.mark.parametrize("backbone, folder_of, changed, words", [
    ("tiny-t5", "tiny-t5", {"d_model": 32}, ["d_model=32 (registry 64)", "no registry backbone's architecture"]),
    ("tiny-t5", "tiny-bart", {}, ["model_type='bart' (registry 't5')", "set model.backbone=tiny-bart"]),
    ("bart-base", "google-t5/t5-small", {}, ["is not a bart-base checkpoint", "set model.backbone=t5-small"]),
    ("t5-small", "google/flan-t5-small", {}, ["feed_forward_proj='gated-gelu'", "set model.backbone=flan-t5-small"]),
])
def test_a_backbone_folder_of_another_architecture_is_refused(tmp_path, backbone, folder_of, changed, words):
    """Training loads the folder's own config.json, inspect_model / profile_memory build the registry's:
    a folder of another architecture trained one model and reported another (or, T5 weights under a BART
    name, died in from_pretrained with a traceback)."""
    folder = _folder(tmp_path / "lm", folder_of, **changed)
    overrides = [f"model.backbone={backbone}", f"model.backbone_path={folder}", "model.pretrained=true"]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert f"model.backbone_path={str(folder)!r}" in str(e.value)
    for word in words:
        assert word in str(e.value)
    # the saved config of a run (evaluate.py, --resume) is checked the same way
    saved = load_config("tiny").to_dict()
    saved["model"].update(backbone=backbone, backbone_path=str(folder), pretrained=True)
    with pytest.raises(ConfigError, match="checkpoint"):
        config_from_dict(saved)
    if not changed:  # named as what it is, the folder passes
        load_config("tiny", [f"model.backbone={folder_of}", f"model.backbone_path={folder}", "model.pretrained=true"])


def test_matching_and_absent_folders_pass(tmp_path):
    """A folder of the named architecture (sharded or not: only config.json is read), a hub id, and a
    folder not there (the loader names it when the run builds) are not refused here."""
    folder = _folder(tmp_path / "t5", "google-t5/t5-small")
    for path in (folder, "google-t5/t5-small", tmp_path / "absent"):
        cfg = load_config("tiny", ["model.backbone=t5-small", f"model.backbone_path={path}", "model.pretrained=true"])
        assert cfg.model.backbone_path == str(path)


def test_a_folder_as_model_backbone_says_the_overrides_to_use(tmp_path):
    folder = _folder(tmp_path / "bart", "tiny-bart")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"model.backbone={folder}"])
    assert f"model.backbone=tiny-bart model.backbone_path={folder} model.pretrained=true" in str(e.value)


def test_evaluate_accepts_moved_weights_and_checks_them(tmp_path, monkeypatch, capsys):
    """evaluate.py refused model.backbone_path=NEW as "would change the model": an adapter whose backbone folder
    moved could not be evaluated. It is allowed (as on --resume) and the weights built from there are compared
    with the fingerprint in the run's checkpoint."""
    from vlscale import predict as evaluate  # evaluate.py's model loading
    from vlscale.engine import checkpoint as ckpt

    saved = load_config("tiny", ["model.backbone_path=/old/t5", "model.pretrained=true"]).to_dict()
    monkeypatch.setattr(ckpt, "read_adapter_config", lambda _: {"run_config": saved})
    cfg, meta = evaluate.load_run_config("unused", ["model.backbone_path=/new/t5"])
    assert cfg.model.backbone_path == "/new/t5" and meta["relocated"] == ["model.backbone_path"]
    with pytest.raises(ValueError, match="would change the model"):  # the architecture still may not change
        evaluate.load_run_config("unused", ["model.backbone=t5-small"])

    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    run = tmp_path / "run"
    (run / "checkpoints" / "step4").mkdir(parents=True)
    (run / "checkpoints" / ckpt.LATEST).write_text("step4")
    (run / "checkpoints" / "step4" / "client_state_rank0.json").write_text(
        json.dumps({"step": 4, "frozen": ckpt.frozen_fingerprint(frozen)}))
    assert evaluate.frozen_weights_problem(frozen, run / "adapter", meta) is None
    with torch.no_grad():
        frozen.weight[0, 0] += 0.5
    problem = evaluate.frozen_weights_problem(frozen, run / "adapter", meta)
    assert "model.backbone_path changed" in problem and "weight differs" in problem
    # no checkpoint to compare with: evaluated, with a note
    assert evaluate.frozen_weights_problem(frozen, tmp_path / "other" / "adapter", meta) is None
    assert "are assumed to be the training run's" in capsys.readouterr().err


@pytest.mark.parametrize("pretrained, words", [
    ("no-such-tag", ["'no-such-tag'", "not a known tag"]),
    ("bad.pt", ["bad.pt", "weights_only=True"]),
])
def test_extract_features_names_a_clip_checkpoint_it_cannot_load(tmp_path, launcher, pretrained, words):
    """An open_clip tag that is not there (offline) or a file that is no checkpoint printed open_clip's or
    torch.load's traceback; then a line that said the value, the cause and the remedy twice (the encoder's own
    line wrapped in another): the encoder's line, once."""
    if pretrained == "bad.pt":
        pretrained = str(tmp_path / "bad.pt")
        (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        launcher("extract_features").main(["--synthetic", "--config", "tiny", "--out", str(tmp_path / "cache"),
                                            "--pretrained", pretrained, "data.tasks=[vqa]"])
    assert str(e.value).startswith(f"--pretrained: model.vision_pretrained={pretrained!r}")
    assert "\n" not in str(e.value) and "SourceError" not in str(e.value)  # not wrapped in a second line
    for word in words:
        assert word in str(e.value)
    # the config's model.vision_pretrained (the paper presets' 'openai', offline) was reported as a --pretrained
    # the user never gave, pointing away from the setting training reads and checks the cache against
    with pytest.raises(SystemExit) as e:
        launcher("extract_features").main(["--synthetic", "--config", "tiny", "--out", str(tmp_path / "cache"),
                                            f"model.vision_pretrained={pretrained}", "data.tasks=[vqa]"])
    assert str(e.value).startswith(f"model.vision_pretrained={pretrained!r}")
    assert "\n" not in str(e.value) and "SourceError" not in str(e.value)  # not wrapped in a second line
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("base: tiny\ntrain:\n  max_steps: 3\n  max_steps: 5\n", ["line 4, column 3", "'max_steps' appears twice"]),
    ("base: tiny\ntrain:\n  lr: [1e-3\n", ["not valid YAML: line", "expected ',' or ']'"]),
    ("base: tiny\ntrain:\n  ? [max_steps]\n  : 3\n", ["not valid YAML: line 3, column 5: found unhashable key"]),
    ("base: [tiny]\n", ["base=['tiny'] must be one preset name"]),
    ("base: tinny\n", ["user.yaml: base 'tinny': no preset or file named 'tinny'"]),
])
def test_a_users_preset_file_errors_in_one_line(tmp_path, text, words):
    """A key given twice kept the last one silently; a list as base was a TypeError traceback; YAML's own
    message spanned lines; a missing base did not say which file named it. An unhashable (list) key is YAML's
    own error, not the duplicate check's TypeError."""
    (tmp_path / "user.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "user.yaml"))
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)
    # YAML merge keys still work, a later key overriding a merged one
    (tmp_path / "merge.yaml").write_text("base: tiny\ntrain:\n  <<: {max_steps: 3, lr: 1.0e-3}\n  max_steps: 4\n")
    assert load_config(str(tmp_path / "merge.yaml")).train.max_steps == 4


def test_a_home_folder_in_a_path_setting_is_expanded(tmp_path, monkeypatch):
    """'~/x' in a YAML file's path settings is the home folder's x, as the shell makes it of key=~/x on the command
    line: data.root and data.hf_dataset expanded it and data.feature_cache, output_dir and model.backbone_path read
    './~/x'. A tag or hub id is left as it is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "user.yaml").write_text(
        "base: tiny\noutput_dir: ~/runs/a\nmodel:\n  feature_source: cache\n  vision_pretrained: openai\n"
        "  tokenizer: ~/tok\ndata:\n  source: real\n  feature_cache: ~/cache\n  root: ~/data\n")
    cfg = load_config(str(tmp_path / "user.yaml"))
    assert (cfg.output_dir, cfg.data.feature_cache, cfg.data.root, cfg.model.tokenizer) == (
        str(tmp_path / "runs/a"), str(tmp_path / "cache"), str(tmp_path / "data"), str(tmp_path / "tok"))
    assert cfg.model.vision_pretrained == "openai"
    # a bare '~' (no shell expands data.root=~): YAML's null, 'data.root is not set'; a null elsewhere stays one
    (tmp_path / "home.yaml").write_text("base: tiny\ndata:\n  source: real\n  root: ~\n")
    for cfg in (load_config("tiny", ["data.source=real", "data.root=~", "train.deepspeed=~"]),
                load_config(str(tmp_path / "home.yaml"), ["train.deepspeed=~"])):
        assert (cfg.data.root, cfg.train.deepspeed) == (str(tmp_path), None)
    # an open_clip folder (model.vision=local-dir:~/clip): open_clip read './~/clip'
    assert load_config("tiny", ["model.vision=local-dir:~/clip"]).model.vision == f"local-dir:{tmp_path / 'clip'}"


def test_a_home_folder_in_a_config_path_is_expanded(tmp_path, monkeypatch):
    """--config=~/x.yaml (bash expands '~' after '=' only in NAME=VALUE words) and a preset's base: ~/x.yaml reached
    the loader as './~/x.yaml': 'no file'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base.yaml").write_text("base: tiny\ntrain:\n  max_steps: 7\n")
    (tmp_path / "user.yaml").write_text("base: ~/base.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config("~/user.yaml")
    assert (cfg.train.max_steps, cfg.train.lr, cfg.model.backbone) == (7, 0.5, "tiny-t5")


def test_a_config_that_is_a_folder_names_its_runs_settings(tmp_path):
    """--config runs/a (a run's folder) was 'cannot be read as a YAML preset ([Errno 21] Is a directory)'."""
    with pytest.raises(ConfigError, match=rf"^'{tmp_path}' is a folder, not a preset or YAML file$"):
        load_config(str(tmp_path))
    (tmp_path / "run_config.yaml").write_text("base: tiny\n")
    with pytest.raises(ConfigError, match=rf"^'{tmp_path}' is a folder, not a preset or YAML file; the settings of "
                                          rf"the run there are {tmp_path / 'run_config.yaml'}$"):
        load_config(str(tmp_path))


def test_a_config_file_that_is_not_there_names_the_working_directory(tmp_path, monkeypatch):
    """--config my.yaml (a file meant: a .yaml suffix or a folder in it) that is not there says so, with the
    working directory a relative one was read from; a bare name is still 'no preset or file'."""
    monkeypatch.chdir(tmp_path)
    for name in ("my4.yaml", "my4.yml", os.path.join("cfgs", "my4")):
        with pytest.raises(ConfigError, match=rf"^no file {re.escape(repr(name))} \(read from the working directory "
                                              rf"{re.escape(str(tmp_path))}: .*\), and no shipped preset of that name; "
                                              r"shipped presets: \[.*'tiny'\]$"):
            load_config(name)
    with pytest.raises(ConfigError, match=rf"^no file {re.escape(repr(str(tmp_path / 'my4.yml')))}, and no"):
        load_config(str(tmp_path / "my4.yml"))
    with pytest.raises(ConfigError, match=r"^no preset or file named 'tinny'; did you mean 'tiny'\? shipped presets: "):
        load_config("tinny")
    # a typo in a preset's path names the preset meant (it listed all 28 and left the reader to find it)
    with pytest.raises(ConfigError, match=r", and no shipped preset of that name; did you mean "
                                          r"'scale/clip_t5_large_single_adapter'\? shipped presets: \["):
        load_config("scale/clip_t5_large_single_adaptr")


def test_evaluate_refuses_frozen_weights_that_changed_where_they_were(tmp_path, launcher):
    """evaluate.py compared the frozen weights with the run's fingerprint only when model.backbone_path had
    moved: a folder whose files were replaced since training (another checkpoint saved over it) gave the
    adapter other frozen weights, and it was evaluated on them without a word."""
    from vlscale.data import build_tokenizer
    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.backbones import lm_class, lm_config
    from vlscale.modeling.vl_model import build_model

    def save_lm(seed):
        config = lm_config("tiny-t5", vocab_size=721)
        torch.manual_seed(seed)
        lm_class(config)(config).save_pretrained(tmp_path / "lm")

    save_lm(1)
    cfg = load_config("tiny", ["model.pretrained=true", f"model.backbone_path={tmp_path / 'lm'}", "data.tasks=[vqa]",
                               "data.synthetic_eval=2", "train.eval_batch_size=2"])
    tok = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab_size=len(tok))
    ckpt.save_adapter(model, tmp_path / "run" / "adapter", cfg, tokenizer=tok,
                      extra={"step": 1, "frozen": ckpt.frozen_fingerprint(model)})
    evaluate = launcher("evaluate")
    args = ["--adapter", str(tmp_path / "run" / "adapter"), "--no-progress"]
    assert evaluate.main(args + ["--out", str(tmp_path / "same")]) == 0  # the same weights: evaluated
    save_lm(2)  # other weights saved over the folder the run trained on
    with pytest.raises(ValueError, match=r"not the ones the adapter was trained on: lm\..* differs .*"
                                         r"model\.backbone_path") as e:
        evaluate.main(args + ["--out", str(tmp_path / "other")])
    assert str(tmp_path / "lm") in str(e.value)
    assert not (tmp_path / "other" / "eval_metrics.json").exists()


def test_meta_builds_take_the_backbone_folders_vocabulary(tmp_path, launcher):
    """A model.backbone_path checkpoint whose embeddings outnumber the tokenizer (resized for added tokens) trains
    with the folder's rows, but the meta-device builds used the tokenizer's length: inspect_model and profile_memory
    counted another model than the run's, and evaluate.py refused a full fine-tuning adapter of it before building
    ("shape mismatches ... lm.shared.weight: file (800, 64) vs model (721, 64)")."""
    from vlscale.data import build_tokenizer
    from vlscale.engine import checkpoint as ckpt
    from vlscale.modeling.backbones import lm_class, lm_config
    from vlscale.modeling.vl_model import build_model

    config = lm_config("tiny-t5", vocab_size=800)
    lm_class(config)(config).save_pretrained(tmp_path / "lm")
    cfg = load_config("tiny", ["model.pretrained=true", f"model.backbone_path={tmp_path / 'lm'}", "data.tasks=[vqa]",
                               "peft.method=none", "peft.train_lm=true"])
    tok = build_tokenizer(cfg)
    assert len(tok) == 721
    whole = build_model(cfg, vocab_size=len(tok))
    meta = build_model(cfg, vocab_size=len(tok), device="meta")
    assert whole.lm.get_input_embeddings().num_embeddings == meta.lm.get_input_embeddings().num_embeddings == 800
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in whole.parameters())
    ckpt.save_adapter(whole, tmp_path / "adapter", cfg, tokenizer=tok)
    ckpt.load_adapter(meta, tmp_path / "adapter", check_only=True)  # evaluate.py's check before its build
    report = launcher("inspect_model").inspect(cfg)
    assert report["vocab_size"] == 800 and "model.backbone_path's config.json" in report["vocab_source"]
    assert report["total"] == sum(p.numel() for p in whole.parameters())


def test_a_backbone_folder_whose_vocabulary_is_not_a_positive_integer_is_refused_naming_file_and_key(tmp_path):
    """A model.backbone_path config.json with vocab_size 0, negative or not an int fails from_pretrained (a shape
    mismatch, a negative dimension, transformers' type check), but the meta builds (inspect_model, profile_memory)
    ignored it and counted the registry's vocabulary: the run's config is refused when loaded."""
    from vlscale.modeling.backbones import lm_config

    lm_config("tiny-t5").save_pretrained(tmp_path)
    file = tmp_path / "config.json"
    good = json.loads(file.read_text())
    run = ["model.pretrained=true", f"model.backbone_path={tmp_path}", "data.tasks=[vqa]"]
    for bad in (0, -5, "800", 800.0, True, None):
        file.write_text(json.dumps(dict(good, vocab_size=bad)))
        with pytest.raises(ConfigError, match=re.escape(f"{file}: vocab_size={bad!r} must be a positive integer")):
            load_config("tiny", run)
    file.write_text(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}))  # none given: T5Config's own
    assert load_config("tiny", run).model.backbone_path == str(tmp_path)


def test_inspect_model_takes_a_local_tokenizer_folders_vocabulary(launcher):
    """model.tokenizer naming a local folder loads offline: inspect_model reads its length, as the trainer does (here
    smaller than t5-small's 32,128 embedding rows, which the model keeps), instead of calling it not loaded."""
    from vlscale.data import build_tokenizer

    folder = Path(__file__).resolve().parents[2] / "vlscale" / "assets" / "backbones" / "mini-t5"
    cfg = load_config("tiny", ["model.backbone=t5-small", f"model.tokenizer={folder}", "data.tasks=[vqa]"])
    n = len(build_tokenizer(cfg))
    assert n < 32_000
    report = launcher("inspect_model").inspect(cfg)
    assert (report["vocab_size"], report["vocab_source"]) == (32_128, f"t5-small's registry config; the run's "
                                                                      f"tokenizer: {n:,}")


def test_inspect_model_reads_the_backbone_folders_tokenizer_or_says_why_not(tmp_path, launcher):
    """A model.backbone_path folder (t5-small's config, mini-t5's tokenizer files) loads its tokenizer offline:
    inspect_model reads its length as the trainer does. A tokenizer.json that does not parse is said, with the
    loader's reason, and the registry's vocabulary is counted instead of a traceback."""
    import shutil

    from vlscale.data import build_tokenizer
    from vlscale.modeling.backbones import lm_config

    mini = Path(__file__).resolve().parents[2] / "vlscale" / "assets" / "backbones" / "mini-t5"
    folder = tmp_path / "t5"
    lm_config("t5-small").save_pretrained(folder)
    shutil.copy(mini / "tokenizer_config.json", folder)
    shutil.copy(mini / "tokenizer.json", folder)
    cfg = load_config("tiny", ["model.backbone=t5-small", "model.tokenizer=null", "model.pretrained=true",
                               f"model.backbone_path={folder}", "data.tasks=[vqa]"])
    n = len(build_tokenizer(cfg))
    report = launcher("inspect_model").inspect(cfg)
    assert (report["vocab_size"], report["vocab_source"]) == (32_128, f"model.backbone_path's config.json; the run's "
                                                                      f"tokenizer: {n:,}")
    (folder / "tokenizer.json").write_text("not json")
    report = launcher("inspect_model").inspect(cfg)
    assert report["vocab_size"] == 32_128
    assert report["vocab_source"].startswith(f"model.backbone_path's config.json: 32,128; the tokenizer ({folder}) did "
                                             f"not load: cannot load the tokenizer for model.backbone_path=")
    assert report["vocab_source"].endswith("so a trained model's vocabulary may differ")
    # the folder's vocabulary, not the registry's: it was called "the registry's 32,128" (and built with 32,000), and
    # extra tokens were added to the registry's (32,131) where the load resizes the folder's 32,000 rows
    lm_config("t5-small", vocab_size=32_000).save_pretrained(folder)
    for extra, said in ((0, ""), (3, " + 3 extra tokens")):
        cfg.model.extra_special_tokens = extra
        report = launcher("inspect_model").inspect(cfg)
        assert report["vocab_size"] == 32_000 + extra, extra
        assert report["vocab_source"].startswith(f"model.backbone_path's config.json: 32,000{said}; the tokenizer")


@pytest.mark.parametrize("key", ["model.backbone_path", "model.tokenizer"])
def test_a_missing_tokenizer_folder_is_named_as_missing(tmp_path, key):
    """A folder that is not there (docs/scaling.md's ``model.backbone_path=/data/hf/t5-11b`` on a machine without
    it) is said to be missing, naming the key, instead of huggingface_hub's "Repo id must be in the form ..."."""
    from vlscale.config import SourceError
    from vlscale.data import build_tokenizer

    for absent in (tmp_path / "hf" / "t5-small", "/no-such-t5-small"):  # the latter's folder, /, is here: no hub id
        cfg = load_config("tiny", ["model.backbone=t5-small", "model.pretrained=true", f"{key}={absent}"])
        with pytest.raises(SourceError, match=rf"^{key}='{absent}' does not exist \(expected a local folder, or a "
                                              r"hub id\)$"):
            build_tokenizer(cfg)


def test_a_hub_id_as_backbone_path_is_looked_up_on_the_hub(monkeypatch):
    """model.backbone_path takes a hub id or a local folder (ModelConfig): ``google-t5/t5-small`` goes to
    ``from_pretrained``, where it was refused as a folder that "does not exist" (any path with a slash)."""
    from vlscale.config import SourceError
    from vlscale.modeling.backbones import build_lm, lm_class, lm_config

    asked = []

    def from_pretrained(source, *args, **kwargs):
        asked.append(source)
        raise OSError("no network here")

    monkeypatch.setattr(lm_class(lm_config("t5-small")), "from_pretrained", from_pretrained)
    with pytest.raises(SourceError, match="a hub id needs the network"):
        build_lm("t5-small", pretrained=True, path="google-t5/t5-small")
    assert asked == ["google-t5/t5-small"]


def test_evaluate_checks_every_tasks_records_and_images_before_the_model_is_built(tmp_path, launcher, monkeypatch):
    """evaluate.py checked only that each task's split file is there before building the model: an image missing
    from the second task's split (captions of a test image not in coco/images) was found after the model was built
    and the first task decoded, its predictions lost (found by the bring-your-own-data audit). Every task's examples
    and images are now checked first, as training checks its evaluation splits at start-up."""
    import shutil

    import vlscale.predict
    from vlscale.data import build_tokenizer
    from vlscale.data.real import DataError
    from vlscale.engine import checkpoint as ckpt
    from vlscale.modeling.vl_model import build_model

    root = tmp_path / "data"
    for name in ("vqa", "coco"):
        shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "real_data" / name, root / name)
    karpathy = root / "coco" / "dataset_coco.json"
    data = json.loads(karpathy.read_text())
    test = next(i for i in data["images"] if i["split"] == "test")
    test["filename"] = "COCO_val2014_000000000999.jpg"  # VQA's test image stays; the captions' is not there
    karpathy.write_text(json.dumps(data))
    cfg = load_config("tiny", ["data.source=real", f"data.root={root}", "data.tasks=[vqa,caption]"])
    tok = build_tokenizer(cfg)
    ckpt.save_adapter(build_model(cfg, vocab_size=len(tok)), tmp_path / "run" / "adapter", cfg, tokenizer=tok,
                      extra={"step": 1})
    monkeypatch.setattr(vlscale.predict, "load_trained_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(DataError, match=r"^caption/test: 1 visual id\(s\) .*first \['COCO_val2014_000000000999'\]"):
        launcher("evaluate").main(["--adapter", str(tmp_path / "run" / "adapter"), "--split", "test", "--no-progress",
                                   "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()

    class Built(Exception):
        pass

    def built(*a, **k):
        raise Built

    monkeypatch.setattr(vlscale.predict, "load_trained_model", built)  # reached: the check passed
    test["filename"] = "COCO_val2014_000000000074.jpg"
    karpathy.write_text(json.dumps(data))
    vqa_test = root / "vqa" / "karpathy_test.json"  # a leaderboard's split: no answers, read as --predict-only reads it
    vqa_test.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("label", "answers")}
                                    for r in json.loads(vqa_test.read_text())]))
    with pytest.raises(Built):
        launcher("evaluate").main(["--adapter", str(tmp_path / "run" / "adapter"), "--split", "test", "--no-progress",
                                   "--predict-only", "--out", str(tmp_path / "predict")])
    (root / "coco" / "images" / "COCO_train2014_000000000025.jpg").unlink()  # past train.eval_max_examples=1: unread
    with pytest.raises(Built):
        launcher("evaluate").main(["--adapter", str(tmp_path / "run" / "adapter"), "--split", "train", "--no-progress",
                                   "--tasks", "vqa", "--out", str(tmp_path / "eval"), "train.eval_max_examples=1"])
