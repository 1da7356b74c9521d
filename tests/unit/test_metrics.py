"""Metrics: the official VQA normalisation and leave-one-out accuracy on hand-checked cases, CIDEr-D
on hand-computed cases and against pycocoevalcap, caption metrics with and without Java, and
score_task for every task."""

import errno
import logging
import math
import os
import random
import re

import pytest

from vlscale.data.tasks import TASKS
from vlscale.metrics import (accuracy, caption_scores, cider, cider_per_image, consistency, exact_match,
                             normalize_answer, normalize_vqa_answer, score_task, vqa_score)
from vlscale.metrics import captioning
from vlscale.metrics.cider import tokenize


# ----------------------------------------------------------------------------- VQA normalisation

@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),                       # number words -> digits, after lowercasing
    ("none", "0"),
    ("a dog", "dog"),                   # articles dropped
    ("The Cat", "cat"),
    ("yes.", "yes"),                    # a period not followed by a digit is removed
    ("3.5", "3.5"),                     # ... one before a digit stays
    ("1,000", "1000"),                  # comma between digits: punctuation deleted, not spaced
    ("yes, it is", "yes it is"),        # punctuation touching a space is deleted
    ("black-and-white", "black and white"),  # otherwise replaced by a space
    ("red/blue", "red blue"),
    ("hot dog!", "hot dog"),
    ("dont", "don't"),                  # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("  Tennis\tracket ", "tennis racket"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_normalisation_comma_rule_applies_to_all_punctuation():
    # A digit,digit comma anywhere makes every punctuation mark vanish without a space.
    assert normalize_vqa_answer("1,000-ish") == "1000ish"
    assert normalize_vqa_answer("1000-ish") == "1000 ish"


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(k, expected):
    # k of the 10 answers match. Each matching answer left out leaves k-1 matches, each other one
    # leaves k: acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
    # k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;  k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * k + ["dog", "bird", "cow", "fish", "ant", "bee", "owl", "yak", "elk", "emu"][: 10 - k]
    assert vqa_score("cat", answers) == pytest.approx(expected)


