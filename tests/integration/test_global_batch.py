"""A run with train.global_batch_size: the DeepSpeed engine gets the accumulation derived at start-up, the
run's files record it, and it trains as the same global batch given as micro-batch x accumulation does."""

import json

from vlscale.config import load_config
from vlscale.engine.deepspeed_config import resolve_batch


def test_a_global_batch_trains_with_the_derived_accumulation(tmp_path, h):
    common = h.TINY + ["train.zero_stage=0", "train.max_steps=2", "train.eval_every=0"]
    out, reference = tmp_path / "global", tmp_path / "micro4"
    proc = h.launch(common + ["train.gradient_accumulation_steps=null", "train.global_batch_size=4",
                              "train.micro_batch_size=2", f"output_dir={out}"])
    assert "global batch 4 (micro-batch 2 x 1 x accumulation 2)" in proc.stdout
    # the tiny runs take ds_configs/zero3.json: the start-up lines say the config's stage replaces the file's
    assert "train.zero_stage=0 (from the config) overrides zero_optimization.stage=3 of" in proc.stdout
    summary = h.read_json(out / "run_summary.json")  # the engine's own figures
    assert (summary["global_batch"], summary["micro_batch_size"], summary["gradient_accumulation_steps"]) == (4, 2, 2)
    saved = load_config(str(out / "run_config.yaml"))  # the batch as given: it derives again on other ranks
    assert (saved.train.global_batch_size, saved.train.micro_batch_size, saved.train.gradient_accumulation_steps) \
        == (4, 2, None)
    assert resolve_batch(saved, 2).train.gradient_accumulation_steps == 1
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())["run_config"]["train"]
    assert (adapter["global_batch_size"], adapter["gradient_accumulation_steps"]) == (4, None)
    h.launch(common + ["train.micro_batch_size=4", f"output_dir={reference}"])  # the same examples in one micro-batch
    assert h.read_json(reference / "run_summary.json")["gradient_accumulation_steps"] == 1
    logged = h.read_log(out)
    assert [r["step"] for r in logged] == [1, 2]
    for a, b in zip(h.read_log(reference), logged, strict=True):
        assert (b["step"], b["task"]) == (a["step"], a["task"])
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
