"""Making and loading the miniature backbones: faulty weight files are one line naming the file (never a
half-loaded or silently random model), scripts/pretrain_backbones.py refuses settings it cannot run,
writes byte-identical files for the same weights, and what it writes loads through the project's own
loaders; the synthetic tokenizer gives every task's answers back exactly.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "vlscale" / "assets" / "backbones"
CLIP_FILE = ASSETS / "mini-clip-rn.safetensors"

needs_assets = pytest.mark.skipif(not CLIP_FILE.exists() or not (ASSETS / "mini-t5").is_dir(),
                                  reason="miniature backbones not made (python scripts/pretrain_backbones.py)")


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_backbones_integrity",
                                                  ROOT / "scripts" / "pretrain_backbones.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ----------------------------------------------------------------------------- CLIP files

@needs_assets
def test_faulty_clip_files_are_one_line_naming_the_file(tmp_path):
    from vlscale.config import ConfigError
    from vlscale.modeling.vision import build_vision_encoder

    data = CLIP_FILE.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConfigError) as e:
        build_vision_encoder("mini-clip-rn", str(truncated))
    _one_line(e, str(truncated), "truncated or corrupt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as e:
        build_vision_encoder("mini-clip-rn", str(garbage))
    _one_line(e, str(garbage), "cannot read")

    with pytest.raises(ConfigError) as e:
        build_vision_encoder("mini-clip-rn", str(tmp_path))
    _one_line(e, "is a directory")

    # another architecture's CLIP: refused, naming the file and a tensor, not a state-dict dump
    with pytest.raises(ConfigError) as e:
        build_vision_encoder("tiny-clip-rn", str(CLIP_FILE))
    _one_line(e, str(CLIP_FILE), "not a checkpoint of tiny-clip-rn's visual tower", "visual.")

    # a visual tower with a layer too few (or too many) does not half-load
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(CLIP_FILE)).items() if not k.startswith("visual.layer4.")}
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(ConfigError) as e:
        build_vision_encoder("mini-clip-rn", str(partial))
    _one_line(e, str(partial), "missing: visual.layer4.")


# ----------------------------------------------------------------------------- LM folders

@needs_assets
def test_faulty_lm_folders_are_one_line_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    def copy(name):
        d = tmp_path / name
        shutil.copytree(ASSETS / "mini-t5", d)
        return d

    d = copy("truncated")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    _one_line(e, str(weights), "truncated or corrupt")

    d = copy("noconfig")
    (d / "config.json").unlink()  # transformers would build T5Config()'s default architecture
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    _one_line(e, str(d), "no config.json")

    # a T5 folder as mini-bart: from_pretrained would load no tensor and return a random BART
    with pytest.raises(ConfigError) as e:
        build_lm("mini-bart", path=str(ASSETS / "mini-t5"), pretrained=True)
    _one_line(e, str(ASSETS / "mini-t5"), "'t5' model", "mini-bart")

    d = copy("partial")
    state = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if ".block.3." not in k}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:  # the last layers would stay random
        build_lm("mini-t5", path=str(d), pretrained=True)
    _one_line(e, str(d), "no tensor for", "block.3.")

    d = copy("resized")  # another size's tensor: named with both shapes (transformers said "see the above report",
    state = load_file(str(d / "model.safetensors"))  # and the line blamed the hub)
    state["encoder.block.1.layer.1.DenseReluDense.wi.weight"] = torch.zeros(516, 128)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    msg = _one_line(e, str(d), "'encoder.block.1.layer.1.DenseReluDense.wi.weight' has shape [516, 128]",
                    "expects [512, 128]")
    assert "hub" not in msg, msg

    lm = build_lm("mini-t5", path=str(ASSETS / "mini-t5"), pretrained=True)  # the intact folder loads
    assert next(lm.parameters()).dtype == torch.float32


def _mini_t5_copy(d, drop=(), resize=()):
    """The shipped mini-t5 copied to ``d`` with the tensors in ``drop`` left out and those in ``resize`` made
    (516, 128)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ASSETS / "mini-t5", d)
    state = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k not in drop}
    state.update({k: torch.zeros(516, 128) for k in resize})
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@needs_assets
def test_lm_folder_errors_name_the_config_and_count_the_tensors(tmp_path):
    """A config.json that is not JSON, or not a JSON object, is one line naming it (not json's bare error); two
    tensors of another size name the first and count one more; four missing parameters name three and count one."""
    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    def copy(name, drop=(), resize=()):
        return _mini_t5_copy(tmp_path / name, drop, resize)

    for name, text in (("not_json", "{"), ("a_list", "[]")):
        d = copy(name)
        (d / "config.json").write_text(text)
        with pytest.raises(ConfigError) as e:
            build_lm("mini-t5", path=str(d), pretrained=True)
        _one_line(e, f"{d / 'config.json'}: not a readable JSON model config")

    wi = [f"encoder.block.{i}.layer.1.DenseReluDense.wi.weight" for i in (0, 1)]
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(copy("resized", resize=wi)), pretrained=True)
    _one_line(e, f"{wi[0]!r} has shape [516, 128]", "expects [512, 128] (and 1 more)")

    attn = [f"encoder.block.3.layer.0.SelfAttention.{x}.weight" for x in "qkvo"]
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(copy("partial", drop=attn)), pretrained=True)
    _one_line(e, "no tensor for 4 parameter(s)", "and 1 more)")


