"""launchers/evaluate.py --deepspeed FILE beyond the plain ZeRO-3 case (test_engine.py): the stage is the file's,
not the training run's ``train.zero_stage``; ZeRO-1/2 files evaluate the whole model instead of failing in
DeepSpeed; a file's training-only keys (batch sizes, clipping, optimizer) do not refuse another number of ranks;
ZeRO-Infinity without async_io is refused before the model is built; the process group is left cleanly.

The adapter: a tiny run (TINY, fp32, vqa + nlvr2) trained on 1 process with ``train.zero_stage=2`` (the scale
presets below ZeRO-3 train ZeRO-1 with zero2.json: the same file family).
"""

from __future__ import annotations

import json
import re

import pytest

HOLDS = re.compile(r"ZeRO-(\d) over (\d) rank\(s\): rank 0 holds ([\d,]+) of the model's ([\d,]+) parameters")
TASKS = ("vqa", "nlvr2")


@pytest.fixture(scope="module")
def stage2_run(h, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_sharded") / "run"
    h.launch(h.TINY + ["data.tasks=[vqa,nlvr2]", "train.micro_batch_size=4", "train.max_steps=2",
                       "train.zero_stage=2", f"output_dir={out}"])
    return out


def evaluate(h, run, out, *args, nproc=2, env=None):
    return h.preloaded.run(str(h.ROOT / "launchers" / "evaluate.py"),
                           ["--adapter", str(run / "adapter"), "--out", str(out), "--no-progress", *map(str, args)],
                           timeout=h.RUN_TIMEOUT_S, nproc=nproc, env=env or h.base_env(nproc), cwd=str(h.ROOT))


def layout(proc) -> tuple[int, int, float]:
    """(ZeRO stage, ranks, share of the parameters rank 0 holds) from evaluate.py's line."""
    found = HOLDS.search(proc.stdout)
    assert found, proc.stdout[-4000:]
    stage, world, held, total = (int(x.replace(",", "")) for x in found.groups())
    return stage, world, held / total


def assert_training_predictions(run, out):
    for task in TASKS:
        assert (out / "predictions" / f"{task}.jsonl").read_text() == (run / "predictions" / f"{task}.jsonl").read_text()


def test_a_zero2_file_evaluates_the_whole_model_on_every_rank(stage2_run, tmp_path, h):
    """ds_configs/zero2.json (the file the run may have trained with): ZeRO-1/2 shard only optimizer state and
    gradients, so every rank holds the whole model, in an engine at stage 0 (DeepSpeed refuses stages 1-2
    without an optimizer), and says so; the predictions are training's."""
    proc = evaluate(h, stage2_run, tmp_path / "z2", "--deepspeed", "ds_configs/zero2.json")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert layout(proc) == (2, 2, 1.0)
    assert "every rank holds the whole model; a ZeRO-3 file shards it" in proc.stdout
    assert_training_predictions(stage2_run, tmp_path / "z2")


def test_the_files_stage_is_used_and_its_training_only_keys_refuse_no_number_of_ranks(stage2_run, tmp_path, h):
    """An adapter trained with train.zero_stage=2 evaluated with --deepspeed and ds_configs/zero3.json as the training
    run's own file, with concrete batch sizes (4 = 4 x 1 rank x 1), clipping and learning rate: sharded (the saved
    stage overrode the file's: DeepSpeed's "zero stage 2 requires an optimizer" traceback), and decodes what
    training decoded; evaluation on 2 ranks builds no optimizer and takes no step, so those keys are not checked
    (it was refused: "train_batch_size=4 conflicts with the run config's value 8"); a fault in what evaluation uses
    still names the file."""
    ds = json.loads((h.ROOT / "ds_configs" / "zero3.json").read_text())
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1,
              gradient_clipping=1.0)
    ds["optimizer"]["params"]["lr"] = 0.5
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    proc = evaluate(h, stage2_run, tmp_path / "out", "--deepspeed", tmp_path / "mine.json")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stage, world, share = layout(proc)
    assert (stage, world) == (3, 2) and 0.45 < share < 0.55, (stage, world, share)
    assert_training_predictions(stage2_run, tmp_path / "out")


