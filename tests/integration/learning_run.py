"""The short training that tests/integration/test_learning.py scores (run as a background job of the
suite, see tests/conftest.py): CLIP features of the synthetic world extracted to a cache, then the
embedded default preset trained on them for its 450 steps, one process.

    python tests/integration/learning_run.py FOLDER     -> FOLDER/features, FOLDER/run (the output_dir)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the default's global batch on one process; stage 0: on one process ZeRO-3 partitions nothing and
# computes the same updates, but its per-module hooks cost ~4x per step (test_learning.py)
STEPS = ["train.micro_batch_size=32", "train.save_every=0", "train.zero_stage=0"]


def launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(folder: str) -> int:
    cache, out = Path(folder) / "features", Path(folder) / "run"
    code = launcher("extract_features").main(["--synthetic", "--quiet", "--out", str(cache)])
    if code != 0:
        return code
    return launcher("train").main(["--no-progress", "--config", "default", "model.feature_source=cache",
                                   f"data.feature_cache={cache}", f"output_dir={out}", *STEPS])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