@needs_assets
def test_one_tensor_of_another_size_and_three_missing_parameters_are_all_named_without_a_count(tmp_path):
    """The counts say how many more there are: one tensor of another size is named alone (no "(and 0 more)"), and
    three missing parameters are all three named, with no "and 0 more"."""
    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    def copy(name, drop=(), resize=()):
        return _mini_t5_copy(tmp_path / name, drop, resize)

    wi = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(copy("resized", resize=[wi])), pretrained=True)
    msg = _one_line(e, f"{wi!r} has shape [516, 128]", "expects [512, 128]: config.json and the weights disagree")
    assert "more" not in msg, msg

    attn = [f"encoder.block.3.layer.0.SelfAttention.{x}.weight" for x in "qkv"]
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(copy("partial", drop=attn)), pretrained=True)
    msg = _one_line(e, f"no tensor for 3 parameter(s) ({', '.join(sorted(attn))}), which would stay random")
    assert "more" not in msg, msg
    with pytest.raises(ConfigError) as e:  # the tied embedding is one parameter (transformers lists its 4 names)
        build_lm("mini-t5", path=str(copy("no_embedding", drop=["shared.weight"])), pretrained=True)
    _one_line(e, "no tensor for 1 parameter(s) (shared.weight), which would stay random")


def test_missing_weights_are_parameters_each_once_never_buffers():
    """The keys from_pretrained calls missing that are weights left random: parameters, each by its first name
    (a tied one is listed under every alias); a buffer, persistent or not, is none (BART's final_logits_bias starts
    at its zeros; a non-persistent one is never in a checkpoint)."""
    from vlscale.modeling.backbones import _missing_parameters

    m = torch.nn.Module()
    m.shared = torch.nn.Embedding(4, 2)
    m.lm_head = torch.nn.Linear(2, 4, bias=False)
    m.lm_head.weight = m.shared.weight
    m.w = torch.nn.Parameter(torch.zeros(1))
    m.register_buffer("kept", torch.zeros(1))
    m.register_buffer("scratch", torch.zeros(1), persistent=False)
    every = {"shared.weight", "lm_head.weight", "w", "kept", "scratch"}
    assert _missing_parameters(m, {"missing_keys": every}) == ["shared.weight", "w"]
    assert _missing_parameters(m, {"missing_keys": {"kept", "scratch"}}) == _missing_parameters(m, {}) == []


