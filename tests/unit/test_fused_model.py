"""The whole VLModel with the fused bottleneck adapter (``peft.fused=true``, the default) computes
what the unfused module computes (``peft.fused=false``): loss, logits and the gradient of every
trainable parameter, on tiny-t5 and tiny-bart, for single, multiple and half-shared adapters.

Both models hold the same weights, with every adapter parameter set to random non-zero values (an
adapter at its identity init would hide a wrong up-projection path), and the test checks that the
adapters change the output. It also checks, from the autograd graph, that the fused model really
ran ``fused_adapter`` at every site and the unfused one never did: on CPU the PyTorch recompute
path (``_TorchAdapterFn``); one case repeats this with the Triton kernels under the interpreter.
"""

from __future__ import annotations


import pytest
import torch

from vlscale.config import load_config
from vlscale.modeling.vl_model import build_model

TASKS = ["vqa", "gqa"]
BATCH, TEXT_LEN, TARGET_LEN = 3, 7, 5
RTOL, ATOL = 1e-5, 1e-5  # fp32: same math, different op order (addmm vs matmul + add)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_config(backbone: str, sharing: str, fused: bool, half_shared: str = "down"):
    return load_config("tiny", [f"model.backbone={backbone}", "model.feature_source=cache",
                              "model.vision=tiny-clip-rn", f"data.tasks=[{','.join(TASKS)}]",
                              "peft.method=adapter", f"peft.sharing={sharing}", f"peft.half_shared={half_shared}",
                              "peft.reduction_factor=4", f"peft.fused={str(fused).lower()}"])


def make_batch(model, task: str, seed: int) -> dict:
    """A batch in the collator's layout with padded text and padded targets."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm.config.vocab_size
    side = model.grid_side
    ids = torch.randint(3, vocab, (BATCH, TEXT_LEN), generator=g)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    mask[0, -2:] = 0  # padded text
    ids[mask == 0] = model.lm.config.pad_token_id
    labels = torch.randint(3, vocab, (BATCH, TARGET_LEN), generator=g)
    labels[1, -2:] = -100  # padded target
    feats = torch.randn(BATCH, 1, side * side, model.feat_dim, generator=g)
    return {"task": task, "input_ids": ids, "attention_mask": mask, "labels": labels, "vis_feats": feats}


def perturb_adapters(model, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero random values for every adapter parameter (up-projections start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.peft.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_pair(backbone: str, sharing: str, half_shared: str = "down"):
    """(fused model, unfused model) with identical weights, adapters perturbed, in train mode."""
    torch.manual_seed(0)
    fused = build_model(make_config(backbone, sharing, True, half_shared))
    perturb_adapters(fused)
    torch.manual_seed(0)
    plain = build_model(make_config(backbone, sharing, False, half_shared))
    plain.load_state_dict(fused.state_dict())
    return fused.train(), plain.train()


def graph_node_names(tensor: torch.Tensor) -> list[str]:
    """Names of every node of the autograd graph behind ``tensor`` (each node once)."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def run_steps(model, tasks) -> dict:
    """Losses, logits, kernel-node counts of one forward+backward per task (gradients accumulate)."""
    model.zero_grad(set_to_none=True)
    out = {"loss": [], "logits": [], "fused_nodes": []}
    for i, task in enumerate(tasks):
        result = model(make_batch(model, task, seed=10 + i))
        out["loss"].append(result.loss.detach())
        out["logits"].append(result.logits.detach())
        out["fused_nodes"].append(sum("AdapterFn" in n for n in graph_node_names(result.loss)))
        result.loss.backward()
    out["grads"] = {n: (p.grad.clone() if p.grad is not None else None)
                    for n, p in model.named_parameters() if p.requires_grad}
    return out


