"""NLVR2 is scored as VL-T5 / VL-Adapter score it: after one decoder step, "true" if the logit of the
true token beats the false token's (nlvr_model.py: ``pred_true = true_logit > false_logit``, the logits
at the answer's first position: T5 after the start token, BART after start + ``<s>``), never by free
generation (which can produce neither word and is then scored wrong)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_tokenizer, eval_batches
from vlscale.engine.evaluation import choice_tokens, predict_task
from vlscale.modeling.vl_model import build_model


@pytest.mark.parametrize("backbone", ["tiny-t5", "tiny-bart"])
def test_nlvr2_predictions_are_the_first_token_comparison_of_true_and_false(backbone):
    cfg = load_config("tiny", ["data.tasks=[nlvr2]", f"model.backbone={backbone}", "data.synthetic_eval=24"])
    tokenizer = build_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(tokenizer)).eval()
    prefix, (false_id, true_id) = choice_tokens(tokenizer, ("false", "true"))
    assert prefix == []  # the synthetic world's SentencePiece targets: "▁true </s>" for both backbones
    batches = list(eval_batches(cfg, tokenizer, "nlvr2", "val", batch_size=8))
    records = predict_task(model, tokenizer, batches, "nlvr2", device="cpu")
    assert len(records) == 24
    # independently: teacher-force the target "true" through the training forward (labels shifted right
    # by the LM itself) and compare the two logits where the answer's first token is predicted
    expected = []
    with torch.no_grad():
        for batch in batches:
            b = batch["input_ids"].shape[0]
            labels = torch.tensor(tokenizer("true")["input_ids"]).repeat(b, 1)
            logits = model({k: v for k, v in batch.items() if k != "labels"} | {"labels": labels}).logits
            at = logits[:, 0]
            expected += ["true" if t > f else "false" for t, f in zip(at[:, true_id], at[:, false_id])]
    assert [r["prediction"] for r in records] == expected[:24]
    assert {r["prediction"] for r in records} <= {"true", "false"}


def test_choice_tokens_skip_the_targets_shared_start():
    """A BART tokenizer starts every target with <s> (labels "<s> true </s>"): the answer's first token is
    predicted after decoder start + <s>, where the reference (VLBartNLVR) reads it."""
    vocab = {"<s>": 0, "</s>": 2, "true": 7, "false": 9, "yes": 11}

    def bart_like(text):
        return {"input_ids": [0, *[vocab[w] for w in text.split()], 2]}

    assert choice_tokens(bart_like, ("false", "true")) == ([0], [9, 7])
    assert choice_tokens(bart_like, ("yes true", "yes false")) == ([0, 11], [7, 9])


def test_choices_that_one_token_cannot_tell_apart_are_refused():
    cfg = load_config("tiny", ["data.tasks=[nlvr2]"])
    tokenizer = build_tokenizer(cfg)
    with pytest.raises(ValueError, match=r"answer choices \['true', 'true'\] cannot be told apart"):
        choice_tokens(tokenizer, ("true", "true"))


class _BartLikeTokenizer:
    """Targets as bart-base's tokenizer makes them: ``<s> ... </s>``."""

    bos_token_id, eos_token_id = 0, 2
    vocab = {"a": 5, "0": 6}

    def __call__(self, text):
        return {"input_ids": [0, *[self.vocab.get(c, 9) for c in text], 2]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in ids]


class _T5LikeTokenizer(_BartLikeTokenizer):
    bos_token_id = None

    def __call__(self, text):
        return {"input_ids": [*[self.vocab.get(c, 9) for c in text], 1]}


class _RecordingModel:
    def __init__(self):
        self.budgets, self.searches = [], []

    def generate(self, inputs, max_new_tokens, num_beams, synced_gpus=False, decode_block=None):
        self.budgets.append(max_new_tokens)
        self.searches.append((num_beams, synced_gpus))
        return torch.zeros(inputs["input_ids"].shape[0], max_new_tokens, dtype=torch.long)