def test_only_train_zero_stage_given_to_evaluate_overrides_the_files_stage(launcher):
    """The run's saved train.zero_stage is ignored, one given on evaluate's command line is not; the optimizer and
    its off-load are not part of evaluation's config, the parameters' off-load is."""
    from vlscale.config import config_from_dict

    cfg = config_from_dict({"train": {"zero_stage": 2}})  # the training run's
    build = launcher("evaluate").evaluation_ds_config
    assert build("ds_configs/zero3.json", cfg, 2, "cpu")["zero_optimization"]["stage"] == 3
    assert build("ds_configs/zero3.json", cfg, 2, "cpu", 0)["zero_optimization"]["stage"] == 0
    ds = build("ds_configs/zero3_offload.json", cfg, 2, "cpu")
    assert "optimizer" not in ds and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_a_bad_key_in_the_file_is_named_with_the_file(launcher, h, tmp_path):
    """The training-only keys are dropped from a copy of the file: errors still name the file, not a dict."""
    from vlscale.config import config_from_dict
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError

    ds = json.loads((h.ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket"] = 1
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(ds))
    cfg = config_from_dict({})
    with pytest.raises(DeepSpeedConfigError, match=rf"^{re.escape(str(path))}: unknown key "
                                                   r"zero_optimization\.stage3_prefetch_bucket;"):
        launcher("evaluate").evaluation_ds_config(str(path), cfg, 2, "cpu")


def test_zero_infinity_without_async_io_is_refused_before_the_model_is_built(stage2_run, tmp_path, h):
    """zero3_nvme.json where DeepSpeed's async_io op cannot be built: training's one-line reason, before the
    model is built (it was DeepSpeed's "Unable to JIT load the async_io op" from deepspeed.initialize)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("async_io can be built here")
    proc = evaluate(h, stage2_run, tmp_path / "out", "--deepspeed", "ds_configs/zero3_nvme.json", nproc=1,
                    env=h.base_env(1, VLSCALE_NVME_PATH=tmp_path))
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "zero_optimization.offload_param.device='nvme' (ZeRO-Infinity) needs DeepSpeed's async_io op" in proc.stdout
    assert not HOLDS.search(proc.stdout) and "Unable to JIT load" not in proc.stdout


WRAPPER = """
import atexit, runpy, sys
import torch.distributed as dist

script, *args = sys.argv[1:]
sys.argv = [script, *args]
atexit.register(lambda: print(f"interpreter exit with a process group: {dist.is_initialized()}", flush=True))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    print(f"evaluate.py exited {e.code}; process group left: {dist.is_initialized()}", flush=True)
    raise
"""


def test_ranks_leave_the_process_group_before_the_interpreter_exits(stage2_run, tmp_path, h):
    """evaluate.py on 2 ranks, as from the command line: a successful evaluation destroys the process group
    (left to the interpreter's teardown, gloo aborted a rank at times after the report was written:
    "terminate called without an active exception", the launcher's exit status -6); a failing one leaves
    with os._exit, as train.py does (a peer may be gone or inside a collective), not through that teardown."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    script = h.ROOT / "launchers" / "evaluate.py"
    ok = h.preloaded.run(str(wrapper), [script, "--adapter", stage2_run / "adapter", "--out", tmp_path / "ok",
                                        "--no-progress", "--deepspeed", "ds_configs/zero3.json", "--tasks", "nlvr2",
                                        "train.eval_max_examples=2"],
                         timeout=h.RUN_TIMEOUT_S, nproc=2, env=h.base_env(2), cwd=str(h.ROOT))
    assert ok.returncode == 0, ok.stdout[-4000:]
    assert ok.stdout.count("evaluate.py exited 0; process group left: False") == 2, ok.stdout[-4000:]
    bad = h.preloaded.run(str(wrapper), [script, "--adapter", stage2_run / "adapter", "--out", tmp_path / "bad",
                                         "--no-progress", "--deepspeed", tmp_path / "missing.json"],
                          timeout=h.RUN_TIMEOUT_S, nproc=2, env=h.base_env(2), cwd=str(h.ROOT))
    assert bad.returncode == 1, bad.stdout[-4000:]
    assert "missing.json' does not exist" in bad.stdout
    assert "interpreter exit with a process group" not in bad.stdout and "evaluate.py exited" not in bad.stdout


def test_an_fp16_adapter_on_cpu_is_evaluated_in_fp32_and_says_so(stage2_run, tmp_path, launcher, capsys):
    """No fp16 kernels on CPU: the model is built and evaluated in fp32 (which holds the fp16-trained adapter
    exactly), with a note instead of silently."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(stage2_run / "adapter", adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["run_config"]["train"]["precision"] = "fp16"
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    assert launcher("evaluate").main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--tasks", "nlvr2",
                                      "--no-progress"]) == 0
    assert "trained in fp16, which has no CPU kernels: evaluating in fp32" in capsys.readouterr().err
    assert (tmp_path / "out" / "predictions" / "nlvr2.jsonl").read_text() == \
        (stage2_run / "predictions" / "nlvr2.jsonl").read_text()


def test_an_adapter_that_does_not_fit_is_named_before_the_model_is_built(stage2_run, tmp_path, launcher, monkeypatch):
    """A file missing a tensor is refused from a meta-device build (names and shapes only), before the real
    model is built: for a large sharded model that build takes minutes."""
    import shutil

    from safetensors.torch import load_file, save_file

    import vlscale.modeling.vl_model as vl_model
    from vlscale.engine.checkpoint import ADAPTER_WEIGHTS, CheckpointError

    adapter = tmp_path / "adapter"
    shutil.copytree(stage2_run / "adapter", adapter)
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(adapter / ADAPTER_WEIGHTS))
    built, build = [], vl_model.build_model
    monkeypatch.setattr(vl_model, "build_model", lambda *a, **kw: built.append(str(kw.get("device"))) or build(*a, **kw))
    with pytest.raises(CheckpointError, match=rf"does not fit the model: 1 trainable parameters missing .*{re.escape(dropped)}"):
        launcher("evaluate").main(["--adapter", str(adapter), "--out", str(tmp_path / "out"), "--no-progress"])
    assert built == ["meta"]


@pytest.mark.parametrize("tasks, said", [(",", "names no task"), ("nlvr2,tvqa", r"\['tvqa'\] were not trained")])
def test_tasks_naming_none_or_untrained_ones_are_refused(stage2_run, tmp_path, launcher, tasks, said):
    """``--tasks ,`` evaluated every task, as if it were not given."""
    with pytest.raises(ValueError, match=said):
        launcher("evaluate").main(["--adapter", str(stage2_run / "adapter"), "--out", str(tmp_path / "out"),
                                   "--tasks", tasks, "--no-progress"])
    assert not (tmp_path / "out").exists()
