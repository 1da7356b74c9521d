"""Train the synthetic world's SentencePiece vocabulary -> ``vlscale/assets/synthetic_spm.model``.

    python scripts/make_tokenizer.py [--out vlscale/assets/synthetic_spm.model] [--check]

A unigram model trained with SentencePiece's own trainer on every kind of text the world produces
(task prefixes, questions, candidates, subtitles, answers, captions) plus a short list of common
English words of image/video captions and questions, and every printable ASCII character, so
that real text run through a tiny model tokenizes into sensible pieces rather than ``<unk>``.
Special ids follow T5: pad=0, eos=1, unk=2; bos=3 (``<s>``) is there for BART-style models.
The 100 ``<extra_id_N>`` sentinels are added at load time (vlscale.data.tokenizer), as T5 does.

Seed pieces (every substring of every word, weighted by frequency) are given to the trainer
explicitly: on a small, repetitive corpus SentencePiece's built-in seed extraction keeps only a
handful of candidates and splits common words into letters. ``--check`` re-trains into a
temporary file and fails if it differs from the shipped model.
"""

from __future__ import annotations

import argparse
import collections
import io
import string
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "vlscale" / "assets" / "synthetic_spm.model"
VOCAB_SIZE = 1000  # an upper bound: the trainer stops at what the corpus supports

# Common words of VQA/GQA questions and COCO/video captions (for real-data smoke runs).
ENGLISH = """
a an the this that these those there here it its is are was were be been being has have had do
does did can could will would should may might must not no yes and or but if then than so as of
in on at by for with without from to into onto over under above below behind beside between near
next front back top bottom side left right middle center up down out off through across along
around inside outside against toward away what which who whom whose where when why how many much
some any all each every both few more most other another same different one two three four five
six seven eight nine ten first second third last many several lot lots kind type color colour
shape size number kind man men woman women person people boy girl child children baby kid player
players guy lady family crowd team group dog dogs cat cats horse horses cow cows sheep bird birds
elephant elephants giraffe giraffes zebra zebras bear bears animal animals fish car cars truck
bus buses train trains plane airplane boat bike bicycle motorcycle street road sidewalk sign
light traffic building buildings house room kitchen bathroom bedroom living table chair chairs
couch bed desk window door wall floor ceiling tree trees grass field sky cloud clouds water
ocean sea beach sand snow mountain hill river lake park city food pizza sandwich cake plate
bowl cup glass bottle banana apple orange fruit vegetable broccoli hot donut wine coffee
phone laptop computer keyboard screen television tv book books clock umbrella bag ball frisbee
kite skateboard surfboard skis board tennis racket bat glove hat shirt jacket dress shoes
hair face hand hands head eyes arm leg legs wearing holding sitting standing walking running
riding playing eating looking lying flying jumping throwing catching carrying talking cooking
cutting walks runs rides plays eats looks sits stands holds wears opens closes puts takes
gets goes comes makes shows turns picks moves uses says tells asks answers watches reads
big small large little tall short long old young new white black red blue green yellow brown
gray grey pink purple orange dark bright empty full open closed wooden metal plastic round
square flat clean dirty happy sad good bad real true false picture photo image images video
scene view background foreground frame clip moment time day night morning evening
"""


def corpus_lines(n_per_task: int = 400) -> list[str]:
    from vlscale.data.synthetic import world_corpus

    lines = world_corpus(n_per_task)
    words = ENGLISH.split()
    lines += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines.append(" ".join(string.ascii_letters + string.digits))
    lines.append(" ".join(string.punctuation))
    return lines


def seed_pieces(lines: list[str], max_len: int = 16) -> list[tuple[str, int]]:
    """Every substring (2..max_len chars) of every whitespace word, '▁'-prefixed like SentencePiece."""
    words = collections.Counter(w for line in lines for w in line.split())
    seeds = collections.Counter()
    for w, c in words.items():
        w = "\u2581" + w
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + max_len) + 1):
                seeds[w[i:j]] += c
    return sorted(seeds.items(), key=lambda kv: (-kv[1], kv[0]))


def train(out: Path, n_per_task: int = 400) -> int:
    import sentencepiece as spm

    lines = corpus_lines(n_per_task)
    with tempfile.TemporaryDirectory() as tmp:
        seed_file = Path(tmp) / "seeds.tsv"
        seed_file.write_text("".join(f"{p}\t{c}\n" for p, c in seed_pieces(lines)))
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
            vocab_size=VOCAB_SIZE, hard_vocab_limit=False, character_coverage=1.0,
            pad_id=0, eos_id=1, unk_id=2, bos_id=3, num_threads=1, minloglevel=2,
            seed_sentencepieces_file=str(seed_file))
    data = _strip_temp_paths(model.getvalue())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return spm.SentencePieceProcessor(model_proto=data).get_piece_size()


def _strip_temp_paths(data: bytes) -> bytes:
    """The trainer records the seed file's (temporary) path; blank it so runs are byte-identical."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: the model is the same, only its bytes vary
        return data
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    proto.trainer_spec.seed_sentencepieces_file = ""
    return proto.SerializeToString()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="fail if re-training changes the model at --out")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "m.model"
            train(fresh)
            same = args.out.exists() and fresh.read_bytes() == args.out.read_bytes()
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh training run'}")
        return 0 if same else 1
    n = train(args.out)
    print(f"wrote {args.out} ({n} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