def test_vqa_score_normalises_both_sides():
    assert vqa_score("Two", ["2"] * 10) == 1.0
    assert vqa_score("2", ["two", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_score("yes.", ["yes"] * 10) == 1.0
    assert vqa_score("1000", ["1,000"] * 2 + ["100"] * 8) == pytest.approx(0.6)
    assert vqa_score("no", ["yes"] * 10) == 0.0


def test_vqa_official_quirks_normalise_the_answers_as_the_script_does():
    # The official script (GT-Vision-Lab vqaEval.py, and VL-T5's VQAEvaluator.evaluate_raw) always
    # normalises the prediction fully, leaves 10 identical answers as they are, and gives differing
    # ones the punctuation pass only (no number words, articles or contractions).
    assert vqa_score("yes.", ["yes"] * 10, official_quirks=True) == 1.0   # the prediction is normalised
    assert vqa_score("yes", ["Yes"] * 10, official_quirks=True) == 0.0    # identical answers are not
    assert vqa_score("yes.", ["yes"] * 9 + ["no"], official_quirks=True) == 1.0
    assert vqa_score("two", ["two"] * 3 + ["cat"] * 7, official_quirks=True) == 0.0  # "two" -> "2" only on the prediction
    assert vqa_score("two", ["two"] * 3 + ["cat"] * 7) == pytest.approx(0.9)        # vlscale's default: both sides
    assert vqa_score("black and white", ["black-and-white"] * 3 + ["cat"] * 7, official_quirks=True) == pytest.approx(0.9)


def test_vqa_score_edge_cases():
    assert vqa_score("Dog", ["dog"]) == 1.0  # one answer: exact match after normalisation
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_score("dog", [])
    with pytest.raises(TypeError, match=r"^vqa_score: answers must be a list of strings, got str$"):
        vqa_score("dog", "dog")


def test_vqa_normalisation_looks_for_spaces_in_the_answer_as_given():
    """As the official script: whether a punctuation mark touches a space is read from the answer before any
    mark was replaced (a "/" turned into a space does not make the "-" after it deleted), and a newline or tab
    is a space there (the script replaces them first)."""
    assert normalize_vqa_answer("red/-blue-green") == "red blue green"
    assert normalize_vqa_answer("x-ray\t-ish") == normalize_vqa_answer("x-ray\n-ish") == "xray ish"


def test_vqa_accuracy_is_the_mean_over_the_predicted_ids_and_refuses_none():
    """References of ids without a prediction do not count in the mean; no predictions is refused, not a
    ZeroDivisionError, and an id without references is named as the other metrics name it."""
    from vlscale.metrics import vqa_accuracy

    refs = {"1": ["two"] * 10, "2": ["cat"] * 10, "3": ["dog"] * 10}
    assert vqa_accuracy({"1": "2"}, refs) == 1.0
    assert vqa_accuracy({"1": "2", "2": "dog"}, refs) == 0.5
    with pytest.raises(ValueError, match="^vqa_accuracy: no predictions to score$"):
        vqa_accuracy({}, refs)
    with pytest.raises(KeyError, match="vqa_accuracy: prediction id '9' is not in the references"):
        vqa_accuracy({"9": "2"}, refs)  # was a bare KeyError('9')
    with pytest.raises(ValueError, match="^vqa_accuracy: id '1' has no references to compare its prediction '2' with$"):
        vqa_accuracy({"1": "2"}, {"1": []})


@pytest.mark.parametrize("word, digit", [("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
                                         ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"),
                                         ("ten", "10")])
def test_vqa_normalisation_maps_every_number_word_of_the_script(word, digit):
    # the official script's manualMap: none/zero..ten (and no number word above ten: "eleven" stays)
    assert normalize_vqa_answer(word.capitalize()) == digit


def test_vqa_normalisation_drops_every_article_and_reads_spaces_on_both_sides_of_a_mark():
    assert (normalize_vqa_answer("an apple") == normalize_vqa_answer("the apple") == normalize_vqa_answer("a apple")
            == "apple")
    assert normalize_vqa_answer("eleven") == "eleven"
    # a mark followed by a space is deleted everywhere in the answer, as one preceded by a space
    assert normalize_vqa_answer("x-ray- ish") == "xray ish"
    # a comma after a digit but before a letter is not a "digit,digit" comma: marks become spaces
    assert normalize_vqa_answer("2,blue-green") == "2 blue green"


def test_vqa_two_answers_score_by_leave_one_out_not_exact_match():
    # only a single answer has no leave-one-out subset; with two, each subset holds one answer:
    # "cat" vs ["cat", "dog"]: leaving "cat" out leaves 0 matches, leaving "dog" out leaves 1 -> (0 + 1/3) / 2
    assert vqa_score("cat", ["cat", "dog"]) == pytest.approx(1 / 6)
    assert vqa_score("dog", ["cat", "dog"]) == pytest.approx(1 / 6)


def test_vqa_official_quirks_strip_the_answers_before_comparing_them_as_written():
    # the script strips each answer (and turns newlines and tabs into spaces) before the all-identical check
    assert vqa_score("yes", ["yes "] * 10, official_quirks=True) == 1.0
    assert vqa_score("yes", ["\tyes\n"] * 10, official_quirks=True) == 1.0
    assert vqa_score("red and white", ["red\tand\nwhite"] * 10, official_quirks=True) == 1.0


# ----------------------------------------------------------------------------- CIDEr-D

def test_cider_hand_computed():
    # Two images, one reference each; N = 2 so every reference n-gram has idf log(2) (df = 1) and
    # so has an unseen candidate n-gram (df 0 -> log(max(1, 0)) = 0).
    # Image 1: candidate == reference "a b": cos = 1 for n = 1, 2; no 3-, 4-grams -> 0.
    #          score = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 2: "c e" vs "c d": unigram dot = L^2 (only c shared), norms sqrt(2) L each -> 0.5;
    #          bigrams differ -> 0. score = 10 * 0.5 / 4 = 1.25.  CIDEr-D = (5 + 1.25) / 2 = 3.125.
    preds = {"img1": "a b", "img2": "c e"}
    refs = {"img1": ["a b"], "img2": ["c d"]}
    per = cider_per_image(preds, refs)
    assert per["img1"] == pytest.approx(5.0)
    assert per["img2"] == pytest.approx(1.25)
    assert cider(preds, refs) == pytest.approx(3.125)


def test_cider_clipping_and_length_penalty():
    # Clipping: "a a" vs "a b". Unigram candidate weights {a: 2L}, reference {a: L, b: L}:
    # dot = min(2L, L) * L = L^2 over norms 2L * sqrt(2) L -> 1 / (2 sqrt 2) (unclipped: 1 / sqrt 2).
    # Bigrams: "a a" vs "a b" share none. Lengths equal (1 bigram each): no penalty.
    per = cider_per_image({"x": "a a", "y": "c d"}, {"x": ["a b"], "y": ["c d"]})
    assert per["x"] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    # Length penalty: "a b c" vs "a b": unigram cos 2 / sqrt(6), bigram cos 1 / sqrt(2), lengths
    # 2 vs 1 bigrams -> exp(-1 / 72).
    per = cider_per_image({"x": "a b c", "y": "d e"}, {"x": ["a b"], "y": ["d e"]})
    assert per["x"] == pytest.approx(10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72))


def test_cider_tokenisation_ignores_case_and_punctuation():
    assert tokenize("A Man's dog, running!") == ["a", "man", "s", "dog", "running"]
    assert cider({1: "A dog.", 2: "Cats"}, {1: ["a dog"], 2: ["cats"]}) == \
        pytest.approx(cider({1: "a dog", 2: "cats"}, {1: ["a dog"], 2: ["cats"]}))


def test_cider_matches_pycocoevalcap():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rng = random.Random(0)
    vocab = "a man dog cat on the red ball with sitting runs table two".split()
    for trial in range(6):
        n = rng.randint(2, 6)
        preds = {i: " ".join(rng.choices(vocab, k=rng.randint(1, 9))) for i in range(n)}
        refs = {i: [" ".join(rng.choices(vocab, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 5))]
                for i in range(n)}
        theirs, per_theirs = Cider().compute_score({k: [" ".join(tokenize(r)) for r in v] for k, v in refs.items()},
                                                   {k: [" ".join(tokenize(v))] for k, v in preds.items()})
        assert cider(preds, refs) == pytest.approx(float(theirs), abs=1e-9)
        assert list(cider_per_image(preds, refs).values()) == pytest.approx(list(per_theirs), abs=1e-9)


def test_cider_errors():
    with pytest.raises(KeyError, match="'b'"):
        cider({"a": "x", "b": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match="no predictions"):
        cider({}, {})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({"a": "x"}, {"a": []})


def test_cider_refuses_a_reference_string_for_a_list():
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty list of strings, got 'a dog'"):
        cider({"a": "a dog"}, {"a": "a dog"})


def test_cider_counts_4_grams():
    """CIDEr-D averages the 1- to 4-gram similarities: a candidate equal to its only reference, with every n-gram
    unique to its image (idf log 2 on 2 images), scores 10 * (1 + 1 + 1 + 1) / 4; a one-word one 10 * 1 / 4."""
    assert cider_per_image({"x": "w x y z", "y": "e"}, {"x": ["w x y z"], "y": ["e"]}) == \
        pytest.approx({"x": 10.0, "y": 2.5})


def test_cider_idf_counts_the_predicted_images_only():
    """N and the document frequencies come from the evaluated (predicted) ids: references of other ids change
    nothing (coco-caption scores the same ids on both sides). "a" is in both images' references: idf
    log 2 - log 2 = 0 on the 2 predicted images, so image 2 shares nothing that counts (log 4 - log 2 on 4 would)."""
    preds = {"img1": "a b", "img2": "a e"}
    refs = {"img1": ["a b"], "img2": ["a d"]}
    assert cider_per_image(preds, refs) == pytest.approx({"img1": 5.0, "img2": 0.0})
    assert cider_per_image(preds, {**refs, "img3": ["a b c"], "img4": ["x y"]}) == \
        pytest.approx({"img1": 5.0, "img2": 0.0})


def test_cider_corpus_score_is_the_mean_over_the_predicted_ids():
    """cider() takes a whole split's references with predictions for some of its ids: the corpus score is the mean
    of the predicted ids' scores (5 and 0, test_cider_idf_counts_the_predicted_images_only), not their sum over
    every id that has references (5 / 4)."""
    preds = {"img1": "a b", "img2": "a e"}
    refs = {"img1": ["a b"], "img2": ["a d"], "img3": ["a b c"], "img4": ["x y"]}
    assert cider(preds, refs) == pytest.approx(2.5)


def test_cider_errors_name_the_id_and_options_reach_the_score():
    """A prediction without references is refused naming the id (not a bare KeyError); ``sigma`` is the length
    penalty's, ``tokenizer`` splits every sentence (str.split keeps case and punctuation: "A B." shares nothing
    with "a b")."""
    with pytest.raises(KeyError, match=r"cider: prediction id 'b' has no references \(1 ids missing in all\)"):
        cider({"a": "x", "b": "y"}, {"a": ["x"]})
    # "a b c" vs "a b" (test_cider_clipping_and_length_penalty), lengths 2 vs 1 bigrams, sigma 1: exp(-1 / 2)
    per = cider_per_image({"x": "a b c", "y": "d e"}, {"x": ["a b"], "y": ["d e"]}, sigma=1.0)
    assert per["x"] == pytest.approx(10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 2))
    preds, refs = {"img1": "A B.", "img2": "c e"}, {"img1": ["a b"], "img2": ["c d"]}
    assert cider(preds, refs) == pytest.approx(3.125)                      # test_cider_hand_computed's
    assert cider(preds, refs, tokenizer=str.split) == pytest.approx(1.25 / 2)  # img1 scores 0


def test_cider_of_one_prediction_is_zero_and_says_why(caplog):
    """CIDEr-D's idf is log(N / df): for one image every n-gram's is 0, so a perfect caption scored alone is 0.0
    (coco-caption's too), which a user scoring one caption took for a broken metric: a warning says why."""
    with caplog.at_level(logging.WARNING, logger="vlscale.metrics.cider"):
        assert cider({1: "a red circle"}, {1: ["a red circle"]}) == 0.0
    assert "cider: one prediction scored: every n-gram's idf is log(1 / 1) = 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlscale.metrics.cider"):
        assert cider({1: "a red circle", 2: "a blue cube"}, {1: ["a red circle"], 2: ["a blue cube"]}) > 0
    assert not caplog.text


def test_cider_tokenisation_splits_underscores():
    """Anything not a letter or digit separates words, an underscore too (regex's \\w holds it)."""
    assert tokenize("red_car on_the road") == ["red", "car", "on", "the", "road"]


# ----------------------------------------------------------------------------- caption metrics

PREDS = {1: "a man riding a horse", 2: "two dogs playing in the grass"}
REFS = {1: ["A man rides a horse.", "a person on a horse"], 2: ["Two dogs playing in the grass.", "dogs playing"]}


def test_caption_scores_use_java_true_without_java_falls_back(monkeypatch, caplog):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        out = caption_scores(PREDS, REFS, use_java=True)
    assert "use_java=True but no 'java' on the PATH" in caplog.text
    assert out.tokens == "python" and "meteor" not in out
    assert out["cider"] == pytest.approx(cider(PREDS, REFS))


def test_ptb_tokenizer_returning_fewer_lines_is_an_error(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    done = captioning.subprocess.CompletedProcess([], 0, stdout=b"a dog\n", stderr=b"")
    monkeypatch.setattr(captioning.subprocess, "run", lambda *a, **k: done)
    with pytest.raises(RuntimeError, match="returned 2 lines for 3 sentences"):
        captioning._ptb_tokenize(["a dog", "a cat", "a cow"])


def test_caption_scores_without_java_omits_meteor(monkeypatch, caplog):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        out = caption_scores(PREDS, REFS)
    assert set(out) == {"cider", "bleu4", "rouge_l"}
    assert "METEOR needs Java" in caplog.text
    assert "use_java=True" not in caplog.text  # use_java was left to java_available(), not asked for
    assert out["cider"] == pytest.approx(cider(PREDS, REFS))
    assert 0.0 < out["rouge_l"] <= 1.0 and 0.0 <= out["bleu4"] <= 1.0


@pytest.mark.skipif(not captioning.java_available(), reason="needs java (METEOR, PTB tokenizer)")
def test_caption_scores_with_java():
    pytest.importorskip("pycocoevalcap")
    # One call (each starts JVMs): image 1 is a reference verbatim, image 2 a near miss.
    preds = {1: REFS[1][0], 2: "dogs playing on grass"}
    out = caption_scores(preds, REFS)
    assert set(out) == {"cider", "bleu4", "meteor", "rouge_l"}
    assert 0.3 < out["meteor"] < 1.0 and 0.5 < out["rouge_l"] < 1.0 and 0.0 < out["bleu4"] < 1.0
    assert out["cider"] == pytest.approx(cider(preds, REFS))


# Captions where the PTB tokenizer and ours split differently: contractions ("do n't" / "don t"), possessives
# ("'s" / "s"), hyphens, decimals, slashes and symbols.
PTB_PREDS = {1: "a man doesn't eat his food", 2: "a well-dressed woman on a 3.5-inch phone",
             3: "two kids playing a/b games on a stage", 4: "the dog's toy on a t-shirt", 5: "a man's red-haired son"}
PTB_REFS = {1: ["A man doesn't want to eat.", "The man won't eat his food.", "a man's plate of food"],
            2: ["A well-dressed woman holding a 3.5-inch phone.", "woman in a well-fitted suit, on the phone"],
            3: ["Two kids playing a/b games on the 1,000-seat stage.", "kids on a stage"],
            4: ["The dog's toy is on the t-shirt.", "a dog toy lying on a shirt"],
            5: ["A man's son with red-haired curls.", "a man & his son at 10:30 p.m."]}


@pytest.mark.skipif(not captioning.java_available(), reason="needs java (PTB tokenizer, METEOR)")
def test_caption_scores_with_java_is_coco_captions_cider(monkeypatch):
    """With Java, CIDEr-D used our Python tokenisation of the raw strings while BLEU-4, ROUGE-L and METEOR got the
    PTB tokens: --java-metrics reported a CIDEr that was not coco-caption's (VL-T5 / VL-Adapter's) wherever the
    two split differently. It is now pycocoevalcap's Cider on the PTB tokens (METEOR's JVM, ~10 s, is
    test_caption_scores_with_java's)."""
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res: 0.5)  # no JVM for METEOR
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({**{("p", k): [{"caption": v}] for k, v in PTB_PREDS.items()},
                                   **{("r", k): [{"caption": r} for r in v] for k, v in PTB_REFS.items()}})
    res, gts = {k: ptb[("p", k)] for k in PTB_PREDS}, {k: ptb[("r", k)] for k in PTB_PREDS}
    assert any(" ".join(tokenize(s)) != ptb[("r", k)][i] for k, v in PTB_REFS.items() for i, s in enumerate(v))
    theirs = float(Cider().compute_score(gts, res)[0])
    out = caption_scores(PTB_PREDS, PTB_REFS, use_java=True)
    assert out["cider"] == pytest.approx(theirs, abs=1e-9)
    # not the number of either Python-tokenised path: the raw strings, or the PTB text split again by ours
    assert abs(caption_scores(PTB_PREDS, PTB_REFS, use_java=False)["cider"] - theirs) > 1e-3
    assert abs(cider({k: v[0] for k, v in res.items()}, gts) - theirs) > 1e-3


def test_caption_scores_falls_back_with_cider_when_the_ptb_tokenizer_fails(monkeypatch, caplog):
    """Java present but the PTB tokenizer failing: CIDEr-D falls back to Python tokenisation with BLEU-4 and
    ROUGE-L (one tokenisation for all), and the warning says CIDEr-D is among them. METEOR still runs (Java works)
    on those same Python tokens; the warning used to leave it out, as if METEOR were on PTB tokens."""
    pytest.importorskip("pycocoevalcap")

    def broken(predictions, references):
        raise RuntimeError("no jar")
    monkeypatch.setattr(captioning, "java_available", lambda: True)
    monkeypatch.setattr(captioning, "_ptb_tokenized", broken)
    meteor_got = []
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res: meteor_got.append((gts, res)) or 0.5)  # no JVM
    with caplog.at_level(logging.WARNING):
        out = caption_scores(PTB_PREDS, PTB_REFS, use_java=True)
    assert "PTB tokenizer (Java) failed (no jar); CIDEr-D, BLEU-4, ROUGE-L and METEOR use simple Python" in caplog.text
    assert out.tokens == "python"  # what was scored, though Java is there
    res, gts = captioning._simple_tokenized(PTB_PREDS, PTB_REFS)
    assert meteor_got == [(gts, res)]
    assert out == pytest.approx({**caption_scores(PTB_PREDS, PTB_REFS, use_java=False), "meteor": 0.5}, abs=1e-12)
    assert out["cider"] == pytest.approx(cider(PTB_PREDS, PTB_REFS), abs=1e-12)


