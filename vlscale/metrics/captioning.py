"""Captioning metrics: CIDEr-D (ours, pure Python) plus BLEU-4, METEOR and ROUGE-L from pycocoevalcap.

``caption_scores`` follows coco-caption: sentences go through the Stanford PTB tokenizer
(lowercased, punctuation tokens removed) before CIDEr-D, BLEU, METEOR and ROUGE-L, so CIDEr-D is
pycocoevalcap's ``Cider`` on those tokens (ours, fed them with ``tokenizer=str.split``). The
tokenizer and METEOR are Java programs shipped inside pycocoevalcap (the tokenizer's input file is
written to a temporary directory, so a read-only site-packages works). Without ``java`` on the PATH
(or ``use_java=False``), or where the tokenizer fails, a warning names what is affected: CIDEr-D,
BLEU and ROUGE-L (and METEOR, when Java runs it after the tokenizer failed) then use our simple Python tokenisation (:func:`vlscale.metrics.cider.tokenize`:
"don't" -> ``don t``, "3.5" -> ``3 5``, "red-haired" -> ``red haired``, where PTB keeps ``do n't``,
``3.5``, ``red-haired``), and without Java METEOR is left out of the result (never a crash, never a
made-up number). The two tokenisations agree on plain captions (every one of the synthetic world's),
so CIDEr-D differs between the settings only where a caption has contractions, possessives,
hyphens, numbers with separators or symbols.

pycocoevalcap comes with the ``metrics`` extra (``pip install 'vlscale[metrics]'``).
Scores are on coco-caption's scale (BLEU/METEOR/ROUGE-L in [0, 1], CIDEr ~1 for good models);
papers report them x100.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Hashable, Optional

from .cider import cider, tokenize

logger = logging.getLogger(__name__)


def java_available() -> bool:
    return shutil.which("java") is not None


def _check(predictions: dict, references: dict) -> None:
    from .classification import check_types

    check_types(predictions, references, "caption_scores")
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    for k in predictions:
        if k not in references:
            raise KeyError(f"caption_scores: prediction id {k!r} is not in the references")
        refs = references[k]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption_scores: references[{k!r}] must be a non-empty list of strings")


def _simple_tokenized(predictions: dict, references: dict):
    res = {k: [" ".join(tokenize(predictions[k]))] for k in predictions}
    gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in predictions}
    return res, gts


def _ptb_tokenized(predictions: dict, references: dict):
    keys = list(predictions)
    refs = [str(r) for k in keys for r in references[k]]
    tokens = _ptb_tokenize([str(predictions[k]) for k in keys] + refs)
    res = {k: [tokens[i]] for i, k in enumerate(keys)}
    it = iter(tokens[len(keys):])
    return res, {k: [next(it) for _ in references[k]] for k in keys}


def _ptb_tokenize(sentences: list[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer`` (the Stanford jar it ships, lowercased, its punctuation tokens removed), one
    Java run for all ``sentences``. Run here rather than through ``PTBTokenizer.tokenize``, which writes its input
    file into its own package folder: in a read-only site-packages (a wheel on a shared cluster) that failed and
    every caption metric fell back to Python tokenisation. The input file goes to a temporary directory."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="vlscale_ptb_") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(s.replace("\n", " ") for s in sentences))
        run = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True)
    if run.returncode != 0:
        raise RuntimeError(f"java exited {run.returncode}: {run.stderr.decode(errors='replace').strip()[-500:]}")
    lines = run.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[:len(sentences)]]


class CaptionScores(dict):
    """:func:`caption_scores`' ``{metric: float}``, and ``tokens``, the tokenisation every metric scored:
    ``"ptb"`` (coco-caption's PTB tokenizer, Java) or ``"python"`` (ours: Java off, or the tokenizer failed)."""

    def __init__(self, scores: dict, tokens: str):
        super().__init__(scores)
        self.tokens = tokens


def caption_scores(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
                   use_java: Optional[bool] = None) -> CaptionScores:
    """``{"cider", "bleu4", "meteor", "rouge_l"}`` of the predicted ids (``meteor`` needs Java), with the
    tokenisation they were computed on (:class:`CaptionScores`).

    ``use_java``: None = use Java when ``java`` is on the PATH; False = never (no METEOR; CIDEr-D,
    BLEU-4 and ROUGE-L on Python tokenisation, the same numbers as training's evaluation).
    """
    _check(predictions, references)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError("caption_scores needs pycocoevalcap for BLEU, METEOR and ROUGE-L: "
                          "pip install 'vlscale[metrics]' (vlscale.metrics.cider needs nothing)") from e

    java = java_available() if use_java is None else use_java
    if use_java and not java_available():
        logger.warning("caption_scores: use_java=True but no 'java' on the PATH")
        java = False
    if not java:
        logger.warning("caption_scores: METEOR needs Java (no 'java' on the PATH or use_java=False): "
                       "METEOR is omitted; CIDEr-D, BLEU-4 and ROUGE-L use simple Python tokenisation "
                       "instead of the Java PTB tokenizer")
    res = gts = None
    if java:
        try:
            res, gts = _ptb_tokenized(predictions, references)
        except Exception as e:  # Java present but the tokenizer failed: say so, fall back.
            logger.warning(f"caption_scores: the PTB tokenizer (Java) failed ({e}); CIDEr-D, BLEU-4, ROUGE-L "
                           "and METEOR use simple Python tokenisation")
    tokens = "ptb" if res is not None else "python"
    if res is None:
        res, gts = _simple_tokenized(predictions, references)
    # Every metric scores the same tokens; str.split keeps PTB's ("do n't", "3.5") as coco-caption's Cider does.
    out = {"cider": cider({k: res[k][0] for k in res}, gts, tokenizer=str.split)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out["bleu4"] = float(bleu[3])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if java:
        try:
            out["meteor"] = _meteor(gts, res)
        except Exception as e:
            logger.warning(f"caption_scores: METEOR (Java) failed ({e}); METEOR is omitted")
    return CaptionScores(out, tokens)


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        # Stop the JVM now rather than at garbage collection (Meteor.__del__ repeats this harmlessly). compute_score
        # takes scorer.lock without giving it back when it fails (a JVM that died: a broken pipe, an empty line read
        # as a number), and the lock is not reentrant: waiting for it here hung the evaluation. This thread is its
        # only user, so it is taken without waiting (or found still held) and given back for Meteor.__del__.
        scorer.lock.acquire(blocking=False)
        try:
            with contextlib.suppress(OSError):  # flushing the pipe of a JVM that died
                scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
        finally:
            scorer.lock.release()
    return float(score)
