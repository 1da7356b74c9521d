"""What trains and what is counted as updated: a trained CLIP's parameters that the run's visual path
never runs stay frozen (image tasks: an RN's attention pool, a ViT's output projection; video runs
them); inspect_model counts CLIP for ``updated_pct_with_vision`` also with cached features; settings
that would be silently ignored or meaningless are said (Hyperformer's sharing, a LoRA rank above the
projections' width, evaluate.py's refusal of model overrides)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.modeling.vision import build_vision_encoder
from vlscale.modeling.vl_model import build_model
from vlscale.peft.trainable import configure_trainable, count_parameters

VOCAB = 1100
UNUSED_ON_GRIDS = {"tiny-clip-rn": "vision.visual.attnpool.", "tiny-clip-vit": "vision.visual.proj"}


def _model(vision: str, *overrides: str):
    cfg = load_config("tiny", [f"model.vision={vision}", "model.feature_source=images", "peft.train_vision=true",
                               "model.dropout=0.0", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg, vocab_size=VOCAB)


def _reachable(model) -> None:
    """Random values for the trainable parameters initialised to zero (adapters' up-projections, the RN
    blocks' last BatchNorm scale): at init they block the gradient of what comes before them, which
    would hide whether a parameter is on the path at all."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _backward(model, batch) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()


@pytest.mark.parametrize("vision", sorted(UNUSED_ON_GRIDS))
def test_image_tasks_train_only_what_gets_a_gradient(vision):
    cfg, model = _model(vision, "data.tasks=[vqa]")
    size = model.vision.image_size
    g = torch.Generator().manual_seed(0)
    batch = {"task": "vqa", "input_ids": torch.randint(5, 100, (2, 8), generator=g),
             "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "pixel_values": torch.rand(2, 1, 3, size, size, generator=g),
             "labels": torch.randint(5, 100, (2, 4), generator=g)}
    _reachable(model)
    _backward(model, batch)
    for n, p in model.named_parameters():
        if p.requires_grad:  # the invariant: whatever trains gets a gradient
            assert p.grad is not None and p.grad.any(), f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    unused = {n for n, _ in model.named_parameters() if n.startswith(UNUSED_ON_GRIDS[vision])}
    assert unused and not any(dict(model.named_parameters())[n].requires_grad for n in unused)
    # ... and is not counted as updated; the rest of CLIP is
    vision_total = sum(p.numel() for p in model.vision.parameters())
    unused_numel = sum(p.numel() for n, p in model.named_parameters() if n in unused)
    counts = configure_trainable(model, cfg.peft)
    assert counts["vision"] == {"total": vision_total, "trainable": vision_total - unused_numel,
                                "tensors": len(list(model.vision.parameters()))}
    stats = count_parameters(model)
    assert stats["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert stats["updated_pct_with_vision"] == pytest.approx(100 * stats["trainable"] / stats["total"])


def test_video_runs_and_trains_the_attention_pool():
    cfg, model = _model("tiny-clip-rn", "data.tasks=[tvqa]", "model.max_frames=3")
    assert model.video
    assert all(p.requires_grad for p in model.vision.parameters())  # the whole tower, attnpool too
    size = model.vision.image_size
    g = torch.Generator().manual_seed(0)
    batch = {"task": "tvqa", "input_ids": torch.randint(5, 100, (2, 8), generator=g),
             "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "pixel_values": torch.rand(2, 1, 3, 3, size, size, generator=g),
             "labels": torch.randint(5, 100, (2, 4), generator=g)}
    _reachable(model)
    _backward(model, batch)
    pool = dict(model.vision.visual.attnpool.named_parameters())
    assert pool and all(p.grad is not None and p.grad.any() for p in pool.values())
    counts = configure_trainable(model, cfg.peft)
    assert counts["vision"]["trainable"] == counts["vision"]["total"]


def test_meta_build_counts_the_same():
    """replicate.py and inspect_model.py count on the meta device: the same trainable set."""
    cfg = load_config("tiny", ["model.feature_source=images", "peft.train_vision=true"])
    meta, real = build_model(cfg, vocab_size=VOCAB, device="meta"), build_model(cfg, vocab_size=VOCAB)
    assert count_parameters(meta) == count_parameters(real)
    attnpool = sum(p.numel() for p in real.vision.visual.attnpool.parameters())
    frozen_clip = count_parameters(build_model(load_config("tiny", ["model.feature_source=images"]),
                                               vocab_size=VOCAB, device="meta"))
    vision = sum(p.numel() for p in real.vision.parameters())
    assert count_parameters(meta)["trainable"] == frozen_clip["trainable"] + vision - attnpool


def test_inspect_model_counts_clip_with_cached_features(capsys, launcher):
    assert launcher("inspect_model").main(["--config", "mini/clip_bart", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_source"] == "cache" and "vision" not in report["groups"]
    clip = sum(p.numel() for p in build_vision_encoder(report["vision"], device="meta").parameters())
    assert report["total_with_vision"] == report["total"] + clip
    assert report["updated_pct_with_vision"] == pytest.approx(100 * report["trainable"] / (report["total"] + clip))
    assert report["updated_pct_with_vision"] < report["updated_pct"]


def test_inspect_model_prints_the_json_figures_and_elides_only_long_site_lists(capsys, launcher):
    """The printed report: updated_pct and updated_pct_with_vision each beside its own name, as --json gives them
    (mini/clip_bart: they differ, CLIP counted only in the second); up to 12 PEFT sites in full, more as the first
    six, "...", the last six."""
    inspect_model = launcher("inspect_model")
    assert inspect_model.main(["--config", "mini/clip_bart", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["updated_pct"] != report["updated_pct_with_vision"]
    assert inspect_model.main(["--config", "mini/clip_bart"]) == 0
    assert (f"updated_pct {report['updated_pct']:.2f}%   updated_pct_with_vision "
            f"{report['updated_pct_with_vision']:.2f}%") in capsys.readouterr().out
    for n in (12, 13):
        sites = [f"site{i}" for i in range(n)]
        inspect_model.print_report({**report, "peft_sites": sites})
        out = capsys.readouterr().out
        listed = out.split(f"PEFT sites ({n}):\n")[1].split("\n\n")[0].split("\n")
        assert [s.strip() for s in listed] == (sites if n == 12 else sites[:6] + ["..."] + sites[-6:])


@pytest.mark.parametrize("sharing", ["multiple", "half_shared"])
def test_hyperformer_refuses_a_sharing_it_would_ignore(sharing):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["peft.method=hyperformer", f"peft.sharing={sharing}"])
    for word in (f"peft.sharing={sharing}", "hyperformer", "one hypernetwork across tasks", "peft.sharing=single"):
        assert word in str(e.value)
    assert load_config("paper/clip_bart_hyperformer").peft.sharing == "single"
    assert load_config("tiny", ["peft.method=hyperformer"]).peft.sharing == "single"  # the default


@pytest.mark.parametrize("override, hint, not_hint", [
    ("data.tasks=[vqa]", "use --tasks", "drop the override"),
    ("model.backbone=tiny-bart", "drop the override", "--tasks"),
    ("peft.reduction_factor=8", "drop the override", "--tasks"),
])
def test_evaluate_refusal_hint_fits_the_override(override, hint, not_hint, monkeypatch):
    from vlscale.engine import checkpoint
    from vlscale.predict import load_run_config

    saved = load_config("tiny").to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved})
    with pytest.raises(ValueError) as e:
        load_run_config("unused", [override])
    assert override.split("=")[0] in str(e.value) and hint in str(e.value) and not_hint not in str(e.value)


def test_lora_rank_above_the_projection_width_is_said(caplog):
    from vlscale.peft import trainable

    trainable._say_lora_rank.cache_clear()  # said once a process: an earlier test's LoRA build may have said it
    with caplog.at_level(logging.WARNING, logger="vlscale.peft.trainable"):
        build_model(load_config("tiny", ["peft.method=lora"]), vocab_size=VOCAB, device="meta")
    said = [r.getMessage() for r in caplog.records if "peft.lora_rank" in r.getMessage()]
    assert len(said) == 1 and "peft.lora_rank=128" in said[0] and "(64)" in said[0] and "\n" not in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlscale.peft.trainable"):
        build_model(load_config("tiny", ["peft.method=lora", "peft.lora_rank=64"]), vocab_size=VOCAB, device="meta")
    assert not [r for r in caplog.records if "peft.lora_rank" in r.getMessage()]


# The paper's Table 1, "updated params %" (CLIP-RN101 features + BART-base; trainable / total without CLIP)
TABLE1_UPDATED_PCT = {"full_ft": 100.00, "multiple_adapters": 12.22, "half_shared_adapters": 8.36,
                      "single_adapter": 4.18, "hyperformer": 5.79, "multiple_compacters": 7.05,
                      "single_compacter": 2.70, "multiple_lora": 17.72, "single_lora": 5.93,
                      "multiple_prompts": 4.53, "single_prompt": 2.00}
# In points: multiple LoRA counts 17.71% with the reference's trainable set (every bias, no layer-norm weight);
# the paper prints 17.72 (BENCHMARKS.md: the 0.01 is not explained)
NOT_TO_THE_DIGIT = {"multiple_lora": 0.01}


def test_the_paper_presets_update_table_1s_share_of_the_parameters(launcher, capsys):
    """inspect_model's updated % of each paper/clip_bart_<method> preset against the paper's Table 1: to the
    digit for full fine-tuning, the adapters, Hyperformer (the reference's per-stack hypernetworks; one shared
    hypernetwork gave 2.18%), Compacter, prompts (layer norms frozen, as the reference's prompt scripts leave
    them: 2.03% / 4.57% trained) and single LoRA (every bias, no layer-norm weight, as the reference's trainer
    and LoRA scripts: 5.89% / 17.69% with the q/v biases and the layer norms); multiple LoRA within 0.01."""
    for method, paper in TABLE1_UPDATED_PCT.items():
        assert launcher("inspect_model").main(["--config", f"paper/clip_bart_{method}", "--json"]) == 0
        ours = round(json.loads(capsys.readouterr().out)["updated_pct"], 2)  # the paper's two decimals
        assert abs(ours - paper) <= NOT_TO_THE_DIGIT.get(method, 0) + 1e-9, (method, ours, paper)


@pytest.mark.parametrize("overrides, words", [
    (["peft.method=none", "peft.sharing=multiple"], ["peft.sharing=multiple", "peft.method=none", "no PEFT modules"]),
    (["peft.method=none", "peft.sharing=half_shared"], ["peft.sharing=half_shared", "peft.method=none"]),
    (["peft.method=prompt", "peft.extra_prompts=true"], ["peft.extra_prompts", "peft.method=prompt"]),
    (["peft.train_lm=true", "peft.train_layer_norms=false"], ["peft.train_lm=true", "peft.train_layer_norms=false"]),
    (["peft.train_lm=true", "peft.bias=none"], ["peft.train_lm=true", "peft.bias=none"]),
])
def test_settings_the_trainable_set_would_ignore_are_refused(overrides, words):
    """Each pair was accepted and one half of it silently ignored (sharing without modules to share, prompts on
    prompt tuning, norms and biases that full fine-tuning trains anyway)."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    for word in words:
        assert word in str(e.value)
    load_config("tiny", overrides[:1])  # each setting alone is fine


@pytest.mark.parametrize("backbone, components", [
    ("tiny-t5", {"lm.shared", "lm.encoder.block", "lm.encoder.final_layer_norm", "lm.decoder.block",
                 "lm.decoder.final_layer_norm", "vision", "projector", "peft.adapter"}),
    ("tiny-bart", {"lm.model.shared", "lm.model.encoder", "lm.model.decoder", "vision", "projector", "peft.adapter"}),
])
def test_inspect_model_places_every_parameter_once_with_what_trains(backbone, components, capsys, launcher):
    """inspect_model's placement (each LM stack, CLIP, the projector, each PEFT module) and groups add up to the
    model's parameters and to those that train, each counted where it is: the frozen LM and CLIP train nothing,
    the adapters and projector train whole, the layer norms (T5's final ones) train."""
    assert launcher("inspect_model").main(["--config", "tiny", f"model.backbone={backbone}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    placement, groups = report["placement"], report["groups"]
    assert set(placement) == components
    for table in (placement, groups):
        assert sum(v["params"] for v in table.values()) == report["total"]
        assert sum(v["trainable"] for v in table.values()) == report["trainable"] > 0
    for frozen in ("lm", "vision"):
        assert groups[frozen]["trainable"] == 0 and groups[frozen]["params"] > 0
    for whole in ("peft", "projection", "layer_norm"):
        assert groups[whole]["trainable"] == groups[whole]["params"] > 0
    assert placement["vision"]["trainable"] == 0 and placement["peft.adapter"]["trainable"] == groups["peft"]["params"]
    assert placement["projector"] == groups["projection"]
    if backbone == "tiny-t5":
        assert placement["lm.encoder.final_layer_norm"]["trainable"] == placement["lm.encoder.final_layer_norm"]["params"]
        assert placement["lm.shared"]["trainable"] == 0


def test_inspect_model_prints_each_tables_rows_as_json_counts_them(capsys, launcher):
    """The printed placement and group tables: one row per entry, sorted by name, its parameters then its trainable
    ones, as --json gives them; the vocabulary with where it comes from (tiny: the run's tokenizer, which the model's
    embeddings match); the trainable / total line. Overrides may stand on either side of --json."""
    inspect_model = launcher("inspect_model")
    args = ["model.backbone=tiny-bart", "--json", "data.tasks=[vqa]"]
    assert inspect_model.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["backbone"], report["tasks"]) == ("tiny-bart", ["vqa"])
    assert report["vocab_source"] == "the run's tokenizer"
    assert inspect_model.main([a for a in args if a != "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    for title, table in (("module", report["placement"]), ("group", report["groups"])):
        start = next(i for i, line in enumerate(out) if line.split()[:3] == [title, "params", "trainable"]) + 1
        rows = out[start:start + len(table)]
        assert rows == [f"{k:<40} {v['params']:>15,} {v['trainable']:>15,}" for k, v in sorted(table.items())]
        assert any(v["params"] != v["trainable"] for v in table.values())  # the two columns differ somewhere
    assert f"vocabulary {report['vocab_size']:,} (the run's tokenizer)" in out
    assert any(line.startswith(f"trainable {report['trainable']:,} / total {report['total']:,} (") for line in out)
