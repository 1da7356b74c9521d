"""Making and loading the miniature backbones: faulty weight files are one line naming the file (never a
half-loaded or silently random model), scripts/pretrain_backbones.py refuses settings it cannot run,
writes byte-identical files for the same weights, and what it writes loads through the project's own
loaders; the synthetic tokenizer gives every task's answers back exactly.
"""

from __future__ import annotations

import importlib.util
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


@needs_assets
def test_lm_folder_errors_name_the_config_and_count_the_tensors(tmp_path):
    """A config.json that is not JSON, or not a JSON object, is one line naming it (not json's bare error); two
    tensors of another size name the first and count one more; four missing parameters name three and count one."""
    from safetensors.torch import load_file, save_file

    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import build_lm

    def copy(name, drop=(), resize=()):
        d = tmp_path / name
        shutil.copytree(ASSETS / "mini-t5", d)
        state = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k not in drop}
        state.update({k: torch.zeros(516, 128) for k in resize})
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

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


def test_the_zero3_loader_checks_folders_and_sources_the_same_way(tmp_path):
    """build_lm_zero3 (pretrained backbones under ZeRO-3) looked tiny-*/missing mini-* up on the hub and
    gave a bare SafetensorError for a truncated file: the same one-line errors as build_lm now."""
    from vlscale.config import ConfigError
    from vlscale.engine.sharded_loading import ShardedLoadError, build_lm_zero3, checkpoint_files

    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ConfigError) as e:
        build_lm_zero3("tiny-t5", ds_config=ds, pretrained=True)
    _one_line(e, "model.backbone=tiny-t5", "model.pretrained=false")
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
    to the weights it saved (rounded to fp16), and its folder's tokenizer is the synthetic one."""
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
