"""fp16 training through DeepSpeed's real fp16 optimizers, on CPU.

DeepSpeed's CPU accelerator declares fp16 only on AVX512-FP16 CPUs; ``VLSCALE_CPU_FP16=1`` declares it
(:func:`vlscale.engine.deepspeed_config.cpu_fp16_enabled`), so these runs go through the same fp16
optimizer wrappers, dynamic loss scaler and checkpoints as on a GPU, with torch's CPU half-precision
kernels. They check vlscale's side of fp16 (loss scaling at every ZeRO stage, skipped steps, logs,
resume) and DeepSpeed's bookkeeping; a GPU's fp16 speed and numerics are benchmarks/gpu_suite.py's.

The runs: the tiny model, dynamic loss scaling from 2^16, which overflows on these gradients (the
visual projection's bias gets ~1.15 before scaling, past fp16's 65,504 once scaled), with
``fp16.hysteresis=1`` so that ZeRO's scaler lowers the scale on the first overflow as the stage-0
wrapper's scaler always does (it has no hysteresis), and gradient clipping at 0.1, below every
step's norm (~3.5), so that clipping acts at every step.
"""

import json
import time

import pytest
import torch

STEPS = 5


@pytest.fixture(scope="module")
def fp16(h, tmp_path_factory):
    """-> {name: output_dir}: ``z0`` (ZeRO stage 0), ``z3`` (ZeRO-3), ``z3_resumed`` (ZeRO-3 stopped
    after step 2, then resumed), all one process."""
    root = tmp_path_factory.mktemp("fp16")
    ds = json.loads((h.ROOT / "ds_configs" / "zero3.json").read_text())
    ds["fp16"]["hysteresis"] = 1
    # ZeRO-3's zero.Init replaces F.linear for the rest of the process by DeepSpeed's own (memory_efficient_linear),
    # which adds a 3-D input's bias after the matmul: one more fp16 rounding than stage 0's F.linear, so the two
    # stages' forwards differ before any update. Off, so that the stages compare the updates alone.
    ds["zero_optimization"]["memory_efficient_linear"] = False
    (root / "ds.json").write_text(json.dumps(ds))
    env = h.base_env(1, VLSCALE_CPU_FP16=1)
    common = ["--deepspeed", str(root / "ds.json"), *h.TINY, "train.precision=fp16", "train.micro_batch_size=4",
              "train.clip_grad_norm=0.1", f"train.max_steps={STEPS}", "train.save_every=0"]
    args = {name: common + [f"train.zero_stage={stage}", f"output_dir={root / name}"]
            for name, stage in (("z0", 0), ("z3", 3), ("z3_resumed", 3))}
    args["z3"].append(h.WITH_PROGRESS)
    started = {name: h.start(args[name] + (["--stop-after-steps", "2"] if name == "z3_resumed" else []), env=env,
                             log_path=root / f"{name}.log") for name in args}
    t0 = time.monotonic()
    for name, proc in started.items():
        h.finish(proc, root / f"{name}.log", t0)
    h.launch(args["z3_resumed"] + ["--resume"], env=env)
    return {name: root / name for name in args}


def strict_records(out) -> list[dict]:
    """train_log.jsonl parsed as strict JSON (no NaN / Infinity literals)."""
    def refuse(token):
        raise AssertionError(f"{out}/train_log.jsonl holds the non-JSON literal {token}")
    return [json.loads(line, parse_constant=refuse) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_overflowing_fp16_steps_are_skipped_and_logged(fp16, h):
    """... and shown: the progress bar's postfix has the task, loss, samples/s and the loss scale."""
    log = strict_records(fp16["z3"])
    bar = (fp16["z3"].parent / "z3.log").read_text()
    assert "train: 100%|" in bar and f"{STEPS}/{STEPS}" in bar, bar[-2000:]
    assert "task=" in bar and "loss=" in bar and "samples_s=" in bar and "scale=32768" in bar, bar[-2000:]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    skipped = [r for r in log if r["skipped"]]
    assert skipped, f"no step overflowed at loss scale {log[0]['loss_scale']} (this test needs one): {log}"
    for before, after in zip(log, log[1:]):
        if before["skipped"]:  # the scale halves and the schedule does not advance
            assert after["loss_scale"] == before["loss_scale"] / 2
            assert after["lr"] == before["lr"]
        else:
            assert after["loss_scale"] == before["loss_scale"]
    for r in log:
        assert (r["grad_norm"] is None) is r["skipped"], r
    assert not log[-1]["skipped"] and log[-1]["loss"] < log[0]["loss"]
    summary = h.read_json(fp16["z3"] / "run_summary.json")
    assert summary["precision"] == "fp16" and summary["skipped_steps"] == len(skipped)


def test_stage0_fp16_computes_the_updates_zero3_does(fp16, h):
    """Stage 0 (DeepSpeed's FP16_UnfusedOptimizer) against ZeRO-3 on the same data: the same skipped
    steps and scales, and losses / gradient norms equal to fp16 precision. Measured: losses within
    3.6e-4, norms within 0.14 % (equal up to step 2's loss); with DeepSpeed's F.linear left on (see the
    fixture), step 1's forward alone differs by 2.9e-4 and step 3's loss by 1.1e-3 (AVX2 CPU). Without vlscale.engine.half_precision's loss scaling (DeepSpeed 0.19.8)
    stage 0 never overflows, so the skipped steps differ; without only its undoing of the initial
    optimizer step, the losses are 0.013 apart at step 3."""
    z0, z3 = strict_records(fp16["z0"]), strict_records(fp16["z3"])
    assert [(r["skipped"], r["loss_scale"], r["lr"]) for r in z0] == [(r["skipped"], r["loss_scale"], r["lr"]) for r in z3]
    for a, b in zip(z0, z3):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), f"step {a['step']}"
        if not a["skipped"]:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2), f"step {a['step']}"


