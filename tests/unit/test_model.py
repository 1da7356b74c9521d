"""The V&L model: visual tokens before the text, two-image and video inputs, loading, counting."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from vlscale.config import load_config
from vlscale.modeling.backbones import LM_REGISTRY, MissingWeights, build_lm, lm_config
from vlscale.modeling.vision import _quiet_open_clip, build_vision_encoder, vision_dims
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



def test_more_images_per_example_than_order_embeddings_are_named():
    """Three images per example (the projection has order embeddings for NLVR2's two) is a ValueError saying how
    many of each, not torch's bare "index out of range in self" from the embedding lookup."""
    cfg = _cfg()
    model = build_model(cfg, vocab_size=VOCAB).eval()
    with pytest.raises(ValueError, match=r"^batch has 3 images per example; the visual projection has image-order "
                                         r"embeddings for 2 \(NLVR2's two\)$"):
        model.visual_embeds(_batch(cfg, task="nlvr2", n_img=3, pixel=False))

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
    # example 0 has 3 frames: its 3 padding slots are masked and moved behind its 5 text tokens
    assert mask[0].tolist() == [1] * 8 + [0] * 3 and mask[1].sum() == 11
    text = model.lm.get_encoder().embed_tokens(batch["input_ids"])
    torch.testing.assert_close(embeds[0, 3:8], text[0])
    assert torch.isfinite(model(batch).loss)
    with pytest.raises(ValueError, match="max_frames"):
        model(_batch(cfg, task="tvqa", frames=9))


@pytest.mark.parametrize("backbone", ["tiny-t5", "tiny-bart"])
def test_a_videos_output_does_not_depend_on_its_batch(backbone):
    """A 3-frame video with 4 text tokens gives the same logits and generation alone as beside a
    7-frame video with 6 text tokens (its frame positions and its text's positions are its own)."""
    cfg = _cfg(f"model.backbone={backbone}", "model.vision=tiny-clip-vit", "model.max_frames=8",
               tasks="[tvqa,tvc]")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).eval()
    g = torch.Generator().manual_seed(1)
    dim = vision_dims("tiny-clip-vit")["embed_dim"]
    feats = torch.randn(2, 1, 7, dim, generator=g)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    vis_mask = torch.tensor([[[1, 1, 1, 0, 0, 0, 0]], [[1] * 7]])
    labels = torch.randint(3, VOCAB, (2, 4), generator=g)
    pair = {"task": "tvqa", "input_ids": ids, "attention_mask": text_mask, "labels": labels,
            "vis_feats": feats * vis_mask[..., None], "vis_mask": vis_mask}
    alone = {"task": "tvqa", "input_ids": ids[:1, :4], "attention_mask": text_mask[:1, :4],
             "labels": labels[:1], "vis_feats": feats[:1, :, :3], "vis_mask": vis_mask[:1, :, :3]}
    with torch.no_grad():
        torch.testing.assert_close(model(pair).logits[:1], model(alone).logits, atol=1e-5, rtol=1e-5)
    gen = {"max_new_tokens": 4, "num_beams": 1, "do_sample": False}
    assert model.generate(pair, **gen)[0].tolist()[:model.generate(alone, **gen).shape[1]] == \
        model.generate(alone, **gen)[0].tolist()


def test_frame_features_of_another_width_are_named():
    cfg = _cfg("model.vision=tiny-clip-vit", "model.feature_source=cache", tasks="[tvqa]")
    model = build_model(cfg, vocab_size=VOCAB)
    batch = _batch(cfg, task="tvqa", frames=4)
    batch["vis_feats"] = torch.randn(3, 1, 4, model.feat_dim + 3)
    with pytest.raises(ValueError, match=rf"frame features are {model.feat_dim + 3}-d; tiny-clip-vit gives "
                                         rf"{model.feat_dim}-d"):
        model(batch)


def test_an_input_longer_than_barts_positions_is_refused_at_build():
    from vlscale.config import ConfigError

    video = ("model.backbone=tiny-bart", "model.vision=tiny-clip-vit", "model.max_frames=64")
    assert lm_config("tiny-bart").max_position_embeddings == 256
    build_model(_cfg(*video, "data.max_input_length=192", tasks="[tvqa]"), device="meta")  # 64 + 192 fit
    with pytest.raises(ConfigError, match=r"264 tokens long \(model.max_frames=64 frames \+ data.max_input_length"
                                          r"=200\), more than tiny-bart's 256 positions"):
        build_model(_cfg(*video, "data.max_input_length=200", tasks="[tvqa]"), device="meta")
    with pytest.raises(ConfigError, match=r"2 x 16 visual tokens .* \+ peft.n_prompts=40 .* more than"):
        build_model(_cfg("model.backbone=tiny-bart", "peft.method=prompt", "data.max_input_length=190"),
                    device="meta")
    build_model(_cfg("model.backbone=tiny-t5", "data.max_input_length=1000"), device="meta")  # relative positions


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


def test_a_batch_without_labels_or_the_image_axis_is_refused_naming_it():
    """Without labels forward was the LM's "You must specify exactly one of input_ids or inputs_embeds"; images
    without their N_images axis, "not enough values to unpack"."""
    cfg = _cfg()
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg)
    with pytest.raises(ValueError, match=r"^VLModel.forward computes the loss of batch\['labels'\], which the "
                                         r"batch lacks; for answers use generate\(batch\)"):
        model({k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match=r"^batch\['pixel_values'\] has shape \(3, 3, 128, 128\); images are "
                                         r"\(B, N_images, 3, S, S\), N_images 1 \(NLVR2: 2\)$"):
        model(dict(batch, pixel_values=batch["pixel_values"][:, 0]))
    feats = _batch(cfg, pixel=False)["vis_feats"]
    with pytest.raises(ValueError, match=r"^batch\['vis_feats'\] has shape \(3, 16, 256\); images are "
                                         r"\(B, N_images, tokens, dim\)"):
        model.generate({k: v for k, v in dict(batch, vis_feats=feats[:, 0]).items() if k != "pixel_values"})
    with pytest.raises(ValueError, match=r"^batch\['vis_feats'\] has shape \(3, 1, 1, 16, 256\); images are "):
        model.generate({k: v for k, v in dict(batch, vis_feats=feats[:, :, None]).items() if k != "pixel_values"})


def test_the_builders_refuse_what_is_not_their_config_or_model_naming_it():
    """build_model("tiny") and the others were "AttributeError: 'str' object has no attribute 'model'" (or 'method',
    'lm'); count_parameters(lm) of an LM given apply_peft would miss the PEFT modules, which it keeps outside."""
    from vlscale.config import PeftConfig
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.peft import apply_peft, count_parameters

    for fn in (build_model, build_tokenizer):
        with pytest.raises(TypeError, match=rf"^{fn.__name__} takes a RunConfig \(vlscale.config.load_config\(name, "
                                            r"overrides\)\), got str 'tiny'$"):
            fn("tiny")
    with pytest.raises(TypeError, match=r"^build_train_loader takes a RunConfig .*, got dict$"):
        build_train_loader({}, None)
    lm = build_lm("tiny-t5")
    with pytest.raises(TypeError, match=r"^apply_peft takes a PeftConfig \(.*\), got str 'lora'$"):
        apply_peft(lm, "lora", ["vqa"])
    apply_peft(lm, PeftConfig(), ["vqa"])
    with pytest.raises(TypeError, match=r"^configure_trainable and count_parameters take the V&L model .*, got "
                                        r"T5ForConditionalGeneration$"):
        count_parameters(lm)


def test_unknown_model_names_name_their_key():
    with pytest.raises(KeyError, match=r"unknown backbone 't5-huge' \(model.backbone\); registry: .*'t5-small'"):
        lm_config("t5-huge")
    with pytest.raises(KeyError, match=r"unknown vision model 'RN999' \(model.vision\)"):
        vision_dims("RN999")


def test_shipped_clip_configs_are_read_without_open_clip_as_open_clip_gives_them(monkeypatch):
    """launchers/train.py builds the DeepSpeed config before start-up, and its bucket sizes need the tower's width:
    importing open_clip for that took ~4 s of the time to a misspelt DeepSpeed key. The configs open_clip and
    vlscale ship are read from their files, the same dicts open_clip gives."""
    import open_clip

    from vlscale.config import registry_visions
    from vlscale.modeling.vision import clip_config, register_tiny_models

    register_tiny_models()
    given = {name: open_clip.get_model_config(name) for name in registry_visions()}
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: pytest.fail(f"open_clip asked for {name}"))
    assert {name: clip_config(name) for name in registry_visions()} == given
    assert vision_dims("RN101")["grid_dim"] == 2048 and vision_dims("tiny-clip-rn")


