"""The training loop's input checks and gradient equivalences that need no DeepSpeed engine."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.engine import trainer
from vlscale.engine.trainer import _plain_grad_norm, check_something_trains, lr_multiplier, optimizer_groups

TINY = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false", "model.vision_pretrained=null",
        "model.feature_source=images", "data.tasks=[vqa,gqa]", "data.synthetic_train=16", "data.synthetic_eval=4",
        "train.precision=fp32", "train.seed=3"]
NOTHING = ["peft.method=none", "peft.train_layer_norms=false", "peft.train_projection=false"]


def test_a_run_that_trains_nothing_is_refused_in_one_line_before_anything_loads():
    """Was a ValueError from optimizer_groups, after the model was built: a traceback."""
    with pytest.raises(ConfigError, match=r"nothing to train: peft\.method=none .*peft\.train_projection"):
        check_something_trains(load_config("tiny", TINY + NOTHING))
    for extra in (["peft.train_projection=true"], ["peft.extra_prompts=true"],
                  ["peft.train_lm=true", "peft.train_layer_norms=true"]):  # (train_lm with norms frozen: refused)
        check_something_trains(load_config("tiny", TINY + NOTHING + extra))  # something trains: accepted
    check_something_trains(load_config("tiny", TINY))

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        optimizer_groups(frozen)


GPUS = {"Tesla V100-SXM2-16GB": (7, 0), "Tesla T4": (7, 5), "NVIDIA A10": (8, 6), "NVIDIA H100 80GB HBM3": (9, 0)}


@pytest.mark.parametrize("name", GPUS)
def test_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu_before_the_model_is_built(name, monkeypatch):
    """torch.cuda.is_bf16_supported() and DeepSpeed's check count emulation: a V100 or T4 trained a bf16 preset
    emulated (slowly), unsaid."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[name])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(trainer, "resolve_batch", lambda *a: pytest.fail("got past the precision check"))
    cuda = trainer.DistInfo(0, 1, 0, torch.device("cuda:0"), "cuda", "nccl")
    bf16 = load_config("tiny", TINY + ["train.precision=bf16"])
    if GPUS[name] < (8, 0):
        major, minor = GPUS[name]
        with pytest.raises(ConfigError, match=rf"^train\.precision=bf16 on {name} \(compute capability "
                                              rf"{major}\.{minor}\).*set train\.precision=fp32, or fp16"):
            trainer.setup_run(bf16, {}, cuda)
    else:
        with pytest.raises(pytest.fail.Exception, match="got past"):
            trainer.setup_run(bf16, {}, cuda)
    for precision in ("fp16", "fp32"):  # and bf16 on the CPU: no GPU asked
        with pytest.raises(pytest.fail.Exception, match="got past"):
            trainer.setup_run(load_config("tiny", TINY + [f"train.precision={precision}"]), {}, cuda)
    with pytest.raises(pytest.fail.Exception, match="got past"):
        trainer.setup_run(bf16, {}, trainer.DistInfo(0, 1, 0, torch.device("cpu"), "cpu", "gloo"))


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_imports_the_model_code_before_rank_0s_checks(rank, monkeypatch, tmp_path):
    """Rank 0's disk check builds the model on meta, importing transformers' modelling (~2.5 s); the other ranks
    imported it only in the build, after waiting for those checks, while rank 0 waited for them (2 ranks, the
    default: 2.5 s more to the first step)."""
    calls = []
    monkeypatch.setattr(trainer, "import_model_code", lambda cfg: calls.append("import"))
    monkeypatch.setattr(trainer.ckpt, "lock_output_dir", lambda out: pytest.fail(f"rank 0 checks, having {calls}"))
    monkeypatch.setattr(trainer, "_raise_on_every_rank", lambda error: pytest.fail(f"rank 1 waits, having {calls}"))
    cfg = load_config("tiny", TINY + [f"output_dir={tmp_path}"])
    with pytest.raises(pytest.fail.Exception, match=rf"rank {rank} \w+, having \['import'\]$"):
        trainer.setup_run(cfg, {"train_batch_size": 2}, trainer.DistInfo(rank, 2, rank, torch.device("cpu"), "cpu",
                                                                         "gloo"))


def test_gradient_checkpointing_keeps_bart_lora_gradients_with_dropout():
    """BART with LoRA at the paper's dropout (0.1) and the model's dropout on: checkpointing recomputes each
    layer with the dropout masks of the first pass, so gradients equal those of a run without it
    (tests/integration/test_engine.py covers T5 with adapters, without dropout)."""
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    grads = []
    for gc in (False, True):
        cfg = load_config("tiny", TINY + ["model.backbone=tiny-bart", "model.dropout=0.1", "peft.method=lora",
                                          "peft.lora_rank=4", "peft.lora_dropout=0.1", "peft.sharing=multiple",
                                          "train.micro_batch_size=2", f"train.gradient_checkpointing={gc}"])
        tok = build_tokenizer(cfg)
        seed_everything(0)
        model = build_model(cfg, vocab_size=len(tok))
        with torch.no_grad():  # LoRA's B starts at zero: move it so A's gradients are not all zero
            for n, p in model.named_parameters():
                if p.requires_grad and "lora" in n:
                    p.add_(0.05 * torch.randn_like(p))
        model.train()
        batch = next(build_train_loader(cfg, tok, 0, 1))
        torch.manual_seed(5)
        model(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.lm.is_activation_checkpointing == gc
    assert grads[0].keys() == grads[1].keys()
    assert sum("lora" in n for n in grads[0]) >= 8
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_step_whose_micro_batches_mix_tasks_is_refused_naming_them_before_the_engine_runs():
    """One step is one task (the sampler draws it for all ranks; the PEFT modules of the task are the ones
    stepped): micro-batches of several tasks are refused, naming the step and the tasks, before any forward pass
    or collective."""

    from vlscale.engine.trainer import train_step

    class Engine:  # any use of the engine fails the test
        def __getattr__(self, name):
            pytest.fail(f"the engine was used: {name}")

        def __call__(self, *args, **kwargs):
            pytest.fail("the engine ran a forward pass")

    run = SimpleNamespace(engine=Engine(), step=4, dist=SimpleNamespace(world_size=1, device=torch.device("cpu")))
    batches = [{"task": "vqa"}, {"task": "gqa"}, {"task": "vqa"}, {"task": "nlvr2"}]
    with pytest.raises(RuntimeError, match=r"^step 5: the micro-batches of one step mix tasks \['gqa', 'nlvr2', "
                                           r"'vqa'\]; the loader must keep one task per step$"):
        train_step(run, batches)


def test_the_zero0_gradient_norm_finds_the_trainable_parameters_once():
    """It walked the whole model (CLIP, the LM, every frozen parameter) each step to find the trainable ones:
    about a millisecond of a 40 ms tiny step at ZeRO-0, the largest part of the loop's own work there."""

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model(torch.randn(5, 3)).square().sum().backward()
    run = SimpleNamespace(model=model, trainable=None)
    norm = _plain_grad_norm(run)
    assert float(norm) == pytest.approx(float(torch.cat([p.grad.flatten() for p in model[1].parameters()]).norm()))

    def walked(*args, **kwargs):
        raise AssertionError("the model was walked again for its trainable parameters")

    model.named_parameters = walked
    assert _plain_grad_norm(run) == norm


@pytest.mark.parametrize("total, ratio, warmup", [(10, 0.25, 3), (10, 0.0, 0), (4, 0.1, 1)])
def test_the_lr_schedule_warms_up_over_the_ceiling_of_its_share_then_decays_linearly(total, ratio, warmup):
    """Linear warm-up to 1 over ceil(warmup_ratio x total) updates, then linear decay towards 0; no update runs
    at lr 0 (lr_multiplier's docstring)."""
    f = lr_multiplier(total, ratio)
    lrs = [f(s) for s in range(total)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup:] == pytest.approx([(total - s) / (total - warmup) for s in range(warmup, total)])
    assert max(lrs) == pytest.approx(1.0) and min(lrs) > 0


def test_training_clip_alone_is_something_to_train():
    check_something_trains(load_config("tiny", TINY + NOTHING + ["peft.train_vision=true"]))


def test_bitfit_alone_is_something_to_train_on_bart_not_on_t5():
    """peft.bias=all trains every bias (BitFit's set): BART's linear layers have them; was refused as nothing."""
    check_something_trains(load_config("tiny", TINY + NOTHING + ["peft.bias=all", "model.backbone=tiny-bart"]))
    with pytest.raises(ConfigError, match="nothing to train: .*peft.bias=all trains no bias of T5"):
        check_something_trains(load_config("tiny", TINY + NOTHING + ["peft.bias=all"]))
    for bias in ("lora_only", "none"):  # lora_only: BART's LoRA projections' biases, and there is no LoRA
        with pytest.raises(ConfigError, match=r"nothing to train: .*set one of them true \(or, on BART, "
                                              r"peft\.bias=all: its biases alone, BitFit\)$"):  # nothing of T5
            check_something_trains(load_config("tiny", TINY + NOTHING + [f"peft.bias={bias}",
                                                                         "model.backbone=tiny-bart"]))


def test_task_steps_update_only_the_shared_groups_and_those_of_the_step_s_task():

    from vlscale.engine.trainer import TaskSteps

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            self.stepped.append([g.get("task") for g in self.param_groups])
            return super().step(closure)

    shared, a, b = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = Recording([{"params": [shared]}, {"params": [a], "task": "vqa"}, {"params": [b], "task": "gqa"}], lr=0.5)
    opt.stepped = []
    steps = TaskSteps.install(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt)))  # under DeepSpeed's wrappers
    for p in (shared, a, b):
        p.grad = torch.ones(2)
    steps.task = "vqa"
    opt.step()
    assert opt.stepped == [[None, "vqa"]] and len(opt.param_groups) == 3  # the groups are restored after the step
    assert shared.tolist() == a.tolist() == [0.5, 0.5] and b.tolist() == [1.0, 1.0]  # gqa's weights not touched
    only_other = Recording([{"params": [], "task": "vqa"}, {"params": [b], "task": "gqa"}], lr=0.5)
    only_other.stepped = []
    steps = TaskSteps.install(SimpleNamespace(optimizer=only_other))
    steps.task = "vqa"  # ZeRO steps a group at a time: the kept groups hold no parameters now
    assert only_other.step() is None and only_other.stepped == [] and b.tolist() == [1.0, 1.0]
    assert TaskSteps.install(SimpleNamespace(optimizer=torch.optim.SGD([shared], lr=0.1))) is None  # no task groups


