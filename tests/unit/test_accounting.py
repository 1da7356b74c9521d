"""What a rank holds (vlscale.engine.accounting), on small tensors and stand-in engines: the byte counts the
run summary, the memory profiler and benchmarks/scale.py report. The multi-process runs in
tests/integration (test_zero3.py, test_profile_measure.py) check them against real DeepSpeed engines; these
pin each rule on its own: storages counted once, ZeRO-3 partitions and persistent copies, which gradient
buffers each stage reads, and which optimizer tensors are state.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlscale.engine.accounting import (gradient_bytes, live_gradient_bytes, optimizer_state_bytes, parameter_bytes,
                                       unique_storage_bytes)


def test_unique_storage_bytes_counts_each_storage_once():
    x = torch.zeros(10)                      # 40 bytes
    y = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert unique_storage_bytes([x, x[2:5], x.view(2, 5), y, "not a tensor", None]) == 40 + 24
    # a 0-element tensor holds nothing, even a view of a larger storage (a released ZeRO-3 parameter)
    assert unique_storage_bytes([x[:0], torch.empty(0)]) == 0


def test_a_view_met_first_counts_its_whole_storage():
    """Gradients that are views into one flat buffer (ZeRO's partitions): the whole buffer is held, whichever
    view is met first."""
    flat = torch.zeros(12)                   # 48 bytes
    assert unique_storage_bytes([flat[:2], flat[2:5], flat]) == 48


def _zero3_param(partition: int, full: int, persist: bool) -> torch.nn.Parameter:
    """A parameter as ZeRO-3 leaves it after partitioning: released (0 elements), its partition in ds_tensor."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_numel, p.ds_persist = 0, full, persist
    p.ds_tensor = torch.zeros(partition)
    return p


def test_parameter_bytes_counts_partitions_and_persistent_copies():
    model = torch.nn.Module()
    model.plain = torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))  # not partitioned: 14 bytes
    model.part = _zero3_param(5, 10, persist=False)                         # its partition: 20 bytes
    model.kept = _zero3_param(3, 6, persist=True)                           # partition 12 + full copy 24
    assert parameter_bytes(model) == 14 + 20 + 12 + 24


def _engine(optimizer, *params):
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    return SimpleNamespace(optimizer=optimizer, module=module)


def test_gradient_bytes_reads_the_buffer_of_each_stage():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4)                                                  # 16 bytes
    flat = torch.zeros(100)                                                  # 400 bytes
    averaged = {0: [torch.zeros(8), torch.zeros(2)], 1: None}                # 40 bytes
    opt = SimpleNamespace(grad_partitions_flat_buffer=flat, averaged_gradients=averaged)
    engine = _engine(opt, p)
    assert gradient_bytes(engine, 3) == 400
    assert gradient_bytes(engine, 2) == 40
    assert gradient_bytes(engine, 1) == 40
    assert gradient_bytes(engine, 0) == 16
    # stage 1/2 before any gradient was averaged: the parameters' own
    assert gradient_bytes(_engine(SimpleNamespace(averaged_gradients={}), p), 2) == 16


def test_live_gradient_bytes_counts_every_gradient_storage_on_the_device():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4)                                                  # 16
    master = torch.zeros(6)
    master.grad = torch.zeros(6)                                             # 24, a stage-0 bf16 master's
    opt = SimpleNamespace(grad_partitions_flat_buffer=torch.zeros(10),       # 40
                          grads_in_partition=torch.zeros(3, dtype=torch.float64),  # 24
                          fp32_groups_flat_partition=[master],
                          averaged_gradients={0: [torch.zeros(5)]},          # 20
                          fp32_groups=[torch.zeros(50)])                     # not a gradient
    engine = _engine(opt, p)
    assert live_gradient_bytes(engine, "cpu") == 16 + 24 + 40 + 24 + 20
    assert live_gradient_bytes(engine, "cuda") == 0
    # stage-0 fp16: during step() DeepSpeed's FP16_Optimizer sets fp32_groups_flat[i].grad to a new fp32 flat copy
    # of the gradients, FP16_UnfusedOptimizer each fp32_groups[i][j].grad; both were left out
    flat, one = torch.zeros(7), torch.zeros(3)
    flat.grad, one.grad = torch.zeros(7), torch.zeros(3)                     # 28, 12
    for fp16 in (SimpleNamespace(fp32_groups_flat=[flat]), SimpleNamespace(fp32_groups=[[one, torch.zeros(9)]])):
        assert live_gradient_bytes(_engine(fp16, p), "cpu") == 16 + (28 if hasattr(fp16, "fp32_groups_flat") else 12)


def test_optimizer_state_bytes_counts_masters_and_moments_not_parameters():
    p = torch.nn.Parameter(torch.zeros(4))
    master = torch.zeros(4)                                                  # 16: an fp32 copy of p
    inner = SimpleNamespace(state={master: {"step": 3, "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}})
    # stage 0 fp32 without a master copy: the optimizer's group holds the parameter itself, counted as params
    opt = SimpleNamespace(fp32_groups=[[master, p]], optimizer=inner)
    assert optimizer_state_bytes(_engine(opt, p)) == 16 + 16 + 16
    # a plain torch optimizer (no DeepSpeed wrapper): only its state
    plain = SimpleNamespace(state={p: {"exp_avg": torch.zeros(4)}})
    assert optimizer_state_bytes(_engine(plain, p)) == 16


def test_optimizer_state_bytes_reads_the_fp32_masters_of_every_deepspeed_optimizer():
    """Each DeepSpeed optimizer keeps its fp32 master copies under its own attribute: ZeRO-3
    (``fp32_partitioned_groups_flat``), ZeRO-1/2 (``single_partition_of_fp32_groups``), bf16 at stage 0/1
    (``fp32_groups_flat_partition``), fp16 at stage 0 fused (``fp32_groups_flat``) and unfused (``fp32_groups``,
    one list per group). Every one is counted beside Adam's moments (a missed name reported no masters at all)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "fp32_groups_flat"):
        master = torch.zeros(6)                                              # 24 bytes
        inner = SimpleNamespace(state={master: {"exp_avg": torch.zeros(6), "exp_avg_sq": torch.zeros(6)}})
        opt = SimpleNamespace(optimizer=inner, **{attr: [master, torch.zeros(3)]})  # + a second group: 12
        assert optimizer_state_bytes(_engine(opt, p)) == 24 + 12 + 2 * 24, attr
    masters = [[torch.zeros(6), torch.zeros(3)], [torch.zeros(5)]]           # fp16 unfused: 24 + 12 + 20
    unfused = SimpleNamespace(optimizer=SimpleNamespace(state={}), fp32_groups=masters)
    assert optimizer_state_bytes(_engine(unfused, p)) == 24 + 12 + 20


def test_live_gradient_bytes_counts_a_masters_gradient_not_the_master():
    """bf16 at stage 0/1 sets each fp32 master partition's ``.grad`` to a view of the flat gradient buffer of the
    whole group (every rank's partition): the buffer is what is alive, not a copy the size of the master."""
    p = torch.nn.Parameter(torch.zeros(4))
    flat = torch.zeros(12)                                                   # 48: the group's flat gradients
    master = torch.zeros(6)                                                  # this rank's partition (24 bytes)
    master.grad = flat.narrow(0, 6, 6)
    engine = _engine(SimpleNamespace(fp32_groups_flat_partition=[master]), p)
    assert live_gradient_bytes(engine, "cpu") == 48
