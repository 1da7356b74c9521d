"""Every full-scale image preset (``paper/clip_bart_*`` and ``paper/clip_t5_single_adapter``) on real-format
data, scaled down: the feature cache made with ``launchers/extract_features.py --real`` from the dataset layout
(test_paper_preset_real.py's), 2 training steps on the shipped miniature backbones with the preset's own objective
and precision, and ``launchers/evaluate.py --split val`` on the run's adapter decoding the predictions training
wrote at its end, byte for byte, for the four tasks. Each preset builds its own PEFT modules (adapter sharing,
hyperformer, compacter, LoRA, prompts, full fine-tuning), saves them and loads them back for evaluation.

(3 steps on 2 ranks under ZeRO-3, a run stopped after step 1 then resumed to the same losses, and a 2-rank
``evaluate.py --deepspeed`` were run by hand for every preset; the suite's sharded runs are test_engine.py's. A 2-rank bf16 run's predictions
are those of ``evaluate.py --deepspeed`` on 2 ranks, not always of one process: the ranks split the examples into
other batches, which bf16 decodes differently now and then; in fp32 both agree.)
"""

from __future__ import annotations

import math

import pytest

from test_paper_preset_real import downloaded_layout

TASKS = ("caption", "gqa", "nlvr2", "vqa")
VISION = ["model.vision=mini-clip-rn", "model.vision_pretrained=synthetic"]
# preset -> the shipped miniature of its language model. One preset per PEFT module, to keep the suite's time
# (the suite is near its 10-minute bound): the single adapter is test_paper_preset_real.py's; single_compacter
# stands for multiple_compacters, multiple_lora for single_lora, multiple_prompts for single_prompt; the
# adapters' other sharings and full fine-tuning change which parameters train, not the data path (their
# sharing and full-FT tests use the tiny models). All twelve were run by hand, with this test's checks and
# the 2-rank ones above passing for each (2026-12-03).
PRESETS = {
    **{f"clip_bart_{name}": "mini-bart" for name in ("hyperformer", "single_compacter", "multiple_lora",
                                                     "multiple_prompts")},
    "clip_t5_single_adapter": "mini-t5",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, launcher, h):
    """preset -> (its output_dir, its finished run): the cache made once, then each preset's 2 steps on one
    process."""
    top = tmp_path_factory.mktemp("paper_all_real")
    root = downloaded_layout(top / "data")
    cache = root / "clip_features" / "mini-clip-rn"
    assert launcher("extract_features").main(["--real", "--config", "paper/clip_bart_single_adapter",
                                              f"data.root={root}", *VISION, "--out", str(cache), "--quiet"]) == 0
    done = {}
    for name, backbone in PRESETS.items():  # one after the other: two at once on 2 cores take 3x as long
        out = top / name
        done[name] = (out, h.launch(["--config", f"paper/{name}", f"data.root={root}", f"data.feature_cache={cache}",
                                     *VISION, f"model.backbone={backbone}", "train.max_steps=2",
                                     "train.micro_batch_size=2", "train.eval_every=0", "train.zero_stage=0",
                                     f"output_dir={out}"], check=False))
    return done


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_preset_trains_on_the_real_cache_and_evaluate_reproduces_its_predictions(name, runs, h, tmp_path,
                                                                                     launcher):
    out, run = runs[name]
    assert run.returncode == 0, f"paper/{name} exited {run.returncode}:\n{run.stdout[-4000:]}"
    log = h.read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert launcher("evaluate").main(["--adapter", str(out / "adapter"), "--split", "val",
                                      "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    for task in TASKS:
        assert ((tmp_path / "eval" / "predictions" / f"{task}.jsonl").read_text()
                == (out / "predictions" / f"{task}.jsonl").read_text()), f"paper/{name}: {task}"