@pytest.mark.parametrize("tokenizer,extra", [(_BartLikeTokenizer(), 1), (_T5LikeTokenizer(), 0)])
def test_generation_budget_does_not_count_the_targets_leading_bos(tokenizer, extra):
    """A task's max_new_tokens counts the answer's tokens. BART's targets start with <s>, which generation
    emits first: TVQA's budget of 3 left bart-base one token between <s> and the forced </s>, too few for
    "a0" if BPE splits it. Generation now gets the tokenizer's leading tokens on top."""
    from vlscale.data.tasks import get_task
    from vlscale.engine.evaluation import leading_target_tokens

    assert leading_target_tokens(tokenizer) == extra
    model = _RecordingModel()
    batch = {"task": "tvqa", "uids": ["q0", "q1"], "input_ids": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long), "references": [["a0"], ["a1"]]}
    predict_task(model, tokenizer, [batch], "tvqa", device="cpu")
    assert model.budgets == [get_task("tvqa").max_new_tokens + extra]


class _WordTokenizer:
    bos_token_id = None
    ids = {"true": 7, "false": 9}

    def __call__(self, text):
        return {"input_ids": [self.ids[text], 1]}


class _ChoosingModel:
    """next_token_logits putting each row's highest logit on the token of the word it is told to say."""

    def __init__(self, says):
        self.says = says

    def next_token_logits(self, inputs, prefix):
        logits = torch.zeros(len(self.says), 10)
        for row, word in enumerate(self.says):
            logits[row, _WordTokenizer.ids[word]] = 1.0
        return logits


def test_padding_rows_are_not_scored_and_nlvr2_groups_reach_the_consistency():
    """eval_batches pads a rank's last batch with rows marked invalid: they are no predictions (an example
    counted twice would weigh double). The records' groups give NLVR2 its consistency (Suhr et al. 2019:
    the fraction of sentences right on all of their image pairs) beside the accuracy."""
    from vlscale.engine.evaluation import score_records

    batch = {"task": "nlvr2", "uids": ["e0", "e1", "e2", "e0"], "input_ids": torch.ones(4, 3, dtype=torch.long),
             "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "references": [["true"], ["true"], ["false"], ["true"]], "groups": ["g0", "g0", "g1", "g0"],
             "valid": torch.tensor([True, True, True, False])}
    records = predict_task(_ChoosingModel(["true", "false", "false", "false"]), _WordTokenizer(), [batch],
                           "nlvr2", device="cpu")
    assert [(r["uid"], r["prediction"], r["group"]) for r in records] == \
        [("e0", "true", "g0"), ("e1", "false", "g0"), ("e2", "false", "g1")]
    scores = score_records("nlvr2", records)
    assert scores == pytest.approx({"accuracy": 2 / 3, "consistency": 0.5})  # g0 has e1 wrong, g1 is all right


def test_three_choices_two_of_which_share_the_parting_token_are_refused():
    """With more than two choices, the first position where they part can still leave two of them on one
    token: the comparison could never pick the second, so they are refused, naming them."""
    vocab = {"<s>": 0, "</s>": 2, "true": 7, "false": 9, "yes": 11}

    def bart_like(text):
        return {"input_ids": [0, *[vocab[w] for w in text.split()], 2]}

    with pytest.raises(ValueError, match=r"answer choices \['true', 'false', 'true yes'\] cannot be told apart"):
        choice_tokens(bart_like, ("true", "false", "true yes"))


def test_floating_tensors_take_the_models_dtype_and_token_ids_stay_integers():
    """Under bf16 / fp16 the batch's pixels or features are cast to the model's dtype; token ids and masks
    stay integers (an embedding lookup refuses float ids), and non-tensors pass through."""
    from vlscale.engine.evaluation import to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "valid": torch.tensor([True, False]),
             "pixel_values": torch.zeros(2, 3, 4, 4), "uids": ["q0", "q1"], "task": "vqa"}
    out = to_device(batch, "cpu", torch.bfloat16)
    assert {k: v.dtype for k, v in out.items() if isinstance(v, torch.Tensor)} == \
        {"input_ids": torch.long, "valid": torch.bool, "pixel_values": torch.bfloat16}
    assert out["uids"] == ["q0", "q1"] and out["task"] == "vqa"
    assert to_device(batch, "cpu")["pixel_values"].dtype == torch.float32  # no float_dtype: unchanged


class _SayingTokenizer(_T5LikeTokenizer):
    """Decodes every generated row as the next of ``texts``."""

    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens=True):
        return list(self.texts[:len(ids)])


def _tvqa_batch(uids, references, task="tvqa"):
    n = len(uids)
    return {"task": task, "uids": uids, "input_ids": torch.ones(n, 4, dtype=torch.long),
            "attention_mask": torch.ones(n, 4, dtype=torch.long), "references": references}