def test_fp16_resume_continues_the_loss_scale(fp16, h):
    resumed, reference = strict_records(fp16["z3_resumed"]), strict_records(fp16["z3"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference, resumed, strict=True):
        assert (b["skipped"], b["loss_scale"], b["lr"]) == (a["skipped"], a["loss_scale"], a["lr"]), f"step {a['step']}"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {a['step']}"
    assert h.read_json(fp16["z3_resumed"] / "run_summary.json")["skipped_steps"] == sum(r["skipped"] for r in reference)


# ------------------------------------------------------------------------------- the rules, on stand-in engines
# The runs above take DeepSpeed's CPU path: FP16_UnfusedOptimizer, one accumulation step, a loss scale always set.
# These check vlscale.engine.half_precision's rules where those runs do not reach them (a GPU's fused wrapper,
# gradient accumulation, a step whose norm is not finite), on objects with the attributes DeepSpeed's have.
class _Wrapper:
    """A DeepSpeed optimizer wrapper as half_precision reads it: the inner optimizer and the loss scale."""

    def __init__(self, params, loss_scale):
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=0.1)
        self.loss_scale = loss_scale

    def zero_grad(self):
        for p in self.params:
            p.grad = None


class _Engine:
    """``backward`` divides the loss by the accumulation steps, as DeepSpeed's does, and multiplies it by
    ``multiplier`` (the loss scale where the engine scales, 1 at stage 0 in DeepSpeed 0.19.8)."""

    def __init__(self, wrapper="FP16_UnfusedOptimizer", accumulation=1, loss_scale=1024.0, multiplier=1.0, norm=None,
                 module=None):
        self.module = module if module is not None else torch.nn.Linear(3, 2)
        self.optimizer = type(wrapper, (_Wrapper,), {})(self.module.parameters(), loss_scale)
        self.accumulation, self.multiplier, self.norm = accumulation, multiplier, norm

    def gradient_accumulation_steps(self):
        return self.accumulation

    def backward(self, loss):
        (loss / self.accumulation * self.multiplier).backward()

    def get_global_grad_norm(self):
        return self.norm


def test_the_loss_scale_probe_reads_the_engines_multiplier_at_any_accumulation():
    """``engine_scales_fp16_loss`` tells an engine that scales the loss from one that does not, also when the
    engine divides it by several accumulation steps, leaves no gradient behind (a zero gradient would make the
    first step update a parameter that got none), and refuses a multiplier it does not know."""
    from vlscale.engine.half_precision import engine_scales_fp16_loss

    for accumulation in (1, 4):
        for scales in (True, False):
            engine = _Engine(accumulation=accumulation, multiplier=1024.0 if scales else 1.0)
            assert engine_scales_fp16_loss(engine) is scales, (accumulation, scales)
            assert all(p.grad is None for p in engine.module.parameters()), (accumulation, scales)
    with pytest.raises(RuntimeError, match=r"multiplied the loss by 3\.0, neither the loss scale 1024\.0 nor 1"):
        engine_scales_fp16_loss(_Engine(accumulation=2, multiplier=3.0))


