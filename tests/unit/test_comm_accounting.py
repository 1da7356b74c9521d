"""Communication accounting (vlscale.engine.comm): the counter's byte convention on real collectives,
the frozen-aware ZeRO-3 formulas on hand-made traces, the meta-device trace of the real model, and
the prediction against bytes counted in a 2-rank ZeRO-3 run (benchmarks/scale.py, tiny model).
"""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vlscale.config import DTYPE_NAMES  # noqa: E402
from vlscale.engine.comm import (ModuleCall, ParamInfo, communication_dtype_bytes,  # noqa: E402
                                 persistent_parameters, predict_zero3_comm, zero3_comm_accounting)

COUNTER_WORKER = r'''
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
from vlscale.engine.comm import CommCounter
w, r = dist.get_world_size(), dist.get_rank()
c = CommCounter(w, log=True)
with c:
    x = torch.ones(10)                                   # 40 bytes per rank
    out = torch.empty(10 * w)
    dist.all_gather_into_tensor(out, x)                  # all_gather: the 80-byte output
    dist.all_gather([torch.empty(3, dtype=torch.float64) for _ in range(w)], torch.ones(3, dtype=torch.float64))
    full = torch.ones(6 * w)
    dist.reduce_scatter_tensor(torch.empty(6), full)     # reduce_scatter: the 48-byte input
    dist.all_reduce(torch.ones(5, dtype=torch.bfloat16)) # all_reduce: 10 bytes
    dist.broadcast(torch.ones(3, dtype=torch.int64), 0)  # broadcast: 24 bytes
outside = torch.ones(4)
dist.all_reduce(outside)                                 # not counted: the counter is closed
from vlscale.engine.distributed import all_reduce_sum
summed = all_reduce_sum([r + 1, 2.0 ** 30 + 0.5], "cpu")  # the second sum is not a float32
json.dump(dict(c.snapshot(), summed=summed), open(sys.argv[2] + f".{r}", "w"))
dist.barrier()  # leave together: gloo aborts a rank whose peer tears the group down mid-way
dist.destroy_process_group()
import os
os._exit(0)  # skip C++ static teardown (rarely 'terminate called without an active exception' in gloo)
'''