class _Batches(list):
    """eval_batches' result: this rank's batches, and the split's examples (every rank's) in the data's order."""

    def __init__(self, uids, batches, extras=None):
        super().__init__(batches)
        self.examples = [SimpleNamespace(uid=uid, references=[], extra=(extras or {}).get(uid, {})) for uid in uids]


def test_generated_records_every_row_without_a_valid_mask_stripped_and_with_listed_references():
    """A batch without ``valid`` (no padding rows) gives a record per row; the decoded text is stripped (T5 may
    decode " a0"), a uid becomes a string and a single reference string a one-item list (not its characters)."""
    batch = _tvqa_batch([137292, "q1"], ["a0", ["a1", "A park"]])
    records = predict_task(_RecordingModel(), _SayingTokenizer([" a0 ", "a1.\n"]), [batch], "tvqa", device="cpu")
    assert records == [{"uid": "137292", "prediction": "a0", "references": ["a0"]},
                       {"uid": "q1", "prediction": "a1.", "references": ["a1", "A park"]}]


def test_a_stop_request_interrupts_before_the_next_batch_naming_where():
    """``should_stop`` is asked before each batch: True raises EvaluationInterrupted saying how many batches
    were done (of how many), and no further batch is decoded."""
    from vlscale.engine.evaluation import EvaluationInterrupted

    model, asked = _RecordingModel(), []

    def should_stop():
        asked.append(1)
        return len(asked) > 1

    batches = [_tvqa_batch(["q0"], ["a0"]), _tvqa_batch(["q1"], ["a1"]), _tvqa_batch(["q2"], ["a2"])]
    with pytest.raises(EvaluationInterrupted, match=r"^evaluation of test stopped in task tvqa after 1 of 3 "
                                                    r"batches$") as info:
        predict_task(model, _SayingTokenizer(["a0"]), batches, "tvqa", device="cpu", should_stop=should_stop,
                     split="test")
    assert (info.value.split, info.value.task, info.value.done, info.value.total) == ("test", "tvqa", 1, 3)
    assert len(model.budgets) == 1  # only the first batch was decoded


def test_a_batch_of_another_task_in_a_tasks_stream_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"evaluation batch of task 'vqa' in the 'tvqa' stream"):
        predict_task(_RecordingModel(), _SayingTokenizer(["a0"]), [_tvqa_batch(["q0"], ["a0"], task="vqa")],
                     "tvqa", device="cpu")


def test_records_are_gathered_from_every_rank_in_rank_order_once_per_uid(monkeypatch):
    """One rank (no process group): its records are the result, in their order, and nothing collective runs.
    Several ranks: every rank's records in rank order, a uid two ranks give kept once, as the first one gave it."""
    import torch.distributed as dist

    from vlscale.engine.evaluation import _gather_records

    def collective(*args, **kwargs):
        raise AssertionError("all_gather_object called on a single rank")

    monkeypatch.setattr(dist, "all_gather_object", collective)
    mine = [{"uid": "q2", "prediction": "a1", "references": ["a1"]},
            {"uid": "q0", "prediction": "a0", "references": ["a2"], "group": "g"}]
    assert _gather_records([dict(r) for r in mine], 1) == mine
    ranks = [mine, [{"uid": "q1", "prediction": "a2", "references": ["a2"]},
                    {"uid": "q2", "prediction": "other", "references": ["a1"]}]]

    def all_gather_object(parts, obj):
        assert obj is ranks[0] and len(parts) == 2
        parts[:] = ranks

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert _gather_records(ranks[0], 2) == [mine[0], mine[1], ranks[1][0]]


def test_scoring_no_records_is_refused_naming_the_task():
    from vlscale.engine.evaluation import score_records

    with pytest.raises(ValueError, match=r"^no vqa examples were evaluated$"):
        score_records("vqa", [])


def test_each_task_s_prefix_and_generation_settings_are_the_reference_s():
    """VL-T5 / VL-Adapter: each task its own prefix (a shared one would merge tasks for multitask prompts and
    Hyperformer's task embedding); COCO captions decoded with 5 beams and VQA / GQA answers greedily, each up to
    transformers' max_length of 20 as multitask.py runs them (gen_max_length for captions, the config's default
    for the answers), the decoder's start token included: 19 new tokens
    (VQA answers of more than 10 tokens were cut before); the video captions the same way (multitask_video.py's
    caption_predict, gen_max_length's default of 20; 20 new tokens before);
    NLVR2 listed "false" first, so a logit tie answers "false" as the reference's true_logit > false_logit."""
    from vlscale.data.tasks import TASKS, get_task

    assert len({t.prefix for t in TASKS.values()}) == len(TASKS)
    assert all(t.prefix == f"{'nlvr' if n == 'nlvr2' else n}:" for n, t in TASKS.items())
    for task, beams in (("caption", 5), ("vqa", 1), ("gqa", 1), ("tvc", 5), ("yc2c", 5)):
        assert (get_task(task).num_beams, get_task(task).max_new_tokens) == (beams, 19), task
    assert get_task("nlvr2").choices == ("false", "true")


