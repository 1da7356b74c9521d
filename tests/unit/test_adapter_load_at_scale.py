"""load_adapter on 2 ranks at ZeRO-3, with a full fine-tuning adapter (``peft.method=none peft.train_lm=true``: the
whole tiny T5 trains, partitioned by ``zero.Init``).

Memory: the load read the whole file on every rank, then gathered every trainable parameter at once: each rank held
the model's trained weights twice (~2 x 11 GB per rank for T5-3B in fp32). It now gathers and sets them in chunks of
``chunk_elements`` (as a save gathers them), reading each tensor as its chunk is set, and only rank 0 reads the data
of a partitioned parameter (the gather's exit gives its values to the other ranks).

A rank that cannot read the file (another file system, permissions): it raised alone, and rank 0 waited in the
gather until the process group's timeout. The ranks now agree on the read before the first gather: the same error,
naming the rank and the path, on both, at once.

One 2-rank worker, forked from the preloaded server, does both (a few seconds) and writes each rank's findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIST_TIMEOUT_S = 60  # a rank left waiting in a collective ends after this (gloo); the refusal must come long before

WORKER = r'''
import json, sys, time
from datetime import timedelta
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo", timeout=timedelta(seconds=int(sys.argv[3])))
rank = dist.get_rank()
import safetensors
from safetensors.torch import load_file
from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.engine.sharded_loading import build_model_zero3

out = Path(sys.argv[2])
cfg = load_config(None, ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
                         "model.vision_pretrained=null", "model.tokenizer=synthetic", "peft.method=none",
                         "peft.train_lm=true"])
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}

def build(seed):
    torch.manual_seed(seed)  # other random weights, trainable ones included
    return build_model_zero3(cfg, ds, 64)[:2]

a, keep_a = build(1)
adapter = out / "adapter"
ckpt.save_adapter(a, adapter, cfg, vocab_size=64, rank=rank)
b, keep_b = build(2)
saved = load_file(str(adapter / ckpt.ADAPTER_WEIGHTS))
before = ckpt.gather_trainable_state_dict(b, rank)
partitioned = {n: int(p.ds_numel) for n, p in ckpt.trainable_parameters(b) if ckpt.is_partitioned(p)}

gathered, real_gathered = [], ckpt._gathered
def counted(params, modifier_rank):  # the elements each gather holds at once
    gathered.append(sum(int(p.ds_numel) for p in params if ckpt.is_partitioned(p)))
    return real_gathered(params, modifier_rank)

reads, real_open = [], safetensors.safe_open
class Reads:  # safe_open, noting the tensors whose data this rank reads
    def __init__(self, *args, **kwargs):
        self.f = real_open(*args, **kwargs)
    def __enter__(self):
        self.f.__enter__()
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def get_tensor(self, name):
        reads.append(name)
        return self.f.get_tensor(name)
    def __getattr__(self, name):
        return getattr(self.f, name)

chunk = sum(partitioned.values()) // 6
ckpt._gathered, safetensors.safe_open = counted, Reads
ckpt.load_adapter(b, adapter, chunk_elements=chunk)
ckpt._gathered, safetensors.safe_open = real_gathered, real_open
after = ckpt.gather_trainable_state_dict(b, rank)
result = {"partitioned": partitioned, "chunk": chunk, "gathered": gathered,
          "read_partitioned": [n for n in reads if n in partitioned], "reads": len(reads)}
if rank == 0:
    result["differed_before"] = [n for n in saved if not torch.equal(before[n], saved[n])]
    result["unequal_after"] = [n for n in saved if not torch.equal(after[n], saved[n])]

def refuse(*args, **kwargs):  # this rank's copy of the path does not read (permissions, another file system)
    raise PermissionError(13, "Permission denied", str(adapter / ckpt.ADAPTER_WEIGHTS))

if rank == 1:
    safetensors.safe_open = refuse
t0 = time.monotonic()
try:
    ckpt.load_adapter(b, adapter)
    result["refused"] = None
except Exception as e:  # a CheckpointError; the old load's rank 0: gloo's timeout in the gather
    result["refused"] = f"{type(e).__name__}: {e}"
result["refused_after_s"] = time.monotonic() - t0
safetensors.safe_open = real_open
(out / f"rank{rank}.json").write_text(json.dumps(result))
deadline = time.monotonic() + 2 * int(sys.argv[3])  # alive, not in a collective, until the other rank is done
while not (out / f"rank{1 - rank}.json").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
'''


@pytest.fixture(scope="module")
def ranks(preloaded, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("adapter_load_at_scale")
    script = out / "worker.py"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, out, DIST_TIMEOUT_S], nproc=2, env=dict(preloaded.env, OMP_NUM_THREADS="1"),
                         cwd=ROOT, timeout=4 * DIST_TIMEOUT_S)
    found = [out / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(f.exists() for f in found), proc.stdout[-4000:]
    return [json.loads(f.read_text()) for f in found]


def test_a_full_fine_tuning_adapter_loads_chunk_by_chunk_and_only_rank_0_reads_partitions(ranks):
    r0, r1 = ranks
    partitioned, chunk = r0["partitioned"], r0["chunk"]
    assert len(partitioned) > 20, "the LM's weights train (full fine-tuning) and are partitioned"
    assert r0["differed_before"], "the model built before the load held other weights (a load doing nothing fails)"
    assert r0["unequal_after"] == [], "every trainable tensor is the file's after the load"
    for r in ranks:  # before: one gather of every trainable parameter, sum(partitioned) elements
        assert sum(r["gathered"]) == sum(partitioned.values()) and len(r["gathered"]) >= 6, r["gathered"]
        assert max(r["gathered"]) <= chunk + max(partitioned.values()), (max(r["gathered"]), chunk)
    assert sorted(r0["read_partitioned"]) == sorted(partitioned), "rank 0 reads each partitioned tensor once"
    assert r1["read_partitioned"] == [], "rank 1 takes them from the gather's exit, reading none"
    assert r1["reads"] > 0, "... but reads what is whole on every rank (the projection, built outside zero.Init)"


def test_a_rank_that_cannot_read_the_file_is_refused_on_every_rank_at_once(ranks, tmp_path):
    for r in ranks:
        refused = r["refused"]
        assert refused is not None and refused.startswith("CheckpointError: "), refused
        assert "adapter_model.safetensors could not be read on rank 1 of 2: rank 1: " in refused, refused
        assert "Permission denied" in refused and "rank 0:" not in refused, refused
        assert r["refused_after_s"] < DIST_TIMEOUT_S / 3, r["refused_after_s"]  # agreed, not a timed-out gather
