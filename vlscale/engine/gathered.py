"""Generation with the model gathered under ZeRO-3.

Under ZeRO-3 every module's forward all-gathers its parameters and releases them after (DeepSpeed's
per-module hooks), and ``generate`` runs the decoder once per new token: a caption of 20 tokens gathers the
decoder 20 times per batch, and on a CPU the hooks' own bookkeeping is most of a small model's evaluation.
:func:`gathered_for_generation` gathers every parameter once (one flat all-gather, as ZeRO-3's own fetches; released
by ``deepspeed.zero.GatheredParameters``), sets the hooks aside for the block, and puts them back (and the
partitions) after: an evaluation pays one gather.

That costs the whole model's weights on every rank. Where they do not fit, the decoding parameters alone (all
but the LM's encoder, the vision tower, the projection and the prompts, which run once per batch before the
first new token) are gathered around each batch's decoding, the encoder running under the per-module gathers
before it: one gather of the decoder per batch instead of one per new token, in about 57 % of the whole model's
memory for T5-11B. ``train.eval_gather`` decides: ``auto`` gathers the whole model where it takes at most half
of the memory free on the device (the rest is left to generation's activations and cache), else the decoding
parameters where they do, else neither; ``always`` the whole model regardless, ``decoder`` the decoding
parameters regardless, ``never`` keeps the per-module gathers. The decision is collective (every rank must
gather, or none), and logged once per process.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

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
    return _bytes(module.parameters())


def decoding_parameters(model: torch.nn.Module) -> list:
    """The parameters ``generate`` uses at each new token: all of ``model``'s but those of the LM's encoder (its
    token embedding, shared with the decoder, kept) and of what :meth:`VLModel.encoding_modules` names, which run
    once per batch before the first. ``model``: a VLModel, or an HF encoder-decoder LM itself."""
    lm = getattr(model, "lm", model)
    once = [lm.get_encoder(), *(model.encoding_modules() if hasattr(model, "encoding_modules") else ())]
    skip = {id(p) for m in once for p in m.parameters()} - {id(lm.get_input_embeddings().weight)}
    return [p for p in model.parameters() if id(p) not in skip]


def _bytes(params) -> int:
    return sum(p.ds_numel * p.element_size() for p in params if hasattr(p, "ds_id"))


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


@dataclass(frozen=True)
class Generation:
    """How an evaluation generates under ZeRO-3 (what :func:`gathered_for_generation` yields). ``gathered``:
    ``"whole"`` (the model gathered for the block), ``"decoder"`` (``decode_block()`` gathers the decoding
    parameters around one batch's decoding: :meth:`VLModel.generate`'s argument) or None (ZeRO-3's per-module
    gathers, or nothing partitioned)."""

    gathered: Optional[str] = None
    decode_block: Optional[Callable[[], ContextManager]] = None

    @property
    def synced(self) -> bool:
        """Whether decoding runs collectives (per-module gathers): the ranks then decode with ``synced_gpus``."""
        return self.gathered is None


@contextlib.contextmanager
def gathered_for_generation(engine, policy: str = "auto", device="cpu"):
    """Runs the block with ``engine``'s model gathered whole, or with its decoding parameters gathered around each
    batch's decoding, and without ZeRO-3's per-module hooks while they are, where ``policy``
    (``train.eval_gather``) says so; yields a :class:`Generation`. Collective under ZeRO-3: every rank enters it.
    Outside ZeRO-3 (nothing partitioned) it does nothing."""
    if policy not in EVAL_GATHER:
        raise ValueError(f"train.eval_gather={policy!r} must be one of {list(EVAL_GATHER)}")
    offload = _zero3_offload(engine)
    if offload is None or policy == "never":
        yield Generation()
        return
    from vlscale.engine.distributed import all_reduce_sum
    from vlscale.profiling.analytic import fmt_bytes

    module = offload.module
    decoding = decoding_parameters(module)
    whole, dec, free = whole_bytes(module), _bytes(decoding), free_bytes(device)
    fits = {"always": (1.0, 1.0), "decoder": (0.0, 1.0)}.get(policy, (float(whole <= free // 2),
                                                                     float(dec <= free // 2)))
    short = all_reduce_sum([1.0 - f for f in fits], device)  # ranks without the room, for each: none or all gather
    mode = "whole" if short[0] == 0 else "decoder" if short[1] == 0 else None
    where = lambda i: "here" if not fits[i] else "on another rank"  # noqa: E731
    sizes = f"{fmt_bytes(free)} free here; train.eval_gather={policy}"
    if mode is None:
        _say(f"{policy} per-module", "evaluation: generating under ZeRO-3's per-module gathers: neither the whole "
             f"model ({fmt_bytes(whole)} a rank) nor its decoding parameters ({fmt_bytes(dec)}) fit in half of the "
             f"memory free {where(1)} ({sizes}; train.eval_gather=always or decoder gathers regardless)")
        yield Generation()
        return
    if mode == "decoder":
        _say(f"{policy} decoder", f"evaluation: generating with the decoding parameters gathered on each rank around "
             f"each batch's decoding ({fmt_bytes(dec)} a rank; the encoder and the visual side under ZeRO-3's "
             "per-module gathers" + (f"; the whole model, {fmt_bytes(whole)}, does not fit in half of the memory "
                                     f"free {where(0)}" if policy == "auto" else "") + f"; {sizes})")
        yield Generation("decoder", functools.partial(_gathered, offload, decoding))
        return
    _say(f"{policy} gathered", f"evaluation: generating with the model gathered whole on each rank "
         f"({fmt_bytes(whole)} a rank, {sizes})")
    with _gathered(offload, list(module.parameters())):
        yield Generation("whole")


@contextlib.contextmanager
def _gathered(offload, params: list):
    """``params`` gathered and ZeRO-3's per-module hooks off for the block; the partitions and the same hooks back
    after. What ZeRO-3 holds gathered or in flight before (a prefetch) is released first."""
    import deepspeed

    offload.empty_partition_cache()
    _gather_coalesced(params)
    with deepspeed.zero.GatheredParameters(params):  # gathered already: it releases them after
        restore = _hooks_off(offload)
        try:
            yield
        finally:
            restore()


def _gather_coalesced(params: list) -> None:
    """All-gathers ``params`` in one flat collective per kind, as ZeRO-3's own fetches do (``GatheredParameters``
    gathers them one by one: 188 all-gathers for the default model's decoder; BENCHMARKS.md, "Evaluation with the
    model gathered")."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]  # all of them, on every rank
    for group in ([p for p in todo if p.ds_secondary_tensor is not None],
                  [p for p in todo if p.ds_secondary_tensor is None]):
        if group:
            group[0].all_gather_coalesced(group).wait()


def _hooks_off(offload) -> Callable[[], None]:
    """Takes ZeRO-3's per-module fetch/release hooks off every module (the root's start-of-forward hook, which
    only resets the coordinator's step, and every other hook, PEFT's, stay) -> a function putting the same hooks
    back in their places (the modules' own hook dicts, not registered again)."""
    ours = {handle.id for handle in (*offload.forward_hooks, *offload.backward_hooks)}
    saved = []
    for m in offload.module.modules():
        for name in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(m, name)
            if not ours.isdisjoint(hooks):
                saved.append((m, name, hooks))
                setattr(m, name, collections.OrderedDict((k, h) for k, h in hooks.items() if k not in ours))

    def restore():
        for m, name, hooks in saved:
            setattr(m, name, hooks)
    return restore