def test_the_qa_tasks_decode_greedily_and_an_unknown_task_is_refused_listing_the_known_ones():
    """docs/datasets.md: predictions are greedy for the QA tasks, beams are for captions only (a beam search on
    VQA/GQA answers changes the scores and costs num_beams times the decoding). A task name the registry lacks
    (a typo in data.tasks) is a KeyError naming it and every task it knows."""
    from vlscale.data.tasks import get_task

    for task in ("vqa", "gqa", "tvqa", "how2qa"):
        assert get_task(task).num_beams == 1, task
    known = "['caption', 'gqa', 'how2qa', 'nlvr2', 'tvc', 'tvqa', 'vqa', 'yc2c']"
    with pytest.raises(KeyError) as info:
        get_task("vqa2")
    assert info.value.args[0] == f"unknown task 'vqa2'; known tasks: {known}"


class _ModeRecordingModel(torch.nn.Module):
    """Generates (nothing) and notes whether it was in training mode when asked."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def generate(self, inputs, max_new_tokens, num_beams, synced_gpus=False, decode_block=None):
        self.modes.append(self.training)
        return torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.long)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_decodes_in_eval_mode_and_gives_the_model_back_in_the_mode_it_found(monkeypatch, tmp_path,
                                                                                   training):
    """Training's periodic evaluation: generation runs with dropout off, and the model goes back to the mode it
    was in (a training run left in eval mode trains on without dropout). The split is read with the run's eval
    batch size and example cap; the records are scored and written in the split's order (not the order the
    batches gave, nor the uids' text order: "q10" is not moved before "q9")."""
    import json

    import vlscale.data
    from vlscale.engine.evaluation import evaluate

    cfg = load_config("tiny", ["data.tasks=[tvqa]", "train.eval_batch_size=3", "train.eval_max_examples=5"])
    asked = []

    def fake_eval_batches(cfg_, tokenizer, task, split, batch_size, rank, world_size, max_examples,
                          require_answers=True, memo=None):
        asked.append((task, split, batch_size, rank, world_size, max_examples, require_answers))
        return _Batches(["q9", "q10", "q0"], [_tvqa_batch(["q10", "q0"], ["a1", "a0"]), _tvqa_batch(["q9"], ["a2"])])

    monkeypatch.setattr(vlscale.data, "eval_batches", fake_eval_batches)
    model = _ModeRecordingModel().train(training)
    scores = evaluate(model, cfg, _SayingTokenizer(["a1", "a0"]), split="val", show_progress=False,
                      predictions_dir=tmp_path)
    assert model.modes == [False, False] and model.training is training
    assert asked == [("tvqa", "val", 3, 0, 1, 5, True)]
    assert scores == {"tvqa": pytest.approx({"accuracy": 2 / 3})}  # q10, q0 right; q9 ("a1" for "a2") wrong
    lines = [json.loads(line) for line in (tmp_path / "tvqa.jsonl").read_text().splitlines()]
    assert [(r["uid"], r["prediction"]) for r in lines] == [("q9", "a1"), ("q10", "a1"), ("q0", "a0")]


def test_evaluate_scores_vqa_per_answer_type_from_the_split_s_examples(monkeypatch):
    """The split's VQA examples carry VQA v2's answer types (``extra["answer_type"]``): evaluate scores each
    type as the official evaluation does, beside the headline; a split without them scores the headline alone."""
    import vlscale.data
    from vlscale.engine.evaluation import evaluate

    cfg = load_config("tiny", ["data.tasks=[vqa]"])
    # every official type (an integer id, as a record's uid a string, too)
    types = {"q1": {"answer_type": "yes/no"}, "q2": {"answer_type": "yes/no"}, "q3": {"answer_type": "number"},
             137292: {"answer_type": "other"}}
    uids = ["q1", "q2", "q3", 137292]
    batch = _tvqa_batch(uids, [["yes"] * 10, ["no"] * 10, ["2"] * 10, ["red"] * 10], task="vqa")
    for extras, expected in ((types, {"vqa_score": 2 / 4, "vqa_score_number": 1.0, "vqa_score_yes_no": 0.5,
                                      "vqa_score_other": 0.0}),
                             (None, {"vqa_score": 2 / 4})):
        monkeypatch.setattr(vlscale.data, "eval_batches",
                            lambda *args, **kwargs: _Batches(uids, [batch], extras))
        scores = evaluate(_ModeRecordingModel(), cfg, _SayingTokenizer(["yes", "yes", "2", "blue"]), split="val",
                          show_progress=False)
        assert scores == {"vqa": pytest.approx(expected)}