def _tower_spec(module: torch.nn.Module) -> dict:
    """What a meta build has of a tower: every parameter's and buffer's name, shape and dtype, every submodule's class
    (QuickGELU or GELU) and plain settings (a LayerNorm's eps, a ViT's pool_type, image_size, ...). Left out: the
    train/eval mode, and the preprocessing create_model sets on the tower it returns (image_mean, image_std,
    preprocess_cfg), which vlscale does not read (vision.normalisation gives the mean and std)."""
    plain = (bool, int, float, str, tuple, type(None))
    skip = {"training", "image_mean", "image_std"}
    return {"tensors": {n: (tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]},
            "modules": [(n, type(m).__name__, {k: v for k, v in vars(m).items()
                                               if not k.startswith("_") and k not in skip and isinstance(v, plain)})
                        for n, m in module.named_modules()]}


def _one_clip_per_config_shape() -> list[str]:
    """One name model.vision accepts per shape of open_clip config: the vision_cfg keys and their values' types (a
    ResNet's layers are a list), their bool and str values (pool types, attentional pooling, ...), quick_gelu and a
    Hugging Face text tower; what differs within a shape is numbers only (widths, depths, sizes). The shipped tiny
    and mini CLIPs are all kept."""
    from vlscale.config import foreign_visions, registry_visions
    from vlscale.modeling.vision import clip_config

    accepted = [name for name in registry_visions() if name not in foreign_visions()]
    smallest = {}  # the least wide and deep of each shape: the test runs every tower on meta
    for name in accepted:
        cfg = clip_config(name)
        v = cfg["vision_cfg"]
        shape = (tuple(sorted((k, type(x).__name__) for k, x in v.items())),
                 tuple(sorted((k, x) for k, x in v.items() if isinstance(x, (bool, str)))),
                 bool(cfg.get("quick_gelu")), "hf_model_name" in cfg["text_cfg"])
        size = v["width"] * (sum(v["layers"]) if isinstance(v["layers"], list) else v["layers"])
        smallest[shape] = min(smallest.get(shape, (size, name)), (size, name))
    return sorted({name for _, name in smallest.values()} | {n for n in accepted if n.startswith(("tiny-", "mini-"))})


def test_a_meta_build_is_open_clips_visual_tower_alone(monkeypatch):
    """On meta, build_vision_encoder builds the visual tower alone (vision._visual_tower), not the whole CLIP it used
    to keep the tower of: for one name of every shape of config model.vision accepts, the tower is
    open_clip.create_model(name, device="meta").visual's (_tower_spec), the image size and widths the encoder
    reports are the tower's, and its encode_grid gives the tokens and width vision_dims says. The CLIPs with a Hugging
    Face text tower (roberta-ViT-B-32, nllb-clip-base, ...) do not build whole offline (transformers fetches the text
    model's config): the reference swaps open_clip's default text tower in, which the visual tower does not depend
    on. Every config is cut to one block a stage (the same keys; widths, sizes and so the grid unchanged): running
    ViT-bigG's 48 blocks on meta took most of the test's time."""
    import open_clip

    from vlscale.modeling import vision

    def shallow(cfg):
        v = cfg["vision_cfg"]
        return {**cfg, "vision_cfg": {**v, "layers": [1] * len(v["layers"]) if isinstance(v["layers"], list) else 1}}

    vision.register_tiny_models()
    names = _one_clip_per_config_shape()
    assert {"RN50", "roberta-ViT-B-32", "tiny-clip-vit", "tiny-clip-rn", "ViT-L-14-CLIPA"} <= set(names), names
    assert any(n.endswith("-quickgelu") for n in names)
    whole = vision.clip_config
    monkeypatch.setattr(vision, "clip_config", lambda name: shallow(whole(name)))
    for name in names:
        enc = build_vision_encoder(name, device="meta")
        cfg = vision.clip_config(name)
        hf_text = {"text_cfg": {}} if "hf_model_name" in cfg["text_cfg"] else {}
        with torch.device("meta"), _quiet_open_clip():  # open_clip warns of the random weights of the reference
            ref = open_clip.create_model(name, load_weights=False, device="meta", vision_cfg=cfg["vision_cfg"],
                                         **hf_text).visual
        assert _tower_spec(enc.visual) == _tower_spec(ref), name
        size = ref.image_size if isinstance(ref.image_size, int) else ref.image_size[0]
        width = ref.attnpool.c_proj.in_features if enc.is_resnet else ref.transformer.width
        assert (enc.image_size, enc.grid_dim, enc.embed_dim) == (size, width, ref.output_dim), name
        grid = enc.encode_grid(torch.empty(1, 3, enc.image_size, enc.image_size, device="meta"))
        assert tuple(grid.shape) == (1, enc.grid_side ** 2, enc.grid_dim), name  # what the projector is built for


def test_a_random_tower_is_the_seeded_whole_clips_tower():
    """A random tower (no model.vision_pretrained) is built alone, seeded: the same numbers as the tower of the whole
    CLIP built from the same seed, as it was built before (open_clip builds the visual tower first), so feature
    caches made from random towers stay valid."""
    import open_clip

    for name in ("tiny-clip-rn", "tiny-clip-vit"):
        enc = build_vision_encoder(name)
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(0)
            ref = open_clip.create_model(name).visual.state_dict()
        got = enc.visual.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name


def test_a_local_dir_clip_loads_the_weights_its_folder_holds(tmp_path):
    """model.vision=local-dir:PATH (open_clip_config.json and weights in one folder): open_clip loads the folder's
    weights, which a tower built alone from the config (as a random one is) would not have."""
    import open_clip
    from safetensors.torch import save_file

    from vlscale.modeling.vision import _REGISTRY_DIR

    model_cfg = json.loads((Path(_REGISTRY_DIR) / "tiny-clip-rn.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    whole = build_vision_encoder("tiny-clip-rn")  # the seeded random tower, to differ from
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(1)
        trained = open_clip.create_model("tiny-clip-rn").state_dict()
    save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp_path / "open_clip_model.safetensors"))
    got = build_vision_encoder(f"local-dir:{tmp_path}").visual.state_dict()
    ours = {k.removeprefix("visual."): v for k, v in trained.items() if k.startswith("visual.")}
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)
    assert not torch.equal(got["conv1.weight"], whole.visual.state_dict()["conv1.weight"])


def test_every_registry_backbone_builds_on_meta_fast():
    for name in sorted(LM_REGISTRY):
        t = time.time()
        m = build_lm(name, device="meta")
        assert next(m.parameters()).device.type == "meta"
        assert time.time() - t < 30, name
    cfg = load_config("paper/clip_bart_single_adapter", ["model.backbone=t5-11b", "model.vision=ViT-L-14"])
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.lm.parameters()) > 11e9


def test_every_preset_builds_on_meta():
    """Every shipped preset (the paper's, the scale ones up to t5-11b) builds with its weights on ``meta``
    and something to train (at least the projection)."""
    from vlscale.config import list_presets

    names = list_presets()
    assert {"default", "tiny", "paper/clip_bart_single_adapter", "scale/clip_t5_11b_single_adapter"} <= set(names)
    for name in names:
        cfg = load_config(name)
        vocab = None if cfg.model.backbone.startswith(("tiny", "mini")) else \
            lm_config(cfg.model.backbone).vocab_size + cfg.model.extra_special_tokens
        model = build_model(cfg, vocab_size=vocab, device="meta")
        assert {p.device.type for p in model.parameters()} == {"meta"}, name
        assert any(p.requires_grad for p in model.projector.parameters()), name


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
    missing = re.escape(repr(str(tmp_path / "missing")))
    with pytest.raises(MissingWeights, match=rf"^model\.backbone_path={missing} does not exist; give "
                                             r"model\.backbone_path=DIR, the folder the weights are in now$"):
        build_model(bad, vocab_size=VOCAB)
    # a folder without weights: a ConfigError naming the key (train.py prints one line, no traceback)
    from vlscale.config import SourceError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"weights for model.backbone_path=.*empty.*no file named"):
        build_model(_cfg("model.pretrained=true", f"model.backbone_path={tmp_path / 'empty'}"), vocab_size=VOCAB)


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
    norms = report["groups"]["layer_norm"]["params"] + report["groups"].get("layer_norm_bias", {"params": 0})["params"]
    assert report["total_without_vision"] == total_lm + expected - norms
    assert report["updated_pct"] == pytest.approx(100 * expected / report["total_without_vision"])


