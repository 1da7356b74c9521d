"""Tests of vlscale.peft: sites, identity at init, task sharing, Compacter's Kronecker weights,
prompts, the meta device, dtypes and HF gradient checkpointing, on tiny T5 and BART."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from vlscale.config import PeftConfig
from vlscale.modeling.vl_model import set_checkpointing
from vlscale.peft import PeftController, apply_peft
from vlscale.peft.prompt import PromptEncoder
from vlscale.kernels.adapter import adapter_reference
from vlscale.peft.sites import (SHARED, adapter_sites, backbone_family, lora_sites, param_numel, select_key,
                                weight_keys, zero3_unused_anchor)

TASKS = ["vqa", "gqa"]
D = 32
HOOKED = [("adapter", "multiple"), ("adapter", "half_shared"), ("adapter", "single"),
          ("compacter", "multiple"), ("compacter", "half_shared"), ("compacter", "single"),
          ("lora", "multiple"), ("lora", "half_shared"), ("lora", "single"),
          ("hyperformer", "single")]  # Hyperformer: one hypernetwork for all tasks, sharing=single only


def make_t5(dropout=0.0):
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0)).eval()


def make_bart(dropout=0.0):
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)).eval()


BACKBONES = {"t5": make_t5, "bart": make_bart}


def peft_cfg(method, sharing="single", **kw):
    small = dict(lora_rank=4, n_prompts=3, prompt_hidden_dim=16, task_embedding_dim=8, layer_embedding_dim=8,
                 hypernet_hidden_dim=16, hypernet_projected_dim=4, reduction_factor=8, lora_dropout=0.0)
    small.update(kw)
    return PeftConfig(method=method, sharing=sharing, **small)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (2, 7), generator=g), torch.randint(3, 100, (2, 5), generator=g)


def logits(lm, ids=None):
    enc, dec = ids if ids is not None else inputs()
    with torch.no_grad():
        return lm(input_ids=enc, decoder_input_ids=dec).logits


def n_params(peft):
    """PEFT parameters as the product counts them (configure_trainable's counts: full sizes under ZeRO-3)."""
    return sum(param_numel(p) for p in peft.parameters())


def perturb(module, seed=1, std=0.3):
    """Random non-zero values for every parameter of ``module`` (so nothing is the identity any more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- sites

def test_t5_sites_are_the_attention_and_ffn_sublayers():
    names = [s.name for s in adapter_sites(make_t5())]
    assert names == [
        "encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.1.DenseReluDense",
        "encoder.block.1.layer.0.SelfAttention", "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention",
        "decoder.block.0.layer.2.DenseReluDense",
        "decoder.block.1.layer.0.SelfAttention", "decoder.block.1.layer.1.EncDecAttention",
        "decoder.block.1.layer.2.DenseReluDense"]
    lora = [s.name for s in lora_sites(make_t5())]
    assert len(lora) == 12 and "decoder.block.1.layer.1.EncDecAttention.v" in lora
    assert all(n.endswith((".q", ".v")) for n in lora)


def test_bart_sites_and_controller_site_list():
    lm = make_bart()
    keys = [s.key for s in adapter_sites(lm)]
    assert keys == ["encoder_0_self_attn", "encoder_0_ffn", "encoder_1_self_attn", "encoder_1_ffn",
                    "decoder_0_self_attn", "decoder_0_cross_attn", "decoder_0_ffn",
                    "decoder_1_self_attn", "decoder_1_cross_attn", "decoder_1_ffn"]
    peft = apply_peft(lm, peft_cfg("lora"), TASKS)
    assert "model.decoder.layers.0.encoder_attn.q_proj" in peft.sites
    assert "model.encoder.layers.1.self_attn.v_proj" in peft.sites
    assert len(peft.sites) == 12 and not any("k_proj" in s for s in peft.sites)
    assert apply_peft(make_bart(), peft_cfg("adapter"), TASKS).sites[-1] == "model.decoder.layers.1.fc2"


def test_sites_of_a_bart_model_without_lm_head_are_its_own_paths():
    """A bare BartModel holds the encoder and decoder itself (no ``model.`` prefix): the sites are its own paths."""
    bare = make_bart().model
    names = [s.name for s in adapter_sites(bare)]
    assert names[:2] == ["encoder.layers.0.self_attn", "encoder.layers.0.fc2"]
    assert names[-1] == "decoder.layers.1.fc2" and all(bare.get_submodule(n) is not None for n in names)
    assert "decoder.layers.0.encoder_attn.q_proj" in [s.name for s in lora_sites(bare)]


def test_unsupported_backbone_is_named():
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2", "d_model": 8})()

    with pytest.raises(ValueError, match="gpt2"):
        apply_peft(Other(), peft_cfg("adapter"), TASKS)


def test_a_module_without_an_hf_config_is_named_not_taken_for_bart():
    """An LM with no ``config.model_type`` is refused naming its class and the supported types (it is no BART)."""
    with pytest.raises(ValueError, match=r"backbone Linear \(config\.model_type=None\) is not supported; supported "
                                         r"model types: \['t5', 'mt5', 'umt5', 'bart', 'mbart'\]"):
        backbone_family(torch.nn.Linear(2, 2))


def test_t5_and_bart_variants_are_their_family():
    def lm(model_type):
        return type("LM", (torch.nn.Module,), {"config": type("C", (), {"model_type": model_type})()})()

    assert [backbone_family(lm(m)) for m in ("t5", "mt5", "umt5", "bart", "mbart")] == ["t5"] * 3 + ["bart"] * 2


@pytest.mark.parametrize("backbone", ["t5", "bart"])
def test_lora_site_keys_name_their_projection(backbone):
    """``..._q`` adapts the query projection, ``..._v`` the value one: the keys name the saved LoRA weights."""
    sites = lora_sites(BACKBONES[backbone]())
    assert sites and all(s.name.rsplit(".", 1)[-1].startswith(s.key[-1]) for s in sites)


@pytest.mark.parametrize("backbone", ["t5", "bart"])
def test_sites_record_their_stack_layer_and_kind_and_lora_sites_keep_their_attentions(backbone):
    """Each adapter site records its stack, layer and sublayer kind, and its key is made of them (Hyperformer's
    per-stack hypernetworks and layer embeddings read them): self-attention and FFN in every layer, cross-attention
    in the decoder's only. A LoRA site (q then v of each attention, no FFN) keeps its attention's stack, layer and
    kind."""
    lm = BACKBONES[backbone]()
    kinds = {"encoder": ("self_attn", "ffn"), "decoder": ("self_attn", "cross_attn", "ffn")}
    expected = [(stack, i, kind) for stack in ("encoder", "decoder") for i in range(2) for kind in kinds[stack]]
    sites = adapter_sites(lm)
    assert [(s.stack, s.layer, s.kind) for s in sites] == expected
    assert [s.key for s in sites] == [f"{stack}_{i}_{kind}" for stack, i, kind in expected]
    assert [(s.key, s.stack, s.layer, s.kind) for s in lora_sites(lm)] == [
        (f"{stack}_{i}_{kind}_{p}", stack, i, kind) for stack, i, kind in expected if kind != "ffn" for p in "qv"]


def test_an_lm_without_layers_is_an_error():
    lm = torch.nn.Module()
    lm.config = type("C", (), {"model_type": "t5"})()
    lm.encoder, lm.decoder = torch.nn.Module(), torch.nn.Module()
    lm.encoder.block, lm.decoder.block = torch.nn.ModuleList(), torch.nn.ModuleList()
    with pytest.raises(ValueError, match="no adapter sites"):
        adapter_sites(lm)


def test_weight_keys_and_select_key():
    assert weight_keys("single", "down", "down", TASKS) == (SHARED,)
    assert weight_keys("multiple", "down", "down", TASKS) == tuple(TASKS)
    assert weight_keys("half_shared", "down", "down", TASKS) == (SHARED,)
    assert weight_keys("half_shared", "down", "up", TASKS) == tuple(TASKS)
    with pytest.raises(ValueError, match="'shared_all'"):
        weight_keys("shared_all", "down", "down", TASKS)
    assert select_key((SHARED,), None, "site") == SHARED and select_key(TASKS, "gqa", "site") == "gqa"
    with pytest.raises(KeyError, match=r"site: unknown task 'nlvr2'.*\['vqa', 'gqa'\]"):
        select_key(TASKS, "nlvr2", "site")


@pytest.mark.parametrize("tasks, words", [([], "empty"), (["vqa", "a.b"], "'a.b'"), (["vqa", SHARED], "'shared'"),
                                          (["vqa", ""], "''"), (["vqa", "gqa", "vqa"], "repeat")])
def test_unusable_task_lists_are_refused(tasks, words):
    with pytest.raises(ValueError, match=words):
        apply_peft(make_t5(), peft_cfg("adapter", "multiple"), tasks)


def test_one_task_name_is_one_task():
    assert apply_peft(make_t5(), peft_cfg("adapter", "multiple"), "vqa").tasks == ("vqa",)


def test_zero3_unused_anchor_takes_only_unused_trainable_partitioned_parameters():
    module = torch.nn.Module()
    module.used = torch.nn.Parameter(torch.ones(2))
    module.other = torch.nn.Parameter(torch.ones(2))
    module.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    assert zero3_unused_anchor(module, [module.used]) is None  # not partitioned: no ZeRO-3
    for p in module.parameters():
        p.ds_id = 0
    assert zero3_unused_anchor(module, [module.used, module.other]) is None  # the frozen one needs no anchor
    with torch.no_grad():
        assert zero3_unused_anchor(module, [module.used]) is None
    zero3_unused_anchor(module, [module.used]).backward()
    assert module.used.grad is None and module.frozen.grad is None
    assert torch.equal(module.other.grad, torch.zeros(2))


# ----------------------------------------------------------------------------- identity at init

CASES = HOOKED + [("adapter-unfused", "multiple"), ("compacter-shared-factorized", "multiple"),
                  ("compacter-shared-factorized", "half_shared")]


def build(backbone, method, sharing, **kw):
    if method == "adapter-unfused":
        method, kw = "adapter", {**kw, "fused": False}
    elif method == "compacter-shared-factorized":
        method, kw = "compacter", {**kw, "shared_phm_rule": True, "factorized_phm": True, "phm_rank": 2}
    lm = BACKBONES[backbone]()
    return lm, apply_peft(lm, peft_cfg(method, sharing, **kw), TASKS)


@pytest.mark.parametrize("backbone", ["t5", "bart"])
@pytest.mark.parametrize("method,sharing", CASES)
def test_identity_at_init_then_not(backbone, method, sharing):
    base = logits(BACKBONES[backbone]())
    lm, peft = build(backbone, method, sharing)
    assert n_params(peft) > 0
    for task in TASKS:
        peft.set_task(task)
        torch.testing.assert_close(logits(lm), base, rtol=0, atol=1e-6)
    perturb(peft)
    peft.set_task("vqa")
    assert (logits(lm) - base).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["adapter", "compacter", "compacter-shared-factorized", "hyperformer"])
def test_up_projection_trains_from_the_identity_init(method):
    """The identity at init zeroes one factor of the adapter's update, never the path to the up-projection: the first
    backward gives the task's up-projection a gradient (a factorised Compacter's W_u = A kron s t^T starts with t = 0,
    s random; with s = 0 as well neither factor would ever get a gradient and the adapter stayed the identity)."""
    hyper = method == "hyperformer"
    lm, peft = build("t5", method, "single" if hyper else "multiple")
    peft.set_task("vqa")
    enc, dec = inputs()
    lm(input_ids=enc, decoder_input_ids=dec).logits.square().mean().backward()
    if hyper:  # the up-generators
        up = [n for n in dict(peft.named_parameters()) if ".up_weight." in n or ".up_bias." in n]
    else:  # W_u's zero factor (the blocks, t) and b_u; the rule and s get theirs once W_u moves
        up = [n for n in dict(peft.named_parameters())
              if n.endswith("_vqa") and n.split(".")[-1].startswith(("up_weight", "up_blocks", "up_t_", "up_bias"))]
    assert len(up) == 20, up  # 10 sites x W_u's factor and b_u; hyperformer: 5 generators x 2 Linears x 2
    grads = dict(peft.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().max() > 0 for n in up), up


def test_lm_state_dict_stays_clean_and_peft_names():
    lm = make_t5()
    keys = set(lm.state_dict())
    peft = apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    assert set(lm.state_dict()) == keys
    names = [n for n, _ in peft.named_parameters()]
    assert "adapter.sites.encoder_0_self_attn.down_weight_vqa" in names
    assert "adapter.sites.decoder_1_cross_attn.up_bias_gqa" in names
    assert not any(n.startswith("lm") for n in names)


def test_adapter_parameter_count():
    lm = make_t5()
    h = D // 8
    per_set = 2 * D * h + h + D
    assert n_params(apply_peft(lm, peft_cfg("adapter", "single"), TASKS)) == 10 * per_set
    assert n_params(apply_peft(make_t5(), peft_cfg("adapter", "multiple"), TASKS)) == 10 * 2 * per_set
    assert n_params(apply_peft(make_t5(), peft_cfg("adapter", "half_shared", half_shared="up"), TASKS)
                    ) == 10 * (2 * (D * h + h) + D * h + D)


def test_fused_and_reference_adapters_agree():
    outs = []
    for fused in (True, False):
        lm = make_t5()
        peft = apply_peft(lm, peft_cfg("adapter", "multiple", fused=fused), TASKS)
        perturb(peft)
        peft.set_task("gqa")
        outs.append(logits(lm))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_adapter_site_math():
    lm = make_bart()
    peft = apply_peft(lm, peft_cfg("adapter", "multiple", activation="gelu_tanh"), TASKS)
    perturb(peft)
    site = peft.adapter.sites["decoder_0_ffn"]
    x = torch.randn(2, 3, D)
    wd, bd, wu, bu = site.weights("gqa")
    expected = x + (torch.nn.functional.gelu(x @ wd.T + bd, approximate="tanh") @ wu.T + bu)
    torch.testing.assert_close(site(x, "gqa"), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter_reference(x, wd, bd, wu, bu, "gelu_tanh"), expected, rtol=1e-5, atol=1e-5)


def test_adapter_in_another_dtype_than_its_input_keeps_the_residual():
    """T5 keeps ``wo`` in fp32 under bf16 weights: the branch runs in the adapter's dtype, and the output is
    still h + W_u act(W_d h + b_d) + b_u in h's dtype (the identity at init)."""
    from vlscale.peft.adapter import apply_adapter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, D, generator=g)
    wd, bd = torch.randn(8, D, generator=g) * 0.1, torch.randn(8, generator=g) * 0.1
    wu, bu = torch.randn(D, 8, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
    expected = x + (torch.nn.functional.gelu(x @ wd.T + bd) @ wu.T + bu)
    bf = [w.to(torch.bfloat16) for w in (wd, bd, wu, bu)]
    out = apply_adapter(x, *bf, "gelu", fused=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    zero_up = apply_adapter(x, bf[0], bf[1], torch.zeros_like(bf[2]), torch.zeros_like(bf[3]), "gelu", fused=False)
    torch.testing.assert_close(zero_up, x, rtol=0, atol=0)
    # and the other way round (a bf16 input, fp32 adapter weights): the output keeps the input's dtype
    out = apply_adapter(x.to(torch.bfloat16), wd, bd, wu, bu, "gelu", fused=False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_adapter_in_another_dtype_than_its_input_uses_its_activation():
    """The mixed-dtype branch (T5's fp32 ``wo`` under bf16 adapters) applies peft.activation, not always exact GELU."""
    from vlscale.peft.adapter import apply_adapter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, D, generator=g, dtype=torch.float64) * 3
    wd, bd = torch.randn(8, D, generator=g), torch.randn(8, generator=g)
    wu, bu = torch.randn(D, 8, generator=g), torch.randn(D, generator=g)
    h = x.float() @ wd.T + bd
    for activation, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        expected = x + (torch.nn.functional.gelu(h, approximate=approximate) @ wu.T + bu).double()
        out = apply_adapter(x, wd, bd, wu, bu, activation, fused=False)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=activation)


def test_adapter_on_the_meta_device_takes_the_reference_whatever_the_backend(monkeypatch):
    """On the meta device (parameter counts, memory plans) the adapter computes in its reference, not through the
    fused kernel's dispatch, which VLSCALE_ADAPTER_BACKEND=triton makes raise for a tensor not on a GPU."""
    from vlscale.kernels.adapter import BACKEND_ENV
    from vlscale.peft.adapter import BottleneckAdapter

    monkeypatch.setenv(BACKEND_ENV, "triton")
    with torch.device("meta"):
        site = BottleneckAdapter(D, 8, ["shared"], ["shared"], fused=True)
        out = site(torch.empty(2, 4, D, requires_grad=True), None)
    assert out.shape == (2, 4, D) and out.device.type == "meta"


def test_adapter_down_projection_has_nn_linear_default_init():
    """The down-projection (weight and bias) starts as nn.Linear's default init, drawn from the same seed."""
    from vlscale.peft.adapter import BottleneckAdapter

    torch.manual_seed(3)
    site = BottleneckAdapter(D, 8, ["shared"], ["shared"])
    torch.manual_seed(3)
    ref = torch.nn.Linear(D, 8)
    torch.testing.assert_close(site.down_weight_shared, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(site.down_bias_shared, ref.bias, rtol=0, atol=0)


def test_adapter_refuses_an_unknown_activation_and_an_empty_bottleneck():
    from vlscale.config import ConfigError
    from vlscale.peft.adapter import BottleneckAdapter, adapter_hidden

    with pytest.raises(ConfigError, match=r"peft.activation='relu'.*\['gelu', 'gelu_tanh'\]"):
        BottleneckAdapter(D, 8, ["shared"], ["shared"], activation="relu")
    assert adapter_hidden(D, D) == 1
    with pytest.raises(ConfigError, match=f"peft.reduction_factor={2 * D} .*d_model={D}"):
        adapter_hidden(D, 2 * D)

# ----------------------------------------------------------------------------- tasks and sharing

@pytest.mark.parametrize("method", ["adapter", "compacter", "lora"])
def test_sharing_modes_route_tasks(method):
    outs = {}
    for sharing in ("single", "multiple", "half_shared"):
        lm = make_t5()
        peft = apply_peft(lm, peft_cfg(method, sharing), TASKS)
        perturb(peft)
        outs[sharing] = {}
        for t in TASKS:
            peft.set_task(t)
            outs[sharing][t] = logits(lm)
    torch.testing.assert_close(outs["single"]["vqa"], outs["single"]["gqa"], rtol=0, atol=0)
    assert (outs["multiple"]["vqa"] - outs["multiple"]["gqa"]).abs().max() > 1e-3
    assert (outs["half_shared"]["vqa"] - outs["half_shared"]["gqa"]).abs().max() > 1e-3


def test_single_sharing_needs_no_task_but_multiple_does():
    lm = make_t5()
    apply_peft(lm, peft_cfg("adapter", "single"), TASKS)
    logits(lm)  # no task selected: the shared set serves every task
    lm = make_t5()
    apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    with pytest.raises(RuntimeError, match="no task selected"):
        logits(lm)


@pytest.mark.parametrize("shared", ["down", "up"])
def test_half_shared_shares_exactly_one_projection(shared):
    lm = make_bart()
    peft = apply_peft(lm, peft_cfg("adapter", "half_shared", half_shared=shared), TASKS)
    site = peft.adapter.sites["encoder_1_ffn"]
    a, b = site.weights("vqa"), site.weights("gqa")
    idx_shared, idx_own = ((0, 1), (2, 3)) if shared == "down" else ((2, 3), (0, 1))
    assert all(a[i] is b[i] for i in idx_shared)
    assert all(a[i] is not b[i] for i in idx_own)
    # the other methods with a down/up split
    lora = apply_peft(make_bart(), peft_cfg("lora", "half_shared", half_shared=shared), TASKS)
    (av, bv), (ag, bg) = (lora.lora.sites["decoder_0_cross_attn_q"].factors(t) for t in TASKS)
    assert (av is ag) == (shared == "down") and (bv is bg) == (shared == "up")
    comp = apply_peft(make_bart(), peft_cfg("compacter", "half_shared", half_shared=shared), TASKS)
    names = {n.split(".")[-1] for n, _ in comp.named_parameters()}
    assert f"{shared}_blocks_{SHARED}" in names and f"{shared}_blocks_vqa" not in names
    other = "up" if shared == "down" else "down"
    assert {f"{other}_blocks_vqa", f"{other}_blocks_gqa"} <= names


def test_multiple_gives_each_task_its_own_parameters():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    a, b = (peft.adapter.sites["encoder_0_ffn"].weights(t) for t in TASKS)
    assert all(x is not y for x, y in zip(a, b))
    single = apply_peft(make_t5(), peft_cfg("adapter", "single"), TASKS)
    a, b = (single.adapter.sites["encoder_0_ffn"].weights(t) for t in TASKS)
    assert all(x is y for x, y in zip(a, b))


def test_unknown_task_is_named():
    peft = apply_peft(make_t5(), peft_cfg("adapter", "multiple"), TASKS)
    with pytest.raises(KeyError, match=r"'nlvr2'.*\['vqa', 'gqa'\]"):
        peft.set_task("nlvr2")


def per_task_logits(lm, peft):
    """Per-task adapters moved away from the identity, and each task's logits (they differ: the selected task
    shows in the forward)."""
    perturb(peft)
    out = {}
    for task in TASKS:
        peft.set_task(task)
        out[task] = logits(lm)
    assert (out["vqa"] - out["gqa"]).abs().max() > 1e-3
    return out


def test_task_context_manager_restores():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    by_task = per_task_logits(lm, peft)
    peft.set_task("vqa")
    with peft.task("gqa"):
        torch.testing.assert_close(logits(lm), by_task["gqa"], rtol=0, atol=0)
    torch.testing.assert_close(logits(lm), by_task["vqa"], rtol=0, atol=0)


def test_task_context_manager_restores_no_task_and_after_an_error():
    """Entered with no task selected it leaves none selected (a later forward of per-task adapters fails naming the
    missing set_task instead of running the context's task); an exception inside still restores the previous task."""
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    with peft.task("gqa"):
        pass
    with pytest.raises(RuntimeError, match="no task selected"):
        logits(lm)
    by_task = per_task_logits(lm, peft)
    peft.set_task("vqa")
    with pytest.raises(ZeroDivisionError):
        with peft.task("gqa"):
            1 / 0
    torch.testing.assert_close(logits(lm), by_task["vqa"], rtol=0, atol=0)


def test_an_unknown_method_is_refused_naming_the_known_ones():
    cfg = peft_cfg("adapter")
    cfg.method = "ia3"  # past the config's own check
    with pytest.raises(ValueError, match=r"peft.method='ia3' is not one of \['adapter', 'hyperformer', 'compacter', "
                                         r"'lora', 'prompt', 'none'\]"):
        apply_peft(make_t5(), cfg, TASKS)


def test_a_sublayer_output_the_hook_cannot_adapt_is_named():
    """A site whose sublayer returns neither a tensor nor a tuple (another transformers version's layout) is an error
    naming the method and site, not an output passed through without its adapter."""
    lm = make_t5()
    apply_peft(lm, peft_cfg("adapter"), TASKS)
    ffn = lm.encoder.block[1].layer[1].DenseReluDense
    ffn.forward = lambda hidden_states: {"hidden_states": hidden_states}
    with pytest.raises(TypeError, match=r"peft adapter at encoder_1_ffn: the sublayer returned dict"):
        ffn(torch.randn(2, 3, D))


def test_the_controller_of_a_deleted_lm_says_so():
    """The controller holds its LM weakly (not a submodule: the LM's state_dict stays the backbone's); once the LM is
    gone, listing the LoRA-adapted projections' biases names that instead of failing on None."""
    import gc

    lm = make_bart()
    peft = apply_peft(lm, peft_cfg("lora"), TASKS)
    del lm
    gc.collect()
    with pytest.raises(RuntimeError, match="peft.lora_bias_parameters: the language model .* no longer exists"):
        peft.lora_bias_parameters()


def test_hyperformer_generates_per_task_and_site():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("hyperformer"), TASKS)
    hyper = peft.hyperformer
    wd, bd, wu, bu = hyper.weights("encoder_0_ffn", "vqa")
    assert wd.shape == (D // 8, D) and wu.shape == (D, D // 8)
    assert wu.abs().max() == 0 and bu.abs().max() == 0  # identity at init
    assert (wd - hyper.weights("encoder_0_ffn", "gqa")[0]).abs().max() > 0
    assert (wd - hyper.weights("decoder_0_ffn", "vqa")[0]).abs().max() > 0
    assert (wd - hyper.weights("encoder_1_ffn", "vqa")[0]).abs().max() > 0  # the layer embedding
    assert (wd - hyper.weights("encoder_0_self_attn", "vqa")[0]).abs().max() > 0  # the kind's generator
    # the reference's layout: task embeddings shared by one hypernetwork per stack, a generator per sublayer kind
    assert {n.split(".")[1] for n, _ in peft.named_parameters()} == {"task_embeddings", "hypernets"}
    assert {stack: list(h.generators) for stack, h in hyper.hypernets.items()} == {
        "encoder": ["self_attn", "ffn"], "decoder": ["self_attn", "cross_attn", "ffn"]}
    assert {stack: h.layer_embedding.num_embeddings for stack, h in hyper.hypernets.items()} == {
        "encoder": lm.config.num_layers, "decoder": lm.config.num_decoder_layers}
    with pytest.raises(RuntimeError, match="no task selected"):
        logits(lm)


def test_hyperformer_site_is_the_hypernetwork_chain():
    """After perturbing every parameter: z = LayerNorm(W_2 relu(W_1 [task_emb; layer_emb] + c_1) + c_2), the kind's
    generators turn z into the site's adapter, and the site computes h + W_u act(W_d h + b_d) + b_u."""
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("hyperformer", activation="gelu_tanh"), TASKS)
    hyper = peft.hyperformer
    gen = hyper.hypernets["decoder"].generators["cross_attn"]
    assert abs(gen.down_weight.weight.std().item() / 1e-2 - 1) < 0.1  # N(0, 1e-2), as the reference's
    perturb(peft)
    net = hyper.hypernets["decoder"]
    e = torch.cat([hyper.task_embeddings.task_embedding_gqa[0], net.layer_embedding.weight[1]])
    lin1, lin2 = net.projector[0], net.projector[2]
    z = torch.nn.functional.layer_norm(lin2(torch.relu(lin1(e))), (4,), net.norm.weight, net.norm.bias)
    wd, bd = gen.down_weight(z).view(D // 8, D), gen.down_bias(z)
    wu, bu = gen.up_weight(z).view(D, D // 8), gen.up_bias(z)
    for got, want in zip(hyper.weights("decoder_1_cross_attn", "gqa"), (wd, bd, wu, bu)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, D)
    expected = x + torch.nn.functional.gelu(x @ wd.T + bd, approximate="tanh") @ wu.T + bu
    torch.testing.assert_close(hyper(x, "decoder_1_cross_attn", "gqa"), expected, rtol=1e-5, atol=1e-5)


def test_hyperformer_projector_feeds_the_layernorm_without_an_activation():
    """z = LayerNorm(W_2 relu(W_1 e + c_1) + c_2): the code's negative entries reach the LayerNorm as they are (a
    ReLU after W_2 would zero them; the chain test above happened to draw a code with no negative entry)."""
    lm = make_t5()
    hyper = apply_peft(lm, peft_cfg("hyperformer"), TASKS).hyperformer
    perturb(hyper)
    net = hyper.hypernets["encoder"]
    with torch.no_grad():
        net.projector[2].bias.copy_(torch.tensor([-5.0, 5.0, -5.0, 5.0]))
    e = torch.cat([hyper.task_embeddings.task_embedding_vqa[0], net.layer_embedding.weight[1]])
    code = net.projector[2](torch.relu(net.projector[0](e)))
    assert (code < 0).any() and (code > 0).any(), code  # guard: a ReLU here would change it
    z = torch.nn.functional.layer_norm(code, (4,), net.norm.weight, net.norm.bias)
    torch.testing.assert_close(hyper.weights("encoder_1_ffn", "vqa")[0],
                               net.generators["ffn"].down_weight(z).view(D // 8, D), rtol=1e-5, atol=1e-6)

def test_hyperformer_starts_as_the_reference_initialises_it():
    """Task embeddings N(0, 1) (the reference's randn); every generator Linear of W_d and b_d N(0, 1e-2) with a zero
    bias (the reference's init_linear_layer), those of W_u and b_u all zero (the identity at init)."""
    torch.manual_seed(0)
    hyper = apply_peft(make_t5(), peft_cfg("hyperformer", task_embedding_dim=512), TASKS).hyperformer
    emb = torch.cat([getattr(hyper.task_embeddings, f"task_embedding_{t}") for t in TASKS], dim=1)
    assert abs(emb.mean().item()) < 0.1 and 0.9 < emb.std().item() < 1.1
    for net in hyper.hypernets.values():
        for gen in net.generators.values():
            for lin in (gen.down_weight, gen.down_bias):
                assert abs(lin.weight.std().item() / 1e-2 - 1) < 0.3 and not lin.bias.any()
            for lin in (gen.up_weight, gen.up_bias):
                assert not lin.weight.any() and not lin.bias.any()


def test_hyperformer_parameter_count_with_its_own_widths():
    """Every width where it belongs (task and layer embeddings of different widths, as a preset may set them): the
    task embeddings (tasks x T), per stack its layer embeddings (layers x L), the projector (T + L -> H -> P), the
    LayerNorm's scale and shift (2P), and per sublayer kind the four generators (P + 1 -> 2 h d + h + d)."""
    T, L, H, P, d, h = 8, 6, 16, 4, D, D // 8
    cfg = peft_cfg("hyperformer", task_embedding_dim=T, layer_embedding_dim=L, hypernet_hidden_dim=H,
                   hypernet_projected_dim=P)
    lm = make_t5()
    peft = apply_peft(lm, cfg, TASKS)
    per_stack = {"encoder": (2, 2), "decoder": (2, 3)}  # (layers, sublayer kinds)
    expected = len(TASKS) * T + sum(n * L + (T + L) * H + H + H * P + P + 2 * P + k * (P + 1) * (2 * h * d + h + d)
                                    for n, k in per_stack.values())
    assert n_params(peft) == expected
    peft.set_task("gqa")
    base = logits(make_t5())
    perturb(peft)
    assert (logits(lm) - base).abs().max() > 1e-3  # and the model runs with them


@pytest.mark.parametrize("reduction", [4, 16])
def test_hyperformer_adapter_width_follows_the_reduction_factor(reduction):
    """Every generated adapter is d_model // peft.reduction_factor wide, in both stacks and for every sublayer kind,
    as the other adapter methods' (the tests above all run this file's default factor, 8)."""
    h = D // reduction
    hyper = apply_peft(make_t5(), peft_cfg("hyperformer", reduction_factor=reduction), TASKS).hyperformer
    for site in ("encoder_0_self_attn", "encoder_1_ffn", "decoder_1_cross_attn"):
        wd, bd, wu, bu = hyper.weights(site, "gqa")
        assert (wd.shape, bd.shape, wu.shape, bu.shape) == ((h, D), (h,), (D, h), (D,)), site


def test_hyperformer_refuses_an_unknown_task_and_activation():
    from vlscale.config import ConfigError
    from vlscale.peft.hyperformer import HyperformerLayers

    hyper = apply_peft(make_t5(), peft_cfg("hyperformer"), TASKS).hyperformer
    with pytest.raises(KeyError, match=r"unknown task 'nlvr2'; known tasks: \['vqa', 'gqa'\]"):
        hyper.weights("encoder_0_ffn", "nlvr2")
    cfg = peft_cfg("hyperformer")
    cfg.activation = "relu"  # past the config's own check
    with pytest.raises(ConfigError, match=r"peft.activation='relu'"):
        HyperformerLayers(adapter_sites(make_t5()), cfg, TASKS, D)


# ----------------------------------------------------------------------------- Compacter

@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("shared_rule", [False, True])
def test_compacter_weight_is_sum_of_kronecker_products(factorized, shared_rule):
    lm = make_t5()
    cfg = peft_cfg("compacter", "multiple", phm_dim=4, reduction_factor=4, factorized_phm=factorized,
                   shared_phm_rule=shared_rule, phm_rank=2, activation="gelu_tanh")
    peft = apply_peft(lm, cfg, TASKS)
    perturb(peft)
    site = peft.compacter.sites["decoder_1_self_attn"]
    rule = peft.compacter.shared_rule() if shared_rule else None
    wd, bd, wu, bu = site.weights("gqa", rule)
    for w, part in ((wd, "down"), (wu, "up")):
        A = rule if shared_rule else getattr(site, f"{part}_rule_gqa")
        if factorized:
            B = getattr(site, f"{part}_s_gqa") @ getattr(site, f"{part}_t_gqa").transpose(1, 2)
        else:
            B = getattr(site, f"{part}_blocks_gqa")
        expected = sum(torch.kron(A[i], B[i]) for i in range(4))  # (in x out)
        torch.testing.assert_close(w.T, expected, rtol=1e-6, atol=1e-6)
    assert wd.shape == (D // 4, D) and wu.shape == (D, D // 4)
    x = torch.randn(3, D)
    torch.testing.assert_close(site(x, "gqa", rule), adapter_reference(x, wd, bd, wu, bu, "gelu_tanh"), rtol=1e-5,
                               atol=1e-5)  # peft.activation reaches every site
    # fewer parameters than the dense adapter it replaces
    dense = apply_peft(make_t5(), peft_cfg("adapter", "multiple", reduction_factor=4), TASKS)
    assert n_params(peft) < n_params(dense)


@pytest.mark.parametrize("sharing,shared_rule,rank", [("multiple", False, 0), ("single", True, 3),
                                                     ("half_shared", False, 2)])
def test_compacter_parameter_count(sharing, shared_rule, rank):
    """Per PHM layer (in -> out) and weight set: the rule's n^3 (once in all with peft.shared_phm_rule), B's in out / n
    or, factorised, n (in/n + out/n) peft.phm_rank, and the bias' out; T5's 10 sites, d_model 32, hidden 8, n = 2."""
    n, d, h = 2, D, D // 4
    cfg = peft_cfg("compacter", sharing, phm_dim=n, reduction_factor=4, shared_phm_rule=shared_rule,
                   factorized_phm=rank > 0, phm_rank=max(rank, 1), half_shared="up")

    def layer(fan_in, fan_out):
        blocks = n * (fan_in // n + fan_out // n) * rank if rank else fan_in * fan_out // n
        return (0 if shared_rule else n ** 3) + blocks + fan_out

    sets = {"multiple": (2, 2), "single": (1, 1), "half_shared": (2, 1)}[sharing]  # (down, up) sets per site
    expected = 10 * (sets[0] * layer(d, h) + sets[1] * layer(h, d)) + (n ** 3 if shared_rule else 0)
    assert n_params(apply_peft(make_t5(), cfg, TASKS)) == expected


@pytest.mark.parametrize("shared_rule,factorized", [(False, False), (True, False), (True, True)])
def test_every_compacter_weight_trains_once_the_adapter_moved(shared_rule, factorized):
    """Away from the identity init, a backward of one task gives every weight of that task's adapters a non-zero
    gradient: the rules A_i (the one shared rule too), B_i or s_i and t_i, and the biases."""
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("compacter", "multiple", shared_phm_rule=shared_rule, factorized_phm=factorized,
                                   phm_rank=2), TASKS)
    perturb(peft)
    peft.set_task("vqa")
    enc, dec = inputs()
    lm(input_ids=enc, decoder_input_ids=dec).logits.square().mean().backward()
    params = {n: p for n, p in peft.named_parameters() if not n.endswith("_gqa")}
    per_part = (0 if shared_rule else 1) + (2 if factorized else 1) + 1  # rule, B (or s, t), bias
    assert len(params) == 10 * 2 * per_part + shared_rule and ("compacter.shared_rule.rule" in params) is shared_rule
    assert [n for n, p in params.items() if p.grad is None or not p.grad.any()] == []


def test_compacter_rule_shared_across_layers():
    peft = apply_peft(make_t5(), peft_cfg("compacter", "single", shared_phm_rule=True), TASKS)
    rules = [n for n, _ in peft.named_parameters() if "rule" in n]
    assert rules == ["compacter.shared_rule.rule"]


def test_compacter_phm_dim_must_divide():
    with pytest.raises(ValueError, match="phm_dim=3"):
        apply_peft(make_t5(), peft_cfg("compacter", phm_dim=3), TASKS)
    # d_model = 32 divides by 8, the hidden size 32 // 8 = 4 does not
    with pytest.raises(ValueError, match=r"phm_dim=8 .*hidden size 4"):
        apply_peft(make_t5(), peft_cfg("compacter", phm_dim=8, reduction_factor=8), TASKS)


@pytest.mark.parametrize("shared_rule,factorized", [(False, False), (True, False), (False, True)])
def test_compacter_down_weight_starts_with_xavier_std(shared_rule, factorized):
    """A_i ~ N(0, 1/n) and B_i (or s_i t_i^T) of Xavier variance: the generated dense W_d has Xavier's std; W_u and
    both biases start at zero (the reference's PHMLinear zeros its bias), so the site starts as the identity."""
    from vlscale.peft.compacter import CompacterAdapter, PHMRule

    torch.manual_seed(0)
    d, h, n = 256, 64, 4
    site = CompacterAdapter(d, h, ["shared"], ["shared"], n, shared_rule=shared_rule, factorized=factorized, rank=4)
    rule = PHMRule(n)() if shared_rule else None
    wd, bd, wu, bu = site.weights(None, rule)
    xavier = (2.0 / (d + h)) ** 0.5
    assert abs(wd.std().item() / xavier - 1) < 0.25, (wd.std().item(), xavier)
    assert wu.abs().max() == 0
    assert bd.shape == (h,) and bu.shape == (d,) and bd.abs().max() == 0 and bu.abs().max() == 0  # PHMLinear's zeros
    torch.manual_seed(0)
    assert abs(PHMRule(8).rule.std().item() * 8 ** 0.5 - 1) < 0.1  # the shared rule: N(0, 1/n)


def test_compacter_shared_rule_takes_the_lm_dtype():
    """The shared PHM rule is built in the LM's dtype like every per-site weight, so a bf16 model's Compacter has no
    fp32 parameter (one would be an fp32 master/optimizer state of its own and mix dtypes in the Kronecker product)."""
    lm = make_t5().to(torch.bfloat16)
    base = logits(lm)
    peft = apply_peft(lm, peft_cfg("compacter", "multiple", shared_phm_rule=True, factorized_phm=True), TASKS)
    assert peft.compacter.shared_rule.rule.dtype == torch.bfloat16
    assert {p.dtype for p in peft.parameters()} == {torch.bfloat16}
    peft.set_task("vqa")
    torch.testing.assert_close(logits(lm), base, rtol=0, atol=0)  # runs, the identity at init


@pytest.mark.parametrize("method", ["adapter", "compacter", "hyperformer"])
def test_adapter_methods_honour_peft_fused_false(method, monkeypatch):
    """peft.fused=false reaches every site: the adapter runs its reference, never the fused kernel's dispatch (which
    VLSCALE_ADAPTER_BACKEND=triton makes refuse a CPU tensor), for Compacter's and Hyperformer's sites as well."""
    from vlscale.kernels.adapter import BACKEND_ENV

    lm = make_t5()
    peft = apply_peft(lm, peft_cfg(method, "single", fused=False), TASKS)
    peft.set_task("vqa")
    base = logits(lm)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    torch.testing.assert_close(logits(lm), base, rtol=0, atol=0)

def test_compacter_shared_rule_missing_is_named():
    from vlscale.peft.compacter import CompacterAdapter

    site = CompacterAdapter(D, 8, ["shared"], ["shared"], 2, shared_rule=True)
    with pytest.raises(RuntimeError, match="shared_phm_rule is on but no shared rule was passed"):
        site(torch.randn(2, D), None)


def test_compacter_refuses_an_unknown_activation():
    from vlscale.config import ConfigError
    from vlscale.peft.compacter import CompacterAdapter

    with pytest.raises(ConfigError, match=r"peft.activation='relu'.*\['gelu', 'gelu_tanh'\]"):
        CompacterAdapter(D, 8, ["shared"], ["shared"], 2, activation="relu")


# ----------------------------------------------------------------------------- LoRA

def test_lora_on_projections_wider_than_d_model():
    """T5's q/v are (n_heads * d_kv) x d_model, not square when n_heads * d_kv != d_model (t5-11b: 16384 x 1024):
    A is rank x in, B out x rank."""
    torch.manual_seed(0)
    lm = T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=D, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)).eval().double()
    peft = apply_peft(lm, peft_cfg("lora", "single"), TASKS)
    q = peft.lora.sites["encoder_0_self_attn_q"]
    assert (q.in_features, q.out_features) == (D, 64)
    assert q.factors(None)[0].shape == (4, D) and q.factors(None)[1].shape == (64, 4)
    perturb(peft)
    logits(lm)  # the hooked update: a factor shaped for d_model x d_model would fail here


def test_lora_update_comes_back_in_the_input_dtype():
    from vlscale.peft.lora import LoRALinear

    layer = LoRALinear(D, 16, rank=4, alpha=8.0, dropout=0.0, a_keys=["shared"], b_keys=["shared"])
    perturb(layer)
    x = torch.randn(2, D)
    out = layer(x.to(torch.bfloat16), None)
    assert out.dtype == torch.bfloat16
    a, b = layer.factors(None)
    torch.testing.assert_close(out.float(), 2.0 * x.to(torch.bfloat16).float() @ a.T @ b.T, rtol=2e-2, atol=2e-2)


def test_lora_dropout_follows_lm_mode():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("lora", lora_dropout=0.5), TASKS)
    perturb(peft)
    first = logits(lm)
    torch.testing.assert_close(logits(lm), first, rtol=0, atol=0)  # eval: no dropout
    lm.train()
    assert (logits(lm) - first).abs().max() > 1e-4


def test_lora_a_starts_as_nn_linear_and_b_at_zero_and_the_first_backward_reaches_b():
    """Each task's A (rank x in) starts as nn.Linear(in, rank)'s default weight, drawn in turn from the same seed (the
    reference's loralib: kaiming_uniform_, a=sqrt(5)); B at zero, so no update at init. The first backward gives every
    B of the task a gradient and A none yet (B is zero): an A at zero would leave both factors at zero for ever."""
    from vlscale.peft.lora import LoRALinear

    torch.manual_seed(3)
    layer = LoRALinear(D, 16, rank=4, alpha=8.0, dropout=0.0, a_keys=TASKS, b_keys=TASKS)
    torch.manual_seed(3)
    refs = [torch.nn.Linear(D, 4, bias=False) for _ in TASKS]
    for task, ref in zip(TASKS, refs):
        a, b = layer.factors(task)
        torch.testing.assert_close(a, ref.weight, rtol=0, atol=0)
        assert b.shape == (16, 4) and not b.any()

    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("lora", "multiple"), TASKS)
    peft.set_task("vqa")
    enc, dec = inputs()
    lm(input_ids=enc, decoder_input_ids=dec).logits.square().mean().backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if n.endswith("_vqa")}
    b_grads = [g for n, g in grads.items() if n.split(".")[-1].startswith("B_")]
    assert len(b_grads) == 12  # 6 attentions (2 encoder self, 2 decoder self, 2 cross) x q, v
    assert all(g is not None and g.abs().max() > 0 for g in b_grads)
    assert all(not g.any() for n, g in grads.items() if n.split(".")[-1].startswith("A_"))


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("backbone", ["t5", "bart"])
def test_prompts_shape_and_per_task(backbone):
    peft = apply_peft(BACKBONES[backbone](), peft_cfg("prompt", "multiple", n_prompts=5), TASKS)
    assert peft.sites == []  # nothing hooked: prompts enter through the encoder input
    with peft.task("vqa"):
        pv = peft.prompts(3, torch.float32)
    with peft.task("gqa"):
        pg = peft.prompts(3)
    assert pv.shape == (3, 5, D) and pg.shape == (3, 5, D)
    torch.testing.assert_close(pv[0], pv[2])  # same prompts for every example
    assert (pv - pg).abs().max() > 1e-4
    peft.set_task("vqa")
    assert peft.prompts(2, torch.bfloat16).dtype == torch.bfloat16
    single = apply_peft(BACKBONES[backbone](), peft_cfg("prompt", "single"), TASKS)
    with single.task("vqa"):
        a = single.prompts(1)
    with single.task("gqa"):
        b = single.prompts(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Embedding -> Linear(d, hidden) -> tanh -> Linear(hidden, d) per task
    assert n_params(single) == 3 * D + (D * 16 + 16) + (16 * D + D)


def test_prompt_math_is_the_reparameterised_embedding():
    """prompts = W_2 tanh(W_1 E + c_1) + c_2 (VL-Adapter's prompt encoder), the task's own set."""
    peft = apply_peft(make_t5(), peft_cfg("prompt", "multiple", n_prompts=4), TASKS)
    emb, w1, b1, w2, b2 = peft.prompt.parameters_of("gqa")
    expected = torch.tanh(emb @ w1.T + b1) @ w2.T + b2
    with peft.task("gqa"):
        torch.testing.assert_close(peft.prompts(2)[1], expected, rtol=1e-5, atol=1e-6)


def test_prompts_start_from_nn_embedding_and_nn_linear_init_in_the_lm_dtype():
    """The prompt table starts as nn.Embedding's N(0, 1) (so the P prompts start apart, not as one vector repeated),
    its two Linears as nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases, and every weight takes the
    LM's dtype as the other methods' do."""
    torch.manual_seed(0)
    enc = PromptEncoder(["vqa"], n_prompts=40, d_model=64, hidden=16)
    emb, w1, b1, w2, b2 = enc.parameters_of("vqa")
    assert abs(emb.mean().item()) < 0.1 and 0.9 < emb.std().item() < 1.1
    for (w, b), fan_in in (((w1, b1), 64), ((w2, b2), 16)):
        bound = fan_in ** -0.5
        for t in (w, b):
            assert t.abs().max() <= bound and t.abs().max() > bound / 2 and t.std() > bound / 4
    with torch.no_grad():
        p = enc(1, "vqa")[0]
    assert torch.cdist(p, p).add(torch.eye(40) * 1e3).min() > 1e-2  # no two prompts alike
    peft = apply_peft(make_t5().to(torch.bfloat16), peft_cfg("prompt", "multiple"), TASKS)
    assert {p.dtype for p in peft.parameters()} == {torch.bfloat16}


def test_prompts_get_gradients_through_the_encoder():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("prompt", "multiple"), TASKS)
    enc, dec = inputs()
    peft.set_task("gqa")
    embeds = torch.cat([peft.prompts(2), lm.get_input_embeddings()(enc)], dim=1)
    lm(inputs_embeds=embeds, decoder_input_ids=dec).logits.square().mean().backward()
    grads = {n: p.grad for n, p in peft.named_parameters()}
    assert all(g is not None for n, g in grads.items() if n.endswith("_gqa"))
    assert all(g is None for n, g in grads.items() if n.endswith("_vqa"))
    assert len(grads) == 10


def test_no_prompts_without_prompt_method_and_extra_prompts_per_task():
    assert apply_peft(make_t5(), peft_cfg("adapter"), TASKS).prompts(2) is None
    assert n_params(apply_peft(make_t5(), peft_cfg("none"), TASKS)) == 0
    peft = apply_peft(make_t5(), peft_cfg("adapter", "single", extra_prompts=True), TASKS)
    with peft.task("vqa"):
        a = peft.prompts(2)
    with peft.task("gqa"):
        b = peft.prompts(2)
    assert a.shape == (2, 3, D) and (a - b).abs().max() > 1e-4


# ----------------------------------------------------------------------------- meta device, dtypes

@pytest.mark.parametrize("backbone", ["t5", "bart"])
@pytest.mark.parametrize("method,sharing", HOOKED + [("prompt", "multiple")])
def test_builds_on_meta_device(backbone, method, sharing):
    cfg = peft_cfg(method, sharing)
    with torch.device("meta"):
        lm = BACKBONES[backbone]()
        peft = apply_peft(lm, cfg, TASKS)
    assert all(p.device.type == "meta" for p in peft.parameters())
    assert n_params(peft) == n_params(apply_peft(BACKBONES[backbone](), cfg, TASKS))
    peft.set_task("vqa")
    x = torch.empty(2, 4, D, device="meta")
    if method == "prompt":
        assert peft.prompts(2).shape == (2, 3, D) and peft.prompts(2).device.type == "meta"
    else:
        key = peft._sites[0].key
        assert getattr(peft, method)(x, key, "vqa").shape == (2, 4, D)
    if backbone == "t5":  # HF BART's mask code calls .item(), which the meta device cannot do
        ids = torch.zeros(2, 4, dtype=torch.long, device="meta")
        out = lm(input_ids=ids, decoder_input_ids=ids).logits
        assert out.device.type == "meta" and out.shape == (2, 4, 100)


def test_peft_modules_take_the_lm_dtype():
    lm = make_t5().to(torch.bfloat16)
    base = logits(lm)
    peft = apply_peft(lm, peft_cfg("adapter", "multiple"), TASKS)
    assert {p.dtype for p in peft.parameters()} == {torch.bfloat16}
    peft.set_task("vqa")
    torch.testing.assert_close(logits(lm), base, rtol=0, atol=0)
    lora = apply_peft(make_bart().to(torch.bfloat16), peft_cfg("lora"), TASKS)
    assert {p.dtype for p in lora.parameters()} == {torch.bfloat16}


def test_zero3_partitioned_parameters_are_counted_in_full():
    peft = apply_peft(make_t5(), peft_cfg("adapter", "multiple"), TASKS)
    full = n_params(peft)
    for p in peft.parameters():  # what DeepSpeed ZeRO-3 leaves on a rank: 0-size data + ds_numel/ds_shape
        p.ds_numel, p.ds_shape = p.numel(), p.shape
        p.data = torch.empty(0)
    assert n_params(peft) == full


# ----------------------------------------------------------------------------- gradient checkpointing

def _grads(lm, peft, checkpointing):
    set_checkpointing(lm, checkpointing)
    lm.train()
    peft.zero_grad(set_to_none=True)
    enc, dec = inputs()
    out = lm(input_ids=enc, decoder_input_ids=dec, use_cache=False).logits
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["t5", "bart"])
@pytest.mark.parametrize("method", ["adapter", "hyperformer", "compacter", "lora"])
def test_hooks_survive_gradient_checkpointing(backbone, method):
    # fp64: HF T5's checkpointed forward itself differs from its plain forward by ~1e-6 in fp32 (rounding;
    # measured without PEFT, torch 2.14.1+cu130 on CPU), the size of this test's tolerance. In fp64 rounding
    # is ~1e-15, so any difference left is the hooks' doing.
    lm = BACKBONES[backbone]().double()
    peft = apply_peft(lm, peft_cfg(method, "single" if method == "hyperformer" else "multiple"), TASKS)
    assert {p.dtype for p in peft.parameters()} == {torch.float64}
    perturb(peft)
    peft.set_task("vqa")
    calls = []
    layers = getattr(peft, method)
    # The site hooks run the container's forward as a plain call (no ZeRO-3 hooks on it), which is
    # right only while the container owns no parameters itself; its modules are called as modules.
    assert not list(layers.parameters(recurse=False))
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in layers.modules() if m is not layers]
    plain = _grads(lm, peft, checkpointing=False)
    n_plain = len(calls)
    ckpt = _grads(lm, peft, checkpointing=True)
    for handle in handles:
        handle.remove()
    assert len(calls) - n_plain > n_plain  # checkpointed sublayers ran again during backward
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in plain.values())