@pytest.mark.skipif(not captioning.java_available(), reason="needs java (PTB tokenizer)")
def test_ptb_tokenizer_works_with_a_read_only_pycocoevalcap(monkeypatch, caplog):
    """A wheel in a read-only site-packages: pycocoevalcap's PTBTokenizer writes its input file into its own package
    folder, which failed there, and --java-metrics silently scored every caption metric on Python tokens (one
    warning). The tokenizer jar now runs on a file in a temporary directory: the same tokens, nothing written."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    theirs = PTBTokenizer().tokenize({**{("p", k): [{"caption": v}] for k, v in PTB_PREDS.items()},
                                      **{("r", k): [{"caption": r} for r in v] for k, v in PTB_REFS.items()}})
    package = os.path.dirname(os.path.dirname(os.path.abspath(ptbtokenizer.__file__))) + os.sep  # pycocoevalcap/
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.path.abspath(path).startswith(package):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    res, gts = captioning._ptb_tokenized(PTB_PREDS, PTB_REFS)
    assert res == {k: theirs[("p", k)] for k in PTB_PREDS} and gts == {k: theirs[("r", k)] for k in PTB_PREDS}
    assert res[1] == ["a man does n't eat his food"]
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res: 0.5)  # no JVM for METEOR
    with caplog.at_level(logging.WARNING):
        out = caption_scores(PTB_PREDS, PTB_REFS, use_java=True)
    assert "failed" not in caplog.text
    assert abs(out["cider"] - caption_scores(PTB_PREDS, PTB_REFS, use_java=False)["cider"]) > 1e-3


def test_caption_scores_refuses_what_it_cannot_score_naming_the_id():
    """Nothing to score, a prediction without references and a reference string or empty list for a list are
    refused naming the id (not scored as 0, per character, or a bare KeyError)."""
    with pytest.raises(ValueError, match="^caption_scores: no predictions to score$"):
        caption_scores({}, REFS, use_java=False)
    with pytest.raises(KeyError, match="caption_scores: prediction id 3 is not in the references"):
        caption_scores({3: "a dog"}, REFS, use_java=False)
    for refs in ("a man rides a horse", []):
        with pytest.raises(ValueError, match=r"caption_scores: references\[1\] must be a non-empty list of strings"):
            caption_scores({1: "a man"}, {1: refs}, use_java=False)


@pytest.mark.parametrize("use_java", [False, pytest.param(True, marks=pytest.mark.skipif(
    not captioning.java_available(), reason="needs java (PTB tokenizer)"))])
def test_caption_scores_take_the_references_of_a_whole_split_in_any_order(monkeypatch, use_java):
    """Predictions in any order and references of more ids than were predicted, in another order (a split's, as
    cider takes them): each predicted id is scored against its own references, the others are not scored, as with
    its references alone. The Python path's references of every id broke BLEU's matching of ids; the PTB path's,
    taken in the references' order, or its tokens handed out in another order than the predictions', would score
    a caption against another id's references."""
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res: 0.5)  # no JVM for METEOR
    own = caption_scores({k: PTB_PREDS[k] for k in (1, 2, 4)}, {k: PTB_REFS[k] for k in (1, 2, 4)}, use_java=use_java)
    preds, split = {k: PTB_PREDS[k] for k in (2, 4, 1)}, {k: PTB_REFS[k] for k in (5, 1, 3, 4, 2)}
    out = caption_scores(preds, split, use_java=use_java)
    assert out.tokens == own.tokens == ("ptb" if use_java else "python")
    assert out == pytest.approx(dict(own), abs=1e-12)