def test_a_resume_may_change_the_resumable_settings():
    from vlscale.engine.trainer import RESUMABLE_CHANGES, _check_resumable

    saved = load_config("tiny", TINY)
    _check_resumable(saved, load_config("tiny", TINY + ["train.max_steps=7", "output_dir=elsewhere"]), "run_config.yaml")
    assert "train.max_steps" in RESUMABLE_CHANGES
    # how many threads read the images ahead changes no batch (tests/unit/test_read_ahead.py)
    _check_resumable(saved, load_config("tiny", TINY + ["data.read_ahead_threads=3"]), "run_config.yaml")
    with pytest.raises(ConfigError, match=r"--resume: train\.seed=4 differs from the checkpointed run's train\.seed=3"):
        _check_resumable(saved, load_config("tiny", TINY + ["train.seed=4"]), "run_config.yaml")


def test_a_resume_may_change_a_setting_neither_run_reads():
    """replicate.py gave every row every method's widths until c4219db, then only its method's: an adapter row
    interrupted before and resumed after was refused for peft.lora_rank, which an adapter run never reads."""
    from vlscale.engine.trainer import _check_resumable

    saved = load_config("tiny", TINY + ["peft.method=adapter", "peft.lora_rank=21"])
    _check_resumable(saved, load_config("tiny", TINY + ["peft.method=adapter"]), "run_config.yaml")
    with pytest.raises(ConfigError, match=r"--resume: peft\.lora_rank=\d+ differs .* peft\.lora_rank=21"):
        _check_resumable(load_config("tiny", TINY + ["peft.method=lora", "peft.lora_rank=21"]),
                         load_config("tiny", TINY + ["peft.method=lora"]), "run_config.yaml")


def test_a_resume_without_the_run_s_config_names_the_run_s_own_file_to_give(tmp_path):
    """`--resume output_dir=X` of a `--config tiny` run (the preset left out) was refused naming model.backbone and
    six more keys, with no word of the run_config.yaml that resumes it."""
    from vlscale.engine.trainer import _check_resumable

    saved = load_config("tiny", TINY + [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"resume with the same settings \(only"):  # no run_config.yaml: no hint
        _check_resumable(saved, load_config(None, [f"output_dir={tmp_path}"]), "client_state_rank0.json")
    (tmp_path / "run_config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"; resume with the same settings \(the run's own: --config "
                                          rf"{tmp_path}/run_config\.yaml --resume\) \(only"):
        _check_resumable(saved, load_config(None, [f"output_dir={tmp_path}"]), "client_state_rank0.json")


def test_a_resume_of_a_moved_run_names_the_run_config_yaml_where_the_run_is_now(tmp_path):
    """output_dir may change on --resume (a run folder moved): the hint names the file in the new output_dir, not
    in the checkpointed run's."""
    from vlscale.engine.trainer import _check_resumable

    saved = load_config("tiny", TINY + [f"output_dir={tmp_path / 'old'}"])
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "run_config.yaml").write_text("")
    with pytest.raises(ConfigError, match=rf"\(the run's own: --config {tmp_path}/new/run_config\.yaml --resume\)"):
        _check_resumable(saved, load_config(None, [f"output_dir={tmp_path / 'new'}"]), "client_state_rank0.json")


def test_a_resume_drops_the_log_lines_and_metrics_past_its_checkpoint(tmp_path):
    import json

    from vlscale.engine.trainer import _truncate_logs

    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    (tmp_path / "metrics.json").write_text(json.dumps([{"step": 2, "vqa": 0.1}, {"step": 4, "vqa": 0.2}]))
    _truncate_logs(tmp_path, 2)  # the checkpoint's step stays: it is not redone
    assert [json.loads(ln)["step"] for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == [{"step": 2, "vqa": 0.1}]


def test_a_resume_ends_the_logs_last_record_with_its_newline(tmp_path, capsys):
    """A write cut between a record and its newline leaves a whole last record: the resumed run's next append
    starts a line of its own (joined to it, both would be one torn line, dropped at the next resume). A blank line
    is no record, and not a torn one."""
    import json

    from vlscale.engine.trainer import _truncate_logs

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n\n" + json.dumps({"step": 2, "loss": 1.0}))
    _truncate_logs(tmp_path, 2)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3]
    assert capsys.readouterr().out == ""


def test_a_resume_says_which_logged_steps_it_drops_to_train_again(tmp_path, capsys):
    """SIGKILL at step 6 after the checkpoint of step 4: steps 5-6 left train_log.jsonl without a word."""
    import json

    from vlscale.engine.trainer import _truncate_logs

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    _truncate_logs(tmp_path, 6)  # a stop with a checkpoint: nothing past it, nothing said
    assert capsys.readouterr().out == ""
    _truncate_logs(tmp_path, 4)
    assert capsys.readouterr().out.endswith("train_log.jsonl: dropping step(s) 5-6, logged after the checkpoint of "
                                            "step 4; they are trained again\n")


def test_a_resume_reads_the_log_line_by_line(tmp_path):
    """A multi-day run's train_log.jsonl (1M steps: 170 MB) was read whole and held as lines and records, ~4x its
    size in memory on rank 0 (200k lines: 144 MB at the peak); streamed, the peak is a line's."""
    import json
    import tracemalloc

    from vlscale.engine.trainer import _truncate_logs

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "task": "vqa", "loss": 1.0}) + "\n" for s in range(1, 5001)))
    size = log.stat().st_size
    tracemalloc.start()
    try:
        _truncate_logs(tmp_path, 4999)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 4, (peak, size)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == list(range(1, 5000))


def test_a_resume_drops_a_log_line_cut_short_by_a_kill_or_a_full_disk(tmp_path, capsys):
    """A SIGKILL (or ENOSPC) mid-append leaves a torn last line: --resume was a JSONDecodeError traceback."""
    import json

    from vlscale.engine.trainer import _truncate_logs

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _truncate_logs(tmp_path, 2)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]
    assert "dropping 1 line(s) that are not a whole record" in capsys.readouterr().out


def test_a_resume_drops_a_log_line_that_parses_but_is_no_step_record(tmp_path, capsys):
    """A line that is JSON but no record of a step (no step, a step that is no number) is dropped as a torn one is:
    a KeyError or TypeError traceback after the model loaded otherwise."""
    import json

    from vlscale.engine.trainer import _truncate_logs

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"loss": 1.0}\n[2]\n{"step": null}\n{"step": "x"}\n{"step": 2}\n')
    _truncate_logs(tmp_path, 2)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]
    assert "dropping 4 line(s) that are not a whole record" in capsys.readouterr().out


