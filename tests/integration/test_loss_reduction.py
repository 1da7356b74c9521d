"""``train.loss_reduction=example``: the step's loss is the mean over examples of each example's token
mean (VL-T5 / VL-Adapter's ``train_step``), on 2 ranks as on one; the default ``token`` is the mean over
the global batch's target tokens. Captions have targets of many lengths, so the two differ."""

from __future__ import annotations

import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader
from vlscale.engine.trainer import seed_everything
from vlscale.modeling.vl_model import build_model

ARGS = ["data.tasks=[caption]", "train.max_steps=1", "train.micro_batch_size=4", "train.zero_stage=0"]


def _first_batch_losses(h) -> tuple[float, float]:
    """(per-example mean, per-token mean) of the first global batch (8 examples) on the model as built."""
    cfg = load_config("tiny", h.TINY + ARGS + ["train.micro_batch_size=8"])
    tok = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab_size=len(tok)).train()
    batch = next(build_train_loader(cfg, tok, 0, 1))
    with torch.no_grad():
        logits = model(batch).logits
    per_example, tokens, total = [], 0, 0.0
    for row_logits, row_labels in zip(logits, batch["labels"]):
        keep = row_labels != -100
        ce = torch.nn.functional.cross_entropy(row_logits[keep].float(), row_labels[keep], reduction="sum").item()
        per_example.append(ce / int(keep.sum()))
        tokens, total = tokens + int(keep.sum()), total + ce
    assert len(set(int(n) for n in (batch["labels"] != -100).sum(1))) > 1, "targets of one length: no difference"
    return sum(per_example) / len(per_example), total / tokens


def test_example_reduction_is_the_mean_of_per_example_means_on_two_ranks(tmp_path, h):
    by_example, by_token = _first_batch_losses(h)
    assert abs(by_example - by_token) > 1e-3
    for reduction, expected in (("example", by_example), ("token", by_token)):
        out = tmp_path / reduction
        h.launch(h.TINY + ARGS + [f"train.loss_reduction={reduction}", f"output_dir={out}"], nproc=2)
        assert h.read_log(out)[0]["loss"] == pytest.approx(expected, rel=1e-5), reduction


def test_an_unknown_reduction_is_refused():
    from vlscale.config import ConfigError

    with pytest.raises(ConfigError, match="train.loss_reduction"):
        load_config("tiny", ["train.loss_reduction=mean"])


def test_sampled_vqa_targets_weigh_the_logged_loss_by_the_answers_scores(tmp_path, h):
    """data.vqa_targets=sampled on the real-format VQA fixture (soft labels {"2": 1.0, "3": 0.3},
    {"red": 1.0, "blue": 1.0} and one without a scored answer): the first step's logged loss is the mean over
    the batch of each example's token mean times its drawn answer's score."""
    root = h.ROOT / "tests" / "fixtures" / "real_data"
    args = [*h.TINY, "data.source=real", f"data.root={root}", "data.tasks=[vqa]", "train.zero_stage=0",
            "train.micro_batch_size=3", "train.max_steps=1", "train.loss_reduction=example",
            "data.vqa_targets=sampled"]
    cfg = load_config("tiny", args)
    tok = build_tokenizer(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab_size=len(tok)).train()
    batch = next(build_train_loader(cfg, tok, 0, 1))
    weights = batch.pop("loss_weights")
    assert sorted(weights.tolist()) != [1.0, 1.0, 1.0]
    with torch.no_grad():
        logits = model(batch).logits
    total = 0.0
    for row_logits, row_labels, w in zip(logits, batch["labels"], weights):
        keep = row_labels != -100
        total += float(w) * torch.nn.functional.cross_entropy(row_logits[keep].float(), row_labels[keep]).item()
    out = tmp_path / "run"
    h.launch(args + [f"output_dir={out}"])
    assert h.read_log(out)[0]["loss"] == pytest.approx(total / 3, rel=1e-5)
