"""Generation with the model gathered under ZeRO-3 (vlscale.engine.gathered, ``train.eval_gather``): on 2 ranks of a
tiny T5 partitioned by DeepSpeed, the block gathers every parameter once and DeepSpeed fetches nothing while it
decodes, it decodes what the per-module gathers decode, and after it the partitions and the hooks are as they were:
the next training step's loss is the one before, and a gather after the step has the updated weights. ``decoder``
gathers the decoding parameters alone around the decoding (the encoder runs before it under the per-module
gathers), with the same ids, on the T5 and on a tiny V&L model (CLIP, projection, prompts: not gathered), whose
gathered bytes are the memory estimate's. ``auto`` gathers what every rank has the room for; ``never`` leaves
ZeRO-3's gathers. The training runs that evaluate these ways are compared with the per-module way in
tests/integration/test_zero3.py (single_2n, single_2r_gc)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the V&L model of the worker's last part: prompts as well, so that every module of the visual side is there
VL_OVERRIDES = ["data.tasks=[vqa]", "data.synthetic_eval=4", "peft.extra_prompts=true", "model.dropout=0.0"]

WORKER = r'''
import contextlib, json, logging, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
import deepspeed, transformers
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from vlscale.engine import gathered
VL_OVERRIDES = json.loads(sys.argv[3])

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
def count_fetches(coordinator):
    """Every module fetch of ``coordinator`` (a ZeRO-3 engine's) appended to ``fetches``."""
    fetch = coordinator.fetch_sub_module
    def counted(*a, **k):
        fetches.append(1)
        return fetch(*a, **k)
    coordinator.fetch_sub_module = counted
count_fetches(offload.get_param_coordinator())

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
with gathered.gathered_for_generation(engine, "always", "cpu") as plan:
    out["whole"] = plan.gathered == "whole" and not plan.synced
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
with gathered.gathered_for_generation(engine, "always", "cpu") as plan:
    out["stepped_equal"] = plan.gathered == "whole" and torch.equal(logits(), stepped)

# the decoding parameters alone, gathered around the decoding (the encoder ran before, under the per-module gathers)
decoding = {id(p) for p in gathered.decoding_parameters(engine.module)}
out["ids_stepped"] = generate(True)  # the per-module gathers' ids after the step
with gathered.gathered_for_generation(engine, "decoder", "cpu") as plan:
    out["decoder"], out["decoder_synced"] = plan.gathered, plan.synced
    out["statuses_decoder_outside"] = statuses()  # nothing gathered outside the decoding
    with torch.no_grad():
        encoded = engine.module.get_encoder()(input_ids=inputs, return_dict=True)
    with plan.decode_block():
        out["decoding_statuses"] = sorted({p.ds_status.name for p in engine.module.parameters() if id(p) in decoding})
        out["encoder_statuses"] = sorted({p.ds_status.name for p in engine.module.parameters()
                                          if id(p) not in decoding})
        out["hooks_decoding"] = hooks()
        n = len(fetches)
        out["ids_decoder"] = engine.module.generate(encoder_outputs=encoded, attention_mask=torch.ones_like(inputs),
                                                    max_new_tokens=6, do_sample=False).tolist()
        out["fetches_decoder"] = len(fetches) - n
    out["statuses_after_decoder"], out["hooks_after_decoder"] = statuses(), hooks()
out["decoding_share"] = sum(p.ds_numel for p in engine.module.parameters() if id(p) in decoding) / sum(
    p.ds_numel for p in engine.module.parameters())

with gathered.gathered_for_generation(engine, "never", "cpu") as plan:
    out["never"], out["never_synced"] = plan.gathered, plan.synced
said.clear()
for _ in range(2):  # the second time not logged again
    with gathered.gathered_for_generation(engine, "auto", "cpu") as plan:
        out["auto_fits"] = plan.gathered
free = gathered.free_bytes
decoding_bytes = gathered._bytes(gathered.decoding_parameters(engine.module))
gathered.free_bytes = lambda device: 2 * decoding_bytes  # room for the decoding parameters, not for the whole model
with gathered.gathered_for_generation(engine, "auto", "cpu") as plan:
    out["auto_tight"] = plan.gathered
gathered.free_bytes = lambda device: 2 * decoding_bytes if rank == 0 else free(device)  # rank 0 tight: both decoder
with gathered.gathered_for_generation(engine, "auto", "cpu") as plan:
    out["auto_one_rank_tight"] = plan.gathered
gathered.free_bytes = lambda device: 0 if rank == 1 else free(device)  # rank 1 has no room: neither gathers
with gathered.gathered_for_generation(engine, "auto", "cpu") as plan:
    out["auto_one_rank_short"] = plan.gathered
    out["statuses_short"] = statuses()
gathered.free_bytes = free
out["said"] = said

# an engine without an optimizer (launchers/evaluate.py's): its ZeRO-3 offload is the engine's optimizer
plain = deepspeed.initialize(model=tiny_t5(), config=ds)[0]
plain.module.eval()
with torch.no_grad():
    whole_logits = plain.module(input_ids=inputs, decoder_input_ids=decoder).logits
    with gathered.gathered_for_generation(plain, "always", "cpu") as plan:
        out["plain_whole"] = plan.gathered == "whole" and torch.equal(
            plain.module(input_ids=inputs, decoder_input_ids=decoder).logits, whole_logits)
# the V&L model (vlscale's generate): tiny CLIP-RN, projection and prompts run once per batch, before the decoding
from vlscale.config import load_config
from vlscale.data import build_tokenizer, eval_batches
from vlscale.engine.evaluation import generation_inputs
from vlscale.modeling.vl_model import build_model

cfg = load_config("tiny", VL_OVERRIDES)
tokenizer = build_tokenizer(cfg)
torch.manual_seed(0)
vl = build_model(cfg, vocab_size=len(tokenizer))
with torch.no_grad():  # the tiny T5's own init decodes only pads
    for p in vl.lm.parameters():
        p.normal_(0, 0.5) if p.dim() > 1 else None
vl_engine = deepspeed.initialize(model=vl, optimizer=torch.optim.AdamW([p for p in vl.parameters() if p.requires_grad]),
                                 config=ds)[0]
count_fetches(vl_engine.optimizer.parameter_offload.get_param_coordinator())
batch = generation_inputs(next(iter(eval_batches(cfg, tokenizer, "vqa", "val", 2, rank, 2))))
vl_engine.module.eval()
def vl_generate(synced, decode_block=None):
    return vl_engine.module.generate(batch, max_new_tokens=8, min_new_tokens=8, synced_gpus=synced,
                                     decode_block=decode_block).tolist()
out["vl_ids_per_module"] = vl_generate(True)
with gathered.gathered_for_generation(vl_engine, "always", "cpu") as plan:
    out["vl_ids_whole"] = vl_generate(plan.synced)
vl_decoding = {id(p) for p in gathered.decoding_parameters(vl_engine.module)}
visual = [p for m in vl_engine.module.encoding_modules() for p in m.parameters()]
out["vl_encoding_modules"] = sorted(type(m).__name__ for m in vl_engine.module.encoding_modules())
with gathered.gathered_for_generation(vl_engine, "decoder", "cpu") as plan:
    @contextlib.contextmanager
    def watched():
        with plan.decode_block():
            out["vl_visual_statuses"] = sorted({p.ds_status.name for p in visual})
            out["vl_visual_in_decoding"] = any(id(p) in vl_decoding for p in visual)
            n = len(fetches)
            yield
            out["vl_fetches_decoding"] = len(fetches) - n
    n = len(fetches)
    out["vl_ids_decoder"] = vl_generate(plan.synced, watched)
    out["vl_fetches_encoding"] = len(fetches) - n - out["vl_fetches_decoding"]
out["vl_whole_bytes"] = gathered.whole_bytes(vl_engine.module)
out["vl_decoding_bytes"] = gathered._bytes(gathered.decoding_parameters(vl_engine.module))
json.dump(out, open(f"{sys.argv[2]}.{rank}", "w"))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, preloaded):
    tmp = tmp_path_factory.mktemp("gathered")
    script, result = tmp / "worker.py", tmp / "result.json"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, result, json.dumps(VL_OVERRIDES)], nproc=2,
                         env=dict(preloaded.env, OMP_NUM_THREADS="1"), cwd=ROOT,
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