def test_a_resume_on_other_training_data_is_refused_before_the_model_is_built(tmp_path):
    import json

    from vlscale.data.multitask import MultitaskSampler
    from vlscale.data.real import DataError
    from vlscale.engine.trainer import check_resumed_data

    client = tmp_path / "checkpoints" / "step2" / "client_state_rank0.json"
    client.parent.mkdir(parents=True)
    saved = MultitaskSampler({"vqa": 50, "gqa": 30}, 8).state_dict()
    client.write_text(json.dumps({"step": 2, "loader": {"step": 2, "sampler": saved}}))
    loader = SimpleNamespace(sampler=MultitaskSampler({"vqa": 50, "gqa": 30}, 8))
    check_resumed_data(tmp_path, "step2", loader)
    assert loader.sampler.position == 0  # compared on a copy: the loader is restored later, with the checkpoint
    with pytest.raises(DataError, match="'gqa' had 30 examples, now 29"):
        check_resumed_data(tmp_path, "step2", SimpleNamespace(sampler=MultitaskSampler({"vqa": 50, "gqa": 29}, 8)))
    client.write_text(json.dumps({"step": 2}))  # no loader recorded: left to the loader's own load_state_dict
    check_resumed_data(tmp_path, "step2", loader)


def test_a_checkpoint_without_task_groups_is_refused_only_for_a_run_with_per_task_groups(tmp_path):
    import json

    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import _check_task_groups

    (tmp_path / "checkpoints" / "step2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    (tmp_path / "checkpoints" / "step2" / "client_state_rank0.json").write_text(json.dumps({"step": 2}))
    _check_task_groups(tmp_path, task_groups=False)  # shared weights only: 2 groups then and now
    with pytest.raises(ckpt.CheckpointError, match=r"step2 was written by a vlscale that stepped every task's"):
        _check_task_groups(tmp_path, task_groups=True)


def test_small_helpers_of_the_loop():

    from vlscale.data.real import DataError
    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import _as_input_error, _last_good, _loss_terms, signal_name

    labels = torch.tensor([[5, 6, -100], [7, 8, 9], [-100, -100, -100]])  # the step's loss is a mean over:
    assert _loss_terms({"labels": labels}, "example") == 3 and _loss_terms({"labels": labels}, "token") == 5
    assert signal_name(None) == "a stop request" and signal_name(15) == "SIGTERM"
    err = _as_input_error(ValueError("bad"))
    assert isinstance(err, ckpt.CheckpointError) and str(err) == "bad"
    data = DataError("x")
    assert _as_input_error(data) is data
    for precision, note in (("fp16", True), ("bf16", False)):
        run = SimpleNamespace(out=Path("/nonexistent/run"), cfg=SimpleNamespace(train=SimpleNamespace(precision=precision)))
        said = _last_good(run)
        assert "no checkpoint had been written yet" in said
        assert ("under fp16 the forward pass itself can overflow" in said) == note


def test_a_resume_reads_the_settings_the_checkpoint_records_first_then_run_config_yaml(tmp_path):
    import json

    from vlscale.config import save_config
    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import check_settings_early, saved_settings

    step = tmp_path / "checkpoints" / "step2"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    client = step / "client_state_rank0.json"
    recorded, written = load_config("tiny", TINY + ["train.lr=0.002"]), load_config("tiny", TINY + ["train.lr=0.005"])
    client.write_text(json.dumps({"step": 2, "run_config": recorded.to_dict()}))
    save_config(written, tmp_path / "run_config.yaml")
    assert (saved_settings(tmp_path, "step2")[0].train.lr, saved_settings(tmp_path, "step2")[1]) == (0.002, client)
    with pytest.raises(ConfigError, match=rf"train\.lr=0\.005 differs from .*train\.lr=0\.002 \({client}\)"):
        check_settings_early(tmp_path, written)  # before anything loads
    check_settings_early(tmp_path, recorded)
    client.write_text(json.dumps({"step": 2}))  # recorded by an earlier vlscale: run_config.yaml
    assert saved_settings(tmp_path, "step2") == (written, tmp_path / "run_config.yaml")
    client.write_text("{")  # unreadable: left to check_output_dir, which names it
    check_settings_early(tmp_path, recorded)
    with pytest.raises(ckpt.CheckpointError, match="is not valid JSON"):
        saved_settings(tmp_path, "step2")


def test_a_resume_with_a_metrics_json_edited_by_hand_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """metrics.json is written whole, so one that does not read was edited: --resume was a JSONDecodeError traceback
    after the model loaded (``_truncate_logs``; an evaluation's too). Refused in one line naming it, before anything
    loads, and kept."""
    import json

    from vlscale.engine.trainer import _truncate_logs, check_settings_early

    (tmp_path / "checkpoints" / "step2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    cfg = load_config("tiny", TINY)
    (tmp_path / "checkpoints" / "step2" / "client_state_rank0.json").write_text(
        json.dumps({"step": 2, "run_config": cfg.to_dict()}))
    metrics = tmp_path / "metrics.json"
    monkeypatch.setattr(trainer, "_evaluate", lambda run, split, predictions: {"vqa": {"acc": 0.5}})
    run = SimpleNamespace(step=2, is_main=True, out=tmp_path, writer=None, last_scores={})
    for text, why in (('[{"step": 2, "split": "val"}, {"st', r"not JSON \(Unterminated string"),
                      ('[{"split": "val"}]', "not a list of records with a step"), ('{"step": 2}', "not a list")):
        metrics.write_text(text)
        for check in (lambda: check_settings_early(tmp_path, cfg), lambda: _truncate_logs(tmp_path, 2),
                      lambda: trainer.run_evaluation(run)):
            with pytest.raises(ConfigError, match=rf"^{metrics} is {why}.*: vlscale writes it whole, so it was "
                                                  r"edited by hand; mend it, or move it away \(the run then starts a "
                                                  r"new one\)$"):
                check()
            assert metrics.read_text() == text
    metrics.write_text('[{"step": 2, "split": "val"}]')
    check_settings_early(tmp_path, cfg)


def test_a_resume_without_a_checkpoint_step_says_nothing_of_the_schedule(capsys):
    from vlscale.engine.trainer import _note_new_schedule

    _note_new_schedule(load_config("tiny", ["train.max_steps=3"]), load_config("tiny", ["train.max_steps=5"]), None)
    assert capsys.readouterr().out == ""


def test_the_splits_a_run_evaluates_are_checked_before_training(tmp_path):
    """train.test_eval adds the test split to the start-up check: a missing file shows before training, not
    after it."""
    import shutil

    from vlscale.data.real import DataFileNotFound
    from vlscale.engine.trainer import check_eval_data

    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "real_data" / "gqa", tmp_path / "gqa")
    real = ["data.source=real", f"data.root={tmp_path}", "data.tasks=[gqa]"]
    check_eval_data(load_config("tiny", real + ["train.test_eval=true"]))
    (tmp_path / "gqa" / "testdev.json").unlink()
    check_eval_data(load_config("tiny", real))  # the test split is not evaluated
    with pytest.raises(DataFileNotFound, match=r"gqa test annotations: .*testdev\.json does not exist"):
        check_eval_data(load_config("tiny", real + ["train.test_eval=true"]))
    (tmp_path / "gqa" / "valid.json").unlink()
    with pytest.raises(DataFileNotFound, match=r"gqa val annotations: .*valid\.json does not exist"):
        check_eval_data(load_config("tiny", real))


def test_the_start_up_check_s_read_of_a_split_is_the_one_every_evaluation_batches(monkeypatch):
    """A real split was read and parsed again at each periodic evaluation (~13 s and ~0.9 GB at a time for
    200,000 VQA questions): the run's memo keeps what check_eval_data read, for every evaluation after it."""
    import vlscale.data.real as real
    from vlscale.data import eval_batches
    from vlscale.engine.trainer import check_eval_data

    root = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
    data = ["data.source=real", f"data.root={root}", "data.tasks=[vqa]"]
    cfg = load_config("tiny", data)
    reads, load = [], real.load_real_examples
    monkeypatch.setattr(real, "load_real_examples", lambda cfg, task, split, *a: reads.append(split) or
                        load(cfg, task, split, *a))
    memo = {}
    check_eval_data(cfg, memo)
    for _ in range(2):  # (the batches, made as they are drawn, need no tokenizer for this)
        assert [e.uid for e in eval_batches(cfg, None, "vqa", "val", 8, memo=memo).examples] == ["73001", "73002"]
    assert reads == ["val"]
    eval_batches(cfg, None, "vqa", "val", 8)  # without a memo: read again
    assert reads == ["val", "val"]
    # a run capped by train.eval_max_examples, with the test split: evaluate() asks for the cap check_eval_data read
    capped, memo = load_config("tiny", data + ["train.eval_max_examples=1", "train.test_eval=true"]), {}
    check_eval_data(capped, memo)
    assert reads[2:] == ["val", "test"]
    for split, uids in [("val", ["73001"]), ("test", ["74001"])] * 2:  # each split its own, cut as it was read
        assert [e.uid for e in eval_batches(capped, None, "vqa", split, 8, max_examples=1, memo=memo).examples] == uids
    assert reads[2:] == ["val", "test"]
    assert len(eval_batches(capped, None, "vqa", "val", 8, memo=memo).examples) == 2  # another cap: another read
    assert reads[2:] == ["val", "test", "val"]


class _Bar:
    """tqdm's part log_step uses: the updates and the last postfix."""

    def __init__(self):
        self.updates, self.postfix = 0, None

    def update(self, n):
        self.updates += n

    def set_postfix(self, **kwargs):
        self.postfix = kwargs


class _Writer:
    """SummaryWriter's add_scalar, recorded."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _log_run(tmp_path, rank=0, log_every=1, applied=True):

    engine = SimpleNamespace(was_step_applied=lambda: applied)
    return SimpleNamespace(engine=engine, step=0, grad_norm=None, loss_scale=None, out=tmp_path, is_main=rank == 0,
                           global_batch=8, step_times=[], writer=_Writer(),
                           cfg=SimpleNamespace(train=SimpleNamespace(log_every=log_every, precision="fp32")))


def test_a_step_s_log_line_bar_and_tensorboard_scalars_hold_its_figures(tmp_path):
    """train_log.jsonl's samples_per_s is the global batch over this step's time (not the first step's, not per
    rank); both learning rates are logged and plotted; TensorBoard gets the scalars every train.log_every steps
    (the log line every step), the loss also under the step's task; the bar shows the loss and samples/s."""
    import json

    from vlscale.engine.trainer import log_step

    run, bar = _log_run(tmp_path, log_every=3), _Bar()
    for step, task, loss, seconds, norm, lr in [(2, "vqa", 2.5, 4.0, 0.75, {"lr": 2e-3, "peft_lr": 6e-3}),
                                                (3, "gqa", 1.25, 2.0, 0.5, {"lr": 3e-3, "peft_lr": 9e-3})]:
        run.step, run.grad_norm = step, norm
        run.step_times.append(seconds)
        log_step(run, task, loss, lr, bar)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == [{"step": 2, "task": "vqa", "loss": 2.5, "lr": 2e-3, "peft_lr": 6e-3, "samples_per_s": 2.0,
                    "grad_norm": 0.75, "skipped": False},
                   {"step": 3, "task": "gqa", "loss": 1.25, "lr": 3e-3, "peft_lr": 9e-3, "samples_per_s": 4.0,
                    "grad_norm": 0.5, "skipped": False}]
    assert bar.updates == 2 and bar.postfix == {"task": "gqa", "loss": "1.2500", "samples_s": "4.0"}
    assert sorted(run.writer.scalars) == sorted([("train/loss", 1.25, 3), ("train/lr", 3e-3, 3),
                                                 ("train/peft_lr", 9e-3, 3), ("train/samples_per_s", 4.0, 3),
                                                 ("train/grad_norm", 0.5, 3), ("train/loss_gqa", 1.25, 3)])


def test_a_skipped_step_logs_no_gradient_norm_and_other_ranks_write_nothing(tmp_path):
    import json

    from vlscale.engine.trainer import log_step

    run, bar = _log_run(tmp_path, applied=False), _Bar()
    run.step, run.grad_norm, run.loss_scale = 1, 0.5, 1024.0
    run.step_times.append(1.0)
    log_step(run, "vqa", 3.0, {"lr": 1e-3}, bar)
    (line,) = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 1, "task": "vqa", "loss": 3.0, "lr": 1e-3, "samples_per_s": 8.0,
                                "grad_norm": None, "skipped": True, "loss_scale": 1024.0}
    assert bar.postfix["scale"] == "1024"
    other, other_bar = _log_run(tmp_path / "rank1", rank=1), _Bar()
    other.step, other.grad_norm = 1, 0.5
    other.step_times.append(1.0)
    log_step(other, "vqa", 3.0, {"lr": 1e-3}, other_bar)
    assert not (tmp_path / "rank1").exists() and other.writer.scalars == [] and other_bar.updates == 0


