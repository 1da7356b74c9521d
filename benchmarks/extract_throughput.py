"""Feature extraction's images/s with the images read and transformed in 1 thread against N
(``vlscale.data.features.extract_features(..., workers=N)``), in one process, alternating rounds.

JPEGs like photographs' (640x480, smooth colour fields with noise, quality 90) are made once in a temporary
folder and read through ``ImageFolder`` as ``launchers/extract_features.py --images`` reads them. With the tiny
CLIP the encoder costs next to nothing, so the figure is the reading's (on a GPU the encoder is that fast); with
``--vision RN101`` (random weights) on a CPU the encoder dominates.

    python benchmarks/extract_throughput.py [--images 600] [--workers 2] [--rounds 3] [--vision tiny-clip-rn] [--json]
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


def make_jpegs(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        noisy = np.asarray(base).astype(np.int16) + rng.integers(-20, 20, (480, 640, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600, help="JPEGs made and extracted (default 600)")
    ap.add_argument("--workers", type=int, default=None, help="threads to compare with 1 (default: default_workers())")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--vision", default="tiny-clip-rn", help="open_clip model name, random weights (default tiny)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from vlscale.data.features import default_workers, extract_features
    from vlscale.data.visual import ImageFolder
    from vlscale.modeling.vision import build_vision_encoder, image_transform

    workers = args.workers or default_workers()
    encoder, transform = build_vision_encoder(args.vision), image_transform(args.vision)
    rates: dict[int, list[float]] = {1: [], workers: []}
    with tempfile.TemporaryDirectory(prefix="extract_throughput_") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        make_jpegs(images, args.images)
        source = ImageFolder(images)
        ids = source.ids()
        caches = {}
        for r in range(args.rounds):
            for w in (1, workers) if r % 2 == 0 else (workers, 1):
                out = Path(tmp) / f"cache_{w}_{r}"
                t0 = time.perf_counter()
                stats = extract_features(encoder, transform, source, ids, out, vision=args.vision,
                                         batch_size=args.batch_size, progress=False, workers=w)
                rates[w].append(stats["written"] / (time.perf_counter() - t0))
                caches[w] = out
        from vlscale.data.features import FeatureCache

        one, many = FeatureCache(caches[1]), FeatureCache(caches[workers])
        same = all(torch.equal(one[i], many[i]) for i in ids)
    med = {w: statistics.median(v) for w, v in rates.items()}
    result = {"vision": args.vision, "images": args.images, "workers": workers, "rounds": args.rounds,
              "images_per_s": {str(w): v for w, v in rates.items()}, "median_images_per_s": {str(w): m for w, m in
                                                                                         med.items()},
              "ratio": med[workers] / med[1], "features_equal": same}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.vision}, {args.images} JPEGs 640x480, batch {args.batch_size}, {args.rounds} alternating rounds:")
    for w, m in med.items():
        print(f"  {w} thread(s): {m:7.1f} images/s (rounds: {', '.join(f'{x:.1f}' for x in rates[w])})")
    print(f"  {workers} / 1: x{result['ratio']:.2f}; features equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
