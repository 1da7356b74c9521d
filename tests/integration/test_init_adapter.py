"""A new run that starts from a trained adapter (``train.init_adapter=DIR``, a warm start).

One tiny run with an adapter per task (2 steps, both tasks drawn) writes adapter A. A probe forked from the preloaded
server builds runs with ``train.init_adapter=A`` through ``trainer.setup_run`` and compares their trainable tensors,
gathered to full shapes before the first step, with A's file: on one process at every ZeRO stage, and on 2 ranks at
ZeRO-3 (each rank holding a slice). launchers/train.py from A records A's path and sha256, and a --resume of it
continues its checkpoint without reading A (moved away). A model or tasks that differ, and a folder missing or
unreadable, are refused before the run starts, naming the setting or the path.
"""

import hashlib
import json
import shutil

import pytest

from vlscale.config import ConfigError, load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.engine import trainer

MULTI = ["peft.sharing=multiple", "train.micro_batch_size=4", "train.max_steps=2"]


@pytest.fixture(scope="module")
def adapter(h, tmp_path_factory):
    """Adapter A: the tiny model with an adapter per task, trained 2 steps (gqa, then vqa)."""
    out = tmp_path_factory.mktemp("init_adapter") / "a"
    h.launch([*h.TINY, *MULTI, f"output_dir={out}"])
    assert {r["task"] for r in h.read_log(out)} == {"vqa", "gqa"}, "each task's adapter trained"
    return out / "adapter"


def config(h, adapter, *overrides):
    return load_config("tiny", [*h.TINY, *MULTI, f"train.init_adapter={adapter}", *overrides])


PROBE = """
import json, sys
import torch
from safetensors.torch import load_file
from vlscale.config import load_config
from vlscale.engine.distributed import init_distributed
dist = init_distributed()
from vlscale.engine import checkpoint as ckpt, trainer
from vlscale.engine.deepspeed_config import build_deepspeed_config

adapter, root, stages, overrides = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
saved = load_file(f"{adapter}/{ckpt.ADAPTER_WEIGHTS}")
result = {}
for stage in stages:
    seed, subset = stage.endswith("seed4"), stage.endswith("gqa")
    cfg = load_config("tiny", [*overrides, f"train.init_adapter={adapter}", f"train.zero_stage={stage[0]}",
                               f"output_dir={root}/{stage}", *(["train.seed=4"] if seed else []),
                               *(["data.tasks=[gqa]"] if subset else [])])
    ds = build_deepspeed_config("ds_configs/zero3.json", cfg, dist.world_size, device_type="cpu")
    try:
        run = trainer.setup_run(cfg, ds, dist, show_progress=False)
    except ckpt.CheckpointError as e:
        result[stage] = {"refused": str(e)}
        continue
    state = ckpt.gather_trainable_state_dict(run.model, dist.rank)  # full shapes, on rank 0
    sliced = [n for n, p in ckpt.trainable_parameters(run.model)
              if ckpt.is_partitioned(p) and p.ds_tensor.numel() < p.ds_numel]
    if dist.rank == 0:
        result[stage] = {"names": sorted(state),
                         "equal": [n for n in saved if n in state and torch.equal(state[n], saved[n])],
                         "step": run.step, "engine_steps": run.engine.global_steps,
                         "scheduler_epoch": run.engine.lr_scheduler.last_epoch, "sliced": len(sliced)}
    trainer.close(run)
if dist.rank == 0:  # the ranks share the log: rank 1's (empty) line came last, now and then
    print("RESULT " + json.dumps(result))
"""


def probe(h, preloaded, adapter, tmp_path, stages, nproc=1) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = preloaded.one_rank_env() if nproc == 1 else h.base_env(nproc)
    proc = preloaded.run(script, [adapter, tmp_path, ",".join(stages), *h.TINY, *MULTI], nproc=nproc, env=env,
                         cwd=h.ROOT, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_started_from(result: dict, adapter, sliced: bool = False) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(adapter / ckpt.ADAPTER_WEIGHTS))
    trained = [n for n, t in saved.items() if n.startswith("peft.") and ".up_weight_" in n and t.abs().sum() > 0]
    assert trained, "A's adapters moved from their identity start (an up-projection of zeros would prove nothing)"
    assert result["names"] == sorted(saved), set(saved) ^ set(result["names"])
    assert sorted(result["equal"]) == sorted(saved), set(saved) - set(result["equal"])
    assert (result["step"], result["engine_steps"], result["scheduler_epoch"]) == (0, 0, 0), "a new run"
    assert (result["sliced"] > 0) == sliced


