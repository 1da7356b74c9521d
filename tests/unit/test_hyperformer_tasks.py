"""Hyperformer's task embeddings are per-task parameters (the reference's ParameterDict), shared by the
encoder's and the decoder's hypernetworks: each task's own optimizer group, left out of the other tasks'
steps like every per-task weight set; an adapter saved with the earlier one-hypernetwork layout is
refused naming the cause."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.engine.trainer import optimizer_groups
from vlscale.modeling.vl_model import build_model

VOCAB = 300


def _model(seed=0):
    cfg = load_config("tiny", ["peft.method=hyperformer"])
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=VOCAB, device="cpu"), cfg


def test_each_tasks_embedding_is_its_own_parameter_and_optimizer_group():
    model, cfg = _model()
    emb = model.peft.hyperformer.task_embeddings
    names = [n for n, p in model.named_parameters() if p.requires_grad and ".task_embedding" in n]
    assert names == [f"peft.hyperformer.task_embeddings.task_embedding_{t}" for t in cfg.data.tasks]
    groups = optimizer_groups(model, cfg.data.tasks)
    tagged = {g["task"]: [id(p) for p in g["params"]] for g in groups if g.get("task")}
    assert tagged == {t: [id(getattr(emb, f"task_embedding_{t}"))] for t in cfg.data.tasks}
    assert all("weight_decay" not in g for g in groups if g.get("task"))  # the run's decay, as the one table had
    # a step of one task gives the others' embeddings no gradient; both stacks' sites reach the task's own
    for site in ("encoder_0_ffn", "decoder_0_cross_attn"):
        emb.zero_grad(set_to_none=True)
        sum(t.sum() for t in model.peft.hyperformer.weights(site, "vqa")).backward()
        assert emb.task_embedding_vqa.grad is not None and emb.task_embedding_gqa.grad is None


def test_an_adapter_of_the_earlier_one_hypernetwork_layout_is_refused_naming_it(tmp_path):
    model, cfg = _model(0)
    ckpt.save_adapter(model, tmp_path / "adapter", cfg, vocab_size=VOCAB)
    weights = tmp_path / "adapter" / ckpt.ADAPTER_WEIGHTS
    state = {n: t for n, t in load_file(str(weights)).items() if not n.startswith("peft.hyperformer.")}
    state["peft.hyperformer.hypernet.site_embedding.weight"] = torch.zeros(30, 8)  # the layout before 2026-12-03
    save_file(state, str(weights))
    with pytest.raises(ckpt.CheckpointError, match=r"adapter_model\.safetensors: a Hyperformer adapter of an "
                                                   r"earlier vlscale's layout .* train the adapter again"):
        ckpt.load_adapter(_model(1)[0], tmp_path / "adapter")
