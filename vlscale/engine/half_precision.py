"""Corrections for DeepSpeed's half-precision optimizers without ZeRO (stage 0).

At ZeRO stage 0 with fp16 or bf16, DeepSpeed wraps the optimizer in ``FP16_Optimizer`` (fused, on
GPU with FusedAdam) or ``FP16_UnfusedOptimizer`` (any other optimizer, and on CPU). In DeepSpeed
0.19.8 (measured on one process, the same data and seed, against ZeRO-1, which computes the same
updates in exact arithmetic):

1. ``engine.backward`` calls ``loss.backward()`` without the fp16 loss scale, while the wrapper's
   ``step`` divides the gradients by it (deepspeedai/DeepSpeed#8393): every update sees a gradient
   ``scale`` (65,536) times too small. Adam hides most of it, but gradient clipping never triggers,
   overflow never shows (the dynamic scale never adapts) and small fp16 gradients underflow with no
   scaling to protect them. :func:`engine_scales_fp16_loss` finds out by running a backward through
   the engine; the trainer then multiplies the loss by the scale itself.
2. Both wrappers run one optimizer step with zero gradients when they are built
   (``initialize_optimizer_states``), so Adam's step counter starts at 1: the bias corrections are
   off by a step for the whole run and the first update is 0.74x the size it should be
   (``benchmarks/half_precision_stage0.py``; BENCHMARKS.md). :func:`undo_initial_step` forgets that
   step.
3. ``FP16_UnfusedOptimizer`` reports the norm of the *scaled* gradients (the fused one and the ZeRO
   optimizers divide by the scale): :func:`unscaled_grad_norm`.

``tests/integration/test_half_precision.py`` checks stage 0 against stage 1 step by step (losses,
gradient norms, skipped steps), so a DeepSpeed release that fixes one of these shows up there.
"""

from __future__ import annotations

import math
from typing import Optional

STAGE0_WRAPPERS = ("FP16_Optimizer", "FP16_UnfusedOptimizer")


def is_stage0_half_precision(engine) -> bool:
    return type(engine.optimizer).__name__ in STAGE0_WRAPPERS


def engine_scales_fp16_loss(engine) -> bool:
    """Whether ``engine.backward`` multiplies the loss by the fp16 loss scale that the optimizer's
    step divides the gradients by (point 1 above).

    Rather than trusting a version number, one backward of a constant 1 runs through the engine (on
    every rank: at stage 0 it ends in an all-reduce) and the gradient that reached the constant is
    read: ``scale / accumulation steps`` if the engine scales, ``1 / accumulation steps`` if not. The
    probe leaves zero gradients, which are dropped.
    """
    param = next(p for p in engine.module.parameters() if p.requires_grad)
    probe = param.reshape(-1)[:1].float().sum() * 0.0 + 1.0
    seen = []
    probe.register_hook(lambda g: seen.append(float(g)))
    engine.backward(probe)
    engine.optimizer.zero_grad()
    factor, scale = seen[0] * engine.gradient_accumulation_steps(), float(engine.optimizer.loss_scale)
    if math.isclose(factor, scale, rel_tol=1e-6):
        return True
    if math.isclose(factor, 1.0, rel_tol=1e-6):
        return False
    raise RuntimeError(f"fp16: DeepSpeed's engine.backward multiplied the loss by {factor}, neither the loss scale "
                       f"{scale} nor 1; vlscale does not know how to scale the loss for this DeepSpeed release")


def undo_initial_step(engine) -> bool:
    """Forget the optimizer step a stage-0 half-precision wrapper took with zero gradients when it
    was built (point 2 above). -> whether there was one.

    Adam's state (step counter, moments) is dropped, to be created again at the first real step as
    for any other optimizer. The step's only other effect, AdamW's decoupled weight decay, moved the
    fp32 master weights by ``lr * weight_decay`` of their value (1e-5 with the defaults), below fp16's
    and bf16's resolution of the weights the model computes with, and is left.
    """
    if not is_stage0_half_precision(engine):
        return False
    inner = engine.optimizer.optimizer
    if not inner.state:
        return False
    inner.state.clear()
    return True


def stage0_corrections(engine, precision: str) -> bool:
    """Correct a newly built engine as training does: forget a stage-0 wrapper's initial step (point 2), and
    -> whether the caller must multiply the loss by the fp16 loss scale itself (point 1: fp16 through a stage-0
    wrapper whose ``engine.backward`` does not)."""
    undo_initial_step(engine)
    return precision == "fp16" and is_stage0_half_precision(engine) and not engine_scales_fp16_loss(engine)


def unscaled_grad_norm(engine, scale_used: Optional[float]) -> Optional[float]:
    """The global gradient norm of the last step, unscaled (point 3 above); None if not computed or
    not finite (a skipped step). ``scale_used``: the fp16 loss scale of that step's backward."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    if scale_used and type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer":
        norm /= scale_used
    return norm if math.isfinite(norm) else None
