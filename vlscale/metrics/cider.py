"""CIDEr-D (Vedantam, Zitnick, Parikh, CVPR 2015) in pure Python, as coco-caption computes it.

Each sentence becomes tf-idf vectors of its 1..4-grams, where the idf of an n-gram is
``log(N) - log(max(1, df))`` with N the number of evaluated images and df the number of images
whose references contain the n-gram (document frequencies come from the references of the
evaluated set). For each n the similarity of candidate c and reference r is

    sum_g min(c_g, r_g) * r_g / (|c| |r|)  *  exp(-(len_c - len_r)^2 / (2 * 6^2))

(the "D": clipped candidate counts and a Gaussian length penalty, sigma 6). An image's score is
the mean over n of the similarity averaged over its references, times 10; CIDEr-D is the mean
over images. As in coco-caption's ``cider_scorer.py``, the lengths in the penalty are counted in
bigrams (words - 1 for a non-empty sentence); the numbers match pycocoevalcap's ``Cider``.

Tokenisation needs no Java: lowercase and split on anything that is not a letter or digit
("A man's dog." -> ``a man s dog``), applied to candidates and references alike. coco-caption
runs the Stanford PTB tokenizer first ("a man 's dog", "3.5", "red-haired" stay whole), so scores
can differ slightly from published ones where the two split differently;
:func:`vlscale.metrics.caption_scores` with Java passes its PTB tokens with ``tokenizer=str.split``
(what coco-caption's scorer does with them) and gives coco-caption's number.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Callable, Hashable

logger = logging.getLogger(__name__)
_NON_WORD = re.compile(r"[^\w]+|_")
SIGMA = 6.0
MAX_N = 4


def tokenize(text: str) -> list[str]:
    """Lowercase, strip punctuation, split on whitespace."""
    return _NON_WORD.sub(" ", str(text).lower()).split()


def _ngrams(words: list[str], n_max: int = MAX_N) -> Counter:
    counts: Counter = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i:i + n])] += 1
    return counts


def _vector(counts: Counter, idf_of, n_max: int):
    """tf-idf weights split by n-gram order, their L2 norms and the sentence length in bigrams."""
    vec = [dict() for _ in range(n_max)]
    sq = [0.0] * n_max
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        w = tf * idf_of(gram)
        vec[n][gram] = w
        sq[n] += w * w
        if n == 1:
            length += tf
    return vec, [math.sqrt(s) for s in sq], length


def _similarity(cand, ref, n_max: int, sigma: float) -> list[float]:
    (vc, nc, lc), (vr, nr, lr) = cand, ref
    penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
    out = []
    for n in range(n_max):
        dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
        if nc[n] != 0 and nr[n] != 0:
            dot /= nc[n] * nr[n]
        out.append(dot * penalty)
    return out


def cider_per_image(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
                    sigma: float = SIGMA, n_max: int = MAX_N,
                    tokenizer: Callable[[str], list[str]] = tokenize) -> dict[Hashable, float]:
    """CIDEr-D of every predicted id (the corpus score is their mean). ``tokenizer`` splits candidates and
    references into words (``str.split`` for text already tokenized, e.g. by the PTB tokenizer)."""
    from .classification import check_types

    check_types(predictions, references, "cider")
    if not predictions:
        raise ValueError("cider: no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"cider: prediction id {missing[0]!r} has no references "
                       f"({len(missing)} ids missing in all)")
    ids = list(predictions)
    refs_counts = {}
    for k in ids:
        refs = references[k]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"cider: references[{k!r}] must be a non-empty list of strings, got {refs!r}")
        refs_counts[k] = [_ngrams(tokenizer(r), n_max) for r in refs]
    df: Counter = Counter()
    for k in ids:
        df.update({g for c in refs_counts[k] for g in c})
    log_n = math.log(float(len(ids)))
    if len(ids) == 1:  # as coco-caption's: a corpus metric, 0 for a caption scored alone, however good
        logger.warning("cider: one prediction scored: every n-gram's idf is log(1 / 1) = 0, so CIDEr-D is 0 whatever "
                       "the caption; score a set of images")

    def idf_of(gram):
        return log_n - math.log(max(1.0, df.get(gram, 0.0)))

    scores = {}
    for k in ids:
        cand = _vector(_ngrams(tokenizer(predictions[k]), n_max), idf_of, n_max)
        total = [0.0] * n_max
        for rc in refs_counts[k]:
            sim = _similarity(cand, _vector(rc, idf_of, n_max), n_max, sigma)
            total = [a + b for a, b in zip(total, sim)]
        scores[k] = sum(total) / n_max / len(refs_counts[k]) * 10.0
    return scores


def cider(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
          tokenizer: Callable[[str], list[str]] = tokenize) -> float:
    """Corpus CIDEr-D: mean over the predicted ids (coco-caption's scale, ~1.0 for good models)."""
    per_image = cider_per_image(predictions, references, tokenizer=tokenizer)
    return sum(per_image.values()) / len(per_image)