def test_every_zero_stage_starts_from_the_adapters_tensors(h, preloaded, adapter, tmp_path):
    """One process, stages 0-3: the run's trainable tensors before its first step are A's, exactly; with another
    train.seed the random frozen weights are other than those A was trained on: refused, naming the tensor."""
    got = probe(h, preloaded, adapter, tmp_path, ["0", "1", "2", "3", "0seed4"])
    for stage in "0123":
        assert_started_from(got[stage], adapter)
    refused = got["0seed4"]["refused"]
    assert refused.startswith(f"train.init_adapter={str(adapter)!r}: the frozen weights built now are not those the "
                              f"adapter was trained on: "), refused
    assert "train.seed, which is 4 here and was 3 in the adapter's run" in refused


def test_two_ranks_at_zero3_load_the_adapter_into_their_partitions(h, preloaded, adapter, tmp_path):
    """... and a run of one of A's two tasks (data.tasks=[gqa]) starts from that task's weights and the shared ones,
    A's vqa weights left out (the model has none)."""
    from safetensors.torch import load_file

    got = probe(h, preloaded, adapter, tmp_path, ["3", "3gqa"], nproc=2)
    assert_started_from(got["3"], adapter, sliced=True)
    saved = load_file(str(adapter / ckpt.ADAPTER_WEIGHTS))
    vqa = [n for n in saved if n.startswith("peft.") and n.endswith("_vqa")]
    gqa = [n for n in saved if n.startswith("peft.") and n.endswith("_gqa")]
    assert vqa and gqa
    kept = sorted(set(saved) - set(vqa))
    assert got["3gqa"]["names"] == kept and sorted(got["3gqa"]["equal"]) == kept, got["3gqa"]


def test_train_py_records_the_adapter_and_a_resume_does_not_read_it(h, adapter, tmp_path):
    a = tmp_path / "a_adapter"
    shutil.copytree(adapter, a)
    out = tmp_path / "b"
    args = [*h.TINY, *MULTI, f"train.init_adapter={a}", f"output_dir={out}"]
    h.launch([*args, "--stop-after-steps", "1"])
    assert [r["step"] for r in h.read_log(out)] == [1]
    record = {"path": str(a.resolve()), "step": 2, "size": (a / ckpt.ADAPTER_WEIGHTS).stat().st_size,
              "mtime_ns": (a / ckpt.ADAPTER_WEIGHTS).stat().st_mtime_ns,
              "sha256": hashlib.sha256((a / ckpt.ADAPTER_WEIGHTS).read_bytes()).hexdigest()}
    assert h.read_json(out / "run_summary.json")["provenance"][0]["init_adapter"] == record
    assert ckpt.read_adapter_config(out / "adapter")["provenance"][0]["init_adapter"] == record

    # starting again without --resume is refused as for any run's folder
    proc = h.launch(args, check=False)
    assert proc.returncode == 1 and "already holds a run's checkpoint" in proc.stdout, proc.stdout[-3000:]
    # --resume continues the checkpoint: the adapter is neither read (moved away) nor recorded again
    a.rename(tmp_path / "moved")
    h.launch([*args, "--resume"])
    assert [r["step"] for r in h.read_log(out)] == [1, 2]
    segments = h.read_json(out / "run_summary.json")["provenance"]
    assert segments[0]["init_adapter"] == record and all("init_adapter" not in s for s in segments[1:])
    # a resume that leaves the setting out (`--resume output_dir=...` with the run's other settings) is not refused
    saved = load_config(str(out / "run_config.yaml"))
    assert saved.train.init_adapter == str(a)
    trainer._check_resumable(saved, load_config(str(out / "run_config.yaml"), ["train.init_adapter=null"]), out)


def test_another_model_or_tasks_is_refused_naming_the_setting(h, adapter):
    where = f"train.init_adapter={str(adapter)!r}: "
    for override, value, now in (("peft.method", "'adapter'", "'lora'"), ("peft.reduction_factor", "4", "8")):
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.check_init_adapter(config(h, adapter, f"{override}={now.strip(chr(39))}"))
        assert str(e.value).startswith(f"{where}the adapter was trained with {override}={value}, the model is built "
                                       f"with {override}={now}; "), str(e.value)
    with pytest.raises(ckpt.CheckpointError) as e:  # an adapter per task: its tasks, or some of them
        ckpt.check_init_adapter(config(h, adapter, "data.tasks=[vqa,caption]"))
    assert str(e.value).startswith(
        f"{where}the adapter was trained with data.tasks=['vqa', 'gqa'], this run has data.tasks=['vqa', 'caption']: "
        f"['caption'] only in this run (no weights to start from). The adapter holds weights of each task (e.g. "
        f"peft."), str(e.value)
    assert ckpt.check_init_adapter(config(h, adapter, "data.tasks=[gqa,vqa]"))["step"] == 2  # their order is free
    assert ckpt.check_init_adapter(config(h, adapter, "data.tasks=[gqa]"))["step"] == 2  # a subset (probe: loaded)


