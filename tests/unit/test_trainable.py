"""Tests of vlscale.peft.trainable: the exact trainable set for every method x sharing mode, the
switches of the paper's tables, gradients after one backward, and counts (ZeRO-3, meta device)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from vlscale.config import PeftConfig
from vlscale.peft import apply_peft
from vlscale.peft.trainable import (GROUPS, configure_trainable, count_parameters, is_layer_norm,
                                    optimizer_group_layout, parameter_groups)

TASKS = ["vqa", "gqa"]
D = 32


def make_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))


def make_bart():
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))


BACKBONES = {"t5": make_t5, "bart": make_bart}


def peft_cfg(method="adapter", sharing="single", **kw):
    small = dict(lora_rank=4, n_prompts=3, prompt_hidden_dim=16, task_embedding_dim=8, layer_embedding_dim=8,
                 hypernet_hidden_dim=16, hypernet_projected_dim=4, lora_dropout=0.0)
    return PeftConfig(method=method, sharing=sharing, **{**small, **kw})


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 100, (2, 7), generator=g), torch.randint(3, 100, (2, 5), generator=g)


def perturb(module, std=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


ALL = [("adapter", "multiple"), ("adapter", "half_shared"), ("adapter", "single"),
       ("compacter", "multiple"), ("compacter", "half_shared"), ("compacter", "single"),
       ("lora", "multiple"), ("lora", "half_shared"), ("lora", "single"),
       ("hyperformer", "single"), ("prompt", "multiple"), ("prompt", "single"), ("none", "single")]
LN = re.compile(r"layer_?norm")  # T5 layer_norm / final_layer_norm; BART *_layer_norm, layernorm_embedding
LORA_BIAS = re.compile(r"(self_attn|encoder_attn)\.(q_proj|v_proj)\.bias$")


class StandIn(nn.Module):
    """The VLModel's shape: a tiny CNN 'vision encoder', a projection, the LM and its PEFT controller."""

    def __init__(self, backbone: str, cfg, device=None):
        super().__init__()
        with torch.device(device or "cpu"):
            self.lm = BACKBONES[backbone]()
            self.vision = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(2), nn.Flatten(2))
            self.projector = nn.Sequential(nn.Linear(4, D), nn.LayerNorm(D))
        self.peft = apply_peft(self.lm, cfg, TASKS)

    def forward(self, task: str):
        self.peft.set_task(task)
        enc, dec = inputs()
        feats = self.vision(torch.randn(2, 3, 6, 6)).transpose(1, 2)  # (B, 4 tokens, 4)
        parts = [self.projector(feats), self.lm.get_input_embeddings()(enc)]
        prompts = self.peft.prompts(2)
        if prompts is not None:
            parts.insert(0, prompts)
        return self.lm(inputs_embeds=torch.cat(parts, 1), decoder_input_ids=dec).logits


def expected_trainable(model, cfg):
    """The rules of DESIGN.md, written out on parameter names."""
    names = set()
    for n, _ in model.named_parameters():
        lm_name = n[len("lm."):] if n.startswith("lm.") else None
        if n.startswith("peft."):
            names.add(n)
        elif n.startswith("projector.") and cfg.train_projection:
            names.add(n)
        elif n.startswith("vision.") and cfg.train_vision:
            names.add(n)
        elif lm_name is not None and (cfg.train_lm or lm_rule(lm_name, cfg)):
            names.add(n)
    return names


def lm_rule(lm_name, cfg):
    """A frozen-LM parameter trains: layer-norm weights with train_layer_norms, their biases also with bias=all,
    the LoRA-adapted q/v biases with bias=lora_only|all, every other bias with bias=all."""
    is_bias = lm_name.endswith(".bias")
    if LN.search(lm_name):
        return cfg.train_layer_norms or (is_bias and cfg.bias == "all")
    if cfg.method == "lora" and LORA_BIAS.search(lm_name):
        return cfg.bias != "none"
    return is_bias and cfg.bias == "all"


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", ["t5", "bart"])
@pytest.mark.parametrize("method,sharing", ALL)
def test_default_trainable_set_and_gradients(backbone, method, sharing):
    cfg = peft_cfg(method, sharing)
    model = StandIn(backbone, cfg)
    counts = configure_trainable(model, cfg)
    assert set(counts) == set(GROUPS)
    assert trainable_names(model) == expected_trainable(model, cfg)
    assert not model.lm.get_input_embeddings().weight.requires_grad  # tied output layer stays frozen
    assert not model.lm.lm_head.weight.requires_grad
    perturb(model.peft)
    model.train()
    for task in TASKS:  # per-task modules only get gradients from their own task
        model(task).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


