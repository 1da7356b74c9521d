"""Memory profiler: the analytic model against real tensors on tiny models (CPU).

* activations: the op-by-op tape against the bytes autograd really saves (saved_tensors_hooks,
  unique storages) for T5/BART, fp32/bf16, checkpointing, frozen/trainable backbones, every PEFT
  method, with and without ZeRO-3's memory-efficient linear;
* DeepSpeed's partition arithmetic, the tools (live-tensor tracker, saved-tensor counter), the
  planner and the launcher's JSON.
Measured DeepSpeed runs (1 rank ZeRO-2, 2-rank ZeRO-3, the engine's run_summary.json) are in
tests/integration/test_profile_measure.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch

from vlscale.config import load_config
from vlscale.profiling import analytic
from vlscale.profiling.analytic import (TapeOptions, ZeroSettings, activation_report, default_vocab_size,
                                        engine_state, estimate_memory, parse_size, resolve_ds_config, run_shapes)
from vlscale.profiling.measure import LiveTensorTracker, SavedTensorCounter, synthetic_batch

SMALL = ["train.micro_batch_size=3", "data.max_input_length=18", "data.max_target_length=7"]


def _measured_saved(cfg, dtype, zero3_linear=False, padded=True):
    from vlscale.modeling.vl_model import build_model

    torch.manual_seed(0)
    vocab = default_vocab_size(cfg)
    model = build_model(cfg, vocab_size=vocab, dtype=dtype)
    model.train()
    batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab, dtype=dtype, padded=padded)
    import torch.nn.functional as F

    original = F.linear
    if zero3_linear:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        F.linear = zero3_linear_wrap
    try:
        with SavedTensorCounter([model]) as counter:
            loss = model(batch).loss
    finally:
        F.linear = original
    assert torch.isfinite(loss)
    return counter.alive_bytes(), model.lm.get_input_embeddings().num_embeddings


CASES = [
    [],
    ["model.dropout=0.1"],
    ["train.gradient_checkpointing=true"],
    ["peft.train_lm=true", "model.dropout=0.1"],
    ["peft.train_lm=true", "train.gradient_checkpointing=true"],
    ["model.backbone=tiny-bart"],
    ["model.backbone=tiny-bart", "train.gradient_checkpointing=true", "model.dropout=0.1"],
    ["peft.method=lora", "model.dropout=0.1"],
    # the paper's LoRA set: every bias, no layer-norm weight (BART's norms keep their inputs for their biases)
    ["model.backbone=tiny-bart", "peft.method=lora", "peft.bias=all", "peft.train_layer_norms=false"],
    ["model.backbone=tiny-bart", "peft.method=lora", "peft.bias=all", "peft.train_layer_norms=false",
     "peft.train_projection=false"],
    ["peft.method=lora", "peft.bias=all", "peft.train_layer_norms=false"],  # T5: no biases, frozen norms
    ["peft.method=none", "peft.train_layer_norms=false"],
    ["peft.method=prompt"],
    ["peft.method=hyperformer"],
    ["peft.method=compacter"],
    ["peft.fused=false"],
    ["model.feature_source=cache", "model.backbone=tiny-bart"],
    ["data.tasks=[tvqa]", "model.max_frames=8"],  # video: frame embeddings on the fly
    ["peft.train_vision=true"],  # a trained CLIP keeps its activations (train-mode batch norms, the images)
    ["peft.train_vision=true", "data.tasks=[tvqa]", "model.max_frames=8"],
    ["peft.train_vision=true", "model.vision=tiny-clip-vit"],
]


@pytest.mark.parametrize("extra", CASES, ids=lambda e: ",".join(e) or "default")
def test_activation_tape_matches_autograd(extra):
    """The tape predicts the bytes autograd saves (fp32, CPU) within 1% (it is byte-exact today)."""
    cfg = load_config("tiny", SMALL + extra)
    measured, vocab = _measured_saved(cfg, torch.float32)
    rep = activation_report(cfg, run_shapes(cfg, vocab), TapeOptions(device="cpu", b=4))
    assert measured > 0
    assert abs(rep.saved - measured) <= 0.01 * measured, (rep.saved, measured, rep.by_part)


@pytest.mark.parametrize("layers,extra", [(1, ["train.gradient_checkpointing=true"]),
                                          (2, ["train.gradient_checkpointing=true"]), (2, [])])
def test_activation_tape_of_an_unpadded_t5_matches_autograd_byte_for_byte(layers, extra, monkeypatch):
    """No padding (TapeOptions.padded false, every attention mask all ones): T5's encoder self-attention takes the
    position bias itself as its mask, one tensor for every layer; checkpointed blocks keep their arguments, which
    hold no padding mask and, in the first block of a stack, no bias (one layer: every bias is the first's)."""
    from vlscale.modeling import backbones

    monkeypatch.setitem(backbones.LM_REGISTRY, "tiny-t5",
                        dict(backbones.LM_REGISTRY["tiny-t5"], num_layers=layers, num_decoder_layers=layers))
    cfg = load_config("tiny", SMALL + extra)
    assert cfg.model.backbone == "tiny-t5"
    measured, vocab = _measured_saved(cfg, torch.float32, padded=False)
    rep = activation_report(cfg, run_shapes(cfg, vocab), TapeOptions(device="cpu", b=4, padded=False))
    assert rep.saved == measured, (rep.saved, measured, rep.by_part)


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.1"], ["model.backbone=tiny-bart", "peft.method=lora"],
                                   ["train.gradient_checkpointing=true"], ["peft.train_vision=true"]],
                         ids=lambda e: ",".join(e) or "default")
@pytest.mark.parametrize("zero3", [False, True], ids=["torch-linear", "zero3-linear"])
def test_activation_tape_bf16_and_zero3_linear(extra, zero3):
    """bf16 (T5's fp32 norm statistics, the CPU math path's fp32 attention) and ZeRO-3's linear,
    which keeps every input even of frozen layers."""
    cfg = load_config("tiny", SMALL + extra)
    measured, vocab = _measured_saved(cfg, torch.bfloat16, zero3_linear=zero3)
    rep = activation_report(cfg, run_shapes(cfg, vocab), TapeOptions(device="cpu", b=2, zero3_linear=zero3))
    assert abs(rep.saved - measured) <= 0.01 * measured, (rep.saved, measured)


@pytest.mark.parametrize("pool_size", [0, 2])
def test_trained_clip_forward_saves_what_autograd_saves_with_its_grid_pooled(pool_size):
    """vision_trained_forward predicts byte for byte what a trained RN CLIP's grid encoding and its adaptive max
    pooling to model.pool_size keep for backward (autograd on CPU; the pooling keeps its int64 indices, under 1%
    of a whole run's activations, which the tape test above cannot tell apart), and the peak the forward allocates
    beyond the weights and the images (the memory plan's vision_forward phase adds it to what is held already)."""
    from vlscale.modeling.vision import build_vision_encoder, pool_grid

    torch.manual_seed(0)
    enc = build_vision_encoder("tiny-clip-rn")
    unused = set(enc.unused_parameter_names(False))
    for n, prm in enc.named_parameters():
        prm.requires_grad_(n not in unused)
    enc.train()
    x = torch.randn(3, 3, enc.image_size, enc.image_size)
    side = pool_size or enc.grid_side
    assert side < enc.grid_side or not pool_size  # guard: pool_size=2 does pool the tiny RN's grid
    tracker = LiveTensorTracker("cpu")
    tracker.track(list(enc.parameters()) + list(enc.buffers()) + [x])
    held = tracker.current
    with SavedTensorCounter([enc]) as counter, tracker:
        out = pool_grid(enc.encode_grid(x), enc.grid_side, side)
    assert out.shape[1] == side ** 2
    saved, peak, _ = analytic.vision_trained_forward("tiny-clip-rn", 3, 4, False, pool_size)
    assert (saved, peak) == (counter.alive_bytes(), tracker.peak - held)


def test_frozen_prefix_saves_nothing():
    """With a frozen projection, frozen layer norms and LoRA only on attention, the encoder input
    needs no grad: the projection and the first norms keep nothing (but LoRA's inputs are kept)."""
    cfg = load_config("tiny", SMALL + ["peft.method=lora", "peft.train_projection=false",
                                     "peft.train_layer_norms=false"])
    rep = activation_report(cfg, run_shapes(cfg, 721), TapeOptions(device="cpu", b=4))
    assert rep.by_part.get("projection", 0) == 0
    measured, vocab = _measured_saved(cfg, torch.float32)
    rep = activation_report(cfg, run_shapes(cfg, vocab), TapeOptions(device="cpu", b=4))
    assert abs(rep.saved - measured) <= 0.01 * measured


def test_checkpointing_and_batch_scale_activations():
    cfg = load_config("tiny", SMALL)
    s = run_shapes(cfg, 721)
    full = activation_report(cfg, s, TapeOptions()).saved
    cfg.train.gradient_checkpointing = True
    ckpt = activation_report(cfg, s, TapeOptions())
    assert ckpt.saved < full / 2 and ckpt.block_peak > 0
    s2 = run_shapes(cfg, 721, micro_batch_size=6)
    assert activation_report(cfg, s2, TapeOptions()).saved == pytest.approx(2 * ckpt.saved, rel=0.05)


def test_tape_keeps_what_the_cuda_kernels_save():
    """The planner predicts CUDA runs, which no CPU test measures: there dropout keeps a bool mask (CPU: a noise
    tensor of the input's dtype), native_layer_norm keeps fp32 mean and rstd (CPU: the input's dtype), and the
    memory-efficient SDPA kernel given a mask keeps a log-sum-exp of rows padded to a multiple of 32."""
    T = analytic._T
    for device, mask_b, stat_b in (("cuda", 1, 4), ("cpu", 2, 2)):
        tp = analytic._Tape(TapeOptions(device=device, b=2))
        tp.dropout(T(100 * 2, True), 0.1)
        assert tp.total() == 100 * mask_b, device
        tp = analytic._Tape(TapeOptions(device=device, b=2))
        x = T(100 * 2, True)
        tp.layer_norm(x, 10, False)
        assert tp.total() == x.nbytes + 2 * 10 * stat_b, device
    q, k, v = T(80, True), T(80, True), T(80, True)  # bh=2, 5 tokens, d=4, bf16
    for mask, lse_rows in ((T(2 * 5 * 16 * 2, False), 32), (None, 5)):
        tp = analytic._Tape(TapeOptions(device="cuda", b=2))
        tp.sdpa(q, k, v, mask, bh=2, lq=5, lk=5, d=4, dropout=0.0)
        assert tp.total() == 4 * 80 + 2 * lse_rows * 4 + (mask.nbytes if mask else 0)


