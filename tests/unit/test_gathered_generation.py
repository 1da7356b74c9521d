"""Generation with the model gathered whole under ZeRO-3 (vlscale.engine.gathered, ``train.eval_gather``): on 2
ranks of a tiny T5 partitioned by DeepSpeed, the block gathers every parameter once and DeepSpeed fetches nothing
while it decodes, it decodes what the per-module gathers decode, and after it the partitions and the hooks are as
they were: the next training step's loss is the one before, and a gather after the step has the updated weights.
``auto`` gathers only where every rank has the room; ``never`` leaves ZeRO-3's gathers. The training runs that
evaluate this way are compared with the per-module way in tests/integration/test_zero3.py (single_2n)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = r'''
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
import deepspeed, transformers
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from vlscale.engine import gathered

rank = dist.get_rank()
said = []
handler = logging.Handler()
handler.emit = lambda record: said.append(record.getMessage())
logging.getLogger("vlscale.engine.gathered").addHandler(handler)
logging.getLogger("vlscale.engine.gathered").setLevel(logging.INFO)

def tiny_t5():
    torch.manual_seed(0)  # the same weights on both ranks
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                                   initializer_factor=5.0)  # T5's own init decodes only pads
    return transformers.T5ForConditionalGeneration(config)

ds = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
model = tiny_t5()
for name, p in model.named_parameters():
    p.requires_grad = "layer_norm" in name
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
engine = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)[0]
offload = engine.optimizer.parameter_offload
fetches = []
fetch = offload.get_param_coordinator().fetch_sub_module
def counted(*a, **k):
    fetches.append(1)
    return fetch(*a, **k)
offload.get_param_coordinator().fetch_sub_module = counted

g = torch.Generator().manual_seed(rank)  # each rank its own rows: the per-module gathers decode synced
inputs = torch.randint(2, 64, (2, 7), generator=g)
labels = torch.randint(2, 64, (2, 3), generator=g)
decoder = torch.randint(2, 64, (2, 4), generator=g)

def hooks():
    """Each module's forward hooks, in the order they run: (module class, hook)."""
    return [(type(m).__name__, h.__qualname__) for m in engine.module.modules()
            for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]

def statuses():
    return sorted({p.ds_status.name for p in engine.module.parameters()})

def logits():
    with torch.no_grad():
        return engine.module(input_ids=inputs, decoder_input_ids=decoder).logits

def generate(synced):
    return engine.module.generate(input_ids=inputs, max_new_tokens=6, do_sample=False, synced_gpus=synced).tolist()

out = {"statuses_before": statuses(), "hooks_before": hooks()}
engine.module.eval()
n = len(fetches); out["ids_per_module"] = generate(True); out["fetches_per_module"] = len(fetches) - n
logits_before = logits()
loss_before = engine(input_ids=inputs, labels=labels).loss.item()
with gathered.gathered_for_generation(engine, "always", "cpu") as whole:
    out["whole"] = whole
    out["statuses_inside"], out["hooks_inside"] = statuses(), hooks()
    n = len(fetches); out["ids_gathered"] = generate(False); out["fetches_gathered"] = len(fetches) - n
    out["logits_gathered_equal"] = torch.equal(logits(), logits_before)
out["statuses_after"], out["hooks_after"] = statuses(), hooks()
engine.module.train()
loss = engine(input_ids=inputs, labels=labels).loss
out["loss_after_equal"] = loss.item() == loss_before
engine.backward(loss)
engine.step()
engine.module.eval()
stepped = logits()
out["step_changed_logits"] = not torch.equal(stepped, logits_before)
with gathered.gathered_for_generation(engine, "always", "cpu") as whole:
    out["stepped_equal"] = whole and torch.equal(logits(), stepped)

with gathered.gathered_for_generation(engine, "never", "cpu") as whole:
    out["never"] = whole
said.clear()
for _ in range(2):  # the second time not logged again
    with gathered.gathered_for_generation(engine, "auto", "cpu") as whole:
        out["auto_fits"] = whole
free = gathered.free_bytes
gathered.free_bytes = lambda device: 0 if rank == 1 else free(device)  # rank 1 has no room: neither gathers
with gathered.gathered_for_generation(engine, "auto", "cpu") as whole:
    out["auto_one_rank_short"] = whole
    out["statuses_short"] = statuses()