def test_lora_biases_follow_peft_bias():
    cfg = peft_cfg("lora", "single")  # bias=lora_only, the default
    model = StandIn("bart", cfg)
    counts = configure_trainable(model, cfg)
    biases = {n for n in trainable_names(model) if LORA_BIAS.search(n)}
    assert len(biases) == 12 and counts["lora_bias"]["tensors"] == 12
    assert counts["lora_bias"]["trainable"] == 12 * D
    assert not any("k_proj.bias" in n or "out_proj.bias" in n for n in trainable_names(model))
    assert counts["bias"]["trainable"] == 0 and counts["bias"]["tensors"] > 0
    cfg = peft_cfg("lora", "single", bias="none")
    model = StandIn("bart", cfg)
    counts = configure_trainable(model, cfg)
    assert not any(LORA_BIAS.search(n) for n in trainable_names(model))
    assert counts["lora_bias"]["trainable"] == 0 and counts["lora_bias"]["total"] == 12 * D
    t5 = StandIn("t5", peft_cfg("lora"))
    assert configure_trainable(t5, peft_cfg("lora"))["lora_bias"]["tensors"] == 0  # T5 q/v have no bias


def test_the_reference_lora_set_is_every_bias_and_no_layer_norm_weight():
    """The paper's LoRA presets (bias=all, train_layer_norms=false): VL-Adapter's trainer makes every parameter
    whose name holds "bias" trainable under --use_lora and passes no --unfreeze_layer_norms in its LoRA scripts."""
    cfg = peft_cfg("lora", "single", bias="all", train_layer_norms=False)
    model = StandIn("bart", cfg)
    counts = configure_trainable(model, cfg)
    lm_trained = {n for n in trainable_names(model) if n.startswith("lm.")}
    lm_biases = {f"lm.{n}" for n, _ in model.lm.named_parameters() if n.endswith(".bias")}
    assert lm_trained == lm_biases and len(lm_biases) > 24  # every linear's and every layer norm's bias
    assert not any(LN.search(n) and n.endswith(".weight") for n in trainable_names(model))
    assert counts["layer_norm"]["trainable"] == 0 < counts["layer_norm"]["total"]
    assert counts["layer_norm_bias"]["trainable"] == counts["layer_norm_bias"]["total"] == counts["layer_norm"]["total"]
    assert counts["lora_bias"]["trainable"] == 12 * D and counts["bias"]["trainable"] == counts["bias"]["total"]
    # T5 has no biases and no layer-norm biases: the LoRA matrices and the projection train, nothing of the LM
    t5 = StandIn("t5", cfg)
    configure_trainable(t5, cfg)
    assert not any(n.startswith("lm.") for n in trainable_names(t5))
    assert not t5.lm.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad


@pytest.mark.parametrize("backbone", ["t5", "bart"])
@pytest.mark.parametrize("switches", [
    dict(train_lm=True), dict(train_vision=True), dict(train_projection=False),
    dict(train_layer_norms=False), dict(method="none"), dict(method="none", train_layer_norms=False),
    dict(train_lm=True, train_vision=True), dict(bias="all"),
    dict(bias="all", train_layer_norms=False), dict(method="lora", bias="none"), dict(method="lora", bias="all"),
    dict(method="none", bias="all", train_layer_norms=False)])
