"""Training on images: micro-batches/s of the train loader with the images read in the training thread
(``data.read_ahead_threads=0``) against read ahead in N threads, with a stand-in for the accelerator's step.

A real VQA layout is made in a temporary folder (``--images`` JPEGs like photographs', 640x480, as
benchmarks/extract_throughput.py makes them; one question each) and read through ``launchers/train.py``'s own
loader (``build_train_loader``, ``data.source=real``) with ``--vision``'s transform (224x224 for the paper's
CLIPs). Each micro-batch is followed by ``--step-ms`` of sleep, the training step of a GPU, which leaves the CPU
free (``--step-ms 0``: the loader alone). The figures: ms per micro-batch and the part of it spent waiting for
``next(loader)``; rounds alternate the two settings.

    python benchmarks/read_ahead.py [--images 256] [--threads N] [--step-ms 80] [--batches 24] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_vqa_root(root: Path, n: int) -> None:
    """``root/vqa/karpathy_train.json`` with ``n`` questions, one per JPEG under ``root/coco/images``, and
    ``karpathy_val.json`` with the first 32 of them (a training run's evaluation)."""
    from benchmarks.extract_throughput import make_jpegs

    images = root / "coco" / "images"
    images.mkdir(parents=True)
    make_jpegs(images, n)
    for i, path in enumerate(sorted(images.iterdir())):
        path.rename(images / f"COCO_train2014_{i:012d}.jpg")
    (root / "vqa").mkdir()
    records = [{"img_id": f"COCO_train2014_{i:012d}", "sent": f"What colour is thing {i}?", "question_id": i,
                "label": {"red": 1.0}, "answers": [{"answer": "red"}] * 10} for i in range(n)]
    (root / "vqa" / "karpathy_train.json").write_text(json.dumps(records))
    (root / "vqa" / "karpathy_val.json").write_text(json.dumps(records[:32]))


def one_round(cfg, tok, batches: int, step_s: float) -> tuple[float, float, list[float]]:
    """(ms per micro-batch, ms of it waiting for the loader, each batch's pixel sum) over ``batches`` micro-batches
    after two warm ones."""
    from vlscale.data import build_train_loader

    loader, sums = build_train_loader(cfg, tok), []
    try:
        for _ in range(2):
            next(loader)
            time.sleep(step_s)
        waited, start = 0.0, time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            batch = next(loader)
            waited += time.perf_counter() - t
            sums.append(float(batch["pixel_values"].double().sum()))
            time.sleep(step_s)
        total = time.perf_counter() - start
    finally:
        loader.close()
    return 1e3 * total / batches, 1e3 * waited / batches, sums


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="JPEGs (and questions) made (default 256)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads to compare with 0 (default: a GPU rank's default alone on this machine, 1 to 4)")
    ap.add_argument("--step-ms", type=float, default=80.0, help="the stand-in step after each micro-batch (default 80)")
    ap.add_argument("--batches", type=int, default=24, help="micro-batches timed per round (default 24)")
    ap.add_argument("--micro-batch", type=int, default=16, help="examples per micro-batch (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--vision", default="ViT-B-32-quickgelu", help="whose transform (default ViT-B-32-quickgelu)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from vlscale.config import load_config
    from vlscale.data import build_tokenizer
    from vlscale.data.read_ahead import default_threads

    threads = args.threads if args.threads is not None else default_threads("cuda")
    times: dict[int, list[tuple[float, float, list[float]]]] = {0: [], threads: []}
    with tempfile.TemporaryDirectory(prefix="read_ahead_") as tmp:
        make_vqa_root(Path(tmp), args.images)
        cfgs = {n: load_config("tiny", ["data.source=real", f"data.root={tmp}", "data.tasks=[vqa]",
                                        f"model.vision={args.vision}", "model.vision_pretrained=null",
                                        f"train.micro_batch_size={args.micro_batch}",
                                        "train.gradient_accumulation_steps=1", f"data.read_ahead_threads={n}"])
                for n in times}
        tok = build_tokenizer(cfgs[0])
        for _ in range(args.rounds):
            for n in times:
                times[n].append(one_round(cfgs[n], tok, args.batches, args.step_ms / 1e3))

    def median(n, k):
        return statistics.median(t[k] for t in times[n])

    result = {"images": args.images, "micro_batch": args.micro_batch, "step_ms": args.step_ms, "vision": args.vision,
              "rounds": args.rounds, "batches": args.batches, "threads": threads,
              "ms_per_micro_batch": {str(n): median(n, 0) for n in times},
              "ms_waiting": {str(n): median(n, 1) for n in times},
              "speedup": median(0, 0) / median(threads, 0),
              "batches_equal": all(t[2] == times[0][0][2] for n in times for t in times[n])}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.images} JPEGs 640x480, micro-batch {args.micro_batch}, {args.vision}'s transform, "
          f"stand-in step {args.step_ms:g} ms; median of {args.rounds} rounds of {args.batches} micro-batches")
    print(f"{'read_ahead_threads':>18} {'ms / micro-batch':>17} {'ms waiting':>11}")
    for n in times:
        print(f"{n:>18} {median(n, 0):>17.1f} {median(n, 1):>11.1f}")
    print(f"x{result['speedup']:.2f} micro-batches/s with {threads} threads reading ahead; the batches "
          f"{'are the same' if result['batches_equal'] else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
