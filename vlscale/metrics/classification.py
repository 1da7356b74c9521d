"""Exact-match metrics: GQA answers, NLVR2 true/false (+ consistency), video QA choices.

GQA's ``exact_match`` compares the prediction as generated with the references, string for string, as
GQA's official ``eval.py`` (``predicted == gold``) and VL-T5 / VL-Adapter's ``GQAEvaluator`` (``ans in
label``) do: "Yes" or "yes." is not "yes". The others compare a normalised prediction with normalised
references (lowercase, punctuation to spaces, whitespace collapsed: "Yes." == "yes", "T-shirt" ==
"t shirt"). A prediction is right when it equals any of its references. NLVR2 consistency (Suhr et al.
2019) is the fraction of groups (one sentence across its image pairs) whose examples are all right.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Hashable, Optional

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation (except apostrophes) to spaces, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def correct(prediction: str, references: list[str]) -> bool:
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError(f"no references to compare prediction {prediction!r} with")
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in references)


def check_types(predictions, references, metric: str) -> None:
    """Refuse, naming the argument, what is not ``{id: predicted text}`` / ``{id: reference texts}``: a list, a
    string or None for either dict (a string was read as ids, character by character), a prediction or a
    reference that is not a string (None was scored as the text "none", a list as its repr)."""
    for name, given, what in (("predictions", predictions, "id -> predicted text"),
                              ("references", references, "id -> list of reference texts")):
        if not isinstance(given, Mapping):
            raise TypeError(f"{metric}: {name} must be a dict of {what}, got {type(given).__name__}")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise TypeError(f"{metric}: predictions[{k!r}] must be a string, got {p!r}")
        refs = references.get(k)
        if refs is None or isinstance(refs, str):
            continue  # no references: each metric refuses them naming the id; one string is one reference
        if not isinstance(refs, Collection):  # a set of accepted answers too; a generator, read here, would be spent
            raise TypeError(f"{metric}: references[{k!r}] must be a list of strings, got {type(refs).__name__}")
        for i, r in enumerate(refs):
            if not isinstance(r, str):
                raise TypeError(f"{metric}: references[{k!r}][{i}] must be a string, got {r!r}")


def _check_ids(predictions: dict, references: dict, metric: str) -> None:
    """Refuse no predictions, a predicted id without references and an empty reference list, naming the id."""
    check_types(predictions, references, metric)
    if not predictions:
        raise ValueError(f"{metric}: no predictions to score")
    for k in predictions:
        if k not in references:
            raise KeyError(f"{metric}: prediction id {k!r} is not in the references")
        if not references[k]:
            raise ValueError(f"{metric}: id {k!r} has no references to compare its prediction "
                             f"{predictions[k]!r} with")


def exact_match(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> float:
    """Fraction of predictions that are, string for string, one of their references (GQA, as its eval.py)."""
    _check_ids(predictions, references, "exact_match")
    refs = {k: [references[k]] if isinstance(references[k], str) else list(references[k]) for k in predictions}
    return sum(predictions[k] in refs[k] for k in predictions) / len(predictions)


def accuracy(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> float:
    """Classification accuracy (NLVR2 true/false, video QA choice index); same rule as exact_match."""
    _check_ids(predictions, references, "accuracy")
    return sum(correct(predictions[k], references[k]) for k in predictions) / len(predictions)


def consistency(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
                groups: dict[Hashable, str]) -> float:
    """Fraction of groups in which every predicted example is right (NLVR2 consistency)."""
    _check_ids(predictions, references, "consistency")
    if not isinstance(groups, Mapping):
        raise TypeError(f"consistency: groups must be a dict of id -> group, got {type(groups).__name__}")
    all_right: dict[str, bool] = {}
    for k in predictions:
        if k not in groups:
            raise KeyError(f"consistency: prediction id {k!r} has no group")
        g = groups[k]
        all_right[g] = all_right.get(g, True) and correct(predictions[k], references[k])
    return sum(all_right.values()) / len(all_right)


def nlvr2_scores(predictions: dict, references: dict, groups: Optional[dict] = None) -> dict[str, float]:
    out = {"accuracy": accuracy(predictions, references)}
    if groups is not None:
        out["consistency"] = consistency(predictions, references, groups)
    return out
