"""benchmarks/adapter_ablation_probe.py changes the model as its variants say (its figures rest on that)."""

import pytest
import torch

from vlscale.config import load_config
from vlscale.modeling.vision import vision_dims
from vlscale.modeling.vl_model import build_model
from vlscale.peft.adapter import BottleneckAdapter
from vlscale.peft.sites import adapter_sites

VOCAB = 120


@pytest.fixture(scope="module")
def probe(script):
    return script("benchmarks/adapter_ablation_probe.py")


def _model(*overrides):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["data.tasks=[vqa,gqa]", "model.backbone=tiny-bart", *overrides])
    return build_model(cfg, vocab_size=VOCAB)


def _loss(model, task="vqa"):
    g = torch.Generator().manual_seed(1)
    side = vision_dims(model.cfg.model.vision)["image_size"]
    batch = {"task": task, "input_ids": torch.randint(3, VOCAB, (2, 5), generator=g),
             "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.randint(3, VOCAB, (2, 3), generator=g),
             "pixel_values": torch.randn(2, 1, 3, side, side, generator=g)}
    return model(batch).loss


def test_stack_shared_leaves_one_adapter_per_stack_and_kind(probe):
    model = _model("peft.method=adapter", "peft.sharing=single")
    before = {id(m) for m in probe.peft_modules(model, BottleneckAdapter)}
    left = probe.share_across_layers(model)
    after = {id(m) for m in probe.peft_modules(model, BottleneckAdapter)}
    kinds = {(s.stack, s.kind) for s in adapter_sites(model.lm)}
    assert len(after) == len(kinds) == 5 and len(before) > len(after)  # encoder: 2 kinds, decoder: 3
    assert left == sum(p.numel() for m in probe.peft_modules(model, BottleneckAdapter)
                       for p in m.parameters(recurse=False))
    weights = probe.site_weights(model)
    for key, (w_d, w_u) in weights.items():  # every layer reads its stack's layer-0 adapter
        stack, _, kind = key.split("_", 2)
        assert torch.equal(w_d, weights[f"{stack}_0_{kind}"][0]) and torch.equal(w_u, weights[f"{stack}_0_{kind}"][1])
    _loss(model).backward()


def test_fixed_code_trains_only_the_generators_and_keeps_every_layers_code(probe):
    model = _model("peft.method=hyperformer")
    layers = model.peft.hyperformer
    net = layers.hypernets["encoder"]
    site = next(k for k in layers.sites if k.startswith("encoder_1_"))
    unused = probe.fix_codes(model)
    assert unused > 0
    first = probe.site_weights(model)
    _loss(model, "gqa").backward()
    frozen = [net.layer_embedding, net.projector, net.norm, layers.task_embeddings]
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.generators.parameters())
    # the codes do not depend on the (untrained) hypernetwork: moving it changes no generated weight
    with torch.no_grad():
        for p in net.projector.parameters():
            p.add_(1.0)
    assert torch.equal(probe.site_weights(model)[site][0], first[site][0])
    # tasks are blind: both tasks get the same generated weights
    w_vqa = layers.weights(site, "vqa")[0]
    assert torch.equal(w_vqa, layers.weights(site, "gqa")[0])


def test_weight_motion_is_the_rms_change_per_entry(probe):
    start = {"a": (torch.zeros(2, 4), torch.zeros(4, 2)), "b": (torch.ones(2, 4), torch.zeros(4, 2))}
    end = {"a": (torch.full((2, 4), 0.5), torch.zeros(4, 2)), "b": (torch.ones(2, 4), torch.full((4, 2), 2.0))}
    motion = probe.weight_motion(start, end)
    assert motion["down_rms_change"] == pytest.approx(0.25) and motion["up_rms_change"] == pytest.approx(1.0)
    assert motion["down_rms_start"] == pytest.approx(0.5) and motion["sites"] == 2


def test_fixed_code_per_layer_gives_each_layer_its_own_generators(probe):
    shared = probe.fix_codes(_model("peft.method=hyperformer"))
    model = _model("peft.method=hyperformer")
    nets = model.peft.hyperformer.hypernets
    net = nets["decoder"]
    start = probe.site_weights(model)
    generators = sum(p.numel() for n in nets.values() for p in n.generators.parameters())
    assert probe.fix_codes(model, per_layer=True) == shared + generators  # the shared generators are unused now
    assert len(net.layer_generators) == net.layer_embedding.num_embeddings
    # the same start as Hyperformer's (the codes computed for all layers at once: equal up to rounding)
    fixed = probe.site_weights(model)
    assert all(torch.allclose(a, b, atol=1e-6) for key in start for a, b in zip(start[key], fixed[key]))
    _loss(model).backward()
    assert all(p.grad is None for p in net.generators.parameters())  # the shared ones are no longer read
    assert all(p.grad is not None for g in net.layer_generators for p in g.parameters())
    with torch.no_grad():  # layer 0's generators make layer 0's weights only
        for p in net.layer_generators[0].parameters():
            p.add_(1.0)
    moved = {key for key, (w_d, _) in probe.site_weights(model).items() if not torch.equal(w_d, fixed[key][0])}
    assert moved == {key for key in start if key.startswith("decoder_0_")}


def test_adapter_lr_scale_moves_the_adapters_as_a_larger_learning_rate_would(probe):
    """Adam's step on W' = W / S is scale-free, so W = S W' moves S times as far; the start is unchanged."""
    plain, scaled = _model("peft.method=adapter", "peft.sharing=single"), _model("peft.method=adapter",
                                                                                  "peft.sharing=single")
    start = probe.site_weights(plain)
    assert probe.scale_adapter_lr(scaled, 10.0) > 0
    assert all(torch.allclose(a, b) for key in start for a, b in zip(start[key], probe.site_weights(scaled)[key]))
    moved = []
    for model in (plain, scaled):
        adapters = [p for m in probe.peft_modules(model, BottleneckAdapter) for p in m.parameters(recurse=False)]
        opt = torch.optim.Adam(adapters, lr=1e-3, eps=1e-12)
        model.eval()  # no dropout: the same gradients in both
        _loss(model).backward()  # one step: a second would start from different weights
        opt.step()
        now = probe.site_weights(model)
        moved.append(torch.cat([(now[k][i] - start[k][i]).flatten() for k in start for i in (0, 1)]))
    assert moved[0].abs().max() > 0  # the up-projections (the down-projections get no gradient while W_u = 0)
    # equal but where a gradient is near Adam's eps (2 of 20,480 entries here, 0.2 % off)
    assert torch.allclose(moved[1], 10.0 * moved[0], rtol=1e-2, atol=1e-6)