@needs_assets
def test_pytorch_bin_weights_without_a_config_are_named_like_safetensors_ones(tmp_path):
    """A folder of pytorch_model.bin without config.json is refused naming the file, as a safetensors one is:
    from_pretrained would otherwise build the class's default architecture around it."""
    from safetensors.torch import load_file

    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    d = tmp_path / "bin_only"
    d.mkdir()
    torch.save(load_file(str(ASSETS / "mini-t5" / "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    _one_line(e, f"model.backbone_path={str(d)!r} has weights (pytorch_model.bin) but no config.json")



@needs_assets
def test_a_corrupt_pytorch_bin_is_one_line_naming_the_file(tmp_path):
    """A pytorch_model.bin that does not unpickle (beside a good config.json) is one line naming the file, not torch's
    bare UnpicklingError, whose advice to re-run torch.load with weights_only=False would run arbitrary code; a
    truncated one is one line naming its folder and key, not torch's bare RuntimeError."""
    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    d = tmp_path / "garbage_bin"
    d.mkdir()
    shutil.copy(ASSETS / "mini-t5" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    msg = _one_line(e, str(d / "pytorch_model.bin"), "not a readable PyTorch weights file", "truncated or corrupt",
                    f"(model.backbone_path={str(d)!r})")
    assert "weights_only" not in msg, msg

    # a truncated one (torch.load's RuntimeError): one line naming the folder and its key, not a bare RuntimeError
    from safetensors.torch import load_file

    d = tmp_path / "truncated_bin"
    d.mkdir()
    shutil.copy(ASSETS / "mini-t5" / "config.json", d)
    torch.save(load_file(str(ASSETS / "mini-t5" / "model.safetensors")), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as e:
        build_lm("mini-t5", path=str(d), pretrained=True)
    msg = _one_line(e, f"cannot load the weights for model.backbone_path={str(d)!r} (a local directory needs "
                       "config.json and the weights)", "zip archive")
    assert "hf download" not in msg, msg  # a folder there: no hub id to download (config.offline_hint)

@needs_assets
def test_a_faulty_shipped_folder_is_named_under_model_backbone(tmp_path, monkeypatch):
    """Weights found through model.backbone (no model.backbone_path set) are reported under model.backbone, the
    key the user set: naming model.backbone_path would send them to a key they never wrote."""
    import vlscale.modeling.backbones as backbones
    from vlscale.config import ConfigError

    shutil.copytree(ASSETS / "mini-t5", tmp_path / "mini-t5")
    weights = tmp_path / "mini-t5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    monkeypatch.setattr(backbones, "ASSET_DIR", tmp_path)
    with pytest.raises(ConfigError) as e:
        backbones.build_lm("mini-t5", pretrained=True)
    msg = _one_line(e, str(weights), "truncated or corrupt", f"(model.backbone={str(tmp_path / 'mini-t5')!r})")
    assert "backbone_path" not in msg, msg


@needs_assets
def test_a_pretrained_load_takes_the_config_overrides():
    """model.dropout reaches a loaded checkpoint as it does a random build (from_pretrained gets the overrides)."""
    from vlscale.modeling.backbones import build_lm

    lm = build_lm("mini-t5", path=str(ASSETS / "mini-t5"), pretrained=True, config_overrides={"dropout_rate": 0.3})
    assert lm.config.dropout_rate == 0.3
    assert {m.p for m in lm.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


@needs_assets
def test_a_pretrained_load_is_in_the_dtype_asked_for():
    """A bf16 run loads its checkpoint (fp16 on disk) in bf16, not in the file's or the default dtype."""
    from vlscale.modeling.backbones import build_lm

    lm = build_lm("mini-t5", path=str(ASSETS / "mini-t5"), pretrained=True, dtype=torch.bfloat16)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}


def test_pretrained_weights_on_no_hub_are_refused_at_once(tmp_path, monkeypatch):
    """``tiny-*`` are random test architectures and ``mini-*`` ship in the package: neither is on the hub,
    so a missing folder is reported at once (not after a minute of hub retries without network)."""
    import vlscale.modeling.backbones as backbones
    from vlscale.config import ConfigError

    with pytest.raises(ConfigError) as e:
        backbones.build_lm("tiny-t5", pretrained=True)
    _one_line(e, "model.backbone=tiny-t5", "model.pretrained=false")
    monkeypatch.setattr(backbones, "ASSET_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError) as e:
        backbones.build_lm("mini-bart", pretrained=True)
    assert isinstance(e.value, ConfigError)
    _one_line(e, str(tmp_path / "gone" / "mini-bart"), "scripts/pretrain_backbones.py")


def test_a_backbone_path_not_there_is_named_with_the_working_directory(tmp_path, monkeypatch):
    """A model.backbone_path that is no folder here (a relative one, as an adapter's config keeps it, read from
    another folder) is tried as a hub id; its refusal said only that a hub id needs the network. It now says it is
    not a local folder, read from which working directory (found by the bring-your-own-data audit). The hub's
    answer is stood in for: transformers' OSError, as offline. Where its parent folder is here (weights/ for
    weights/t5) it is a folder missing there, refused before any hub look-up: it was told to `hf download
    weights/t5`."""
    from transformers import T5ForConditionalGeneration

    import vlscale.modeling.backbones as backbones
    from vlscale.config import ConfigError

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(T5ForConditionalGeneration, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        backbones.build_lm("tiny-t5", path="weights/t5", pretrained=True)
    _one_line(e, f"cannot load the weights for model.backbone_path='weights/t5' (not a local folder (read from the "
                 f"working directory {tmp_path}: run from the folder it is relative to, or give its absolute path); "
                 f"a hub id needs the network or a local HF cache): We couldn't connect",
              "(hf download weights/t5 --local-dir DIR)")  # no weights/ here: either may be meant, both said
    (tmp_path / "weights").mkdir()  # weights/ here: a folder missing in it, not a hub id to download
    for build in (lambda: backbones.build_lm("tiny-t5", path="weights/t5", pretrained=True),
                  lambda: backbones.pretrained_source("tiny-t5", "weights/t5")):  # launchers/train.py's check
        with pytest.raises(ConfigError) as e:
            build()
        assert str(e.value) == (f"model.backbone_path='weights/t5' does not exist (read from the working directory "
                                f"{tmp_path}: run from the folder it is relative to, or give its absolute path); give "
                                "model.backbone_path=DIR, the folder the weights are in now (not looked up on the hub: "
                                "its folder 'weights' is here)")
    with pytest.raises(ConfigError) as e:  # model.backbone's hub id is no folder meant: no working directory
        backbones.build_lm("t5-small", pretrained=True)
    _one_line(e, "cannot load the weights for model.backbone='google-t5/t5-small' (a hub id needs the network or a "
                 "local HF cache): We couldn't connect", "to load the files; to use a hub id without network here, "
                 "download it once where there is (hf download google-t5/t5-small --local-dir DIR) and give "
                 "model.backbone_path=DIR")


def test_the_zero3_loader_checks_folders_and_sources_the_same_way(tmp_path, monkeypatch):
    """build_lm_zero3 (pretrained backbones under ZeRO-3) looked tiny-*/missing mini-* up on the hub, gave a
    bare SafetensorError for a truncated file and a hub hint for a missing folder: the same one-line errors as
    build_lm now."""
    from vlscale.config import ConfigError
    from vlscale.engine.sharded_loading import ShardedLoadError, build_lm_zero3, checkpoint_files

    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ConfigError) as e:
        build_lm_zero3("tiny-t5", ds_config=ds, pretrained=True)
    _one_line(e, "model.backbone=tiny-t5", "model.pretrained=false")
    # a model.backbone_path that is not there: it read "is not a local directory" and advised downloading
    # mini-t5 (a shipped miniature no hub has) with `hf download`
    missing = str(tmp_path / "mini-t5")
    with pytest.raises(ConfigError, match=rf"^model\.backbone_path={re.escape(repr(missing))} does not exist; "
                                          r"give model\.backbone_path=DIR, the folder the weights are in now$"):
        build_lm_zero3("mini-t5", ds_config=ds, path=missing, pretrained=True)
    monkeypatch.chdir(tmp_path)  # a relative one (an adapter's config keeps it as given) says where it was read
    with pytest.raises(ConfigError, match=r"^model\.backbone_path='\./weights/mini-t5' does not exist \(read from the "
                       rf"working directory {re.escape(str(tmp_path))}: run from the folder it is relative to"):
        build_lm_zero3("mini-t5", ds_config=ds, path="./weights/mini-t5", pretrained=True)
    d = tmp_path / "truncated"
    shutil.copytree(ASSETS / "mini-t5", d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(ConfigError) as e:
        build_lm_zero3("mini-t5", ds_config=ds, path=str(d), pretrained=True)
    _one_line(e, str(weights), "truncated or corrupt")
    with pytest.raises(ShardedLoadError) as e:
        checkpoint_files(d)
    _one_line(e, str(weights), "truncated or corrupt")


def test_the_zero3_loader_names_a_download_command_the_installed_hub_client_has():
    """Under ZeRO-3 a pretrained backbone loads rank by rank from a local folder only: a hub id without
    model.backbone_path is refused in one line that says how to download it. huggingface_hub 1.0 dropped the
    ``huggingface-cli`` command for ``hf`` (transformers 5 needs a hub client >= 1.0), so the line named a
    command no supported install has; it names one that the installed huggingface_hub provides."""
    import importlib.metadata

    from vlscale.engine.sharded_loading import ShardedLoadError, build_lm_zero3

    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ShardedLoadError) as e:
        build_lm_zero3("google-t5/t5-small", ds_config=ds, pretrained=True)
    msg = _one_line(e, "model.backbone_path='google-t5/t5-small' is not a local directory",
                    "download google-t5/t5-small --local-dir DIR")
    command = msg.split("e.g. `", 1)[1].split()[0]
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
               if ep.group == "console_scripts"}
    assert command in scripts, (command, sorted(scripts))

# ----------------------------------------------------------------------------- the tokenizer

def test_corrupt_sentencepiece_model_is_named(tmp_path):
    from vlscale.data.tokenizer import SYNTHETIC_SPM, synthetic_tokenizer

    bad = tmp_path / "spm.model"
    bad.write_bytes(SYNTHETIC_SPM.read_bytes()[:4000])
    with pytest.raises(ValueError) as e:  # not transformers' "tiktoken is required"
        synthetic_tokenizer(bad)
    _one_line(e, str(bad), "not a readable SentencePiece model", "make_tokenizer.py")


def test_every_task_answer_round_trips_through_the_synthetic_tokenizer():
    """An answer the tokenizer cannot give back can never be scored right."""
    from vlscale.data.synthetic import generate_split
    from vlscale.data.tasks import TASKS
    from vlscale.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    for task in TASKS:
        texts = {t for e in generate_split(task, "train", 40, image_size=16).examples
                 for t in [e.target, *e.references]}
        for text in texts:
            ids = tok(text).input_ids
            assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id, (task, text, ids)
            assert tok.decode(ids, skip_special_tokens=True) == text, (task, text)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_integrity", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_tokenizer_seeds_every_substring_of_each_word_by_frequency():
    """The trainer's seed pieces: every 2..max_len-character substring of each word, the word '▁'-prefixed
    as SentencePiece writes a word start, weighted by the word's count, most frequent first."""
    make = _script("make_tokenizer")
    assert make.seed_pieces(["ab ab", "c"]) == [("ab", 2), ("\u2581a", 2), ("\u2581ab", 2), ("\u2581c", 1)]
    assert [p for p, _ in make.seed_pieces(["abc"], max_len=2)] == ["ab", "bc", "\u2581a"]


def test_make_tokenizer_writes_a_model_the_project_loads(tmp_path):
    """A model trained into a new folder has T5's special ids plus bos, covers every printable ASCII
    character, loads through synthetic_tokenizer, and the piece count returned is the file's."""
    import string

    import sentencepiece as spm

    from vlscale.data.tokenizer import synthetic_tokenizer

    make = _script("make_tokenizer")
    out = tmp_path / "new" / "spm.model"
    n = make.train(out, n_per_task=5)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert n == sp.get_piece_size()
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, 3)
    for c in string.ascii_letters + string.digits + string.punctuation:
        assert sp.unk_id() not in sp.encode(c), c
    tok = synthetic_tokenizer(out)
    text = "a small red circle at the top left?"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_make_tokenizer_check_remakes_the_shipped_model_and_fails_on_any_other(tmp_path, capsys, monkeypatch):
    """--check re-trains in a fresh process's temporary folder: the shipped model comes out byte for byte
    (the same corpus and settings, the seed file's temporary path blanked); another or a missing file fails."""
    from vlscale.data.tokenizer import SYNTHETIC_SPM

    make = _script("make_tokenizer")
    assert make.main(["--check", "--out", str(SYNTHETIC_SPM)]) == 0
    assert "up to date" in capsys.readouterr().out
    # the comparison itself, on a stand-in trainer
    monkeypatch.setattr(make, "train", lambda out, n_per_task=400: out.write_bytes(b"model"))
    (tmp_path / "same.model").write_bytes(b"model")
    (tmp_path / "other.model").write_bytes(b"modeL")
    assert make.main(["--check", "--out", str(tmp_path / "same.model")]) == 0
    for name in ("other.model", "missing.model"):
        assert make.main(["--check", "--out", str(tmp_path / name)]) == 1, name
        assert f"{tmp_path / name}: DIFFERS from a fresh training run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the script

@pytest.mark.parametrize("argv, flag", [
    (["--only", "bart", "--lm-max-len", "200"], "--lm-max-len"),  # BART has 128 learned positions
    (["--lm-max-len", "5"], "--lm-max-len"),
    (["--log-every", "0"], "--log-every"),
    (["--lm-steps", "0"], "--lm-steps"),
    (["--clip-batch", "1"], "--clip-batch"),  # a contrastive loss of 0
    (["--clip-lr", "nan"], "--clip-lr"),
    (["--threads", "0"], "--threads"),
    (["--only", "bart", "--lm-max-len", "128"], "--lm-max-len"),  # 128 tokens and eos need 129 positions
    (["--lm-batch", "0"], "--lm-batch"),
    (["--lm-lr", "0"], "--lm-lr"),
    (["--only", "clip,vit"], "--only"),
    (["--only", ","], "--only"),
])
def test_script_refuses_settings_it_cannot_run(pretrain, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(argv)
    assert e.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_script_check_of_missing_files_fails(pretrain, tmp_path, capsys):
    assert pretrain.main(["--check", "--out", str(tmp_path / "none")]) == 1
    assert "missing" in capsys.readouterr().err
    (tmp_path / "mini-t5").mkdir()
    assert pretrain.main(["--check", "--out", str(tmp_path), "--only", "clip"]) == 1


def test_script_files_are_byte_identical_for_the_same_weights(pretrain, tmp_path):
    """safetensors writes metadata in hash-map order: without sorting it, the same weights give files
    of other sha256 (the fingerprint vlscale.replicate keys feature caches and results on)."""
    import json

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    meta = {f"key{i}": str(i) for i in range(6)}
    blobs = set()
    for i in range(6):
        path = tmp_path / f"w{i}.safetensors"
        pretrain.save_fp16_state(state, path, meta)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        keys = list(json.loads(raw[8:8 + n])["__metadata__"])
        assert keys == sorted(keys), keys
        blobs.add(raw)
    assert len(blobs) == 1


def test_script_outputs_load_through_the_project_loaders(pretrain, tmp_path):
    """What the script writes (--out anywhere) loads through model.vision_pretrained / model.backbone_path
    to the weights it saved (rounded to fp16), its config says float32, and its folder's tokenizer is the
    synthetic one."""
    import json

    from transformers import AutoTokenizer

    from vlscale.data.tokenizer import synthetic_tokenizer
    from vlscale.modeling.backbones import build_lm
    from vlscale.modeling.vision import build_vision_encoder

    clip = pretrain.build_clip(seed=3)
    clip_file = tmp_path / "mini-clip-rn.safetensors"
    pretrain.save_fp16_state(clip.state_dict(), clip_file, {"objective": "test"})
    enc = build_vision_encoder("mini-clip-rn", str(clip_file))
    for k, v in clip.visual.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(enc.visual.state_dict()[k], expected), k

    tok = synthetic_tokenizer()
    lm = pretrain.initial_lm("t5", seed=3)
    pretrain.save_lm(lm, tok, tmp_path / "mini-t5")
    loaded = build_lm("mini-t5", path=str(tmp_path / "mini-t5"), pretrained=True)
    for k, v in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    config = json.loads((tmp_path / "mini-t5" / "config.json").read_text())
    assert {config.get(k) for k in ("dtype", "torch_dtype")} - {None} == {"float32"}, config
    folder_tok = AutoTokenizer.from_pretrained(str(tmp_path / "mini-t5"))
    text = "vqa: how many red circles are there? <extra_id_0> 3."
    assert folder_tok(text).input_ids == tok(text).input_ids


@needs_assets
def test_script_check_compares_with_the_initialisation_training_used(pretrain, tmp_path, monkeypatch):
    """--check's random-weight baseline is the model pretraining started from (BART: sinusoidal positions)."""
    shutil.copytree(ASSETS / "mini-bart", tmp_path / "mini-bart")
    seen = []

    def fake_loss(lm, kind, tokenizer, seed, **kw):
        seen.append(lm.model.encoder.embed_positions.weight.detach().clone())
        return 0.0

    monkeypatch.setattr(pretrain, "denoising_loss", fake_loss)
    monkeypatch.setattr(pretrain, "encoder_use", lambda *a, **k: {})
    pretrain.check(tmp_path, 0, lambda msg: None, parts=("bart",))
    assert len(seen) == 2  # the shipped model, then the random baseline
    torch.testing.assert_close(seen[1], pretrain.initial_lm("bart", 0).model.encoder.embed_positions.weight)
    assert float(seen[1][2, 1]) == pytest.approx(0.1)  # row 2 = position 0: 0.1 * cos(0), not a random draw


def test_script_scenes_and_their_sentences_agree(pretrain):
    """1..4 objects in distinct cells, each drawn inside its cell; a paragraph is the description plus 1..3
    other sentences, and a relation sentence says where the first object is from the second."""
    from vlscale.data.synthetic import GRID

    counts, lengths, relations = set(), set(), 0
    for i in range(300):
        rng = pretrain.stream_rng(0, "lm-train", i)
        objs = pretrain.random_scene(rng)
        counts.add(len(objs))
        assert len({(o["row"], o["col"]) for o in objs}) == len(objs), objs
        for o in objs:
            assert int(o["x"] * GRID) == o["col"] and int(o["y"] * GRID) == o["row"], o
        sentences = pretrain.paragraph(objs, rng)
        lengths.add(len(sentences))
        for s in sentences[1:]:
            for rel, holds in (("to the left of", lambda a, b: a["col"] < b["col"]),
                               ("to the right of", lambda a, b: a["col"] > b["col"]),
                               ("above", lambda a, b: a["row"] < b["row"]),
                               ("below", lambda a, b: a["row"] > b["row"])):
                if f" is {rel} the " in s:
                    first, second = s.removeprefix("the ").removesuffix(".").split(f" is {rel} the ")
                    a, = [o for o in objs if f"{o['color']} {o['shape']}" == first]
                    b, = [o for o in objs if f"{o['color']} {o['shape']}" == second]
                    assert holds(a, b), (s, objs)
                    relations += 1
    assert counts == {1, 2, 3, 4} and lengths == {2, 3, 4} and relations > 20, (counts, lengths, relations)


def test_script_caption_tokens_fit_the_clip_context(pretrain):
    """Captions are ids + eos right-padded with 0; one longer than the context is refused, naming it."""
    from vlscale.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    caption = "a small red circle at the top left."
    ids = tok(caption).input_ids
    out = pretrain.tokenize_captions(tok, [caption, "a circle."], len(ids))
    assert out[0].tolist() == ids and ids[-1] == tok.eos_token_id
    short = tok("a circle.").input_ids
    assert out[1].tolist() == short + [0] * (len(ids) - len(short))
    with pytest.raises(ValueError, match=f"caption {caption!r} has {len(ids)} tokens > CLIP context {len(ids) - 1}"):
        pretrain.tokenize_captions(tok, [caption], len(ids) - 1)


def test_script_retrieval_scores_each_direction_and_restores_the_mode(pretrain):
    """image->text takes each image's best caption (rows), text->image each caption's best image (columns);
    the model is scored in eval mode and handed back in the mode it came in."""
    from vlscale.data.tokenizer import synthetic_tokenizer

    class Fake(torch.nn.Module):
        context_length = 77
        modes = []

        def encode_image(self, pixels, normalize):
            self.modes.append(self.training)
            return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

        def encode_text(self, tokens, normalize):
            return torch.tensor([[1.0, 0.0], [2.0, 3.0]])  # similarities [[1, 2], [0, 3]]

    model = Fake().train()
    acc = pretrain.clip_retrieval_accuracy(model, synthetic_tokenizer(), seed=0, n=2)
    assert (acc["image_to_text"], acc["text_to_image"], acc["chance"]) == (0.5, 1.0, 0.5)
    assert model.modes == [False] and model.training


def test_script_load_clip_refuses_a_file_missing_a_tensor(pretrain, tmp_path):
    """A CLIP file without one of the model's tensors is refused, not loaded with that tensor left random."""
    state = pretrain.build_clip(seed=0).state_dict()
    state.pop("visual.layer4.0.conv3.weight")
    pretrain.save_fp16_state(state, tmp_path / "clip.safetensors", {})
    with pytest.raises(RuntimeError, match="visual.layer4.0.conv3.weight"):
        pretrain.load_clip(tmp_path / "clip.safetensors")


def test_script_optimiser_decays_weights_only_and_warms_up_then_decays_to_a_tenth(pretrain):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt, sched = pretrain.adamw_cosine(model, lambda n, p: p.ndim >= 2, 0.1, 1e-3, 100)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3)] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # 5 % warm-up
    assert lrs[5] == pytest.approx(1e-3) and lrs[50] > lrs[70] > lrs[90]
    assert lrs[100] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)  # stays at a tenth past the end


def test_script_text_stream_lengths_and_noise(pretrain):
    """Packed texts are at most max_len tokens, some of them max_len, also at the least --lm-max-len (min_len: the
    drawn length is max_len itself); T5's noise is round(15 %) of the tokens in round(noise / 3) spans, never the
    first token (a kept span leads); each text has its own noise."""
    import numpy as np

    from vlscale.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    stream = pretrain.TextStream(tok, 0, "lm-train", 30)
    lengths = [len(stream.sequence(i)[0]) for i in range(80)]
    assert min(lengths) > 0 and max(lengths) == 30, lengths
    least = pretrain.TextStream(tok, 0, "lm-train", pretrain.TextStream.MIN_LEN)
    assert max(len(least.sequence(i)[0]) for i in range(4)) == pretrain.TextStream.MIN_LEN
    for length in (20, 40, 100):
        mask = pretrain.random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(length))
        spans = int(mask[0]) + int(np.sum(mask[1:] & ~mask[:-1]))
        assert not mask[0] and mask.sum() == round(0.15 * length) and spans == round(round(0.15 * length) / 3), mask

    ids = list(range(10, 70))  # three sentences: 10..29, 30..49, 50..69
    inputs, orders = set(), set()
    for seed in range(20):
        inp, _ = pretrain.bart_text_infilling(ids, [20, 40], np.random.default_rng(seed), mask_id=720, eos=1)
        inputs.add(tuple(inp))
        sentence_order = [(t - 10) // 20 for t in inp[:-1] if t != 720]
        orders.add(tuple(dict.fromkeys(sentence_order)))
    assert len(inputs) == 20 and len(orders) > 1, orders  # noise and sentence order vary with the draw


def test_script_lm_batches(pretrain):
    """T5 inputs take the sentinels in order <extra_id_0>, <extra_id_1>, ...; padding is 0 in the inputs
    (masked out) and -100 in the labels; every example has its own noise; BART inputs fit its positions."""
    from vlscale.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    stream = pretrain.TextStream(tok, 0, "lm-train", 40)
    b = pretrain.lm_batch("t5", stream, 0, 8, tok, 0)
    s0, s1 = tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>"])
    for row, att, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
        n = int(att.sum())
        assert att[:n].all() and not att[n:].any() and (row[n:] == 0).all() and row[n - 1] == tok.eos_token_id
        sentinels = [t for t in row[:n].tolist() if t >= s1 or t == s0]
        assert sentinels[0] == s0 and (len(sentinels) == 1 or sentinels[1] == s1), row
        m = int((lab != -100).sum())
        assert lab[m - 1] == tok.eos_token_id and (lab[m:] == -100).all()
    assert (b["labels"] == -100).any()
    # the same text under two indices' noise: an example's noise is drawn from its own index
    same = pretrain.TextStream(tok, 0, "lm-train", 40)
    text = max((stream.sequence(i) for i in range(8)), key=lambda s: len(s[0]))  # several spans to place
    same.sequence = lambda i: text
    b2 = pretrain.lm_batch("t5", same, 0, 4, tok, 0)
    assert len({tuple(r.tolist()) for r in b2["input_ids"]}) > 1

    long = pretrain.TextStream(tok, 0, "lm-train", pretrain.bart_positions() - 1)
    b = pretrain.lm_batch("bart", long, 0, 16, tok, 0)
    assert b["input_ids"].shape[1] <= pretrain.bart_positions() and b["labels"].shape[1] <= pretrain.bart_positions()


def test_script_cuts_a_bart_input_grown_by_inserted_masks_to_its_positions(pretrain, monkeypatch):
    from vlscale.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    mask_id, eos, n = tok.convert_tokens_to_ids(pretrain.BART_MASK), tok.eos_token_id, pretrain.bart_positions()
    monkeypatch.setattr(pretrain, "bart_text_infilling",
                        lambda ids, bounds, rng, mask, eos: ([mask] * 2 * n + [eos], list(ids) + [eos]))
    b = pretrain.lm_batch("bart", pretrain.TextStream(tok, 0, "lm-train", 40), 0, 2, tok, 0)
    assert b["input_ids"].shape[1] == n
    assert b["input_ids"][:, -1].tolist() == [eos, eos] and (b["input_ids"][:, :-1] == mask_id).all()


def test_script_accepts_the_settings_it_can_run(pretrain):
    """BART's 128 positions hold 127 tokens and eos; T5 (relative positions) takes longer texts; --only is
    read without blanks and repeats."""
    assert pretrain.parse_args(["--only", "bart", "--lm-max-len", "127"]).lm_max_len == 127
    assert pretrain.parse_args(["--only", "t5", "--lm-max-len", "400"]).lm_max_len == 400
    assert pretrain.parse_args(["--only", " t5, t5,clip,"]).parts == ["t5", "clip"]
    assert pretrain.parse_args(["--lm-batch", "1", "--clip-batch", "2", "--lm-max-len", "12"]).clip_batch == 2


def test_script_keeps_each_parts_record_and_sets_the_threads(pretrain, tmp_path, monkeypatch):
    """Parts made by separate runs into one --out each keep their entry in pretraining.json, with the run's
    seed, threads and command; --threads sets torch's threads."""
    import json

    monkeypatch.setattr(pretrain, "train_lm", lambda kind, args, tok, log: {"dir": pretrain.LM_NAMES[kind]})
    monkeypatch.setattr(pretrain, "train_clip", lambda args, tok, log: {"file": "clip"})
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert pretrain.main(["--only", "t5", "--out", str(tmp_path), "--seed", "3", "--threads", "2"]) == 0
    assert threads == [2]
    assert pretrain.main(["--only", "bart,clip", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "pretraining.json").read_text())
    assert sorted(report) == ["mini-bart", "mini-clip-rn", "mini-t5"], report
    assert report["mini-t5"]["dir"] == "mini-t5" and report["mini-t5"]["seed"] == 3
    assert report["mini-bart"]["seed"] == 0 and report["mini-clip-rn"]["file"] == "clip"
    assert report["mini-t5"]["threads"] == torch.get_num_threads() and "command" in report["mini-t5"]


def test_script_refuses_to_replace_a_shipped_part_with_other_settings(pretrain, tmp_path, monkeypatch):
    """Every part named is compared with its shipped record (a part not shipped yet is no reason to stop
    comparing), on every setting that decides the weights, max_len included."""
    import json

    shipped = tmp_path / "assets"
    shipped.mkdir()
    (shipped / "pretraining.json").write_text(json.dumps({
        "mini-t5": {"steps": 800, "batch": 32, "lr": 0.001, "max_len": 100, "seed": 0}}))
    monkeypatch.setattr(pretrain, "ROOT", tmp_path)
    monkeypatch.setattr(pretrain, "DEFAULT_OUT", shipped)
    parse = pretrain.parse_args
    assert pretrain.shipped_overwrite_problem(parse(["--only", "t5"])) is None
    problem = pretrain.shipped_overwrite_problem
    assert "max_len 60 (shipped: 100)" in problem(parse(["--only", "t5", "--lm-max-len", "60"]))
    assert "steps 10 (shipped: 800)" in problem(parse(["--only", "clip,t5", "--lm-steps", "10"]))


def test_script_training_is_deterministic_and_keeps_clips_scale_in_range(pretrain, tmp_path, monkeypatch):
    """A tiny CLIP and T5 run (scored on a few held-out examples): each step follows its own batch's gradient,
    the same seed writes the same bytes, CLIP's
    logit scale stays in [0, ln 100] even when a large step would push it out, and an LM whose vocabulary is
    not the tokenizer's is refused naming the registry."""
    import argparse
    import functools
    import math

    from safetensors.torch import load_file

    from vlscale.data.tokenizer import synthetic_tokenizer

    monkeypatch.setattr(pretrain, "clip_retrieval_accuracy",
                        functools.partial(pretrain.clip_retrieval_accuracy, n=4))
    monkeypatch.setattr(pretrain, "denoising_loss", functools.partial(pretrain.denoising_loss, n=4, batch=4))
    # n=4 for the log line's call too: its n=32 (a keyword over a partial's) was most of this test's time
    encoder_use = pretrain.encoder_use
    monkeypatch.setattr(pretrain, "encoder_use", lambda *a, n=None: encoder_use(*a, n=4))
    make_optimiser, cosines = pretrain.adamw_cosine, []

    def observed(model, *a):
        """Each step must move along its own batch's gradient (the previous step's cleared, not added)."""
        opt, sched = make_optimiser(model, *a)
        p = next(p for p in model.parameters() if p.requires_grad)
        fresh = []
        p.register_hook(lambda g: fresh.append(g.detach().clone()))
        opt.register_step_pre_hook(lambda *_: cosines.append(
            float(torch.nn.functional.cosine_similarity(p.grad.flatten(), fresh[-1].flatten(), 0))))
        return opt, sched

    monkeypatch.setattr(pretrain, "adamw_cosine", observed)
    blobs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert pretrain.main(["--only", "clip,t5", "--out", str(out), "--clip-steps", "2", "--clip-batch", "2",
                              "--clip-lr", "10", "--lm-steps", "2", "--lm-batch", "2", "--lm-max-len", "20"]) == 0
        blobs.append([(out / "mini-clip-rn.safetensors").read_bytes(),
                      (out / "mini-t5" / "model.safetensors").read_bytes()])
    assert blobs[0] == blobs[1]
    assert len(cosines) == 2 * (2 + 2) and min(cosines) > 1 - 1e-4, cosines
    scale = float(load_file(str(tmp_path / "a" / "mini-clip-rn.safetensors"))["logit_scale"])
    assert 0.0 <= scale <= math.log(100) + 1e-3, scale
    assert scale in (0.0, pytest.approx(math.log(100), abs=1e-3)), scale  # a step of 10 hit a bound

    tok = synthetic_tokenizer()
    tok.add_tokens(["<vis_extra_id_0>"])
    args = argparse.Namespace(seed=0, out=tmp_path / "c")
    with pytest.raises(ValueError, match=r"mini-t5: registry vocab_size \d+ != synthetic tokenizer length \d+ "
                                         r"\(vlscale/modeling/backbones.py\)"):
        pretrain.train_lm("t5", args, tok, lambda msg: None)


def test_script_check_scores_only_the_parts_named(pretrain, tmp_path, monkeypatch):
    """--check --only t5 scores no CLIP file lying in --out (nor an LM folder not named)."""
    (tmp_path / "mini-clip-rn.safetensors").write_bytes(b"not read")
    (tmp_path / "mini-bart").mkdir()
    monkeypatch.setattr(pretrain, "load_clip", lambda path: pytest.fail(f"{path} loaded"))
    assert pretrain.check(tmp_path, 0, lambda msg: None, parts=("t5",)) == {}
