"""The training loop's input checks and gradient equivalences that need no DeepSpeed engine."""

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.engine.trainer import _plain_grad_norm, check_something_trains, lr_multiplier, optimizer_groups
from vlscale.modeling.vl_model import is_checkpointing

TINY = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false", "model.vision_pretrained=null",
        "model.feature_source=images", "data.tasks=[vqa,gqa]", "data.synthetic_train=16", "data.synthetic_eval=4",
        "train.precision=fp32", "train.seed=3"]
NOTHING = ["peft.method=none", "peft.train_layer_norms=false", "peft.train_projection=false"]


def test_a_run_that_trains_nothing_is_refused_in_one_line_before_anything_loads():
    """Was a ValueError from optimizer_groups, after the model was built: a traceback."""
    with pytest.raises(ConfigError, match=r"nothing to train: peft\.method=none .*peft\.train_projection"):
        check_something_trains(load_config("tiny", TINY + NOTHING))
    for extra in (["peft.train_projection=true"], ["peft.extra_prompts=true"],
                  ["peft.train_lm=true", "peft.train_layer_norms=true"]):  # (train_lm with norms frozen: refused)
        check_something_trains(load_config("tiny", TINY + NOTHING + extra))  # something trains: accepted
    check_something_trains(load_config("tiny", TINY))

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        optimizer_groups(frozen)


def test_gradient_checkpointing_keeps_bart_lora_gradients_with_dropout():
    """BART with LoRA at the paper's dropout (0.1) and the model's dropout on: checkpointing recomputes each
    layer with the dropout masks of the first pass, so gradients equal those of a run without it
    (tests/integration/test_engine.py covers T5 with adapters, without dropout)."""
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    grads = []
    for gc in (False, True):
        cfg = load_config("tiny", TINY + ["model.backbone=tiny-bart", "model.dropout=0.1", "peft.method=lora",
                                          "peft.lora_rank=4", "peft.lora_dropout=0.1", "peft.sharing=multiple",
                                          "train.micro_batch_size=2", f"train.gradient_checkpointing={gc}"])
        tok = build_tokenizer(cfg)
        seed_everything(0)
        model = build_model(cfg, vocab_size=len(tok))
        with torch.no_grad():  # LoRA's B starts at zero: move it so A's gradients are not all zero
            for n, p in model.named_parameters():
                if p.requires_grad and "lora" in n:
                    p.add_(0.05 * torch.randn_like(p))
        model.train()
        batch = next(build_train_loader(cfg, tok, 0, 1))
        torch.manual_seed(5)
        model(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert is_checkpointing(model.lm) == gc
    assert grads[0].keys() == grads[1].keys()
    assert sum("lora" in n for n in grads[0]) >= 8
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_zero0_gradient_norm_finds_the_trainable_parameters_once():
    """It walked the whole model (CLIP, the LM, every frozen parameter) each step to find the trainable ones:
    about a millisecond of a 40 ms tiny step at ZeRO-0, the largest part of the loop's own work there."""
    from types import SimpleNamespace

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model(torch.randn(5, 3)).square().sum().backward()
    run = SimpleNamespace(model=model, trainable=None)
    norm = _plain_grad_norm(run)
    assert float(norm) == pytest.approx(float(torch.cat([p.grad.flatten() for p in model[1].parameters()]).norm()))

    def walked(*args, **kwargs):
        raise AssertionError("the model was walked again for its trainable parameters")

    model.named_parameters = walked
    assert _plain_grad_norm(run) == norm


@pytest.mark.parametrize("total, ratio, warmup", [(10, 0.25, 3), (10, 0.0, 0), (4, 0.1, 1)])
def test_the_lr_schedule_warms_up_over_the_ceiling_of_its_share_then_decays_linearly(total, ratio, warmup):
    """Linear warm-up to 1 over ceil(warmup_ratio x total) updates, then linear decay towards 0; no update runs
    at lr 0 (lr_multiplier's docstring)."""
    f = lr_multiplier(total, ratio)
    lrs = [f(s) for s in range(total)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup:] == pytest.approx([(total - s) / (total - warmup) for s in range(warmup, total)])
    assert max(lrs) == pytest.approx(1.0) and min(lrs) > 0
