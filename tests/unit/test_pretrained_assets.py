"""The shipped miniature backbones (vlscale/assets/backbones, made by scripts/pretrain_backbones.py):
they load through the registry, are small, and are better than random weights on their own
pretraining objective on held-out synthetic data they never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "vlscale" / "assets" / "backbones"
CLIP_FILE = ASSETS / "mini-clip-rn.safetensors"

pytestmark = pytest.mark.skipif(not CLIP_FILE.exists() or not (ASSETS / "mini-t5").is_dir()
                                or not (ASSETS / "mini-bart").is_dir(),
                                reason="miniature backbones not made (python scripts/pretrain_backbones.py)")


@pytest.fixture(scope="module")
def pretrain(script):
    """scripts/pretrain_backbones.py as a module (held-out data, objectives, scores)."""
    return script("scripts/pretrain_backbones.py")


@pytest.fixture(scope="module")
def tokenizer():
    from vlscale.data.tokenizer import synthetic_tokenizer

    return synthetic_tokenizer()


def test_assets_are_small_and_stored_in_fp16():
    from safetensors import safe_open

    files = [CLIP_FILE, ASSETS / "mini-t5" / "model.safetensors", ASSETS / "mini-bart" / "model.safetensors"]
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 20 * 2 ** 20, f"assets take {total / 2 ** 20:.1f} MiB"
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dtypes <= {"F16", "I64"}, (f, dtypes)
    report = json.loads((ASSETS / "pretraining.json").read_text())
    assert set(report) >= {"mini-clip-rn", "mini-t5", "mini-bart"}


def test_registry_resolves_the_shipped_backbones():
    from vlscale.modeling.backbones import hub_id, lm_config

    for name in ("mini-t5", "mini-bart"):
        assert Path(hub_id(name)) == ASSETS / name
        shipped = json.loads((ASSETS / name / "config.json").read_text())
        registry = lm_config(name)
        for key in ("d_model", "vocab_size"):
            assert shipped[key] == getattr(registry, key), (name, key)


def test_shipped_tokenizer_is_the_synthetic_one(tokenizer):
    from vlscale.config import load_config
    from vlscale.data.tokenizer import build_tokenizer

    texts = ["vqa: what color is the circle?", "a small red circle at the top left <extra_id_0> blue.",
             "nlvr: there are more squares in the left image than in the right image."]
    for name in ("mini-t5", "mini-bart"):
        tok = build_tokenizer(load_config("mini/clip_bart", [f"model.backbone={name}"]))
        assert len(tok) == len(tokenizer) == 721
        assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
        for t in texts:
            assert tok(t).input_ids == tokenizer(t).input_ids


def test_clip_loads_through_the_registry_and_retrieves_heldout_captions(pretrain, tokenizer):
    from safetensors.torch import load_file

    from vlscale.modeling.vision import build_vision_encoder

    enc = build_vision_encoder("mini-clip-rn", pretrained="synthetic")
    state = load_file(str(CLIP_FILE))
    w = "visual.layer4.0.conv3.weight"
    assert enc.visual.state_dict()[w.removeprefix("visual.")].dtype == torch.float32
    torch.testing.assert_close(enc.visual.state_dict()[w.removeprefix("visual.")], state[w].float())
    grid = enc.encode_grid(torch.zeros(2, 3, 96, 96))
    assert grid.shape == (2, 9, 512)

    model = pretrain.load_clip(CLIP_FILE)
    acc = pretrain.clip_retrieval_accuracy(model, tokenizer, seed=0, n=100)
    # held-out pairs (their own random stream); chance is 1 %
    assert acc["image_to_text"] >= 0.8 and acc["text_to_image"] >= 0.8, acc
    random_acc = pretrain.clip_retrieval_accuracy(pretrain.build_clip(seed=1).eval(), tokenizer, seed=0, n=100)
    assert random_acc["image_to_text"] <= 0.1, random_acc


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_lm_denoising_loss_is_far_below_random_weights(pretrain, tokenizer, kind):
    from vlscale.modeling.backbones import build_lm

    name = pretrain.LM_NAMES[kind]
    lm = build_lm(name, pretrained=True)
    assert next(lm.parameters()).dtype == torch.float32
    torch.manual_seed(0)
    random_lm = build_lm(name)
    trained = pretrain.denoising_loss(lm, kind, tokenizer, seed=0, n=32)
    random = pretrain.denoising_loss(random_lm, kind, tokenizer, seed=0, n=32)
    assert random > 5.0  # ~ln(721) = 6.6 for random weights
    assert trained < 0.35 * random, (trained, random)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_lm_uses_its_encoder(pretrain, tokenizer, kind):
    """Denoising needs the corrupted input: swapping it for another example's must cost a lot
    (a decoder that learnt a plain language model and ignores its encoder would be useless here,
    since the visual tokens reach the LM through the encoder)."""
    from vlscale.modeling.backbones import build_lm

    lm = build_lm(pretrain.LM_NAMES[kind], pretrained=True)
    use = pretrain.encoder_use(lm, kind, tokenizer, seed=0, n=32)
    assert use["swapped_input"] > use["own_input"] + 0.5, use


def test_pretraining_streams_are_disjoint_from_downstream_data(pretrain):
    """Pretraining draws its own random streams; no pretraining image equals a downstream one."""
    import numpy as np

    from vlscale.data.synthetic import generate_split

    images, _ = pretrain.clip_pairs(0, "clip-train", 0, 64)
    downstream = generate_split("caption", "train", 64).visuals
    keys = {np.asarray(v).tobytes() for v in downstream.values()}
    assert not any(img.tobytes() in keys for img in images)
    heldout, _ = pretrain.clip_pairs(0, "clip-heldout", 0, 32)
    train = {img.tobytes() for img in images}
    assert not any(img.tobytes() in train for img in heldout)


def test_noising_functions(pretrain):
    import numpy as np

    ids = list(range(10, 50))
    sentinels = list(range(700, 720))[::-1]
    inp, tgt = pretrain.t5_span_corruption(ids, np.random.default_rng(0), sentinels, eos=1)
    assert inp[-1] == tgt[-1] == 1
    # rebuilding the text from the input's kept tokens and the target's spans gives the original
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    rebuilt = [x for t in inp[:-1] for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == ids
    n_noise = sum(len(v) for v in spans.values())
    assert n_noise == round(0.15 * len(ids))

    inp, tgt = pretrain.bart_text_infilling(ids, [20, 40], np.random.default_rng(0), mask_id=720, eos=1)
    assert tgt == ids + [1]
    assert 720 in inp and len(inp) < len(tgt)
    kept = [t for t in inp[:-1] if t != 720]
    assert len(kept) >= len(ids) - round(0.3 * len(ids))


def test_other_settings_do_not_replace_the_shipped_backbones(pretrain, tmp_path, capsys):
    """The default --out is the shipped folder: a quick experiment (--lm-steps 10) would have replaced the
    mini-t5 every run and test loads. Refused before anything is made; the shipped settings, another --out
    or --replace-shipped pass."""
    shipped = {p: p.read_bytes() for p in (pretrain.DEFAULT_OUT / "mini-t5").iterdir()}
    assert pretrain.main(["--only", "t5", "--lm-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "mini-t5 the embedded default and the tests load" in err and "steps 10 (shipped: 800)" in err
    assert {p: p.read_bytes() for p in (pretrain.DEFAULT_OUT / "mini-t5").iterdir()} == shipped
    parse = pretrain.parse_args
    assert pretrain.shipped_overwrite_problem(parse(["--only", "clip,t5,bart"])) is None  # the shipped settings
    assert pretrain.shipped_overwrite_problem(parse(["--only", "t5", "--lm-steps", "10", "--out", str(tmp_path)])) is None
    assert pretrain.shipped_overwrite_problem(parse(["--only", "t5", "--lm-steps", "10", "--replace-shipped"])) is None
    assert "clip-rn" in pretrain.shipped_overwrite_problem(parse(["--only", "clip", "--clip-lr", "0.01"]))


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_heldout_losses_recorded_at_pretraining_are_reproduced(pretrain, tokenizer, kind):
    """The held-out losses pretraining.json records (computed in the pretraining run, on the fp32 model)
    come out again from the shipped files and from the initialisation pretraining started from: the
    held-out text, its noise and the loss are the ones the backbones were scored with."""
    from vlscale.modeling.backbones import build_lm

    name = pretrain.LM_NAMES[kind]
    record = json.loads((ASSETS / "pretraining.json").read_text())[name]
    random = pretrain.denoising_loss(pretrain.initial_lm(kind, record["seed"]), kind, tokenizer, record["seed"])
    assert random == pytest.approx(record["heldout_loss_random_weights"], rel=1e-6)
    trained = pretrain.denoising_loss(build_lm(name, pretrained=True), kind, tokenizer, record["seed"])
    assert trained == pytest.approx(record["heldout_loss"], rel=1e-4)  # the files hold the weights in fp16
