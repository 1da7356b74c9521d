"""The V&L model: visual tokens before the text, two-image and video inputs, loading, counting."""

import json
import time

import pytest
import torch

from vlscale.config import load_config
from vlscale.modeling.backbones import build_lm, list_backbones, lm_config
from vlscale.modeling.vision import build_vision_encoder, vision_dims
from vlscale.modeling.vl_model import build_model

VOCAB = 120


def _cfg(*overrides, tasks="[vqa,nlvr2]"):
    return load_config("tiny", [f"data.tasks={tasks}", *overrides])


def _batch(cfg, task="vqa", b=3, n_img=1, text_len=5, pixel=True, frames=None):
    g = torch.Generator().manual_seed(0)
    batch = {"task": task,
             "input_ids": torch.randint(3, VOCAB, (b, text_len), generator=g),
             "attention_mask": torch.ones(b, text_len, dtype=torch.long),
             "labels": torch.randint(3, VOCAB, (b, 4), generator=g)}
    dims = vision_dims(cfg.model.vision)
    if frames is not None:
        batch["vis_feats"] = torch.randn(b, 1, frames, dims["embed_dim"], generator=g)
        mask = torch.ones(b, 1, frames, dtype=torch.long)
        mask[0, 0, frames // 2:] = 0
        batch["vis_mask"] = mask
    elif pixel:
        s = dims["image_size"]
        batch["pixel_values"] = torch.randn(b, n_img, 3, s, s, generator=g)
    else:
        batch["vis_feats"] = torch.randn(b, n_img, dims["grid_tokens"], dims["grid_dim"], generator=g)
    return batch


@pytest.mark.parametrize("backbone", ["tiny-t5", "tiny-bart"])
def test_forward_loss_and_generate(backbone):
    cfg = _cfg(f"model.backbone={backbone}")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg)
    embeds, mask = model.encoder_inputs(batch)
    # visual tokens (pool_size^2) come before the 5 text tokens
    assert embeds.shape == (3, cfg.model.pool_size ** 2 + 5, model.d_model)
    text = model.lm.get_encoder().embed_tokens(batch["input_ids"])
    torch.testing.assert_close(embeds[:, -5:], text)
    out = model(batch)
    assert torch.isfinite(out.loss)
    ids = model.generate(batch, max_new_tokens=4, num_beams=2)
    assert ids.shape[0] == 3 and ids.shape[1] <= 5


def test_two_images_get_order_embeddings():
    cfg = _cfg()
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, task="nlvr2", n_img=2)
    vis, mask = model.visual_embeds(batch)
    v = cfg.model.pool_size ** 2
    assert vis.shape[1] == 2 * v and mask.shape == (3, 2 * v)
    # the same image in both slots differs only by the image-order embedding
    batch["pixel_values"][:, 1] = batch["pixel_values"][:, 0]
    vis, _ = model.visual_embeds(batch)
    order = model.projector.image_order.weight
    torch.testing.assert_close(vis[:, v:] - vis[:, :v], (order[1] - order[0]).expand(3, v, -1))


def test_cached_features_equal_images():
    cfg = _cfg()
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg)
    feats = model.vision.encode_grid(batch["pixel_values"].flatten(0, 1)).reshape(3, 1, -1, model.feat_dim)
    cached = dict(batch, vis_feats=feats)
    del cached["pixel_values"]
    torch.testing.assert_close(model(batch).loss, model(cached).loss)


def test_video_frames_masked_and_limited():
    cfg = _cfg("model.vision=tiny-clip-vit", "model.max_frames=8", tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    assert model.vision is not None and model.feat_dim == vision_dims("tiny-clip-vit")["embed_dim"]
    batch = _batch(cfg, task="tvqa", frames=6)
    embeds, mask = model.encoder_inputs(batch)
    assert embeds.shape[1] == 6 + 5
    assert mask[0, 3:6].sum() == 0 and mask[1, :6].sum() == 6
    assert torch.isfinite(model(batch).loss)
    with pytest.raises(ValueError, match="max_frames"):
        model(_batch(cfg, task="tvqa", frames=9))


def test_wrong_feature_shape_is_named():
    cfg = _cfg("model.feature_source=cache")
    model = build_model(cfg, vocab_size=VOCAB)
    assert model.vision is None
    batch = _batch(cfg, pixel=False)
    batch["vis_feats"] = batch["vis_feats"][:, :, :5]
    with pytest.raises(ValueError, match="tokens per image"):
        model(batch)
    with pytest.raises(ValueError, match="without a vision encoder"):
        model(_batch(cfg))


def test_unknown_model_names_name_their_key():
    with pytest.raises(KeyError, match=r"unknown backbone 't5-huge' \(model.backbone\); registry: .*'t5-small'"):
        lm_config("t5-huge")
    with pytest.raises(KeyError, match=r"unknown vision model 'RN999' \(model.vision\)"):
        vision_dims("RN999")


def test_every_registry_backbone_builds_on_meta_fast():
    for name in list_backbones():
        t = time.time()
        m = build_lm(name, device="meta")
        assert next(m.parameters()).device.type == "meta"
        assert time.time() - t < 30, name
    cfg = load_config("paper/clip_bart_single_adapter", ["model.backbone=t5-11b", "model.vision=ViT-L-14"])
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.lm.parameters()) > 11e9


