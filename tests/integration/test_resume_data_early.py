"""A --resume whose training data changed (a record more or less) is refused as soon as the training
loader is built: one DataError line on every rank, before the model is built and DeepSpeed reads the
checkpoint (before: the same refusal came from the loader's load_state_dict, after both).

A 2-rank run on real GQA files (3 training records) stops after step 1; a record is removed; the resume runs
through launchers/train.py with the model builder replaced by one that fails, so a run that gets that far
shows it.
"""

import json
import shutil

from vlscale.engine import checkpoint as ckpt

NO_MODEL_PROBE = """
import runpy, sys
from vlscale.engine import trainer
def build_model_for_run(*args, **kwargs):
    raise RuntimeError("PROBE: the model was built")
trainer.build_model_for_run = build_model_for_run
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_other_training_data_is_refused_on_every_rank_before_the_model_is_built(h, preloaded, tmp_path):
    root, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(h.ROOT / "tests/fixtures/real_data/gqa", root / "gqa")
    args = [*h.TINY, "data.source=real", f"data.root={root}", "data.tasks=[gqa]", "train.zero_stage=0",
            "train.micro_batch_size=1", "train.max_steps=2", f"output_dir={out}"]
    h.launch([*args, "--stop-after-steps", "1"], nproc=2)
    assert ckpt.latest_tag(out / "checkpoints") == "step1"
    train = root / "gqa" / "train.json"
    records = json.loads(train.read_text())
    assert len(records) == 3
    train.write_text(json.dumps(records[:2]))

    script = tmp_path / "probe.py"
    script.write_text(NO_MODEL_PROBE)
    proc = preloaded.run(script, [h.TRAIN, "--no-progress", "--config", "tiny", *args, "--resume"], nproc=2,
                         env=h.base_env(2), cwd=h.ROOT, timeout=300)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "PROBE" not in proc.stdout, proc.stdout[-3000:]  # was: the model built, then the checkpoint loaded
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    line = ("DataError: resume: the training data differ from the checkpoint's: 'gqa' had 3 examples, now 2 (the "
            "training files changed, or data.skip_bad_records dropped other records); the steps would draw other "
            "examples: restore the checkpoint's training data, or start a new run in another output_dir")
    for rank in (0, 1):
        assert f"vlscale: rank {rank}: {line}\n" in proc.stdout, proc.stdout[-3000:]
    assert ckpt.latest_tag(out / "checkpoints") == "step1"
    assert [r["step"] for r in h.read_log(out)] == [1]
