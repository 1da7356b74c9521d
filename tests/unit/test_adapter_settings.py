"""An adapter loads only onto a model built with its run's model.* / peft.* settings: one built otherwise is
refused naming the setting, also where every trainable name and shape agrees (another backbone of the same
layout, another CLIP of the same width, another LoRA scaling), whose outputs would silently not be the trained
model's; where the weights load from and the adapter kernel may differ."""

import json

import pytest
import torch

from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.modeling.vl_model import build_model

VOCAB = 300


def _saved(tmp_path, overrides):
    cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    ckpt.save_adapter(build_model(cfg, vocab_size=VOCAB), tmp_path / "adapter", cfg, vocab_size=VOCAB)
    return tmp_path / "adapter"


@pytest.mark.parametrize("base, other, key", [
    (["peft.method=lora", "peft.lora_rank=4"], "peft.lora_alpha=8", "peft.lora_alpha"),
    ([], "model.pool_size=2", "model.pool_size"),
])
def test_a_model_of_other_settings_with_the_same_shapes_is_refused_naming_the_setting(tmp_path, base, other, key):
    adapter = _saved(tmp_path, base)
    cfg = load_config("tiny", base + [other])
    for device in ("cpu", "meta"):  # the load, and evaluate.py's check before its build
        model = build_model(cfg, vocab_size=VOCAB, device=device)
        with pytest.raises(ckpt.CheckpointError, match=rf"adapter_config\.json: the adapter was trained with "
                                                       rf"{key}=.*, the model is built with {key}="):
            ckpt.load_adapter(model, adapter, check_only=device == "meta")


def test_another_backbone_or_clip_of_the_same_layout_is_refused(tmp_path):
    """t5-base and flan-t5-base (12 + 12 layers of width 768), RN101 and RN50 (2048-d grids): the same trainable
    names and shapes. Fake adapters of the right shapes (meta-device builds; nothing is downloaded)."""
    from safetensors.torch import save_file

    for base, other, key in [(["model.backbone=t5-base", "model.vision=RN101"], "model.backbone=flan-t5-base",
                               "model.backbone"),
                              (["model.backbone=t5-small", "model.vision=RN101"], "model.vision=RN50", "model.vision")]:
        cfg = load_config("tiny", base)
        model = build_model(cfg, vocab_size=VOCAB, device="meta")
        adapter = tmp_path / key
        adapter.mkdir()
        save_file({n: torch.zeros(ckpt.full_shape(p)) for n, p in ckpt.trainable_parameters(model)},
                  str(adapter / ckpt.ADAPTER_WEIGHTS))
        (adapter / ckpt.ADAPTER_CONFIG).write_text(json.dumps(
            {"format": ckpt.ADAPTER_FORMAT, "format_version": 2, "run_config": cfg.to_dict(), "vocab_size": VOCAB,
             "buffers": {}}))
        ckpt.load_adapter(build_model(cfg, vocab_size=VOCAB, device="meta"), adapter, check_only=True)
        with pytest.raises(ckpt.CheckpointError, match=rf"trained with {key}="):
            ckpt.load_adapter(build_model(load_config("tiny", base + [other]), vocab_size=VOCAB, device="meta"),
                              adapter, check_only=True)


def test_the_same_settings_spelled_otherwise_or_relocated_weights_still_load(tmp_path):
    adapter = _saved(tmp_path, [])
    cfg = load_config("tiny", ["peft.fused=false"])
    torch.manual_seed(0)
    ckpt.load_adapter(build_model(cfg, vocab_size=VOCAB), adapter)
    meta = ckpt.read_adapter_config(adapter)
    meta["run_config"]["model"]["backbone"] = "google-t5/t5-small"
    assert ckpt.adapter_settings_mismatch(build_model(load_config("tiny", ["model.backbone=t5-small"]),
                                                      vocab_size=VOCAB, device="meta"), meta) is None


def test_a_wrong_sharing_names_the_setting_beside_the_missing_tensors(tmp_path):
    adapter = _saved(tmp_path, [])
    model = build_model(load_config("tiny", ["peft.sharing=multiple"]), vocab_size=VOCAB, device="meta")
    with pytest.raises(ckpt.CheckpointError, match=r"missing from the file .*\(the adapter was trained with "
                                                   r"peft\.sharing='single', the model is built with "
                                                   r"peft\.sharing='multiple'\)"):
        ckpt.load_adapter(model, adapter, check_only=True)


@pytest.mark.parametrize("key, value", [("model.backbone_path", "/elsewhere/t5"),
                                        ("model.vision_pretrained", "/elsewhere/clip.pt"),
                                        ("model.feature_source", "cache"), ("model.dropout", 0.3),
                                        ("peft.fused", "other"), ("peft.lora_dropout", 0.3)])
def test_where_the_weights_load_from_the_kernel_and_dropout_rates_may_differ(key, value):
    """An adapter trained with dropout evaluates without it, from weights moved elsewhere, with another kernel."""
    base = ["peft.method=lora", "peft.lora_rank=4"]
    model = build_model(load_config("tiny", base), vocab_size=VOCAB, device="meta")
    meta = {"run_config": load_config("tiny", base).to_dict()}
    section, name = key.split(".")
    assert meta["run_config"][section][name] != value
    meta["run_config"][section][name] = value
    assert ckpt.adapter_settings_mismatch(model, meta) is None


def test_settings_the_model_does_not_read_may_differ_but_the_method_is_still_named():
    """peft.lora_rank builds nothing under peft.method=adapter (a warm start from another preset carries other
    methods' widths): not compared. An adapter of another method is refused naming peft.method, whichever of its
    settings the model does not read."""
    cfg = load_config("tiny", [])
    meta = {"run_config": load_config("tiny", ["peft.lora_rank=64", "peft.phm_dim=4"]).to_dict()}
    assert ckpt.settings_mismatch(cfg, meta) is None
    meta = {"run_config": load_config("tiny", ["peft.method=lora", "peft.lora_rank=4"]).to_dict()}
    assert ckpt.settings_mismatch(cfg, meta) == ("the adapter was trained with peft.method='lora', the model is "
                                                 "built with peft.method='adapter'")
    meta = {"run_config": load_config("tiny", ["peft.reduction_factor=2"]).to_dict()}
    assert "peft.reduction_factor=2" in ckpt.settings_mismatch(cfg, meta)