def test_only_a_stage0_wrappers_initial_step_is_forgotten():
    from vlscale.engine.half_precision import STAGE0_WRAPPERS, undo_initial_step

    def stepped(wrapper):
        engine = _Engine(wrapper)
        engine.module(torch.ones(1, 3)).sum().backward()
        engine.optimizer.optimizer.step()
        return engine

    assert STAGE0_WRAPPERS == ("FP16_Optimizer", "FP16_UnfusedOptimizer")  # GPU (fused) and CPU
    for wrapper in STAGE0_WRAPPERS:
        engine = stepped(wrapper)
        assert undo_initial_step(engine) is True and not engine.optimizer.optimizer.state, wrapper
        assert undo_initial_step(engine) is False, wrapper  # nothing left to forget
    zero = stepped("DeepSpeedZeroOptimizer")  # a ZeRO optimizer's state is its own
    assert undo_initial_step(zero) is False and len(zero.optimizer.optimizer.state) == 2


def test_the_gradient_norm_is_unscaled_only_where_deepspeed_left_it_scaled():
    from vlscale.engine.half_precision import unscaled_grad_norm

    norm = unscaled_grad_norm(_Engine("FP16_UnfusedOptimizer", norm=torch.tensor(2048.0)), 1024.0)
    assert type(norm) is float and norm == 2.0  # DeepSpeed's tensor read once: train_log.jsonl holds a number
    assert unscaled_grad_norm(_Engine("FP16_Optimizer", norm=3.0), 1024.0) == 3.0  # fused: unscaled already
    assert unscaled_grad_norm(_Engine("DeepSpeedZeroOptimizer", norm=3.0), 1024.0) == 3.0
    assert unscaled_grad_norm(_Engine("FP16_UnfusedOptimizer", norm=3.0), None) == 3.0  # no fp16 loss scale
    for norm in (None, float("inf"), float("nan")):  # not computed, or a skipped step
        assert unscaled_grad_norm(_Engine("FP16_UnfusedOptimizer", norm=norm), 1024.0) is None, norm


def test_the_caller_scales_the_loss_only_for_fp16_through_a_stage0_wrapper_whose_backward_does_not():
    """``stage0_corrections`` (the trainer's and the memory measurement's one decision) asks the engine: a DeepSpeed
    release whose stage-0 backward scales the loss must not have it scaled twice; bf16 and the ZeRO optimizers are
    never scaled here. A stage-0 wrapper's initial step is forgotten in every case."""
    from vlscale.engine.half_precision import stage0_corrections

    for wrapper, precision, multiplier, want in (("FP16_UnfusedOptimizer", "fp16", 1.0, True),
                                                  ("FP16_Optimizer", "fp16", 1.0, True),
                                                  ("FP16_UnfusedOptimizer", "fp16", 1024.0, False),
                                                  ("FP16_UnfusedOptimizer", "bf16", 1.0, False),
                                                  ("DeepSpeedZeroOptimizer", "fp16", 1.0, False)):
        engine = _Engine(wrapper, multiplier=multiplier)
        engine.module(torch.ones(1, 3)).sum().backward()
        engine.optimizer.optimizer.step()
        assert stage0_corrections(engine, precision) is want, (wrapper, precision, multiplier)
        assert bool(engine.optimizer.optimizer.state) == (wrapper == "DeepSpeedZeroOptimizer"), wrapper


def test_the_loss_scale_probe_runs_through_a_trainable_parameter_behind_frozen_ones():
    """A PEFT model's first parameters are the frozen backbone's: the probe must go through a trainable one (through
    a frozen one it has no gradient to read, and registering its hook fails); a multiplier of 2 or of half the loss
    scale is neither the loss scale nor 1, and refused."""
    from vlscale.engine.half_precision import engine_scales_fp16_loss

    for scales in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3).requires_grad_(False), torch.nn.Linear(3, 2))
        engine = _Engine(multiplier=1024.0 if scales else 1.0, module=model)
        assert engine_scales_fp16_loss(engine) is scales
        assert all(p.grad is None for p in engine.module.parameters())
    for multiplier in (2.0, 512.0):
        with pytest.raises(RuntimeError, match=rf"by {multiplier}, neither the loss scale 1024\.0 nor 1"):
            engine_scales_fp16_loss(_Engine(multiplier=multiplier))


def test_the_loss_scale_probe_reads_a_scale_past_fp16s_range_on_an_fp16_model():
    """At stage 0 the engine's model is fp16 and DeepSpeed's initial loss scale is 2^16, past fp16's largest value
    (65,504): the probe computes in fp32, so an engine that multiplies the loss by 2^16 is told from one that does not
    (an fp16 probe's gradient is inf there, and the probe refused the engine)."""
    from vlscale.engine.half_precision import engine_scales_fp16_loss

    for scales in (True, False):
        engine = _Engine(loss_scale=65536.0, multiplier=65536.0 if scales else 1.0,
                         module=torch.nn.Linear(3, 2).half())
        assert engine_scales_fp16_loss(engine) is scales
        assert all(p.grad is None for p in engine.module.parameters())
