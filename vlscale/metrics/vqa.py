"""VQAv2 accuracy with the official answer normalisation (Antol et al. 2015; Goyal et al. 2017).

The official evaluation script normalises an answer in two passes, written here from its
published description:

1. *punctuation*: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
   space or when the answer contains a comma between two digits ("1,000" -> "1000"), and is
   replaced by a space otherwise ("black-and-white" -> "black and white"); then every period
   not followed by a digit is deleted ("yes." -> "yes", "3.5" stays);
2. *digits and articles*: lowercase, split on whitespace, number words map to digits
   ("two" -> "2", "none" -> "0"), the articles a/an/the are dropped, and contractions written
   without their apostrophes get them back ("dont" -> "don't").

A prediction is then scored against the 10 human answers as the mean, over the 10 subsets that
leave one answer out, of ``min(1, #matches among the other 9 / 3)``; k matching answers give
0.0, 0.3, 0.6, 0.9, 1.0 for k = 0..4 (and 1.0 above).

Deviation from the script, on purpose: the script always normalises the prediction (both passes) but
the human answers only partly: pass 1 alone, and only when they are not all the same string (so a
prediction "two" scores 0 against ten "two", and "yes" 0 against ten "Yes"); we normalise both sides
fully. On human answers already in normal form the two agree. Pass
``official_quirks=True`` to treat the human answers as the script does. (Its contraction table also
lacks a few spellings this one restores, e.g. "shes", "lets"; those are not reproduced.)
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Iterable

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contractions in their written form; every spelling with some apostrophes missing maps back.
_CONTRACTIONS_WRITTEN = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've
y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_map(written: Iterable[str]) -> dict[str, str]:
    """Map each spelling of a contraction that drops a non-empty subset of its apostrophes."""
    out: dict[str, str] = {}
    for word in written:
        positions = [i for i, ch in enumerate(word) if ch == "'"]
        for r in range(1, len(positions) + 1):
            for drop in itertools.combinations(positions, r):
                variant = "".join(ch for i, ch in enumerate(word) if i not in drop)
                out.setdefault(variant, word)
    return out


CONTRACTIONS = _contraction_map(_CONTRACTIONS_WRITTEN)


def process_punctuation(text: str) -> str:
    """Pass 1 of the official normalisation (punctuation and periods); case is kept."""
    out = text
    digits_with_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if digits_with_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """Pass 2: lowercase, number words -> digits, drop articles, restore contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


@functools.lru_cache(maxsize=1 << 16)
def normalize_vqa_answer(answer: str) -> str:
    """The full official normalisation of one answer string (cached: VQA's answers repeat, and a record's are
    normalised by its soft label, its target and each evaluation's scorer)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_score(prediction: str, answers: list[str], official_quirks: bool = False) -> float:
    """VQA accuracy of one prediction against the human answers (normally 10).

    Mean over the leave-one-out subsets of ``min(1, #matches / 3)``. With a single answer there is
    no leave-one-out subset; the score is then exact match after normalisation. ``official_quirks``:
    normalise the answers as the official script does (see the module docstring).
    """
    if not isinstance(prediction, str):  # None was scored as the answer "none", i.e. "0"
        raise TypeError(f"vqa_score: prediction must be a string, got {prediction!r}")
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
        raise TypeError(f"vqa_score: answers must be a list of strings, got {type(answers).__name__}")
    if not answers:
        raise ValueError(f"vqa_score: no reference answers for prediction {prediction!r}")
    bad = [i for i, a in enumerate(answers) if not isinstance(a, str)]
    if bad:
        raise TypeError(f"vqa_score: answers[{bad[0]}] must be a string, got {answers[bad[0]]!r}")
    raw = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = normalize_vqa_answer(prediction)
    if not official_quirks:
        refs = [normalize_vqa_answer(a) for a in raw]
    elif len(set(raw)) == 1:  # the script: identical answers are compared as they are
        refs = raw
    else:  # ... and differing ones after the punctuation pass only
        refs = [process_punctuation(a) for a in raw]
    if len(refs) == 1:
        return float(refs[0] == pred)
    matches = [r == pred for r in refs]
    total = sum(matches)
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: dict, references: dict) -> float:
    """Mean :func:`vqa_score` over the predicted ids (``references[id]`` = the human answers)."""
    from vlscale.metrics.classification import _check_ids

    _check_ids(predictions, references, "vqa_accuracy")
    return sum(vqa_score(predictions[k], references[k]) for k in predictions) / len(predictions)