def test_cuda_attention_pads_masks_to_16_keys_and_log_sum_exp_to_32_rows():
    """On CUDA the memory-efficient SDPA kernel pads the mask's key length to a multiple of 16 and keeps a
    log-sum-exp of rows padded to a multiple of 32; the CPU flash kernel pads neither. With LoRA on a frozen fp32
    T5 and no dropout, these paddings are all that CUDA adds to what autograd keeps."""
    cfg = load_config("tiny", ["train.micro_batch_size=2", "data.max_input_length=5", "data.max_target_length=7",
                               "peft.method=lora", "peft.lora_dropout=0", "model.dropout=0", "train.precision=fp32"])
    s = run_shapes(cfg, 100)
    saved = {dev: activation_report(cfg, s, TapeOptions(device=dev, b=4)).saved for dev in ("cuda", "cpu")}
    B, H, Le, Ld = s.batch, s.heads, s.enc_len, s.dec_len
    assert Le % 16 and Le % 32 and Ld % 16  # paddings to count

    def p(n, m):
        return -(-n // m) * m

    lse = B * H * 4  # fp32 rows
    enc = B * H * Le * (p(Le, 16) - Le) * 4 + lse * (p(Le, 32) - Le)
    dec = (H * Ld * (p(Ld, 16) - Ld) * 4 + B * H * Ld * (p(Le, 16) - Le) * 4  # causal self mask, cross mask
           + 2 * lse * (p(Ld, 32) - Ld))
    assert saved["cuda"] - saved["cpu"] == s.enc_layers * enc + s.dec_layers * dec


# ----------------------------------------------------------------------------- DeepSpeed arithmetic

def _inv(numels, trainable, ndims=None):
    n = len(numels)
    return analytic.ParamInventory([f"p{i}" for i in range(n)], list(numels), list(ndims or [2] * n),
                                   list(trainable), ["lm"] * n, 100)


def test_zero_partition_arithmetic():
    inv = _inv([10, 7, 5, 1000], [True, True, False, False], [2, 1, 2, 2])
    z0 = engine_state(inv, ZeroSettings(stage=0), 4, "fp32", "cpu")
    assert z0.params == 1022 * 4 and z0.grads == 17 * 4
    assert z0.optimizer == (2 * 10 * 4 + 4) + (2 * 7 * 4 + 4)  # moments + a step counter per parameter
    z0b = engine_state(inv, ZeroSettings(stage=0), 4, "bf16", "cpu")
    assert z0b.params == 1022 * 2 and z0b.optimizer == (3 * 10 * 4 + 4) + (3 * 7 * 4 + 4)  # fp32 masters too
    # stage 2, 4 ranks: groups [10] and [7] padded to multiples of 2*4 = 8 -> 16 and 8, partitions 4 and 2
    z2 = engine_state(inv, ZeroSettings(stage=2), 4, "fp32", "cpu")
    assert z2.optimizer == (4 * 12 + 4) + (2 * 12 + 4)
    assert z2.params == 1022 * 4
    # stage 3: ceil(n / 4) per parameter; persistence threshold 5 keeps the 5-element one whole
    z3 = engine_state(inv, ZeroSettings(stage=3, param_persistence_threshold=5), 4, "bf16", "cpu")
    assert z3.params == (3 + 2 + 2 + 250) * 2 + 5 * 2
    assert z3.grads == (3 + 2) * 2 and z3.optimizer == (3 * 12 + 4) + (2 * 12 + 4)


def test_zero3_optimizer_offload_keeps_fp32_gradients_on_the_host():
    """ZeRO-3 with offload_optimizer cpu: the host holds the fp32 masters and moments, the flat gradient
    partition (model dtype) and an fp32 gradient of each sub-group's master partition (DeepSpeed's
    fp32_partitioned_groups_flat[i].grad, left out before); on the CPU accelerator that host is the device."""
    inv = _inv([10, 7, 5, 1000], [True, True, False, False], [2, 1, 2, 2])
    z = ZeroSettings(stage=3, offload_optimizer="cpu", offload_param="cpu", param_persistence_threshold=0)
    part = 3 + 2  # ceil(10 / 4) + ceil(7 / 4): two sub-groups (matrices, then the rest)
    params = (3 + 2 + 2 + 250) * 2
    gpu = engine_state(inv, z, 4, "bf16", "cuda")
    assert gpu.host == part * 3 * 4 + part * 2 + part * 4 + params
    assert gpu.grads == gpu.optimizer == gpu.params == gpu.master_grads == 0
    cpu = engine_state(inv, z, 4, "bf16", "cpu")
    assert cpu.host == gpu.host and cpu.master_grads == part * 4 and cpu.grads == part * 2


def test_sizes_are_written_in_the_largest_unit_they_reach_and_read_only_when_finite():
    assert [analytic.fmt_bytes(n) for n in (1023, 1024, 2 ** 20, 2 ** 30, -(2 ** 20), 3 * 2 ** 29)] == \
        ["1023 B", "1.00 KiB", "1.00 MiB", "1.00 GiB", "-1.00 MiB", "1.50 GiB"]
    with pytest.raises(ValueError, match=r"memory size '1e999GB' is not a finite size"):
        parse_size("1e999GB")  # float overflow: inf, not an OverflowError traceback from int()


def test_optimizer_offload_needs_a_partitioned_optimizer():
    """DeepSpeed offloads the optimizer from ZeRO stage 2 on; stages 0 and 1 are refused naming the stage."""
    for stage in (0, 1):
        with pytest.raises(ValueError, match=rf"offload_optimizer needs stage 2 or 3, not {stage}"):
            ZeroSettings(stage=stage, offload_optimizer="cpu")
    assert ZeroSettings(stage=2, offload_optimizer="nvme").offload_optimizer == "nvme"


def test_the_runs_zero_stage_overrides_the_files():
    """estimate_memory passes train.zero_stage over the DeepSpeed file's stage; "auto" in the file is stage 0."""
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert ZeroSettings.from_ds_config(ds, stage=3).stage == 3 and ZeroSettings.from_ds_config(ds).stage == 2
    assert ZeroSettings.from_ds_config({"zero_optimization": {"stage": "auto"}}).stage == 0


def test_zero3_keeps_small_parameters_whole_up_to_the_models_persistence_budget():
    """stage3_param_persistence_threshold keeps parameters of at most that many elements whole on every rank,
    in module order, only while their total stays within stage3_model_persistence_threshold."""
    inv = _inv([4, 3, 1000], [True, False, False])
    z = ZeroSettings(stage=3, param_persistence_threshold=5, model_persistence_threshold=5)
    st = engine_state(inv, z, 4, "fp32", "cpu")
    assert st.persistent_params == 4 * 4  # the 3-element one would take the budget to 7 > 5
    assert st.params == (1 + 1 + 250) * 4 + 4 * 4


def test_zero2_buckets_and_gradient_partition_boundaries():
    """Stage 2: the reduce bucket holds at most the trainable elements there are; the gradient partition holds
    the parameters overlapping the rank's slice (one starting where the slice ends is the next rank's); with the
    optimizer offloaded, gradients leave through the bucket."""
    inv = _inv([4, 4, 100], [True, True, False])
    z2 = engine_state(inv, ZeroSettings(stage=2, reduce_bucket_size=1000), 2, "fp32", "cpu")
    assert z2.comm_backward == 8 * 4  # min(bucket 1000, 8 trainable elements)
    assert z2.grads == 4 * 4  # 8 elements over 2 ranks: slices [0, 4) and [4, 8), one parameter each
    off = engine_state(inv, ZeroSettings(stage=2, reduce_bucket_size=3, offload_optimizer="cpu"), 2, "fp32", "cuda")
    assert off.grads == 3 * 4
    # the host: the fp32 masters and moments (no step tensors: DeepSpeedCPUAdam), an fp32 gradient partition, a
    # model-dtype copy of the parameter partition and a staging buffer of the largest trainable parameter; the
    # device keeps that staging buffer's twin
    part = 4  # one group of 8 elements over 2 ranks
    assert off.host == part * 3 * 4 + part * 4 + part * 4 + 4 * 4 and off.comm_persistent == 4 * 4


def test_floating_buffers_take_the_runs_precision():
    """Persistent buffers: floating ones (batch-norm statistics) are held in the run's dtype, others (integer
    counters) in their own."""
    inv = _inv([10], [True])
    inv.buffers = [(10, 0), (3, 8)]
    assert inv.buffer_bytes(2) == 10 * 2 + 3 * 8 and inv.buffer_bytes(4) == 10 * 4 + 3 * 8


def test_zero3_sub_groups_close_when_they_reach_the_sub_group_size():
    """DeepSpeed closes a ZeRO-3 optimizer sub-group once its partition reaches sub_group_size elements (>=):
    each sub-group has its own step counter, and the step's fp32 temporaries are the largest sub-group's."""
    inv = _inv([8, 8], [True, True])
    st = engine_state(inv, ZeroSettings(stage=3, sub_group_size=2, param_persistence_threshold=0), 4, "fp32", "cpu")
    assert st.optimizer == 2 * (2 * 12 + 4)  # two sub-groups of 2 elements a rank, not one of 4


def test_an_nvme_offloaded_optimizer_leaves_even_the_cpu_accelerators_memory():
    """On DeepSpeed's CPU accelerator what is offloaded to "cpu" stays in the (host) device memory; what is
    offloaded to NVMe does not: no optimizer state, fp32 master gradient or ZeRO-3 gradient partition is left."""
    inv = _inv([10, 7, 5, 1000], [True, True, False, False], [2, 1, 2, 2])
    for stage in (2, 3):
        st = engine_state(inv, ZeroSettings(stage=stage, offload_optimizer="nvme"), 4, "bf16", "cpu")
        assert st.optimizer == 0 and st.master_grads == 0, stage
    assert engine_state(inv, ZeroSettings(stage=3, offload_optimizer="nvme"), 4, "bf16", "cpu").grads == 0


def test_step_temporaries_init_buffer_and_buckets_of_each_stage():
    """torch AdamW's temporaries follow its implementation: foreach (CUDA's default) a whole group's sqrt at once,
    the single-tensor loop (CPU's) two tensors of the largest parameter; stage 1/2's step also holds the fp32 and
    model-dtype copies of the gradient partition; ZeRO-3 keeps a reduce bucket only with contiguous_gradients and
    its set-up zeroes a gradient of the largest sub-group at full size and its step holds the fp32 and model-dtype
    copies of the largest sub-group's gradient partition; stage 2's NVMe-offloaded optimizer pins two
    fp32 swap buffers of the largest trainable parameter."""
    inv = _inv([10, 10, 10, 1000], [True, True, True, False])  # one group of 30 trainable elements
    assert engine_state(inv, ZeroSettings(stage=0), 1, "fp32", "cuda").step_transient == 4 * 30
    assert engine_state(inv, ZeroSettings(stage=0), 1, "fp32", "cpu").step_transient == 2 * 4 * 10
    z2 = engine_state(inv, ZeroSettings(stage=2), 4, "bf16", "cpu")
    part = 32 // 4  # 30 padded to a multiple of 2 x 4
    assert z2.step_transient == part * 4 + part * 2 + 2 * 4 * 10
    for contiguous, bucket in ((True, 1000 * 2), (False, 0)):
        z3 = engine_state(inv, ZeroSettings(stage=3, reduce_bucket_size=1000, contiguous_gradients=contiguous,
                                            param_persistence_threshold=0), 4, "bf16", "cpu")
        assert z3.comm_persistent == bucket
        assert z3.init_transient == 30 * 4  # the whole sub-group in fp32, not this rank's 9 elements
        assert z3.step_transient == 9 * 4 + 9 * 2 + 2 * 4 * 10  # ceil(10 / 4) x 3 elements a rank
    nvme = engine_state(inv, ZeroSettings(stage=2, offload_optimizer="nvme"), 4, "bf16", "cuda")
    assert nvme.host == 2 * 10 * 4


def test_overlap_comm_defaults_to_zero3_and_follows_the_file():
    """DeepSpeed's overlap_comm defaults to true at stage 3 only; a boolean in the file is taken as it is."""
    assert [ZeroSettings(stage=s).overlap_comm for s in (0, 1, 2, 3)] == [False, False, False, True]
    z = ZeroSettings.from_ds_config({"zero_optimization": {"stage": 3, "overlap_comm": False,
                                                           "contiguous_gradients": False,
                                                           "memory_efficient_linear": False}})
    assert (z.overlap_comm, z.contiguous_gradients, z.memory_efficient_linear) == (False, False, False)


def test_estimate_refuses_an_unknown_device_naming_it():
    with pytest.raises(ValueError, match=r"device='tpu': use 'cuda' or 'cpu'"):
        estimate_memory(load_config("tiny", SMALL), 1, {}, device="tpu")


def test_trainer_loss_holds_the_head_gradients_and_a_half_precision_upcast():
    """In trainer mode backward starts with nll_loss's and log_softmax's fp32 gradients (2 x N x V x 4 bytes) where
    forward ended with the fp32 copy of half-precision logits (N x V x 4, none in fp32)."""
    for precision, upcast in (("fp32", 0), ("bf16", 1)):
        cfg = load_config("tiny", SMALL + [f"train.precision={precision}", "train.zero_stage=0"])
        est = estimate_memory(cfg, 1, resolve_ds_config(cfg, 1, None), device="cpu")
        NV = est.detail["logits"] // analytic.PRECISION_BYTES[precision]  # micro-batch x target length x vocab
        assert est.phases["backward_start"] - est.phases["forward_end"] == (2 - upcast) * NV * 4, precision


def test_zero1_accumulation_holds_both_overlapped_reduce_buckets():
    """ZeRO-1 with accumulation keeps the first micro-batch's reduce buckets to the boundary: two with
    overlap_comm, one without."""
    cfg = load_config("tiny", SMALL + ["train.zero_stage=1", "train.gradient_accumulation_steps=2"])
    est = {}
    for overlap in (True, False):
        ds = resolve_ds_config(cfg, 1, None, device_type="cpu")
        ds["zero_optimization"].update(overlap_comm=overlap, contiguous_gradients=True, reduce_bucket_size=1000)
        est[overlap] = estimate_memory(cfg, 1, ds, device="cpu").phases["vision_forward"]
    assert est[True] - est[False] == 1000 * analytic.PRECISION_BYTES[cfg.train.precision]


def test_extra_prompts_lengthen_the_encoder_input():
    """peft.extra_prompts adds n_prompts tokens before the visual and text tokens, as prompt tuning does."""
    plain = load_config("tiny", SMALL)
    extra = load_config("tiny", SMALL + ["peft.extra_prompts=true", "peft.n_prompts=5"])
    a, b = run_shapes(plain, 100), run_shapes(extra, 100)
    assert (b.n_prompts, b.enc_len - a.enc_len) == (5, 5)


def test_zero2_first_reduce_holds_one_head_gradient_and_the_largest_parameters():
    """Stage 2 allocates its gradient partition when the first reduce bucket fills. With a bucket as large as the
    trainable parameters that is the end of backward: beside what backward_end holds, one of the head's two fp32
    gradients is still in flight (in fp32 the size of the log-probabilities it replaces) and the largest trainable
    parameter's gradient."""
    cfg = load_config("tiny", ["train.zero_stage=2", "train.precision=fp32"])
    ds = resolve_ds_config(cfg, 1, None)
    ds["zero_optimization"]["reduce_bucket_size"] = 10 ** 9
    est = estimate_memory(cfg, 1, ds)
    inv = analytic.parameter_inventory(cfg)
    largest = max(n for n, t in zip(inv.numels, inv.trainable) if t)
    assert est.phases["backward_first_reduce"] - est.phases["backward_end"] == largest * 4


def test_zero3_start_up_holds_the_parts_a_pretrained_backbone_does_not_load_under_zero_init():
    """ZeRO-3 without parameter offload: a random backbone is built whole on each rank before DeepSpeed partitions
    it; a pretrained one loads under zero.Init, so only CLIP, the projection and the PEFT weights arrive whole,
    beside the partitions."""
    for pretrained in (False, True):
        cfg = load_config("tiny", ["train.zero_stage=3", f"model.pretrained={str(pretrained).lower()}"])
        est = estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, None))
        inv = analytic.parameter_inventory(cfg)
        b = analytic.PRECISION_BYTES[cfg.train.precision]
        whole = sum(n for n, g in zip(inv.numels, inv.groups) if g in ("vision", "projection", "peft"))
        expected = whole * b + est.components["params"] if pretrained else inv.total * b
        assert whole and est.phases["init"] == expected, pretrained


def test_zero3_keeps_gathered_the_parameters_whose_backward_use_is_within_the_reuse_distance():
    """At the end of forward a parameter's next use is in backward, about twice the parameters used after it
    away: with stage3_max_reuse_distance 150 the last layer (nothing after it) stays gathered and the one before
    (2 x 100 elements away) is released; at 200 both stay."""
    inv = analytic.ParamInventory(["lm.encoder.block.0.w", "lm.encoder.block.1.w"], [100, 100], [2, 2],
                                  [False, False], ["lm", "lm"], 100)
    for reuse, kept in ((150, 100), (200, 200)):
        z = ZeroSettings(stage=3, max_reuse_distance=reuse, prefetch_bucket_size=0, param_persistence_threshold=0)
        assert analytic._zero3_gathered_numel(inv, z, 2)[0] == kept, reuse


def test_forward_positions_order_the_last_uses_of_bart_t5_and_prompt_parameters():
    """The reuse distances rank parameters by their last use in forward: CLIP, the projection, the prompts, the
    encoder's embedding norm, its layers (BART .layers., T5 .block.), its final norm, the decoder's embeddings, its
    layers; tied token embeddings last (the output layer), untied ones before the decoder's first layer."""
    order = ["vision.trunk.conv1.weight", "projector.feat.weight", "peft.prompt.embedding",
             "lm.model.encoder.layernorm_embedding.weight", "lm.model.encoder.layers.0.fc1.weight",
             "lm.encoder.block.1.layer.1.DenseReluDense.wi.weight", "lm.encoder.final_layer_norm.weight",
             "lm.model.decoder.embed_positions.weight", "lm.model.decoder.layers.0.fc1.weight",
             "lm.model.decoder.layers.1.fc1.weight", "lm.model.shared.weight"]
    positions = [analytic._forward_position(n, 2, tied=True) for n in order]
    assert positions == sorted(positions) and len(set(positions)) == len(order), list(zip(order, positions))
    untied = analytic._forward_position("lm.model.shared.weight", 2, tied=False)
    assert positions[6] < untied < positions[8], untied


def test_checkpoint_files_stage0_optimizer_entries_and_the_universal_copy_of_every_rank():
    """Stage 0 writes per trainable parameter 3 optimizer entries in fp32 (two moments, the step) and 4 in
    bf16/fp16 (and the fp32 master); a ZeRO-3 universal copy takes every rank's module-state file."""
    inv = _inv([10, 7, 1000], [True, True, False])
    client = analytic._CLIENT_STATE + len("p2") + analytic._FINGERPRINT_ENTRY
    for precision, entries in (("fp32", 3), ("bf16", 4)):
        b = analytic.PRECISION_BYTES[precision]
        ck = analytic.checkpoint_bytes(inv, ZeroSettings(stage=0), 1, precision)
        opt = engine_state(inv, ZeroSettings(stage=0), 1, precision, "cpu").optimizer
        module_file = 17 * b + analytic._FILE_OVERHEAD + 2 * analytic._MODULE_ENTRY[0]
        assert ck.file_bytes == [module_file + opt + 2 * entries * analytic._OPTIMIZER_ENTRY + client], precision
    for W in (2, 4):
        ck = analytic.checkpoint_bytes(inv, ZeroSettings(stage=3), W, "bf16")
        opt_file = engine_state(inv, ZeroSettings(stage=3), W, "bf16", "cpu").optimizer + analytic._FILE_OVERHEAD
        module_file = analytic._FILE_OVERHEAD + 2 * analytic._MODULE_ENTRY[3]  # 0-size placeholders
        assert ck.universal == 12 * 17 + 3 * 2 * analytic._UNIVERSAL_FILE + W * module_file + opt_file, W


def _unmodelled_value(ok):
    """A value the estimate does not model for a row of UNMODELLED_SETTINGS."""
    if ok is None:
        return "fp16"  # another dtype than the bf16 run's
    if not ok or ok[0] == {}:
        return {"names": ["lm.encoder"]}
    return True if ok[0] is False else 2


def test_unmodelled_deepspeed_settings_are_refused_naming_the_key():
    """DeepSpeed settings that change memory in ways the estimate does not model (ZeRO++'s quantized weights,
    other gathering units, bf16 masters, another gradient-accumulation dtype ...) were read past, the run
    predicted as if the key were absent. Each is refused in one line naming the key and its value; DeepSpeed's
    own value, a stage that does not apply the key and the run's own precision are accepted."""
    for key, ok, stages, _ in analytic.UNMODELLED_SETTINGS:
        stage = (stages or (3,))[0]
        precision = "fp16" if key.startswith("fp16.") else "bf16"
        for value, refused in ((_unmodelled_value(ok), True), *(((ok[0], False),) if ok else ())):
            ds = {"zero_optimization": {"stage": stage}, precision: {"enabled": True}}
            *path, last = key.split(".")
            block = ds
            for part in path:
                block = block.setdefault(part, {})
            block[last] = value
            if not refused:
                analytic.check_modelled(ds, stage, precision)
                continue
            with pytest.raises(ValueError, match=rf"^{re.escape(key)}={re.escape(repr(value))}: .*does not model"):
                analytic.check_modelled(ds, stage, precision)
    analytic.check_modelled({"zero_optimization": {"round_robin_gradients": True}}, 3, "bf16")  # stage 1/2 only
    analytic.check_modelled({"data_types": {"grad_accum_dtype": "bfloat16"}, "communication_data_type": "bf16"},
                            1, "bf16")
    analytic.check_modelled({"fp16": {"enabled": False, "auto_cast": True}}, 3, "bf16")  # not the run's precision
    # through estimate_memory and the launcher (its one-line error, exit 2)
    cfg = load_config("tiny", ["train.zero_stage=3"])
    ds = resolve_ds_config(cfg, 2, None, device_type="cpu")
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    with pytest.raises(ValueError, match="zero_optimization.zero_quantized_nontrainable_weights=True"):
        estimate_memory(cfg, 2, ds, device="cpu")


def test_launcher_refuses_an_unmodelled_deepspeed_setting(capsys, launcher, tmp_path):
    """profile_memory.py with a DeepSpeed file that sets a key the estimate does not model: one line naming the
    key and the value, exit 2 (before: the prediction of the file without the key)."""
    ds = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["zero_hpz_partition_size"] = 8
    (tmp_path / "hpz.json").write_text(json.dumps(ds))
    assert launcher("profile_memory").main(["--world-size", "16", "--deepspeed", str(tmp_path / "hpz.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: zero_optimization.zero_hpz_partition_size=8: ") and "does not model" in err[-1]

def test_zero_settings_from_ds_config_and_errors():
    z = ZeroSettings.from_ds_config({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1000,
        "offload_optimizer": {"device": "cpu"}, "stage3_max_reuse_distance": 0}})
    assert (z.stage, z.prefetch_bucket_size, z.offload_optimizer, z.max_reuse_distance) == (3, 1000, "cpu", 0)
    assert z.reduce_bucket_size == 500_000_000  # DeepSpeed's default for "auto"
    with pytest.raises(ValueError, match="offload_param needs stage 3"):
        ZeroSettings(stage=2, offload_param="cpu")
    with pytest.raises(ValueError, match="stage=5"):
        ZeroSettings(stage=5)
    assert parse_size("24GiB") == 24 * 2 ** 30 and parse_size("80GB") == 80 * 10 ** 9
    with pytest.raises(ValueError, match="24 gigs"):
        parse_size("24 gigs")
    assert parse_size("1E9") == parse_size("1e+9") == 10 ** 9  # as Python writes it, not only 1e9
    with pytest.raises(ValueError, match="'-1GiB' is negative"):  # it said "not understood"
        parse_size("-1GiB")


def test_offload_moves_state_off_the_device():
    cfg = load_config("tiny", ["train.zero_stage=3", "peft.train_lm=true"])
    base = resolve_ds_config(cfg, 2, None, device_type="cuda")
    plain = estimate_memory(cfg, 2, base)
    ds = json.loads(json.dumps(base))
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    off = estimate_memory(cfg, 2, ds)
    assert off.components["optimizer"] == 0 and off.components["grads"] == 0
    assert off.host >= plain.components["optimizer"] + plain.components["grads"]
    assert off.components["peak"] < plain.components["peak"]
    # on DeepSpeed's CPU accelerator the host is the device: what is offloaded there stays in the peak
    # (measured, benchmarks/profile_accuracy.py's offload rows: peak within 0.1%; t5-small was -26.8% before)
    plain_cpu = estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, None, device_type="cpu"), device="cpu")
    off_cpu = estimate_memory(cfg, 2, ds, device="cpu")
    assert off_cpu.host == off.host
    assert off_cpu.components["params"] == plain_cpu.components["params"]
    assert off_cpu.components["grads"] == plain_cpu.components["grads"]
    # DeepSpeedCPUAdam's step counts are Python ints: only the 4-byte step tensors are gone
    assert 0 < plain_cpu.components["optimizer"] - off_cpu.components["optimizer"] <= 4 * 64
    assert off_cpu.components["peak"] > off.components["peak"] + off.host // 2


