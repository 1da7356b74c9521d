"""``train.peft_lr``: the PEFT weights' own learning rate. Their optimizer groups stand apart from the layer
norms', the projection's and the backbone's (which keep ``train.lr``), in the engine and in the memory
model alike; without it the groups are what they were. (The schedule and ZeRO-3 resume: test_zero3.py and
test_engine.py, whose single-adapter runs set it.)"""

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.engine.trainer import logged_lr_groups, optimizer_groups
from vlscale.modeling.vl_model import build_model
from vlscale.profiling.analytic import default_vocab_size, parameter_inventory


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=default_vocab_size(cfg), device="cpu")


def test_the_setting_is_checked():
    assert load_config("tiny").train.peft_lr is None
    assert load_config("tiny", ["train.peft_lr=3e-3"]).train.peft_lr == pytest.approx(3e-3)
    for bad, said in (("0", "0.0 must be > 0"), ("-1e-3", "-0.001 must be > 0"), (".nan", "nan must be a finite")):
        with pytest.raises(ConfigError, match=rf"train\.peft_lr={said}"):
            load_config("tiny", [f"train.peft_lr={bad}"])
    with pytest.raises(ConfigError, match=r"train\.peft_lr=0\.003 .*peft\.method=none adds none"):
        load_config("tiny", ["peft.method=none", "train.peft_lr=3e-3"])
    # extra prompts are PEFT weights of their own: peft_lr is theirs under peft.method=none
    assert load_config("tiny", ["peft.method=none", "peft.extra_prompts=true", "train.peft_lr=3e-3"]).train.peft_lr == 3e-3


@pytest.mark.parametrize("sharing", ["single", "multiple"])
def test_the_peft_weights_and_only_they_train_at_peft_lr(sharing):
    cfg = load_config("tiny", [f"peft.sharing={sharing}", "peft.method=adapter", "train.peft_lr=3e-3"])
    model = _model(cfg)
    tasks = cfg.data.tasks
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    plain, split = optimizer_groups(model, tasks), optimizer_groups(model, tasks, cfg.train.peft_lr)
    for groups in (plain, split):  # every trainable parameter once
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(trainable)
    assert not any("peft" in g or "lr" in g for g in plain)
    peft = [g for g in split if g.get("peft")]
    rest = [g for g in split if not g.get("peft")]
    assert peft and rest, "adapters and layer norms / projection both train in the tiny preset"
    assert all(g["lr"] == 3e-3 for g in peft) and not any("lr" in g for g in rest)
    assert all(names[id(p)].startswith("peft.") for g in peft for p in g["params"])
    assert not any(names[id(p)].startswith("peft.") for g in rest for p in g["params"])
    # each task's own weight sets are PEFT weights: tagged with their task in both layouts alike
    tagged = [(g["task"], [id(p) for p in g["params"]]) for g in plain if "task" in g]
    assert tagged == [(g["task"], [id(p) for p in g["params"]]) for g in split if "task" in g]
    assert bool(tagged) == (sharing == "multiple")
    assert all(g.get("peft") for g in split if "task" in g)
    # weight decay as before: matrices decay, vectors do not
    for g in split:
        assert all(p.dim() >= 2 for p in g["params"]) == ("weight_decay" not in g)
    assert logged_lr_groups(split) == {"lr": split.index(rest[0]), "peft_lr": split.index(peft[0])}
    assert logged_lr_groups(plain) == {"lr": 0}


@pytest.mark.parametrize("extra", [[], ["train.peft_lr=3e-3"], ["peft.sharing=multiple", "train.peft_lr=3e-3"],
                                   ["model.backbone=tiny-bart", "peft.method=lora", "train.peft_lr=3e-3"]])
def test_the_memory_model_groups_the_parameters_as_the_engine_does(extra):
    """The optimizer state's padding and Adam's temporaries are per group: the profiler's groups must be
    the engine's, element for element."""
    cfg = load_config("tiny", extra)
    groups = optimizer_groups(_model(cfg), cfg.data.tasks, cfg.train.peft_lr)
    engine = [[p.numel() for p in g["params"]] for g in groups]
    assert parameter_inventory(cfg).optimizer_groups() == engine
    assert [t for t, _ in parameter_inventory(cfg).tagged_optimizer_groups()] == [g.get("task") for g in groups]


def test_only_peft_weights_in_the_run_logs_no_base_rate():
    """With the layer norms and the projection frozen only PEFT weights train: train_log.jsonl's ``lr`` is
    null (nothing trains at train.lr), ``peft_lr`` the adapters' rate."""
    cfg = load_config("tiny", ["peft.train_layer_norms=false", "peft.train_projection=false", "train.peft_lr=3e-3"])
    groups = optimizer_groups(_model(cfg), cfg.data.tasks, cfg.train.peft_lr)
    assert all(g.get("peft") for g in groups)
    assert logged_lr_groups(groups) == {"lr": None, "peft_lr": 0}