@pytest.mark.parametrize("rank", [0, 1])
def test_on_two_ranks_rank_0_scores_and_writes_every_ranks_records_and_every_rank_returns_its_scores(
        monkeypatch, tmp_path, capsys, rank):
    """Each rank decodes its own batches; rank 0 gathers every rank's records, scores them, writes the predictions
    file and draws the progress bar; the scores it broadcasts are what every rank
    returns (a trainer's other ranks decide on them too). Rank 1 writes nothing and draws no bar."""
    import json

    import torch.distributed as dist

    import vlscale.data
    from vlscale.engine import distributed
    from vlscale.engine.evaluation import evaluate

    cfg = load_config("tiny", ["data.tasks=[tvqa]"])
    own = {0: [_tvqa_batch(["q2", "q0"], ["a1", "a0"]), _tvqa_batch(["q4"], ["a1"])],
           1: [_tvqa_batch(["q1", "q3"], ["a2", "a0"]), _tvqa_batch(["q5"], ["a1"])]}
    other = predict_task(_RecordingModel(), _SayingTokenizer(["a1", "a0"]), own[1 - rank], "tvqa", device="cpu")
    data_order = ["q5", "q4", "q3", "q2", "q1", "q0"]
    monkeypatch.setattr(vlscale.data, "eval_batches", lambda *args, **kwargs: _Batches(data_order, own[rank]))
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda parts, obj: parts.__setitem__(slice(None), [obj, other] if rank == 0 else [other, obj]))
    sent = []
    rank_0s = {"tvqa": {"accuracy": 5 / 6}}  # as rank 0 scores them below: q1 ("a1" for "a2") alone wrong
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: sent.append(obj) or rank_0s)
    scores = evaluate(_ModeRecordingModel(), cfg, _SayingTokenizer(["a1", "a0"]), split="val", rank=rank,
                      world_size=2, predictions_dir=tmp_path)
    assert scores == rank_0s and len(sent) == 1
    bar = capsys.readouterr().err
    if rank == 0:
        assert sent[0] == {"tvqa": pytest.approx(rank_0s["tvqa"])}
        lines = [json.loads(line) for line in (tmp_path / "tvqa.jsonl").read_text().splitlines()]
        assert [r["uid"] for r in lines] == data_order
        assert "eval tvqa/val" in bar and "\r" not in bar  # whole lines on a stream that is no terminal
    else:
        assert not (tmp_path / "tvqa.jsonl").exists() and "eval tvqa" not in bar


def test_the_progress_bar_and_the_heartbeat_hear_of_every_batch():
    """A split's progress bar advances one step per batch decoded, and the trainer's watchdog is fed at each batch
    (an evaluation longer than VLSCALE_WATCHDOG_TIMEOUT without a beat is taken for a hung rank and the run exits),
    with where it is for the watchdog's message."""
    class Bar:
        def __init__(self):
            self.n = 0

        def update(self, k):
            self.n += k

    bar, beats = Bar(), []
    batches = [_tvqa_batch(["q0"], ["a0"]), _tvqa_batch(["q1"], ["a1"]), _tvqa_batch(["q2"], ["a2"])]
    predict_task(_RecordingModel(), _SayingTokenizer(["a0"]), batches, "tvqa", device="cpu", progress=bar,
                 heartbeat=beats.append)
    assert bar.n == 3
    assert beats == ["evaluating tvqa batch 0", "evaluating tvqa batch 1", "evaluating tvqa batch 2"]