def test_a_shared_adapter_starts_other_tasks(h, tmp_path):
    """peft.sharing=single: every weight is shared by the tasks, so any tasks start from it."""
    from vlscale.data import build_tokenizer
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", [*h.TINY, "peft.sharing=single"])
    tokenizer = build_tokenizer(cfg)
    ckpt.save_adapter(build_model(cfg, vocab_size=len(tokenizer)), tmp_path / "single", cfg, tokenizer=tokenizer)
    other = load_config("tiny", [*h.TINY, "peft.sharing=single", "data.tasks=[caption]",
                                 f"train.init_adapter={tmp_path / 'single'}"])
    assert ckpt.check_init_adapter(other)["run_config"]["data"]["tasks"] == ["vqa", "gqa"]


def test_a_missing_or_unreadable_adapter_is_refused_naming_the_path(h, adapter, tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(ckpt.CheckpointError, match=f"^train.init_adapter='{gone}': {gone} does not exist"):
        ckpt.check_init_adapter(config(h, gone))
    with pytest.raises(ckpt.CheckpointError, match=f"pass {adapter}$"):  # the run's folder, not its adapter/
        ckpt.check_init_adapter(config(h, adapter.parent))
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / ckpt.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ckpt.CheckpointError, match=f"^train.init_adapter='{broken}': {weights}: not a readable "
                                                   "safetensors file"):
        ckpt.check_init_adapter(config(h, broken))
    weights.unlink()
    weights.mkdir()  # unreadable as a file (the tests run as root, which chmod does not stop)
    with pytest.raises(ckpt.CheckpointError, match=f"^train.init_adapter='{broken}': {weights}: not a readable"):
        ckpt.check_init_adapter(config(h, broken))
    (broken / ckpt.ADAPTER_CONFIG).write_text("{")
    with pytest.raises(ckpt.CheckpointError, match=f"^train.init_adapter='{broken}': {broken / ckpt.ADAPTER_CONFIG}: "
                                                   "not valid JSON"):
        ckpt.check_init_adapter(config(h, broken))
    with pytest.raises(ConfigError, match="train.init_adapter='' is empty"):
        config(h, "")


def test_launcher_refuses_before_start_in_one_line(h, adapter, tmp_path):
    proc = h.launch([*h.TINY, *MULTI, f"train.init_adapter={adapter}", "peft.method=lora",
                     f"output_dir={tmp_path / 'b'}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert (f"vlscale: rank 0: CheckpointError: train.init_adapter={str(adapter)!r}: the adapter was trained with "
            f"peft.method='adapter', the model is built with peft.method='lora'") in proc.stdout
    assert " -> " not in proc.stdout and not (tmp_path / "b").exists(), "refused before start-up"


def test_an_adapter_of_another_precision_is_said_and_its_frozen_fingerprint_not_compared(h, adapter, capsys):
    """A bf16 run's adapter holds bf16 tensors: an fp32 run starts from them (exact in fp32), said at start-up; the
    fingerprint of the adapter's frozen weights is of bf16, so not compared (it would differ by rounding alone)."""
    meta = ckpt.read_adapter_config(adapter)
    meta["run_config"]["train"]["precision"] = "bf16"
    frozen = {name: [s + 1.0, a] for name, (s, a) in meta["frozen"].items()}  # as bf16 rounding moves them
    trainer.check_init_frozen(config(h, adapter), meta, frozen)
    assert (f"vlscale: note: train.init_adapter={str(adapter)!r} was trained with train.precision=bf16, this run has "
            f"fp32: it starts from the adapter's bf16 weights (exact in fp32)") in capsys.readouterr().out
    meta["run_config"]["train"]["precision"] = "fp32"
    with pytest.raises(ckpt.CheckpointError, match="the frozen weights built now are not those the adapter was "):
        trainer.check_init_frozen(config(h, adapter), meta, frozen)