def _fake_ptb_java(returncode=0, trailing_newline=True, stderr=b""):
    """subprocess.run standing in for the PTB tokenizer's JVM: each line of the input file, lowercased."""
    def run(argv, capture_output=True):
        with open(argv[-1], encoding="utf-8") as f:
            out = f.read().lower()
        out = out + "\n" if trailing_newline else out
        return captioning.subprocess.CompletedProcess(argv, returncode, stdout=out.encode(), stderr=stderr)
    return run


def test_ptb_tokenizer_gets_one_line_per_sentence_and_exactly_as_many_lines_is_enough(monkeypatch):
    """A caption holding a newline is one sentence for the tokenizer (a line each: a newline inside one shifted
    every later caption onto another's tokens); output of exactly one line per sentence (no final newline) is
    complete."""
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning.subprocess, "run", _fake_ptb_java(trailing_newline=False))
    assert captioning._ptb_tokenize(["A dog\non the grass", "A cat"]) == ["a dog on the grass", "a cat"]


def test_ptb_tokenizer_failing_says_javas_exit_status_and_error(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(captioning.subprocess, "run",
                        _fake_ptb_java(returncode=1, stderr=b"Error: could not find main class\n"))
    with pytest.raises(RuntimeError, match="^java exited 1: Error: could not find main class$"):
        captioning._ptb_tokenize(["a dog", "a cat"])


def test_caption_scores_bleu4_and_rouge_l_are_coco_captions_on_the_scored_tokens():
    """bleu4 is pycocoevalcap's 4-gram BLEU (its 4th score, not the 3-gram one) and rouge_l its ROUGE-L, on the
    tokens every metric scored."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    out = caption_scores(PTB_PREDS, PTB_REFS, use_java=False)
    res, gts = captioning._simple_tokenized(PTB_PREDS, PTB_REFS)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert abs(bleu[3] - bleu[2]) > 1e-3  # the case tells them apart
    assert out["bleu4"] == pytest.approx(bleu[3], abs=1e-12)
    assert out["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)


def test_meteor_failing_leaves_meteor_out_with_a_warning(monkeypatch, caplog):
    """Java runs the PTB tokenizer but METEOR's JVM fails: the other metrics stand (on PTB tokens), METEOR is
    left out and the warning says why (never a crash after the generation)."""
    pytest.importorskip("pycocoevalcap")

    def broken(gts, res):
        raise RuntimeError("meteor jvm died")
    monkeypatch.setattr(captioning, "java_available", lambda: True)
    monkeypatch.setattr(captioning, "_ptb_tokenized", captioning._simple_tokenized)  # no JVM for the tokenizer
    monkeypatch.setattr(captioning, "_meteor", broken)
    with caplog.at_level(logging.WARNING):
        out = caption_scores(PREDS, REFS, use_java=True)
    assert "caption_scores: METEOR (Java) failed (meteor jvm died); METEOR is omitted" in caplog.text
    assert set(out) == {"cider", "bleu4", "rouge_l"} and out.tokens == "ptb"


def test_meteor_stops_its_jvm_even_when_scoring_fails(monkeypatch):
    """METEOR's JVM is stopped when _meteor returns or raises, not left to garbage collection."""
    pycocoevalcap_meteor = pytest.importorskip("pycocoevalcap.meteor.meteor")
    import threading

    class Process:
        def __init__(self):
            self.calls = []
            self.stdin = self

        def close(self):
            self.calls.append("close")

        def kill(self):
            self.calls.append("kill")

        def wait(self):
            self.calls.append("wait")

    made = []

    class FakeMeteor:
        def __init__(self):
            self.lock, self.meteor_p = threading.Lock(), Process()
            made.append(self)

        def compute_score(self, gts, res):
            if "fail" in res:
                raise RuntimeError("scoring failed")
            return 0.25, [0.25]

    monkeypatch.setattr(pycocoevalcap_meteor, "Meteor", FakeMeteor)
    assert captioning._meteor({1: ["a dog"]}, {1: ["a dog"]}) == 0.25
    with pytest.raises(RuntimeError, match="scoring failed"):
        captioning._meteor({"fail": ["a dog"]}, {"fail": ["a cat"]})
    assert [m.meteor_p.calls for m in made] == [["close", "kill", "wait"]] * 2


def test_meteor_whose_jvm_died_is_omitted_without_hanging(monkeypatch, caplog):
    """pycocoevalcap's Meteor.compute_score takes its lock and, failing (its JVM died: the pipe is broken), leaves it
    held; _meteor then waited for that lock to stop the JVM and --java-metrics hung for ever after generation. Now
    the JVM is stopped (closing its broken pipe fails, killing it still runs), the lock is free again for
    Meteor.__del__, and caption_scores leaves METEOR out with a warning."""
    pycocoevalcap_meteor = pytest.importorskip("pycocoevalcap.meteor.meteor")
    import threading

    made = []

    class Process:
        def __init__(self):
            self.calls, self.stdin = [], self

        def close(self):
            self.calls.append("close")
            raise BrokenPipeError(32, "Broken pipe")

        def kill(self):
            self.calls.append("kill")

        def wait(self):
            self.calls.append("wait")

    class DeadJvmMeteor:  # compute_score as pycocoevalcap's, whose first write to the dead JVM fails
        def __init__(self):
            self.lock, self.meteor_p = threading.Lock(), Process()
            made.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(pycocoevalcap_meteor, "Meteor", DeadJvmMeteor)
    monkeypatch.setattr(captioning, "java_available", lambda: True)
    monkeypatch.setattr(captioning, "_ptb_tokenized", captioning._simple_tokenized)  # no JVM for the tokenizer
    result = []
    with caplog.at_level(logging.WARNING):
        worker = threading.Thread(target=lambda: result.append(caption_scores(PREDS, REFS, use_java=True)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=20)
    assert not worker.is_alive(), "caption_scores hung stopping METEOR's JVM"
    assert set(result[0]) == {"cider", "bleu4", "rouge_l"}
    assert "caption_scores: METEOR (Java) failed ([Errno 32] Broken pipe); METEOR is omitted" in caplog.text
    assert [m.meteor_p.calls for m in made] == [["close", "kill", "wait"]]
    assert not made[0].lock.locked()


# ----------------------------------------------------------------------------- exact match family

def test_exact_match_accuracy_consistency():
    assert normalize_answer("  Yes. ") == "yes"
    preds = {"q1": "Yes.", "q2": "red car", "q3": "blue"}
    refs = {"q1": ["yes"], "q2": ["Red car"], "q3": ["green"]}
    assert accuracy(preds, refs) == pytest.approx(2 / 3)
    assert exact_match(preds, refs) == 0.0  # GQA's: string for string (test_gqa_exact_match_compares_strings)
    assert exact_match({"q1": "yes", "q2": "Red car", "q3": "blue"}, refs) == pytest.approx(2 / 3)
    groups = {"q1": "g1", "q2": "g1", "q3": "g2"}
    assert consistency(preds, refs, groups) == pytest.approx(0.5)  # g1 all right, g2 wrong
    with pytest.raises(KeyError, match="q9"):
        exact_match({"q9": "x"}, refs)
    with pytest.raises(KeyError, match="no group"):
        consistency(preds, refs, {"q1": "g1"})


def test_normalize_answer_takes_underscores_and_hyphens_for_punctuation():
    """Punctuation (an underscore too, though regex's \\w holds it) becomes a space; apostrophes stay."""
    assert normalize_answer("T_shirt") == normalize_answer("T-shirt") == "t shirt"
    assert accuracy({"q1": "red_car"}, {"q1": ["red car"]}) == 1.0
    assert normalize_answer("Don't") == "don't"


def test_gqa_exact_match_compares_strings_as_the_official_evaluation():
    """GQA's eval.py counts ``predicted == gold`` and VL-T5 / VL-Adapter's GQAEvaluator ``ans in label`` on the
    decoded text; ours lower-cased and stripped punctuation first, so "Yes", "yes." or "left side" scored
    right against "yes" / "left-side" where the reference scores them wrong, and GQA numbers were not theirs."""
    refs = {"1": ["yes"], "2": ["left-side"], "3": ["t-shirt"], "4": ["man"]}
    assert score_task("gqa", {"1": "Yes", "2": "left side", "3": "t shirt", "4": "man."}, refs) == {"exact_match": 0.0}
    assert score_task("gqa", {"1": "yes", "2": "left-side", "3": "t-shirt", "4": "men"}, refs) == \
        {"exact_match": 0.75}
    with pytest.raises(ValueError, match="^exact_match: id '1' has no references to compare its prediction 'yes' "
                                         "with$"):
        exact_match({"1": "yes"}, {"1": []})


def test_accuracy_and_consistency_refusals_and_a_reference_string():
    """accuracy, exact_match and consistency take a single reference string as the one reference (not its
    characters), and refuse no predictions, an unknown id and an empty reference list naming them, never
    scoring 0 or dividing by zero."""
    assert accuracy({"q": "Yes."}, {"q": "yes"}) == 1.0
    assert exact_match({"q": "yes"}, {"q": "yes"}) == 1.0
    for metric in (accuracy, exact_match):
        with pytest.raises(ValueError, match=f"^{metric.__name__}: no predictions to score$"):
            metric({}, {"q": ["yes"]})
        with pytest.raises(KeyError, match=f"{metric.__name__}: prediction id 'q9' is not in the references"):
            metric({"q9": "yes"}, {"q": ["yes"]})
    with pytest.raises(ValueError, match="^consistency: no predictions to score$"):
        consistency({}, {"q": ["yes"]}, {"q": "g"})
    with pytest.raises(ValueError, match="^accuracy: id 'q' has no references to compare its prediction 'maybe' with$"):
        accuracy({"q": "maybe"}, {"q": []})


def test_consistency_counts_the_groups_of_predicted_examples():
    """A group none of whose examples was predicted is not a group scored (0.5, not 1/3); an empty groups map
    for NLVR2 is refused, not taken as no groups."""
    from vlscale.metrics.classification import nlvr2_scores

    preds = {"q1": "Yes.", "q2": "red car", "q3": "blue"}
    refs = {"q1": ["yes"], "q2": ["Red car"], "q3": ["green"]}
    groups = {"q1": "g1", "q2": "g1", "q3": "g2", "q4": "g3"}
    assert consistency(preds, refs, groups) == pytest.approx(0.5)
    assert nlvr2_scores(preds, refs, groups) == pytest.approx({"accuracy": 2 / 3, "consistency": 0.5})
    with pytest.raises(KeyError, match="consistency: prediction id 'q1' has no group"):
        nlvr2_scores(preds, refs, {})


def test_exact_match_family_takes_any_reference_and_averages_over_the_predicted_ids():
    """A prediction is right when it equals any of its references (not only the first, nor all of them); the
    mean is over the predicted ids, references of other ids do not count (0.5, not 1/3)."""
    refs = {"q1": ["cup", "mug"], "q2": ["red"], "q3": ["blue"]}
    assert exact_match({"q1": "mug", "q2": "blue"}, refs) == pytest.approx(0.5)
    assert accuracy({"q1": "Mug.", "q2": "blue"}, refs) == pytest.approx(0.5)
    assert score_task("tvqa", {"1": "a2"}, {"1": ["a0", "a2"], "2": ["a1"]}) == {"accuracy": 1.0}


def test_exact_match_takes_a_reference_string_whole_not_its_substrings():
    """A single reference string is the one reference: a prediction that is part of it ("ye", an empty generation)
    is wrong, as under GQA's ``predicted == gold``."""
    assert exact_match({"q1": "ye", "q2": "", "q3": "yes"}, {"q1": "yes", "q2": "yes", "q3": "yes"}) == \
        pytest.approx(1 / 3)


def test_accuracy_normalises_the_references_and_collapses_inner_whitespace():
    """Both sides are normalised: a reference written "T-Shirt." matches "t shirt", and punctuation followed by a
    space ("yes, it is") leaves one space, as "yes it is"."""
    assert accuracy({"q1": "t shirt", "q2": "yes, it is"}, {"q1": ["T-Shirt."], "q2": ["yes it is"]}) == 1.0
    assert normalize_answer("a  red\tcar") == "a red car"


def test_consistency_a_wrong_example_fails_its_group_whatever_follows():
    """A group is right only if all its examples are: a wrong one before right ones still fails the group."""
    preds = {"q1": "false", "q2": "true", "q3": "true"}
    refs = {"q1": ["true"], "q2": ["true"], "q3": ["true"]}
    assert consistency(preds, refs, {"q1": "g1", "q2": "g1", "q3": "g2"}) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- score_task

def _has_pycocoevalcap():
    try:
        import pycocoevalcap.bleu.bleu  # noqa: F401
    except ImportError:
        return False
    return True


TASK_CASES = {
    "vqa": ({"1": "Two", "2": "cat"}, {"1": ["2"] * 10, "2": ["dog"] * 10}, {"vqa_score": 0.5}),
    "gqa": ({"1": "yes", "2": "cup"}, {"1": ["yes"], "2": ["table"]}, {"exact_match": 0.5}),
    "nlvr2": ({"1": "true", "2": "false", "3": "true"}, {"1": ["true"], "2": ["true"], "3": ["true"]},
              {"accuracy": 2 / 3, "consistency": 0.5}),
    "tvqa": ({"1": "a1", "2": "a3"}, {"1": ["a1"], "2": ["a0"]}, {"accuracy": 0.5}),
    "how2qa": ({"1": "a2"}, {"1": ["a2"]}, {"accuracy": 1.0}),
}


@pytest.mark.parametrize("task", sorted(TASK_CASES))
def test_score_task_classification_tasks(task):
    preds, refs, expected = TASK_CASES[task]
    groups = {"1": "g1", "2": "g1", "3": "g2"} if task == "nlvr2" else None
    out = score_task(task, preds, refs, groups)
    assert out == pytest.approx(expected)
    assert TASKS[task].metric in out


@pytest.mark.parametrize("task", ["caption", "tvc", "yc2c"])
def test_score_task_caption_tasks(task):
    out = score_task(task, {"1": "a b", "2": "c e"}, {"1": ["a b"], "2": ["c d"]})
    assert set(out) == {"cider", "bleu4", "rouge_l"} if _has_pycocoevalcap() else {"cider"}
    assert out["cider"] == pytest.approx(3.125)  # the hand-computed case above


def test_score_task_takes_a_single_reference_string_and_refuses_an_empty_list():
    assert score_task("gqa", {1: "yes"}, {1: "yes"}) == {"exact_match": 1.0}
    with pytest.raises(ValueError, match=r"score_task\('gqa'\): references\[1\] is empty"):
        score_task("gqa", {1: "yes"}, {1: []})


def test_vqa_normalisation_strips_and_deletes_punctuation_after_a_space():
    """As the official script: the answer is stripped first, and a punctuation mark with a space on either side
    is deleted everywhere in the answer (not replaced by a space)."""
    assert normalize_vqa_answer("x-ray -ish") == "xray ish"
    assert normalize_vqa_answer("\n-x-ray") == "x ray"


def test_vqa_official_quirks_compare_identical_answers_as_written():
    assert vqa_score("yes", ["yes."] * 10, official_quirks=True) == 0.0  # all the same: compared raw
    assert vqa_score("yes", ["yes."] * 9 + ["no"], official_quirks=True) == 1.0  # differing: punctuation pass


def test_score_task_errors_and_partial_references(caplog):
    with pytest.raises(KeyError, match="unknown task 'vqa2'"):
        score_task("vqa2", {"1": "x"}, {"1": ["x"]})
    with pytest.raises(KeyError, match="'7'"):
        score_task("gqa", {"7": "x"}, {"1": ["x"]})
    with pytest.raises(ValueError, match="no predictions"):
        score_task("gqa", {}, {"1": ["x"]})
    with caplog.at_level(logging.WARNING):
        out = score_task("gqa", {"1": "x"}, {"1": ["x"], "2": ["y"]})
    assert out == {"exact_match": 1.0} and "1 reference ids have no prediction" in caplog.text


def test_score_task_refusals_name_the_task_and_all_predicted_ids_warn_nothing(caplog, monkeypatch):
    """score_task's own refusals name the task (not a bare KeyError or the inner metric's name); every reference
    predicted warns nothing; a task whose TaskSpec names a metric this module lacks is refused naming both."""
    import dataclasses

    from vlscale.data import tasks

    with pytest.raises(ValueError, match=r"^score_task\('gqa'\): no predictions to score$"):
        score_task("gqa", {}, {"1": ["x"]})
    with pytest.raises(KeyError, match=r"score_task\('gqa'\): prediction id '7' is not in the references"):
        score_task("gqa", {"7": "x"}, {"1": ["x"]})
    with caplog.at_level(logging.WARNING):
        assert score_task("gqa", {"1": "x"}, {"1": ["x"]}) == {"exact_match": 1.0}
    assert "reference ids have no prediction" not in caplog.text
    odd = dataclasses.replace(tasks.get_task("gqa"), metric="bleu")
    monkeypatch.setattr(tasks, "get_task", lambda name: odd)
    with pytest.raises(ValueError, match="^score_task: task 'gqa' names metric 'bleu', which vlscale.metrics does "
                                         r"not implement \(vqa_score, exact_match, accuracy, cider\)$"):
        score_task("gqa", {"1": "x"}, {"1": ["x"]})


def test_score_task_vqa_takes_a_single_reference_string():
    """A reference string is the one answer for VQA too (vqa_score alone refuses a string)."""
    assert score_task("vqa", {1: "Two"}, {1: "2"}) == {"vqa_score": 1.0}


def test_score_task_vqa_scores_each_answer_type_over_its_own_predicted_ids():
    """VQA v2's official evaluation also reports accuracy per answer type: with ``answer_types`` each type's mean
    is over the predicted ids of that type alone (an unpredicted id and an id without a type count in none);
    the headline stays the mean over every predicted id. Without ``answer_types``, the headline alone."""
    refs = {1: ["yes"] * 10, 2: ["no"] * 10, 3: ["2"] * 4 + ["3"] * 6, 4: ["red"] * 10, 5: ["blue"] * 10,
            6: ["cat"] * 10}
    preds = {1: "yes", 2: "yes", 3: "two", 4: "red", 6: "dog"}
    types = {1: "yes/no", 2: "yes/no", 3: "number", 4: "other", 5: "other"}  # 5 unpredicted, 6 without a type
    out = score_task("vqa", preds, refs, answer_types=types)
    assert out == pytest.approx({"vqa_score": (1 + 0 + 1 + 1 + 0) / 5, "vqa_score_yes_no": 0.5,
                                 "vqa_score_number": 1.0, "vqa_score_other": 1.0})
    assert list(out) == ["vqa_score", "vqa_score_yes_no", "vqa_score_number", "vqa_score_other"]  # VQA v2's order
    odd = score_task("vqa", preds, refs, answer_types={1: "zz", 2: "aa", 3: "other"})
    assert list(odd) == ["vqa_score", "vqa_score_other", "vqa_score_aa", "vqa_score_zz"]
    # a type carried only by unpredicted ids is not scored (no empty mean); one typed id is enough for its type
    assert score_task("vqa", preds, refs, answer_types={1: "yes/no", 5: "number"}) == \
        pytest.approx({"vqa_score": 0.6, "vqa_score_yes_no": 1.0})
    assert score_task("vqa", preds, refs, answer_types={4: "other"}) == \
        pytest.approx({"vqa_score": 0.6, "vqa_score_other": 1.0})
    assert score_task("vqa", preds, refs) == pytest.approx({"vqa_score": 0.6})
    # two types that differ only in punctuation would share one key: refused, naming both, not overwritten
    with pytest.raises(ValueError, match=r"answer types 'a / b' and 'a_b' would both be reported as 'vqa_score_a_b'"):
        score_task("vqa", preds, refs, answer_types={1: "a / b", 2: "a_b"})


def test_score_task_caption_bleu4_and_rouge_l_are_coco_captions_and_cider_stands_without_pycocoevalcap(
        monkeypatch, caplog):
    """The Java-free caption set: bleu4 is pycocoevalcap's 4-gram BLEU (not the 3-gram one) and rouge_l its ROUGE-L
    on the Python tokens; without pycocoevalcap only cider is reported, with a warning saying why."""
    pytest.importorskip("pycocoevalcap")
    import sys

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    out = score_task("caption", PTB_PREDS, PTB_REFS)
    res, gts = captioning._simple_tokenized(PTB_PREDS, PTB_REFS)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert abs(bleu[3] - bleu[2]) > 1e-3  # the case tells them apart
    assert out == pytest.approx({"cider": cider(PTB_PREDS, PTB_REFS), "bleu4": bleu[3],
                                 "rouge_l": Rouge().compute_score(gts, res)[0]}, abs=1e-12)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING):
        out = score_task("caption", PTB_PREDS, PTB_REFS)
    assert out == pytest.approx({"cider": cider(PTB_PREDS, PTB_REFS)})
    assert "score_task: bleu4 and rouge_l need pycocoevalcap" in caplog.text


def test_cider_n_max_counts_lengths_in_bigrams_as_coco_caption():
    """``n_max`` is the highest n-gram order; the penalty's lengths are bigram counts whatever it is (coco-caption's
    counts2vec counts ``n == 1``), so with n_max=1 (none counted) there is no length penalty. "a b c" vs "a b":
    unigram cos 2 / sqrt(6), 10 * that (counting words would multiply by exp(-1 / 72)); with n_max=2 the mean of
    the unigram and bigram cosines (test_cider_clipping_and_length_penalty) with the penalty."""
    preds, refs = {"x": "a b c", "y": "d e"}, {"x": ["a b"], "y": ["d e"]}
    assert cider_per_image(preds, refs, n_max=1)["x"] == pytest.approx(10 * 2 / math.sqrt(6))
    assert cider_per_image(preds, refs, n_max=2)["x"] == \
        pytest.approx(10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 2 * math.exp(-1 / 72))


def test_metrics_refuse_wrong_types_naming_the_argument():
    """A None or a list where a string belongs was scored as its text ("none" is VQA's "0"; None against "0"
    scored 1.0), a string or a list where a dict belongs was read as ids, character by character, and None for a
    dict was a TypeError from inside: each is refused, naming the metric and the argument."""
    assert vqa_score("0", ["0"] * 10) == 1.0
    for prediction in (None, ["0"], 0):
        message = f"vqa_score: prediction must be a string, got {prediction!r}"
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            vqa_score(prediction, ["0"] * 10)
    with pytest.raises(TypeError, match=r"^vqa_score: answers\[1\] must be a string, got None$"):
        vqa_score("0", ["0", None, "0"])
    dicts = {"predictions": "id -> predicted text", "references": "id -> list of reference texts"}
    for metric in (cider, cider_per_image, caption_scores, exact_match, accuracy):
        name = metric.__name__.replace("_per_image", "")
        for wrong in (None, "a dog", ["a dog"]):
            for arg, what in dicts.items():
                given = {"predictions": {1: "a dog"}, "references": {1: ["a dog"]}, arg: wrong}
                with pytest.raises(TypeError, match=rf"^{name}: {arg} must be a dict of {what}, got "
                                                    rf"{type(wrong).__name__}$"):
                    metric(**given)
        with pytest.raises(TypeError, match=rf"^{name}: predictions\[1\] must be a string, got None$"):
            metric({1: None}, {1: ["none"]})
        with pytest.raises(TypeError, match=rf"^{name}: references\[1\]\[1\] must be a string, got None$"):
            metric({1: "a dog"}, {1: ["a dog", None]})
        with pytest.raises(TypeError, match=rf"^{name}: references\[1\] must be a list of strings, got int$"):
            metric({1: "a dog"}, {1: 3})
        if metric is not caption_scores:  # the same check_types; its scorers take seconds
            assert metric({1: "a dog"}, {1: {"a dog"}}) == metric({1: "a dog"}, {1: ["a dog"]})  # a set, as before
    with pytest.raises(TypeError, match=r"^consistency: groups must be a dict of id -> group, got NoneType$"):
        consistency({1: "true"}, {1: ["true"]}, None)
    with pytest.raises(TypeError, match=r"^score_task\('vqa'\): references must be a dict of id -> list of "
                                        r"reference texts, got NoneType$"):
        score_task("vqa", {1: "yes"}, None)
    with pytest.raises(TypeError, match=r"^score_task\('vqa'\): answer_types must be a dict of id -> str, got str$"):
        score_task("vqa", {1: "yes"}, {1: ["yes"]}, answer_types="yes/no")
    with pytest.raises(ValueError, match=r"^score_task\('vqa'\): references\[1\] is empty$"):  # not list(None)
        score_task("vqa", {1: "yes"}, {1: None})
