"""Buffers of the modules built outside ``zero.Init`` reach the rank's accelerator under ZeRO-3.

DeepSpeed's engine moves nothing of a model that holds ``zero.Init`` parameters, so the ResNet CLIP's
BatchNorm statistics stayed on the host: on an H200 the main command (ZeRO-3, model.vision=tiny-clip-rn)
failed at its first step with "running_mean is on cpu, different from other tensors on cuda:0"
(benchmarks/gpu_suite.py, 2026-12-04). On CPU the host is the accelerator, so the test checks the mover
itself (onto the meta device) and that the ZeRO-3 build hands it the accelerator's device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlscale.engine.sharded_loading import move_buffers

ROOT = Path(__file__).resolve().parents[2]


def test_move_buffers_moves_every_buffer_and_no_parameter():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    model.register_buffer("scale", torch.ones(1))
    moved = move_buffers(model, torch.device("meta"))
    assert sorted(moved) == sorted(["scale", "1.running_mean", "1.running_var", "1.num_batches_tracked",
                                    "2.0.running_mean", "2.0.running_var", "2.0.num_batches_tracked"])
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())  # DeepSpeed partitions those
    assert move_buffers(model, torch.device("meta")) == []


WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
from vlscale.config import load_config
from vlscale.engine import sharded_loading
calls = []
real = sharded_loading.move_buffers
def spy(model, device):
    moved = real(model, device)
    calls.append({"device": str(device), "buffers": [n for n, _ in model.named_buffers()]})
    return moved
sharded_loading.move_buffers = spy
cfg = load_config(None, ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
                         "model.vision_pretrained=null", "model.tokenizer=synthetic"])
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
model, hf_ds, _ = sharded_loading.build_model_zero3(cfg, ds, 64)
json.dump(calls, open(sys.argv[2], "w"))
dist.destroy_process_group()
'''


def test_zero3_build_moves_the_vision_buffers_to_the_accelerator(tmp_path, preloaded):
    """The build runs in one rank forked from the preloaded server (zero.Init needs a process group)."""
    env = preloaded.one_rank_env(OMP_NUM_THREADS="1")
    result = tmp_path / "calls.json"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, result], env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    calls = json.loads(result.read_text())
    assert len(calls) == 1 and calls[0]["device"] == "cpu", calls  # DeepSpeed's CPU accelerator's device
    assert any(n.startswith("vision.") and n.endswith("running_mean") for n in calls[0]["buffers"]), calls