def test_one_rank_parameter_offload_gathers_onto_the_device():
    """One GPU with zero3_offload.json: DeepSpeed does not all-gather on one rank, but sets each parameter to its
    host partition moved to the device (``NoGatherHandle``), a copy held and released by the same prefetch,
    reuse-distance and live-limit rules as the gathered parameters on several ranks; the profiler counted none.
    Without offload the partition on the device is the parameter, and on the CPU accelerator the move
    aliases the host partition: nothing either (benchmarks/profile_accuracy.py's 1-rank offload row)."""
    cfg = load_config("tiny", ["train.deepspeed=ds_configs/zero3_offload.json"])
    one = estimate_memory(cfg, 1, resolve_ds_config(cfg, 1, None, device_type="cuda"))
    two = estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, None, device_type="cuda"))
    assert one.detail["zero3_gathered"] == two.detail["zero3_gathered"] > 0
    assert one.detail["zero3_gather_transient"] == 0 < two.detail["zero3_gather_transient"]  # no flat buffer
    assert one.phases["forward_end"] >= one.components["params"] + one.detail["zero3_gathered"]
    cpu = estimate_memory(cfg, 1, resolve_ds_config(cfg, 1, None, device_type="cpu"), device="cpu")
    assert cpu.detail["zero3_gathered"] == cpu.detail["zero3_gathered_backward"] == 0
    plain = load_config("tiny", ["train.deepspeed=ds_configs/zero3.json"])
    assert estimate_memory(plain, 1, resolve_ds_config(plain, 1, None, device_type="cuda")).detail["zero3_gathered"] == 0
    # a LM layer fetched on demand (live limit 1e6, reuse 0): its parameters' copies, not 2x as beside a flat buffer
    wide = load_config("tiny", ["train.deepspeed=ds_configs/zero3_offload.json", "model.backbone=tiny-t5-wide"])
    inv, layers = analytic.parameter_inventory(wide), {}
    for name, n in zip(inv.names, inv.numels):
        if (m := analytic._LM_LAYER.match(name)):
            layers[m.group(1)] = layers.get(m.group(1), 0) + n
    layer = max(layers.values())  # a decoder layer (self- and cross-attention, FFN, adapters)
    est = {}
    for W in (1, 2):
        ds = resolve_ds_config(wide, W, None, device_type="cuda")
        ds["zero_optimization"].update(stage3_max_live_parameters=1_000_000, stage3_max_reuse_distance=0)
        est[W] = estimate_memory(wide, W, ds).detail["zero3_gathered_backward"]
    assert est[1] == layer * 4 and est[2] == 2 * est[1]


def test_every_registry_backbone_offline():
    """t5-11b, flan-t5-xxl ... with ViT-L-14 images: estimated on the meta device, no download. A BART
    with fewer learned positions than ViT-L-14's 256 tokens + the text (mini-bart: 128) is refused with
    it, and estimated with ViT-B-32 (49 tokens)."""
    from vlscale.config import ConfigError
    from vlscale.modeling.backbones import LM_REGISTRY, lm_config

    peaks = {}
    for name in sorted(LM_REGISTRY):
        args = [f"model.backbone={name}", "data.tasks=[vqa]", "train.precision=bf16", "train.zero_stage=3",
                "train.micro_batch_size=8"]
        vision = "ViT-L-14"
        if getattr(lm_config(name), "max_position_embeddings", 1e9) < 256 + 40:
            with pytest.raises(ConfigError, match=f"more than {name}'s"):
                estimate_memory(load_config("tiny", [*args, f"model.vision={vision}"]), 8)
            vision = "ViT-B-32"
        cfg = load_config("tiny", [*args, f"model.vision={vision}"])
        est = estimate_memory(cfg, 8)
        c = est.components
        assert all(c[k] >= 0 for k in ("params", "grads", "optimizer", "activations", "buffers")), (name, c)
        assert c["peak"] >= c["params"] + c["optimizer"]
        peaks[name] = c["peak"]
    assert peaks["google-t5/t5-11b"] > peaks["google-t5/t5-3b"] > peaks["google-t5/t5-base"]
    assert peaks["google/flan-t5-xxl"] > peaks["google/flan-t5-xl"]


# ----------------------------------------------------------------------------- tools

def test_live_tensor_tracker_follows_allocations_and_frees():
    with LiveTensorTracker("cpu") as tr:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500)  # 2000 B
        del a
        c = torch.empty(250)  # 1000 B
        v = c.view(25, 10)  # a view: no new storage
    assert tr.peak == 6000 and tr.current == 3000
    del b, c, v
    assert tr.current == 0


def test_saved_tensor_counter_counts_storages_once_and_skips_parameters():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter([lin]) as counter:
        y = torch.relu(lin(x))  # addmm keeps x (weight: a parameter); relu keeps its result
        z = (y * y).sum()  # keeps y once
    assert counter.alive_bytes() == x.numel() * 4 + y.numel() * 4
    z.backward()
    del y, z
    assert counter.alive_bytes() == x.numel() * 4  # the graph is gone; x is still alive


def test_live_tensor_tracker_follows_resizes_phase_peaks_and_peak_resets():
    """ZeRO-3 frees and refills partitions by resizing storages (``UntypedStorage.resize_`` bypasses the
    dispatcher); each phase keeps its own peak; a reset peak starts from what is live, not from 0."""
    from vlscale.profiling.measure import _patched_storage_resize

    with LiveTensorTracker("cpu") as tr, _patched_storage_resize(tr):
        a = torch.empty(100)  # 400 B
        tr.phase("grow")
        a.resize_(300)  # 1200 B, in place
        assert (tr.current, tr.peak, tr.peak_phase) == (1200, 1200, "grow")
        tr.phase("free")
        a.untyped_storage().resize_(0)
        assert tr.current == 0
        b = torch.empty(50)  # 200 B
        # a phase's peak counts what was live when it started
        assert tr.phase_peaks == {"start": 400, "grow": 1200, "free": 1200} and tr.phase_starts["free"] == 1200
        tr.phase("step")
        tr.reset_peak()
        assert (tr.peak, tr.peak_phase, tr.phase_peaks) == (200, "step", {"step": 200})
        c = torch.empty(25)  # 100 B
    assert (tr.peak, tr.phase_peaks) == (300, {"step": 300})
    del a, b, c


def test_measured_run_host_bytes_counts_every_rank_and_the_cpu_peak():
    """Each rank builds the whole model in the run's precision and carries its process; on the CPU
    accelerator it also trains in host memory (the predicted peak)."""
    from types import SimpleNamespace

    from vlscale.profiling.measure import PROCESS_BYTES, measured_run_host_bytes

    def est(precision, device):
        return SimpleNamespace(detail={"total_params": 1000}, settings={"precision": precision, "device": device},
                               components={"peak": 5000})

    assert measured_run_host_bytes(est("bf16", "cpu"), 2) == 2 * (2000 + PROCESS_BYTES + 5000)
    assert measured_run_host_bytes(est("fp32", "cpu"), 3) == 3 * (4000 + PROCESS_BYTES + 5000)
    assert measured_run_host_bytes(est("fp32", "cuda"), 2) == 2 * (4000 + PROCESS_BYTES)


def _rank_result(peak, params, act_at_peak=100, grads_at_peak=50, phase="forward0"):
    return {"stage": 3, "peak": peak, "params": params, "grads": 20, "optimizer": 300, "activations": 90,
            "rss_peak": 10 ** 6, "init_peak": 500, "activations_at_peak": act_at_peak,
            "grads_at_peak": grads_at_peak, "peak_phase": phase}


def test_measured_ranks_give_the_maximum_each_ranks_figures_and_the_top_ranks_buffers():
    from vlscale.profiling.measure import _over_ranks

    out = _over_ranks([_rank_result(2000, 700), _rank_result(3000, 600, 400, 40, "backward1")])
    assert (out["peak"], out["params"], out["peak_by_rank"], out["params_by_rank"]) == (3000, 700, [2000, 3000],
                                                                                      [700, 600])
    # what else was live at the highest peak: that rank's own figures
    assert out["peak_phase"] == "backward1" and (out["activations_at_peak"], out["grads_at_peak"]) == (400, 40)
    assert out["buffers"] == 3000 - 600 - 300 - 400 - 40
    cuda = _over_ranks([_rank_result(2000, 700, None, None), _rank_result(3000, 600, None, None)])
    assert "buffers" not in cuda and "activations_at_peak_by_rank" not in cuda and cuda["peak"] == 3000


def test_a_run_whose_set_up_is_its_peak_reports_init_with_no_activation_or_gradient_live_then():
    """DeepSpeed's set-up can be a run's peak (ZeRO-3 holds a whole model while it partitions it): the peak is then
    the set-up's, its phase ``init``, and no step's activations or gradients are counted as live at it (the
    buffers are what the set-up held beside the parameters); a step's peak, even one the set-up only equals,
    stays that step's with what was live in it."""
    from vlscale.profiling.measure import _over_ranks, _run_peak

    at_step = {"activations": 400, "grads": 40}
    peak, phase, at = _run_peak(5000, 3000, "backward1", at_step)
    assert (peak, phase, at) == (5000, "init", {"activations": 0, "grads": 0})
    out = _over_ranks([_rank_result(peak, 700, at["activations"], at["grads"], phase)])
    assert out["peak_phase"] == "init" and out["buffers"] == 5000 - 700 - 300
    assert _run_peak(3000, 3000, "backward1", at_step) == (3000, "backward1", at_step)
    assert _run_peak(2000, 3000, "backward1", at_step) == (3000, "backward1", at_step)


def test_the_live_tensor_tracker_skips_wrapper_subclasses_whose_storage_is_not_memory():
    """A wrapper tensor subclass (DTensor's kind: ``_make_wrapper_subclass``) reports a storage of its full size,
    though its memory is the inner tensors' own (tracked themselves): counted, it doubled their bytes."""
    from vlscale.profiling.measure import _storage

    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

        def __init__(self, inner):
            self.inner = inner

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # no op runs on it here
            raise NotImplementedError(func)

    inner = torch.empty(100)  # 400 B
    wrapped = Wrapper(inner)
    assert wrapped.untyped_storage().nbytes() == 400 and _storage(wrapped) is None
    param = torch.nn.Parameter(torch.empty(25))  # 100 B: a parameter counts
    tracker = LiveTensorTracker("cpu")
    tracker.track([inner, wrapped, param])
    assert tracker.current == 500


def test_measured_cases_launch_a_fresh_process_group_and_read_every_rank(monkeypatch):
    """The ranks are started without the caller's launcher variables (a group of their own), on the CPU
    accelerator without a GPU, with this checkout first on the path; each rank's file is read, per case; a
    failed launch names its exit code and output."""
    from vlscale.profiling import measure

    cfg = load_config("tiny", [])
    monkeypatch.setenv("MASTER_PORT", "30690")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    seen = {}

    def launch(args, world_size, env, cwd, timeout_s):
        seen.update(args=args, world=world_size, env=env, cwd=cwd, timeout=timeout_s)
        spec = json.loads(Path(args[-2]).read_text())
        assert [c["steps"] for c in spec["cases"]] == [3, 1] and spec["threads"] == 2
        for r in range(world_size):
            Path(f"{args[-1]}.rank{r}").write_text(json.dumps([_rank_result(1000 * (r + 1), 10 + r),
                                                               _rank_result(100, 7 - r)]))
        return 0, ""

    out = measure.measure_memory_cases([{"cfg": cfg}, {"cfg": cfg, "steps": 1}], 2, timeout_s=77, threads=2,
                                       launch=launch)
    assert [o["peak_by_rank"] for o in out] == [[1000, 2000], [100, 100]] and [o["params"] for o in out] == [11, 7]
    root = str(Path(measure.__file__).resolve().parents[2])
    assert seen["args"][:3] == ["-m", "vlscale.profiling.measure", "--worker"] and seen["world"] == 2
    assert seen["cwd"] == root and seen["timeout"] == 77 and seen["env"]["PYTHONPATH"].split(":")[0] == root
    assert seen["env"]["DS_ACCELERATOR"] == "cpu" and not {"MASTER_PORT", "RANK"} & set(seen["env"])
    with pytest.raises(RuntimeError, match=r"measured run failed \(exit 3\): python -m vlscale.profiling.measure "
                                           r"--worker .* on 2 rank\(s\)\nboom"):
        measure.measure_memory_cases([{"cfg": cfg}], 2, launch=lambda *a: (3, "boom"))


def test_saved_tensor_counter_skips_parameter_data_and_frees_with_the_graph():
    """A parameter's data reached as another tensor (as ZeRO-3's gathered copies are) is not an activation;
    a graph dropped without backward frees what it saved at once (no reference cycle waiting for gc)."""
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter([lin]) as counter:
        y = x @ lin.weight.detach().t()  # keeps the weight's storage (for x's gradient) under another tensor
    assert counter.alive_bytes() == 0
    with SavedTensorCounter([lin]) as counter:
        y = torch.relu(lin(x))  # relu keeps its own output
    assert counter.alive_bytes() == x.numel() * 4 + y.numel() * 4
    del y
    assert counter.alive_bytes() == x.numel() * 4


def test_synthetic_batch_of_a_video_task_has_one_clip_of_max_frames():
    cfg = load_config("tiny", ["data.tasks=[tvqa]", "model.feature_source=images", "model.max_frames=3"])
    s = synthetic_batch(cfg, 2, 700)
    assert s["task"] == "tvqa" and s["pixel_values"].shape[:4] == (2, 1, 3, 3)


def test_live_tensor_tracker_counts_only_its_device_and_stops_following_resizes_after():
    """A CPU tracker leaves meta tensors out (shapes without memory: a meta-device build), a CUDA tracker the
    host's tensors; outside its context ``UntypedStorage.resize_`` is PyTorch's own again."""
    from vlscale.profiling.measure import _patched_storage_resize

    with LiveTensorTracker("cpu") as tr, _patched_storage_resize(tr):
        a = torch.empty(100)  # 400 B
        m = torch.empty(1000, device="meta")
    with LiveTensorTracker("cuda") as gpu:
        b = torch.empty(100)
    assert (tr.peak, tr.current, gpu.peak) == (400, 400, 0)
    a.untyped_storage().resize_(0)
    assert tr.current == 400, "a resize after the context is not followed"
    del a, b, m


def test_saved_tensor_counter_counts_an_activation_at_a_released_parameters_address():
    """A parameter's storage is known by the storage itself, not its address: once ZeRO-3 releases gathered data,
    an activation may be allocated at the same address, and the address check took it for the parameter (its
    bytes left out). Two storages over one numpy buffer give the same address for certain."""
    import numpy as np

    buffer = np.zeros((8, 8), np.float32)
    lin = torch.nn.Linear(8, 8)
    lin.weight = torch.nn.Parameter(torch.from_numpy(buffer))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter([lin]) as counter:
        h = x.sin()  # keeps x (its storage stays alive): the first record reads the parameters' storages
        lin.weight.data = torch.zeros(8, 8)  # released: the first storage is gone, its memory is numpy's
        at_old_address = torch.from_numpy(buffer).requires_grad_()
        y = at_old_address.sin()
    assert counter.alive_bytes() == (x.numel() + at_old_address.numel()) * 4  # what sin saves: its inputs
    del h, y


def test_saved_tensor_counter_leaves_out_parameters_whose_data_was_swapped_and_other_devices():
    """ZeRO-3 gathers a parameter by swapping its ``data`` after the counter read the parameters' storages: the
    parameter (and a view of it, as linear saves its weight transposed) is still not an activation. Saved
    storages are counted by device type."""
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter([lin]) as counter:
        h = x.sin()  # keeps x: the first record reads the parameters' storages
        # gathered: a storage the counter has not seen (a freed one's address: the test below)
        partition = lin.weight.data
        lin.weight.data = partition.clone()
        y = torch.relu(lin(h))
        m = torch.randn(4, 8, device="meta", requires_grad=True)
        z = m.sin()
    assert counter.alive_bytes("cpu") == (x.numel() + h.numel() + y.numel()) * 4
    assert counter.alive_bytes("meta") == m.numel() * 4
    assert counter.alive_bytes() == counter.alive_bytes("cpu") + counter.alive_bytes("meta")
    del y, z, partition