def test_a_log_line_the_disk_refuses_names_train_log_jsonl(tmp_path):
    """A write past this process's file-size limit (a real EFBIG, as a full disk's ENOSPC): the error names the file
    (train.py's line said the output_dir and the reason only: the write's error names none)."""
    import errno
    import resource

    from vlscale.engine.trainer import log_step

    run = _log_run(tmp_path)
    run.step, run.grad_norm = 1, 0.5
    run.step_times.append(1.0)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10, limits[1]))
    try:
        with pytest.raises(OSError) as failed:
            log_step(run, "vqa", 3.0, {"lr": 1e-3}, _Bar())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert (failed.value.errno, failed.value.filename) == (errno.EFBIG, str(tmp_path / "train_log.jsonl"))


def test_a_non_finite_gradient_norm_names_the_step_and_task(tmp_path):
    from vlscale.engine.trainer import NonFiniteLoss, log_step

    run = _log_run(tmp_path)
    run.step, run.grad_norm = 7, float("inf")
    run.step_times.append(1.0)
    with pytest.raises(NonFiniteLoss, match=r"^the gradient norm is inf at step 7 \(task 'gqa'\) while the loss is "
                                            r"1\.5; the update was applied"):
        log_step(run, "gqa", 1.5, {"lr": 1e-3}, _Bar())
    assert not (tmp_path / "train_log.jsonl").exists()


def test_tensorboard_plots_the_fp16_loss_scale_and_leaves_out_the_figures_a_step_does_not_have(tmp_path):
    """An fp16 step plots train/loss_scale; a skipped step (no gradient norm) and a run where only PEFT weights
    train (``lr`` null, :func:`~vlscale.engine.trainer.logged_lr_groups`) plot no train/grad_norm and no train/lr:
    SummaryWriter cannot plot a null."""
    from vlscale.engine.trainer import log_step

    run = _log_run(tmp_path, applied=False)
    run.step, run.loss_scale = 4, 256.0
    run.step_times.append(2.0)
    log_step(run, "vqa", 3.0, {"lr": None, "peft_lr": 1e-3}, _Bar())
    assert sorted(run.writer.scalars) == sorted([("train/loss", 3.0, 4), ("train/peft_lr", 1e-3, 4),
                                                 ("train/samples_per_s", 4.0, 4), ("train/loss_scale", 256.0, 4),
                                                 ("train/loss_vqa", 3.0, 4)])


def _summary_run(monkeypatch, stage=2, precision="fp32", step_times=(3.0, 1.0, 2.0, 10.0), skipped_steps=0):
    """A 2-rank Run for run_summary: rank 1's figures are ``other``; 6 of 12 parameters train; micro-batch 2,
    accumulation 1."""

    import torch.distributed

    other = {"param_bytes_per_rank": 10, "grad_bytes_per_rank": 9000, "optimizer_state_bytes_per_rank": 1,
             "peak_memory_bytes": 5, "peak_rss_bytes": 5}

    def gather(into, local):
        into[:] = [local, other]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    monkeypatch.setattr("vlscale.peft.trainable.count_parameters", lambda model: {
        "trainable": 6, "total": 12, "total_without_vision": 12, "updated_pct": 50.0})
    model = torch.nn.Linear(2, 3)  # 9 fp32 parameters: 36 bytes
    engine = SimpleNamespace(module=model, optimizer=SimpleNamespace(state={}), skipped_steps=skipped_steps,
                             train_micro_batch_size_per_gpu=lambda: 2, gradient_accumulation_steps=lambda: 1)
    return SimpleNamespace(model=model, engine=engine, memory={"grad_bytes_per_rank": 36}, step=3,
                           dist=SimpleNamespace(world_size=2, rank=0, device=torch.device("cpu"), device_type="cpu"),
                           stage=stage, global_batch=4, step_times=list(step_times),
                           loader=SimpleNamespace(read_ahead=SimpleNamespace(threads=3)),
                           cfg=SimpleNamespace(train=SimpleNamespace(precision=precision,
                                                                     gradient_checkpointing=False)),
                           ds_config={}, last_scores={"vqa": {"acc": 0.5}},
                           interrupted_evaluation={"step": 3, "split": "test", "task": "vqa", "batches_done": 1,
                                                   "batches": 2}, stopped=None, provenance=[{"world_size": 2}])


def test_run_summary_reports_each_rank_s_bytes_and_the_largest(monkeypatch):
    """run_summary.json: each per-rank figure is the largest rank's, with every rank's beside it (``*_by_rank``,
    in rank order); step_time_s is the median step time."""

    run = _summary_run(monkeypatch)
    s = trainer.run_summary(run)
    assert (s["param_bytes_per_rank"], s["param_bytes_by_rank"]) == (36, [36, 10])
    assert (s["grad_bytes_per_rank"], s["grad_bytes_by_rank"]) == (9000, [36, 9000])
    assert s["optimizer_state_bytes_by_rank"] == [0, 1]
    assert (s["step_time_s"], s["step_time_steps"], s["steps"], s["completed"]) == (2.5, 4, 3, True)
    assert s["final_scores"] == {"vqa": {"acc": 0.5}} and s["interrupted_evaluation"]["split"] == "test"
    assert s["provenance"] == [{"world_size": 2}]  # how the run was made (vlscale.provenance)