def assert_same(fused_out: dict, plain_out: dict) -> None:
    for a, b in zip(fused_out["loss"], plain_out["loss"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(fused_out["logits"], plain_out["logits"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert fused_out["grads"].keys() == plain_out["grads"].keys()
    for name, g in fused_out["grads"].items():
        ref = plain_out["grads"][name]
        assert (g is None) == (ref is None), name
        if g is not None:
            scale = max(1.0, ref.abs().max().item())
            torch.testing.assert_close(g, ref, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")


CASES = [("tiny-t5", "single", "down"), ("tiny-t5", "multiple", "down"), ("tiny-t5", "half_shared", "down"),
         ("tiny-t5", "half_shared", "up"), ("tiny-bart", "single", "down"), ("tiny-bart", "multiple", "down"),
         ("tiny-bart", "half_shared", "down")]


@pytest.mark.parametrize("backbone,sharing,half_shared", CASES)
def test_fused_model_matches_unfused(backbone, sharing, half_shared):
    fused, plain = build_pair(backbone, sharing, half_shared)
    n_sites = len(fused.peft.sites)
    assert n_sites == 10  # 2 encoder layers x (self-attn, FFN) + 2 decoder layers x (self, cross, FFN)
    adapters = list(fused.peft.adapter.sites.values())
    assert all(a.fused for a in adapters) and not any(a.fused for a in plain.peft.adapter.sites.values())

    tasks = ["vqa", "gqa", "vqa"]  # alternate tasks: per-task weight sets accumulate their own gradients
    fused_out, plain_out = run_steps(fused, tasks), run_steps(plain, tasks)
    # Every site ran the fused kernel's autograd Function in the fused model, none in the plain one.
    assert fused_out["fused_nodes"] == [n_sites] * len(tasks)
    assert plain_out["fused_nodes"] == [0] * len(tasks)
    assert_same(fused_out, plain_out)

    # The comparison is not at identity: the perturbed adapters change the output...
    bare = build_pair(backbone, sharing, half_shared)[1]
    bare.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for a in bare.peft.adapter.sites.values():
            for name, p in a.named_parameters():
                if name.startswith("up_"):
                    p.zero_()
        identity_logits = bare(make_batch(bare, "vqa", seed=10)).logits
    assert (identity_logits - plain_out["logits"][0]).abs().max() > 1e-2
    # ...and every adapter parameter got a non-zero gradient (both tasks ran, so every set was used).
    peft_grads = {n: g for n, g in fused_out["grads"].items() if n.startswith("peft.")}
    assert len(peft_grads) == n_sites * 4 * {"single": 1, "multiple": 2, "half_shared": 1.5}[sharing]
    for name, g in peft_grads.items():
        assert g is not None and g.abs().max() > 0, name


def test_fused_is_the_default():
    cfg = load_config("tiny", ["model.feature_source=cache"])
    assert cfg.peft.method == "adapter" and cfg.peft.fused is True
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(a.fused for a in model.peft.adapter.sites.values())
    result = model(make_batch(model, cfg.data.tasks[0], seed=3))
    assert sum("AdapterFn" in n for n in graph_node_names(result.loss)) == len(model.peft.sites)


@pytest.mark.parametrize("method", ["hyperformer", "compacter"])
def test_generated_adapters_follow_peft_fused(method):
    """Hyperformer's and Compacter's generated adapters run the fused kernel under peft.fused=true (the default) and
    the plain reference under false, with the same loss and gradients (the flag was only checked for adapters)."""
    models = {}
    for fused in (True, False):
        cfg = load_config("tiny", ["model.feature_source=cache", f"data.tasks=[{','.join(TASKS)}]",
                                   f"peft.method={method}", f"peft.fused={str(fused).lower()}"])
        torch.manual_seed(0)
        models[fused] = build_model(cfg).train()
    models[False].load_state_dict(models[True].state_dict())
    n_sites = len(models[True].peft.sites)
    out = {fused: run_steps(model, ["vqa", "gqa"]) for fused, model in models.items()}
    assert out[True]["fused_nodes"] == [n_sites] * 2 and out[False]["fused_nodes"] == [0, 0]
    for a, b in zip(out[True]["loss"], out[False]["loss"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for name, g in out[True]["grads"].items():
        ref = out[False]["grads"][name]
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=RTOL, atol=ATOL * max(1.0, ref.abs().max().item()))


def test_functional_call_and_torch_func_grad_through_the_fused_model(monkeypatch):
    """torch.func.grad over functional_call of the whole model (meta-learning, per-sample gradients): the
    fused adapter's Function raised 'must override the setup_context staticmethod'. Now the gradients of
    every trainable parameter equal the unfused model's, and the fused backward ran at every site."""
    from torch.func import functional_call, grad

    from vlscale.kernels import adapter as ka

    fused, plain = build_pair("tiny-t5", "multiple")
    batch = make_batch(fused, "gqa", seed=3)
    backward_calls = []
    backward = ka._TorchAdapterFn.backward
    monkeypatch.setattr(ka._TorchAdapterFn, "backward",
                        staticmethod(lambda ctx, *g: backward_calls.append(1) or backward(ctx, *g)))
    grads = []
    for model in (fused, plain):
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        grads.append(grad(lambda p: functional_call(model, p, (batch,)).loss)(params))
    assert len(backward_calls) == len(fused.peft.sites)
    assert grads[0].keys() == grads[1].keys()
    for name, ref in grads[1].items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[0][name], ref, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")
    gqa_set = [g for n, g in grads[0].items() if n.startswith("peft.") and n.endswith("_gqa")]
    assert len(gqa_set) == 4 * len(fused.peft.sites) and all(g.abs().max() > 0 for g in gqa_set)


# ------------------------------------------------------------------------------- Triton interpreter
def test_fused_model_under_triton_interpreter_matches_unfused(triton_interpreter):
    """tests/unit/triton_interpreter_checks.py: fused_model_check (asserts the match inside)."""
    result = triton_interpreter["fused_model"]
    assert result["triton_nodes"] == result["sites"] == 10
    assert result["fused_nodes"] == [10]