def test_saved_bytes_takes_an_absent_argument():
    """An op's optional argument (a bias) may be None among the inputs."""
    from vlscale.profiling.measure import saved_bytes

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    saved = saved_bytes(lambda: torch.nn.functional.linear(x, w, None), [x, w, None])
    assert saved == {"all": (x.numel() + w.numel()) * 4, "activations": 0}  # linear keeps its two arguments


def test_synthetic_batch_tokens_padding_dtype_and_seed():
    """Ordinary tokens only (no special id below 4, none outside a small vocabulary); with ``padded`` only the
    first example ends in 3 padding positions, and not when that would leave it no token; features in the dtype
    asked for; the same seed gives the same batch, another seed another."""
    cfg = load_config("tiny", ["data.max_input_length=6", "data.max_target_length=5", "model.feature_source=cache"])
    s = synthetic_batch(cfg, 3, 9, dtype=torch.bfloat16)
    for key in ("input_ids", "labels"):
        assert 4 <= int(s[key].min()) and int(s[key].max()) < 9, (key, s[key])
    assert s["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6]
    assert s["vis_feats"].dtype == torch.bfloat16
    assert synthetic_batch(cfg, 3, 9, padded=False)["attention_mask"].tolist() == [[1] * 6] * 3
    short = load_config("tiny", ["data.max_input_length=3"])
    assert synthetic_batch(short, 2, 700)["attention_mask"].tolist() == [[1, 1, 1]] * 2
    again, other = synthetic_batch(cfg, 3, 700, seed=0), synthetic_batch(cfg, 3, 700, seed=1)
    first = synthetic_batch(cfg, 3, 700, seed=0)
    assert all(torch.equal(first[k], again[k]) for k in ("input_ids", "labels", "vis_feats"))
    assert not any(torch.equal(first[k], other[k]) for k in ("input_ids", "labels", "vis_feats"))


def test_process_peak_rss_and_available_memory_are_bytes(monkeypatch, tmp_path):
    """ru_maxrss is in KiB on Linux and /proc/meminfo in kB: both are reported in bytes; no MemAvailable (a
    kernel before 3.14) or no /proc: None."""
    from vlscale.profiling import measure

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    hwm = int(status["VmHWM"].split()[0]) * 1024
    assert abs(measure._rss_peak_bytes() - hwm) <= 0.1 * hwm, (measure._rss_peak_bytes(), hwm)
    meminfo = tmp_path / "meminfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(meminfo if path == "/proc/meminfo" else path, *args, **kwargs)

    monkeypatch.setattr(measure, "open", fake_open, raising=False)
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\nMemAvailable:    2048 kB\n")
    assert measure.available_host_bytes() == 2048 * 1024
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\n")
    assert measure.available_host_bytes() is None
    meminfo.unlink()
    assert measure.available_host_bytes() is None


def test_bf16_stand_in_steps_fp32_masters_and_drops_their_gradients():
    """The GPU section's stand-in for DeepSpeed's stage-0 bf16 optimizer: AdamW on fp32 masters (weight decay on
    matrices only), the bf16 weights copied from them, every gradient dropped after the step (the fp32 ones
    included: they would stay in the next step's memory)."""
    from vlscale.profiling.measure import _Bf16MasterAdamW

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ref = [p.detach().float().clone().requires_grad_(True) for p in lin.parameters()]
    ref_opt = torch.optim.AdamW([{"params": [ref[0]]}, {"params": [ref[1]], "weight_decay": 0.0}], lr=0.1,
                                betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    opt = _Bf16MasterAdamW(lin.parameters(), 0.1, [0.9, 0.99], 1e-8, 0.5)
    x = torch.randn(5, 4)
    for _ in range(2):
        lin(x.bfloat16()).float().square().sum().backward()
        for r, p in zip(ref, lin.parameters()):
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        assert all(p.grad is None for p in lin.parameters()) and all(m.grad is None for m in opt.masters)
        for r, m, p in zip(ref, opt.masters, lin.parameters()):
            assert torch.equal(m, r.detach()) and torch.equal(p, r.detach().bfloat16())
    assert opt.opt.param_groups[1]["weight_decay"] == 0.0


def test_gpu_section_without_cuda_says_it_is_skipped(monkeypatch):
    from vlscale.profiling.measure import run_gpu_section

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = {"other": 1}
    assert run_gpu_section(out) == {"skipped": "no CUDA device"} and out["profile_memory"] == {"skipped": "no CUDA device"}


def test_gpu_section_joins_a_one_rank_group_without_a_fixed_port(monkeypatch):
    """The DeepSpeed path joins the process group through init_distributed (a file store), not a fixed TCP
    port: on the H200 (2026-12-04) MASTER_PORT=29555 was still held by another section's group and three
    sections failed with EADDRINUSE. Each config then gets its measured row and its errors."""
    import vlscale.engine.distributed as distributed
    import vlscale.profiling.measure as measure

    joined, measured = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: joined.append(1))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(measure, "GPU_CONFIGS", measure.GPU_CONFIGS[:2])

    def fake_steps(cfg, ds, *, vocab_size, steps):
        measured.append(steps)
        return {"peak": 4 << 20, "params": 1 << 20, "optimizer": 2 << 20, "activations": 1 << 20}

    monkeypatch.setattr(measure, "run_measured_steps", fake_steps)
    section = measure.run_gpu_section({}, steps=2)
    assert "MASTER_PORT" not in os.environ and len(joined) == 2 and measured == [2, 2]
    assert section["engine"] == "deepspeed" and section["device"] == "stand-in GPU"
    rows = section["configs"]
    assert [r["config"] for r in rows] == [name for name, _ in measure.GPU_CONFIGS]
    assert all("error" not in r for r in rows)
    for r in rows:
        assert r["measured"]["engine"] == "deepspeed stage 0"
        assert r["errors"]["peak"] == pytest.approx((r["predicted"]["peak"] - (4 << 20)) / (4 << 20))


def test_live_tensor_tracker_counts_every_output_of_an_op():
    """An op that returns several tensors (sort: values and int64 indices; layer norm: its output, mean and rstd)
    makes each of their storages live: all are counted, not the first alone."""
    x = torch.randn(64)
    rows = x.view(4, 16)  # made before the tracker: a view it returned would be counted as x's storage
    with LiveTensorTracker("cpu") as tr:
        values, indices = torch.sort(x)
        assert tr.current == 64 * 4 + 64 * 8
        out, mean, rstd = torch.ops.aten.native_layer_norm(rows, [16], None, None, 1e-5)
        assert tr.current == 64 * 4 + 64 * 8 + 64 * 4 + 4 * 4 + 4 * 4
    del values, indices, out, mean, rstd


def test_live_tensor_tracker_forgets_a_dead_storage_whose_id_a_new_one_may_take():
    """A storage is known by its Python object's id while it lives; its entry goes when it dies, so a new storage
    that CPython gives the same id is counted, not taken for the dead one (which left it uncounted, so that the
    live bytes fell below what is live). The reuse is played out: the dead one's weakref callback, then a storage
    seen under its id."""
    t = torch.empty(100)  # 400 B
    tracker = LiveTensorTracker("cpu")
    tracker.track([t])
    tracker._dead(id(t.untyped_storage()))  # what the weakref callback does when the storage dies
    assert tracker.current == 0
    tracker.track([t])
    assert (tracker.current, tracker.peak) == (400, 400)


def test_live_tensor_tracker_names_the_first_phase_to_reach_the_peak_and_a_phase_entered_again():
    """A later phase that only equals the peak does not take its name (the estimate names the first of equal
    phases too); a phase entered again (a step's micro-batches under gradient accumulation) keeps the highest
    peak of its runs and starts where it was last entered."""
    with LiveTensorTracker("cpu") as tr:
        tr.phase("forward0")
        a = torch.empty(100)  # 400 B
        del a
        tr.phase("forward1")
        b = torch.empty(100)  # 400 B again: a tie
        assert (tr.peak, tr.peak_phase) == (400, "forward0")
        tr.phase("forward0")  # entered again with b live
        assert tr.phase_starts["forward0"] == 400 and tr.phase_peaks["forward0"] == 400
        c = torch.empty(50)
        assert tr.phase_peaks["forward0"] == 600 and (tr.peak, tr.peak_phase) == (600, "forward0")
    del b, c


def test_measured_ranks_report_the_highest_set_up_peak_and_each_ranks():
    """DeepSpeed's set-up peak (``init_peak``) is, like the other figures, the maximum over the ranks with each
    rank's beside it, not rank 0's alone."""
    from vlscale.profiling.measure import _over_ranks

    out = _over_ranks([dict(_rank_result(2000, 700), init_peak=500), dict(_rank_result(3000, 600), init_peak=900)])
    assert (out["init_peak"], out["init_peak_by_rank"]) == (900, [500, 900])


def test_saved_tensor_counter_leaves_out_the_modules_buffers():
    """A batch norm keeps its running statistics (buffers) for backward beside its input: they are the module's
    state, not activations. In training mode it also keeps the batch's mean and inverse std, which are."""
    bn = torch.nn.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    with SavedTensorCounter([bn]) as counter:
        y = bn(x)
    assert counter.alive_bytes() == x.numel() * 4 + 2 * 4 * 4  # x, the batch's mean and inverse std
    bn.eval()
    with SavedTensorCounter([bn]) as counter:
        y = bn(x)
    assert counter.alive_bytes() == x.numel() * 4
    del y


# ----------------------------------------------------------------------------- measured (in process)

def test_measured_cases_refuse_bad_keys_before_starting():
    from vlscale.profiling.measure import measure_memory_cases

    cfg = load_config("tiny", [])
    with pytest.raises(ValueError, match=r"case 1: unknown keys \['step'\]"):
        measure_memory_cases([{"cfg": cfg}, {"cfg": cfg, "step": 2}], 2)
    with pytest.raises(ValueError, match="loss_mode='sum'"):
        measure_memory_cases([{"cfg": cfg, "loss_mode": "sum"}], 2)


def test_measured_cases_pass_each_cases_settings_and_the_defaults_to_the_ranks(monkeypatch):
    """A case's own ds_config, vocab_size, loss_mode and padded reach the ranks as given; without them the
    DeepSpeed file the run would resolve for the world size, the model's vocabulary, the trainer's loss and
    padded batches. The ranks run with ``threads`` OpenMP threads unless the caller set them, and with the
    caller's PYTHONPATH after this checkout."""
    from vlscale.profiling import measure

    cfg = load_config("tiny", [])
    seen = {}

    def launch(args, world_size, env, cwd, timeout_s):
        seen.update(spec=json.loads(Path(args[-2]).read_text()), env=env)
        for r in range(world_size):
            Path(f"{args[-1]}.rank{r}").write_text(json.dumps([_rank_result(100, 7)] * 2))
        return 0, ""

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/users/own")
    given = {"cfg": cfg, "ds_config": {"train_batch_size": 6}, "vocab_size": 123, "loss_mode": "model", "padded": False}
    measure.measure_memory_cases([given, {"cfg": cfg}], 2, threads=3, launch=launch)
    mine, default = seen["spec"]["cases"]
    assert {k: mine[k] for k in ("ds_config", "vocab_size", "loss_mode", "padded")} == {
        "ds_config": {"train_batch_size": 6}, "vocab_size": 123, "loss_mode": "model", "padded": False}
    assert default["ds_config"] == resolve_ds_config(cfg, 2, None) != resolve_ds_config(cfg, 1, None)
    assert (default["vocab_size"], default["loss_mode"], default["padded"]) == (default_vocab_size(cfg), "trainer", True)
    root = str(Path(measure.__file__).resolve().parents[2])
    assert seen["env"]["OMP_NUM_THREADS"] == "3" and seen["env"]["PYTHONPATH"] == f"{root}:/users/own"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    measure.measure_memory_cases([{"cfg": cfg}], 2, threads=3, launch=launch)
    assert seen["env"]["OMP_NUM_THREADS"] == "1"


def test_plain_torch_bf16_path_matches_stage0_model():
    """The GPU section's plain-PyTorch stand-in for DeepSpeed stage 0 bf16 (bf16 weights, fp32 masters,
    AdamW), measured on CPU with the live-tensor tracker: the same layout the analytic model predicts."""
    from vlscale.profiling.measure import measure_torch_bf16

    cfg = load_config("tiny", ["train.micro_batch_size=2", "train.precision=bf16", "train.zero_stage=0",
                             "train.gradient_checkpointing=true"])
    meas = measure_torch_bf16(cfg, default_vocab_size(cfg), steps=2, device="cpu")
    pred = estimate_memory(cfg, 1, resolve_ds_config(cfg, 1, None, device_type="cpu"), device="cpu").components
    for key in ("params", "optimizer", "activations"):
        assert pred[key] == meas[key], (key, pred[key], meas[key])
    assert abs(pred["peak"] - meas["peak"]) <= 0.10 * meas["peak"], (pred["peak"], meas["peak"])


# ----------------------------------------------------------------------------- planner / launcher

# The planner's mechanics on T5-large at micro-batch 64 x 4 ranks (a global batch of 256): without the preset's
# train.global_batch_size (the paper's 300, which 64 x 4 does not divide), so the batch is micro x ranks x accumulation.
T5_LARGE = ["model.backbone=t5-large", "train.global_batch_size=null"]


def test_planner_ranks_and_writes_config(tmp_path):
    from vlscale.profiling.planner import plan, write_ds_config

    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    roomy = plan(cfg, "80GiB", 4, micro_batches=[8, 32], precisions=["bf16"])
    best = roomy[0]
    assert best.fits and best.offload == "none" and not best.gradient_checkpointing and best.micro_batch_size == 32
    tight = plan(cfg, "1GiB", 4, micro_batches=[8], precisions=["bf16"])
    assert not any(o.fits for o in tight)
    path = tmp_path / "plans" / "t5_large" / "ds.json"  # a folder that does not exist yet is made
    write_ds_config(best, path)
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == best.zero_stage
    from vlscale.engine.deepspeed_config import build_deepspeed_config

    run = load_config("paper/clip_t5_single_adapter", T5_LARGE + best.overrides())
    assert run.train.micro_batch_size * run.train.gradient_accumulation_steps * 4 == 256
    resolved = build_deepspeed_config(path, run, 4, device_type="cuda")
    assert resolved["train_micro_batch_size_per_gpu"] == 32


def test_planner_fits_within_the_headroom_and_lists_fitting_settings_first():
    """fits = peak + headroom <= budget: a setting whose peak is under the budget but eats into the headroom does
    not fit; every fitting setting comes before every other one, fastest first."""
    from vlscale.profiling.analytic import GiB
    from vlscale.profiling.planner import plan

    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    kw = dict(micro_batches=[8, 32], precisions=["bf16"], headroom=GiB)
    peaks = sorted(o.peak for o in plan(cfg, "80GiB", 4, **kw))
    middle = peaks[len(peaks) // 2]
    options = plan(cfg, middle + GiB // 2, 4, **kw)  # the middle peak fits the budget, not with the headroom
    assert [o.fits for o in options if o.peak == middle] and not any(o.fits for o in options if o.peak == middle)
    assert all(o.fits == (o.peak + GiB <= middle + GiB // 2) for o in options)
    fits = [o.fits for o in options]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True), [o.label() for o in options]
    speeds = [o.samples_per_s for o in options if o.fits]  # (ties within 4 significant digits: the smaller peak)
    assert all(a >= b * (1 - 1e-3) for a, b in zip(speeds, speeds[1:])), speeds
    rest = [o.peak for o in options if not o.fits]  # then the rest by peak: the nearest to fitting first
    assert rest == sorted(rest), [o.label() for o in options if not o.fits]


def test_planner_throughput_charges_communication_offload_and_the_vision_tower():
    """The throughput model's costs (module docstring): more than one rank all-reduces the gradients, ZeRO-3 also
    all-gathers every parameter, parameter offload streams every parameter (the frozen backbone too) over PCIe,
    the CLIP tower encodes images on the fly (not cached features), and small micro-batches use the GPU less."""
    import copy

    from vlscale.profiling.planner import CostModel, plan, throughput

    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    options = plan(cfg, "80GiB", 2, micro_batches=[8, 32], precisions=["bf16"], checkpointing=[False])
    pick = {(o.zero_stage, o.offload, o.micro_batch_size): o for o in options}
    cost = CostModel()
    z2 = pick[(2, "none", 8)].estimate
    assert throughput(cfg, z2, 2, "none", cost) < throughput(cfg, z2, 1, "none", cost)  # the gradient all-reduce
    assert pick[(3, "none", 8)].samples_per_s < pick[(2, "none", 8)].samples_per_s      # ZeRO-3's all-gathers
    # parameter offload: 2 x every parameter's partition (forward and backward) over PCIe, per micro-batch
    est = pick[(3, "opt_param_cpu", 8)].estimate
    t_opt = 8 / throughput(cfg, est, 2, "opt_cpu", cost)
    t_par = 8 / throughput(cfg, est, 2, "opt_param_cpu", cost)
    assert t_par - t_opt == pytest.approx(2 * est.detail["total_params"] * 2 / 2 / (cost.pcie_gbps * 1e9), rel=1e-6)
    assert est.detail["total_params"] > 10 * est.detail["trainable_params"]  # frozen backbone: not the trainable few
    # the paper's run reads cached features; with images the frozen CLIP tower runs a forward per sample
    images = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64",
                                                                     "model.feature_source=images"])
    on_the_fly = plan(images, "80GiB", 2, stages=[2], offloads=["none"], checkpointing=[False], micro_batches=[8],
                      precisions=["bf16"])[0].estimate
    assert on_the_fly.detail["vision_params"] > 0
    cached = copy.deepcopy(images)
    cached.model.feature_source = "cache"
    assert throughput(images, on_the_fly, 2, "none", cost) < throughput(cached, on_the_fly, 2, "none", cost)
    # utilisation: on one rank (no communication) a quarter of the tokens per micro-batch runs fewer samples/s
    small, large = pick[(2, "none", 8)].estimate, pick[(2, "none", 32)].estimate
    assert throughput(cfg, small, 1, "none", cost) < 0.99 * throughput(cfg, large, 1, "none", cost)


def test_planner_charges_per_step_costs_once_per_step_not_per_micro_batch():
    """DeepSpeed's schedule under gradient accumulation: ZeRO-0/1 all-reduce the gradients once, at the boundary;
    ZeRO-2 reduce-scatters each micro-batch's and all-gathers the updated parameters once; the offloaded optimizer
    takes each micro-batch's gradients to the host but steps Adam and sends the parameters back once. So seconds per
    sample at accumulation a = (per micro-batch + per step / a) / micro-batch: the per-step costs shrink by 1 - 1/a
    from a=1, exactly, and the per-micro-batch ones not at all (they used to be charged every micro-batch)."""
    import copy

    from vlscale.profiling.planner import CostModel, plan, throughput

    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    options = plan(cfg, "80GiB", 2, micro_batches=[8], precisions=["bf16"], checkpointing=[False])
    pick = {(o.zero_stage, o.offload): o for o in options}
    cost, W, mbs, b = CostModel(), 2, 8, 2  # bf16

    def sec_per_sample(stage, offload, accum):
        c = copy.deepcopy(cfg)
        c.train.zero_stage, c.train.micro_batch_size, c.train.gradient_accumulation_steps = stage, mbs, accum
        return 1 / throughput(c, pick[(stage, offload)].estimate, W, offload, cost)

    trainable = pick[(1, "none")].estimate.detail["trainable_params"]
    link, pcie = cost.link_gbps * 1e9, cost.pcie_gbps * 1e9
    per_step = {(1, "none"): 2 * trainable * b * (W - 1) / W / link,  # the all-reduce
                (2, "none"): trainable * b * (W - 1) / W / link,  # the parameters' all-gather
                (2, "opt_cpu"): trainable * b * (W - 1) / W / link + trainable / W * 4 / pcie
                + trainable / W / cost.cpu_adam_params_per_s}  # + parameters back, CPU Adam
    for key, step_cost in per_step.items():
        for a in (2, 8):
            saved = sec_per_sample(*key, 1) - sec_per_sample(*key, a)
            assert saved == pytest.approx(step_cost * (1 - 1 / a) / mbs, rel=1e-6), (key, a)
    # ZeRO-3's all-gathers and its gradients' reduce-scatter are per micro-batch: accumulation saves nothing there
    assert sec_per_sample(3, "none", 8) == pytest.approx(sec_per_sample(3, "none", 1), rel=1e-9)
    # so with accumulation ZeRO-1 (2 gradient volumes per step) beats ZeRO-2 (a + 1), and at a=1 they tie
    assert sec_per_sample(1, "none", 8) < sec_per_sample(2, "none", 8)
    assert sec_per_sample(1, "none", 1) == pytest.approx(sec_per_sample(2, "none", 1), rel=1e-9)


def test_predictions_from_zero3_nvme_need_no_nvme_path_and_a_run_still_does(capsys, launcher, monkeypatch, tmp_path):
    """zero3_nvme.json's nvme_path "auto" needed VLSCALE_NVME_PATH to predict or plan, which write nothing there: the
    launcher set a placeholder variable for its run, and a Python call of estimate_memory or plan was refused ('set
    VLSCALE_NVME_PATH to a directory on a fast local NVMe drive'). A prediction passes build_deepspeed_config a
    placeholder path, the same numbers as with the variable; a run (the build, --measure) still needs it, and a
    written config keeps "auto", not the placeholder."""
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config
    from vlscale.profiling.analytic import estimate_checkpoint
    from vlscale.profiling.planner import plan, write_ds_config

    cfg = load_config("tiny", ["train.deepspeed=ds_configs/zero3_nvme.json"])
    kw = dict(stages=[3], offloads=["opt_param_nvme"], micro_batches=[cfg.train.micro_batch_size],
              precisions=["bf16"], checkpointing=[False])
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    with_path = estimate_memory(cfg, 2).to_dict(), plan(cfg, "1GiB", 2, **kw)[0].to_dict()
    checkpoint = estimate_checkpoint(cfg, 2)
    monkeypatch.delenv("VLSCALE_NVME_PATH")
    assert estimate_checkpoint(cfg, 2) == checkpoint
    est, option = estimate_memory(cfg, 2), plan(cfg, "1GiB", 2, **kw)[0]
    assert est.settings["offload_param"] == "nvme" and (est.to_dict(), option.to_dict()) == with_path
    z = write_ds_config(option, tmp_path / "w.json", cfg=cfg)["zero_optimization"]
    assert z["offload_optimizer"]["nvme_path"] == z["offload_param"]["nvme_path"] == "auto"
    with pytest.raises(DeepSpeedConfigError, match='nvme_path is "auto"; set VLSCALE_NVME_PATH'):
        build_deepspeed_config(cfg.train.deepspeed, cfg, 2, device_type="cuda")
    pm = launcher("profile_memory")
    assert pm.main(["--config", "tiny", "--world-size", "2", "--deepspeed", "ds_configs/zero3_nvme.json",
                    "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"]["settings"]["offload_param"] == "nvme"
    assert "VLSCALE_NVME_PATH" not in os.environ
    assert pm.main(["--config", "tiny", "--deepspeed", "ds_configs/zero3_nvme.json", "--measure"]) == 2
    assert 'nvme_path is "auto"; set VLSCALE_NVME_PATH' in capsys.readouterr().err
    # planning from it (--budget): its stage 0-2 options start from the file without the NVMe optimizer, which ZeRO-2
    # refuses (a traceback: 'offload_optimizer.device="nvme" at ZeRO stage 2', with the variable set too)
    options = plan(load_config("tiny"), "1GiB", 2, ds_file="ds_configs/zero3_nvme.json", stages=[1, 2],
                   micro_batches=[16], precisions=["bf16"], checkpointing=[False])
    assert {(o.zero_stage, o.offload) for o in options} == {(1, "none"), (2, "none"), (2, "opt_cpu")}


def test_every_option_the_planner_offers_is_a_file_the_run_accepts(tmp_path, monkeypatch):
    """The planner offered ZeRO-2 with the optimizer on NVMe, which DeepSpeed's ZeRO-2 trains in host memory
    (refused by build_deepspeed_config): each option's written file must build with the option's overrides."""
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.planner import OFFLOADS, plan, write_ds_config

    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    small = ["model.backbone=t5-small", "train.global_batch_size=null"]  # micro 64 x 4 ranks: a global batch of 256
    cfg = load_config("paper/clip_t5_single_adapter", small + ["train.micro_batch_size=64"])
    options = plan(cfg, "80GiB", 4, stages=[2, 3], micro_batches=[8], precisions=["bf16"], checkpointing=[False],
                   offloads=list(OFFLOADS))
    assert {o.offload for o in options} >= {"opt_nvme", "opt_param_nvme"} and {o.zero_stage for o in options} >= {2, 3}
    for i, option in enumerate(options):
        write_ds_config(option, tmp_path / f"{i}.json")
        run = load_config("paper/clip_t5_single_adapter", small + option.overrides())
        built = build_deepspeed_config(tmp_path / f"{i}.json", run, 4, device_type="cuda")
        assert built["zero_optimization"]["stage"] == option.zero_stage, option


def test_planning_changes_neither_the_callers_dict_nor_one_option_through_another(tmp_path, monkeypatch):
    """Each option starts from a copy of the resolved file: the caller's dict stays as given, and an option where
    the file has no block on its device gets a fresh default one ({device, pin_memory: true}, NVMe: nvme_path auto)
    while the file's own block (zero3_nvme.json's buffer_count 16, not DeepSpeed's 5) is kept for its device, also
    after an offload="none" option popped it from its own copy: every option estimates as it does planned alone."""
    from vlscale.profiling.planner import OFFLOADS, plan, write_ds_config

    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    raw = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_nvme.json").read_text())
    given = json.loads(json.dumps(raw))
    cfg = load_config("tiny")
    kw = dict(stages=[3], micro_batches=[cfg.train.micro_batch_size], precisions=["bf16"], checkpointing=[False])
    every = plan(cfg, "80GiB", 2, ds_file=raw, offloads=list(OFFLOADS), **kw)
    assert raw == given and {o.offload for o in every} == set(OFFLOADS)
    pick = {o.offload: o for o in every}
    o = pick["opt_param_nvme"]  # planned last, after "none"
    alone = plan(cfg, "80GiB", 2, ds_file=raw, offloads=["opt_param_nvme"], **kw)[0]
    assert (alone.peak, alone.estimate.host, alone.estimate.nvme) == (o.peak, o.estimate.host, o.estimate.nvme)
    z = write_ds_config(pick["opt_param_nvme"], tmp_path / "w.json", ds_file=raw)["zero_optimization"]
    assert z["offload_param"] == raw["zero_optimization"]["offload_param"]
    z = write_ds_config(pick["opt_param_cpu"], tmp_path / "w.json", ds_file=raw)["zero_optimization"]
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    z = write_ds_config(pick["opt_nvme"], tmp_path / "w.json")["zero_optimization"]  # zero3.json: no blocks
    assert z["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "auto"}
    assert raw == given


def test_planner_estimates_a_stage_of_the_other_zero_family_as_the_run_resolves_it(tmp_path):
    """A preset's zero2.json planned at stage 3 (profile_memory.py's default search) is estimated with the
    stage-3 settings the run will resolve (those zero3.json resolves to), not DeepSpeed's defaults; and the
    file --write-config writes for it trains: it resolved with allgather_bucket_size "auto" left before."""
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.planner import plan, write_ds_config

    ds_dir = Path(__file__).resolve().parents[2] / "ds_configs"
    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    kw = dict(micro_batches=[8], precisions=["bf16"], stages=[3], offloads=["none", "opt_param_cpu"],
              checkpointing=[True])
    from_two = plan(cfg, "24GiB", 4, ds_file=str(ds_dir / "zero2.json"), **kw)
    from_three = plan(cfg, "24GiB", 4, ds_file=str(ds_dir / "zero3.json"), **kw)
    assert [(o.label(), o.peak) for o in from_two] == [(o.label(), o.peak) for o in from_three]
    for o in from_two:
        path = tmp_path / f"{o.offload}.json"
        write_ds_config(o, path, ds_file=str(ds_dir / "zero2.json"))
        run = load_config("paper/clip_t5_single_adapter", T5_LARGE + o.overrides())
        z = build_deepspeed_config(path, run, 4, device_type="cuda")["zero_optimization"]
        assert z["stage"] == 3 and "allgather_bucket_size" not in z
    # and a stage-2 plan from zero3.json is estimated as zero2.json's
    kw.update(stages=[2], offloads=["none"])
    assert ([o.peak for o in plan(cfg, "24GiB", 4, ds_file=str(ds_dir / "zero3.json"), **kw)]
            == [o.peak for o in plan(cfg, "24GiB", 4, ds_file=str(ds_dir / "zero2.json"), **kw)])


def test_written_config_starts_from_the_file_the_plan_estimated(tmp_path):
    """write_ds_config started a stage 0-2 option from ds_configs/zero2.json and a stage-3 one from zero3.json,
    whatever file the plan estimated from (default_ds_file: --deepspeed, else train.deepspeed, else zero3.json at
    every stage): a preset's own file lost its settings in the written one, and a missing file wrote made-up ones."""
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config, default_ds_file
    from vlscale.profiling.planner import plan, write_ds_config

    zero3 = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    own = json.loads(json.dumps(zero3))
    own["zero_optimization"]["reduce_bucket_size"] = 12_345_678
    (tmp_path / "own.json").write_text(json.dumps(own))
    cfg = load_config("tiny", [f"train.deepspeed={tmp_path / 'own.json'}"])
    options = plan(cfg, "80GiB", 2, stages=[1, 2, 3], micro_batches=[cfg.train.micro_batch_size],
                   precisions=["bf16"], checkpointing=[False], offloads=["none"])
    assert {o.zero_stage for o in options} == {1, 2, 3}
    for o in options:
        written = write_ds_config(o, tmp_path / "w.json", cfg=cfg)["zero_optimization"]
        assert (written["stage"], written["reduce_bucket_size"]) == (o.zero_stage, 12_345_678)
        plain = write_ds_config(o, tmp_path / "plain.json")["zero_optimization"]  # no file of the run's: zero3.json
        assert set(plain) <= set(zero3["zero_optimization"]), sorted(set(plain) - set(zero3["zero_optimization"]))
        run = load_config("tiny", o.overrides())  # resolves as the run without --deepspeed, but for unread keys
        stage3_only = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size",
                       "stage3_gather_16bit_weights_on_model_save") if o.zero_stage < 3 else ()
        default = build_deepspeed_config(default_ds_file(run), run, 2, device_type="cuda")
        for key in stage3_only:
            del default["zero_optimization"][key]
        assert build_deepspeed_config(tmp_path / "plain.json", run, 2, device_type="cuda") == default, o.label()
    with pytest.raises(DeepSpeedConfigError, match="missing.json' does not exist"):
        write_ds_config(options[0], tmp_path / "w.json", ds_file=str(tmp_path / "missing.json"))


def test_planner_keeps_the_global_batch():
    """Every option's micro-batch x accumulation x ranks is the run's global batch (tiny: 16 x 1 x 2 = 32):
    micro-batches 64 (and 32 on 2 ranks) would change it, so they are not offered."""
    from vlscale.engine.deepspeed_config import global_batch_size
    from vlscale.profiling.planner import plan

    cfg = load_config("tiny")
    options = plan(cfg, "1GiB", 2, precisions=["fp32"], stages=[2], offloads=["none"], checkpointing=[False])
    assert sorted(o.micro_batch_size for o in options) == [1, 2, 4, 8, 16]
    # the paper's global batch of 500 on 4 ranks (125 a rank): its divisors up to 64, and the micro-batch given
    paper_cfg = load_config("paper/clip_bart_single_adapter", ["train.micro_batch_size=125"])
    paper = plan(paper_cfg, "80GiB", 4, precisions=["bf16"], stages=[2], offloads=["none"], checkpointing=[False])
    assert sorted(o.micro_batch_size for o in paper) == [1, 5, 25, 125]
    for o in paper:
        assert global_batch_size(load_config("paper/clip_bart_single_adapter", o.overrides()), 4) == 500, o.overrides()
    for o in options:
        run = load_config("tiny", o.overrides())
        assert run.train.micro_batch_size * run.train.gradient_accumulation_steps * 2 == 32, o.overrides()
    with pytest.raises(ValueError, match=r"no micro-batch in \[64\] divides the global batch 32 over 2 ranks"):
        plan(cfg, "1GiB", 2, micro_batches=[64])
    with pytest.raises(ValueError, match=r"no micro-batch in \[0, 3\] divides"):  # not a ZeroDivisionError
        plan(cfg, "1GiB", 2, micro_batches=iter([0, 3]))  # an iterator: the message still lists the sizes
    # 32 divides the global batch but not a rank's share (16): 32 x 2 ranks is a global batch of 64
    with pytest.raises(ValueError, match=r"no micro-batch in \[32\] divides the global batch 32 over 2 ranks"):
        plan(cfg, "1GiB", 2, micro_batches=[32])
    # searched by default: every divisor of a rank's share up to 64 (128 a rank: 64 is, 128 is not)
    big = load_config("tiny", ["train.global_batch_size=256"])
    assert sorted(o.micro_batch_size for o in plan(big, "1GiB", 2, precisions=["fp32"], stages=[2], offloads=["none"],
                                                   checkpointing=[False])) == [1, 2, 4, 8, 16, 32, 64]
    # an option built by hand is held to the same: its accumulation was max(1, 32 // (mbs x 2)), 5 for mbs 3 (a global
    # batch of 30) and 1 for mbs 32 (64)
    import dataclasses

    for mbs in (3, 32):
        with pytest.raises(ValueError, match=rf"global batch 32 is not micro-batch {mbs} x 2 ranks x a whole accum"):
            dataclasses.replace(options[0], micro_batch_size=mbs)
    assert dataclasses.replace(options[0], micro_batch_size=4).accumulation == 4


def test_each_options_overrides_train_its_setting():
    """A row's overrides (what --write-config prints to train with) set the row's ZeRO stage, micro-batch,
    gradient checkpointing and precision, each of them either way."""
    from vlscale.profiling.planner import plan

    options = plan(load_config("tiny"), "1GiB", 2, stages=[0, 3], offloads=["none"], micro_batches=[4, 8],
                   precisions=["bf16", "fp32"])
    assert len({(o.zero_stage, o.micro_batch_size, o.gradient_checkpointing, o.precision) for o in options}) == 16
    for o in options:
        t = load_config("tiny", o.overrides()).train
        assert (t.zero_stage, t.micro_batch_size, t.gradient_checkpointing, t.precision) == \
            (o.zero_stage, o.micro_batch_size, o.gradient_checkpointing, o.precision), o.label()


def test_planner_throughput_is_the_documented_compute_and_transfer_time():
    """The throughput model's arithmetic (module docstring), per sample: on one rank with nothing offloaded, the
    FLOPs (forward 2 x (LM + projection) x tokens; backward that again plus the trainable fraction; checkpointing a
    forward more) at the peak rate times the utilisation, fp32 at half bf16's rate. On 2 ranks the offloaded
    optimizer moves each micro-batch's fp32 gradient partition to the host, and once per step the parameters back
    and CPU Adam; NVMe runs those at min(PCIe, NVMe) and swaps the optimizer state (2 x 12 bytes a parameter) once
    per step. ZeRO-3 all-gathers every parameter twice per micro-batch where ZeRO-2 all-gathers the trainable ones
    once per step."""
    import copy

    from vlscale.profiling.planner import CostModel, plan, throughput

    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    assert cfg.model.feature_source == "cache"  # no CLIP forward in the FLOPs
    options = plan(cfg, "80GiB", 2, micro_batches=[8], precisions=["bf16", "fp32"], stages=[2, 3],
                   offloads=["none", "opt_cpu"])
    pick = {(o.zero_stage, o.offload, o.gradient_checkpointing, o.precision): o for o in options}
    cost, W, mbs = CostModel(), 2, 8

    def sec(key, world=W, offload=None, accum=1):
        o = pick[key]
        c = copy.deepcopy(cfg)
        c.train.zero_stage, c.train.micro_batch_size, c.train.gradient_accumulation_steps = o.zero_stage, mbs, accum
        return 1 / throughput(c, o.estimate, world, offload or o.offload, cost)

    d, s = pick[(2, "none", False, "bf16")].estimate.detail, pick[(2, "none", False, "bf16")].estimate.settings
    trainable, total = d["trainable_params"], d["total_params"]
    lm = total - d["vision_params"]
    tokens = mbs * (s["encoder_length"] + s["decoder_length"])
    util = tokens / (tokens + cost.half_util_tokens)
    fwd = 2 * lm * tokens
    for ckpt, precision, speed in ((False, "bf16", 1.0), (True, "bf16", 1.0), (False, "fp32", cost.fp32_speed)):
        flops = fwd * (2 + trainable / lm) + (fwd if ckpt else 0)
        expected = flops / (cost.peak_tflops * 1e12 * speed * util) / mbs
        assert sec((2, "none", ckpt, precision), world=1) == pytest.approx(expected, rel=1e-9), (ckpt, precision)
    pcie, nvme, link = cost.pcie_gbps * 1e9, cost.nvme_gbps * 1e9, cost.link_gbps * 1e9
    for a in (1, 4):
        moved = trainable / W * 4  # one fp32 gradient (or parameter) partition
        offload = sec((2, "opt_cpu", False, "bf16"), accum=a) - sec((2, "none", False, "bf16"), accum=a)
        assert offload == pytest.approx((moved / pcie * (1 + 1 / a) + trainable / W / cost.cpu_adam_params_per_s / a)
                                        / mbs, rel=1e-6), a
    key = (2, "opt_cpu", False, "bf16")
    on_nvme = sec(key, offload="opt_nvme") - sec(key, offload="opt_cpu")
    assert on_nvme == pytest.approx((2 * moved * (1 / nvme - 1 / pcie) + 2 * 12 * trainable / W / nvme) / mbs, rel=1e-6)
    gathers = sec((3, "none", False, "bf16")) - sec((2, "none", False, "bf16"))
    assert gathers == pytest.approx((2 * total - trainable) * 2 * (W - 1) / W / link / mbs, rel=1e-6)


def test_planner_rows_say_what_the_planned_run_gets(tmp_path):
    """What a user reads from a row: its samples/s is the throughput of the run its overrides train (their
    accumulation, not the config's); its host_bytes (--json) is the host memory it offloads to; offload=none
    offloads nothing even from a file that offloads (zero3_offload.json); a row fits exactly when its peak plus the
    headroom is within the budget, the boundary included; rows of equal speed come smallest peak first; the
    estimate is for the device asked for. The table shows --top rows, each with its host memory and fit."""
    from vlscale.profiling.analytic import GiB, fmt_bytes
    from vlscale.profiling.planner import CostModel, format_table, plan, throughput

    offload_file = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_offload.json")
    cfg = load_config("paper/clip_t5_single_adapter", T5_LARGE + ["train.micro_batch_size=64"])
    kw = dict(ds_file=offload_file, micro_batches=[8, 32], precisions=["bf16"], checkpointing=[False])
    options = plan(cfg, "80GiB", 4, **kw)
    for o in options:
        run = load_config("paper/clip_t5_single_adapter", T5_LARGE + o.overrides())
        assert o.samples_per_s == pytest.approx(throughput(run, o.estimate, 4, o.offload, CostModel()), rel=1e-9), \
            o.label()
        row = o.to_dict()
        assert (row["host_bytes"], row["nvme_bytes"]) == (o.estimate.host, o.estimate.nvme), o.label()
        assert (row["components"], row["peak_phase"]) == (o.estimate.components, o.estimate.peak_phase), o.label()
        assert row["components"]["peak"] == row["peak"] and row["peak_phase"], o.label()
        assert (o.estimate.host == 0) == (o.offload == "none"), (o.label(), o.estimate.host)
    # the fit boundary: peak + headroom == budget fits, a byte less does not
    o = options[0]
    one = dict(kw, micro_batches=[o.micro_batch_size], stages=[o.zero_stage], offloads=[o.offload], headroom=GiB)
    assert plan(cfg, o.peak + GiB, 4, **one)[0].fits and not plan(cfg, o.peak + GiB - 1, 4, **one)[0].fits
    # one rank: no communication, so ZeRO 0-3 without offload tie on speed; the smaller peak comes first
    alone = plan(cfg, "80GiB", 1, **dict(kw, micro_batches=[8], offloads=["none"]))
    assert len({round(o.samples_per_s, 6) for o in alone}) == 1 and len({o.peak for o in alone}) > 1
    assert [o.peak for o in alone] == sorted(o.peak for o in alone)
    assert {o.estimate.settings["device"] for o in plan(cfg, "80GiB", 1, **dict(kw, device="cpu"))} == {"cpu"}
    assert format_table(alone, GiB).splitlines()[0].endswith(" x 1 rank")
    # speeds equal to 4 digits tie: with communication all but free, ZeRO 0-3 on 4 ranks differ only in float noise,
    # and they come smallest peak first, not in the order a last bit gives their speeds
    free = plan(cfg, "80GiB", 4, **dict(kw, micro_batches=[8], offloads=["none"], cost=CostModel(link_gbps=1e12)))
    assert len({o.samples_per_s for o in free}) > 1 and len({f"{o.samples_per_s:.4g}" for o in free}) == 1
    assert [o.peak for o in free] == sorted(o.peak for o in free)
    # the table: --top rows, each row's host memory (offloaded) and fit
    middle = sorted(o.peak for o in options)[len(options) // 2]
    mixed = plan(cfg, middle + GiB, 4, **dict(kw, headroom=GiB))
    shown = [next(o for o in mixed if o.fits and o.estimate.host), next(o for o in mixed if not o.fits), mixed[0]]
    lines = format_table(shown, middle + GiB, limit=2).splitlines()
    assert len(lines) == 2 + 2 + 1 and lines[-1].startswith(f"{sum(o.fits for o in shown)} of 3 settings fit ")
    for o, line in zip(shown, lines[2:4]):
        cols = line.split()
        assert cols[-6:] == [*fmt_bytes(o.peak).split(), *fmt_bytes(o.estimate.host).split(),
                             "yes" if o.fits else "no", f"{o.samples_per_s:.1f}"], line


def test_launcher_refuses_a_measured_run_the_host_cannot_hold(capsys, launcher, monkeypatch):
    """--measure builds the whole model on every rank: a model the machine's memory cannot hold is
    refused before any rank starts, with the sizes, instead of swapping or being killed."""
    from vlscale.profiling import measure

    profile_memory = launcher("profile_memory")
    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.setattr(measure, "available_host_bytes", lambda: 3 * 2 ** 30)
    assert profile_memory.main(["--config", "scale/clip_t5_3b_single_adapter", "--world-size", "2", "--measure",
                                "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "builds the whole model (2,8" in err and "on each of the 2 rank(s)" in err
    assert "3.00 GiB available" in err and not started
    # what the machine holds is measured (the run itself stubbed here: tests/integration/test_profile_measure.py)
    assert profile_memory.main(["--world-size", "1", "--measure", "--device", "cpu", "--json"]) == 0
    assert len(started) == 1


def test_launcher_json(capsys, launcher):
    profile_memory = launcher("profile_memory")
    assert profile_memory.main(["--world-size", "2", "--zero-stage", "3", "--json", "train.micro_batch_size=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params", "grads", "optimizer", "activations", "buffers", "peak"):
        assert isinstance(out["predicted"][key], int)
    assert out["predicted"]["settings"]["zero_stage"] == 3
    disk = out["checkpoint"]  # ZeRO-3: both ranks write the same, their optimizer partition and buffers
    assert len(disk["file_bytes_by_rank"]) == 2 and disk["tensor_bytes_by_rank"][0] == disk["tensor_bytes_by_rank"][1]
    assert disk["peak_on_disk"] == 3 * disk["total"] + 2 * disk["adapter"]
    assert profile_memory.main(["--world-size", "2", "--zero-stage", "3", "train.micro_batch_size=2"]) == 0
    text = capsys.readouterr().out
    assert "ZeRO-3 gathered parameters per rank" in text and "stage3_max_live_parameters 1e+09" in text
    whole = analytic.fmt_bytes(out["predicted"]["detail"]["total_params"] * 4)  # the default: fp32
    assert whole == analytic.fmt_bytes(out["predicted"]["detail"]["eval_gathered"])
    dec = analytic.fmt_bytes(out["predicted"]["detail"]["eval_gathered_decoder"])
    assert out["predicted"]["detail"]["eval_gathered_decoder"] < out["predicted"]["detail"]["eval_gathered"]
    assert (f"evaluation: generating with the model gathered whole holds {whole} per rank beside the partitions, its "
            f"decoding parameters alone {dec} (train.eval_gather=auto: the whole model where it fits in half of the "
            "memory free then, else the decoding parameters") in text
    assert profile_memory.main(["--world-size", "2", "--zero-stage", "3", "train.eval_gather=decoder"]) == 0
    assert (f"evaluation: generating with the decoding parameters gathered around each batch's decoding holds {dec} "
            "per rank") in capsys.readouterr().out
    assert profile_memory.main(["--world-size", "2", "--zero-stage", "3", "train.eval_gather=never"]) == 0
    assert "evaluation: generating" not in capsys.readouterr().out
    assert profile_memory.main(["--world-size", "2", "--zero-stage", "2", "train.micro_batch_size=2"]) == 0
    assert "evaluation: generating" not in capsys.readouterr().out  # nothing partitioned: nothing to gather
    assert "disk: a checkpoint writes" in text and "(2 kept + the one written)" in text
    assert profile_memory.main(["--world-size", "0"]) == 2
    # a plan: the global batch and each row's accumulation shown (a row's mbs alone hid a 4x larger batch); in
    # --json, with how many settings were searched and fit: the --plot test's run of the same plan checks them
    capsys.readouterr()
    assert profile_memory.main(["--world-size", "2", "--budget", "1GiB", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "global batch 32 = micro-batch (mbs) x accumulation (accum) x 2 ranks" in text
    assert re.findall(r"^ *(\d+) zero\d", text, re.M) == ["1", "2", "3"]  # --top rows in the table too
    row = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    mbs = int(row.split("mbs=")[1].split()[0])
    assert int(row.split()[6]) == 32 // (2 * mbs), row
    # how to train a row (most are no shipped file: the table never said --write-config makes one)
    assert text.splitlines()[-1] == ("to train setting 1: add --write-config FILE.json (writes its DeepSpeed file and "
                                     "prints the train command with its overrides)")


def test_launcher_plots_the_plans_fitting_settings_or_else_the_prediction(capsys, launcher, monkeypatch, tmp_path):
    """--plot with --budget draws one bar per fitting setting among the --top shown, topped at its peak; settings
    that do not fit are not drawn, and where none fits the bar is the prediction's."""
    pm = launcher("profile_memory")
    drawn = []
    monkeypatch.setattr(pm, "plot", lambda path, bars: drawn.append(bars))
    argv = ["--world-size", "2", "--headroom", "0", "--top", "200", "--plot", str(tmp_path / "bars.png"), "--json"]
    assert pm.main(argv + ["--budget", "35MiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    fit = [row["peak"] for row in out["plan"] if row["fits"]]
    assert 0 < len(fit) < len(out["plan"]) == out["settings_searched"] == 140
    assert out["settings_fit"] == len(fit)
    assert all(o["micro_batch_size"] * o["gradient_accumulation_steps"] * 2 == o["global_batch"] == 32
               for o in out["plan"])  # each row's global batch and accumulation (test_launcher_json: the table's)
    assert sorted(bar["peak"] for bar in drawn[0].values()) == sorted(fit)
    assert pm.main(argv + ["--budget", "1KiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings_fit"] == 0 and list(drawn[1]) == ["predicted"]
    assert drawn[1]["predicted"]["peak"] == out["predicted"]["peak"]


def test_launcher_json_is_alone_on_stdout(capsys, launcher, monkeypatch):
    """--json prints one JSON object: what a library prints to stdout meanwhile goes to stderr. Without a GPU
    and DS_ACCELERATOR, DeepSpeed's first import printed its accelerator warning to stdout, before the object
    (`profile_memory.py --json | jq` failed on a laptop)."""
    estimate = analytic.estimate_memory

    def noisy(*a, **k):
        print("[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")
        return estimate(*a, **k)

    monkeypatch.setattr(analytic, "estimate_memory", noisy)
    assert launcher("profile_memory").main(["--config", "tiny", "--budget", "1GiB", "--top", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["predicted"]["settings"]["zero_stage"] == 3
    assert "Setting accelerator to CPU" in err
    assert launcher("profile_memory").main(["--config", "tiny"]) == 0  # the table: stdout as before
    assert "Setting accelerator to CPU" in capsys.readouterr().out


def test_plan_table_says_the_headroom_it_kept(capsys, launcher):
    """A budget below the default headroom (5% + 0.5 GiB) fits nothing: the table says how much it kept free,
    where it said '0 of 140 settings fit 512.00 MiB' beside peaks of a few MiB and no reason."""
    profile_memory = launcher("profile_memory")
    assert profile_memory.main(["--config", "tiny", "--budget", "512MiB", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 of 140 settings fit 512.00 MiB per GPU (the budget; 537.60 MiB headroom kept free within it" in out
    # and what would make one fit: the budget the smallest peak needs, the headroom growing with it (it said nothing)
    need = re.fullmatch(r"none fits: the smallest peak, .*, needs --budget (\d+MiB) with the headroom; else a "
                        r"smaller --headroom or model.backbone", out.splitlines()[-1]).group(1)  # no 'to train 1'
    for budget, fit in ((need, 1), (f"{int(need[:-3]) - 1}MiB", 0)):
        assert profile_memory.main(["--config", "tiny", "--budget", budget, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert bool(got["settings_fit"]) == fit
        assert (got["fit_hint"] is None) == bool(fit)  # --json says what the table says (it had no hint)
        assert fit or f"needs --budget {need} with the headroom" in got["fit_hint"]
    assert profile_memory.main(["--config", "tiny", "--budget", "512MiB", "--headroom", "1MiB", "--top", "1",
                                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings_fit"] == 140 and out["plan"][0]["headroom"] == 2 ** 20


def test_fit_hint_in_gib_names_the_smallest_peak_and_a_budget_that_fits_it_and_no_less():
    """The hint's GiB form (t5-3b on 1 GPU at 1GiB: 'needs --budget 1.56GiB'), with the default headroom and a
    given one: the tiny plan above checks only the MiB form; a budget rounded down, or another setting's peak or
    name, passed it."""
    from vlscale.profiling.analytic import GiB, fmt_bytes
    from vlscale.profiling.planner import PlanOption, default_headroom, fit_hint

    for peak, headroom in ((int(1.234567 * GiB), None), (int(2.5 * GiB) + 1, 2 ** 20)):
        def room(budget):
            return default_headroom(budget) if headroom is None else headroom

        options = [PlanOption(stage, "none", True, 1, "bf16", p, False, 0.0, None, 1, headroom=room(GiB))
                   for stage, p in ((3, 2 * peak), (2, peak))]
        need = re.fullmatch(rf"none fits: the smallest peak, {fmt_bytes(peak)} \(zero2 offload=none ckpt=on mbs=1 "
                            r"bf16\), needs --budget (\d+\.\d\d)GiB with the headroom; else a smaller --headroom or "
                            r"model.backbone", fit_hint(options, GiB)).group(1)
        fit, less = parse_size(f"{need}GiB"), parse_size(f"{float(need) - 0.01:.2f}GiB")
        assert peak + room(fit) <= fit and peak + room(less) > less, need


def test_launcher_write_config_keeps_the_command_lines_overrides(capsys, launcher, tmp_path, monkeypatch):
    """The train command --write-config prints (and --json's "written") carries the overrides the plan was made
    for (here another backbone and adapter size), the plan's own replacing those it sets: it printed the
    plan's alone, so the printed command trained the preset's model, not the one planned."""
    profile_memory = launcher("profile_memory")
    argv = ["--config", "tiny", "--world-size", "2", "--budget", "1GiB", "--write-config", str(tmp_path / "ds.json"),
            "model.backbone=tiny-bart", "peft.reduction_factor=8", "train.micro_batch_size =8", "data.tasks=[vqa, gqa]"]
    assert profile_memory.main(argv + ["--json"]) == 0  # (a key with blanks around it is the config's key too)
    written = json.loads(capsys.readouterr().out)["written"]["overrides"]
    assert written[:3] == ["model.backbone=tiny-bart", "peft.reduction_factor=8", "data.tasks=[vqa, gqa]"]
    assert sum(o.startswith("train.micro_batch_size=") for o in written) == 1 and len(written) == 3 + 5
    run = load_config("tiny", written)
    assert (run.model.backbone, run.peft.reduction_factor, run.data.tasks) == ("tiny-bart", 8, ["vqa", "gqa"])
    assert run.train.micro_batch_size * run.train.gradient_accumulation_steps * 2 == 16
    monkeypatch.chdir(tmp_path)  # launched from another folder: train.py as it runs from there
    assert profile_memory.main(argv) == 0
    command = capsys.readouterr().out.split("train with: ")[1]
    assert command.startswith(f"deepspeed --num_gpus 2 {Path(profile_memory.__file__).resolve().parent / 'train.py'} ")
    assert "--config tiny model.backbone=tiny-bart peft.reduction_factor=8 'data.tasks=[vqa, gqa]' train.zero_stage=" \
        in command


def test_launcher_write_config_leaves_a_global_batchs_accumulation_to_the_run(capsys, launcher, tmp_path):
    """With train.global_batch_size (the scale and paper presets) the written command pinned
    train.gradient_accumulation_steps for --world-size's ranks, so the same command on another number of GPUs
    (a resume on fewer, docs/scaling.md) was refused as conflicting with the global batch; the run derives it."""
    from vlscale.engine.deepspeed_config import global_batch_size, resolve_batch

    argv = ["--config", "tiny", "--world-size", "2", "--budget", "1GiB", "--write-config", str(tmp_path / "ds.json"),
            "train.global_batch_size=32", "--json"]
    assert launcher("profile_memory").main(argv) == 0
    written = json.loads(capsys.readouterr().out)["written"]["overrides"]
    assert not [o for o in written if o.startswith("train.gradient_accumulation_steps=")], written
    run = load_config("tiny", written)
    for ranks in (1, 2):  # (micro-batch 16 x 4 ranks is more than 32, refused as it should be)
        assert global_batch_size(resolve_batch(run, ranks), ranks) == 32


def test_launcher_plans_fp16_where_the_run_asks_for_it(capsys, launcher, tmp_path):
    """train.precision=fp16 (a GPU without bf16: V100, T4) is planned as fp16 or fp32: the planner searched
    bf16 and fp32 alone and wrote train.precision=bf16 into the command it printed, which such a GPU cannot run."""
    profile_memory = launcher("profile_memory")
    argv = ["--config", "tiny", "--budget", "1GiB", "--headroom", "256MiB", "--json", "--top", "100"]
    assert profile_memory.main(argv + ["train.precision=fp16", "--write-config", str(tmp_path / "ds.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {row["precision"] for row in out["plan"]} == {"fp16", "fp32"}, out["plan"][:3]
    assert "train.precision=fp16" in out["written"]["overrides"]
    assert profile_memory.main(argv) == 0  # otherwise bf16 and fp32, as before
    assert {row["precision"] for row in json.loads(capsys.readouterr().out)["plan"]} == {"bf16", "fp32"}


def test_paths_of_the_launchers_take_a_home_folder(launcher, monkeypatch, tmp_path, capsys):
    """--write-config=~/ds.json reaches Python unexpanded (bash expands NAME=~ words only): it wrote ./~/ds.json and
    printed 'train with: ... --deepspeed ~/ds.json', a file the shell reads in the home folder, where none was."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = launcher("profile_memory").parse_args(["--write-config=~/ds.json", "--plot=~/b.png", "--budget", "1GiB"])
    assert (args.write_config, args.plot) == (str(tmp_path / "ds.json"), str(tmp_path / "b.png"))
    # the output folders of the others: each wrote a folder named '~' in the working directory, silently (the feature
    # cache then not where data.feature_cache=~/cache, expanded, looks)
    for name, argv in (("evaluate", ["--adapter", "a"]), ("extract_features", ["--synthetic"]),
                       ("replicate", ["--table", "1"])):
        assert str(launcher(name).parse_args([*argv, "--out=~/out"]).out) == str(tmp_path / "out"), name
    # and the paths they read: '~/run/adapter does not exist', of a folder that is there
    home = str(tmp_path / "x")
    for name, argv, key in (("evaluate", ["--adapter=~/x"], "adapter"),
                            ("predict", ["--adapter=~/x", "--task", "vqa", "--video=~/x"], "video"),
                            ("predict", ["--adapter=~/x", "--task", "vqa", "--image=~/x"], "image"),
                            ("extract_features", ["--images=~/x", "--out", "o", "--vision", "RN50"], "images")):
        args = vars(launcher(name).parse_args(argv))
        assert str(args[key]) in (home, str([home])) and args.get("adapter", home) == home, (name, args)
    assert launcher("inspect_model").main(["--adapter=~/x"]) == 2
    assert f"error: {home} does not exist" in capsys.readouterr().err


def test_the_out_of_memory_command_names_the_planner_as_it_runs_from_another_folder(launcher, monkeypatch, tmp_path):
    """train.py's out-of-memory 'python launchers/profile_memory.py ...' named a file not there when launched from
    another folder; a launcher no checkout holds (an installed wheel) keeps launchers/<name>."""
    from vlscale.engine.distributed import DistInfo
    from vlscale.files import launcher_path

    here = Path(launcher("train").__file__).resolve().parent
    monkeypatch.chdir(tmp_path)
    assert launcher_path("nope.py") == "launchers/nope.py"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 2 ** 34))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    args = argparse.Namespace(config="tiny", deepspeed=None, overrides=[])
    dist = DistInfo(0, 1, 0, torch.device("cuda:0"), "cuda", "nccl")
    assert launcher("train").gpu_plan(args, dist)[2] == (f"python {here / 'profile_memory.py'} --config tiny "
                                                        f"--world-size 1 --budget 1.0GiB")


@pytest.mark.parametrize("argv, words", [
    (["--deepspeed", "/nonexistent.json"], ["DeepSpeed config file '/nonexistent.json' does not exist"]),
    (["--write-config", "ds.json"], ["--write-config ds.json", "--budget"]),
    (["--steps", "0", "--measure"], ["--steps=0 must be >= 1"]),
    (["--budget", "0"], ["--budget='0' must be a positive size"]),
    (["--budget", "24"], ["--budget='24' is 24 bytes per GPU; give a unit, e.g. 24GiB"]),
    (["--budget", "1e6"], ["--budget='1e6' is 1000000 bytes per GPU; give a unit, e.g. 24GiB"]),  # e: no unit
    (["--budget", "48"], ["--budget='48' is 48 bytes per GPU; give a unit, e.g. 48GiB"]),  # plain digits: its own
    (["--top", "3"], ["--top=3 is how many of the planner's settings to show; it needs --budget"]),
    (["--zero-stage", "1", "train.zero_stage=3"], ["--zero-stage 1 and train.zero_stage=3 disagree"]),
    (["--budget", "1GiB", "--headroom", "2GiB"], ["--headroom 2GiB is not less than --budget 1GiB"]),
    (["--top", "-1", "--budget", "80GiB"], ["--top=-1 must be >= 1"]),
    (["model.backbone=t5-smal"], ["model.backbone='t5-smal'", "did you mean 't5-small'?"]),
    (["--budget", "1e400"], ["memory size '1e400' is not a finite size"]),
    (["--steps", "5"], ["--steps=5 is the length of the measured run; it needs --measure"]),
    (["--budget", "80GiB", "--write-config", "a_file/ds.json"],  # it said "File exists", after the plan
     ["--write-config a_file/ds.json: cannot write it (a_file is a file, not a folder)"]),
    (["--headroom", "2GiB"], ["--headroom 2GiB is what the planner keeps free within a budget; it needs --budget"]),
    (["--budget", ""], ["--budget: memory size '' is not understood"]),
    (["--budget", "24GiB", "--headroom", "abc"], ["--headroom: memory size 'abc' is not understood"]),
    (["--plot", "bars.txt"], ["--plot bars.txt: name a file matplotlib writes, ending in", ".png", ".svg"]),
    (["--plot", "a_file/bars.png"], ["--plot a_file/bars.png: cannot write it"]),
    (["--measure", "--plot", "a_file/bars.png"], ["--plot a_file/bars.png: cannot write it (a_file is a file, "
                                                  "not a folder)"]),
])
def test_launcher_refuses_bad_arguments(capsys, launcher, monkeypatch, tmp_path, argv, words):
    """Each was accepted before: a missing --deepspeed fell back to a built-in dict, --write-config without
    --budget wrote nothing and said nothing, --steps 0 "measured" nothing, --top -1 printed every row;
    --headroom without --budget and an empty --budget (an unset shell variable) were ignored silently;
    --plot into a path it could not write ended in a traceback after the prediction (and any measured run), then
    in one line after them."""
    from vlscale.profiling import measure

    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert launcher("profile_memory").main(["--config", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not started
    for w in words:
        assert w in err
    assert not (tmp_path / "ds.json").exists()


def test_launcher_refuses_a_measured_nvme_run_without_async_io(capsys, launcher, monkeypatch, tmp_path):
    """--measure with ZeRO-Infinity on a machine without libaio is refused before any rank starts, as
    launchers/train.py refuses it: the measured run died inside deepspeed.initialize with a traceback per rank
    ("Unable to JIT load the async_io op"). The prediction alone needs no async_io."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from vlscale.profiling import measure

    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    argv = ["--config", "tiny", "--deepspeed", "ds_configs/zero3_nvme.json"]
    assert launcher("profile_memory").main(argv + ["--measure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --measure: ") and err.count("\n") == 1 and not started
    assert "zero3_nvme.json: zero_optimization.offload_optimizer.device='nvme' (ZeRO-Infinity)" in err
    assert "libaio" in err
    assert launcher("profile_memory").main(argv) == 0


def test_launcher_refuses_a_measured_run_on_another_device_than_predicted(capsys, launcher, monkeypatch):
    """--measure --device cuda on a machine without a GPU compared a GPU prediction with the CPU run's
    figures: with zero3_offload.json params/grads/optimizer 0 B predicted against 2.27 MiB measured, -100%."""
    from vlscale.profiling import measure

    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile_memory = launcher("profile_memory")
    assert profile_memory.main(["--config", "tiny", "--measure", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda with --measure: the measured run trains on cpu") and not started
    assert err.count("\n") == 1
    assert profile_memory.main(["--config", "tiny", "--device", "cuda"]) == 0  # a prediction alone: any device


def test_measure_refuses_bad_environment_variables_before_the_run(capsys, launcher, monkeypatch):
    """--measure with a VLSCALE_DIST_TIMEOUT that is no number (or a bad VLSCALE_ADAPTER_BACKEND or VLSCALE_CPU_FP16)
    started the measured ranks, each ending in a traceback, then torchrun's failure report and a RuntimeError
    traceback."""
    from vlscale.profiling import measure

    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    for name, raw, words in (("VLSCALE_DIST_TIMEOUT", "5min", "VLSCALE_DIST_TIMEOUT='5min' must be a number"),
                             ("VLSCALE_ADAPTER_BACKEND", "fast", "VLSCALE_ADAPTER_BACKEND='fast' is not valid"),
                             ("VLSCALE_CPU_FP16", "yes", "VLSCALE_CPU_FP16='yes' must be 0 or 1")):
        with monkeypatch.context() as m:
            m.setenv(name, raw)
            assert launcher("profile_memory").main(["--config", "tiny", "--measure"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and err.count("\n") == 1 and not started


def test_launcher_reads_a_relative_deepspeed_file_from_the_repo_root(capsys, launcher, monkeypatch, tmp_path):
    """As launchers/train.py: ds_configs/zero2.json works from any directory (it was silently replaced by
    the built-in dict, at ZeRO-3, when run from elsewhere)."""
    monkeypatch.chdir(tmp_path)
    assert launcher("profile_memory").main(["--config", "tiny", "--deepspeed", "ds_configs/zero2.json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"]["settings"]["zero_stage"] == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_profiler_and_trainer_take_the_same_default_deepspeed_file(stage, launcher, monkeypatch, tmp_path):
    """Without --deepspeed (nor train.deepspeed) the profiler predicted from ds_configs/zero2.json at
    train.zero_stage 0-2 while launchers/train.py trained zero3.json: two rules for one default. The DeepSpeed
    dict train.py builds (its main, up to build_deepspeed_config: once to check it before start-up, once after) is
    the one resolve_ds_config predicts from."""
    import vlscale.engine.deepspeed_config as dsc
    import vlscale.engine.distributed as distributed

    class Built(Exception):
        pass

    overrides = [f"train.zero_stage={stage}", f"output_dir={tmp_path}"]
    predicted_from = resolve_ds_config(load_config("tiny", overrides), 1, None, device_type="cpu")
    taken, build = [], dsc.build_deepspeed_config

    def record(*args, **kwargs):
        taken.append(build(*args, **kwargs))
        raise Built  # nothing trains

    monkeypatch.setattr(dsc, "build_deepspeed_config", record)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(0, 1, 0, torch.device("cpu"), "cpu", "gloo"))
    assert launcher("train").main(["--config", "tiny", *overrides]) == 1 and len(taken) == 2  # before start-up, after
    assert predicted_from == taken[0] == taken[1]


def test_resolve_ds_config_builds_the_file_as_the_run_does_or_refuses_it(monkeypatch, tmp_path):
    """The Python API (resolve_ds_config, plan) finds a relative file as launchers/train.py does and refuses a
    missing one: both fell back to a built-in {"stage": 3} dict, so zero3_offload.json from another directory
    was planned without its offload, and a mistyped name planned a run nobody would train."""
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError
    from vlscale.profiling.planner import plan

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny")
    z = resolve_ds_config(cfg, 2, "ds_configs/zero3_offload.json")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    for call in (lambda: resolve_ds_config(cfg, 2, "zero3_ofload.json"),
                 lambda: plan(cfg, "1GiB", 2, ds_file="zero3_ofload.json")):
        with pytest.raises(DeepSpeedConfigError, match="zero3_ofload.json' does not exist"):
            call()


def test_inspect_model_counts_the_model_the_trainer_builds(capsys, launcher):
    """The trainer sizes the vocabulary by the tokenizer (the synthetic world's 721 tokens for tiny backbones),
    not the registry's 1100: inspect_model counts the same model."""
    from vlscale.data import build_tokenizer
    from vlscale.engine.trainer import build_model_for_run
    from vlscale.peft.trainable import count_parameters

    for overrides in ([], ["model.backbone=tiny-bart", "model.extra_special_tokens=3"]):
        cfg = load_config("tiny", overrides)
        model, _ = build_model_for_run(cfg, {"zero_optimization": {"stage": 0}}, len(build_tokenizer(cfg)),
                                       torch.float32)
        trained = count_parameters(model)
        assert launcher("inspect_model").main(["--config", "tiny", *overrides, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["vocab_size"] == model.lm.get_input_embeddings().num_embeddings
        assert report["vocab_source"] == "the run's tokenizer"
        for key in ("trainable", "total", "total_without_vision"):
            assert report[key] == trained[key], key
    assert report["vocab_size"] == 721 + 3
    # a hub backbone's tokenizer is not loaded offline: the registry's vocabulary, said so
    assert launcher("inspect_model").main(["--config", "tiny", "model.backbone=t5-small"]) == 0
    assert "vocabulary 32,128 (the registry's 32,128; the tokenizer (t5-small) is not loaded offline" in \
        capsys.readouterr().out
    # a hub backbone with the synthetic tokenizer keeps the registry's larger embeddings: said so, where the
    # note blamed a model.backbone_path the run does not have
    assert launcher("inspect_model").main(["--config", "tiny", "model.backbone=t5-small", "model.tokenizer=synthetic"]) == 0
    assert "vocabulary 32,128 (t5-small's registry config; the run's tokenizer: 721)" in capsys.readouterr().out


def test_launcher_refuses_a_measured_run_with_more_ranks_than_gpus(capsys, launcher, monkeypatch):
    """--measure on a GPU starts its ranks on this machine, rank r on GPU r: more ranks than GPUs is refused
    before any starts (each rank past the last GPU failed at set_device, 'invalid device ordinal')."""
    from vlscale.profiling import measure

    profile_memory = launcher("profile_memory")
    started = []
    monkeypatch.setattr(measure, "measured_device_type", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.setattr(measure, "available_host_bytes", lambda: 2 ** 40)
    assert profile_memory.main(["--world-size", "4", "--measure", "--json"]) == 2
    err = capsys.readouterr().err
    assert "--world-size 4" in err and "it has 2" in err and not started
    assert profile_memory.main(["--world-size", "3", "--measure", "--json"]) == 2  # one rank more than GPUs
    err = capsys.readouterr().err
    assert "--world-size 3" in err and "it has 2" in err and not started
    assert profile_memory.main(["--world-size", "2", "--measure", "--json"]) == 0
    assert len(started) == 1


def test_planner_keeps_the_files_offload_settings(tmp_path, monkeypatch):
    """An option offloading to the device the file's block names keeps that block (zero3_nvme.json's 16 parameter
    buffers of 1e8 elements, its max_in_cpu): the planner replaced it with a bare {"device", "pin_memory"}, so
    its NVMe options were estimated with DeepSpeed's 5 buffers (host memory ~2.2 GB low on t5-3b) and
    --write-config wrote a file without the user's settings. Another device than the file's gets a fresh block."""
    from vlscale.profiling.planner import plan, write_ds_config

    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    nvme = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_nvme.json"
    cfg = load_config("paper/clip_t5_single_adapter", ["model.backbone=t5-3b", "train.global_batch_size=null",
                                                        "train.micro_batch_size=8", "train.zero_stage=3"])
    options = plan(cfg, "80GiB", 4, ds_file=str(nvme), stages=[3], micro_batches=[8], precisions=["bf16"],
                   checkpointing=[True], offloads=["opt_param_nvme", "opt_param_cpu"])
    by = {o.offload: o for o in options}
    direct = estimate_memory(cfg, 4, resolve_ds_config(cfg, 4, str(nvme), device_type="cuda"), device="cuda")
    assert by["opt_param_nvme"].estimate.host == direct.host
    written = write_ds_config(by["opt_param_nvme"], tmp_path / "nvme.json", ds_file=str(nvme))["zero_optimization"]
    assert (written["offload_param"]["buffer_count"], written["offload_optimizer"]["fast_init"]) == (16, False)
    assert write_ds_config(by["opt_param_cpu"], tmp_path / "cpu.json", ds_file=str(nvme))["zero_optimization"][
        "offload_param"] == {"device": "cpu", "pin_memory": True}


def test_zero3_parameter_offload_moves_the_partitions_and_keeps_the_persistent_parameters_on_the_device():
    """offload_param: each rank's partitions go to the host; the parameters ZeRO-3 keeps whole (persistence
    threshold) stay on the device and are not counted on the host as well."""
    inv = _inv([4, 3, 1000], [True, False, False])
    kw = dict(stage=3, param_persistence_threshold=5, model_persistence_threshold=5)
    on = engine_state(inv, ZeroSettings(**kw), 4, "fp32", "cuda")
    off = engine_state(inv, ZeroSettings(**kw, offload_param="cpu"), 4, "fp32", "cuda")
    assert on.persistent_params == off.persistent_params == 4 * 4 and on.params == (1 + 1 + 250) * 4 + 4 * 4
    assert off.params == off.persistent_params
    assert off.host - on.host == on.params - on.persistent_params == (1 + 1 + 250) * 4
    # on DeepSpeed's CPU accelerator partitions offloaded to "cpu" stay in its (host) memory, those on NVMe leave it
    cpu = engine_state(inv, ZeroSettings(**kw, offload_param="cpu"), 4, "fp32", "cpu")
    nvme = engine_state(inv, ZeroSettings(**kw, offload_param="nvme"), 4, "fp32", "cpu")
    assert cpu.params == on.params and nvme.params == nvme.persistent_params == 4 * 4


def test_launcher_relative_errors_and_peak_bars(launcher):
    """Measured beside predicted: each component's error is relative to the measured value, None where nothing
    was measured (0 or absent), the peak included; a bar's activations and grads are those live at the peak."""
    pm = launcher("profile_memory")
    pred = {"params": 150, "grads": 50, "optimizer": 10, "activations": 40, "buffers": 1, "peak": 300}
    meas = {"params": 100, "grads": 100, "optimizer": 0, "peak": 200}
    assert pm.rel_errors(pred, meas) == {"params": 0.5, "grads": -0.5, "optimizer": None, "peak": 0.5}
    assert pm.at_peak(pred, 7, None) == {**pred, "activations": 7}
    assert pm.at_peak(pred, None, 9) == {**pred, "grads": 9}
    assert pm.at_peak(pred, None, None) == pred


def test_launcher_predicts_the_analytic_estimate_of_its_arguments(capsys, launcher):
    """--json's "predicted" is estimate_memory's for the --world-size, the --zero-stage (over the DeepSpeed
    file's) and, without --measure, a GPU; "plan" holds --top rows (15 by default)."""
    from vlscale.engine.deepspeed_config import resolve_batch

    pm = launcher("profile_memory")
    assert pm.main(["--config", "tiny", "--world-size", "2", "--zero-stage", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = resolve_batch(load_config("tiny", ["train.zero_stage=2"]), 2)
    ds = resolve_ds_config(cfg, 2, None, device_type="cuda")
    assert ds["zero_optimization"]["stage"] == 2
    expected = json.loads(json.dumps(analytic.estimate_memory(cfg, 2, ds, device="cuda").to_dict(), default=str))
    assert out["predicted"] == expected
    assert out["predicted"]["settings"]["device"] == "cuda"
    for top, rows in ((["--top", "3"], 3), ([], 15)):
        assert pm.main(["--config", "tiny", "--budget", "1GiB", "--json", *top]) == 0
        assert len(json.loads(capsys.readouterr().out)["plan"]) == rows


def test_launcher_refuses_limits_at_their_edges(capsys, launcher, monkeypatch, tmp_path):
    """--headroom equal to --budget leaves nothing to fit in; a unitless budget under 64 MiB is a forgotten unit;
    --write-config with no setting that fits writes nothing and exits 1."""
    pm = launcher("profile_memory")
    assert pm.main(["--config", "tiny", "--budget", "1GiB", "--headroom", "1GiB"]) == 2
    assert "--headroom 1GiB is not less than --budget 1GiB" in capsys.readouterr().err
    assert pm.main(["--config", "tiny", "--budget", "1048576"]) == 2
    assert "--budget='1048576' is 1048576 bytes per GPU; give a unit" in capsys.readouterr().err
    assert pm.main(["--config", "tiny", "--budget", str(2 ** 26), "--top", "1"]) == 0  # 64 MiB: a byte count
    assert "settings fit 64.00 MiB per GPU" in capsys.readouterr().out
    ds = tmp_path / "ds.json"
    assert pm.main(["--config", "tiny", "--budget", "1KiB", "--headroom", "0", "--write-config", str(ds)]) == 1
    assert capsys.readouterr().err.startswith(f"error: no setting fits 1.00 KiB; nothing written to {ds} (none fits: "
                                              f"the smallest peak, ")
    assert not ds.exists()


def test_launcher_plans_and_writes_from_its_deepspeed_file_for_its_device(capsys, launcher, tmp_path):
    """--budget with --deepspeed FILE plans from FILE (the file train.py will take) and --write-config writes FILE's
    settings with the chosen stage and offload; --device cpu plans for the CPU accelerator (where what is offloaded
    to cpu stays in the peak). Untested until now: planning and writing from the default zero3.json passed."""
    from vlscale.engine.deepspeed_config import resolve_batch
    from vlscale.profiling.planner import plan

    own = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    own["zero_optimization"]["reduce_bucket_size"] = 12_345_678
    (tmp_path / "own.json").write_text(json.dumps(own))
    pm = launcher("profile_memory")
    cfg = resolve_batch(load_config("tiny"), 2)
    written = tmp_path / "ds.json"

    def rows(*argv):
        assert pm.main(["--config", "tiny", "--world-size", "2", "--budget", "1GiB", "--top", "200", "--json",
                        *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        return [(r["zero_stage"], r["offload"], r["micro_batch_size"], r["peak"]) for r in out["plan"]]

    def planned(**kw):
        return [(o.zero_stage, o.offload, o.micro_batch_size, o.peak) for o in plan(cfg, "1GiB", 2, **kw)]

    from_own = rows("--deepspeed", str(tmp_path / "own.json"), "--write-config", str(written))
    assert pm.main(["--config", "tiny", "--world-size", "2", "--budget", "1GiB", "--headroom", "256MiB", "--json",
                    "--deepspeed", str(tmp_path / "own.json"), "--write-config", str(written)]) == 0
    out = json.loads(capsys.readouterr().out)  # the budget as given, the headroom kept within it
    assert (out["written"]["deepspeed"], out["budget"], out["plan"][0]["headroom"]) == (str(written), 2 ** 30, 2 ** 28)
    assert pm.main(["--config", "tiny", "--world-size", "2", "--budget", "1GiB", "--deepspeed",
                    str(tmp_path / "own.json"), "--write-config", str(written)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]  # the command, not 'add --write-config' after it
    assert last.startswith(f"wrote {written}; train with: deepspeed --num_gpus 2 launchers/train.py --deepspeed "
                           f"{written} --config tiny train."), last
    default = planned()  # once: a plan searches 140 settings
    assert from_own == planned(ds_file=str(tmp_path / "own.json")) != default
    z = json.loads(written.read_text())["zero_optimization"]
    assert z["reduce_bucket_size"] == 12_345_678 and z["stage"] == from_own[0][0]
    on_cpu = rows("--device", "cpu")
    assert on_cpu == planned(device="cpu") != default


def test_launcher_takes_agreeing_stages_and_refuses_a_batch_no_micro_batch_keeps(capsys, launcher, monkeypatch):
    """--zero-stage S with train.zero_stage=S on the same line is one request, not a disagreement; --budget plans a
    micro-batch that keeps train.global_batch_size, but where the ranks do not divide that batch there is none and
    it is the config's one-line refusal (not a traceback from planning micro-batch None). --measure without --device
    on a machine without a GPU predicts for the CPU accelerator the measured run trains on."""
    from vlscale.profiling import measure

    pm = launcher("profile_memory")
    started = []
    monkeypatch.setattr(measure, "measure_memory", lambda *a, **k: started.append(a) or {"peak": 1})
    monkeypatch.setattr(measure, "measured_device_type", lambda: "cpu")
    assert pm.main(["--config", "tiny", "--measure", "--json"]) == 0 and len(started) == 1
    assert json.loads(capsys.readouterr().out)["predicted"]["settings"]["device"] == "cpu"
    assert pm.main(["--config", "tiny", "--zero-stage", "2", "train.zero_stage=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"]["settings"]["zero_stage"] == 2
    assert pm.main(["--config", "tiny", "train.global_batch_size=30", "--world-size", "4", "--budget", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.global_batch_size=30 is not a multiple of") and err.count("\n") == 1, err


def test_zero_stage0_and_1_hold_gradients_in_the_model_dtype_and_whole_under_accumulation():
    """Stage 0's param.grad is in the model's dtype (bf16: 2 bytes an element; its fp32 copy is the step's). With
    accumulation the gradients of the micro-batches before the boundary are held from the next forward on: at
    ZeRO-0/1 every trainable parameter's whole .grad (reduced only at the boundary), at ZeRO-2 the partition."""
    inv = _inv([10, 7, 5, 1000], [True, True, False, False], [2, 1, 2, 2])
    assert engine_state(inv, ZeroSettings(stage=0), 4, "bf16", "cpu").grads == 17 * 2
    held = {}
    for stage in (1, 2):
        for accumulation in (1, 2):
            cfg = load_config("tiny", SMALL + [f"train.zero_stage={stage}", "train.global_batch_size=null",
                                               f"train.gradient_accumulation_steps={accumulation}"])
            ds = resolve_ds_config(cfg, 2, None, device_type="cpu")
            ds["zero_optimization"]["contiguous_gradients"] = False  # no ZeRO-1 reduce buckets held as well
            held[stage, accumulation] = estimate_memory(cfg, 2, ds, device="cpu")
    inv = analytic.parameter_inventory(cfg)
    b = analytic.PRECISION_BYTES[cfg.train.precision]
    whole = held[1, 2].phases["vision_forward"] - held[1, 1].phases["vision_forward"]
    assert whole == inv.n_trainable * b
    partition = held[2, 2].phases["vision_forward"] - held[2, 1].phases["vision_forward"]
    assert partition == held[2, 2].components["grads"] < whole


def test_the_printed_components_add_up_to_the_peak():
    """profile_memory.py prints params, optimizer, the activations and gradients live at the peak and the buffers:
    together they are the peak, also when the peak holds gradients (backward end, the optimizer step)."""
    cfg = load_config("tiny", SMALL + ["train.zero_stage=2", "peft.train_lm=true"])
    est = estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, None, device_type="cpu"), device="cpu")
    c = est.components
    assert est.at_peak["grads"] > 0, est.peak_phase
    assert c["params"] + c["optimizer"] + est.at_peak["activations"] + est.at_peak["grads"] + c["buffers"] == c["peak"]


def test_zero3_cpu_optimizer_offload_on_the_cpu_accelerator_holds_the_fp32_master_gradients_at_backwards_end():
    """ZeRO-3 with offload_optimizer cpu on DeepSpeed's CPU accelerator: the host is the device, so at the end of
    backward it holds beside the model-dtype gradient partition the fp32 gradient of each master partition."""
    cfg = load_config("tiny", SMALL + ["train.zero_stage=3", "peft.train_lm=true"])
    ds = resolve_ds_config(cfg, 2, None, device_type="cpu")
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    est = estimate_memory(cfg, 2, ds, device="cpu", loss_mode="model")  # no model output kept past backward
    c, d = est.components, est.detail
    fp32_grads = c["grads"] // analytic.PRECISION_BYTES[cfg.train.precision] * 4
    base = c["params"] + c["optimizer"] + d["comm_buckets"] + d["batch"]
    assert est.phases["backward_end"] == base + c["grads"] + fp32_grads > base + c["grads"]


def test_zero3_encodes_the_images_with_clip_gathered_beside_a_flat_all_gather_buffer():
    """ZeRO-3 on 2 ranks with CLIP run on the fly: while the images are encoded the whole tower is gathered onto
    the device, and the flat all-gather buffer its parameters arrive through is there beside it."""
    cfg = load_config("tiny", SMALL + ["train.zero_stage=3"])
    est = estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, None, device_type="cuda"))
    c, d = est.components, est.detail
    b = analytic.PRECISION_BYTES[cfg.train.precision]
    assert d["vision_params"] and d["zero3_gather_transient"] > 0
    held = c["params"] + c["optimizer"] + d["comm_buckets"] + d["batch"] + c["grads"] + d["vision_transient"]
    assert est.phases["vision_forward"] == held + d["vision_params"] * b + d["zero3_gather_transient"]


def test_zero3_checkpointed_recompute_holds_the_unit_backward_gathers_when_it_is_the_larger():
    """Gradient checkpointing under ZeRO-3: the last layer's recompute runs with the parameters backward has
    gathered for it, the larger of what forward kept gathered and what backward gathers (here, reuse 0, the unit
    fetched on demand): backward_recompute is backward_gather plus the recomputed block."""
    cfg = load_config("tiny", ["train.deepspeed=ds_configs/zero3_offload.json", "model.backbone=tiny-t5-wide",
                               "train.gradient_checkpointing=true"])
    ds = resolve_ds_config(cfg, 2, None, device_type="cuda")
    ds["zero_optimization"].update(stage3_max_live_parameters=1_000_000, stage3_max_reuse_distance=0)
    est = estimate_memory(cfg, 2, ds)
    d = est.detail
    assert d["zero3_gathered_backward"] > d["zero3_gathered"] and d["block_recompute_peak"] > 0
    assert est.phases["backward_recompute"] - est.phases["backward_gather"] == d["block_recompute_peak"]


def test_the_python_estimators_take_what_the_launcher_takes_and_name_what_they_do_not(tmp_path, monkeypatch):
    """From Python: ``estimate_memory(cfg, 2, "ds_configs/zero2.json")`` (a file, as ``plan``'s ``ds_file``) was
    "'str' object has no attribute 'get'"; a preset's name for the RunConfig "'str' has no attribute 'train'";
    ``parse_size(-1)`` was -1 bytes."""
    from vlscale.engine.deepspeed_config import DeepSpeedConfigError
    from vlscale.profiling.analytic import estimate_checkpoint
    from vlscale.profiling.planner import plan

    cfg = load_config("tiny")
    zero2 = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json")
    by_file = estimate_memory(cfg, 2, zero2, device="cpu")
    assert by_file == estimate_memory(cfg, 2, resolve_ds_config(cfg, 2, zero2, device_type="cpu"), device="cpu")
    assert by_file != estimate_memory(cfg, 2, device="cpu")  # the file was read (the default is zero3.json's)
    assert estimate_memory(cfg, 2, Path(zero2), device="cpu") == by_file  # a Path too (os.PathLike)
    disk = estimate_checkpoint(cfg, 2, Path(zero2))
    assert disk == estimate_checkpoint(cfg, 2, resolve_ds_config(cfg, 2, zero2)) != estimate_checkpoint(cfg, 2)
    fp16 = load_config("tiny", {"train.precision": "fp16"})
    monkeypatch.delenv("VLSCALE_CPU_FP16", raising=False)
    estimate_checkpoint(fp16, 2)  # a GPU's checkpoint; a CPU run's memory is refused as the launcher refuses it
    with pytest.raises(DeepSpeedConfigError, match="fp16 on the CPU"):
        estimate_memory(fp16, 1, device="cpu")
    for call in (lambda: estimate_memory("tiny"), lambda: estimate_checkpoint("tiny"), lambda: plan("tiny", "1GiB")):
        with pytest.raises(TypeError, match=r"takes a RunConfig .*got str 'tiny'"):
            call()
    with pytest.raises(TypeError, match=r"ds_config .* a DeepSpeed dict or a file's path, got list"):
        estimate_memory(cfg, 1, [])
    for size in (-1, -0.5, True):
        with pytest.raises(ValueError, match=r"memory size .* (negative|not a size)"):
            parse_size(size)
    assert parse_size(0) == parse_size(0.0) == parse_size("0") == 0  # as the text "0"