def test_every_preset_builds_on_meta():
    from vlscale.config import list_presets

    for name in list_presets():
        cfg = load_config(name)
        vocab = None if cfg.model.backbone.startswith(("tiny", "mini")) else \
            lm_config(cfg.model.backbone).vocab_size + cfg.model.extra_special_tokens
        build_model(cfg, vocab_size=vocab, device="meta")


def test_from_pretrained_local_dirs(tmp_path):
    """The real loading code (from_pretrained, open_clip checkpoint files) on local files."""
    lm = build_lm("tiny-bart", config_overrides={"vocab_size": VOCAB})
    lm.save_pretrained(tmp_path / "lm")
    enc = build_vision_encoder("tiny-clip-rn")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01)
    torch.save({f"visual.{k}": v for k, v in enc.visual.state_dict().items()}, tmp_path / "clip.pt")
    cfg = _cfg("model.backbone=tiny-bart", "model.pretrained=true", f"model.backbone_path={tmp_path / 'lm'}",
               f"model.vision_pretrained={tmp_path / 'clip.pt'}")
    model = build_model(cfg, vocab_size=VOCAB)
    for (n, a), b in zip(lm.state_dict().items(), model.lm.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    for a, b in zip(enc.state_dict().values(), model.vision.state_dict().values()):
        torch.testing.assert_close(a, b)
    bad = _cfg("model.pretrained=true", f"model.backbone_path={tmp_path / 'missing'}")
    with pytest.raises((FileNotFoundError, OSError)):
        build_model(bad, vocab_size=VOCAB)


def _independent_adapter_count(name: str, reduction: int, d_feat: int, tasks: int = 1) -> int:
    """Single/multiple adapters + layer norms + projection, counted from the config alone."""
    c = lm_config(name)
    d, h = c.d_model, c.d_model // reduction
    per_site = d * h + h + h * d + d
    if c.model_type == "t5":
        sites = c.num_layers * 2 + c.num_decoder_layers * 3
        norms = (c.num_layers * 2 + 1 + c.num_decoder_layers * 3 + 1) * d  # RMS norms: weight only
    else:
        sites = c.encoder_layers * 2 + c.decoder_layers * 3
        norms = (c.encoder_layers * 2 + c.decoder_layers * 3 + 2) * 2 * d  # + the two embedding LNs
    projection = (d_feat * d + d) + 2 * d + (5 * d + d) + 2 * d + 2 * d
    return sites * per_site * tasks + norms + projection


@pytest.mark.parametrize("preset, backbone, tasks", [
    ("paper/clip_bart_single_adapter", "facebook/bart-base", 1),
    ("paper/clip_bart_multiple_adapters", "facebook/bart-base", 4),
    ("paper/clip_bart_single_adapter", "t5-base", 1),
])
def test_inspect_model_counts_match_independent_count(preset, backbone, tasks, capsys, launcher):
    assert launcher("inspect_model").main(["--config", preset, f"model.backbone={backbone}", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    cfg = load_config(preset)
    expected = _independent_adapter_count(backbone, cfg.peft.reduction_factor,
                                          vision_dims("RN101")["grid_dim"], tasks)
    assert report["trainable"] == expected
    total_lm = sum(p.numel() for p in build_lm(backbone, device="meta",
                                               config_overrides={"vocab_size": report["vocab_size"]}).parameters())
    assert report["total_without_vision"] == total_lm + expected - (report["groups"]["layer_norm"]["params"])
    assert report["updated_pct"] == pytest.approx(100 * expected / report["total_without_vision"])
