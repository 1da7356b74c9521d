"""Memory profiling: predict, measure and plan the per-GPU memory of a training run.

* :mod:`vlscale.profiling.analytic` - the per-rank model: parameters, gradients and optimizer
  state the way DeepSpeed lays them out (ZeRO 0-3, any world size, CPU/NVMe offload), activations
  traced op by op through the T5/BART encoder-decoder (frozen-backbone aware, checkpointing),
  transient buffers, and the peak over the phases of a step. ``estimate_memory(cfg, world_size)``.
* :mod:`vlscale.profiling.measure` - the same components read from a real run (DeepSpeed engine
  tensors, saved_tensors_hooks, a live-tensor TorchDispatchMode on CPU, the allocator peak on GPU):
  ``measure_memory(cfg, world_size)`` (``measure_memory_cases`` for several runs in one start-up);
  ``run_gpu_section(out)`` for the GPU benchmark script.
* :mod:`vlscale.profiling.planner` - the fastest ZeRO stage / offload / checkpointing / micro-batch /
  precision that fits a budget: ``plan(cfg, "24GiB", world_size)``.

Command line: ``python launchers/profile_memory.py --config NAME --world-size N [--budget SIZE] [--measure]``.
"""

from vlscale.profiling.analytic import (MemoryEstimate, ZeroSettings, estimate_memory, fmt_bytes,  # noqa: F401
                                        parameter_inventory, parse_size, resolve_ds_config)

__all__ = ["MemoryEstimate", "ZeroSettings", "estimate_memory", "fmt_bytes", "parameter_inventory", "parse_size",
           "resolve_ds_config", "measure_memory", "plan"]


def measure_memory(*args, **kwargs):
    """See :func:`vlscale.profiling.measure.measure_memory` (imported lazily: it pulls in DeepSpeed)."""
    from vlscale.profiling.measure import measure_memory as _measure

    return _measure(*args, **kwargs)


def plan(*args, **kwargs):
    """See :func:`vlscale.profiling.planner.plan`."""
    from vlscale.profiling.planner import plan as _plan

    return _plan(*args, **kwargs)