gathered.free_bytes = free
out["said"] = said

# an engine without an optimizer (launchers/evaluate.py's): its ZeRO-3 offload is the engine's optimizer
plain = deepspeed.initialize(model=tiny_t5(), config=ds)[0]
plain.module.eval()
with torch.no_grad():
    whole_logits = plain.module(input_ids=inputs, decoder_input_ids=decoder).logits
    with gathered.gathered_for_generation(plain, "always", "cpu") as whole:
        out["plain_whole"] = whole and torch.equal(plain.module(input_ids=inputs, decoder_input_ids=decoder).logits,
                                                   whole_logits)
json.dump(out, open(f"{sys.argv[2]}.{rank}", "w"))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, preloaded):
    tmp = tmp_path_factory.mktemp("gathered")
    script, result = tmp / "worker.py", tmp / "result.json"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, result], nproc=2, env=dict(preloaded.env, OMP_NUM_THREADS="1"), cwd=ROOT,
                         timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]


def test_the_block_gathers_once_and_decodes_what_the_per_module_gathers_decode(ranks):
    for out in ranks:
        assert out["statuses_before"] == ["NOT_AVAILABLE"], "the tiny model is partitioned (no persistent ones)"
        assert out["whole"] and out["statuses_inside"] == ["AVAILABLE"]
        assert out["fetches_per_module"] > 0 and out["fetches_gathered"] == 0, out
        per_module = [h for h in out["hooks_before"] if "_register_deepspeed_module" in h[1]]
        assert len({h[0] for h in per_module}) > 5, "ZeRO-3's fetch/release hooks sit on every module"
        # left: the engine's own hooks and ZeRO-3's start-of-forward one, on the root only
        assert out["hooks_inside"] and {h[0] for h in out["hooks_inside"]} == {"T5ForConditionalGeneration"}
        assert not [h for h in out["hooks_inside"] if "_register_deepspeed_module" in h[1]]
        assert out["ids_gathered"] == out["ids_per_module"]
        assert out["logits_gathered_equal"]
    assert ranks[0]["ids_per_module"] != ranks[1]["ids_per_module"], "each rank decoded its own rows"


def test_after_the_block_the_partitions_hooks_and_training_are_as_they_were(ranks):
    for out in ranks:
        assert out["statuses_after"] == ["NOT_AVAILABLE"]
        assert out["hooks_after"] == out["hooks_before"], "the same hooks, in the same order"
        assert out["loss_after_equal"], "the next training step's loss is the one before the block"
        assert out["step_changed_logits"] and out["stepped_equal"], "a gather after a step has its weights"
        assert out["plain_whole"], "an engine without an optimizer (evaluate.py's) is gathered as well"


def test_auto_gathers_only_where_every_rank_has_the_room_and_never_does_not(ranks):
    for rank, out in enumerate(ranks):
        assert out["never"] is False
        assert out["auto_fits"] is True
        assert out["auto_one_rank_short"] is False and out["statuses_short"] == ["NOT_AVAILABLE"]
        assert [s for s in out["said"] if "gathered whole on each rank" in s and "eval_gather=auto" in s] == \
            [out["said"][0]], "logged once, at the first evaluation"
        where = "here" if rank == 1 else "on another rank"
        assert any(f"does not fit in half of the memory free {where}" in s for s in out["said"]), out["said"]


def test_a_policy_that_is_none_of_the_three_is_refused():
    from vlscale.engine.gathered import gathered_for_generation

    with pytest.raises(ValueError, match="train.eval_gather='sometimes' must be one of"):
        with gathered_for_generation(None, "sometimes"):
            pass


def test_on_a_cpu_the_ranks_of_a_machine_share_its_free_memory(monkeypatch):
    """DeepSpeed's CPU accelerator: every rank of the machine gathers its own whole copy into the same memory, so
    each weighs the model against its share of what is available."""
    import types

    import psutil

    from vlscale.engine.gathered import free_bytes

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2 ** 30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert free_bytes("cpu") == 2 * 2 ** 30
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert free_bytes("cpu") == 8 * 2 ** 30
