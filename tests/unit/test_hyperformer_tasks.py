"""Hyperformer's task embeddings are per-task parameters (the reference's ParameterDict): each task's
own optimizer group, left out of the other tasks' steps like every per-task weight set; an adapter
saved with the earlier one-table layout loads onto today's model."""

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
    hyper = model.peft.hyperformer.hypernet
    names = [n for n, p in model.named_parameters() if p.requires_grad and ".task_embedding" in n]
    assert names == [f"peft.hyperformer.hypernet.task_embedding_{t}" for t in cfg.data.tasks]
    groups = optimizer_groups(model, cfg.data.tasks)
    tagged = {g["task"]: [id(p) for p in g["params"]] for g in groups if g.get("task")}
    assert tagged == {t: [id(getattr(hyper, f"task_embedding_{t}"))] for t in cfg.data.tasks}
    assert all("weight_decay" not in g for g in groups if g.get("task"))  # the run's decay, as the one table had
    # a step of one task gives the others' embeddings no gradient
    model.peft.set_task("vqa")
    w = model.peft.hyperformer.weights("encoder_0_ffn", "vqa")
    sum(t.sum() for t in w).backward()
    assert hyper.task_embedding_vqa.grad is not None and hyper.task_embedding_gqa.grad is None


def test_an_adapter_with_the_earlier_task_embedding_table_loads(tmp_path):
    model, cfg = _model(0)
    ckpt.save_adapter(model, tmp_path / "adapter", cfg, vocab_size=VOCAB)
    weights = tmp_path / "adapter" / ckpt.ADAPTER_WEIGHTS
    state = load_file(str(weights))
    prefix = "peft.hyperformer.hypernet."
    rows = [state.pop(f"{prefix}task_embedding_{t}") for t in cfg.data.tasks]
    state[f"{prefix}task_embedding.weight"] = torch.cat(rows)  # the layout before per-task parameters
    save_file(state, str(weights))
    fresh, _ = _model(1)
    ckpt.load_adapter(fresh, tmp_path / "adapter")
    for t, row in zip(cfg.data.tasks, rows):
        assert torch.equal(getattr(fresh.peft.hyperformer.hypernet, f"task_embedding_{t}").detach(), row)
    saved = dict(model.named_parameters())
    assert all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters() if p.requires_grad)