def test_the_decoding_parameters_alone_gathered_around_the_decoding_decode_the_same(ranks):
    """``decoder``: outside the decoding nothing is gathered; inside it the decoding parameters are (the encoder's
    stay partitioned), no hook but the root's is on, DeepSpeed fetches nothing, and the ids are the per-module
    gathers'; after it the partitions and the hooks are as they were."""
    for out in ranks:
        assert out["decoder"] == "decoder" and out["decoder_synced"] is False
        assert out["statuses_decoder_outside"] == ["NOT_AVAILABLE"]
        assert out["decoding_statuses"] == ["AVAILABLE"] and out["encoder_statuses"] == ["NOT_AVAILABLE"]
        assert out["hooks_decoding"] == out["hooks_inside"]
        assert out["fetches_decoder"] == 0 and out["ids_decoder"] == out["ids_stepped"] != out["ids_per_module"]
        assert out["statuses_after_decoder"] == ["NOT_AVAILABLE"] and out["hooks_after_decoder"] == out["hooks_before"]
        assert 0.5 < out["decoding_share"] < 0.75, "the decoder, the shared embedding: not the encoder's layers"


def test_the_v_and_l_model_decodes_the_same_every_way(ranks):
    """vlscale's VLModel.generate: per-module gathers, the model gathered whole, and the decoding parameters
    gathered around the decoding (CLIP, the projection, the prompts and the encoder run before it, fetched by
    DeepSpeed, and are not gathered in it) decode the same ids."""
    for out in ranks:
        assert out["vl_ids_whole"] == out["vl_ids_per_module"] == out["vl_ids_decoder"]
        assert all(len(ids) == 9 for ids in out["vl_ids_decoder"])  # the start token + 8 new ones
        assert out["vl_encoding_modules"] == ["PromptEncoder", "VisionEncoder", "VisualProjector"]
        assert out["vl_visual_statuses"] == ["NOT_AVAILABLE"] and not out["vl_visual_in_decoding"]
        assert out["vl_fetches_encoding"] > 0 and out["vl_fetches_decoding"] == 0
    assert ranks[0]["vl_ids_decoder"] != ranks[1]["vl_ids_decoder"], "each rank decoded its own examples"