@pytest.mark.parametrize("synced", [True, False])
def test_generation_takes_the_tasks_beams_and_syncs_the_ranks_when_asked(synced):
    """model.generate gets the task's beam count (captions: 5) and ``synced_gpus`` as evaluate was given it: under
    ZeRO-3 on several ranks a rank whose batch finished early must keep joining the others' parameter gathers."""
    model = _RecordingModel()
    batch = _tvqa_batch(["c0", "c1"], [["a dog"], ["a cat"]], task="caption")
    predict_task(model, _SayingTokenizer(["a dog", "a cat"]), [batch], "caption", device="cpu", synced_gpus=synced)
    predict_task(model, _SayingTokenizer(["a0"]), [_tvqa_batch(["q0"], ["a0"])], "tvqa", device="cpu",
                 synced_gpus=synced)
    assert model.searches == [(5, synced), (1, synced)]


def test_evaluate_reads_the_split_with_the_given_batch_size_and_cap_and_decodes_as_asked(monkeypatch):
    """launchers/evaluate.py passes its own tasks, batch size, example cap, dtype and ``synced_gpus`` to evaluate:
    those, not the run config's, read the split (``max_examples`` over ``train.eval_max_examples``), the model's
    floating inputs take ``float_dtype``, and generation syncs the ranks (ZeRO-3 on several ranks: a rank whose
    batch finished keeps joining the others' parameter gathers, or the run hangs). Each task's scores are its own."""
    import vlscale.data
    from vlscale.engine.evaluation import evaluate

    cfg = load_config("tiny", ["data.tasks=[vqa]", "train.eval_batch_size=3", "train.eval_max_examples=5"])
    asked, seen = [], []
    own = {"tvqa": [_tvqa_batch(["q0", "q1"], ["a0", "a2"])], "how2qa": [_tvqa_batch(["h0"], ["a1"], "how2qa")]}

    def fake_eval_batches(cfg_, tokenizer, task, split, batch_size, rank, world_size, max_examples,
                          require_answers=True, memo=None):
        asked.append((task, split, batch_size, max_examples))
        return _Batches([u for b in own[task] for u in b["uids"]],
                        [dict(b, pixel_values=torch.zeros(len(b["uids"]), 2)) for b in own[task]])

    class Model(_ModeRecordingModel):
        def generate(self, inputs, max_new_tokens, num_beams, synced_gpus=False, decode_block=None):
            seen.append((inputs["pixel_values"].dtype, synced_gpus))
            return super().generate(inputs, max_new_tokens, num_beams, synced_gpus)

    monkeypatch.setattr(vlscale.data, "eval_batches", fake_eval_batches)
    scores = evaluate(Model(), cfg, _SayingTokenizer(["a0", "a1"]), split="test", tasks=["tvqa", "how2qa"],
                      batch_size=2, max_examples=4, float_dtype=torch.bfloat16, synced_gpus=True, show_progress=False)
    assert asked == [("tvqa", "test", 2, 4), ("how2qa", "test", 2, 4)]
    assert seen == [(torch.bfloat16, True), (torch.bfloat16, True)]
    assert scores == {"tvqa": pytest.approx({"accuracy": 1 / 2}), "how2qa": pytest.approx({"accuracy": 0.0})}


def test_predict_only_reads_the_split_without_answers_and_writes_each_example_s_own_references(monkeypatch, tmp_path):
    """``evaluate.py --predict-only`` (a leaderboard's test split): the split is read without requiring answers,
    nothing is scored, and the predictions file takes each example's references from the split (the batches carry
    none), [] for an unlabeled one."""
    import json

    import vlscale.data
    from vlscale.engine.evaluation import evaluate

    cfg = load_config("tiny", ["data.tasks=[tvqa]"])
    asked = []

    class Batches(list):
        examples = [SimpleNamespace(uid="q0", references=[]), SimpleNamespace(uid="q1", references=["a2"])]

    def fake_eval_batches(cfg_, tokenizer, task, split, batch_size, rank, world_size, max_examples,
                          require_answers=True, memo=None):
        asked.append(require_answers)
        return Batches([_tvqa_batch(["q1", "q0"], [[""], [""]])])

    monkeypatch.setattr(vlscale.data, "eval_batches", fake_eval_batches)
    scores = evaluate(_ModeRecordingModel(), cfg, _SayingTokenizer(["a1", "a0"]), split="test", predict_only=True,
                      show_progress=False, predictions_dir=tmp_path)
    assert asked == [False] and scores == {"tvqa": {"examples": 2, "submission": None}}
    lines = [json.loads(line) for line in (tmp_path / "tvqa.jsonl").read_text().splitlines()]
    assert lines == [{"uid": "q0", "prediction": "a0", "references": []},
                     {"uid": "q1", "prediction": "a1", "references": ["a2"]}]