def test_switches(backbone, switches):
    cfg = peft_cfg(**{"method": "adapter", **switches})
    model = StandIn(backbone, cfg)
    configure_trainable(model, cfg)
    names = trainable_names(model)
    assert names == expected_trainable(model, cfg)
    lm_names = {f"lm.{n}" for n, _ in model.lm.named_parameters()}
    if cfg.train_lm:
        assert lm_names <= names and model.lm.lm_head.weight.requires_grad
    if switches == dict(method="none", train_layer_norms=False):  # Table 5 "projection only"
        assert names == {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    if switches == dict(method="none"):  # Table 5 "projection + layer norms"
        assert names - {n for n in names if n.startswith("projector.")} == {n for n in lm_names if LN.search(n)}


def test_counts_by_group_add_up():
    cfg = peft_cfg("adapter", "multiple")
    model = StandIn("t5", cfg)
    counts = configure_trainable(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    assert sum(c["total"] for c in counts.values()) == total
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(c["trainable"] for c in counts.values()) == trainable
    assert counts["peft"]["total"] == sum(p.numel() for p in model.peft.parameters()) > 0
    assert counts["projection"]["total"] == sum(p.numel() for p in model.projector.parameters())
    assert counts["vision"]["trainable"] == 0 and counts["lm"]["trainable"] == 0
    # T5: 2 x 2 encoder + 2 x 3 decoder sublayer norms + 2 final norms, D each
    assert counts["layer_norm"]["total"] == counts["layer_norm"]["trainable"] == 12 * D

    stats = count_parameters(model)
    vision = sum(p.numel() for p in model.vision.parameters())
    assert stats["total"] == total and stats["trainable"] == trainable
    assert stats["total_without_vision"] == total - vision
    assert stats["updated_pct"] == pytest.approx(100 * trainable / (total - vision))
    assert stats["updated_pct_with_vision"] == pytest.approx(100 * trainable / total)
    assert stats["updated_pct"] > stats["updated_pct_with_vision"]
    assert stats["trainable_vision"] == 0  # a frozen CLIP trains nothing


def test_counts_under_zero3_partitioning_and_on_meta():
    cfg = peft_cfg("lora", "multiple")
    ref = configure_trainable(StandIn("bart", cfg), cfg)
    ref_stats = count_parameters(StandIn("bart", cfg))

    meta = StandIn("bart", cfg, device="meta")
    assert configure_trainable(meta, cfg) == ref

    model = StandIn("bart", cfg)
    for p in model.parameters():  # a ZeRO-3 rank's view: 0-size data, the full size in ds_numel
        p.ds_numel, p.ds_shape = p.numel(), p.shape
        p.data = torch.empty(0)
    assert configure_trainable(model, cfg) == ref
    assert count_parameters(model)["total"] == ref_stats["total"]


def test_parameter_outside_the_known_parts_is_an_error():
    cfg = peft_cfg("adapter")
    model = StandIn("t5", cfg)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        configure_trainable(model, cfg)


def test_model_without_vision_encoder():
    cfg = peft_cfg("adapter")
    model = StandIn("t5", cfg)
    model.vision = None
    counts = configure_trainable(model, cfg)
    assert counts["vision"] == {"total": 0, "trainable": 0, "tensors": 0}
    stats = count_parameters(model)
    assert stats["updated_pct"] == pytest.approx(stats["updated_pct_with_vision"])


def test_updated_pct_counts_a_trained_clip():
    """A frozen CLIP is left out of the denominator (the paper's convention); a trained one is in it,
    so fine-tuning everything is 100 %, not more (Table 3's CLIP-trained rows)."""
    cfg = peft_cfg(method="none", train_lm=True, train_vision=True)
    model = StandIn("t5", cfg)
    configure_trainable(model, cfg)
    stats = count_parameters(model)
    assert stats["updated_pct"] == pytest.approx(100.0) == stats["updated_pct_with_vision"]
    assert stats["total_without_vision"] == stats["total"]
    assert stats["trainable_vision"] == sum(p.numel() for p in model.vision.parameters()) > 0


def test_lora_rank_above_the_width_is_said_once(caplog):
    """A run builds its model twice (meta for the start-up estimates, then for real): one warning, not two."""
    from vlscale.peft import trainable

    trainable._say_lora_rank.cache_clear()
    cfg = peft_cfg("lora", lora_rank=D + 1)
    with caplog.at_level("WARNING", logger="vlscale"):
        for device in ("meta", "cpu"):
            configure_trainable(StandIn("t5", cfg, device=device), cfg)
    said = [r.getMessage() for r in caplog.records if "exceeds the width" in r.getMessage()]
    assert len(said) == 1 and f"peft.lora_rank={D + 1}" in said[0] and f"<= {D}" in said[0]


def test_rms_norms_count_as_layer_norms():
    """HF T5 swaps T5LayerNorm for apex's FusedRMSNorm when apex is installed: its weights stay layer norms."""
    class FusedRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(D))

    assert is_layer_norm(FusedRMSNorm()) and is_layer_norm(nn.LayerNorm(D))
    assert not is_layer_norm(nn.Linear(D, D))


@pytest.mark.parametrize("d_kv,bound", [(4, 16), (16, D)])
def test_lora_rank_warning_takes_the_narrowest_width(caplog, d_kv, bound):
    """T5's q/v map d_model -> heads x d_kv; the narrower of the two bounds the rank: heads x d_kv when it is below
    d_model (32 -> 16), the input width d_model when the projections widen (32 -> 64)."""
    from vlscale.peft import trainable

    class LMOnly(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.lm = T5ForConditionalGeneration(T5Config(
                vocab_size=100, d_model=D, d_kv=d_kv, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
            self.peft = apply_peft(self.lm, cfg, TASKS)

    trainable._say_lora_rank.cache_clear()
    with caplog.at_level("WARNING", logger="vlscale"):
        for rank in (bound, bound + 4):
            cfg = peft_cfg("lora", lora_rank=rank)
            configure_trainable(LMOnly(cfg), cfg)
    said = [r.getMessage() for r in caplog.records if "exceeds the width" in r.getMessage()]
    assert len(said) == 1 and f"peft.lora_rank={bound + 4}" in said[0] and f"<= {bound}" in said[0], said


@pytest.mark.parametrize("backbone", ["t5", "bart"])
def test_parameter_groups_name_each_parameter_as_the_model_does(backbone):
    """inspect_model and the memory model read the groups; a name there is the parameter's name in the model."""
    cfg = peft_cfg("lora", "multiple")
    model = StandIn(backbone, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [(n, p) for params in parameter_groups(model).values() for n, p in params]
    assert len(grouped) == len(names)
    assert [(n, names[id(p)]) for n, p in grouped if names[id(p)] != n] == []


def test_optimizer_group_layout_order():
    """Shared matrices, shared vectors, then each task's own (in data.tasks order), matrices before vectors;
    with split_peft the PEFT weights before the rest in each slot. The engine and the memory model both take
    this order, and a resumed run's optimizer state is matched to the groups by position."""
    names = ["peft.adapter.encoder_0_ffn.down_weight_vqa", "peft.adapter.encoder_0_ffn.down_bias_vqa",
             "peft.adapter.encoder_0_ffn.up_weight_shared", "lm.encoder.final_layer_norm.weight",
             "projector.0.weight", "peft.adapter.encoder_0_ffn.up_weight_gqa", "peft.prompt.ln.weight"]
    ndims = [2, 1, 2, 1, 2, 2, 1]
    assert optimizer_group_layout(names, ndims, ("gqa", "vqa")) == [
        (None, True, None, [2, 4]), (None, False, None, [3, 6]),
        ("gqa", True, None, [5]), ("vqa", True, None, [0]), ("vqa", False, None, [1])]
    assert optimizer_group_layout(names, ndims, ("gqa", "vqa"), split_peft=True) == [
        (None, True, True, [2]), (None, True, False, [4]), (None, False, True, [6]), (None, False, False, [3]),
        ("gqa", True, True, [5]), ("vqa", True, True, [0]), ("vqa", False, True, [1])]
    # tasks the Python API names with "_" (apply_peft takes them): a weight set is its whole task's, not shared
    v2 = [n.replace("_vqa", "_vqa_v2") for n in names]
    assert optimizer_group_layout(v2, ndims, ("gqa", "vqa_v2", "v2")) == [
        (None, True, None, [2, 4]), (None, False, None, [3, 6]),
        ("gqa", True, None, [5]), ("vqa_v2", True, None, [0]), ("vqa_v2", False, None, [1])]
    # a task's own weight set ends in "_<task>": a shared one whose name merely ends in a task's letters ("shared" in
    # "red", "ln.weight" in "ght") stays in the shared groups, which every task's step updates
    assert optimizer_group_layout(names, ndims, ("gqa", "vqa", "red", "ght")) == optimizer_group_layout(
        names, ndims, ("gqa", "vqa"))