def test_run_summary_holds_the_run_s_settings_and_counts(monkeypatch):
    """The contract keys come from the run: world size, ZeRO stage, precision, trainable and total parameters, the
    global batch and the micro-batch, accumulation and skipped steps the engine ran, whether it completed; a run
    with no timed step (a resume of a finished run on another number of ranks) has no step time, not a crash."""

    s = trainer.run_summary(_summary_run(monkeypatch, stage=3, precision="bf16", step_times=(), skipped_steps=2),
                            completed=False)
    assert {k: s[k] for k in ("world_size", "zero_stage", "precision", "trainable_params", "total_params",
                              "global_batch", "micro_batch_size", "gradient_accumulation_steps", "skipped_steps",
                              "completed", "step_time_s", "step_time_steps", "read_ahead_threads")} == {
        "world_size": 2, "zero_stage": 3, "precision": "bf16", "trainable_params": 6, "total_params": 12,
        "global_batch": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "skipped_steps": 2,
        "completed": False, "step_time_s": None, "step_time_steps": 0, "read_ahead_threads": 3}


def test_a_run_stopped_by_an_unreadable_image_says_why_in_run_summary_json(monkeypatch, tmp_path):
    """An input error mid-run (an unreadable image on the rank reading it; a diverged loss, on rank 0) writes
    run_summary.json, completed false, ``stopped`` naming the error, the rank and the checkpoint left: it was not
    written at all. Nothing gathered (the other rank may be in a collective): its figures are null. Other errors,
    and a diverged loss on the other ranks, write nothing. The DataError's line is to end with what is kept (none:
    also when the checkpoint ``latest`` names is not there)."""
    import json

    from vlscale.data.real import DataError
    from vlscale.engine import checkpoint as ckpt

    run = _summary_run(monkeypatch)
    run.out, run.dist.rank, run.is_main = tmp_path, 1, False
    monkeypatch.setattr("torch.distributed.all_gather_object", None)  # not called
    for error in (ConfigError("x"), trainer.NonFiniteLoss("loss is nan"), trainer.EvaluationLocked("x")):
        trainer.record_stop(run, error)
    assert not list(tmp_path.iterdir())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("step1")  # names a checkpoint not there: none is left
    assert trainer.record_stop(run, DataError("x")) == "; stopped after step 3: no checkpoint had been written"
    assert json.loads((tmp_path / "run_summary.json").read_text())["stopped"]["checkpoint"] is None
    (tmp_path / "checkpoints" / "step2").mkdir(parents=True)
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("step2")
    line = "gqa example 'q1' (from train.json): image 'x': cannot read image /d/x.jpg (OSError: image file is cut)"
    assert trainer.record_stop(run, DataError(line)) == (f"; stopped after step 3: the last checkpoint is "
                                                         f"{tmp_path / 'checkpoints' / 'step2'} (--resume goes on from "
                                                         "it once the input is readable)")
    s = json.loads((tmp_path / "run_summary.json").read_text())
    kept = str(tmp_path / "checkpoints" / "step2")
    assert s["stopped"] == {"reason": f"DataError: {line}", "rank": 1, "checkpoint": kept}
    assert (s["completed"], s["steps"], s["param_bytes_by_rank"], s["param_bytes_per_rank"]) == (False, 3, [None, 36],
                                                                                                36)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "run_summary.json"]
    run.dist.rank, run.is_main = 0, True
    assert trainer.record_stop(run, trainer.NonFiniteLoss("loss is nan at step 4")) == ""  # its line says what is kept
    s = json.loads((tmp_path / "run_summary.json").read_text())
    assert s["stopped"]["reason"] == "NonFiniteLoss: loss is nan at step 4" and s["param_bytes_by_rank"] == [36, None]
    # a write the disk refused (rank 0's train_log.jsonl): a resumed run's earlier summary said it completed
    refused = OSError(28, "No space left on device", str(tmp_path / "train_log.jsonl"))
    assert trainer.record_stop(run, refused) == ""  # the launcher's disk line says what is kept
    s = json.loads((tmp_path / "run_summary.json").read_text())
    assert (s["completed"], s["stopped"]["reason"]) == (False, f"OSError: {refused}")
    run.dist.rank, run.is_main = 1, False
    (tmp_path / "run_summary.json").unlink()
    assert trainer.record_stop(run, refused) == "" and not (tmp_path / "run_summary.json").exists()
    # train.test_eval's eval_test/ held by an evaluate.py: the run is complete, its summary was written by a --resume
    run.dist.rank, run.is_main = 0, True
    locked = trainer.EvaluationLocked(f"{tmp_path / 'eval_test'} is being written by another process (evaluate.py)")
    assert trainer.record_stop(run, locked) == ""  # its line says what is kept
    s = json.loads((tmp_path / "run_summary.json").read_text())
    assert (s["completed"], s["stopped"]["reason"]) == (False, f"EvaluationLocked: {locked}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_the_peak_memory_is_in_bytes_and_on_a_gpu_the_allocator_s_peak(monkeypatch):
    """On the host peak_memory_bytes is the process's peak RSS in bytes (Linux's ru_maxrss counts KiB): the
    kernel's peak resident set (VmHWM) to within a factor 2 (the two are counted apart, a little out of step); on a
    GPU it is torch's peak allocation there, with the RSS beside it."""
    import re

    from vlscale.engine.trainer import peak_memory_bytes

    host = peak_memory_bytes(torch.device("cpu"))
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    assert host["peak_memory_bytes"] == host["peak_rss_bytes"] and peak / 2 < host["peak_rss_bytes"] < 2 * peak
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 12345)
    gpu = peak_memory_bytes(torch.device("cuda", 0))
    assert gpu["peak_memory_bytes"] == 12345 and peak / 2 < gpu["peak_rss_bytes"] < 2 * peak


def test_only_rank_0_writes_run_summary_json_and_prints_the_final_scores(tmp_path, monkeypatch, capsys):
    import json


    summary = {"steps": 3}
    monkeypatch.setattr(trainer, "run_summary", lambda run, completed: dict(summary, completed=completed))
    for rank in (1, 0):
        run = SimpleNamespace(is_main=rank == 0, out=tmp_path / f"rank{rank}", step=3,
                              last_scores={"vqa": {"acc": 0.5}}, test_scores={})
        run.out.mkdir()
        assert trainer.finish(run, completed=False) == {"steps": 3, "completed": False}
    assert not (tmp_path / "rank1" / "run_summary.json").exists()
    assert json.loads((tmp_path / "rank0" / "run_summary.json").read_text()) == {"steps": 3, "completed": False}
    assert capsys.readouterr().out == "final scores (val, step 3):\n  vqa      acc=50.00\n"  # rank 0's, once


def test_an_evaluation_of_a_step_already_in_metrics_json_replaces_its_entry(tmp_path, monkeypatch):
    """A resumed finished run evaluates its last step again: metrics.json keeps one entry per step and split."""
    import json


    scores = iter([{"vqa": {"acc": 0.25}}, {"vqa": {"acc": 0.5}}, {"vqa": {"acc": 0.75}}])
    monkeypatch.setattr(trainer, "_evaluate", lambda run, split, predictions: next(scores))
    run = SimpleNamespace(step=2, is_main=True, out=tmp_path, writer=None, last_scores={})
    trainer.run_evaluation(run)
    trainer.run_evaluation(run, "test")
    trainer.run_evaluation(run)
    assert json.loads((tmp_path / "metrics.json").read_text()) == [
        {"step": 2, "split": "test", "tasks": {"vqa": {"acc": 0.5}}},
        {"step": 2, "split": "val", "tasks": {"vqa": {"acc": 0.75}}}]
    assert run.last_scores == {"vqa": {"acc": 0.75}}


def test_only_the_final_evaluation_writes_predictions(tmp_path, monkeypatch):


    written = []
    monkeypatch.setattr(trainer, "_evaluate", lambda run, split, predictions: written.append(predictions) or {})
    run = SimpleNamespace(step=2, is_main=True, out=tmp_path, writer=None, last_scores={})
    trainer.run_evaluation(run)
    trainer.run_evaluation(run, final=True)
    assert written == [None, tmp_path / "predictions"]


