"""End-to-end runs of launchers/train.py and launchers/evaluate.py on the tiny model (CPU).

Interrupt + refuse + resume, adapter files and their reload, evaluation reproducing training's
predictions, NaN stop, a dead rank, gradient checkpointing, the watchdog, and learning beyond the
text-only baseline. Shared runs come from conftest.RUN_SPECS.
"""

import json
import os
import re
import shutil
import signal
import time

import pytest
import torch

from vlscale.config import config_from_dict, load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.profiling.analytic import estimate_checkpoint, resolve_ds_config


# ----------------------------------------------------------------------------- interrupt / resume

@pytest.fixture(scope="module")
def interrupted(runs, h, tmp_path_factory):
    """``single_2r``'s run (2 ranks) stopped by Ctrl-C (SIGINT to the run's process group, as a terminal
    sends it) after step 1. Forked from the preloaded server like the resume below: ``single_2r`` itself
    runs under torchrun, and test_runner_sigterm.py stops a run through DeepSpeed's launcher.

    -> (output_dir, the step it stopped at, a copy of adapter/ as written at that step); the whole
    output_dir as it was then is copied to ``run_at_stop`` beside it.
    """
    out = tmp_path_factory.mktemp("interrupt") / "run"
    overrides, nproc, _ = h.RUN_SPECS["single_2r"]
    proc = h.start(overrides + [f"output_dir={out}"], nproc=nproc, log_path=out.parent / "log.txt")
    try:
        h.wait_for_steps(out, 1, proc)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out.parent / "log.txt").read_text()
    assert code != 0, log[-3000:]
    assert log.count("SIGINT received: stopping after this step") == 1, log[-3000:]  # rank 0's (every rank's before)
    tag = ckpt.latest_tag(out / "checkpoints")
    assert tag is not None, f"no checkpoint after Ctrl-C:\n{log[-3000:]}"
    step = int(tag[4:])
    assert 1 <= step < 6, f"stopped at step {step}"
    assert [r["step"] for r in h.read_log(out)] == list(range(1, step + 1))
    adapter_copy = out.parent / "adapter_at_stop"
    shutil.copytree(out / "adapter", adapter_copy)
    shutil.copytree(out, out.parent / "run_at_stop")  # for resuming otherwise than the test below does
    return out, step, adapter_copy


