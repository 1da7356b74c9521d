"""What a rank holds, read from the engine's real tensors: the one place for the byte counts that the
engine's ``run_summary.json``, the memory profiler's measured runs (``vlscale.profiling.measure``) and
``benchmarks/scale.py`` report.

    params     ZeRO-3: each parameter's partition (``ds_tensor``), plus the full copy of a persistent
               one (``ds_persist``); otherwise the parameter itself
    grads      the gradient buffers at the accumulation boundary (stage 3: the flat partition buffer;
               1/2: the averaged gradient partitions; 0: ``param.grad``); ``live_gradient_bytes``:
               every gradient storage alive at any moment of a step (the profiler's peak)
    optimizer  fp32 master copies that are not the parameters themselves, and every optimizer state
               tensor (Adam's moments): nothing for frozen parameters, which are not in the optimizer

Storages are counted once, whatever views share them.
"""

from __future__ import annotations

from typing import Iterable

import torch

from vlscale.engine.checkpoint import is_partitioned

# fp32 master copies by DeepSpeed optimizer: stage 3, stages 1/2, bf16 (stage 0/1), fp16 (stage 0,
# flat and per parameter)
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups")


def unique_storage_bytes(tensors: Iterable) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds while training: ZeRO-3 partitions (``ds_tensor``), plus the full
    copy of every persistent parameter (``ds_persist``: under ``stage3_param_persistence_threshold``
    elements, kept whole on every rank beside its partition). A persistent parameter counts at its full
    size even while released (``numel() == 0``, e.g. after generation): the next step gathers it again."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_partitioned(p):  # ZeRO-3
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
            if getattr(p, "ds_persist", False):
                total += p.ds_numel * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def gradient_bytes(engine, stage: int) -> int:
    """Bytes of gradient buffers this rank holds at the accumulation boundary (before the update)."""
    opt = engine.optimizer
    if stage == 3 and getattr(opt, "grad_partitions_flat_buffer", None) is not None:
        return unique_storage_bytes([opt.grad_partitions_flat_buffer])
    averaged = getattr(opt, "averaged_gradients", None)
    if stage in (1, 2) and averaged:
        tensors = [g for grads in averaged.values() for g in (grads or [])]
        if tensors:
            return unique_storage_bytes(tensors)
    return unique_storage_bytes(p.grad for p in engine.module.parameters() if p.grad is not None)


def live_gradient_bytes(engine, device_type: str) -> int:
    """Bytes of every gradient storage alive on ``device_type`` now, at any moment of a step (the
    memory profiler reads it at the peak): ``param.grad``, ZeRO's flat and partitioned gradient
    buffers, the fp32 masters' gradients, stage 1/2's averaged partitions."""
    opt = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for attr in ("grad_partitions_flat_buffer", "grads_in_partition"):
        t = getattr(opt, attr, None)
        if isinstance(t, torch.Tensor):
            tensors.append(t)
    for attr in _MASTER_ATTRS:  # the fp32 masters, whose .grad the step sets and reads (ZeRO's partitions; at
        for item in getattr(opt, attr, None) or []:  # stage 0, fp16's flat groups or unfused per-parameter lists)
            for t in item if isinstance(item, (list, tuple)) else [item]:
                if isinstance(t, torch.Tensor) and t.grad is not None:
                    tensors.append(t.grad)
    averaged = getattr(opt, "averaged_gradients", None)
    if isinstance(averaged, dict):
        for grads in averaged.values():
            tensors += [g for g in (grads or []) if isinstance(g, torch.Tensor)]
    return unique_storage_bytes(t for t in tensors if t.device.type == device_type)


def optimizer_state_bytes(engine) -> int:
    """Bytes of fp32 master copies (those that are not the parameters themselves) and optimizer state."""
    opt = engine.optimizer
    masters = []
    for attr in _MASTER_ATTRS:
        for item in getattr(opt, attr, None) or []:
            masters += list(item) if isinstance(item, (list, tuple)) else [item]
    inner = getattr(opt, "optimizer", opt)
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    params = {id(p) for p in engine.module.parameters()}
    masters = [t for t in masters if isinstance(t, torch.Tensor) and id(t) not in params]
    return unique_storage_bytes(masters) + unique_storage_bytes(state)
