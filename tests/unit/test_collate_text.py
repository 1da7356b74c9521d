"""The collator's text side: right padding and truncation whatever the tokenizer says, labels masked
on padding only with EOS kept, and cuts at data.max_*_length counted and logged."""

import pytest

from vlscale.config import load_config
from vlscale.data import build_tokenizer
from vlscale.data import collate
from vlscale.data.collate import Collator
from vlscale.data.tasks import Example

EXAMPLES = [Example("vqa", "a", "what color is the cube", "red", ["i"]),
            Example("vqa", "b", "what", "a big red cube on the left side of the blue one", ["i"])]


@pytest.fixture()
def setup(monkeypatch):
    monkeypatch.setattr(collate, "_WARNED_TRUNCATION", set(), raising=False)
    cfg = load_config("tiny", ["data.max_input_length=8", "data.max_target_length=6"])
    return cfg, build_tokenizer(cfg)


def test_padding_and_truncation_are_on_the_right_whatever_the_tokenizer_says(setup):
    cfg, tok = setup
    right = Collator(tok, cfg).encode_text(EXAMPLES, "vqa")
    tok.padding_side = tok.truncation_side = "left"  # e.g. a tokenizer saved for decoder-only generation
    left = Collator(tok, cfg).encode_text(EXAMPLES, "vqa")
    assert (tok.padding_side, tok.truncation_side) == ("left", "left")  # restored
    for k in right:
        assert left[k].tolist() == right[k].tolist(), k
    prefix = tok("vqa:", add_special_tokens=False)["input_ids"]
    ids, labels = left["input_ids"], left["labels"]
    assert all(row[:len(prefix)] == prefix for row in ids.tolist())  # the task prefix survives the cut
    eos = tok.eos_token_id
    for row, mask in zip(labels.tolist(), (labels != -100).tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)  # -100 only after the target
        assert row[n - 1] == eos  # EOS kept, also in the cut target


def test_cut_texts_are_counted_and_logged_once_per_task(setup, caplog):
    cfg, tok = setup
    c = Collator(tok, cfg)
    with caplog.at_level("WARNING", logger="vlscale.data.collate"):
        c.encode_text(EXAMPLES, "vqa")
        c.encode_text(EXAMPLES, "vqa")
    assert c.truncated == {("vqa", "max_input_length"): 2, ("vqa", "max_target_length"): 2}
    assert caplog.text.count("data.max_input_length=8") == 1 and caplog.text.count("data.max_target_length=6") == 1
    assert "example 'b'" in caplog.text
    caplog.clear()
    short = [Example("vqa", "c", "what", "red", ["i"])]
    with caplog.at_level("WARNING", logger="vlscale.data.collate"):
        c.encode_text(short, "gqa")
    assert "gqa" not in caplog.text and ("gqa", "max_input_length") not in c.truncated
    with caplog.at_level("WARNING", logger="vlscale.data.collate"):  # another task's first cut is logged too
        c.encode_text([Example("gqa", "g", EXAMPLES[0].text, "red", ["i"])] * 2, "gqa")
    assert caplog.text.count("gqa: 2 of 2 inputs in a batch are longer than data.max_input_length=8") == 1


def test_a_text_exactly_at_the_limit_is_not_counted_as_cut(setup, caplog):
    cfg, tok = setup  # data.max_input_length=8
    whole = [Example("vqa", "c", "what color is it", "red", ["i"])]
    assert len(tok("vqa: what color is it")["input_ids"]) == 8  # prefix, text and EOS: the model sees all of it
    c = Collator(tok, cfg)
    with caplog.at_level("WARNING", logger="vlscale.data.collate"):
        enc = c.encode_text(whole, "vqa")
    assert enc["input_ids"].shape[1] == 8 and ("vqa", "max_input_length") not in c.truncated
    assert "longer than" not in caplog.text


def test_an_example_without_references_is_scored_against_its_target(setup):
    """``references`` (what the scorer compares with) default to the target where a loader gives none."""
    import torch

    cfg, tok = setup
    examples = [Example("vqa", "a", "what", "red", ["i"], references=["red", "maroon"]),
                Example("vqa", "b", "what", "blue", ["i"])]
    batch = Collator(tok, cfg)(examples, [[torch.zeros(4, 8)], [torch.zeros(4, 8)]])
    assert batch["references"] == [["red", "maroon"], ["blue"]]
    assert batch["targets"] == ["red", "blue"]


def test_a_batch_is_padded_to_its_longest_text_and_every_cut_example_counted(setup):
    """Inputs and labels are as wide as the batch's longest (not data.max_*_length); two examples cut in one
    batch count as two."""
    cfg, tok = setup  # data.max_input_length=8, max_target_length=6
    c = Collator(tok, load_config("tiny", ["data.max_input_length=64", "data.max_target_length=64"]))
    enc = c.encode_text(EXAMPLES, "vqa")
    longest = max(len(tok(f"vqa: {e.text}")["input_ids"]) for e in EXAMPLES)
    assert enc["input_ids"].shape[1] == longest < 64
    assert enc["labels"].shape[1] == max(len(tok(e.target)["input_ids"]) for e in EXAMPLES) < 64
    both = [Example("vqa", u, "what color is the cube on the left", "red", ["i"]) for u in ("c", "d")]
    cut = Collator(tok, cfg)
    cut.encode_text(both, "vqa")
    assert cut.truncated == {("vqa", "max_input_length"): 2}


def test_a_caption_s_input_is_the_task_prefix_alone(setup, monkeypatch):
    """An example without text is given to the tokenizer as the prefix alone ('caption:'): no trailing space, which
    a byte-level BPE tokenizer (BART's) would encode as a token of its own."""
    cfg, tok = setup
    seen = []
    call = type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(text)
        return call(self, text, *args, **kwargs)
    monkeypatch.setattr(type(tok), "__call__", spy)
    Collator(tok, cfg).encode_text([Example("caption", "c", "", "a red cube", ["i"]),
                                    Example("caption", "d", "look", "a blue cube", ["i"])], "caption")
    assert seen[0] == ["caption:", "caption: look"]