def test_a_final_evaluation_stopped_midway_leaves_no_earlier_step_s_predictions(tmp_path, monkeypatch):
    """A finished run extended (--resume train.max_steps=more), its final evaluation stopped after vqa: predictions/
    held the new step's vqa.jsonl beside the old step's nlvr2.jsonl, nothing telling them apart; then (clearing the
    folder first) a stop midway left a part of a set where a whole one had been. The last whole set stays; a whole
    new one replaces it."""
    from vlscale.engine.evaluation import EvaluationInterrupted

    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "nlvr2.jsonl").write_text("{}\n")  # the step before the extension's

    def evaluate(*args, predictions_dir, **kwargs):  # write_predictions makes the folder
        predictions_dir.mkdir(exist_ok=True)
        (predictions_dir / "vqa.jsonl").write_text("{}\n")
        raise error

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    run = SimpleNamespace(step=16, is_main=True, out=tmp_path, writer=None, last_scores={}, stoppable_evaluation=False,
                          dist=SimpleNamespace(world_size=1, rank=0, device=None), stage=3, cfg=None, model=None,
                          tokenizer=None, dtype=None, show_progress=False, watchdog=SimpleNamespace(beat=None),
                          eval_data={}, engine=None)
    # a stop, and a second SIGINT's KeyboardInterrupt (StopSignal: "aborting without a checkpoint")
    for error in (EvaluationInterrupted("val", "nlvr2", 0, 1), KeyboardInterrupt("second SIGINT")):
        with pytest.raises(type(error)):
            trainer.run_evaluation(run, final=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]  # no part of a set left beside it
        assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["nlvr2.jsonl"]

    def evaluate(*args, predictions_dir, **kwargs):
        predictions_dir.mkdir(exist_ok=True)
        (predictions_dir / "vqa.jsonl").write_text("{}\n")
        return {"vqa": {"acc": 0.5}}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    (tmp_path / "predictions.partial").mkdir()  # a killed run's (kill -9 midway): none of it joins the new set
    (tmp_path / "predictions.partial" / "gqa.jsonl").write_text("{}\n")
    trainer.run_evaluation(run, final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions"]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["vqa.jsonl"]


def test_a_swap_of_predictions_killed_between_its_renames_keeps_the_last_whole_set(tmp_path, monkeypatch):
    """The swap removed predictions/ before renaming predictions.partial/ into its place: a kill between the two left
    neither set. Now the earlier set waits at predictions.old: put back at once where the rename fails, and by the
    next evaluation into the folder after a kill (no handler ran), which then replaces it whole."""
    import os

    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "nlvr2.jsonl").write_text("{}\n")

    def evaluate(*args, predictions_dir, **kwargs):
        predictions_dir.mkdir(exist_ok=True)
        (predictions_dir / "vqa.jsonl").write_text("{}\n")
        return {"vqa": {"acc": 0.5}}

    def killed(real):  # the rename of the new set into place dies
        def rename(src, dst, *args, **kwargs):
            if str(src).endswith(".partial"):
                raise KeyboardInterrupt
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, killed(getattr(os, name)))
    run = SimpleNamespace(step=16, is_main=True, out=tmp_path, writer=None, last_scores={}, stoppable_evaluation=False,
                          dist=SimpleNamespace(world_size=1, rank=0, device=None), stage=3, cfg=None, model=None,
                          tokenizer=None, dtype=None, show_progress=False, watchdog=SimpleNamespace(beat=None),
                          eval_data={}, engine=None)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_evaluation(run, final=True)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["nlvr2.jsonl"]
    # as a kill leaves it: the earlier set aside, part of a new one, no predictions/
    (tmp_path / "predictions").rename(tmp_path / "predictions.old")
    (tmp_path / "predictions.partial").mkdir(exist_ok=True)

    def stopped(*args, predictions_dir, **kwargs):
        assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["nlvr2.jsonl"]
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_evaluation(run, final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["nlvr2.jsonl"]
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    trainer.run_evaluation(run, final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions"]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["vqa.jsonl"]


def test_only_rank_0_touches_the_prediction_folders(tmp_path, monkeypatch):
    """Rank 0 writes predictions.partial/ and renames it: another rank's evaluation, ending or raising (an input
    error of its own), removes neither rank 0's set being written nor the last whole one."""
    from vlscale.engine.evaluation import EvaluationInterrupted

    for name in ("predictions", "predictions.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vqa.jsonl").write_text("{}\n")
    outcomes = iter([{"vqa": {"acc": 0.5}}, EvaluationInterrupted("val", "vqa", 0, 1)])

    def evaluate(*args, **kwargs):  # rank 1 writes nothing
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    run = SimpleNamespace(step=16, is_main=False, out=tmp_path, writer=None, last_scores={}, stoppable_evaluation=False,
                          dist=SimpleNamespace(world_size=2, rank=1, device=None), stage=3, cfg=None, model=None,
                          tokenizer=None, dtype=None, show_progress=False, watchdog=SimpleNamespace(beat=None),
                          eval_data={}, engine=None)
    assert trainer.run_evaluation(run, final=True) == {"vqa": {"acc": 0.5}}
    with pytest.raises(EvaluationInterrupted):
        trainer.run_evaluation(run, final=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "predictions", "predictions.partial", "predictions.partial/vqa.jsonl", "predictions/vqa.jsonl"]


def test_an_evaluation_plots_each_task_s_metrics_and_only_rank_0_writes_metrics_json(tmp_path, monkeypatch):
    """TensorBoard gets eval_<split>/<task>/<metric> at the run's step, flushed at once (an evaluation is the rare
    point a user watches for); the other ranks keep the scores (run.last_scores) but write no metrics.json."""
    import json


    scores = {"vqa": {"acc": 0.25}, "caption": {"cider": 1.5, "bleu4": 0.5}}
    monkeypatch.setattr(trainer, "_evaluate", lambda run, split, predictions: scores)
    writer = _Writer()
    writer.flushed = []
    writer.flush = lambda: writer.flushed.append(len(writer.scalars))
    run = SimpleNamespace(step=4, is_main=True, out=tmp_path, writer=writer, last_scores={})
    trainer.run_evaluation(run, "test")
    assert sorted(writer.scalars) == sorted([("eval_test/vqa/acc", 0.25, 4), ("eval_test/caption/cider", 1.5, 4),
                                             ("eval_test/caption/bleu4", 0.5, 4)])
    assert writer.flushed == [3]
    assert json.loads((tmp_path / "metrics.json").read_text()) == [{"step": 4, "split": "test", "tasks": scores}]
    other = SimpleNamespace(step=4, is_main=False, out=tmp_path / "rank1", writer=None, last_scores={})
    trainer.run_evaluation(other)
    assert other.last_scores == scores and not (tmp_path / "rank1").exists()


def test_a_trained_run_counts_as_saved_only_with_the_checkpoint_and_the_adapter_of_its_step(tmp_path):
    """What a --resume of a finished run checks before its final evaluation (_saved_at_this_step): both the latest
    checkpoint and adapter/ are of run.step; either of another step (a save that died half-way) is saved again."""
    import json

    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.trainer import _saved_at_this_step

    run = SimpleNamespace(step=6, is_main=True, out=tmp_path)
    assert not _saved_at_this_step(run)  # nothing written
    for tag in ("step4", "step6"):
        (tmp_path / "checkpoints" / tag).mkdir(parents=True)
    (tmp_path / "adapter").mkdir()

    def saved(checkpoint, adapter):
        (tmp_path / "checkpoints" / "latest").write_text(f"step{checkpoint}")
        (tmp_path / "adapter" / ckpt.ADAPTER_CONFIG).write_text(json.dumps(
            {"format": ckpt.ADAPTER_FORMAT, "run_config": {}, "vocab_size": 10, "step": adapter}))
        return _saved_at_this_step(run)

    assert saved(6, 6) and not saved(6, 4) and not saved(4, 6)


def test_the_lr_is_zero_at_the_end_of_a_run_whose_warm_up_spans_it():
    """ceil(warmup_ratio x total) can be every step (0.9 of 5): a resume past the old end (_note_new_schedule
    reads the old schedule at its last step) reads 0, not a division by zero."""
    f = lr_multiplier(5, 0.9)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == 0.0


def _loop_run(monkeypatch, step=0, saved=False, accumulation=1, stop_at=None, test_eval=False, interrupt=None):
    """A Run for train() whose step, logging, evaluation and checkpoint are recorded in ``events``; the engine's
    learning rate is the number of updates so far (the schedule advances with each update). ``run.micro_batches``:
    how many micro-batches each train_step got; ``run.stoppable``: run.stoppable_evaluation during each evaluation;
    ``stop_at``: the step whose train_step says a stop was requested; ``interrupt``: the evaluation (``(step,
    split)``) a stop request ends, raising EvaluationInterrupted."""

    from vlscale.engine.evaluation import EvaluationInterrupted

    events = []

    def train_step(run, batches):
        run.engine.updates += 1
        run.micro_batches.append(len(batches))
        return 1.0, run.step + 1 == stop_at

    def evaluation(run, split, final):
        events.append(("eval" if split == "val" else split, run.step, final))
        run.stoppable.append(run.stoppable_evaluation)
        if (run.step, split) == interrupt:
            raise EvaluationInterrupted(split, "gqa", 1, 4)
        scores = {"vqa": {"acc": run.step / 10}}
        if split == "val":
            run.last_scores = scores
        return scores

    engine = SimpleNamespace(updates=step)
    engine.get_lr = lambda: [float(engine.updates)]
    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(trainer, "log_step", lambda run, task, loss, lr, bar: events.append(("log", run.step, lr)))
    monkeypatch.setattr(trainer, "run_evaluation", lambda run, split="val", final=False: evaluation(run, split, final))
    monkeypatch.setattr(trainer, "run_test_evaluation", lambda run: evaluation(run, "test", True))
    monkeypatch.setattr(trainer, "save_training_state", lambda run: events.append(("save", run.step)))
    monkeypatch.setattr(trainer, "_saved_at_this_step", lambda run: saved)
    train = SimpleNamespace(max_steps=6, gradient_accumulation_steps=accumulation, eval_every=3, save_every=2,
                            test_eval=test_eval)
    run = SimpleNamespace(cfg=SimpleNamespace(train=train), step=step, is_main=True, show_progress=False,
                          loader=iter(lambda: {"task": "vqa"}, None), engine=engine, lr_groups={"lr": 0},
                          dist=SimpleNamespace(world_size=1, device=None), step_times=[],
                          watchdog=SimpleNamespace(beat=lambda what: None), stoppable_evaluation=False,
                          stop=SimpleNamespace(signum=None, requested=False), interrupted_evaluation=None,
                          last_scores={},
                          micro_batches=[], stoppable=[])
    return run, events


def test_the_loop_logs_evaluates_and_saves_on_schedule(monkeypatch, capsys):
    """Each step logs the learning rate its update ran at (read before it); an evaluation every train.eval_every
    steps but the last (the final evaluation is that step's), a checkpoint every train.save_every steps and one at
    the end, each once. Its bar, on a stream that is no terminal (a job's log), writes whole lines."""

    run, events = _loop_run(monkeypatch)
    run.show_progress = True
    trainer.train(run)
    bar = capsys.readouterr().err
    assert bar.startswith("train:   0%") and "\r" not in bar
    assert events == [("log", 1, {"lr": 0.0}), ("log", 2, {"lr": 1.0}), ("save", 2), ("log", 3, {"lr": 2.0}),
                      ("eval", 3, False), ("log", 4, {"lr": 3.0}), ("save", 4), ("log", 5, {"lr": 4.0}),
                      ("log", 6, {"lr": 5.0}), ("save", 6), ("eval", 6, True)]
    assert run.step == 6 and len(run.step_times) == 6


def test_the_loop_keeps_the_last_step_times_only(monkeypatch):
    """run.step_times (run_summary's median, every checkpoint's client state) holds the last STEP_TIMES_KEPT steps':
    a list of every step's grew with the run, each save writing it whole (1M steps: 21 MB of JSON per rank)."""

    run, _ = _loop_run(monkeypatch)
    monkeypatch.setattr(trainer, "STEP_TIMES_KEPT", 4, raising=False)
    run.step_times = [9.0] * 3  # a resumed run's
    trainer.train(run)
    assert run.step == 6 and len(run.step_times) == 4 and 9.0 not in run.step_times


def test_stop_after_steps_checkpoints_that_step_and_stops(monkeypatch):

    run, events = _loop_run(monkeypatch)
    with pytest.raises(trainer.RunStopped, match=r"^stopped at step 3 \(--stop-after-steps\)$") as stopped:
        trainer.train(run, stop_after_steps=3)
    assert (stopped.value.step, stopped.value.signum) == (3, None)
    assert events[-3:] == [("log", 3, {"lr": 2.0}), ("eval", 3, False), ("save", 3)] and run.step == 3


@pytest.mark.parametrize("stop_at, kept", [(3, {"vqa": {"acc": 0.3}}), (4, {}), (5, {})])
def test_a_run_stopped_mid_training_keeps_as_final_scores_only_its_last_step_s(monkeypatch, stop_at, kept):
    """Stopped at step 4 after the evaluation of step 3: finish printed that as "final scores (val, step 4)" and
    run_summary.json's final_scores held it."""

    run, events = _loop_run(monkeypatch)
    with pytest.raises(trainer.RunStopped):
        trainer.train(run, stop_after_steps=stop_at)
    assert run.last_scores == kept


def test_a_stop_during_a_periodic_evaluation_leaves_no_earlier_scores_as_final(monkeypatch):

    run, events = _loop_run(monkeypatch, interrupt=(6, "val"))
    run.cfg.train.max_steps = 9
    with pytest.raises(trainer.RunStopped):
        trainer.train(run)
    assert events[-2:] == [("eval", 6, False), ("save", 6)] and run.last_scores == {}


@pytest.mark.parametrize("saved", [True, False])
def test_a_resume_of_a_trained_run_saves_only_what_it_lacks_then_evaluates(monkeypatch, saved):

    run, events = _loop_run(monkeypatch, step=6, saved=saved)
    trainer.train(run)
    assert events == ([] if saved else [("save", 6)]) + [("eval", 6, True)]


def test_each_step_takes_the_accumulation_s_micro_batches(monkeypatch):
    """One optimizer step is train.gradient_accumulation_steps micro-batches: the loop hands train_step that many
    every step (the global batch of train_log.jsonl's samples_per_s and of the data order)."""

    run, events = _loop_run(monkeypatch, accumulation=3)
    trainer.train(run)
    assert run.micro_batches == [3] * 6 and run.step == 6


def test_the_loop_logs_a_null_lr_where_only_peft_weights_train(monkeypatch):
    """train.peft_lr with only PEFT weights training: no group runs at train.lr, so each step logs ``lr`` null and
    ``peft_lr`` as the rate of the PEFT group's update (not that group's rate under both keys)."""

    run, events = _loop_run(monkeypatch)
    run.lr_groups = {"lr": None, "peft_lr": 0}
    trainer.train(run)
    assert [e[2] for e in events if e[0] == "log"] == [{"lr": None, "peft_lr": float(s)} for s in range(6)]


def test_a_stop_request_checkpoints_the_step_it_came_in_and_stops(monkeypatch):
    """Ctrl-C/SIGTERM (train_step's all-reduced flag): the step it came in is logged, evaluated if due and
    checkpointed, then RunStopped carries the signal; nothing after it runs."""

    run, events = _loop_run(monkeypatch, stop_at=3)
    run.stop.signum = 15
    with pytest.raises(trainer.RunStopped, match=r"^stopped at step 3 \(signal\)$") as stopped:
        trainer.train(run)
    assert (stopped.value.step, stopped.value.signum) == (3, 15)
    assert events == [("log", 1, {"lr": 0.0}), ("log", 2, {"lr": 1.0}), ("save", 2), ("log", 3, {"lr": 2.0}),
                      ("eval", 3, False), ("save", 3)] and run.step == 3


@pytest.mark.parametrize("during", ["save", "eval"])
def test_a_stop_request_during_a_periodic_save_or_evaluation_stops_at_that_step(monkeypatch, during):
    """SIGTERM while step 2's checkpoint was written (or step 3's evaluation ended): the run trained step 3 (4) and
    saved it again before stopping, twice the work inside a scheduler's grace period before its SIGKILL."""

    run, events = _loop_run(monkeypatch)
    record = trainer.save_training_state if during == "save" else trainer.run_evaluation

    def requested(run, *args, **kwargs):
        run.stop.requested, run.stop.signum = True, 15
        return record(run, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_training_state" if during == "save" else "run_evaluation", requested)
    with pytest.raises(trainer.RunStopped, match=r"^stopped at step (2|3) \(signal\)$") as stopped:
        trainer.train(run)
    step = 2 if during == "save" else 3
    assert (stopped.value.step, stopped.value.signum, run.step) == (step, 15, step)
    assert [e for e in events if e[0] == "save"] == [("save", 2)] + ([("save", 3)] if during == "eval" else [])


def test_a_stop_request_is_read_again_only_at_the_steps_that_save_or_evaluate(monkeypatch):
    """The second read of the stop flag is a collective (every rank makes it, or the run hangs): at the steps that
    save or evaluate (2, 3, 4 of 6; the last step's save and evaluation come after the loop), not every step, where
    train_step's read covers it."""
    run, events = _loop_run(monkeypatch)
    reads = []
    monkeypatch.setattr(trainer, "all_reduce_sum", lambda values, device: reads.append(run.step) or [0.0])
    trainer.train(run)
    assert reads == [2, 3, 4]


def test_the_test_split_is_evaluated_after_the_final_one_with_train_test_eval(monkeypatch):
    """train.test_eval: the test split after the final validation, of the same step; train() returns the
    validation's scores. A stop request ends any of the evaluations (checked per batch while they run)."""

    run, events = _loop_run(monkeypatch, test_eval=True)
    scores = trainer.train(run)
    assert events[-3:] == [("save", 6), ("eval", 6, True), ("test", 6, True)]
    assert scores == run.last_scores == {"vqa": {"acc": 0.6}}  # the final validation's, not the test split's
    assert run.stoppable == [True, True, True] and run.stoppable_evaluation is False


def test_a_stop_during_a_periodic_evaluation_checkpoints_its_step_and_stops(monkeypatch):

    run, events = _loop_run(monkeypatch, interrupt=(3, "val"))
    run.stop.signum = 2
    with pytest.raises(trainer.RunStopped, match=r"^stopped at step 3 \(SIGINT during the evaluation at step 3 "
                                                 r"\(evaluation of val stopped in task gqa after 1 of 4 batches\); "
                                                 r"step 3 is checkpointed, and --resume continues training") as stopped:
        trainer.train(run)
    assert stopped.value.signum == 2 and events[-2:] == [("eval", 3, False), ("save", 3)]
    assert run.stoppable == [True] and run.stoppable_evaluation is False


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_stop_during_the_final_evaluation_records_where_and_keeps_only_a_finished_validation(monkeypatch, split):
    """The final validation stopped: no final scores (run_summary.json's final_scores is not an earlier
    evaluation's); the test split stopped after it: the validation's scores stand. Either way
    run.interrupted_evaluation says where it stopped, for run_summary.json, and the run stops."""

    run, events = _loop_run(monkeypatch, test_eval=True, interrupt=(6, split))
    run.stop.signum = 15
    with pytest.raises(trainer.RunStopped, match=rf"^stopped at step 6 \(SIGTERM during the final evaluation "
                                                 rf"\(evaluation of {split} stopped in task gqa after 1 of 4 "
                                                 r"batches\); the training is complete and checkpointed"):
        trainer.train(run)
    assert events[-1] == (("eval" if split == "val" else "test"), 6, True)
    assert run.interrupted_evaluation == {"step": 6, "split": split, "task": "gqa", "batches_done": 1, "batches": 4}
    assert run.last_scores == ({} if split == "val" else {"vqa": {"acc": 0.6}})
    assert run.stoppable[-1] is True and run.stoppable_evaluation is False


def test_the_lr_stays_zero_past_the_end_of_the_schedule():
    """A --resume that extends train.max_steps reads the old schedule at the checkpoint's step
    (_note_new_schedule): past the old end the multiplier is 0, never negative."""
    f = lr_multiplier(5, 0.2)
    assert [f(s) for s in (5, 6, 9)] == [0.0, 0.0, 0.0]


def _step_run(monkeypatch, logits, *, stop=False, precision="fp32", deepspeed_norm=False):
    """A Run for train_step on a stand-in DeepSpeed engine that returns ``logits`` (one tensor per micro-batch) and
    records each backward's loss and each step (with the task the per-task groups were set to then); as rank 0 of 2
    ranks whose batches are the same, so every all-reduced number is twice this rank's."""


    class Engine:
        def __init__(self):
            self.logits, self.backwards, self.steps = iter(logits), [], []
            self.optimizer = SimpleNamespace(loss_scale=8.0)
            if deepspeed_norm:
                self.optimizer._global_grad_norm = 1.0  # DeepSpeed's own optimizers keep the norm

        def __call__(self, batch):
            return SimpleNamespace(logits=next(self.logits))

        def backward(self, loss):
            self.backwards.append(float(loss))

        def step(self):
            self.steps.append(run.task_steps.task)

    monkeypatch.setattr(trainer, "all_reduce_sum", lambda values, device: [2.0 * v for v in values])
    monkeypatch.setattr(trainer, "all_reduce_sum_", lambda t: t.mul_(2))
    grad_bytes = []
    monkeypatch.setattr(trainer, "gradient_bytes", lambda engine, stage: grad_bytes.append(stage) or 96)
    trained = torch.nn.Parameter(torch.zeros(2))
    trained.grad = torch.tensor([3.0, 4.0])
    run = SimpleNamespace(engine=Engine(), step=4, dist=SimpleNamespace(world_size=2, device=torch.device("cpu")),
                          cfg=SimpleNamespace(train=SimpleNamespace(loss_reduction="token", precision=precision)),
                          scale_loss=precision == "fp16", loss_scale=None, grad_norm=None, stop=SimpleNamespace(
                              requested=stop), dtype=torch.float32, memory={}, stage=2, trainable=[trained],
                          task_steps=SimpleNamespace(task=None), out=Path("/nonexistent/run"))
    return run, grad_bytes


def test_a_step_backwards_each_micro_batch_at_its_share_of_the_global_token_mean_then_updates_once(monkeypatch):
    """k micro-batches on W ranks: each backward is of its token cross-entropy sum x W*k/N (N: the global batch's
    target tokens; DeepSpeed divides by k and averages over W), the engine counts k-1 micro-steps and then steps once
    with the step's task's optimizer groups on; the loss is the global per-token mean; the gradient norm read with it
    where DeepSpeed keeps none; the stop flag is any rank's."""
    from vlscale.engine.trainer import train_step

    g = torch.Generator().manual_seed(0)
    labels = [torch.tensor([[1, 2, -100]]), torch.tensor([[3, -100, -100], [0, 4, 1]]), torch.tensor([[2, 2, 2]])]
    logits = [torch.randn(y.shape[0], 3, 5, generator=g) for y in labels]
    sums = [float(torch.nn.functional.cross_entropy(z.reshape(-1, 5), y.reshape(-1), ignore_index=-100,
                                                    reduction="sum")) for z, y in zip(logits, labels)]
    n_local = 2 + 4 + 3
    batches = [{"task": "vqa", "labels": y} for y in labels]

    run, grad_bytes = _step_run(monkeypatch, logits, stop=True)
    loss, stop = train_step(run, batches)
    assert loss == pytest.approx(sum(sums) / n_local) and stop is True
    assert run.engine.backwards == pytest.approx([s * 2 * 3 / (2 * n_local) for s in sums])
    assert run.engine.steps == [None, None, "vqa"] and run.task_steps.task == "vqa"
    assert run.grad_norm == pytest.approx(5.0) and run.loss_scale is None
    assert run.memory == {"grad_bytes_per_rank": 96} and grad_bytes == [2]

    run, _ = _step_run(monkeypatch, logits, precision="fp16", deepspeed_norm=True)
    loss, stop = train_step(run, batches)  # stage-0 fp16: the loss scale multiplies the backward here
    assert loss == pytest.approx(sum(sums) / n_local) and stop is False
    assert run.engine.backwards == pytest.approx([s * 8.0 * 3 / n_local for s in sums])
    assert run.loss_scale == 8.0 and run.grad_norm is None  # DeepSpeed's optimizer reports its own


def test_a_non_finite_loss_stops_the_step_before_its_update(monkeypatch):
    from vlscale.engine.trainer import NonFiniteLoss, train_step

    labels = torch.tensor([[1, 2]])
    logits = [torch.zeros(1, 2, 5), torch.full((1, 2, 5), float("nan"))]
    run, _ = _step_run(monkeypatch, logits)
    with pytest.raises(NonFiniteLoss, match=r"^loss is nan at step 5 \(task 'gqa'\); stopping before the update; "
                                            r"no checkpoint had been written yet"):
        train_step(run, [{"task": "gqa", "labels": labels}] * 2)
    assert run.engine.steps == [None]  # the micro-step only, no update


@pytest.mark.parametrize("world_size, stage, synced", [(2, 3, True), (2, 2, False), (1, 3, False), (4, 3, True)])
def test_periodic_evaluation_syncs_generation_only_when_zero3_shards_over_several_ranks(monkeypatch, world_size,
                                                                                       stage, synced):
    """Under ZeRO-3 on several ranks each generated token gathers parameters from every rank, so a rank whose batch
    finished early must keep joining the others' gathers (``synced_gpus``) or the run hangs; elsewhere syncing only
    costs time (and where the evaluation gathers the model whole, vlscale.engine.gathered, it decodes unsynced). The
    evaluation runs on the run's rank, device, dtype, watchdog, stop request and engine (the one it gathers)."""
    seen = {}
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: seen.update(kwargs, args=args) or {"vqa": {}})
    run = SimpleNamespace(dist=SimpleNamespace(world_size=world_size, rank=world_size - 1, device="cpu"), stage=stage,
                          stoppable_evaluation=False, stop=None, model="model", cfg="cfg", tokenizer="tok",
                          dtype=torch.bfloat16, show_progress=False, watchdog=SimpleNamespace(beat="beat"),
                          eval_data={}, engine="engine")
    assert trainer._evaluate(run, "val", Path("preds")) == {"vqa": {}}
    assert seen.pop("memo") is run.eval_data  # each split read once per run
    assert seen.pop("args") == ("model", "cfg", "tok")
    assert seen == {"split": "val", "rank": world_size - 1, "world_size": world_size, "device": "cpu",
                    "float_dtype": torch.bfloat16, "synced_gpus": synced, "show_progress": False, "heartbeat": "beat",
                    "predictions_dir": Path("preds.partial"), "should_stop": None,  # renamed "preds" when whole
                    "engine": "engine"}