def test_counter_convention_on_real_collectives(tmp_path, preloaded):
    script = tmp_path / "worker.py"
    script.write_text(COUNTER_WORKER)
    proc = preloaded.run(script, [ROOT, tmp_path / "snap"], nproc=2, env=dict(preloaded.env, VLSCALE_DIST_TIMEOUT="120"),
                         cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for r in range(2):
        snap = json.loads((tmp_path / f"snap.{r}").read_text())
        assert snap["bytes"] == {"all_gather": 80 + 2 * 24, "reduce_scatter": 48, "all_reduce": 10,
                                 "broadcast": 24, "other": 0}, snap
        assert snap["calls"] == {"all_gather": 2, "reduce_scatter": 1, "all_reduce": 1, "broadcast": 1, "other": 0}
        # ring volumes on 2 ranks: half of all_gather / reduce_scatter, all_reduce once over
        assert snap["wire_bytes"] == {"all_gather": 64, "reduce_scatter": 24, "all_reduce": 10, "broadcast": 24,
                                      "other": 0}
        assert snap["summed"] == [3.0, 2.0 ** 31 + 1.0]  # distributed.all_reduce_sum: a sum, in float64


def _toy():
    info = {"emb": ParamInfo(1001, False), "w1": ParamInfo(3000, False), "ln": ParamInfo(10, True),
            "ad": ParamInfo(301, True), "w2": ParamInfo(2000, False), "vis": ParamInfo(555, False)}
    calls = [ModuleCall("vision", ["vis"], False),        # frozen, no_grad: forward only
             ModuleCall("embed", ["emb"], False),         # frozen embedding of token ids: forward only
             ModuleCall("layer1", ["w1"], True),          # frozen linear on a grad path: forward + backward
             ModuleCall("norm", ["ln"], True),            # small trainable: persistent, never gathered
             ModuleCall("adapter", ["ad"], True),         # trainable: gathered both ways, reduce-scattered
             ModuleCall("layer2", ["w2"], True),
             ModuleCall("head", ["emb"], True)]           # the tied embedding again, now on the grad path
    return calls, info


def test_frozen_aware_accounting_by_hand():
    calls, info = _toy()
    p = {k: 3 * math.ceil(v.numel / 3) for k, v in info.items()}  # what ZeRO-3 gathers on 3 ranks
    assert p["emb"] == 1002 and p["ad"] == 303 and p["ln"] == 12
    pred = zero3_comm_accounting(calls, info, 3, param_bytes=2, grad_bytes=4, micro_batches=2,
                                 param_persistence_threshold=10)
    forward = p["vis"] + p["emb"] + p["w1"] + p["ad"] + p["w2"] + p["emb"]
    backward = p["w1"] + p["ad"] + p["w2"] + p["emb"]
    post_step = p["ln"]                      # persistent parameters are re-gathered once after the step
    assert pred.all_gather == 2 * 2 * (forward + backward) + 2 * post_step
    assert pred.reduce_scatter == 2 * 4 * (p["ln"] + p["ad"])  # trainable only, every micro-batch
    assert pred.detail["backward_all_gather"]["frozen"] == 2 * 2 * (p["w1"] + p["w2"] + p["emb"])
    assert pred.detail["forward_all_gather"]["trainable"] == 2 * 2 * p["ad"]
    assert pred.total == pred.all_gather + pred.reduce_scatter
    # the detail benchmarks/scale.py reports: element counts by kind, unpadded
    assert (pred.detail["frozen_numel"], pred.detail["trainable_numel"]) == (1001 + 3000 + 2000 + 555, 10 + 301)
    assert (pred.detail["persistent_params"], pred.detail["persistent_numel"]) == (1, 10)


def test_reuse_distance_keeps_parameters_between_uses():
    calls, info = _toy()
    none = zero3_comm_accounting(calls, info, 2, param_bytes=4, param_persistence_threshold=10)
    # the head is the last forward call and the first backward one: with any re-use it stays gathered
    some = zero3_comm_accounting(calls, info, 2, param_bytes=4, param_persistence_threshold=10,
                                 max_reuse_distance=1)
    assert none.all_gather - some.all_gather == 4 * 1002
    # with a distance covering the whole trace each parameter is gathered once per step
    every = zero3_comm_accounting(calls, info, 2, param_bytes=4, param_persistence_threshold=10,
                                  max_reuse_distance=10 ** 9)
    once = sum(2 * math.ceil(v.numel / 2) for k, v in info.items() if k != "ln")
    assert every.all_gather == 4 * once + 4 * 10
    assert none.reduce_scatter == some.reduce_scatter == every.reduce_scatter


def test_persistence_follows_deepspeed_order_and_budget():
    info = {"a": ParamInfo(5, False), "b": ParamInfo(50, True), "c": ParamInfo(8, True), "d": ParamInfo(7, False)}
    assert persistent_parameters(info, 10) == {"a", "c", "d"}
    assert persistent_parameters(info, 10, model_threshold=13) == {"a", "c"}  # d would exceed 13 in total
    assert persistent_parameters(info, 4) == set()


def test_communication_dtype_names_are_deepspeeds():
    """communication_data_type takes the names DeepSpeed's config takes there (fp32, fp16, bf16, any case),
    not every name of the dtype (bfloat16, half): DeepSpeed refuses those when the engine starts."""
    from deepspeed.runtime.config import get_communication_data_type

    assert communication_dtype_bytes({}, "bf16") == 2 and communication_dtype_bytes({}, "fp32") == 4
    for name in sorted(DTYPE_NAMES) + ["BF16", "Fp32", "int8"]:
        try:
            expected = get_communication_data_type({"communication_data_type": name}).itemsize
        except ValueError:
            with pytest.raises(ValueError, match=f"communication_data_type='{name}'"):
                communication_dtype_bytes({"communication_data_type": name}, "fp32")
        else:
            assert communication_dtype_bytes({"communication_data_type": name}, "fp32") == expected, name


def test_counter_on_one_rank_sends_nothing_and_no_ranks_are_refused():
    """On one rank no collective sends anything (a broadcast too: no peer); a world of 0 ranks is refused by
    the counter and the accounting, naming the value."""
    from vlscale.engine.comm import CommCounter

    c = CommCounter(1)
    c.bytes.update(all_gather=80, reduce_scatter=48, all_reduce=10, broadcast=24)
    assert c.wire_bytes() == {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "broadcast": 0, "other": 0}
    with pytest.raises(ValueError, match="world_size=0"):
        CommCounter(0)
    calls, info = _toy()
    with pytest.raises(ValueError, match="world_size=0"):
        zero3_comm_accounting(calls, info, 0, param_bytes=2)


def test_counter_reads_the_full_tensor_argument_of_each_c10d_op():
    """Each c10d op's full tensor is the argument the table names: the all-gather's output (0), the
    reduce-scatter's input (1); a call without that argument counts no bytes. Single process: the ops are
    handed to the mode as the dispatcher hands them."""
    import torch

    from vlscale.engine.comm import CommCounter

    class Op:
        def __init__(self, name):
            self._schema = type("Schema", (), {"name": f"c10d::{name}"})()

        def __call__(self, *args, **kwargs):
            return None

    part, full = torch.zeros(3), torch.zeros(6)                      # 12 and 24 bytes
    c = CommCounter(2)
    c.__torch_dispatch__(Op("_allgather_base_"), (), (full, part))
    c.__torch_dispatch__(Op("_reduce_scatter_base_"), (), (part, full))
    c.__torch_dispatch__(Op("reduce_scatter_"), (), ([part], [[full[:3], full[3:]]]))
    c.__torch_dispatch__(Op("reduce_scatter_tensor_coalesced_"), (), ([part], [full]))
    c.__torch_dispatch__(Op("_reduce_scatter_base_"), (), (torch.zeros(5),))  # no input: nothing to count
    c.__torch_dispatch__(Op("not_a_collective"), (), (full,))
    assert c.bytes == {"all_gather": 24, "reduce_scatter": 72, "all_reduce": 0, "broadcast": 0, "other": 0}
    assert c.calls == {"all_gather": 1, "reduce_scatter": 4, "all_reduce": 0, "broadcast": 0, "other": 0}


def test_the_counter_knows_every_c10d_collective_by_its_schema():
    """The counter sees every collective that moves tensors: each c10d op this torch registers (but the barriers
    and the NaN check) is in its table under its exact name (an op missing or misspelt there is never counted:
    ``gather_into_tensor_`` was), and the argument it reads is the one the convention names in the op's schema:
    an all-gather's output, a reduce-scatter's input, an all-reduce's or broadcast's tensors. A torch release
    that adds a collective fails here until the table has it."""
    import torch
    import torch.distributed  # noqa: F401  (registers the c10d ops)

    from vlscale.engine.comm import _C10D_OPS

    schemas = {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas() if s.name.startswith("c10d::")}
    assert set(schemas) - {"barrier", "monitored_barrier_", "check_for_nan"} == set(_C10D_OPS)
    full = {"all_gather": "output", "reduce_scatter": "input", "all_reduce": "tensors", "broadcast": "tensors"}
    spelt = {"all_gather": "allgather", "reduce_scatter": "reduce_scatter", "all_reduce": "allreduce",
             "broadcast": "broadcast"}  # how c10d names each type's ops
    for name, (kind, index) in _C10D_OPS.items():
        assert [k for k, word in spelt.items() if word in name] == ([kind] if kind in spelt else []), (name, kind)
        arg = schemas[name].arguments[index]
        assert "Tensor" in str(arg.type), (name, str(arg))
        if kind in full:
            assert arg.name.startswith(full[kind]), (name, kind, arg.name)


def test_prediction_reads_auto_and_missing_zero3_settings_as_deepspeeds_defaults():
    """The shipped files leave ZeRO-3's thresholds to DeepSpeed ("auto" or absent): the re-use distance is then
    DeepSpeed's 1e9 and persistence its 1e5 elements, as if written out; prefetching needs a second rank."""
    from vlscale.config import load_config
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", ["train.micro_batch_size=2"])
    model = build_model(cfg, vocab_size=700, device="meta")
    spelled = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 1_000_000_000,
                                     "stage3_param_persistence_threshold": 100_000,
                                     "stage3_prefetch_bucket_size": 50_000_000}}
    auto = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": "auto",
                                  "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto"}}
    missing = {"zero_optimization": {"stage": 3}}
    want = predict_zero3_comm(cfg, spelled, 2, vocab_size=700, model=model).to_dict()
    assert want["detail"]["max_reuse_distance"] == 1_000_000_000 and want["detail"]["prefetch"] is True
    for ds in (auto, missing):
        assert predict_zero3_comm(cfg, ds, 2, vocab_size=700, model=model).to_dict() == want, ds
    assert predict_zero3_comm(cfg, missing, 1, vocab_size=700, model=model).detail["prefetch"] is False


