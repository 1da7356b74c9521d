"""ZeRO-Infinity (``nvme`` offload): the host memory DeepSpeed pins for swapping, predicted per rank.

The profiler counted 2 x the gathered parameters and 2 x the largest trainable parameter (fp32) as
pinned host memory, and put the ZeRO-3 gradient partition on NVMe. DeepSpeed 0.19 allocates, per rank,
``offload_param.buffer_count`` x ``buffer_size`` elements for the parameter swapper (16 x 1e8 with
``zero3_nvme.json``: 2.98 GiB in bf16), ``offload_optimizer.buffer_count`` fp32 buffers of the largest
optimizer sub-group partition, keeps the trainable partitions up to ``max_in_cpu`` and every partition
under 1 MiB in host memory, and the gradient partition too. For t5-3b (8 ranks, bf16, adapters) the
host prediction was 127.5 MiB; it is 3.13 GiB.

libaio is not installed on this machine, so DeepSpeed's async_io op cannot be built: the measured test
runs DeepSpeed's own swappers and engine with a stand-in for the op (synchronous file I/O in Python)
that records every pinned buffer DeepSpeed asks it for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cpu_adam_op  # tests/cpu_adam_op.py: DeepSpeed's optimizer op without its 80 s build
import pytest

from vlscale.config import load_config
from vlscale.profiling.analytic import (ParamInventory, ZeroSettings, estimate_memory, resolve_ds_config,
                                        zero_infinity_bytes)

ROOT = Path(__file__).resolve().parents[2]
MiB = 2 ** 20


def _inventory(numels, trainable):
    n = len(numels)
    return ParamInventory([f"lm.p{i}.weight" for i in range(n)], list(numels), [2] * n, list(trainable),
                          ["lm"] * n, vocab_size=100)


def test_zero_infinity_arithmetic_follows_deepspeeds_swappers():
    """DeepSpeed's formulas, written out: I/O alignment 1024 x intra_op_parallelism bytes, swappable from
    max(1 MiB, aio.block_size) bytes, max_in_cpu over the trainable groups' partitions."""
    W, b = 2, 2
    frozen = [3 * MiB, 100_000]  # a partition of 1.5 Mi elements (3 MiB in bf16): NVMe; 50,000: too small
    trained = [1_200_001, 4_000]
    inv = _inventory(frozen + trained, [False, False, True, True])
    z = ZeroSettings(stage=3, offload_optimizer="nvme", offload_param="nvme", param_buffer_count=7,
                     param_buffer_size=1_000_001, max_in_cpu=10 ** 9, optimizer_buffer_count=4,
                     aio_intra_op_parallelism=2)
    got = zero_infinity_bytes(inv, z, W, "bf16")
    align16, align32 = 1024 * 2 // b, 1024 * 2 // 4  # elements
    up = lambda n, a: -(-n // a) * a  # noqa: E731
    parts = [-(-n // W) for n in trained]  # 600,001 (1.2 MB in bf16) and 2,000: one sub-group
    assert got["param_pool"] == 7 * up(1_000_001, align16) * b
    assert got["param_host"] == sum(parts) * b + 50_000 * b  # the trainable flat buffer + the small frozen one
    assert got["param_nvme"] == 3 * MiB // 2 * b and got["param_reserve"] == 0
    assert got["optimizer_pool"] == 4 * up(sum(parts), align32) * 4
    assert got["optimizer_nvme"] == 16 * sum(parts)  # 2.4 MB of fp32: swapped (master, 2 moments, gradient)
    assert got["optimizer_host"] == sum(parts) * b  # the gradient partition in the model dtype

    # max_in_cpu below the trainable partitions: that sub-group has no flat buffer, its large partition goes
    # to NVMe, and DeepSpeed reserves a pinned buffer of its parameters at full size for the step's write-back
    z.max_in_cpu = 1000
    got = zero_infinity_bytes(inv, z, W, "bf16")
    assert got["param_host"] == 1000 * b + parts[1] * b + 50_000 * b
    assert got["param_nvme"] == (3 * MiB // 2 + parts[0]) * b
    assert got["param_reserve"] == (up(1_200_001, align16) + up(4_000, align16)) * b
    # an optimizer sub-group under 1 MiB of fp32 is not swapped: its fp32 state stays on the host
    z.sub_group_size = 100_000
    got = zero_infinity_bytes(inv, z, W, "bf16")
    assert got["optimizer_nvme"] == 16 * parts[0] and got["optimizer_host"] == sum(parts) * b + 16 * parts[1]


def test_zero3_nvme_json_pins_gibibytes_of_host_memory():
    """The shipped zero3_nvme.json's 16 x 1e8-element parameter buffers are on every rank's host, in the model's
    dtype: t5-3b in bf16 on 8 ranks needs 2.98 GiB of them (the estimate said 127.5 MiB in all)."""
    os.environ.setdefault("VLSCALE_NVME_PATH", "/tmp")
    cfg = load_config("tiny", ["model.backbone=t5-3b", "train.precision=bf16",
                               "train.deepspeed=ds_configs/zero3_nvme.json"])
    est = estimate_memory(cfg, 8, resolve_ds_config(cfg, 8, None))
    parts = est.detail["zero_infinity"]
    assert parts["param_pool"] == 16 * 100_000_256 * 2  # buffer_size aligned to 512 bf16 elements
    assert est.host == sum(v for k, v in parts.items() if not k.endswith("_nvme"))
    assert est.nvme == parts["param_nvme"] + parts["optimizer_nvme"]
    assert est.host > 3 * 10 ** 9


WORKER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch


class StandInAio:
    """DeepSpeed's async_io handle with synchronous Python file I/O; records the pinned buffers alive."""
    pinned = {}

    def __init__(self, *args, **kwargs):
        self.pending = 0

    def new_cpu_locked_tensor(self, num_elem, example):
        t = torch.zeros(int(num_elem), dtype=example.dtype)
        StandInAio.pinned[t.data_ptr()] = t.numel() * t.element_size()
        return t

    def free_cpu_locked_tensor(self, t):
        return StandInAio.pinned.pop(t.data_ptr(), None) is not None

    def is_pinned(self, t):
        return any(a <= t.data_ptr() < a + n for a, n in StandInAio.pinned.items())

    def async_pwrite(self, buffer, path, offset=0):
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.seek(offset)
            f.write(buffer.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.pending += 1
        return 0

    def async_pread(self, buffer, path, offset=0):
        flat = buffer.view(-1).view(torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(flat.numel())
        flat[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.pending += 1
        return 0

    def wait(self):
        n, self.pending = self.pending, 0
        return n


from deepspeed.ops.op_builder import AsyncIOBuilder
AsyncIOBuilder.load = lambda self, verbose=True: type("op", (), {"aio_handle": StandInAio})
import deepspeed
import torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
from vlscale.config import load_config
from vlscale.modeling import backbones
from vlscale.profiling.analytic import default_vocab_size, estimate_memory, resolve_ds_config
from vlscale.profiling.measure import run_measured_steps

overrides, param_blocks, arch = json.loads(sys.argv[2])
backbones.LM_REGISTRY["tiny-t5-swap"] = backbones._t5(*arch, base=dict(backbones._T5_V1, vocab_size=1100))
cfg = load_config("tiny", overrides)
initialize, results = deepspeed.initialize, []
for i, param_block in enumerate(param_blocks):  # one process for all: its start-up is half of a run's time
    StandInAio.pinned.clear()
    ds = resolve_ds_config(cfg, 1, None, device_type="cpu")
    ds["zero_optimization"]["offload_param"].update(param_block)
    for key in ("offload_param", "offload_optimizer"):  # each run swaps into a folder of its own
        ds["zero_optimization"][key]["nvme_path"] = os.path.join(ds["zero_optimization"][key]["nvme_path"], str(i))
    engines = []
    deepspeed.initialize = lambda *a, **k: engines.append(initialize(*a, **k)) or engines[-1]
    meas = run_measured_steps(cfg, ds, vocab_size=default_vocab_size(cfg), steps=2)
    opt = engines[0][0].optimizer
    flats = [t for t in opt.param_groups_fp16_flat_cpu_memory if t.numel() > 1]
    in_flat = {t.untyped_storage().data_ptr() for t in flats}
    nvme = host = 0
    for p in engines[0][0].module.parameters():
        size = p.ds_tensor.ds_numel * 2  # bf16
        if getattr(p.ds_tensor, "final_location", None) == "nvme":
            nvme += size
        elif p.ds_tensor.untyped_storage().data_ptr() not in in_flat:  # a partition of its own in host memory
            host += size
    flat = sum(t.numel() * t.element_size() for t in flats)
    swapped = sum(int(n) for j, n in enumerate(opt.fp16_partitioned_groups_flat_numel)
                  if opt._swappable_optimizer_subgroup(j))
    est = estimate_memory(cfg, 1, ds, device="cpu")
    results.append({"pinned": sum(StandInAio.pinned.values()), "param_nvme": nvme, "param_host": flat + host,
                    "optimizer_nvme": 16 * swapped, "steps": meas["steps"], "predicted": est.detail["zero_infinity"]})
    del engines, opt, flats
json.dump(results, open(sys.argv[3], "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_zero_infinity_host_bytes_against_deepspeed(tmp_path, preloaded):
    """A T5 of random weights in bf16 with adapters, zero3_nvme.json, 1 CPU rank, 2 training steps through
    DeepSpeed's swappers: the pinned buffers DeepSpeed allocates, the partitions it swaps out and the optimizer
    sub-groups it swaps, byte for byte, with ``max_in_cpu`` at its default and at 0 (no trainable partition kept
    in memory: the write-back reserve appears). The T5 has every kind of partition at a sixth of t5-small's
    size: frozen FFN weights of 2 MiB (swapped), frozen attention weights, embedding and norms under 1 MiB (kept
    in host memory), 0.4 M trainable elements (one optimizer sub-group of 1.6 MB of fp32: swapped); the
    parameter buffers are cut to 1.1 M elements, just above the largest weight. Both runs in one process forked
    from the preloaded server (the start-up was half of a run's time)."""
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    env = preloaded.one_rank_env(OMP_NUM_THREADS="1", VLSCALE_NVME_PATH=str(nvme), **{cpu_adam_op.ENV: "standin"})
    cases = (None, 0)
    blocks = [{"buffer_size": 1_100_000, **({} if m is None else {"max_in_cpu": m})} for m in cases]
    arch = [256, 4096, 4, 2, 64]  # d_model, d_ff, heads, layers, d_kv: wi and wo 1 M elements each
    spec = [["train.deepspeed=ds_configs/zero3_nvme.json", "model.backbone=tiny-t5-swap", "train.precision=bf16",
             "train.micro_batch_size=1"], blocks, arch]
    result = tmp_path / "result.json"
    worker = tmp_path / "zero_infinity_worker.py"
    worker.write_text(WORKER)
    proc = preloaded.run(worker, [ROOT, json.dumps(spec), result], env=env, cwd=ROOT, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads(result.read_text())
    assert len(results) == len(cases)
    for max_in_cpu, r in zip(cases, results):
        pred, case = r["predicted"], f"max_in_cpu={max_in_cpu}"
        assert r["steps"] == 2, case
        assert r["pinned"] == pred["param_pool"] + pred["param_reserve"] + pred["optimizer_pool"], case
        assert (pred["param_reserve"] > 0) == (max_in_cpu == 0), case
        assert r["param_nvme"] == pred["param_nvme"] > 0, case
        assert r["param_host"] == pred["param_host"], case
        assert r["optimizer_nvme"] == pred["optimizer_nvme"] > 0, case