def test_inspect_model_reads_a_trained_adapter_alone(tmp_path, capsys, launcher):
    """README's "Inspecting a model" took --config only: an adapter/ sent to a colleague (no run_config.yaml beside
    it) could not be inspected (its adapter_config.json as --config: 'unknown key format'). --adapter reads its run
    config and vocabulary, refusing a run's output_dir or an override that changes the model as evaluate.py does."""
    from vlscale.engine import checkpoint as ckpt

    cfg = _cfg("peft.sharing=multiple")
    ckpt.save_adapter(build_model(cfg, vocab_size=VOCAB), tmp_path / "run" / "adapter", cfg, vocab_size=VOCAB)
    assert launcher("inspect_model").main(["--adapter", str(tmp_path / "run" / "adapter"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (report["vocab_size"], report["vocab_source"], report["tasks"]) == (VOCAB, "the adapter's", ["vqa", "nlvr2"])
    assert report["trainable"] == saved["trainable_params"]
    assert launcher("inspect_model").main(["--adapter", str(tmp_path / "run")]) == 2
    assert f"is a run's output_dir, not an adapter directory: pass {tmp_path / 'run' / 'adapter'}" in \
        capsys.readouterr().err
    assert launcher("inspect_model").main(["--adapter", str(tmp_path / "run" / "adapter"), "peft.sharing=single"]) == 2
    assert "override peft.sharing='single' would change the model" in capsys.readouterr().err
    # a pretrained run's adapter/ copied where its model.backbone_path is not there: the meta build takes the
    # registry's vocabulary, and says so (it named the folder's config.json)
    saved["run_config"]["model"].update(backbone="t5-small", pretrained=True, backbone_path=str(tmp_path / "gone"))
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(json.dumps({**saved, "vocab_size": 32100}))
    assert launcher("inspect_model").main(["--adapter", str(tmp_path / "run" / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_source"] == "t5-small's registry config; the adapter's: 32,100"
    with pytest.raises(SystemExit):  # both: one model or the other, not the --config silently passed over
        launcher("inspect_model").main(["--adapter", str(tmp_path / "run" / "adapter"), "--config", "tiny"])
    assert "argument --config: not allowed with argument --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, key", [
    (["peft.method=compacter", "peft.phm_dim=3"], "peft.phm_dim=3 must divide"),
    (["peft.reduction_factor=1000"], "peft.reduction_factor=1000 leaves no hidden units"),
])
def test_adapter_sizes_the_backbone_refuses_are_config_errors(overrides, key, capsys, launcher):
    """A size only the backbone's width can refuse is found while the model is built: a ConfigError naming the
    key (the trainer's start-up check reported it as a CheckpointError; inspect_model.py printed a traceback)."""
    from vlscale.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        build_model(_cfg(*overrides), vocab_size=VOCAB, device="meta")
    assert launcher("inspect_model").main(overrides) == 2
    assert key in capsys.readouterr().err


def test_a_random_vision_tower_is_seeded_on_the_host_only(monkeypatch):
    """build_vision_encoder seeds its random tower with the host's generator alone: torch.manual_seed
    also reseeded every GPU's generator to 0 (fork_rng(devices=[]) restores only the host's), so on a GPU
    the run's dropout and the ZeRO-3 build's draws after it no longer followed train.seed."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    torch.manual_seed(1234)
    reseeded.clear()
    before = torch.get_rng_state()
    a = build_vision_encoder("tiny-clip-rn")
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)  # the host's stream is left as it was
    b = build_vision_encoder("tiny-clip-rn")  # and every build of the name is the same tower
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_random_tower_build_quiets_open_clips_warning_and_gives_the_root_logger_its_level_back(caplog):
    """open_clip warns at the root logger that no weights were asked for (a random tower is what was asked): the
    build raises the root level to ERROR around open_clip's call only, so the process's own warnings still show."""
    import logging

    before = logging.root.level
    try:
        logging.root.setLevel(logging.INFO)
        with caplog.at_level(logging.WARNING):
            build_vision_encoder("tiny-clip-rn")
            assert logging.root.level == logging.WARNING  # caplog's level, back as build_vision_encoder found it
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        build_vision_encoder("tiny-clip-rn")
        assert logging.root.level == logging.INFO
    finally:
        logging.root.setLevel(before)


@pytest.mark.parametrize("vision, tag, words", [
    ("tiny-clip-rn", "openai", ["not a known tag", "a CLIP checkpoint file, or null"]),  # a tag of other models
    ("RN50", "no-such-tag", ["not a known tag", "['openai', 'yfcc15m', 'cc12m']"]),
])
def test_a_clip_tag_open_clip_cannot_load_names_the_key(vision, tag, words):
    """model.vision_pretrained set to a tag open_clip does not know for model.vision was open_clip's RuntimeError,
    printed by train.py with its traceback after start-up: now a SourceError (a ConfigError: one line)."""
    from vlscale.config import SourceError

    with pytest.raises(SourceError) as e:
        build_vision_encoder(vision, pretrained=tag)
    msg = str(e.value)
    assert msg.startswith(f"model.vision_pretrained={tag!r} for {vision}: open_clip cannot load it") and "\n" not in msg
    for w in words:
        assert w in msg


def test_a_clip_tag_open_clip_cannot_fetch_names_the_key(monkeypatch):
    """A known tag whose weights are neither cached nor downloadable (offline): the fetch's error, named."""
    import open_clip

    from vlscale.config import SourceError

    def offline(cfg, **kw):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(SourceError, match=r"^model\.vision_pretrained='openai' for RN50: open_clip cannot load it "
                                          r"\(cannot fetch its weights: OSError: no network\); give one "
                                          r"of its tags \['openai', 'yfcc15m', 'cc12m'\]"):
        build_vision_encoder("RN50", pretrained="openai")


def _tag(monkeypatch, name: str, tag: str, file=None, **settings) -> None:
    """Make ``tag`` an open_clip tag of ``name`` whose weights are ``file`` (open_clip's download_pretrained returns a
    tag's ``file`` as it is), or where ``settings`` say (``hf_hub="org/repo/"``: a Hugging Face repo)."""
    import open_clip.pretrained

    where = {"file": str(file)} if file is not None else {"url": ""}
    tags = {**open_clip.pretrained._PRETRAINED.get(name, {}),
            tag: {**where, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD, **settings}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, tags)


@pytest.mark.parametrize("source", ["hub cache", ".bin file"])
def test_a_clip_tag_loads_its_files_visual_tensors_into_the_tower_built_alone(monkeypatch, tmp_path, source):
    """An open_clip tag's file holds the whole CLIP: its visual tensors are loaded into the tower, built alone as a
    random one is; the CLIP (its text tower: ViT-L-14's is 123 M parameters) is never built on a rank. The file is
    found as open_clip finds it: in Hugging Face's cache, offline (a repo laid out as huggingface_hub keeps one),
    or a tag's own file (a .bin state dict under "state_dict")."""
    import huggingface_hub.constants
    import open_clip
    from open_clip import model as open_clip_model
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(1)
        trained = open_clip.create_model("tiny-clip-vit").state_dict()
    if source == "hub cache":
        repo, revision = tmp_path / "models--vlscale-test--tiny-clip-vit", "0" * 40
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        save_file({k: v.contiguous() for k, v in trained.items()},
                  str(repo / "snapshots" / revision / "open_clip_model.safetensors"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        _tag(monkeypatch, "tiny-clip-vit", "synthtag", hf_hub="vlscale-test/tiny-clip-vit/")
    else:
        torch.save({"state_dict": trained}, tmp_path / "open_clip_pytorch_model.bin")
        _tag(monkeypatch, "tiny-clip-vit", "synthtag", tmp_path / "open_clip_pytorch_model.bin")
    for whole in ("create_model", "create_model_and_transforms"):
        monkeypatch.setattr(open_clip, whole, lambda *a, **kw: pytest.fail("the whole CLIP was built"))
    monkeypatch.setattr(open_clip_model, "_build_text_tower", lambda *a, **kw: pytest.fail("a text tower was built"))
    got = build_vision_encoder("tiny-clip-vit", pretrained="synthtag").visual.state_dict()
    ours = {k.removeprefix("visual."): v for k, v in trained.items() if k.startswith("visual.")}
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)
    random = build_vision_encoder("tiny-clip-vit").visual.state_dict()
    assert not torch.equal(got["conv1.weight"], random["conv1.weight"])


def test_a_tags_file_of_another_tower_names_the_tag_and_its_file(monkeypatch, tmp_path):
    """A tag's file that is not the tower's (a broken cache entry, another model's): one line naming the tag and
    the file, as a checkpoint file given by path does."""
    from safetensors.torch import save_file

    from vlscale.config import SourceError

    file = tmp_path / "open_clip_model.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, str(file))
    _tag(monkeypatch, "tiny-clip-vit", "synthtag", file)
    with pytest.raises(SourceError, match=rf"^model\.vision_pretrained='synthtag' \({re.escape(str(file))}\) is not "
                                          r"a checkpoint of tiny-clip-vit's visual tower \(shapes differ: "):
        build_vision_encoder("tiny-clip-vit", pretrained="synthtag")


def test_a_vit_tag_trained_with_another_activation_is_refused(monkeypatch, tmp_path):
    """OpenAI's CLIP ViTs were trained with QuickGELU; open_clip's ViT-B-32 builds GELU and only warns of a tag
    trained otherwise, and the frozen tower's features would be off in every block (the video preset's ViT-B-32 and
    the flan-t5 presets' ViT-L-14 had the 'openai' weights so). Refused before any weights are fetched, naming the
    -quickgelu name that builds the same tower with QuickGELU; the other way round too. A ResNet tower has no such
    activation (ModifiedResNet's blocks are ReLU): its tags go on to the fetch."""
    import open_clip

    from vlscale.config import SourceError

    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, **kw: pytest.fail("fetched"))
    for name in ("ViT-B-32", "ViT-L-14"):
        with pytest.raises(SourceError, match=rf"^model\.vision='{name}' with model\.vision_pretrained='openai': those "
                                              rf"weights were trained with QuickGELU, but {name}'s open_clip config "
                                              rf"builds GELU, and every layer's features would be off; give "
                                              rf"model\.vision={name}-quickgelu \(open_clip's name for the same tower "
                                              r"with QuickGELU\)$"):
            build_vision_encoder(name, pretrained="openai")
    _tag(monkeypatch, "ViT-B-32-quickgelu", "gelutag", tmp_path / "none.safetensors")
    with pytest.raises(SourceError, match=r"trained with GELU, but ViT-B-32-quickgelu's open_clip config builds "
                                          r"QuickGELU.*; give a model\.vision whose open_clip config has "
                                          r"quick_gelu=false$"):
        build_vision_encoder("ViT-B-32-quickgelu", pretrained="gelutag")

    def offline(cfg, **kw):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    for name in ("RN101", "ViT-B-32-quickgelu"):  # the activation is right: on to the fetch
        with pytest.raises(SourceError, match=rf"^model\.vision_pretrained='openai' for {name}: open_clip cannot "
                                              r"load it \(cannot fetch its weights"):
            build_vision_encoder(name, pretrained="openai")


def test_a_pool_size_beyond_the_grid_keeps_the_grid():
    """model.pool_size larger than the ResNet grid (tiny-clip-rn: 4x4) pools to the grid itself, not to an upsampled
    grid of repeated cells."""
    cfg = _cfg("model.pool_size=6")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    assert model.pool_size == 4 and model.visual_tokens_per_image == 16
    vis, mask = model.visual_embeds(_batch(cfg, pixel=False))
    assert vis.shape[:2] == mask.shape == (3, 16)


def test_a_target_one_short_of_barts_positions_fits():
    """The decoder's start token takes one of BART's positions: data.max_target_length=255 fits tiny-bart's 256,
    256 does not."""
    from vlscale.config import ConfigError

    build_model(_cfg("model.backbone=tiny-bart", "data.max_target_length=255"), device="meta")
    with pytest.raises(ConfigError, match=r"data.max_target_length=256 \(\+1 for the start token\) exceeds "
                                          r"tiny-bart's 256 positions"):
        build_model(_cfg("model.backbone=tiny-bart", "data.max_target_length=256"), device="meta")


def test_a_resnet_grid_below_its_side_is_max_pooled_with_the_pooled_grids_boxes():
    """model.pool_size under the ResNet grid (tiny-clip-rn: 4x4 -> 2x2; the paper's RN101: 7x7 -> 6x6): each image
    gives pool_size^2 tokens, the projection of its max-pooled cells at the pooled grid's boxes with its image-order
    embedding, all attended to; BART's position check counts those pool_size^2 tokens per image."""
    from vlscale.config import ConfigError
    from vlscale.modeling.projector import grid_boxes
    from vlscale.modeling.vision import pool_grid

    cfg = _cfg("model.pool_size=2", tasks="[nlvr2]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    assert model.visual_tokens_per_image == 4
    batch = _batch(cfg, task="nlvr2", n_img=2, pixel=False)
    with torch.no_grad():
        vis, mask = model.visual_embeds(batch)
        pooled = pool_grid(batch["vis_feats"].flatten(0, 1), 4, 2).reshape(3, 2, 4, -1)
        want = model.projector(pooled, grid_boxes(2)[None, None].expand(3, 2, 4, 5), torch.arange(2))
    torch.testing.assert_close(vis, want.reshape(3, 8, -1))
    assert mask.shape == (3, 8) and mask.eq(1).all()
    bart = ("model.backbone=tiny-bart", "model.pool_size=2")
    build_model(_cfg(*bart, "data.max_input_length=248", tasks="[nlvr2]"), device="meta")  # 2 x 4 + 248 fit 256
    with pytest.raises(ConfigError, match=r"257 tokens long \(2 x 4 visual tokens \(model.pool_size=2\)"):
        build_model(_cfg(*bart, "data.max_input_length=249", tasks="[nlvr2]"), device="meta")


def test_video_frames_as_images_take_clips_image_embedding_as_the_feature_cache_does():
    """A video batch of raw frames (B, 1, F, 3, S, S), as the collator gives with model.feature_source=images, runs
    each frame through CLIP's image embedding (encode_global, what the frame-feature cache stores): the same
    encoder input and loss as the batch with those features cached."""
    cfg = _cfg("model.vision=tiny-clip-vit", "model.max_frames=8", tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, task="tvqa", frames=6)
    s = vision_dims("tiny-clip-vit")["image_size"]
    frames = torch.randn(3, 1, 6, 3, s, s, generator=torch.Generator().manual_seed(1))
    images = {k: v for k, v in batch.items() if k != "vis_feats"} | {"pixel_values": frames}
    with torch.no_grad():
        cached = dict(batch, vis_feats=model.vision.encode_global(frames.flatten(0, 2)).reshape(3, 1, 6, -1))
        want, want_mask = model.encoder_inputs(cached)
        got, got_mask = model.encoder_inputs(images)
        torch.testing.assert_close(got, want)
        assert torch.equal(got_mask, want_mask)
        torch.testing.assert_close(model(images).loss, model(cached).loss)


@pytest.mark.parametrize("train_vision", [False, True])
def test_clip_trains_only_with_train_vision(train_vision):
    """Frozen CLIP (the default) stays in eval mode (its BatchNorms' statistics fixed) under model.train() and gets
    no gradient; with peft.train_vision=true it follows train() and the loss reaches its weights."""
    cfg = _cfg(f"peft.train_vision={str(train_vision).lower()}", tasks="[vqa]")
    model = build_model(cfg, vocab_size=VOCAB).train()
    assert model.vision.training is train_vision and model.lm.training
    model(_batch(cfg)).loss.backward()
    grads = [p.grad for p in model.vision.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in grads) is train_vision


def test_a_one_task_run_with_per_task_lora_holds_and_trains_that_tasks_factors():
    """data.tasks=[vqa] with peft.sharing=multiple: each of the 12 q/v sites holds A_vqa and B_vqa (no shared set),
    trainable, and the model is the sharing=single one under other names (same initial values, same loss); a backward
    gives every B a gradient and every A a zero one (B starts at zero); a batch of another task is refused."""
    lora = ("peft.method=lora", "peft.lora_rank=8", "peft.lora_dropout=0.0")
    models = {}
    for sharing in ("multiple", "single"):
        torch.manual_seed(0)
        models[sharing] = build_model(_cfg(*lora, f"peft.sharing={sharing}", tasks="[vqa]"), vocab_size=VOCAB).train()
    model = models["multiple"]
    factors = {n: p for n, p in model.named_parameters() if n.startswith("peft.lora.")}
    assert len(factors) == 24 and {n.rsplit(".", 1)[1] for n in factors} == {"A_vqa", "B_vqa"}
    assert all(p.requires_grad for p in factors.values())
    single = {n.replace("_shared", "_vqa"): p for n, p in models["single"].named_parameters()}
    assert all(torch.equal(p, single[n]) for n, p in model.named_parameters())
    batch = _batch(_cfg(tasks="[vqa]"))
    loss = model(batch).loss
    torch.testing.assert_close(loss, models["single"](batch).loss, rtol=0, atol=0)
    loss.backward()
    for n, p in factors.items():
        assert p.grad is not None and (p.grad.abs().max() > 0) == n.endswith("B_vqa"), n
    with pytest.raises(KeyError, match=r"unknown task 'gqa'; known tasks: \['vqa'\]"):
        model(dict(batch, task="gqa"))


@pytest.mark.parametrize("train_vision", [False, True])
def test_eval_after_train_leaves_no_module_training(train_vision):
    """model.eval() after model.train() turns every module to eval mode (the LM's dropout off for evaluation and
    generation; the train() override that keeps frozen CLIP in eval mode passes the mode on): two forwards of a
    batch with model.dropout=0.5 give the same logits."""
    cfg = _cfg("model.dropout=0.5", f"peft.train_vision={str(train_vision).lower()}", tasks="[vqa]")
    model = build_model(cfg, vocab_size=VOCAB).train()
    assert model.lm.training and model.projector.training
    model.eval()
    assert [n for n, m in model.named_modules() if m.training] == []
    batch = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, model(batch).logits, rtol=0, atol=0)


def test_a_video_of_exactly_max_frames_is_taken():
    cfg = _cfg("model.vision=tiny-clip-vit", "model.max_frames=8", tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    embeds, mask = model.encoder_inputs(_batch(cfg, task="tvqa", frames=8))
    assert embeds.shape[1] == 8 + 5 and mask[1].sum() == 13


def test_video_features_without_a_mask_or_the_video_axis():
    """Frame features given as (B, F, D) are one video per example, as (B, 1, F, D) are; a batch without vis_mask
    has all its frames, placed along its own F frames (as an all-ones vis_mask places them), not model.max_frames."""
    cfg = _cfg("model.vision=tiny-clip-vit", "model.max_frames=8", tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, task="tvqa", frames=6)
    batch["vis_mask"] = torch.ones_like(batch["vis_mask"])
    want, want_mask = model.encoder_inputs(batch)
    no_mask = {k: v for k, v in batch.items() if k != "vis_mask"}
    for case in (no_mask, dict(no_mask, vis_feats=batch["vis_feats"][:, 0])):
        embeds, mask = model.encoder_inputs(case)
        torch.testing.assert_close(embeds, want)
        assert torch.equal(mask, want_mask)


def test_a_vit_keeps_its_patch_grid_whatever_the_pool_size():
    """model.pool_size pools a ResNet's grid only: a ViT gives all its patch tokens (tiny-clip-vit: 4x4), and BART's
    position check counts all of them."""
    from vlscale.config import ConfigError

    cfg = _cfg("model.vision=tiny-clip-vit", "model.pool_size=2", tasks="[vqa]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    assert model.visual_tokens_per_image == 16
    vis, mask = model.visual_embeds(_batch(cfg, pixel=False))
    assert vis.shape[:2] == mask.shape == (3, 16)
    bart = ("model.backbone=tiny-bart", "model.vision=tiny-clip-vit", "model.pool_size=2")
    build_model(_cfg(*bart, "data.max_input_length=240", tasks="[vqa]"), device="meta")  # 16 + 240 fit
    with pytest.raises(ConfigError, match=r"257 tokens long \(1 x 16 visual tokens \(model.pool_size=2\)"):
        build_model(_cfg(*bart, "data.max_input_length=241", tasks="[vqa]"), device="meta")


def test_grid_features_of_another_width_are_named():
    cfg = _cfg("model.feature_source=cache")
    model = build_model(cfg, vocab_size=VOCAB)
    batch = _batch(cfg, pixel=False)
    batch["vis_feats"] = torch.randn(3, 1, 16, model.feat_dim + 3)
    with pytest.raises(ValueError, match=rf"visual features are {model.feat_dim + 3}-d; tiny-clip-rn gives "
                                         rf"{model.feat_dim}-d"):
        model(batch)


def test_prompts_come_first_in_the_encoder_input():
    """Prompt tuning: [prompts] + [visual tokens] + [text], as the paper's encoder input."""
    cfg = _cfg("peft.method=prompt", "peft.n_prompts=3")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg)
    model.peft.set_task("vqa")
    embeds, mask = model.encoder_inputs(batch)
    vis, _ = model.visual_embeds(batch)
    assert embeds.shape[1] == mask.shape[1] == 3 + 16 + 5
    torch.testing.assert_close(embeds[:, :3], model.peft.prompts(3, embeds.dtype))
    torch.testing.assert_close(embeds[:, 3:19], vis)
    assert mask.eq(1).all()  # the prompts are attended to, as the visual tokens and the (unpadded) text are


def test_prompts_stay_first_and_attended_beside_a_videos_padded_frames():
    """Prompt tuning on video: the mask lines up with [prompts] + [frames] + [text], so a shorter video's padding
    slots, and only those, move behind its text, and the prompts stay first and attended."""
    cfg = _cfg("peft.method=prompt", "peft.n_prompts=3", "model.vision=tiny-clip-vit", "model.max_frames=8",
               tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, task="tvqa", frames=6)  # example 0: 3 of its 6 frames
    model.peft.set_task("tvqa")
    with torch.no_grad():
        embeds, mask = model.encoder_inputs(batch)
        prompts, (vis, _) = model.peft.prompts(3, embeds.dtype), model.visual_embeds(batch)
        text = model.lm.get_encoder().embed_tokens(batch["input_ids"])
    assert mask[0].tolist() == [1] * (3 + 3 + 5) + [0] * 3 and mask[1].eq(1).all()
    torch.testing.assert_close(embeds[0, :11], torch.cat([prompts[0], vis[0, :3], text[0]]))
    torch.testing.assert_close(embeds[1], torch.cat([prompts[1], vis[1], text[1]]))


@pytest.mark.parametrize("backbone", ["tiny-t5", "tiny-bart"])
def test_next_token_logits_are_the_teacher_forced_logits_after_the_prefix(backbone):
    """Choice scoring's one decoder pass gives the logits a forward with the prefix as its labels gives at the next
    position (the decoder start token first, then the prefix)."""
    cfg = _cfg(f"model.backbone={backbone}")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg)
    prefix = [7, 11]
    batch["labels"] = torch.tensor([prefix + [5]] * 3)
    with torch.no_grad():
        forced = model(batch).logits[:, len(prefix)]
    torch.testing.assert_close(model.next_token_logits(batch, prefix), forced)


def _nonzero_peft(model, seed=0):
    """PEFT weights drawn away from their identity init, so that each task's modules change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.peft.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_forward_generate_and_choice_scoring_run_the_batchs_task_whatever_ran_before():
    """peft.sharing=multiple: a batch's task selects its own adapters in forward, generate and next_token_logits,
    whichever task the model ran last (an evaluation interleaves tasks; one left on the previous task's adapters
    gives that task's predictions)."""
    cfg = _cfg("peft.sharing=multiple")
    torch.manual_seed(0)
    model = _nonzero_peft(build_model(cfg, vocab_size=VOCAB).eval())
    gen = {"max_new_tokens": 3, "num_beams": 1, "do_sample": False, "output_scores": True,
           "return_dict_in_generate": True}
    calls = {"forward": lambda b: model(b).logits,
             "generate": lambda b: torch.stack(model.generate(b, **gen).scores),
             "next_token_logits": lambda b: model.next_token_logits(b, [7])}
    vqa, nlvr2 = _batch(cfg, task="vqa"), dict(_batch(cfg, task="vqa"), task="nlvr2")
    for name, call in calls.items():
        with torch.no_grad():
            model.peft.set_task("vqa")
            want_vqa = call(vqa)
            want_nlvr2 = call(nlvr2)  # the same inputs through nlvr2's adapters
            assert not torch.allclose(want_vqa, want_nlvr2), name  # the tasks' adapters differ
            torch.testing.assert_close(call(vqa), want_vqa, msg=name)  # after nlvr2 ran: vqa's adapters again


@pytest.mark.parametrize("backbone", ["tiny-t5", "tiny-bart"])
def test_generate_attends_to_the_text_mask_so_padding_changes_nothing(backbone):
    """An example whose text is padded to its batch's longest generates with the scores it has alone: generate
    passes the encoder mask (without it the padding tokens were attended to)."""
    cfg = _cfg(f"model.backbone={backbone}", tasks="[vqa]")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, b=2, text_len=7)
    batch["attention_mask"][0, 4:] = 0
    alone = dict(batch, input_ids=batch["input_ids"][:1, :4], attention_mask=batch["attention_mask"][:1, :4],
                 pixel_values=batch["pixel_values"][:1], labels=batch["labels"][:1])
    gen = {"max_new_tokens": 3, "num_beams": 1, "do_sample": False, "output_scores": True,
           "return_dict_in_generate": True}
    padded, single = model.generate(batch, **gen), model.generate(alone, **gen)
    torch.testing.assert_close(padded.scores[0][:1], single.scores[0], atol=1e-5, rtol=1e-5)


def test_a_long_videos_padding_moves_behind_its_text_in_order():
    """The padding slots of a video move behind its text with its frames and text tokens kept in their order, at
    any length (an unstable sort keeps short rows in order on the host, not rows of 40 tokens and more)."""
    cfg = _cfg("model.vision=tiny-clip-vit", "model.max_frames=32", tasks="[tvqa,tvc]")
    model = build_model(cfg, vocab_size=VOCAB).eval()
    batch = _batch(cfg, task="tvqa", b=2, text_len=20, frames=30)  # example 0: 15 frames of 30
    embeds, mask = model.encoder_inputs(batch)
    assert mask[0].tolist() == [1] * 35 + [0] * 15 and mask[1].eq(1).all()
    vis, _ = model.visual_embeds(batch)
    text = model.lm.get_encoder().embed_tokens(batch["input_ids"])
    torch.testing.assert_close(embeds[0, :35], torch.cat([vis[0, :15], text[0]]))
    torch.testing.assert_close(embeds[1], torch.cat([vis[1], text[1]]))


def test_a_tokenizer_larger_than_the_registrys_vocabulary_sizes_the_embeddings():
    """A hub backbone's tokenizer with extra special tokens (t5-small: 32128 + 5) gets embeddings for all of them;
    a smaller one (T5's 32100 pieces) keeps the checkpoint's 32128."""
    cfg = _cfg("model.backbone=t5-small")
    assert build_model(cfg, vocab_size=32133, device="meta").lm.get_input_embeddings().num_embeddings == 32133
    assert build_model(cfg, vocab_size=32100, device="meta").lm.get_input_embeddings().num_embeddings == 32128


def test_a_checkpoint_folder_smaller_than_the_tokenizer_is_resized_and_the_meta_build_agrees(tmp_path):
    """model.backbone_path holds a 120-token checkpoint, the tokenizer has 130: the load resizes the embeddings to
    130, and the meta build (counts, memory plans) has the load's 130 rows, not the folder's 120."""
    build_lm("tiny-bart", config_overrides={"vocab_size": VOCAB}).save_pretrained(tmp_path / "lm")
    cfg = _cfg("model.backbone=tiny-bart", "model.pretrained=true", f"model.backbone_path={tmp_path / 'lm'}")
    for device in ("meta", "cpu"):
        model = build_model(cfg, vocab_size=VOCAB + 10, device=device)
        assert model.lm.get_input_embeddings().num_embeddings == VOCAB + 10, device


def test_a_checkpoint_folder_larger_than_the_tokenizer_keeps_its_rows(tmp_path):
    """A 130-token checkpoint with a 120-token tokenizer: the load keeps the checkpoint's 130 rows (never shrinks its
    embeddings), and the meta build (counts, memory plans) has the same 130."""
    build_lm("tiny-bart", config_overrides={"vocab_size": VOCAB + 10}).save_pretrained(tmp_path / "lm")
    cfg = _cfg("model.backbone=tiny-bart", "model.pretrained=true", f"model.backbone_path={tmp_path / 'lm'}")
    for device in ("meta", "cpu"):
        model = build_model(cfg, vocab_size=VOCAB, device=device)
        assert model.lm.get_input_embeddings().num_embeddings == VOCAB + 10, device


def test_gradient_checkpointing_is_on_and_the_cache_off():
    model = build_model(_cfg("train.gradient_checkpointing=true"), vocab_size=VOCAB)
    assert model.lm.is_activation_checkpointing and model.lm.config.use_cache is False
    assert not build_model(_cfg(), vocab_size=VOCAB).lm.is_activation_checkpointing


def test_set_checkpointing_turns_it_off_again():
    from vlscale.modeling.vl_model import set_checkpointing

    lm = build_lm("tiny-t5", device="meta")
    set_checkpointing(lm, True)
    assert lm.is_activation_checkpointing
    set_checkpointing(lm, False)
    assert not lm.is_activation_checkpointing


def test_extra_prompts_count_against_barts_positions():
    """peft.extra_prompts (prompts on top of another method) take positions as prompt tuning's do."""
    from vlscale.config import ConfigError

    build_model(_cfg("model.backbone=tiny-bart", "peft.extra_prompts=true", "data.max_input_length=184"),
                device="meta")  # 40 + 2 x 16 + 184 = 256 fit
    with pytest.raises(ConfigError, match=r"258 tokens long \(2 x 16 visual tokens .* \+ peft.n_prompts=40 \+ "
                                          r"data.max_input_length=186\), more than tiny-bart's 256"):
        build_model(_cfg("model.backbone=tiny-bart", "peft.extra_prompts=true", "data.max_input_length=186"),
                    device="meta")


@pytest.mark.parametrize("backbone, key", [("tiny-t5", "dropout_rate"), ("tiny-bart", "dropout")])
def test_model_dropout_reaches_the_lms_own_key(backbone, key):
    lm = build_model(_cfg(f"model.backbone={backbone}", "model.dropout=0.3"), device="meta").lm
    assert getattr(lm.config, key) == 0.3


def test_grid_and_frame_boxes_are_normalised_positions():
    """A grid cell's box is (x1, y1, x2, y2, area), row-major; a frame's is (t0, 0, t1, 1, duration) along its own
    video's length (a video of no frames counts as one, so its padding's positions stay finite)."""
    from vlscale.modeling.projector import frame_boxes, grid_boxes

    torch.testing.assert_close(grid_boxes(2), torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.25], [0.5, 0.0, 1.0, 0.5, 0.25],
                                                            [0.0, 0.5, 0.5, 1.0, 0.25], [0.5, 0.5, 1.0, 1.0, 0.25]]))

    def frames(starts, d):
        return torch.tensor([[t, 0.0, t + d, 1.0, d] for t in starts])

    torch.testing.assert_close(frame_boxes(4), frames([0, 0.25, 0.5, 0.75], 0.25))
    torch.testing.assert_close(frame_boxes(4, torch.tensor([2, 4, 0])),
                               torch.stack([frames([0, 0.5, 1, 1.5], 0.5), frames([0, 0.25, 0.5, 0.75], 0.25),
                                            frames([0, 1, 2, 3], 1.0)]))


def test_the_projection_takes_fp32_features_into_a_half_precision_model():
    """Cached features (fp32 files) and boxes go into a bf16 projection: cast to its dtype, bf16 out."""
    from vlscale.modeling.projector import VisualProjector

    proj = VisualProjector(8, 16).to(torch.bfloat16)
    out = proj(torch.randn(2, 1, 4, 8), torch.rand(2, 1, 4, 5), torch.arange(1))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, 16)


def test_the_projection_is_the_sum_of_two_layer_norms_with_t5s_epsilon_and_the_image_order():
    """v = LN(W_f f + b_f) + LN(W_p p + b_p) + E_order[k], both layer norms with eps 1e-6 (T5's layer_norm_epsilon,
    as VL-T5's visual embedding) and p read as (x1, y1, x2, y2, area). Projections of small spread make the eps
    count: torch's default 1e-5 on either norm, or the box's coordinates in another order, give other embeddings."""
    from vlscale.modeling.projector import VisualProjector

    torch.manual_seed(0)
    proj = VisualProjector(8, 16).double()
    with torch.no_grad():
        proj.feat[0].weight.mul_(1e-3), proj.feat[0].bias.mul_(1e-3)
        proj.pos[0].weight.mul_(1e-3), proj.pos[0].bias.mul_(1e-3)
        for norm in (proj.feat[1], proj.pos[1]):
            norm.weight.normal_(), norm.bias.normal_()
    feats, boxes = torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.rand(2, 2, 3, 5, dtype=torch.float64)

    def layer_norm(x, norm):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    expected = (layer_norm(feats @ proj.feat[0].weight.T + proj.feat[0].bias, proj.feat[1])
                + layer_norm(boxes @ proj.pos[0].weight.T + proj.pos[0].bias, proj.pos[1])
                + proj.image_order.weight[None, :, None, :])
    with torch.no_grad():
        torch.testing.assert_close(proj(feats, boxes, torch.arange(2)), expected)


def test_a_v1_1_t5_has_a_head_of_its_own_on_every_build():
    """Flan-T5 / T5 v1.1 configs (tie_word_embeddings false) keep an lm_head apart from the embeddings even on the
    meta build behind counts and plans; the original T5's head is the embedding."""
    flan, t5 = build_lm("flan-t5-small", device="meta"), build_lm("t5-small", device="meta")
    assert flan.lm_head.weight is not flan.get_input_embeddings().weight
    assert t5.lm_head.weight is t5.get_input_embeddings().weight


@pytest.mark.parametrize("backbone", ["tiny-t5", "mini-t5"])
def test_the_projects_own_backbones_take_the_tokenizers_vocabulary(backbone):
    """tiny-* and mini-* (random build) get exactly the tokenizer's rows, fewer than the registry's too."""
    model = build_model(_cfg(f"model.backbone={backbone}", "model.pretrained=false"), vocab_size=VOCAB, device="meta")
    assert model.lm.get_input_embeddings().num_embeddings == VOCAB


def test_a_meta_build_has_the_asked_dtype():
    """Memory plans of a bf16 run count bf16 weights: the meta build is in the dtype asked for."""
    assert {p.dtype for p in build_lm("tiny-t5", device="meta", dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_a_random_build_on_the_host_has_the_asked_dtype():
    assert {p.dtype for p in build_lm("tiny-t5", dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_a_meta_build_of_the_clip_tower_has_the_asked_dtype_too():
    """build_model(device="meta", dtype=bf16) gave a bf16 language model beside a CLIP tower in fp32 (the meta
    build skipped the dtype), unlike the same build on the host."""
    assert {p.dtype for p in build_vision_encoder("tiny-clip-rn", device="meta", dtype=torch.bfloat16).parameters()} \
        == {torch.bfloat16}
    model = build_model(_cfg("model.feature_source=images"), vocab_size=VOCAB, device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in model.vision.parameters()} == {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}


def test_pool_grid_max_pools_each_cell_of_the_row_major_grid():
    """pool_grid reads token r*side + c as the grid's cell (r, c) and keeps the largest of each cell's block
    (RN101: 7x7 -> 6x6, adaptive max); a grid of the wrong token count is refused, one of pool_size is kept."""
    from vlscale.modeling.vision import pool_grid

    side, d = 4, 2
    grid = torch.randn(1, side * side, d, generator=torch.Generator().manual_seed(0))
    out = pool_grid(grid, side, 2)
    cell = grid.reshape(side, side, d)  # [r, c, feature]
    want = torch.stack([cell[r:r + 2, c:c + 2].amax(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    assert torch.equal(out[0], want)
    assert pool_grid(grid, side, side) is grid
    with pytest.raises(ValueError, match=r"grid has 15 tokens, expected 4x4"):
        pool_grid(grid[:, :15], side, 2)


def test_image_transform_centre_crops_resizes_bicubic_and_normalises():
    """CLIP's preprocessing: a non-square image is centre-cropped to its short side, resized bicubic to the
    model's size and normalised with CLIP's mean and std from [0, 1]."""
    import numpy as np
    import open_clip
    from PIL import Image

    from vlscale.modeling.vision import image_transform

    size = vision_dims("tiny-clip-vit")["image_size"]
    tf = image_transform("tiny-clip-vit")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    wide = np.zeros((6, 10, 3), np.uint8)
    wide[:, 2:8] = (200, 100, 50)  # the centre 6x6; black bands left and right
    (out,) = tf([wide])
    want = (torch.tensor([200, 100, 50]).float().view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(out, want.expand(3, size, size))
    square = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
    want = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(tf([Image.fromarray(square)])[0], want)
    assert tf([]).shape == (0, 3, size, size)


def test_image_transform_refuses_a_float_array_or_a_path_naming_the_image():
    """A float image (in [0, 1], as many pipelines give them) was PIL's "Cannot handle this data type: (1, 1, 3),
    <f4", a path "'str' object has no attribute 'convert'"."""
    import numpy as np

    from vlscale.modeling.vision import image_transform

    tf, ok = image_transform("tiny-clip-rn"), np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(TypeError, match=r"^image 1: an image array must be uint8 \(H, W, 3\), got float32 \(a float "):
        tf([ok, ok.astype(np.float32)])
    with pytest.raises(TypeError, match=r"^image 0: an image array must be uint8 \(H, W, 3\), got int64 "):
        tf([ok.astype(np.int64)])  # np.array of a list of pixel values
    with pytest.raises(TypeError, match=r"^image 0: an image is a uint8 \(H, W, 3\) array or a PIL image, got str "
                                        r"\(a file: vlscale.predict.read_image\(path\)\)$"):
        tf(["a.png"])


def test_image_transform_normalises_as_the_pretrained_tag_does(tmp_path):
    """A tag with its own statistics (ViT-L-14 laion2b_s32b_b82k: mean = std = 0.5; the CLIPA towers: ImageNet's) is
    normalised with them, as open_clip's create_model sets them: every input was normalised with OpenAI's. A
    checkpoint file, the shipped weights, random ones and the OpenAI tags keep OpenAI's. The collator (training,
    evaluation) takes them from model.vision_pretrained."""
    import numpy as np
    import open_clip
    from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD

    from vlscale.data import Collator
    from vlscale.modeling.vision import image_transform, normalisation

    openai = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    half = ((0.5,) * 3, (0.5,) * 3)
    assert normalisation("ViT-L-14", "laion2b_s32b_b82k") == half
    assert normalisation("ViT-L-14-CLIPA", "datacomp1b") == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalisation("RN101", "openai") == openai and normalisation("ViT-L-14", "openai") == openai
    checkpoint = tmp_path / "laion2b_s32b_b82k"  # a file, even one named as a tag, is not the tag
    checkpoint.write_bytes(b"")
    for pretrained in (None, "synthetic", str(checkpoint)):
        assert normalisation("ViT-L-14", pretrained) == openai, pretrained
    grey = np.full((4, 4, 3), 51, np.uint8)  # 0.2 after scaling
    size = vision_dims("ViT-L-14")["image_size"]
    torch.testing.assert_close(image_transform("ViT-L-14", "laion2b_s32b_b82k")([grey]),
                               torch.full((1, 3, size, size), (0.2 - 0.5) / 0.5))
    cfg = load_config("tiny", ["model.vision=ViT-L-14", "model.vision_pretrained=laion2b_s32b_b82k"])
    torch.testing.assert_close(Collator(None, cfg).transform([grey]), torch.full((1, 3, size, size), -0.6))


def test_towers_vlscale_does_not_read_are_refused_by_the_config():
    """A timm tower (the SigLIP and ConvNeXt configs: no grid of open_clip's own ResNet or ViT) stopped a run with
    "KeyError: 'layers'", a CoCa tower with a shape mismatch; the config refuses them naming why, and vision_dims
    names the model."""
    from vlscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.vision='ViT-B-16-SigLIP' is a tower vlscale does not read "
                                          r"\(timm's 'vit_base_patch16_siglip_224', in open_clip's config\); it takes "
                                          r"the grid of open_clip's own ResNet"):
        load_config("tiny", ["model.vision=ViT-B-16-SigLIP"])
    with pytest.raises(ValueError, match=r"^model\.vision='convnext_base': its tower is not open_clip's own"):
        vision_dims("convnext_base")
    # CoCa's ViT returns its attentional pooler's 255 queries (512 wide for coca_ViT-B-32), where vision_dims said
    # 49 patches of 768: the projector, built for the latter, failed at the first step
    with pytest.raises(ConfigError, match=r"^model\.vision='coca_ViT-B-32' is a tower vlscale does not read \(a ViT "
                                          r"whose tokens are CoCa's attentional pooler's learned queries"):
        load_config("tiny", ["model.vision=coca_ViT-B-32"])
    with pytest.raises(ValueError, match=r"^model\.vision='coca_ViT-L-14': its tower is not open_clip's own"):
        vision_dims("coca_ViT-L-14")
    assert load_config("tiny", ["model.vision=ViT-L-14"]).model.vision == "ViT-L-14"


def test_vision_encoder_grid_tokens_eval_mode_dtype_and_unused_heads():
    """encode_grid's tokens are the last conv stage's cells in row-major order (what pool_grid reads); the tower
    is in eval mode (BatchNorm's running statistics: an image's features do not depend on its batch) and in the
    dtype asked for; a ViT that normalises only its pooled embedding (final_ln_after_pool) leaves ln_post unused."""
    enc = build_vision_encoder("tiny-clip-rn")
    x = torch.randn(3, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0))
    v = enc.visual
    with torch.no_grad():
        grid = enc.encode_grid(x)
        conv = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (N, D, side, side)
        assert torch.equal(grid[:, 1 * enc.grid_side + 2], conv[:, :, 1, 2])
        torch.testing.assert_close(enc.encode_grid(x[:1]), grid[:1])
    assert not enc.training
    half = build_vision_encoder("tiny-clip-rn", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half.encode_grid(x[:1]).dtype == torch.bfloat16
    vit = build_vision_encoder("tiny-clip-vit")
    assert not any(n.startswith("visual.ln_post.") for n in vit.unused_parameter_names(video=False))
    vit.visual.final_ln_after_pool = True
    assert {n for n in vit.unused_parameter_names(video=False) if "ln_post" in n} == {"visual.ln_post.weight",
                                                                                      "visual.ln_post.bias"}
    assert vit.unused_parameter_names(video=True) == []


def test_clip_checkpoint_forms_that_load(tmp_path):
    """A CLIP file as written by training scripts loads: a ``state_dict`` wrapper, DDP's ``module.`` prefix,
    without BatchNorm's num_batches_tracked counters; a tensor the tower lacks, or a file without ``visual.*``
    keys, is refused naming the file and the key."""
    from vlscale.config import SourceError

    enc = build_vision_encoder("tiny-clip-rn")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.5)
    state = {f"module.visual.{k}": v for k, v in enc.visual.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert len(state) < len(enc.visual.state_dict())  # the tower has BatchNorm counters the file leaves out
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ddp.pt")
    loaded = build_vision_encoder("tiny-clip-rn", str(tmp_path / "ddp.pt"))
    for (name, a), b in zip(enc.visual.state_dict().items(), loaded.visual.state_dict().values()):
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
    torch.save({**state, "module.visual.extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(SourceError, match=r"extra\.pt' is not a checkpoint of tiny-clip-rn's visual tower "
                                          r"\(not in the model: visual\.extra\.weight\)"):
        build_vision_encoder("tiny-clip-rn", str(tmp_path / "extra.pt"))
    torch.save({"text.weight": torch.zeros(2)}, tmp_path / "text.pt")
    with pytest.raises(SourceError, match=r"text\.pt: no 'visual\.\*' keys"):
        build_vision_encoder("tiny-clip-rn", str(tmp_path / "text.pt"))
    with pytest.raises(MissingWeights, match=r"model\.vision_pretrained='.*gone\.pt': no such file"):
        build_vision_encoder("tiny-clip-rn", str(tmp_path / "gone.pt"))
    # a path without a suffix is a path too (open_clip's tags hold no '/'): it was taken for a tag, and failed
    # only when open_clip looked it up, after the data had loaded
    with pytest.raises(MissingWeights, match=r"model\.vision_pretrained='.*/gone': no such file"):
        build_vision_encoder("tiny-clip-rn", str(tmp_path / "gone"))


def test_vit_grids_follow_the_patch_size_and_random_towers_do_not_follow_the_host_stream():
    """A ViT's grid side is image_size // patch_size (ViT-B-32: 7x7, ViT-L-14: 16x16); a random tower is the same
    whatever the host's generator was at when it was built (a feature cache made earlier must match it)."""
    assert [vision_dims(n)["grid_tokens"] for n in ("ViT-B-32", "ViT-L-14")] == [49, 256]
    torch.manual_seed(1)
    a = build_vision_encoder("tiny-clip-vit")
    torch.manual_seed(2)
    b = build_vision_encoder("tiny-clip-vit")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_papers_towers_dims_and_each_encodings_shape_in_either_order():
    """RN101 at 224 px gives a 7x7 grid of 2048-d cells and ViT-B/32 7x7 patches of 768; both embed an image in
    512 (video frames). One frozen tower encodes grids (N, tokens, grid_dim) and global embeddings (N, embed_dim)
    in either order, without gradients, from pixels in any dtype, in its own dtype."""
    assert vision_dims("RN101") == {"image_size": 224, "grid_dim": 2048, "grid_side": 7, "grid_tokens": 49,
                                    "embed_dim": 512, "is_resnet": True}
    assert vision_dims("ViT-B-32") == {"image_size": 224, "grid_dim": 768, "grid_side": 7, "grid_tokens": 49,
                                       "embed_dim": 512, "is_resnet": False}
    for name in ("tiny-clip-rn", "tiny-clip-vit"):
        enc = build_vision_encoder(name, dtype=torch.bfloat16)
        assert not any(p.requires_grad for p in enc.parameters()), name
        x = torch.randn(2, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            grid, emb = enc.encode_grid(x), enc.encode_global(x)
            assert grid.shape == (2, enc.grid_side ** 2, enc.grid_dim) and emb.shape == (2, enc.embed_dim), name
            assert grid.dtype == emb.dtype == torch.bfloat16 and not (grid.requires_grad or emb.requires_grad)


def test_a_vit_pooling_by_attention_leaves_out_its_contrastive_pool_only():
    """A ViT with an attention pool (CoCa's towers) runs it for its tokens; its attn_pool_contrastive pools the class
    embedding only, so an image run leaves it (and the output projection) out, and keeps ln_post."""
    vit = build_vision_encoder("tiny-clip-vit")
    vit.visual.attn_pool, vit.visual.attn_pool_contrastive = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    vit.visual.final_ln_after_pool = True
    unused = set(vit.unused_parameter_names(video=False))
    assert {"visual.attn_pool_contrastive.weight", "visual.attn_pool_contrastive.bias", "visual.proj"} <= unused
    assert not any(n.startswith(("visual.attn_pool.", "visual.ln_post.")) for n in unused)


def test_clip_files_that_are_not_a_state_dict_or_miss_many_tensors_are_named(tmp_path):
    """A .pt holding something else than a dict of tensors is refused naming the file and what it holds; a file
    missing more than three of the tower's tensors names three and counts the rest."""
    from vlscale.config import SourceError

    full = build_vision_encoder("tiny-clip-rn").visual.state_dict()
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({**{f"visual.{k}": v for k, v in full.items()}, "visual.conv1.weight": [0.0]}, tmp_path / "list_in.pt")
    for bad, held in (("list", "list"), ("list_in", "dict")):
        with pytest.raises(SourceError, match=rf"{bad}\.pt': not a state dict of tensors \(got {held}\)$"):
            build_vision_encoder("tiny-clip-rn", str(tmp_path / f"{bad}.pt"))
    gone = [k for k in full if k.startswith("layer4.") and not k.endswith("num_batches_tracked")]
    assert len(gone) > 3
    torch.save({f"visual.{k}": v for k, v in full.items() if k not in gone}, tmp_path / "cut.pt")
    with pytest.raises(SourceError, match=rf"\(missing: visual\.layer4\.[^,]+, visual\.layer4\.[^,]+, "
                                          rf"visual\.layer4\.[^,]+ and {len(gone) - 3} more\)"):
        build_vision_encoder("tiny-clip-rn", str(tmp_path / "cut.pt"))


def test_an_unknown_vision_model_is_told_names_that_exist():
    """The refusal of an unknown model.vision offers open_clip's ResNet and ViT names and the tiny towers, not the
    timm towers (SigLIP) the config refuses."""
    with pytest.raises(KeyError) as e:
        vision_dims("RN999")
    assert all(f"'{n}'" in str(e.value) for n in ("RN50", "RN101", "tiny-clip-rn", "ViT-B-16")), str(e.value)
    assert "SigLIP" not in str(e.value) and "quickgelu" not in str(e.value), str(e.value)  # towers it refuses


def test_readme_from_python_runs_as_written(capsys):
    """README, "From Python": the loop of one's own over the library's pieces runs as written and prints a score
    (the public names it imports, load_config's dict overrides, the loader's batches into model(batch).loss and
    generate, vqa_score on the batch's references)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## From Python\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (From Python)", "exec"), {})
    score = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= score <= 1.0


def test_fp16_on_a_pretrained_t5_is_noted_before_the_run_starts(launcher):
    """fp16 on a pretrained T5 (pretrained in bf16; NaN losses are reported from t5-large up, flan-t5 included) is
    said among the start-up notes, with what to use instead; not for bf16 or fp32, BART, nor the project's own
    miniatures (the fp16 tests train tiny-t5)."""
    from vlscale.modeling.backbones import fp16_note

    note = fp16_note("flan-t5-xl", True, "fp16")
    assert note.startswith("note: train.precision=fp16 with google/flan-t5-xl: T5 was pretrained in bf16") and \
        "train.precision=bf16 where the GPU has it (compute capability 8.0+" in note and "else fp32" in note
    assert fp16_note("google-t5/t5-3b", True, "fp16").startswith("note: train.precision=fp16 with google-t5/t5-3b")
    for backbone, pretrained, precision in [("flan-t5-xl", True, "bf16"), ("t5-large", True, "fp32"),
                                            ("facebook/bart-base", True, "fp16"), ("mini-t5", True, "fp16"),
                                            ("tiny-t5", False, "fp16"), ("t5-large", False, "fp16"),
                                            ("not/a-registry-t5", True, "fp16")]:
        assert fp16_note(backbone, pretrained, precision) is None, (backbone, pretrained, precision)
    train = launcher("train")
    cfg = load_config("scale/clip_t5_3b_single_adapter", ["train.precision=fp16"])
    notes = train.start_notes(cfg, "ds_configs/zero3.json", {"zero_optimization": {"stage": 3}}, 8)
    assert fp16_note(cfg.model.backbone, True, "fp16") in notes
    cfg = load_config("scale/clip_t5_3b_single_adapter", ["train.precision=bf16"])
    assert not [n for n in train.start_notes(cfg, "ds_configs/zero3.json", {"zero_optimization": {"stage": 3}}, 8)
                if "fp16" in n]


def test_a_torchscript_clip_is_refused_naming_where_its_tensors_are(tmp_path):
    """OpenAI's own CLIP files (RN101.pt, as the clip package downloads them) are TorchScript archives, which
    torch.load refuses with weights_only=True: the line said "is the file truncated or corrupt?". Now it says what
    the file is, that vlscale does not load one, and where open_clip's tensors of the same weights are (RN101's
    Hugging Face repo)."""
    from vlscale.config import SourceError

    class Whole(torch.nn.Module):  # the archive's layout is what matters, not its model
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.visual(x)

    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated; OpenAI's files were made with it
        traced = torch.jit.script(Whole())
    path = tmp_path / "RN101.pt"
    with pytest.warns(FutureWarning):  # and so is torch.jit.save
        torch.jit.save(traced, str(path))
    for name, repo in (("RN101", " (timm/resnet101_clip.openai)"), ("tiny-clip-rn", "")):
        with pytest.raises(SourceError) as e:
            build_vision_encoder(name, str(path))
        assert str(e.value) == (
            f"model.vision_pretrained={str(path)!r}: a TorchScript archive (OpenAI's own CLIP release, as the clip "
            "package downloads it), which vlscale does not load (loading one loads its code); the same weights as "
            "tensors are open_clip's: the tag 'openai' (from Hugging Face's cache or the network), or offline the "
            "open_clip_model.safetensors (or open_clip_pytorch_model.bin) of the Hugging Face repo open_clip fetches "
            f"for it{repo}")
