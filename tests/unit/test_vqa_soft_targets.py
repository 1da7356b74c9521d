"""``data.vqa_targets=sampled``: VQA targets drawn from the soft label in proportion to the scores, the
score as the example's loss weight (VL-T5's VQA dataset + train_step)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlscale.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from vlscale.data import build_tokenizer, build_train_loader, sampled_vqa_targets
from vlscale.data.tasks import Example
from vlscale.engine.trainer import _example_cross_entropy_sum

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"


def _vqa(uid, label):
    extra = {} if label is None else {"label": label}
    return Example("vqa", uid, "q?", "best", ["img"], ["best"], extra)


def test_targets_are_drawn_in_proportion_to_the_scores_with_the_score_as_weight():
    examples = [_vqa("a", {"2": 1.0, "3": 0.3}), _vqa("b", {}), _vqa("c", None), _vqa("d", {"x": 0.0, "y": 0.6}),
                _vqa("e", {"x": 0.0})]
    drawn = Counter()
    for step in range(3000):
        out, weights = sampled_vqa_targets(examples, seed=0, step=step)
        assert [e.uid for e in out] == ["a", "b", "c", "d", "e"]
        assert weights[0] == {"2": 1.0, "3": 0.3}[out[0].target]
        assert (out[1].target, weights[1]) == ("", 0.0)  # no scored answer: weight 0, as the reference
        assert (out[2].target, weights[2]) == ("best", 1.0)  # no label (the synthetic world): unchanged
        assert (out[3].target, weights[3]) == ("y", 0.6)  # a 0-score answer is never drawn
        assert (out[4].target, weights[4]) == ("", 0.0)  # only 0-score answers: none scored
        drawn[out[0].target] += 1
    assert drawn["2"] / 3000 == pytest.approx(1.0 / 1.3, abs=0.025)
    assert sampled_vqa_targets(examples, 0, 7) == sampled_vqa_targets(examples, 0, 7)  # keyed: same on every rank


def test_a_real_vqa_batch_carries_the_weights_of_its_drawn_answers():
    cfg = RunConfig(data=DataConfig(tasks=["vqa"], source="real", root=str(ROOT), vqa_targets="sampled"),
                    train=TrainConfig(loss_reduction="example", micro_batch_size=3))
    loader = build_train_loader(cfg, build_tokenizer(cfg))
    labels = {e.uid: e.extra["label"] for e in loader.examples["vqa"]}
    seen = set()
    for _ in range(6):
        batch = next(loader)
        assert batch["loss_weights"].shape == (3,)
        for uid, target, w in zip(batch["uids"], batch["targets"], batch["loss_weights"].tolist()):
            assert w == pytest.approx(labels[uid].get(target, 0.0)), (uid, target, w)
            seen.add(target)
    assert {"", "2", "red"} <= seen or {"", "2", "blue"} <= seen


def test_training_examples_without_a_soft_label_are_said_under_sampled_targets(caplog):
    """An HF dataset read through its one ``answer`` column has no soft label: under data.vqa_targets=sampled
    its examples train on their target at weight 1, which one warning says, with how many and where from. Not said
    when the rows have their ``answers`` (labels scored from them), under data.vqa_targets=best, or for the
    synthetic world."""
    hf = str(ROOT.parent / "hf_multi")
    answer = {"image": "image", "image_id": "image_name", "question": "question", "answer": "multiple_choice_answer",
              "id": "qid"}
    answers = {**{k: v for k, v in answer.items() if k != "answer"}, "answers": "answers"}

    def said(columns, targets):
        cfg = RunConfig(data=DataConfig(tasks=["vqa"], source="real", hf_dataset=hf, hf_columns=columns,
                                        vqa_targets=targets), train=TrainConfig(loss_reduction="example"))
        return _warnings(caplog, lambda: build_train_loader(cfg, None))

    assert said(answer, "sampled") == [
        f"data.vqa_targets=sampled: 3 of 3 vqa training examples ({hf}[train]) have no soft 'label' (VL-T5's VQA "
        "files do; data.hf_dataset rows without an answers column do not), so they train on their target at weight "
        "1, as data.vqa_targets=best does"]
    assert said(answers, "sampled") == [] and said(answer, "best") == []
    synthetic = load_config("tiny", ["data.tasks=[vqa]", "data.vqa_targets=sampled", "train.loss_reduction=example",
                                     "data.synthetic_train=8"])
    loaders = []
    assert _warnings(caplog, lambda: loaders.append(build_train_loader(synthetic, None))) == []
    assert all(e.extra.get("label") is None for e in loaders[0].examples["vqa"])  # none of them has one
    # ... though their 10 annotators disagree (7-10 give the gold): each trains on the majority answer at weight 1,
    # said at INFO, without claiming one answer per question
    vqa = loaders[0].examples["vqa"]
    assert any(len(set(e.references)) > 1 for e in vqa)
    assert all(e.target == Counter(e.references).most_common(1)[0][0] for e in vqa)
    assert _warnings(caplog, lambda: build_train_loader(synthetic, None), logging.INFO) == [
        "data.vqa_targets=sampled: the synthetic world's questions carry no soft 'label' (their target is the "
        "majority of their 10 annotators' answers), so training draws that target at weight 1, as "
        "data.vqa_targets=best does"]
    assert _warnings(caplog, lambda: build_train_loader(load_config("tiny", [
        "data.tasks=[vqa]", "data.synthetic_train=8"]), None), logging.INFO) == []


def _warnings(caplog, build, level=logging.WARNING) -> list[str]:
    caplog.clear()
    with caplog.at_level(level, logger="vlscale.data"):
        build()
    return [r.getMessage() for r in caplog.records if "vqa_targets" in r.getMessage()]


def test_weights_multiply_each_examples_mean_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g)
    labels = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6], [-100, -100, -100, -100]])
    w = torch.tensor([0.3, 1.0, 0.0])
    means = [torch.nn.functional.cross_entropy(logits[i][labels[i] != -100], labels[i][labels[i] != -100])
             for i in range(2)]
    expected = 0.3 * means[0] + 1.0 * means[1]
    torch.testing.assert_close(_example_cross_entropy_sum(logits, labels, w), expected)


def test_sampled_targets_need_per_example_losses():
    with pytest.raises(ConfigError, match="data.vqa_targets=sampled .* set train.loss_reduction=example"):
        load_config("tiny", ["data.vqa_targets=sampled"])
    load_config("tiny", ["data.vqa_targets=sampled", "train.loss_reduction=example"])


def test_soft_labels_from_human_answers_score_as_lxmert_and_vlt5():
    from vlscale.data.vqa import vqa_soft_label

    answers = ["red"] * 5 + ["Red."] + ["blue"] * 2 + ["three"] + ["dark red"]
    assert vqa_soft_label(answers) == {"red": 1.0, "blue": 0.6, "3": 0.3, "dark red": 0.3}
    assert vqa_soft_label(["yes"] * 3) == {"yes": 0.9}
    assert vqa_soft_label(["yes", "yes", "", "the", "."]) == {"yes": 0.6}  # nothing left after normalising: no answer


def _step_targets(world_size: int, steps: int) -> list[list[tuple[str, str]]]:
    """Each step's (uid, drawn target) pairs, gathered from every rank (global batch 12 of 3 questions)."""
    cfg = RunConfig(data=DataConfig(tasks=["vqa"], source="real", root=str(ROOT), vqa_targets="sampled"),
                    train=TrainConfig(loss_reduction="example", micro_batch_size=12 // world_size))
    loaders = [build_train_loader(cfg, build_tokenizer(cfg), rank, world_size) for rank in range(world_size)]
    out = []
    for _ in range(steps):
        pairs = []
        for loader in loaders:
            batch = next(loader)
            pairs += list(zip(batch["uids"], batch["targets"]))
        out.append(sorted(pairs))
    return out


def test_a_question_repeated_in_one_step_gets_a_draw_per_copy_the_same_on_any_number_of_ranks():
    """3 questions in a global batch of 12: each comes 4 times a step. The reference draws an answer for
    every copy; keyed by uid alone, every copy of "red"/"blue" (scores 1.0/1.0) said the same."""
    one, two = _step_targets(1, 6), _step_targets(2, 6)
    assert one == two
    mixed = [len({t for uid, t in step if t in ("red", "blue")}) == 2 for step in one]
    assert any(mixed), one