def test_ctrl_c_leaves_a_checkpoint_and_resume_matches_an_uninterrupted_run(runs, interrupted, h):
    out, step, _ = interrupted
    overrides, nproc, launcher = h.RUN_SPECS["single_2r"]
    args = overrides + [f"output_dir={out}"]
    # Without --resume the run is refused, and the checkpoint is left alone (every rank runs this check
    # before the process group, so one process shows it without paying for a 2-rank start-up).
    refused = h.launch(args, nproc=1, check=False)
    assert refused.returncode != 0
    assert f"output_dir {str(out)!r} already holds a run's checkpoint" in refused.stdout
    assert "pass --resume" in refused.stdout and "choose another output_dir" in refused.stdout
    assert ckpt.latest_tag(out / "checkpoints") == f"step{step}"
    # --resume on another number of ranks with another global batch is refused before start-up (the data
    # order would change), saying which settings keep it
    refused = h.launch(args + ["--resume"], nproc=1, check=False)
    assert refused.returncode != 0
    assert f"{out / 'checkpoints' / f'step{step}'} was written by 2 ranks with a global batch of 4" in refused.stdout
    assert "this run has 1 rank and a global batch of 2" in refused.stdout
    assert "train.micro_batch_size=4 train.gradient_accumulation_steps=1" in refused.stdout
    assert "Traceback" not in refused.stdout, "refused by the launcher's check, not after building the model"
    assert ckpt.latest_tag(out / "checkpoints") == f"step{step}"
    # (with the same global batch it continues on one process: the next test)
    # --resume continues where it stopped: the remaining steps' losses equal the uninterrupted run's. Without
    # single_2r's evaluation at step 3 and of the test split (resumable changes; neither is read here, and they were
    # 4 of the resume's 15 CPU seconds): the reference's losses, with that evaluation, show it changes no step.
    done = h.launch(args + ["--resume", "train.eval_every=0", "train.test_eval=false"], nproc=nproc)
    assert f"vlscale: resuming at step {step} of 6 from {out / 'checkpoints' / f'step{step}'}\n" in done.stdout
    resumed, reference = h.read_log(out), h.read_log(runs("single_2r"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(reference, resumed, strict=True):
        assert b["task"] == a["task"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {a['step']}"
        assert (b["lr"], b["peft_lr"]) == pytest.approx((a["lr"], a["peft_lr"]), rel=1e-12)
    summary = h.read_json(out / "run_summary.json")
    assert (summary["completed"], summary["stopped"]) == (True, None)  # the resumed run completed: no stop to say
    # how it was made: the start's record kept, and no second one for a resume under the same software and ranks
    assert [p["world_size"] for p in summary["provenance"]] == [2]
    assert summary["provenance"] == ckpt.read_adapter_config(out / "adapter")["provenance"]
    # TensorBoard, across the two processes' event files: each step once, the logged values
    tb = h.tb_scalars(out)
    for key in ("loss", "lr", "grad_norm"):
        assert [s for s, _ in tb[f"train/{key}"]] == list(range(1, 7)), key
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx([r[key] for r in resumed], rel=1e-6), key
    for task in ("vqa", "gqa"):
        steps = [r["step"] for r in resumed if r["task"] == task]
        assert [s for s, _ in tb[f"train/loss_{task}"]] == steps
    final = h.read_json(out / "metrics.json")[-1]
    assert final["step"] == 6
    for task, scores in final["tasks"].items():
        for name, value in scores.items():
            assert tb[f"eval_val/{task}/{name}"][-1] == (6, pytest.approx(value, rel=1e-6))
    assert ckpt.latest_tag(out / "checkpoints") == "step6"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["latest", f"step{step}", "step6"] or kept == ["latest", "step6"] or len(kept) <= 3


def checkpoint_parameters(ckpt_dir, run_config) -> tuple[dict, set, set]:
    """-> ({file name: the module-state tensors' names that are parameters}, trainable names, frozen
    names) of a DeepSpeed checkpoint, the files read with weights_only=True, the names from the run's
    model built again (every alias of a tied parameter)."""
    from vlscale.modeling.vl_model import build_model

    cfg = load_config(str(run_config))
    model = build_model(cfg, vocab_size=cfg_vocab(run_config.parent), device="meta")
    names = dict(model.named_parameters(remove_duplicate=False))
    trainable = {n for n, p in names.items() if p.requires_grad}
    allowed = ckpt.SafeTorchCheckpointEngine.safe_globals()
    found = {}
    for f in sorted(ckpt_dir.glob("*model_states.pt")):
        with torch.serialization.safe_globals(allowed):
            state = torch.load(f, weights_only=True)
        assert not state.get("frozen_param_fragments"), f"{f.name}: DeepSpeed's copy of the frozen weights"
        found[f.name] = {k for k in state["module"] if k in names}
    return found, trainable, set(names) - trainable


def cfg_vocab(out) -> int:
    return json.loads((out / "adapter" / ckpt.ADAPTER_CONFIG).read_text())["vocab_size"]


UNIVERSAL_PROBE = """
import json, sys
from vlscale.config import load_config
from vlscale.engine.distributed import init_distributed
dist = init_distributed()
from vlscale.engine import trainer
from vlscale.engine.deepspeed_config import build_deepspeed_config
cfg = load_config("tiny", sys.argv[2:])
run = trainer.setup_run(cfg, build_deepspeed_config(sys.argv[1], cfg, 1, device_type="cpu"), dist, resume=True,
                        show_progress=False)
opt = run.engine.optimizer.optimizer
got = {"weight_decay": [g["weight_decay"] for g in opt.param_groups], "step": run.step,
       "adam_steps": [float(s["step"]) for s in opt.state.values()],
       "step_tensors": len({id(s["step"]) for s in opt.state.values()}), "times_resumed": len(run.step_times)}
trainer.train(run)
got["times"] = len(run.step_times)
trainer.close(run)
print("RESULT " + json.dumps(got))
"""


def test_a_resume_on_another_number_of_ranks_continues_the_run(runs, interrupted, h, preloaded, tmp_path):
    """single_2r's 2-rank ZeRO-3 checkpoint (interrupted) resumed on one process with the same global
    batch (micro-batch 4): the 2 ranks' partitions are read through DeepSpeed's universal format, and
    the run continues as the uninterrupted 2 ranks do (1e-5: the 1-vs-2-rank tolerance of
    test_zero3.py). DeepSpeed 0.19.8's ZeRO-3 universal load gives every param group group 0's
    hyperparameters and one shared Adam step tensor: after vlscale's resume the no-decay groups have no
    weight decay again, the adapter's groups their own learning rate (train.peft_lr) and each group counts
    its own steps."""
    out, step, _ = interrupted
    one = tmp_path / "run"
    shutil.copytree(out.parent / "run_at_stop", one)
    overrides, _, _ = h.RUN_SPECS["single_2r"]
    script = tmp_path / "probe.py"
    script.write_text(UNIVERSAL_PROBE)
    env = preloaded.one_rank_env()
    args = [*overrides, f"output_dir={one}", "train.micro_batch_size=4", "train.eval_every=0", "train.test_eval=false"]
    proc = preloaded.run(script, [str(h.ROOT / "ds_configs" / "zero3.json"), *args], env=env, cwd=h.ROOT, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    # show_progress=False (--no-progress): none of the conversion's print()s and tqdm bars
    assert "Universal" not in proc.stdout and "it/s]" not in proc.stdout, proc.stdout[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["step"] == step
    decay = load_config("tiny").train.weight_decay  # groups: matrices (adapter's, others'), then vectors (the same)
    assert got["weight_decay"] == [decay, decay, 0.0, 0.0]
    assert got["adam_steps"] == [step] * 4 and got["step_tensors"] == 4
    resumed, reference = h.read_log(one), h.read_log(runs("single_2r"))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(reference, resumed, strict=True):
        assert b["task"] == a["task"]
        assert (b["lr"], b["peft_lr"]) == pytest.approx((a["lr"], a["peft_lr"]), rel=1e-12), f"step {a['step']}"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
    assert not list((one / "checkpoints").glob(".universal-*")), "the converted copy is removed after loading"
    # run_summary.json's step time is this world size's: it was the median over both parts' steps
    assert (got["times_resumed"], got["times"]) == (0, 6 - step)
    # ... and its adapter says so: the start on 2 ranks, then this resume on 1
    made = ckpt.read_adapter_config(one / "adapter")["provenance"]
    assert [(p["world_size"], p.get("from_step")) for p in made] == [(2, None), (1, step)]
    assert json.loads((runs("single_2r") / "run_summary.json").read_text())["step_time_steps"] == 6


def test_checkpoint_files_load_without_unpickling_and_hold_no_frozen_weights(interrupted, h, tmp_path):
    out, step, _ = interrupted
    files = sorted((out / "checkpoints").glob("step*/*.pt"))
    assert files, "DeepSpeed's files are there"
    allowed = ckpt.SafeTorchCheckpointEngine.safe_globals()
    for f in files:
        with torch.serialization.safe_globals(allowed):
            torch.load(f, weights_only=True)
    for f in (out / "checkpoints").glob("step*/client_state_rank*.json"):
        state = json.loads(f.read_text())
        assert {"step", "loader", "rng", "frozen"} <= set(state)
    # ZeRO-3 on 2 ranks: each rank's module state names the trainable parameters (their data is in the
    # optimizer's partitions) and no frozen one; the frozen weights are fingerprinted, not written
    found, trainable, frozen = checkpoint_parameters(out / "checkpoints" / f"step{step}", out / "run_config.yaml")
    assert len(found) == 2
    for name, params in found.items():
        assert params == trainable, name
    saved = json.loads((out / "checkpoints" / f"step{step}" / "client_state_rank0.json").read_text())["frozen"]
    buffers = set(saved) - frozen  # and the frozen CLIP's batch-norm statistics (buffers), nothing else
    assert saved and buffers and {n.rsplit(".", 1)[1] for n in buffers} == {"running_mean", "running_var",
                                                                        "num_batches_tracked"}, buffers
    disk = assert_disk_as_predicted(out / "checkpoints" / f"step{step}", out, 2, h)
    # the universal copy a resume on another number of ranks converts it to first, as predicted (5%)
    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    universal = ckpt._to_universal(copy, f"step{step}", 0)
    written = sum(f.stat().st_size for f in universal.rglob("*") if f.is_file())
    assert abs(disk.universal - written) <= 0.05 * written, (disk.universal, written)


def assert_disk_as_predicted(step_dir, out, world, h):
    """What each rank wrote is what launchers/profile_memory.py's "disk" line predicts (-> the prediction)."""
    cfg = load_config(str(out / "run_config.yaml"))
    disk = estimate_checkpoint(cfg, world, resolve_ds_config(cfg, world, None, device_type="cpu"),
                               vocab_size=cfg_vocab(out))
    written = ckpt.written_bytes(step_dir)
    h.assert_checkpoint_as_predicted(disk, written["tensors"], written["files"])
    return disk


def test_a_resume_builds_the_frozen_weights_again_and_refuses_changed_ones(tmp_path, h):
    """Stage 0, one process, the pretrained mini T5 loaded from a local copy: a checkpoint holds the
    trainable parameters and nothing frozen (DeepSpeed would write the whole model); a backbone file
    changed since the run started is refused, naming the tensor, and the checkpoint is left alone;
    --resume from the same weights moved to another folder rebuilds the backbone from there and
    continues as the uninterrupted run."""
    backbone = tmp_path / "mini-t5"
    shutil.copytree(h.ROOT / "vlscale/assets/backbones/mini-t5", backbone)
    args = h.MINI + [f"model.backbone_path={backbone}", "train.zero_stage=0", "train.micro_batch_size=4",
                     "train.max_steps=4", "train.lr=1e-3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    h.launch(args + [f"output_dir={whole}"])
    h.launch(args + [f"output_dir={stopped}", "--stop-after-steps", "2"])

    found, trainable, frozen = checkpoint_parameters(stopped / "checkpoints" / "step2", stopped / "run_config.yaml")
    assert list(found.values()) == [trainable]
    size = sum(f.stat().st_size for f in (stopped / "checkpoints" / "step2").iterdir())
    backbone_bytes = (backbone / "model.safetensors").stat().st_size
    assert size < backbone_bytes, f"checkpoint {size} B vs the frozen backbone's file {backbone_bytes} B"
    assert_disk_as_predicted(stopped / "checkpoints" / "step2", stopped, 1, h)

    # change one frozen tensor of the backbone's file: refused, naming it
    from safetensors.torch import load_file, save_file

    weights = load_file(str(backbone / "model.safetensors"))
    original = {k: v.clone() for k, v in weights.items()}
    weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"][0, 0] += 0.01
    save_file(weights, str(backbone / "model.safetensors"), metadata={"format": "pt"})
    refused = h.launch(args + [f"output_dir={stopped}", "--resume"], check=False)
    assert refused.returncode != 0
    assert "the frozen weights built now are not those of the run" in refused.stdout
    assert "lm.encoder.block.1.layer.1.DenseReluDense.wo.weight differs" in refused.stdout
    assert "Traceback" not in refused.stdout, "a refusal is its message, not a fault's traceback"
    assert ckpt.latest_tag(stopped / "checkpoints") == "step2"
    assert [r["step"] for r in h.read_log(stopped)] == [1, 2]

    # the same weights again, in another folder (the run's files moved; model.backbone_path may change):
    # the resumed run continues as the uninterrupted one
    moved = tmp_path / "moved" / "mini-t5"
    shutil.copytree(backbone, moved)
    save_file(original, str(moved / "model.safetensors"), metadata={"format": "pt"})
    h.launch(args + [f"output_dir={stopped}", "--resume", f"model.backbone_path={moved}"])
    resumed, reference = h.read_log(stopped), h.read_log(whole)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(reference, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), f"step {a['step']}"

    # another size's tensor under ZeRO-3's own loader: one line naming it (it was a traceback)
    original["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(128, 516)
    save_file(original, str(moved / "model.safetensors"), metadata={"format": "pt"})
    resized = h.launch(h.MINI + [f"model.backbone_path={moved}", "train.zero_stage=3", "train.micro_batch_size=4",
                                 f"output_dir={tmp_path / 'resized'}"], check=False)
    assert resized.returncode == 1 and "Traceback" not in resized.stdout, resized.stdout[-3000:]
    assert (f"vlscale: rank 0: ShardedLoadError: {moved / 'model.safetensors'}: tensor "
            f"'encoder.block.1.layer.1.DenseReluDense.wo.weight' has shape [128, 516]") in resized.stdout


# ----------------------------------------------------------------------------- adapter/

def test_adapter_has_full_shapes_and_reloads_to_the_trained_outputs(runs, interrupted, h):
    """The 2-rank ZeRO-3 adapter at step k, loaded onto a freshly built plain model, gives the loss the
    uninterrupted run logged at step k+1 (computed by the trained model on that step's batch)."""
    from safetensors.torch import load_file

    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine.trainer import _token_cross_entropy_sum, seed_everything
    from vlscale.modeling.vl_model import build_model

    _, step, adapter = interrupted
    meta = ckpt.read_adapter_config(adapter)
    assert meta["step"] == step
    tensors = load_file(str(adapter / ckpt.ADAPTER_WEIGHTS))
    assert tensors and all(t.numel() > 0 for t in tensors.values()), "no 0-size partitions saved"
    assert {n: list(t.shape) for n, t in tensors.items()} == {n: v["shape"] for n, v in meta["parameters"].items()}
    assert meta["trainable_params"] == h.read_json(runs("single_2r") / "run_summary.json")["trainable_params"]

    cfg = config_from_dict(meta["run_config"])
    tok = build_tokenizer(cfg)
    assert len(tok) == meta["vocab_size"]
    seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab_size=meta["vocab_size"])
    # the frozen weights' fingerprint travels with the adapter (evaluate.py checks moved weights by it)
    assert ckpt.frozen_mismatch(meta["frozen"], ckpt.frozen_fingerprint(model)) is None
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if n in tensors}
    ckpt.load_adapter(model, adapter)
    assert any(not torch.equal(fresh[n], p) for n, p in model.named_parameters() if n in fresh), "weights changed"
    model.train()
    whole = load_config("tiny", h.TINY + ["train.micro_batch_size=4"])  # the global batch on one rank
    loader = build_train_loader(whole, tok, 0, 1)
    for _ in range(step):
        next(loader)
    batch = next(loader)
    with torch.no_grad():
        out = model(batch)
    loss = (_token_cross_entropy_sum(out.logits, batch["labels"]) / (batch["labels"] != -100).sum()).item()
    logged = h.read_log(runs("single_2r"))[step]
    assert logged["step"] == step + 1 and batch["task"] == logged["task"]
    assert loss == pytest.approx(logged["loss"], rel=1e-5)


def test_load_adapter_is_strict(tmp_path, runs, h):
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    adapter = runs("single_2r") / "adapter"
    meta = ckpt.read_adapter_config(adapter)
    other = dict(meta["run_config"], peft=dict(meta["run_config"]["peft"], reduction_factor=2))
    seed_everything(0)
    model = build_model(config_from_dict(other), vocab_size=meta["vocab_size"])
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches .*peft\.adapter"):
        ckpt.load_adapter(model, adapter)
    multi = dict(meta["run_config"], peft=dict(meta["run_config"]["peft"], sharing="multiple"))
    model = build_model(config_from_dict(multi), vocab_size=meta["vocab_size"])
    with pytest.raises(ckpt.CheckpointError, match="missing from the file"):
        ckpt.load_adapter(model, adapter)
    with pytest.raises(ckpt.CheckpointError, match="adapter_config.json is missing"):
        ckpt.load_adapter(model, tmp_path)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / ckpt.ADAPTER_WEIGHTS).write_bytes(b"\x08")
    with pytest.raises(ckpt.CheckpointError, match=rf"{ckpt.ADAPTER_WEIGHTS}: not a readable safetensors file"):
        ckpt.load_adapter(model, corrupt)


# ----------------------------------------------------------------------------- evaluate.py

def test_evaluate_reproduces_training_predictions(runs, tmp_path, launcher, capsys, h):
    """evaluate.py rebuilds the model in one plain process (this one) from adapter/ and decodes exactly
    what the 2-rank ZeRO-3 run decoded: its final (synced-rank) validation, and the test split it
    evaluated after training (``train.test_eval``, eval_test/) with the report evaluate.py writes."""
    run = runs("single_2r")
    final = h.read_json(run / "metrics.json")[-1]
    for split, trained_dir in (("val", run), ("test", run / "eval_test")):
        out = tmp_path / split
        assert launcher("evaluate").main(["--adapter", str(run / "adapter"), "--split", split, "--out", str(out),
                                          "--no-progress"]) == 0
        stdout = capsys.readouterr().out
        assert "vqa_score=" in stdout and "exact_match=" in stdout
        for task in ("vqa", "gqa"):
            mine = [json.loads(x) for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
            trained = [json.loads(x) for x in (trained_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]
            assert len(mine) == 8 and {"uid", "prediction", "references"} <= set(mine[0])
            assert mine == trained
        report = h.read_json(out / "eval_metrics.json")
        assert report["split"] == split and report["step"] == final["step"] == 6
        if split == "val":
            assert report["tasks"] == final["tasks"]
        else:  # the same report, but for where each ran: the training's 2 ZeRO-3 ranks, this one process
            trained_report = h.read_json(run / "eval_test" / "eval_metrics.json")
            ran = {"world_size": 2, "zero_stage": 3}, {"world_size": 1, "zero_stage": None}
            for r, where in zip((trained_report, report), ran):
                assert {k: r["settings"].pop(k) for k in where} == where
            assert trained_report == report
    assert "test scores (step 6" in runs.procs["single_2r"].stdout
    # real data: any split name is a file stem (docs/datasets.md), here vqa/minival.json
    root = tmp_path / "data"
    for task in ("vqa", "coco"):
        shutil.copytree(h.ROOT / "tests/fixtures/real_data" / task, root / task)
    (root / "vqa" / "karpathy_val.json").rename(root / "vqa" / "minival.json")
    # ... of an adapter an earlier vlscale made: a note naming both versions, not a refusal
    summary = h.read_json(run / "run_summary.json")
    made = summary["provenance"]
    assert [(p["world_size"], sum(p["devices"].values()), p["data_files"]) for p in made] == [(2, 2, None)]
    assert made[0]["launcher_argv"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    old = shutil.copytree(run / "adapter", tmp_path / "old" / "adapter")
    meta = ckpt.read_adapter_config(old)
    assert meta["provenance"] == made
    meta["provenance"][-1]["versions"]["vlscale"] = "0.0.1"
    (old / ckpt.ADAPTER_CONFIG).write_text(json.dumps(meta))
    capsys.readouterr()
    assert launcher("evaluate").main(["--adapter", str(old), "--split", "minival", "--tasks", "vqa",
                                      "--out", str(tmp_path / "minival"), "--no-progress", "data.source=real",
                                      f"data.root={root}"]) == 0
    assert "evaluate.py: note: the adapter was trained with vlscale 0.0.1 (this is " in capsys.readouterr().err
    mine = (tmp_path / "minival" / "predictions" / "vqa.jsonl").read_text().splitlines()
    assert len(mine) == len(json.loads((root / "vqa" / "minival.json").read_text()))


def test_evaluate_sharded_with_zero3_on_two_ranks(runs, tmp_path, h):
    """evaluate.py --deepspeed ds_configs/zero3.json on 2 ranks builds the model as training does (each rank
    holds half of it: a model no device holds can be evaluated) and decodes exactly what the 2-rank ZeRO-3
    run's final evaluation decoded."""
    run = runs("single_2r")
    out = tmp_path / "sharded"
    proc = h.preloaded.run(str(h.ROOT / "launchers" / "evaluate.py"),
                           ["--deepspeed", "ds_configs/zero3.json", "--adapter", str(run / "adapter"), "--split",
                            "val", "--out", str(out), "--no-progress"],
                           timeout=h.RUN_TIMEOUT_S, nproc=2, env=h.base_env(2), cwd=str(h.ROOT))
    assert proc.returncode == 0, proc.stdout
    found = re.search(r"ZeRO-3 over 2 rank\(s\): rank 0 holds ([\d,]+) of the model's ([\d,]+) parameters", proc.stdout)
    assert found, proc.stdout
    held, total = (int(x.replace(",", "")) for x in found.groups())
    assert 0.45 < held / total < 0.55, (held, total)
    for task in ("vqa", "gqa"):
        assert (out / "predictions" / f"{task}.jsonl").read_text() == (run / "predictions" / f"{task}.jsonl").read_text()
    assert h.read_json(out / "eval_metrics.json")["tasks"] == h.read_json(run / "metrics.json")[-1]["tasks"]


# ----------------------------------------------------------------------------- failures

def test_a_non_finite_gradient_norm_with_a_finite_loss_stops_the_run(tmp_path, h):
    """lr 3000 on the tiny model: at step 11 the loss is finite but the gradient norm is not (it used to
    crash writing train_log.jsonl: 'Out of range float values are not JSON compliant')."""
    out = tmp_path / "gn"
    proc = h.launch(h.TINY + ["train.zero_stage=0", "train.max_steps=30", "train.save_every=2", "train.lr=3000",
                              f"output_dir={out}"], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert re.search(r"NonFiniteLoss: the gradient norm is (nan|inf) at step \d+ \(task '\w+'\) while the loss is",
                     proc.stdout), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and f"the last good checkpoint is {out / 'checkpoints'}" in proc.stdout


def test_nan_loss_stops_the_run_naming_step_and_task(tmp_path, h):
    out = tmp_path / "nan"
    proc = h.launch(h.TINY + ["train.micro_batch_size=4", "train.lr=1e30", "train.warmup_ratio=0", "train.save_every=1",
                          f"output_dir={out}"], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    log = h.read_log(out)
    bad = len(log) + 1
    assert f"at step {bad} (task '" in proc.stdout and "stopping before the update" in proc.stdout
    assert f"the last good checkpoint is {out / 'checkpoints' / f'step{len(log)}'}" in proc.stdout
    assert ckpt.latest_tag(out / "checkpoints") == f"step{len(log)}"
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in log)
    stopped = h.read_json(out / "run_summary.json")  # says why it stopped (it was not written)
    assert stopped["completed"] is False and stopped["steps"] == len(log)
    assert stopped["stopped"]["reason"].startswith(f"NonFiniteLoss: loss is nan at step {bad} (task '")
    assert stopped["stopped"]["checkpoint"] == str(out / "checkpoints" / f"step{len(log)}")


def test_input_errors_are_their_message_without_a_traceback(tmp_path, h):
    """A DeepSpeed file that is not JSON and an output_dir that cannot be created (both found before start-up)
    end the run with one line naming the file or folder, and no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}')
    proc = h.launch(["--deepspeed", str(bad), *h.TINY, f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 1
    assert f"DeepSpeedConfigError: {bad}: not valid JSON" in proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = h.launch([*h.TINY, f"output_dir={blocker / 'run'}"], check=False)
    assert proc.returncode == 1
    assert f"output_dir {str(blocker / 'run')!r} cannot be created" in proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    # a validation file missing: refused before start-up (the output_dir not made), not after the training it
    # would end
    root = tmp_path / "data"
    shutil.copytree(h.ROOT / "tests/fixtures/real_data/gqa", root / "gqa")
    (root / "gqa" / "valid.json").unlink()
    proc = h.launch([*h.TINY, "data.source=real", f"data.root={root}", "data.tasks=[gqa]",
                     f"output_dir={tmp_path / 'noval'}"], check=False)
    assert proc.returncode == 1
    assert re.search(r"DataError: split 'val' not found for gqa: gqa val annotations: .*valid\.json", proc.stdout), \
        proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "noval").exists()


def test_a_dead_rank_makes_the_other_exit(tmp_path, h):
    """Two ranks started as two separate runs (no launcher to clean up); rank 1 is killed; rank 0 must not hang."""
    out = tmp_path / "dead"
    port = h.free_port()
    procs = []
    for rank in (0, 1):
        env = h.base_env(2, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, VLSCALE_DIST_TIMEOUT=30, VLSCALE_WATCHDOG_TIMEOUT=60)
        procs.append(h.start(h.TINY + ["train.micro_batch_size=2", "train.max_steps=500", f"output_dir={out}"], env=env,
                           log_path=tmp_path / f"rank{rank}.txt"))
    try:
        h.wait_for_steps(out, 1, procs[0])
        procs[1].kill()
        t0 = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert code != 0
    assert waited < 100, f"rank 0 took {waited:.0f}s to give up"


def test_sigterm_to_one_rank_stops_every_rank_with_its_exit_code(tmp_path, h):
    """SIGTERM to one rank's pid (``kill PID``): every rank stops after the step with the checkpoint and exits
    143. The other ranks learn of the stop only through the all-reduced flag: they took it for a clean exit 0,
    went into the process group's teardown, and failed there on the rank that had exited ("Connection reset by
    peer", exit 1)."""
    out = tmp_path / "one"
    port = h.free_port()
    procs, logs = [], [tmp_path / f"rank{rank}.txt" for rank in (0, 1)]
    for rank in (0, 1):
        env = h.base_env(2, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port, VLSCALE_DIST_TIMEOUT=60)
        procs.append(h.start(h.TINY + ["train.micro_batch_size=2", "train.max_steps=500", f"output_dir={out}"],
                             env=env, log_path=logs[rank]))
    try:
        h.wait_for_steps(out, 1, procs[0])
        import psutil

        (rank1,) = psutil.Process(procs[1].pid).children()  # the rank, below its preloaded monitor
        rank1.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [143, 143], (codes, texts[0][-3000:])
    step = len(h.read_log(out))
    assert f"stopped at step {step} (signal)" in texts[0] and "Traceback" not in texts[0], texts[0][-3000:]
    assert ckpt.latest_tag(out / "checkpoints") == f"step{step}"


def test_watchdog_ends_a_stuck_process(h, preloaded, tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text("import time\nfrom vlscale.engine.distributed import Watchdog\n"
                      "w = Watchdog(1.0, rank=5).start()\ntime.sleep(30)\n")
    run = preloaded.start(script, [], env=h.base_env(), cwd=h.ROOT)  # forked: the server is ready
    t0 = time.monotonic()
    try:
        code = run.wait(timeout=60)
    finally:
        run.kill()
    assert code == 3 and time.monotonic() - t0 < 20
    assert "rank 5: no progress" in run.output()


def test_sigterm_asks_to_stop_like_ctrl_c_and_a_second_one_aborts(capsys):
    """SIGTERM (a scheduler's preemption) takes the Ctrl-C path that the end-to-end test above runs:
    the first asks to stop after the step (with a checkpoint); a repeat within the debounce window is
    the launcher forwarding the same request; a later one aborts."""
    from vlscale.engine.distributed import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        assert "SIGTERM received: stopping after this step" in capsys.readouterr().err
        signal.raise_signal(signal.SIGTERM)  # forwarded by a launcher: the same request
        stop.DEBOUNCE_S = 0.0
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM: aborting"):
            signal.raise_signal(signal.SIGTERM)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_single_process_group_needs_no_port(monkeypatch):
    """Without a launcher the 1-rank group rendezvous through a file store in a fresh folder, so runs
    started together (replicate.py's rows) cannot race for one "free" TCP port (EADDRINUSE seen in CI).
    Every 1-process run of this suite (single_1p, multi_1p, the NaN run, the learning run) uses it."""
    from vlscale.engine.distributed import _single_process_env

    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    # a copy of the environment for this test: what the function sets must not reach later launches
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in launcher_vars})
    first, second = _single_process_env(), _single_process_env()
    assert first.startswith("file://") and first != second
    for url in (first, second):
        folder = os.path.dirname(url[len("file://"):])
        assert os.path.isdir(folder) and not os.listdir(folder)
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    # DeepSpeed reads the rest of a launcher's variables whatever the store: all are set
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536


# ----------------------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_gives_the_same_gradients(h):
    """Each gradient with checkpointing is within 3 E of the plain model's, E the plain fp32 model's largest gradient
    error against its fp64 copy: |ckpt - plain| <= E_ckpt + E, and E_ckpt <= 2 E (STYLE.md's rule; 0.90 E here).
    A bias's gradient sums over every token, so its error follows the sum's terms, not its own size: rtol=1e-5,
    atol=1e-7 held by a margin of 0.5 here (projector.feat.0.bias, 3.0e-7 apart at a gradient of ~0.03)."""
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    grads = []
    for gc, dtype in ((False, torch.float64), (False, torch.float32), (True, torch.float32)):
        cfg = load_config("tiny", h.TINY + ["train.micro_batch_size=4", f"train.gradient_checkpointing={gc}"])
        tok = build_tokenizer(cfg)
        seed_everything(0)
        model = build_model(cfg, vocab_size=len(tok))
        with torch.no_grad():  # away from the identity init, so the adapters' own gradients matter
            for n, p in model.named_parameters():
                if p.requires_grad and "peft" in n:
                    p.add_(0.05 * torch.randn_like(p))
        model.to(dtype).train()
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in next(build_train_loader(cfg, tok, 0, 1)).items()}
        model(batch).loss.backward()
        grads.append({n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad})
        assert model.lm.is_activation_checkpointing == gc
    exact, plain, ckpt = grads
    assert exact.keys() == plain.keys() == ckpt.keys() and len(plain) > 10
    err = max((plain[n] - exact[n]).abs().max() for n in exact)
    for n in exact:
        assert (ckpt[n] - plain[n]).abs().max() <= 3 * err, n
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "peft" in n)
