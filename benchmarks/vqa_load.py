"""Time to read a VQA file in the VL-T5 format, with and without ``label`` (answers alone).

    python benchmarks/vqa_load.py [--records 100000]

Writes a generated file of ``--records`` questions, each with 10 human answers drawn mostly from 15 frequent
answers (as VQAv2's repeat) and otherwise from 3,000 others, and times ``vlscale.data.vqa.load_vqa`` on it with
a two-answer ``label`` and then without one (the target and soft label made from the answers). Run it in two
checkouts to compare them.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    from vlscale.data.vqa import load_vqa

    rng = random.Random(0)
    vocab = ["yes", "no", "2", "two", "3", "red", "blue", "a dog", "dog", "cat", "white", "black", "tennis", "1",
             "one"] + [f"thing {i}" for i in range(3000)]
    records = []
    for q in range(args.records):
        answers = [rng.choice(vocab[:15]) if rng.random() < 0.8 else rng.choice(vocab) for _ in range(10)]
        records.append({"img_id": f"i{q % 5000}", "sent": "What?", "question_id": q,
                        "label": {answers[0]: 1.0, answers[1]: 0.6}, "answers": answers})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vqa.json"
        for kind in ("labelled", "answers-only"):
            path.write_text(json.dumps(records))
            t0 = time.perf_counter()
            load_vqa(path)
            print(f"load_vqa, {args.records:,} {kind} records: {time.perf_counter() - t0:.2f} s")
            for r in records:
                r.pop("label", None)


if __name__ == "__main__":
    main()