def test_the_memory_estimate_of_the_gathered_evaluation_is_what_the_model_gathers(ranks):
    """The estimate's ``eval_gathered`` and ``eval_gathered_decoder`` (launchers/profile_memory.py prints them) are
    the bytes the worker's V&L model gathers whole and for its decoding."""
    from vlscale.config import load_config
    from vlscale.profiling.analytic import estimate_memory

    detail = estimate_memory(load_config("tiny", VL_OVERRIDES), 2, device="cpu").detail
    for out in ranks:
        assert (out["vl_whole_bytes"], out["vl_decoding_bytes"]) == (detail["eval_gathered"],
                                                                     detail["eval_gathered_decoder"])
        assert out["vl_decoding_bytes"] < out["vl_whole_bytes"]


def test_auto_gathers_what_every_rank_has_the_room_for_and_never_does_not(ranks):
    """``auto``: the whole model where it fits in half of the free memory on every rank, else the decoding
    parameters where they fit on every rank, else neither."""
    for rank, out in enumerate(ranks):
        assert out["never"] is None and out["never_synced"] is True
        assert out["auto_fits"] == "whole"
        assert out["auto_tight"] == out["auto_one_rank_tight"] == "decoder"
        assert out["auto_one_rank_short"] is None and out["statuses_short"] == ["NOT_AVAILABLE"]
        said = out["said"]
        assert [s for s in said if "gathered whole on each rank" in s and "eval_gather=auto" in s] == [said[0]], \
            "logged once, at the first evaluation"
        decoder = [s for s in said if "decoding parameters gathered on each rank" in s]
        assert len(decoder) == 1 and "the whole model" in decoder[0], said
        assert "does not fit in half of the memory free here" in decoder[0], said
        where = "here" if rank == 1 else "on another rank"
        assert any(s.startswith("evaluation: generating under ZeRO-3's per-module gathers: neither the whole model")
                   and f"fit in half of the memory free {where}" in s for s in said), said


def test_a_policy_that_is_none_of_the_four_is_refused():
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