def test_meta_prediction_of_the_real_model():
    """The tiny default CLIP-T5 on the meta device: every trainable parameter reduce-scattered once, and frozen
    ones gathered in backward too (the backbone's linears on the gradient's path); stage 2 is refused."""
    from vlscale.config import load_config
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", ["train.micro_batch_size=2"])
    model = build_model(cfg, vocab_size=700, device="meta")
    ds = build_deepspeed_config(str(ROOT / "ds_configs" / "zero3.json"), cfg, 2, device_type="cpu")
    ds["zero_optimization"]["stage3_max_reuse_distance"] = 0
    pred = predict_zero3_comm(cfg, ds, 2, vocab_size=700, model=model)
    trainable = sum(2 * math.ceil(p.numel() / 2) for p in model.parameters() if p.requires_grad)
    assert pred.reduce_scatter == 4 * trainable
    assert pred.detail["backward_all_gather"]["frozen"] > 0
    with pytest.raises(ValueError, match="stage"):
        predict_zero3_comm(cfg, {"zero_optimization": {"stage": 2}}, 2, model=model)


SCALE_ARGS = ["--model", "tiny-t5", "--vision", "tiny-clip-rn", "--steps", "3", "--reuse-distance", "0"]


def _scale_run(preloaded, workdir: Path, *overrides: str) -> dict:
    """benchmarks/scale.py's worker on 2 ranks, forked from the suite's preloaded server as its own torchrun would
    start them (1 thread each): its result."""
    out = workdir / "r.json"
    proc = preloaded.run(ROOT / "benchmarks" / "scale.py",
                         ["--worker", "--result", out, "--workdir", workdir / "run", *SCALE_ARGS, "--quiet",
                          *overrides],
                         nproc=2, env=dict(preloaded.env, VLSCALE_DIST_TIMEOUT="120"), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plain_run(preloaded, tmp_path_factory) -> dict:
    """One 2-rank run without gradient checkpointing, for the tests that count its bytes or compare with them."""
    return _scale_run(preloaded, tmp_path_factory.mktemp("plain"))


def test_counted_bytes_match_the_accounting_on_two_ranks(plain_run):
    """A real ZeRO-3 run (2 CPU ranks, tiny CLIP-T5, one adapter, parameters released after each
    use): all-gather and reduce-scatter bytes of steps 2-3 counted from the collectives equal the
    accounting. (DeepSpeed's default re-use distance matches too: docs/scaling.md.)"""
    r = plain_run
    for kind in ("all_gather", "reduce_scatter"):
        counted = [step[kind] for step in r["comm_bytes_by_step"][1:]]
        predicted = r["predicted_comm_bytes_per_step"][kind]
        assert counted == [predicted] * len(counted), (kind, counted, predicted)
    assert r["comm_bytes_per_step"]["all_gather"] > 10 * r["comm_bytes_per_step"]["reduce_scatter"], \
        "the frozen backbone dominates the traffic"
    assert 0.48 < r["param_bytes_per_rank"] / r["total_param_bytes"] < 0.56


def test_recompute_and_backward_nesting_by_hand():
    """DeepSpeed's rules the checkpointed trace needs (``_replay_zero3``): a unit gathered for backward
    stays gathered while a recompute runs inside its backward (the adapter ``a2``: not gathered again);
    a trainable unit the recompute runs is released after it as in forward (``a1``: gathered again for
    its own backward); a frozen parameter the recompute gathers is held by the backward unit running
    then (``wi`` under ``a2``), so its own backward finds it and it is released with ``a2``."""
    from vlscale.engine.comm import Zero3Trace, Zero3Unit

    info = {"w": ParamInfo(1000, False), "wi": ParamInfo(500, False), "a1": ParamInfo(30, True),
            "a2": ParamInfo(40, True)}
    units = [Zero3Unit("block", True, [], ["w"]), Zero3Unit("wi", False, ["wi"], ["wi"]),
             Zero3Unit("a1", False, ["a1"], ["a1"]), Zero3Unit("a2", False, ["a2"], ["a2"])]
    block, wi, a1, a2 = range(4)
    fwd = [("fetch", block, "forward"), ("fetch", wi, "forward"), ("release", wi, "forward"),
           ("fetch", a1, "forward"), ("release", a1, "forward"), ("fetch", a2, "forward"),
           ("release", a2, "forward"), ("release", block, "forward")]
    bwd = [("fetch", block, "backward"), ("fetch", a2, "backward"),
           ("fetch", wi, "recompute"), ("release", wi, "forward"), ("fetch", a1, "recompute"),
           ("release", a1, "forward"), ("fetch", a2, "recompute"),  # stopped early: no release
           ("release", a2, "backward"), ("fetch", a1, "backward"), ("release", a1, "backward"),
           ("fetch", wi, "backward"), ("release", wi, "backward"), ("release", block, "backward"),
           ("backward_end", None, None)]
    pred = zero3_comm_accounting(Zero3Trace(units, fwd + bwd, info), info, 2, param_bytes=4,
                                 param_persistence_threshold=0)
    d = pred.detail
    assert d["forward_all_gather"] == {"frozen": 4 * (1000 + 500), "trainable": 4 * (30 + 40)}
    assert d["recompute_all_gather"] == {"frozen": 4 * 500, "trainable": 4 * 30}
    # a2 gathered once for backward; a1 again after the recompute released it; wi only when a2 let go
    assert d["backward_all_gather"] == {"frozen": 4 * (1000 + 500), "trainable": 4 * (40 + 30)}
    assert pred.all_gather == 4 * (2 * 1500 + 500 + 2 * 70 + 30)
    # wi's backward fetch inside a2's backward: still held, no gather
    moved = bwd[:7] + [("fetch", wi, "backward"), ("release", wi, "backward")] + \
        [e for e in bwd[7:] if e[1] != wi]
    held = zero3_comm_accounting(Zero3Trace(units, fwd + moved, info), info, 2, param_bytes=4,
                                 param_persistence_threshold=0)
    assert pred.all_gather - held.all_gather == 4 * 500


def test_checkpointed_trace_of_the_real_model():
    """The tiny CLIP-T5 with gradient checkpointing, traced forward and backward on the meta device:
    the leaf T5 blocks are not fetched again in backward's recompute (transformers checkpoints their
    ``forward``, inside their hooks) but the adapters their sublayers call are; a model whose
    checkpointing differs from the config is refused."""
    from vlscale.config import load_config
    from vlscale.engine.comm import trace_zero3_step
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.engine.sharded_loading import mark_zero3_leaf_layers
    from vlscale.modeling.vl_model import build_model
    from vlscale.profiling.measure import synthetic_batch

    cfg = load_config("tiny", ["train.micro_batch_size=2", "train.gradient_checkpointing=true"])
    model = build_model(cfg, vocab_size=700, device="meta")
    mark_zero3_leaf_layers(model, cfg)
    trace = trace_zero3_step(model, synthetic_batch(cfg, 1, 700, device="meta"))
    recomputed = [trace.units[u].name for kind, u, phase in trace.events if kind == "fetch" and phase == "recompute"]
    assert recomputed and not any(".block." in n for n in recomputed)
    assert all(n.startswith("peft.") for n in recomputed), recomputed
    end_of_forward = max(i for i, e in enumerate(trace.events) if e[2] == "forward" and e[0] == "fetch")
    assert all(i > end_of_forward for i, e in enumerate(trace.events) if e[2] == "recompute")
    assert all(p.grad is None for p in model.parameters())  # the trace leaves no gradients behind
    ds = build_deepspeed_config(str(ROOT / "ds_configs" / "zero3.json"), cfg, 2, device_type="cpu")
    ds["zero_optimization"]["stage3_max_reuse_distance"] = 0
    pred = predict_zero3_comm(cfg, ds, 2, vocab_size=700, model=model)
    assert pred.detail["gradient_checkpointing"] and pred.detail["recompute_all_gather"]["trainable"] > 0
    cfg.train.gradient_checkpointing = False
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        predict_zero3_comm(cfg, ds, 2, vocab_size=700, model=model)


def test_counted_bytes_match_the_accounting_with_gradient_checkpointing(tmp_path, preloaded, plain_run):
    """As above with train.gradient_checkpointing=true (the 8 x 24 GiB ZeRO-3 presets' setting): in
    backward each checkpointed T5 block runs its forward again, and the adapters its sublayers call
    are gathered again for it, except one still gathered for its own backward; the embeddings'
    output needs a gradient (transformers' enable_input_require_grads), so they are gathered in
    backward too. Counted all-gather and reduce-scatter bytes of steps 2-3 equal the accounting."""
    r = _scale_run(preloaded, tmp_path, "train.gradient_checkpointing=true")
    predicted = r["predicted_comm_bytes_per_step"]
    for kind in ("all_gather", "reduce_scatter"):
        counted = [step[kind] for step in r["comm_bytes_by_step"][1:]]
        assert counted == [predicted[kind]] * len(counted), (kind, counted, predicted[kind])
    assert predicted["detail"]["gradient_checkpointing"]
    assert predicted["detail"]["recompute_all_gather"]["trainable"] > 0
    without = plain_run["predicted_comm_bytes_per_step"]  # the same run without checkpointing
    assert not without["detail"]["gradient_checkpointing"]
    assert predicted["all_gather"] > without["all_gather"]  # the recompute's gathers are counted
    assert predicted["reduce_scatter"] == without["reduce_scatter"]


class _C10dOp:
    """A c10d op as the dispatcher hands it to the counter (single process: nothing runs)."""

    def __init__(self, name):
        self._schema = type("Schema", (), {"name": f"c10d::{name}"})()

    def __call__(self, *args, **kwargs):
        return None


def test_counter_log_reset_and_snapshot():
    """``log=True`` keeps one (op type, c10d name, dtype, bytes) record per call, ``reset()`` forgets the counts and
    the records, and the snapshot carries the world size its wire bytes were computed for."""
    import torch

    from vlscale.engine.comm import CommCounter

    c = CommCounter(4, log=True)
    c.__torch_dispatch__(_C10dOp("_allgather_base_"), (), (torch.zeros(8), torch.zeros(2)))
    c.__torch_dispatch__(_C10dOp("allreduce_"), (), ([torch.zeros(3, dtype=torch.bfloat16)],))
    assert c.records == [("all_gather", "_allgather_base_", "torch.float32", 32),
                         ("all_reduce", "allreduce_", "torch.bfloat16", 6)]
    snap = c.snapshot()
    assert snap["world_size"] == 4 and snap["wire_bytes"]["all_gather"] == 24 and snap["wire_bytes"]["all_reduce"] == 9
    c.reset()
    assert c.records == [] and set(c.bytes.values()) == {0} and set(c.calls.values()) == {0}
    quiet = CommCounter(2)
    quiet.__torch_dispatch__(_C10dOp("allreduce_"), (), ([torch.zeros(3)],))
    assert quiet.records == [] and quiet.bytes["all_reduce"] == 12


def test_the_step_trace_leaves_the_model_as_it_found_it():
    """trace_zero3_step puts the model back in its mode, keeps the gradients it had (and adds none), and leaves no
    hook or parameter-reading dict behind."""
    import torch

    from vlscale.engine.comm import trace_zero3_step

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model.eval()
    kept = torch.ones(3, 3)
    model[0].weight.grad = kept
    trace_zero3_step(model, torch.ones(2, 3))
    assert not model.training and not any(m.training for m in model.modules())
    assert model[0].weight.grad is kept and torch.equal(kept, torch.ones(3, 3))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert type(m._parameters) is dict, m


def test_reuse_distance_counts_parameter_elements_and_a_leaf_counts_recursively():
    """The re-use window is measured in parameter elements of the units fetched in between (not in units): a
    parameter used again after 10 elements is kept at a distance of 11 and released at 10. When a leaf unit
    releases, a later unit counts every parameter under it (its child's too, which is then counted again)."""
    from vlscale.engine.comm import Zero3Trace, Zero3Unit

    info = {"w": ParamInfo(1000, False), "x": ParamInfo(10, False)}
    calls = [ModuleCall("A", ["w"], False), ModuleCall("B", ["x"], False), ModuleCall("A", ["w"], False)]
    gathered = {d: zero3_comm_accounting(calls, info, 1, param_bytes=1, param_persistence_threshold=0,
                                         max_reuse_distance=d).all_gather for d in (10, 11)}
    assert gathered == {10: 2010, 11: 1010}

    info = {"a": ParamInfo(5, False), "p": ParamInfo(100, False), "c": ParamInfo(1000, False)}
    units = [Zero3Unit("leaf", True, [], ["a"]), Zero3Unit("parent", False, ["p"], ["p", "c"]),
             Zero3Unit("parent.child", False, ["c"], ["c"])]
    leaf, parent, child = range(3)
    events = [("fetch", leaf, "forward"), ("release", leaf, "forward"), ("fetch", parent, "forward"),
              ("fetch", child, "forward"), ("release", child, "forward"), ("release", parent, "forward"),
              ("fetch", leaf, "forward"), ("release", leaf, "forward"), ("backward_end", None, None)]
    # from the leaf's release: parent 100 + 1000 (recursively), child 1000 -> 2100 elements before its next use
    gathered = {d: zero3_comm_accounting(Zero3Trace(units, events, info), info, 1, param_bytes=1,
                                         param_persistence_threshold=0, max_reuse_distance=d).all_gather
                for d in (2100, 2101)}
    assert gathered == {2100: 5 + 100 + 1000 + 5, 2101: 100 + 1000 + 5}


def test_prediction_reads_the_runs_accumulation_precision_and_settings(monkeypatch):
    """predict_zero3_comm takes from the run: its micro-batches per step (train.global_batch_size over micro x
    ranks; everything but the one post-step gather of the persistent parameters repeats), the precision's
    parameter bytes, communication_data_type for the gradients, and stage3_model_persistence_threshold; a file
    that sets no ZeRO stage is refused (the stage is then 0). (The trace is the hand-made one of the accounting
    tests: these settings do not change it.)"""
    import torch

    from vlscale.config import load_config
    from vlscale.engine import comm

    trace = comm._calls_to_trace(*_toy())
    monkeypatch.setattr(comm, "trace_zero3_step", lambda m, batch: trace)
    model = torch.nn.Linear(2, 2, device="meta")
    ds = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 10}}

    def predict(overrides=(), ds_config=ds):
        return predict_zero3_comm(load_config("tiny", ["train.micro_batch_size=2", *overrides]), ds_config, 2,
                                  vocab_size=700, model=model)

    one = predict()
    post = one.detail["post_step_all_gather"]
    assert post == 4 * 10 and one.detail["micro_batches"] == 1  # "ln", the one persistent parameter, in fp32
    two = predict(["train.global_batch_size=8"])  # 8 / (2 x 2 ranks): 2 micro-batches
    assert two.detail["micro_batches"] == 2
    assert (two.all_gather, two.reduce_scatter) == (2 * (one.all_gather - post) + post, 2 * one.reduce_scatter)
    bf16 = predict(["train.precision=bf16"])
    assert (bf16.all_gather, bf16.reduce_scatter) == (one.all_gather // 2, one.reduce_scatter // 2)
    fp32_grads = predict(["train.precision=bf16"], {**ds, "communication_data_type": "fp32"})
    assert (fp32_grads.all_gather, fp32_grads.reduce_scatter) == (bf16.all_gather, one.reduce_scatter)
    none_kept = predict(ds_config={"zero_optimization": {**ds["zero_optimization"],
                                                         "stage3_model_persistence_threshold": 0}})
    assert none_kept.detail["persistent_params"] == 0 and none_kept.detail["post_step_all_gather"] == 0
    assert none_kept.all_gather == one.all_gather - post + 2 * 4 * 10  # "ln" gathered in forward and backward
    for no_stage in ({"zero_optimization": {}}, {}):  # DeepSpeed's stage when none is written: 0
        with pytest.raises(ValueError, match="zero_optimization.stage=0: the accounting is for ZeRO stage 3"):
            predict(ds_config=no_stage)


def test_other_collectives_send_their_bytes_on_several_ranks_and_nothing_on_one():
    """The ops outside the four types (send, recv, all-to-all, gather...) count their bytes as sent on 2 or more
    ranks; on one rank there is no peer, so nothing, as for a broadcast (they reported their bytes as sent)."""
    from vlscale.engine.comm import CommCounter

    for world, sent in ((1, 0), (2, 40), (8, 40)):
        c = CommCounter(world)
        c.bytes.update(broadcast=40, other=40)
        assert (c.wire_bytes()["broadcast"], c.wire_bytes()["other"]) == (sent, sent), world


def test_a_recompute_releases_a_trainable_unit_inside_another_units_backward():
    """Only frozen parameters a recompute gathers are held by the backward unit running then: a trainable unit the
    recompute runs (``a1``, inside ``a2``'s backward) is released after it as in forward, so its own backward, still
    inside ``a2``'s, gathers it again."""
    from vlscale.engine.comm import Zero3Trace, Zero3Unit

    info = {"w": ParamInfo(1000, False), "a1": ParamInfo(30, True), "a2": ParamInfo(40, True)}
    units = [Zero3Unit("block", True, [], ["w"]), Zero3Unit("a1", False, ["a1"], ["a1"]),
             Zero3Unit("a2", False, ["a2"], ["a2"])]
    block, a1, a2 = range(3)
    fwd = [("fetch", block, "forward"), ("fetch", a1, "forward"), ("release", a1, "forward"),
           ("fetch", a2, "forward"), ("release", a2, "forward"), ("release", block, "forward")]
    bwd = [("fetch", block, "backward"), ("fetch", a2, "backward"), ("fetch", a1, "recompute"),
           ("release", a1, "forward"), ("fetch", a1, "backward"), ("release", a1, "backward"),
           ("release", a2, "backward"), ("release", block, "backward"), ("backward_end", None, None)]
    pred = zero3_comm_accounting(Zero3Trace(units, fwd + bwd, info), info, 2, param_bytes=4,
                                 param_persistence_threshold=0)
    assert pred.detail["recompute_all_gather"] == {"frozen": 0, "trainable": 4 * 30}
    assert pred.detail["backward_all_gather"] == {"frozen": 4 * 1000, "trainable": 4 * (40 + 30)}


def test_an_external_parameter_is_found_in_the_first_step_and_kept_for_its_reader():
    """A parameter a unit reads without owning it (``("access", u, name)``) is registered with that unit during
    the first step, when everything is released after use; from then on the re-use window sees the reader's use,
    so the owner's gather keeps it for the reader (gathered once, not again at the read)."""
    from vlscale.engine.comm import Zero3Trace, Zero3Unit

    info = {"w": ParamInfo(1000, False), "x": ParamInfo(10, True)}
    units = [Zero3Unit("owner", False, ["w"], ["w"]), Zero3Unit("reader", False, ["x"], ["x"])]
    owner, reader = range(2)
    events = [("fetch", owner, "forward"), ("release", owner, "forward"), ("fetch", reader, "forward"),
              ("access", reader, "w"), ("release", reader, "forward"), ("fetch", reader, "backward"),
              ("release", reader, "backward"), ("backward_end", None, None)]
    pred = zero3_comm_accounting(Zero3Trace(units, events, info), info, 1, param_bytes=1,
                                 param_persistence_threshold=0, max_reuse_distance=10 ** 9)
    assert pred.detail["external_params"] == 1
    assert pred.all_gather == 1000 + 10


def test_wire_bytes_follow_the_ring_volumes_at_any_world_size():
    """What each rank sends of the full tensor: (W-1)/W for an all-gather or a reduce-scatter, twice that for an
    all-reduce, all of a broadcast; on 2, 3 and 8 ranks (only the 2-rank run checked a reduce-scatter's), rounded to
    the nearest byte."""
    from vlscale.engine.comm import CommCounter

    for world, ring in ((2, 60), (3, 80), (8, 105)):
        c = CommCounter(world)
        c.bytes.update(all_gather=120, reduce_scatter=120, all_reduce=120, broadcast=120, other=120)
        assert c.wire_bytes() == {"all_gather": ring, "reduce_scatter": ring, "all_reduce": 2 * ring,
                                  "broadcast": 120, "other": 120}, world
    c = CommCounter(3)
    c.bytes.update(all_gather=10, reduce_scatter=11, all_reduce=10)  # 6.67, 7.33, 13.33 bytes
    assert (c.wire_bytes()["all_gather"], c.wire_bytes()["reduce_scatter"], c.wire_bytes()["all_reduce"]) == (7, 7, 13)


def test_the_step_trace_takes_full_sizes_and_waits_only_for_inputs_that_need_a_gradient():
    """trace_zero3_step counts a partitioned parameter at its full size (``ds_numel``), and a unit's post-backward
    waits for the gradients of its input tensors that need one only, as DeepSpeed's counter does: a block called
    with an activation and a mask is released after its backward (waiting for the mask too, it never was, so with
    re-use distance 0 its second call's backward found it still gathered)."""
    import torch

    from vlscale.engine.comm import Zero3Trace, trace_zero3_step

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x, mask):
            return x * self.scale * mask, mask

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block = torch.nn.Linear(4, 4), Block()

        def forward(self, x):
            mask = torch.ones(4)
            return self.block(self.block(self.inp(x), mask)[0], mask)[0]

    model = Model()
    model.inp.weight.ds_numel = 1000
    trace = trace_zero3_step(model, torch.ones(2, 4))
    assert isinstance(trace, Zero3Trace) and trace.info["inp.weight"].numel == 1000
    block = next(i for i, u in enumerate(trace.units) if u.name == "block")
    phases = [(kind, phase) for kind, u, phase in trace.events if u == block]
    assert phases == [("fetch", "forward"), ("release", "forward")] * 2 + [("fetch", "backward"),
                                                                          ("release", "backward"),
                                                                          ("fetch", "backward")]
    pred = zero3_comm_accounting(trace, trace.info, 1, param_bytes=1, param_persistence_threshold=0)
    assert pred.detail["backward_all_gather"]["trainable"] == 2 * 4 + 1000 + 4  # the block's twice, then inp's


def test_prediction_without_a_model_builds_the_one_the_trainer_runs():
    """Given no model, predict_zero3_comm builds it as the trainer does, its LM layers ZeRO-3 leaf units
    (benchmarks/scale.py predicts so): the same prediction as for that model passed in. A prefetch bucket of 0
    turns prefetching off, on 2 ranks too. (No parameter kept whole, so that the leaf units show: a leaf T5 block's
    backward gathers its relative position bias, module by module it is not.)"""
    from vlscale.config import load_config
    from vlscale.engine.sharded_loading import mark_zero3_leaf_layers
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", ["train.micro_batch_size=2"])
    ds = {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 0,
                                "stage3_prefetch_bucket_size": 0}}
    model = build_model(cfg, vocab_size=700, device="meta")
    mark_zero3_leaf_layers(model, cfg)
    assert any(getattr(m, "_z3_leaf", False) for m in model.modules())
    built = predict_zero3_comm(cfg, ds, 2, vocab_size=700)
    assert built.to_dict() == predict_zero3_comm(cfg, ds, 2, vocab_size=700, model=model).to_dict()
    assert built.detail["prefetch"] is False