def test_controller_is_an_nn_module_with_peft_parameters_only():
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg("lora", "single"), TASKS)
    assert isinstance(peft, PeftController)
    lm_ids = {id(p) for p in lm.parameters()}
    assert not any(id(p) in lm_ids for p in peft.parameters())
    assert "method=lora" in repr(peft)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3

ZERO3_SCRIPT = r'''
import json, os, sys
import torch
import deepspeed
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from vlscale.config import PeftConfig
from vlscale.peft import apply_peft, configure_trainable
from vlscale.modeling.vl_model import set_checkpointing

torch.set_num_threads(1)

class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        torch.manual_seed(0)
        self.lm = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
            num_decoder_layers=1, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
        self.vision, self.projector = None, nn.Linear(4, 32)
        self.peft = apply_peft(self.lm, cfg, ["vqa", "gqa"])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.peft.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, task, enc, dec, feats):
        self.peft.set_task(task)
        parts = [self.projector(feats), self.lm.get_input_embeddings()(enc)]
        if self.peft.prompts(2) is not None:
            parts.insert(0, self.peft.prompts(2))
        out = self.lm(inputs_embeds=torch.cat(parts, 1), decoder_input_ids=dec, use_cache=False)
        return out.logits.square().mean()

def batches():
    g = torch.Generator().manual_seed(0)
    for step in range(4):  # alternating tasks: each task's modules sit out every other step
        yield (["vqa", "gqa"][step % 2], torch.randint(3, 100, (2, 7), generator=g),
               torch.randint(3, 100, (2, 5), generator=g), torch.randn(2, 3, 4, generator=g))

def run(cfg, zero3):
    model = Model(cfg)
    configure_trainable(model, cfg)
    set_checkpointing(model.lm, True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    if zero3 is not None:  # the trainer's optimizer groups and TaskSteps, under DeepSpeed at this stage
        from vlscale.engine.trainer import TaskSteps, optimizer_groups
        opt = torch.optim.AdamW(optimizer_groups(model, ["vqa", "gqa"]), lr=1e-3, weight_decay=0.0, eps=1e-4)
        ds = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": zero3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        steps = TaskSteps.install(engine)
        norms = []
        for b in batches():
            loss = engine(*b)
            engine.backward(loss)
            steps.task = b[0]
            engine.step()
            losses.append(loss.item())
            norm = engine.get_global_grad_norm()
            norms.append(None if norm is None else float(norm))
        return losses, norms
    # the reference trainer (VL-Adapter's multitask.py): the other task's modules get no gradient, and
    # AdamW skips them (no update, no moment decay)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, eps=1e-4)
    norms = []
    for b in batches():
        opt.zero_grad(set_to_none=True)
        loss = model(*b)
        loss.backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        opt.step()
        losses.append(loss.item())
    return losses, norms

from vlscale.engine.distributed import init_distributed
init_distributed()  # gloo on the CPU accelerator
out = {}
for method, extra in [("adapter", {}), ("lora", {"train_layer_norms": False}), ("prompt", {}),
                      ("hyperformer", {"sharing": "single"})]:  # its task embeddings are per task
    cfg = PeftConfig(method=method, **{"sharing": "multiple", **extra}, lora_rank=4, lora_dropout=0.0, n_prompts=3,
                     prompt_hidden_dim=16, task_embedding_dim=8, layer_embedding_dim=8, hypernet_hidden_dim=8,
                     hypernet_projected_dim=4)
    out[method] = [run(cfg, None), run(cfg, 3), run(cfg, 0), run(cfg, 2)]
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_zero3_matches_plain_pytorch_with_per_task_modules(tmp_path, preloaded):
    """The modules of the task a step does not use are not updated, as in the reference trainer (no
    gradient, so AdamW skips them): the trainer's optimizer groups and TaskSteps under DeepSpeed at
    ZeRO-3, 0 and 2 give plain PyTorch's losses over alternating tasks (before TaskSteps DeepSpeed
    stepped them with a zero gradient: 1.4e-3 off by step 3). Under ZeRO-3 they must also get a zero
    gradient, not the stale one of their last step (DeepSpeed 0.19); hooks work with partitioned
    parameters. The engines do not clip (DeepSpeed's default gradient_clipping is 1.0, the reference has none),
    and AdamW's eps is 1e-4, so that a gradient's scale shows: at eps=1e-8 Adam all but ignores it, and LoRA's
    engines, clipped at norm ~1.07, passed 1e-5 by a margin of 0.45 on the gradient norm after 4 steps, 0.01
    (rounding) now."""
    import json

    from vlscale.engine.distributed import free_port

    env = dict(preloaded.env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1")
    script = tmp_path / "zero3_probe.py"
    script.write_text(ZERO3_SCRIPT)
    proc = preloaded.run(script, [], env=env, cwd=tmp_path, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    for method, ((plain, plain_norms), *engines) in json.loads(lines[-1][len("RESULT "):]).items():
        for stage, (losses, norms) in zip((3, 0, 2), engines):
            assert len(plain) == len(losses) == 4
            assert max(abs(a - b) for a, b in zip(plain, losses)) < 1e-5, (method, stage, plain, losses)
            # the gradient norm (logged, and what clipping scales by) counts no stale gradient of the other task's
            # weights: Hyperformer's task embeddings under ZeRO-3 had theirs counted
            if norms[0] is not None:
                assert max(abs(a / b - 1) for a, b in zip(norms, plain_norms)) < 1e-5, (method, stage, plain_norms,
                                                                                        norms)


def test_zero3_unused_anchor_stays_finite_for_large_fp16_weights():
    """The ZeRO-3 anchor (0 * the sum of a forward's unused weight sets) summed fp16 weights in fp16: past
    65,504 the sum was inf and inf * 0 made the forward's output NaN."""
    from vlscale.peft.sites import zero3_unused_anchor

    module = torch.nn.Module()
    module.big = torch.nn.Parameter(torch.full((100,), 1000.0, dtype=torch.float16))
    module.used = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    for p in module.parameters():
        p.ds_id = 0  # as ZeRO-3 marks its parameters
    anchor = zero3_unused_anchor(module, [module.used])
    assert anchor is not None and torch.isfinite(anchor) and float(anchor.detach()) == 0.0
    anchor.backward()
    assert torch.equal(module.big.grad, torch.zeros_like(module.big))


def test_peft_modules_of_a_zero3_partitioned_lm_are_built_on_the_host():
    """Under ZeRO-3 the LM's parameters are partitions on the accelerator; PEFT modules created there drew their
    initial values from the GPU's generator, so a ZeRO-3 run started from other adapters than a whole build
    with the same seed. They are now built on the host, as the vision tower is (deepspeed.initialize
    partitions them)."""
    from vlscale.peft.sites import lm_dtype_device

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 2, device="meta", dtype=torch.bfloat16)

        def get_input_embeddings(self):
            return self.emb

    lm = LM()
    assert lm_dtype_device(lm) == (torch.bfloat16, torch.device("meta"))  # a whole LM: its own device
    lm.emb.weight.ds_id = 0  # as zero.Init marks a partitioned parameter (its data on the accelerator)
    assert lm_dtype_device(lm) == (torch.bfloat16, torch.device("cpu"))


@pytest.mark.parametrize("method,sharing,n_unused", [
    ("adapter", "multiple", 40), ("compacter", "multiple", 60), ("compacter", "half_shared", 30),
    ("lora", "multiple", 24), ("hyperformer", "single", 1), ("prompt", "multiple", 5)])  # hyperformer: gqa's embedding
def test_under_zero3_every_trainable_weight_set_gets_a_gradient_and_unused_ones_exactly_zero(method, sharing, n_unused):
    """Under ZeRO-3 (parameters marked with ds_id) a forward of one task adds the ZeRO-3 anchor of every method, so
    another task's weight set gets an exact zero gradient rather than none (DeepSpeed 0.19 re-applies a stale one;
    sites.zero3_unused_anchor), while the task's own sets get theirs; the output is unchanged. Only the adapter's and
    the prompt's anchors ran in single-process tests (compacter.py:122 could be dropped with every test passing)."""
    lm = make_t5()
    peft = apply_peft(lm, peft_cfg(method, sharing), TASKS)
    perturb(peft)
    peft.set_task("vqa")
    enc, dec = inputs()

    def forward():
        if method == "prompt":
            embeds = torch.cat([peft.prompts(enc.shape[0]), lm.get_input_embeddings()(enc)], dim=1)
            return lm(inputs_embeds=embeds, decoder_input_ids=dec).logits
        return lm(input_ids=enc, decoder_input_ids=dec).logits

    plain = forward().detach()
    params = dict(peft.named_parameters())
    for p in params.values():
        p.ds_id = 0  # as ZeRO-3 marks its parameters
    try:
        out = forward()
        torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
        out.square().mean().backward()
    finally:
        for p in params.values():
            del p.ds_id
    assert all(p.grad is not None for p in params.values()), [n for n, p in params.items() if p.grad is None]
    unused = {n for n in params if "gqa" in n.split(".")[-1].split("_") or n.endswith("gqa")}
    assert len(unused) == n_unused, sorted(unused)
    for n, p in params.items():
        if n in unused:
            assert not p.grad.any(), n
    assert any(p.grad.any() for n, p in params.items() if n not in unused)
