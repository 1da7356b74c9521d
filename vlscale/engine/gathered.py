"""Generation with the model gathered whole under ZeRO-3.

Under ZeRO-3 every module's forward all-gathers its parameters and releases them after (DeepSpeed's
per-module hooks), and ``generate`` runs the decoder once per new token: a caption of 20 tokens gathers the
decoder 20 times per batch, and on a CPU the hooks' own bookkeeping is most of a small model's evaluation.
:func:`gathered_for_generation` gathers every parameter once (``deepspeed.zero.GatheredParameters``), takes
the hooks off for the block, and puts them back (and the partitions) after: an evaluation pays one gather.

It costs the whole model's weights on every rank for the block, so ``train.eval_gather`` decides:
``auto`` gathers where the whole model takes at most half of the memory free on the device (the rest
is left to generation's activations and cache), ``always`` gathers regardless, ``never`` keeps the per-module
gathers. The decision is collective (every rank must gather, or none), and logged once per process.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from vlscale.config import EVAL_GATHER

logger = logging.getLogger(__name__)
_said: set[str] = set()  # the decisions logged


def _zero3_offload(engine):
    """The ZeRO-3 parameter coordinator's owner of ``engine`` (its per-module hooks), or None when the engine
    does not partition parameters (ZeRO 0-2, no DeepSpeed)."""
    if engine is None or not getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        return None
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # an engine without an optimizer: the offload itself
    return offload if offload is not None and hasattr(offload, "forward_hooks") else None


def whole_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter of ``module`` that ZeRO-3 manages, whole: what each rank holds while the block
    runs, beside its partitions (the memory estimate's ``eval_gathered``, :mod:`vlscale.profiling.analytic`)."""
    return sum(p.ds_numel * p.element_size() for p in module.parameters() if hasattr(p, "ds_id"))


def free_bytes(device) -> int:
    """Memory free for this rank's new tensors on ``device``: the CUDA allocator's free memory plus what it holds
    unused; on a CPU the system's available memory, shared by the ranks on this machine."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    from vlscale.engine.distributed import local_world_size

    return int(psutil.virtual_memory().available) // local_world_size()


def _say(decision: str, message: str) -> None:
    """``message`` logged the first time this process takes ``decision`` (its figures change between evaluations)."""
    if decision not in _said:
        _said.add(decision)
        logger.info(message)


@contextlib.contextmanager
def gathered_for_generation(engine, policy: str = "auto", device="cpu"):
    """Runs the block with ``engine``'s model gathered whole and without ZeRO-3's per-module hooks where
    ``policy`` (``train.eval_gather``) says so; yields whether it did. Collective under ZeRO-3: every rank
    enters it. Outside ZeRO-3 (nothing partitioned) it does nothing."""
    if policy not in EVAL_GATHER:
        raise ValueError(f"train.eval_gather={policy!r} must be one of {list(EVAL_GATHER)}")
    offload = _zero3_offload(engine)
    if offload is None or policy == "never":
        yield False
        return
    from vlscale.engine.distributed import all_reduce_sum
    from vlscale.profiling.analytic import fmt_bytes

    module = offload.module
    whole, free = whole_bytes(module), free_bytes(device)
    fits = policy == "always" or whole <= free // 2
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    everywhere = all_reduce_sum([float(fits)], device)[0] == world  # every rank gathers, or none
    if not everywhere:
        where = "here" if not fits else "on another rank"
        _say(f"{policy} per-module", "evaluation: generating under ZeRO-3's per-module gathers: the whole model "
             f"({fmt_bytes(whole)} a rank) does not fit in half of the memory free {where} ({fmt_bytes(free)} here; "
             "train.eval_gather=always gathers regardless)")
        yield False
        return
    _say(f"{policy} gathered", f"evaluation: generating with the model gathered whole on each rank "
         f"({fmt_bytes(whole)} a rank, {fmt_bytes(free)} free here; train.eval_gather={policy})")
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        _remove_hooks(offload)
        try:
            yield True
        finally:
            offload._register_deepspeed_module(module)


def _remove_hooks(offload) -> None:
    """Takes ZeRO-3's per-module fetch/release hooks off (the root's start-of-forward hook, which only resets
    the coordinator's step, stays); ``offload._register_deepspeed_module`` puts them back."""
    for handle in (*offload.forward_hooks, *offload.backward_hooks):
        handle.remove()
    offload.forward_hooks.clear()
    offload.backward_hooks.clear()
    for p in offload.module.parameters():
        if hasattr(p, "ds_active_sub_modules"):
            p.ds_active_sub_modules.clear()
