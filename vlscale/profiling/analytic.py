"""Analytic per-rank memory of a training run, from the run config and its DeepSpeed settings.

Unlike DeepSpeed's estimators (every parameter trainable, no activations; DeepSpeed #5304) and
accelerate's ``estimate-memory`` (no activations), this model knows what trains and what autograd
keeps. Per rank, in bytes, for ZeRO stages 0-3, any world size, CPU/NVMe offload:

    params      frozen + trainable parameters in the model's precision (ZeRO-3: each parameter's
                ceil(numel / world) partition; stage 1/2: the trainable flat group padded to 2*world)
    grads       gradient buffers of the *trainable* parameters only (stage 0: param.grad; 1/2: the
                gradient partition; 3: the flat gradient-partition buffer)
    optimizer   AdamW's two fp32 moments + the fp32 master copy DeepSpeed keeps, trainable only,
                partitioned over ranks from stage 1 on
    activations what autograd saves for backward during one micro-batch forward, from the
                backbone's real shapes, traced op by op (:class:`_Tape`): a frozen linear layer
                keeps its input only when its weight trains (or under ZeRO-3, whose
                memory-efficient linear always keeps it), layers before the first trainable
                parameter keep nothing, dropout keeps its mask, SDPA keeps q/k/v/out (+ the math
                path's attention matrices when attention dropout is on), gradient checkpointing
                (non-reentrant, per block) keeps only each block's inputs
    buffers     transients live at the peak: the batch, logits and the loss's log-probabilities
                (and their gradients at the start of backward), ZeRO-3's gathered and prefetched
                parameters, communication buckets, the optimizer step's fp32 gradient copy
    peak        the largest of the phases init / forward end / backward start / backward end /
                optimizer step (``peak_phase`` names it)

The parameter list comes from building the model on the ``meta`` device, so every registry
backbone (t5-11b, flan-t5-xxl with ViT-L-14 ...) is estimated offline in seconds. Sequence lengths
are the worst case of the config: ``data.max_input_length`` text tokens + visual tokens (+ prompts)
in the encoder, ``data.max_target_length`` in the decoder; ``padded=True`` assumes a padded batch
(attention masks per example), as the collator produces.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from vlscale.config import (ADAPTER_METHODS, DTYPE_NAMES, PRECISION_BYTES, RunConfig,
                            check_run_config)

GiB = 1024 ** 3
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9,
          "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}


# ----------------------------------------------------------------------------- sizes

def parse_size(text) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"``, ``1e9`` -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, bool):
        raise ValueError(f"memory size {text!r} is not a size; write e.g. 24GiB, 80GB, 512MiB or a byte count")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"memory size {text!r} is negative; write a positive size, e.g. 24GiB")
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE]\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if str(text).strip().startswith("-"):
            raise ValueError(f"memory size {text!r} is negative; write a positive size, e.g. 24GiB")
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {text!r} is not understood; write e.g. 24GiB, 80GB, 512MiB or a byte count")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"memory size {text!r} is not a finite size")
    return int(value)


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- DeepSpeed settings

@dataclass
class ZeroSettings:
    """The DeepSpeed knobs memory depends on (defaults are DeepSpeed's own)."""

    stage: int = 0
    offload_optimizer: str = "none"
    """``none``, ``cpu`` or ``nvme``: fp32 master weights, Adam moments (and stage 3's gradient
    partitions) live off the GPU."""
    offload_param: str = "none"
    """Stage 3 only: the parameter partitions live on ``cpu`` / ``nvme``; the GPU holds what is gathered."""
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 2 ** 63 - 1
    sub_group_size: int = 1_000_000_000
    contiguous_gradients: bool = True
    overlap_comm: Optional[bool] = None
    memory_efficient_linear: bool = True
    # ZeRO-Infinity (``nvme`` offload): the pinned host buffers DeepSpeed swaps through
    param_buffer_count: int = 5
    """``offload_param.buffer_count``: pinned buffers the parameter swapper reads partitions into."""
    param_buffer_size: int = 100_000_000
    """``offload_param.buffer_size``: elements per buffer, in the model's dtype."""
    max_in_cpu: int = 1_000_000_000
    """``offload_param.max_in_cpu``: elements of the *trainable* partitions kept in host memory, not on NVMe."""
    optimizer_buffer_count: int = 4
    """``offload_optimizer.buffer_count``: fp32 buffers of the largest optimizer sub-group partition."""
    aio_block_size: int = 1_048_576
    aio_intra_op_parallelism: int = 1

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage={self.stage!r} must be 0, 1, 2 or 3")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) not in ("none", "cpu", "nvme"):
                raise ValueError(f"zero_optimization.{key}.device={getattr(self, key)!r}: use none, cpu or nvme")
        if self.offload_optimizer != "none" and self.stage < 2:
            raise ValueError(f"zero_optimization.offload_optimizer needs stage 2 or 3, not {self.stage}")
        if self.offload_param != "none" and self.stage < 3:
            raise ValueError(f"zero_optimization.offload_param needs stage 3, not {self.stage}")
        if self.overlap_comm is None:
            self.overlap_comm = self.stage == 3

    @classmethod
    def from_ds_config(cls, ds: Optional[dict], stage: Optional[int] = None) -> "ZeroSettings":
        """From a (resolved or not) DeepSpeed dict; ``"auto"`` values fall back to the defaults."""
        z = dict((ds or {}).get("zero_optimization") or {})
        out = {}

        def num(*keys):
            for k in keys:
                v = z.get(k)
                if v is not None and v != "auto":
                    return int(float(v))
            return None

        for attr, keys in (("reduce_bucket_size", ("reduce_bucket_size",)),
                           ("allgather_bucket_size", ("allgather_bucket_size",)),
                           ("prefetch_bucket_size", ("stage3_prefetch_bucket_size", "prefetch_bucket_size")),
                           ("max_live_parameters", ("stage3_max_live_parameters", "max_live_parameters")),
                           ("max_reuse_distance", ("stage3_max_reuse_distance", "max_reuse_distance")),
                           ("param_persistence_threshold", ("stage3_param_persistence_threshold",
                                                            "param_persistence_threshold")),
                           ("model_persistence_threshold", ("stage3_model_persistence_threshold",
                                                            "model_persistence_threshold")),
                           ("sub_group_size", ("sub_group_size",))):
            v = num(*keys)
            if v is not None:
                out[attr] = v
        for attr in ("contiguous_gradients", "overlap_comm", "memory_efficient_linear"):
            if isinstance(z.get(attr), bool):
                out[attr] = z[attr]
        for key in ("offload_optimizer", "offload_param"):
            block = z.get(key)
            if isinstance(block, dict) and block.get("device") not in (None, "none"):
                out[key] = block["device"]
        for attr, block, key in (("param_buffer_count", z.get("offload_param"), "buffer_count"),
                                 ("param_buffer_size", z.get("offload_param"), "buffer_size"),
                                 ("max_in_cpu", z.get("offload_param"), "max_in_cpu"),
                                 ("optimizer_buffer_count", z.get("offload_optimizer"), "buffer_count"),
                                 ("aio_block_size", (ds or {}).get("aio"), "block_size"),
                                 ("aio_intra_op_parallelism", (ds or {}).get("aio"), "intra_op_parallelism")):
            if isinstance(block, dict) and block.get(key) not in (None, "auto"):
                out[attr] = int(float(block[key]))
        st = stage if stage is not None else z.get("stage", 0)
        out["stage"] = int(st) if st != "auto" else 0
        return cls(**out)


# The DeepSpeed settings (0.19.8) that change memory and that the estimate does not model: (key, the values
# it holds for, the ZeRO stages DeepSpeed applies the key at (None: all), what the key changes). What it
# models is ZeroSettings' fields (with the precision, the optimizer and the run config); the other keys
# DeepSpeed reads change no tensor the estimate counts (docs/scaling.md lists them). estimate_memory refuses
# a run that sets one of these to another value rather than predict it as if the key were absent.
# ``None`` as the values: the run's own precision; ``()``: absent only.
UNMODELLED_SETTINGS = (
    ("zero_optimization.zero_quantized_weights", (False,), (3,), "ZeRO++ all-gathers int8 weights (its buffers)"),
    ("zero_optimization.zero_quantized_nontrainable_weights", (False,), (3,), "frozen weights held in int8"),
    ("zero_optimization.zero_quantized_gradients", (False,), (3,), "ZeRO++ reduces int8 gradients (its buffers)"),
    ("zero_optimization.zero_hpz_partition_size", (1,), (3,), "ZeRO++ keeps a second, node-local partition"),
    ("zero_optimization.stage3_module_granularity_threshold", (0,), (3,), "fine-grained modules gathered as one unit"),
    ("zero_optimization.module_granularity_threshold", (0,), (3,), "fine-grained modules gathered as one unit"),
    ("zero_optimization.stage3_use_all_reduce_for_fetch_params", (False,), (3,), "gathers through a full-size all-reduce"),
    ("zero_optimization.use_all_reduce_for_fetch_params", (False,), (3,), "gathers through a full-size all-reduce"),
    ("zero_optimization.stage3_allgather_sequential", (False,), (3,), "gathers with no flat all-gather buffer"),
    ("zero_optimization.allgather_sequential", (False,), (3,), "gathers with no flat all-gather buffer"),
    ("zero_optimization.leaf_module", ({},), (3,), "other gathering units (train.zero3_leaf_layers sets the LM's)"),
    ("zero_optimization.zenflow", (), None, "ZenFlow's optimizer and its gradient copies"),
    ("zero_optimization.offload_optimizer.super_offload", (False,), (3,), "SuperOffload's optimizer"),
    ("zero_optimization.offload_optimizer.fast_init", (False,), (3,), "another NVMe optimizer set-up"),
    ("zero_optimization.round_robin_gradients", (False,), (1, 2), "gradient partitions reordered over the ranks"),
    ("zero_optimization.parameter_alignment", (False,), (1, 2), "flat buffers padded per parameter"),
    ("bf16.bf16_master_weights_and_grads", (False,), None, "bf16 master weights and gradients"),
    ("bf16.bf16_optimizer_states", (False,), None, "bf16 Adam moments"),
    ("fp16.fp16_master_weights_and_grads", (False,), None, "fp16 master weights and gradients"),
    ("fp16.auto_cast", (False,), None, "inputs cast to fp16"),
    ("data_types.grad_accum_dtype", None, None, "gradients accumulated in another dtype (ZeRO-1: BF16_Optimizer)"),
    ("communication_data_type", None, None, "reduce buckets and their casts in another dtype"),
    ("optimizer.params.amsgrad", (False,), None, "a third Adam moment"),
    ("optimizer.params.fused", (False,), None, "torch's fused AdamW and its temporaries"),
    ("optimizer.params.foreach", (), None, "torch AdamW's implementation chosen (the step's temporaries)"),
    ("tensor_parallel.autotp_size", (0, 1), None, "tensor-parallel weight shards"),
    ("sequence_parallel_size", (1,), None, "sequence-parallel activations"),
    ("hybrid_engine.enabled", (False,), None, "DeepSpeed-Chat's hybrid engine"),
    ("weight_quantization", (), None, "weights quantized at initialisation"),
)


def check_modelled(ds: Optional[dict], stage: int, precision: str) -> None:
    """Refuse (ValueError, one line) a DeepSpeed setting of :data:`UNMODELLED_SETTINGS` the run's ZeRO
    ``stage`` applies, set to a value the estimate does not model."""
    for key, ok, stages, what in UNMODELLED_SETTINGS:
        if stages is not None and stage not in stages:
            continue
        *path, last = key.split(".")
        block = ds or {}
        for part in path:
            block = block.get(part) if isinstance(block, dict) else None
        if not isinstance(block, dict) or last not in block or block[last] is None:
            continue
        if path and path[0] in ("bf16", "fp16") and not block.get("enabled"):
            continue  # the precision the run does not train in
        value = block[last]
        fine = DTYPE_NAMES.get(str(value).lower()) == precision if ok is None else value in ok
        if not fine:
            raise ValueError(f"{key}={value!r}: {what}, which the memory prediction does not model; remove the "
                             f"key{f' (or set it to {ok[0]!r})' if ok else ''} to predict without it "
                             f"(docs/scaling.md)")


# ----------------------------------------------------------------------------- parameters

@dataclass
class ParamInventory:
    """Every parameter of the model in module order (as DeepSpeed sees them), from a meta build."""

    names: list[str]
    numels: list[int]
    ndims: list[int]
    trainable: list[bool]
    groups: list[str]
    vocab_size: int
    buffers: list[tuple[int, int]] = field(default_factory=list)
    """The module's persistent buffers (CLIP's batch-norm statistics...): (numel, bytes per element,
    0 for a floating buffer, which takes the run's precision)."""
    tasks: tuple = ()
    """The run's tasks: each task's own PEFT weight sets form optimizer groups of their own."""
    split_peft: bool = False
    """``train.peft_lr`` is set: the PEFT weights form optimizer groups of their own."""
    decoding: list[bool] = field(default_factory=list)
    """Per parameter: ``generate`` uses it at each new token (:func:`vlscale.engine.gathered.decoding_parameters`:
    all but the LM's encoder and the visual side)."""

    def buffer_bytes(self, b: int) -> int:
        return sum(n * (size or b) for n, size in self.buffers)

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def n_trainable(self) -> int:
        return sum(n for n, t in zip(self.numels, self.trainable) if t)

    @property
    def decoding_params(self) -> int:
        return sum(n for n, d in zip(self.numels, self.decoding) if d)

    @property
    def vision_params(self) -> int:
        return sum(n for n, g in zip(self.numels, self.groups) if g == "vision")

    def optimizer_groups(self) -> list[list[int]]:
        """Trainable element counts per optimizer group, as the engine builds them
        (``vlscale.peft.trainable.optimizer_group_layout``: matrices then vectors, shared parameters
        first, then each task's own weight sets; module order inside each group)."""
        return [g for _, g in self.tagged_optimizer_groups()]

    def tagged_optimizer_groups(self) -> list[tuple]:
        """:meth:`optimizer_groups` with each group's task (None: shared by every task)."""
        from vlscale.peft.trainable import optimizer_group_layout

        tr = [i for i, t in enumerate(self.trainable) if t]
        layout = optimizer_group_layout([self.names[i] for i in tr], [self.ndims[i] for i in tr], self.tasks,
                                        self.split_peft)
        return [(task, [self.numels[tr[j]] for j in idx]) for task, _, _, idx in layout]


def default_vocab_size(cfg: RunConfig) -> int:
    """The tokenizer's length the model is built with (no network: registry vocab + extra tokens;
    tiny backbones: the shipped synthetic tokenizer)."""
    from vlscale.modeling.backbones import is_tiny, lm_config

    base = lm_config(cfg.model.backbone).vocab_size
    extra = cfg.model.extra_special_tokens
    if is_tiny(cfg.model.backbone):
        try:
            from vlscale.data.tokenizer import synthetic_tokenizer

            return len(synthetic_tokenizer()) + extra
        except Exception:  # noqa: BLE001 - tokenizer assets missing: the registry's tiny vocabulary
            return base + extra
    return base + extra


_INVENTORY_CACHE: dict[str, ParamInventory] = {}


def parameter_inventory(cfg: RunConfig, vocab_size: Optional[int] = None) -> ParamInventory:
    """Build the model on the meta device (seconds, no memory) and list its parameters.

    Cached per (model, peft, tasks, vocabulary, train.peft_lr set): the planner asks for many settings of
    one model.
    """
    import json

    from vlscale.engine.gathered import decoding_parameters
    from vlscale.modeling.vl_model import build_model
    from vlscale.peft.trainable import parameter_groups

    vocab = vocab_size or default_vocab_size(cfg)
    split_peft = cfg.train.peft_lr is not None
    key = json.dumps([asdict(cfg.model), asdict(cfg.peft), list(cfg.data.tasks), vocab, split_peft], sort_keys=True)
    if key in _INVENTORY_CACHE:
        return _INVENTORY_CACHE[key]
    meta_cfg = copy.deepcopy(cfg)
    meta_cfg.train.gradient_checkpointing = False
    model = build_model(meta_cfg, vocab_size=vocab, device="meta")
    group_of = {id(prm): group for group, params in parameter_groups(model).items() for _, prm in params}
    decoding = {id(prm) for prm in decoding_parameters(model)}
    names, numels, ndims, trainable, groups = [], [], [], [], []
    for name, prm in model.named_parameters():  # module order, shared parameters once
        names.append(name)
        numels.append(int(getattr(prm, "ds_numel", prm.numel())))
        ndims.append(len(getattr(prm, "ds_shape", prm.shape)))
        trainable.append(bool(prm.requires_grad))
        groups.append(group_of.get(id(prm), "lm"))
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(t.numel(), 0 if t.is_floating_point() else t.element_size())
               for name, t in model.state_dict(keep_vars=True).items() if name not in aliases]
    inv = ParamInventory(names, numels, ndims, trainable, groups,
                         int(model.lm.get_input_embeddings().num_embeddings), buffers, tuple(cfg.data.tasks),
                         split_peft, [id(prm) in decoding for _, prm in model.named_parameters()])
    _INVENTORY_CACHE[key] = inv
    return inv


# ----------------------------------------------------------------------------- shapes

@dataclass
class Shapes:
    """Everything the activation model needs about one micro-batch and the backbone."""

    family: str  # "t5" or "bart"
    batch: int
    enc_len: int
    dec_len: int
    d_model: int
    d_ff: int
    heads: int
    d_kv: int
    enc_layers: int
    dec_layers: int
    vocab: int
    act: str  # relu | gelu | gelu_new
    gated: bool
    dropout: float
    attn_dropout: float
    act_dropout: float
    tied_scale: bool  # T5 v1: decoder output scaled by d_model**-0.5 before the tied head
    visual_tokens: int  # per example (all images)
    feat_dim: int
    n_images: int
    n_prompts: int
    prompt_hidden: int
    text_len: int
    vision_on_the_fly: bool
    image_size: int
    vision_resnet: bool
    vision_tokens_per_image: int
    video: bool

    @property
    def inner(self) -> int:
        return self.heads * self.d_kv


def run_shapes(cfg: RunConfig, vocab_size: int, micro_batch_size: Optional[int] = None) -> Shapes:
    from vlscale.data.tasks import get_task
    from vlscale.modeling.backbones import lm_config
    from vlscale.modeling.vision import vision_dims

    c = lm_config(cfg.model.backbone)
    dims = vision_dims(cfg.model.vision)
    video = cfg.data.is_video()
    n_images = 1 if video else max(get_task(t).n_images for t in cfg.data.tasks)
    if video:
        per_image, feat_dim = cfg.model.max_frames, dims["embed_dim"]
    else:
        side = min(cfg.model.pool_size, dims["grid_side"]) if dims["is_resnet"] else dims["grid_side"]
        per_image, feat_dim = side * side, dims["grid_dim"]
    p = cfg.peft
    n_prompts = p.n_prompts if (p.method == "prompt" or p.extra_prompts) else 0
    text = cfg.data.max_input_length
    if c.model_type == "t5":
        dropout = c.dropout_rate if cfg.model.dropout is None else cfg.model.dropout
        fam = dict(family="t5", d_ff=c.d_ff, heads=c.num_heads, d_kv=c.d_kv, enc_layers=c.num_layers,
                   dec_layers=c.num_decoder_layers, act=c.dense_act_fn, gated=bool(c.is_gated_act),
                   dropout=dropout, attn_dropout=dropout, act_dropout=dropout,
                   tied_scale=bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)))
    else:
        dropout = c.dropout if cfg.model.dropout is None else cfg.model.dropout
        fam = dict(family="bart", d_ff=c.encoder_ffn_dim, heads=c.encoder_attention_heads,
                   d_kv=c.d_model // c.encoder_attention_heads, enc_layers=c.encoder_layers,
                   dec_layers=c.decoder_layers, act=c.activation_function, gated=False, dropout=dropout,
                   attn_dropout=c.attention_dropout, act_dropout=c.activation_dropout, tied_scale=False)
    return Shapes(batch=micro_batch_size or cfg.train.micro_batch_size,
                  enc_len=n_prompts + n_images * per_image + text, dec_len=cfg.data.max_target_length,
                  d_model=c.d_model, vocab=vocab_size, visual_tokens=n_images * per_image,
                  feat_dim=feat_dim, n_images=n_images, n_prompts=n_prompts,
                  prompt_hidden=p.prompt_hidden_dim, text_len=text,
                  vision_on_the_fly=cfg.model.feature_source == "images", image_size=dims["image_size"],
                  vision_resnet=dims["is_resnet"], vision_tokens_per_image=dims["grid_tokens"],
                  video=video, **fam)


# ----------------------------------------------------------------------------- the activation tape

class _T:
    """A symbolic tensor: the bytes of its storage and whether it requires grad."""

    __slots__ = ("nbytes", "rg")

    def __init__(self, nbytes: int, rg: bool):
        self.nbytes = int(nbytes)
        self.rg = bool(rg)


@dataclass
class TapeOptions:
    device: str = "cuda"
    """``cpu`` or ``cuda``: dropout masks (CPU: a noise tensor of the input's dtype; CUDA: bool) and
    SDPA kernels (CPU with attention dropout: the math path) differ."""
    b: int = 4
    """Bytes per element of activations (the model's dtype)."""
    zero3_linear: bool = False
    """DeepSpeed ZeRO-3 replaces F.linear by a memory-efficient linear that keeps every input."""
    padded: bool = True
    """Per-example attention masks (padded batches, as the collator makes)."""


class _Tape:
    """Follows one forward op by op and records the storages autograd saves for backward.

    The rules are PyTorch's derivative formulas: an op gets a backward node only when one of its
    inputs requires grad, and keeps an input only when another input's gradient needs it (``mm``
    keeps ``self`` for the weight's gradient and ``mat2``, the weight, for the input's). Storages
    are identities: saving the same tensor twice counts once. Inside a checkpointed block the saves
    go to a scratch tape (their size is the block's recompute peak) and the outer tape keeps the
    block's tensor arguments only, as non-reentrant ``torch.utils.checkpoint`` does.
    """

    def __init__(self, opt: TapeOptions):
        self.o = opt
        self.saved: dict[int, _T] = {}
        self.by_part: dict[str, int] = {}
        self.part = "inputs"
        self._scratch: Optional[dict[int, _T]] = None
        self.block_peak = 0

    # -- bookkeeping
    def new(self, numel: int, rg: bool, b: Optional[int] = None) -> _T:
        return _T(numel * (self.o.b if b is None else b), rg)

    def save(self, *ts: Optional[_T]) -> None:
        target = self.saved if self._scratch is None else self._scratch
        for t in ts:
            if t is not None and t.nbytes and id(t) not in target:
                target[id(t)] = t  # holding the object keeps its id unique
                if self._scratch is None:
                    self.by_part[self.part] = self.by_part.get(self.part, 0) + t.nbytes

    def total(self) -> int:
        return sum(t.nbytes for t in self.saved.values())

    def begin_checkpoint(self, *inputs: Optional[_T]) -> None:
        self.save(*inputs)
        self._scratch = {}

    def end_checkpoint(self) -> None:
        self.block_peak = max(self.block_peak, sum(t.nbytes for t in self._scratch.values()))
        self._scratch = None

    # -- ops
    def linear(self, x: _T, numel_out: int, w_rg: bool) -> _T:
        out = self.new(numel_out, x.rg or w_rg)
        if out.rg and (w_rg or self.o.zero3_linear):
            self.save(x)  # the input, for the weight's gradient (ZeRO-3's linear keeps it always)
        return out

    def act(self, x: _T, kind: str) -> _T:
        numel = x.nbytes // self.o.b
        out = self.new(numel, x.rg)
        if not x.rg:
            return out
        if kind in ("relu", "tanh", "sigmoid"):
            self.save(out)  # these keep their result
        elif kind == "gelu_new":  # HF NewGELUActivation: 0.5*x*(1+tanh(c*(x+0.044715*x^3))) in 8 ops
            t, half, one_t = self.new(numel, True), self.new(numel, True), self.new(numel, True)
            self.save(x, t, half, one_t)  # pow keeps x, tanh its result, the last mul both factors
        else:  # gelu, silu, gelu_pytorch_tanh: keep the input
            self.save(x)
        return out

    def mul(self, a: _T, b: _T) -> _T:
        out = self.new(max(a.nbytes, b.nbytes) // self.o.b, a.rg or b.rg)
        if b.rg:
            self.save(a)
        if a.rg:
            self.save(b)
        return out

    @staticmethod
    def add(a: _T, b: Optional[_T] = None) -> _T:
        return _T(max(a.nbytes, b.nbytes if b is not None else 0), a.rg or (b is not None and b.rg))

    def dropout(self, x: _T, p: float) -> _T:
        if p <= 0:
            return x  # dropout(p=0) returns its input
        numel = x.nbytes // self.o.b
        out = self.new(numel, x.rg)
        if x.rg:  # CUDA: native_dropout's bool mask; CPU: input * noise keeps the noise (input dtype)
            self.save(self.new(numel, False, 1 if self.o.device == "cuda" else self.o.b))
        return out

    def t5_norm(self, x: _T, rows: int, w_rg: bool) -> _T:
        """T5LayerNorm: fp32 variance, x * rsqrt(var + eps), cast to the weight dtype, * weight."""
        numel = x.nbytes // self.o.b
        if x.rg:
            # pow keeps x.to(float32) (a copy for half inputs), x * rsqrt(var) keeps x and rsqrt(var)
            x32 = x if self.o.b == 4 else self.new(numel, True, 4)
            self.save(x32, x, self.new(rows, True, 4))
        h = self.new(numel, x.rg)  # normalised, in the weight dtype
        if w_rg:
            self.save(h)  # weight * h keeps h for the weight's gradient
        return self.new(numel, x.rg or w_rg)

    def layer_norm(self, x: _T, rows: int, w_rg: bool) -> _T:
        out = self.new(x.nbytes // self.o.b, x.rg or w_rg)
        if out.rg:  # native_layer_norm keeps input, mean and rstd (CUDA: fp32; CPU: the input dtype)
            stat = 4 if self.o.device == "cuda" else self.o.b
            self.save(x, self.new(rows, False, stat), self.new(rows, False, stat))
        return out

    def sdpa(self, q: _T, k: _T, v: _T, mask: Optional[_T], *, bh: int, lq: int, lk: int, d: int,
             dropout: float) -> _T:
        """scaled_dot_product_attention -> the (B, Lq, H*D) tensor the output projection reads."""
        rg = q.rg or k.rg or v.rg
        if self.o.device == "cpu" and (dropout > 0 or (mask is not None and mask.rg)):
            # CPU math path (the flash kernel has no dropout and no mask gradient): q*s, k^T*s,
            # bmm, softmax, [dropout: x * scaled noise], bmm with a copy of v, then
            # transpose(1, 2).contiguous()
            if rg:  # half inputs are computed in fp32 on CPU
                f = 4
                qs, ks = self.new(bh * lq * d, q.rg, f), self.new(bh * lk * d, k.rg, f)
                vc = self.new(bh * lk * d, v.rg, f)
                if ks.rg:
                    self.save(qs)
                if qs.rg:
                    self.save(ks)
                att = self.new(bh * lq * lk, True, f)
                self.save(att)  # softmax result
                if dropout > 0:
                    self.save(self.new(bh * lq * lk, False, f))  # dropout noise
                    att = self.new(bh * lq * lk, True, f)
                if vc.rg:
                    self.save(att)
                self.save(vc)
            return self.new(bh * lq * d, rg)
        out = self.new(bh * lq * d, rg)  # flash / memory-efficient kernels write (B, L, H, D) directly
        if rg:
            lse_rows = -(-lq // 32) * 32 if (self.o.device == "cuda" and mask is not None) else lq
            self.save(q, k, v, out, self.new(bh * lse_rows, False, 4), mask)
        return out

    def cross_entropy(self, logits: _T, rows: int, vocab: int) -> _T:
        """log_softmax keeps its result, nll_loss its targets."""
        lsm = self.new(rows * vocab, logits.rg)
        if logits.rg:
            self.save(lsm, self.new(rows, False, 8), self.new(1, False))  # + total_weight
        return lsm


@functools.lru_cache(maxsize=64)
def vision_forward_peak(name: str, n_images: int, b: int, video: bool = False) -> int:
    """Peak bytes CLIP's visual tower allocates encoding ``n_images`` under no_grad (beyond its input).

    Simulated on the meta device: the tower runs op by op without memory while
    :class:`vlscale.profiling.measure.LiveTensorTracker` follows every storage's size and death.
    Attention runs as a fused kernel (only the output is allocated), as on CPU and GPU.
    """
    import torch
    import torch.nn.functional as F

    from vlscale.modeling.vision import build_vision_encoder
    from vlscale.profiling.measure import LiveTensorTracker

    dtype = {4: torch.float32, 2: torch.bfloat16}[b]
    enc = build_vision_encoder(name, device="meta", dtype=dtype)
    x = torch.empty(n_images, 3, enc.image_size, enc.image_size, device="meta", dtype=dtype)
    tracker = LiveTensorTracker("meta")
    tracker.track(list(enc.parameters()) + list(enc.buffers()) + [x])
    base = tracker.current
    original = F.scaled_dot_product_attention

    def fused(q, k, v, *args, **kwargs):
        return q.new_empty(q.shape[:-1] + (v.shape[-1],))

    F.scaled_dot_product_attention = fused
    try:
        with torch.no_grad(), tracker:
            out = enc.encode_global(x) if video else enc.encode_grid(x)
    finally:
        F.scaled_dot_product_attention = original
    del out
    return int(tracker.peak - base)


@functools.lru_cache(maxsize=64)
def vision_trained_forward(name: str, n_images: int, b: int, video: bool = False,
                           pool_size: int = 0) -> tuple[int, int, bool]:
    """A trained CLIP's forward (``peft.train_vision``: grad on, train mode, its BatchNorms on batch
    statistics) encoding ``n_images``, as the V&L model runs it (``encode_global`` for video frames;
    ``encode_grid`` and, for an RN, the adaptive max pooling to ``pool_size``): -> (the bytes autograd
    saves for backward, unique storages, parameters and buffers left out; the peak bytes it allocates
    beyond its input, what it saves included; whether the input images themselves are saved).

    Simulated on the meta device, op by op (PyTorch's own derivative formulas decide what is saved;
    :class:`vlscale.profiling.measure.LiveTensorTracker` follows sizes and deaths), attention as a
    fused kernel that keeps q, k, v and its output.
    """
    import torch
    import torch.nn.functional as F

    from vlscale.modeling.vision import build_vision_encoder, pool_grid
    from vlscale.profiling.measure import LiveTensorTracker

    dtype = {4: torch.float32, 2: torch.bfloat16}[b]
    enc = build_vision_encoder(name, device="meta", dtype=dtype)
    unused = set(enc.unused_parameter_names(video))
    for n, prm in enc.named_parameters():
        prm.requires_grad_(n not in unused)
    enc.train()
    x = torch.empty(n_images, 3, enc.image_size, enc.image_size, device="meta", dtype=dtype)
    own = {id(t.untyped_storage()) for t in list(enc.parameters()) + list(enc.buffers())}
    saved: dict[int, tuple] = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        if id(st) not in own:
            saved[id(st)] = (st, st.nbytes())  # holding the storage keeps its id unique
        return t

    tracker = LiveTensorTracker("meta")
    tracker.track(list(enc.parameters()) + list(enc.buffers()) + [x])
    base = tracker.current
    original = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        # the fused kernel (CPU's flash attention): keeps q, k, v, its output and the log-sum-exp
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
            if video:
                out = enc.encode_global(x)
            else:
                out = enc.encode_grid(x)
                if enc.is_resnet:
                    out = pool_grid(out, enc.grid_side, min(pool_size or enc.grid_side, enc.grid_side))
    finally:
        F.scaled_dot_product_attention = original
    total = sum(n for _, n in saved.values())
    input_saved = id(x.untyped_storage()) in saved
    del out
    return int(total), int(tracker.peak - base), input_saved


@dataclass
class ActivationReport:
    """What one micro-batch forward costs in activations (bytes per rank)."""

    saved: int
    """autograd's saved tensors at the end of forward (checkpointing: the blocks' inputs only)."""
    by_part: dict
    block_peak: int
    """With checkpointing: the largest block's saved set, rebuilt in backward one block at a time."""
    logits: int
    log_probs: int
    vision_transient: int
    """CLIP's forward under no_grad: its working set while the images are encoded (not saved)."""
    batch_bytes: int
    encoder_output: int = 0
    """The encoder's last hidden state when autograd does not keep it (the model output holds it)."""
    batch_saved: int = 0
    """Bytes of the batch autograd keeps itself (a trained CLIP's first convolution keeps the images):
    in both ``saved`` and ``batch_bytes``, held once."""


def activation_report(cfg: RunConfig, s: Shapes, opt: TapeOptions) -> ActivationReport:
    """Trace one micro-batch forward of the V&L model symbolically (see :class:`_Tape`)."""
    p = cfg.peft
    lm_rg, proj_rg = p.train_lm, p.train_projection
    adapter_like = p.method in ADAPTER_METHODS
    lora_on = p.method == "lora"
    ckpt = cfg.train.gradient_checkpointing
    B, d, Le, Ld, H, dk, inner = s.batch, s.d_model, s.enc_len, s.dec_len, s.heads, s.d_kv, s.inner
    r = max(1, d // p.reduction_factor)
    t5 = s.family == "t5"
    # BART's layer norms also train with peft.bias=all (their biases: the output needs a gradient, the saved set is
    # the same; T5's norms have no bias); a linear's trained bias saves nothing, and in BART every linear reads a
    # trained norm's output
    ln_rg = p.train_layer_norms or p.train_lm or (p.bias == "all" and not t5)
    tp = _Tape(opt)

    # ------------------------------------------------------------ projection (and prompts)
    nv = B * s.visual_tokens
    n_img = B * s.n_images
    frames = cfg.model.max_frames if s.video else 1
    vision_rg = p.train_vision and s.vision_on_the_fly
    vision_trained = (0, 0, False)
    if vision_rg:  # CLIP under grad: what its own ops keep (see vision_trained_forward)
        tp.part = "vision"
        vision_trained = vision_trained_forward(cfg.model.vision, n_img * frames, opt.b, s.video, cfg.model.pool_size)
        tp.save(_T(vision_trained[0], True))
    tp.part = "projection"
    feats = tp.new(nv * s.feat_dim, vision_rg)
    if s.video and s.vision_on_the_fly and s.vision_resnet:
        # a ResNet's frame embeddings are row 0 of its attention pool's (grid + 1)-token output: the
        # linear keeps that whole storage
        feats = tp.new(nv * (s.vision_tokens_per_image + 1) * s.feat_dim, vision_rg)
    x_feat = tp.layer_norm(tp.linear(feats, nv * d, proj_rg), nv, proj_rg)
    # the boxes are one image's grid expanded over the batch: F.linear reshapes them into a copy,
    # ZeRO-3's linear keeps the expanded view (the small grid) unless a dtype cast copied it
    per_image = s.visual_tokens // max(s.n_images, 1)
    boxes = tp.new(per_image * 5, False, 4) if (opt.zero3_linear and opt.b == 4) else tp.new(nv * 5, False)
    x_pos = tp.layer_norm(tp.linear(boxes, nv * d, proj_rg), nv, proj_rg)
    if proj_rg:
        tp.save(tp.new(s.n_images, False, 8))  # image-order embedding indices
    inputs_rg = x_feat.rg or x_pos.rg
    if s.n_prompts:
        tp.part = "prompts"
        n = s.n_prompts  # prompts = W2 tanh(W1 E + c1) + c2 with E a parameter: tanh's result is kept
        tp.save(tp.new(n * s.prompt_hidden, True))
        inputs_rg = True
    embeds = tp.new(B * Le * d, inputs_rg or lm_rg)  # cat(prompts, visual tokens, text embeddings)
    if lm_rg:
        tp.save(tp.new(B * s.text_len, False, 8))  # text embedding indices

    # ------------------------------------------------------------ building blocks
    mask_b = B if opt.padded else 1

    def norm(x: _T, rows: int) -> _T:
        return tp.t5_norm(x, rows, ln_rg) if t5 else tp.layer_norm(x, rows, ln_rg)

    def site(x: _T, tokens: int) -> _T:
        """Adapter / Hyperformer / Compacter on a sublayer output (fused: keeps x and z)."""
        if not adapter_like:
            return x
        tp.save(x, tp.new(tokens * r, True))
        if not p.fused:
            tp.save(tp.new(tokens * r, True))  # the reference path also keeps act(z)
        if p.method != "adapter":
            tp.save(tp.new(2 * d * r, True))  # weights generated / built from Kronecker products
        if p.method == "hyperformer":  # [task emb; layer emb] -> Linear -> ReLU -> Linear -> LayerNorm
            tp.save(tp.new(p.task_embedding_dim + p.layer_embedding_dim, True), tp.new(p.hypernet_hidden_dim, True),
                    tp.new(p.hypernet_projected_dim, True), tp.new(2, False, 4), tp.new(2, False, 8))
        return tp.new(tokens * d, True)

    def lora(x: _T, y: _T, tokens: int) -> _T:
        h = tp.dropout(x, p.lora_dropout) if x.rg else (tp.new(tokens * d, False) if p.lora_dropout > 0 else x)
        tp.save(h, tp.new(tokens * p.lora_rank, True))  # A's input, B's input
        return tp.new(y.nbytes // opt.b, True)

    def attention(x: _T, src: _T, lq: int, lk: int, mask: Optional[_T], dropout: float) -> _T:
        q = tp.linear(x, B * lq * inner, lm_rg)
        k = tp.linear(src, B * lk * inner, lm_rg)
        v = tp.linear(src, B * lk * inner, lm_rg)
        if lora_on:
            q, v = lora(x, q, B * lq), lora(src, v, B * lk)
        a = tp.sdpa(q, k, v, mask, bh=B * H, lq=lq, lk=lk, d=dk, dropout=dropout)
        return tp.linear(a, B * lq * d, lm_rg)

    def ffn(x: _T, n: int) -> _T:
        if s.gated:
            hmid = tp.mul(tp.act(tp.linear(x, B * n * s.d_ff, lm_rg), s.act), tp.linear(x, B * n * s.d_ff, lm_rg))
        else:
            hmid = tp.act(tp.linear(x, B * n * s.d_ff, lm_rg), s.act)
        hmid = tp.dropout(hmid, s.dropout if t5 else s.act_dropout)
        return tp.linear(hmid, B * n * d, lm_rg)

    def pad16(n_k: int) -> int:
        return -(-n_k // 16) * 16 if opt.device == "cuda" else n_k

    def t5_block(h: _T, n: int, dec: bool, enc_out: Optional[_T], first: bool) -> _T:
        if first and lm_rg:
            tp.save(tp.new(n * n, False, 8))  # relative-position buckets (the bias embedding's indices)
        x = norm(h, B * n)
        # self-attention: SDPA gets the position bias folded into its mask, one tensor per layer; the encoder's
        # without padding gets the bias itself, every layer the same tensor (unless CUDA pads its keys)
        if dec or opt.padded or pad16(n) != n:
            mask = tp.new((1 if dec else mask_b) * H * n * pad16(n), lm_rg)
        else:
            mask = pos_bias
        if lm_rg and (dec or opt.padded):  # torch.where(condition, bias, min) keeps the condition
            tp.save(tp.new(n * n, False, 1) if dec else enc_mask)
        a = site(attention(x, x, n, n, mask, s.attn_dropout), B * n)
        h = tp.add(h, tp.dropout(a, s.dropout))
        if dec:
            x = norm(h, B * n)
            cmask = tp.new(B * H * n * pad16(Le), False) if opt.padded else cross_zero_bias
            a = site(attention(x, enc_out, n, Le, cmask, s.attn_dropout), B * n)
            h = tp.add(h, tp.dropout(a, s.dropout))
        y = site(ffn(norm(h, B * n), n), B * n)
        return tp.add(h, tp.dropout(y, s.dropout))

    def sdpa_mask(n_q: int, n_k: int, bh: int = 1) -> Optional[_T]:
        """The additive float mask SDPA builds from a boolean one at every call (CUDA pads the
        key length to a multiple of 16 for the memory-efficient kernel)."""
        if not opt.padded:
            return None
        n_k = -(-n_k // 16) * 16 if opt.device == "cuda" else n_k
        return tp.new(B * bh * n_q * n_k, False)

    def bart_block(h: _T, n: int, dec: bool, enc_out: Optional[_T], first: bool) -> _T:
        mask = None if dec else sdpa_mask(n, n)  # the decoder's self-attention runs is_causal
        a = site(attention(h, h, n, n, mask, s.attn_dropout), B * n)
        h = norm(tp.add(h, tp.dropout(a, s.dropout)), B * n)
        if dec:
            a = site(attention(h, enc_out, n, Le, sdpa_mask(n, Le), s.attn_dropout), B * n)
            h = norm(tp.add(h, tp.dropout(a, s.dropout)), B * n)
        y = site(ffn(h, n), B * n)
        return norm(tp.add(h, tp.dropout(y, s.dropout)), B * n)

    block = t5_block if t5 else bart_block

    def stack(h: _T, layers: int, n: int, dec: bool, enc_out: Optional[_T], ckpt_args) -> _T:
        for i in range(layers):
            if ckpt:
                tp.begin_checkpoint(h, *ckpt_args(i))
                h = block(h, n, dec, enc_out, i == 0)
                tp.end_checkpoint()
            else:
                h = block(h, n, dec, enc_out, i == 0)
        return h

    # ------------------------------------------------------------ encoder
    tp.part = "encoder"
    cross_zero_bias = tp.new(H * Ld * Le, ckpt) if t5 else None
    if t5:
        pos_bias = tp.new(H * Le * Le, lm_rg)
        enc_mask = tp.new(B * Le * Le, False, 1) if opt.padded else None  # boolean
        h = tp.dropout(embeds, s.dropout)
        h = stack(h, s.enc_layers, Le, False, None, lambda i: (enc_mask, pos_bias if i else None))
        h = tp.dropout(norm(h, B * Le), s.dropout)
    else:
        enc_mask = tp.new(B * Le * Le, False, 1) if opt.padded else None  # boolean
        h = tp.dropout(tp.layer_norm(tp.add(embeds), B * Le, ln_rg), s.dropout)  # + learned positions
        h = stack(h, s.enc_layers, Le, False, None, lambda i: (enc_mask,))
    enc_out = h

    # ------------------------------------------------------------ decoder
    tp.part = "decoder"
    dec_emb = tp.new(B * Ld * d, lm_rg)
    if lm_rg:
        tp.save(tp.new(B * Ld, False, 8))
    if t5:
        dec_bias = tp.new(H * Ld * Ld, lm_rg)
        cross_mask = tp.new(B * Ld * Le, False, 1) if opt.padded else None
        h = tp.dropout(dec_emb, s.dropout)
        h = stack(h, s.dec_layers, Ld, True, enc_out,
                  lambda i: (enc_out, cross_mask, dec_bias if i else None, cross_zero_bias if i else None))
        h = tp.dropout(norm(h, B * Ld), s.dropout)
        if s.tied_scale:
            h = tp.new(B * Ld * d, h.rg)  # * d_model ** -0.5 before the tied head
    else:
        h = tp.dropout(tp.layer_norm(tp.add(dec_emb), B * Ld, ln_rg), s.dropout)
        h = stack(h, s.dec_layers, Ld, True, enc_out, lambda i: (enc_out,))

    # ------------------------------------------------------------ head and loss
    tp.part = "lm_head_loss"
    logits = tp.linear(h, B * Ld * s.vocab, lm_rg)
    log_probs = tp.cross_entropy(logits, B * Ld, s.vocab)

    # ------------------------------------------------------------ CLIP under no_grad (transient)
    vision_transient = 0
    if vision_rg:  # its working set holds what it saves
        vision_transient = vision_trained[1]
    elif s.vision_on_the_fly:
        vision_transient = vision_forward_peak(cfg.model.vision, n_img * frames, opt.b, s.video)
    if s.vision_on_the_fly:  # a video is max_frames images
        pixels = n_img * frames * 3 * s.image_size ** 2 * opt.b
    else:
        pixels = nv * s.feat_dim * opt.b
    batch_bytes = pixels + 8 * B * (2 * s.text_len + s.dec_len)
    out = ActivationReport(saved=tp.total(), by_part=dict(tp.by_part), block_peak=tp.block_peak,
                           logits=logits.nbytes, log_probs=log_probs.nbytes,
                           vision_transient=vision_transient, batch_bytes=batch_bytes,
                           encoder_output=0 if id(enc_out) in tp.saved else enc_out.nbytes,
                           batch_saved=pixels if vision_trained[2] else 0)
    return out


# ----------------------------------------------------------------------------- engine state

@dataclass
class StateReport:
    """Parameter, gradient and optimizer bytes of one rank (DeepSpeed's layout), and transients."""

    params: int  # on the device
    grads: int  # gradient buffers at the accumulation boundary, on the device
    optimizer: int  # fp32 masters + Adam moments (+ step counters), on the device
    host: int = 0  # moved to CPU memory by offload
    nvme: int = 0
    persistent_params: int = 0  # ZeRO-3 parameters under the persistence threshold, kept whole
    grads_persist: bool = False  # the gradient buffer lives through forward too (ZeRO-3)
    master_grads: int = 0  # ZeRO-3 optimizer offloaded to cpu: the masters' fp32 gradients, when the host is the device
    step_transient: int = 0  # the optimizer step's fp32 gradient copy and AdamW temporaries
    init_transient: int = 0  # DeepSpeed's set-up (flattening, state initialisation)
    comm_persistent: int = 0  # ZeRO-3's reduce bucket (allocated once)
    comm_backward: int = 0  # reduce buckets live during backward
    gathered: int = 0  # ZeRO-3: parameters gathered at the end of forward (kept by reuse distance, prefetched)
    gathered_backward: int = 0  # ZeRO-3: gathered while backward runs the layers (prefetched, or the unit)
    gather_transient: int = 0  # ZeRO-3: a flat all-gather buffer beside ``gathered`` mid-forward
    optimizer_lazy: bool = False  # torch's AdamW creates its moments at the first step
    detail: dict = field(default_factory=dict)


SHARED_PEFT = ("peft.hyperformer.",)
"""Trainable parameters every adapter site of a stack uses (their gradients accumulate through backward)."""
ENCODER_SHARED_PEFT = ("peft.hyperformer.hypernets.encoder.",)
"""Those of them only the encoder's sites use."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def engine_state(inv: ParamInventory, z: ZeroSettings, world: int, precision: str,
                 device: str = "cuda", foreach: Optional[bool] = None, leaf_layers: bool = False,
                 prefetch_fills: bool = True) -> StateReport:
    """Bytes of parameters, gradients and optimizer state per rank, following DeepSpeed's layout:

    * stage 0: the engine's torch AdamW holds per-parameter moments (fp32 runs update the
      parameters in place; bf16/fp16 runs keep per-parameter fp32 masters, FP16_UnfusedOptimizer)
    * stage 1/2: each optimizer group is flattened, padded to a multiple of 2 x world and split;
      a rank holds its fp32 master partition and the moments of it
    * stage 3: every parameter is split into ceil(numel / world) pieces; parameters of at most
      ``stage3_param_persistence_threshold`` elements are also kept whole; the fp32 master and the
      moments cover this rank's pieces of the trainable ones, per sub-group
    Each Adam step counter is a 4-byte tensor (one per parameter at stage 0, per group/sub-group
    otherwise).
    """
    b = PRECISION_BYTES[precision]
    W = max(1, int(world))
    st = z.stage
    groups = inv.optimizer_groups()
    tr_numels = [n for n, t in zip(inv.numels, inv.trainable) if t]
    n_tr = sum(tr_numels)
    largest_tr = max(tr_numels, default=0)
    foreach = (device == "cuda") if foreach is None else foreach
    # torch AdamW's temporaries: foreach (CUDA default) makes sqrt(exp_avg_sq) for a whole group at
    # once; the single-tensor loop (CPU) two tensors of one parameter's size
    adam_temp = 4 * max((sum(g) for g in groups), default=0) if foreach else 2 * 4 * largest_tr
    out = StateReport(params=0, grads=0, optimizer=0)
    if st < 3:
        out.params = inv.total * b
    else:
        persist, budget = 0, 0
        for n in inv.numels:
            if n <= z.param_persistence_threshold and budget + n <= z.model_persistence_threshold:
                persist += n * b
                budget += n
        out.persistent_params = persist
        out.params = sum(_ceil_div(n, W) for n in inv.numels) * b + persist
        gathered, backward, transient = _zero3_gathered_numel(inv, z, W, leaf_layers, prefetch_fills,
                                                              zero3_copies_to_device(z, W, device))
        out.gathered, out.gathered_backward, out.gather_transient = gathered * b, backward * b, transient * b
    if st == 0:
        if precision == "fp32":
            out.optimizer = sum(2 * n * 4 + 4 for n in tr_numels)
            out.optimizer_lazy = True
            out.step_transient = adam_temp
        else:  # FP16_UnfusedOptimizer: per-parameter fp32 masters, their moments; fp32 grads at the step
            out.optimizer = sum(n * 4 + 2 * n * 4 + 4 for n in tr_numels)
            out.optimizer_lazy = True
            out.step_transient = n_tr * 4 + adam_temp
        out.grads = n_tr * b
        out.detail["partition"] = n_tr
    elif st in (1, 2):
        opt, grads, part_total = 0, 0, 0
        for g in groups:
            padded = _ceil_div(sum(g), 2 * W) * 2 * W
            part = padded // W
            part_total += part
            opt += part * 4 * 3 + 4
        # gradient partition: the whole elements of every parameter touching this rank's slice; at the
        # boundary DeepSpeed gives each of them that got no gradient (another task's own weights, when
        # each task has its own: a step trains one task) a zero gradient of its whole size beside it
        tagged = inv.tagged_optimizer_groups()
        grads = max(_params_in_partition_numel(groups, W, [t not in (None, task) for t, _ in tagged]) * b
                    for task in (inv.tasks if any(t is not None for t, _ in tagged) else (None,)))
        out.optimizer, out.grads = opt, grads
        out.step_transient = part_total * 4 + (part_total * b) + adam_temp
        out.comm_backward = min(z.reduce_bucket_size, n_tr) * b  # the reduce bucket
        out.detail["flush_fraction"] = min(1.0, z.reduce_bucket_size / max(n_tr, 1))
        out.detail["partition"] = part_total
    else:
        opt, part_total, largest_sub, largest_sub_full = 0, 0, 0, 0
        for g in groups:
            for sub in _sub_groups(g, W, z.sub_group_size):
                piece = sum(_ceil_div(n, W) for n in sub)
                part_total += piece
                largest_sub = max(largest_sub, piece)
                largest_sub_full = max(largest_sub_full, sum(sub))
                opt += piece * 4 * 3 + 4
        out.optimizer = opt
        out.grads = part_total * b  # grad_partitions_flat_buffer (gradient accumulation in the model dtype)
        out.grads_persist = True
        out.comm_persistent = z.reduce_bucket_size * b if z.contiguous_gradients else 0
        out.step_transient = largest_sub * 4 + largest_sub * b + adam_temp
        out.init_transient = largest_sub_full * 4  # initialize_optimizer_states' zero gradient buffer
        out.detail["partition"] = part_total
    # offload: what leaves the device. On DeepSpeed's CPU accelerator the device is host memory: what
    # is offloaded to "cpu" stays in it (reported as host bytes too), and only the NVMe part leaves.
    infinity = zero_infinity_bytes(inv, z, W, precision) if st == 3 else {}
    out.detail["zero_infinity"] = infinity
    if z.offload_optimizer != "none":
        stays = device == "cpu" and z.offload_optimizer == "cpu"
        # DeepSpeedCPUAdam counts steps in a Python int: no 4-byte step tensor per group / sub-group
        out.optimizer -= 4 * (sum(len(_sub_groups(g, W, z.sub_group_size)) for g in groups) if st == 3 else len(groups))
        moved = out.optimizer
        out.step_transient = 0  # DeepSpeedCPUAdam updates in place
        if st == 3:
            # and an fp32 gradient beside each sub-group's master partition, held from the set-up on
            # (stage3.py initialize_optimizer_states: fp32_partitioned_groups_flat[i].grad, on the host,
            # pinned with pin_memory; _offload_grad_partition_at_boundary copies the flat partition into it)
            master_grads = out.detail["partition"] * 4
            moved += out.grads + master_grads
            out.master_grads = master_grads if stays else 0
            if not stays:
                out.grads_persist = False
                out.grads = 0
        else:
            # stage 1/2 keep on the host an fp32 gradient partition, a model-dtype copy of the parameter
            # partition and a staging buffer of the largest parameter; the device its twin staging buffer
            part = out.detail["partition"]
            staged = part * 4 + part * b + largest_tr * b
            moved += staged
            out.comm_persistent += largest_tr * b + (staged if stays else 0)
            out.grads = min(out.grads, z.reduce_bucket_size * b)  # gradients leave through the bucket
        if not stays:
            out.optimizer = 0
        if z.offload_optimizer == "cpu":
            out.host += moved
        elif st == 3:  # ZeRO-Infinity: see zero_infinity_bytes
            out.host += infinity["optimizer_pool"] + infinity["optimizer_host"]
            out.nvme += infinity["optimizer_nvme"]
        else:
            out.nvme += moved
            out.host += 2 * largest_tr * 4  # pinned swap buffers
    if z.offload_param != "none":
        moved = out.params - out.persistent_params
        if z.offload_param == "cpu":
            out.host += moved
        else:
            out.host += infinity["param_pool"] + infinity["param_host"] + infinity["param_reserve"]
            out.nvme += infinity["param_nvme"]
        if not (device == "cpu" and z.offload_param == "cpu"):
            out.params = out.persistent_params
    return out


def _forward_position(name: str, n_enc: int, tied: bool) -> float:
    """Where in the forward a parameter is used for the last time (vision: -1, not in backward)."""
    if name.startswith("vision."):
        return -1
    if name.startswith("projector."):
        return 0
    if name.startswith("peft.prompt"):
        return 1
    if name.startswith("peft.hyperformer."):  # a stack's hypernetwork serves each of its layers; the task
        return 10 + n_enc - 1 if name.startswith(ENCODER_SHARED_PEFT) else 1e9  # embeddings serve both stacks
    m = re.search(r"(encoder|decoder)(?:\.block\.|\.layers\.|_)(\d+)", name)
    if m:
        return 10 + int(m.group(2)) + (0 if m.group(1) == "encoder" else n_enc + 10)
    if "shared" in name or "embed_tokens" in name:
        return 1e9 if tied else 10 + n_enc + 9  # tied: the output layer is its last use
    if "decoder" in name and ("embed" in name or "layernorm_embedding" in name):
        return 10 + n_enc + 9
    if "encoder" in name:
        return 10 + n_enc + 5 if ("final" in name or "layer_norm" in name) and "embed" not in name else 5
    return 1e9  # decoder final norm, output layer


_LM_LAYER = re.compile(r"^(lm\.(?:model\.)?(?:encoder|decoder)\.(?:block|layers)\.\d+)\.")


def _gather_units(inv: ParamInventory, threshold: int, leaf_layers: bool) -> list[list[tuple[str, int]]]:
    """The ZeRO-3 gathering units outside CLIP, each a list of its gathered (non-persistent) parameters
    (name, elements): an LM layer when ``train.zero3_leaf_layers`` makes it a DeepSpeed leaf module,
    otherwise each module's own parameters."""
    units: dict[str, list[tuple[str, int]]] = {}
    for name, n in zip(inv.names, inv.numels):
        if name.startswith("vision.") or n <= threshold:
            continue
        m = _LM_LAYER.match(name) if leaf_layers else None
        units.setdefault(m.group(1) if m else name.rsplit(".", 1)[0], []).append((name, n))
    return list(units.values())


def zero3_copies_to_device(z: ZeroSettings, world: int, device: str) -> bool:
    """Whether a ZeRO-3 gather puts parameters on the device beyond their partitions: on several ranks the
    all-gather does; on one rank DeepSpeed does not gather (``_no_gather_coalesced``) but sets each
    parameter to its partition moved to the device, a copy when ``offload_param`` keeps the partitions off
    a GPU, the partition itself otherwise (and on the CPU accelerator, whose device is the host)."""
    return world > 1 or (z.offload_param != "none" and device != "cpu")


def _zero3_gathered_numel(inv: ParamInventory, z: ZeroSettings, W: int, leaf_layers: bool = False,
                          prefetch_fills: bool = True, copies: Optional[bool] = None) -> tuple[int, int, int]:
    """ZeRO-3 parameters held whole (beyond their partitions): at the end of forward and the start of
    backward; while backward runs the layers; and the flat all-gather buffer beside them mid-forward.
    Element counts. ``copies`` (default: several ranks): see :func:`zero3_copies_to_device`; one rank's
    copies are made parameter by parameter, with no flat buffer, and are held and released by the same
    rules (the coordinator's prefetching, reuse distance and live limit do not depend on the world size).

    How DeepSpeed behaves (``PartitionedParameterCoordinator``, measured with the live-tensor tracker
    on 2 CPU ranks, ``benchmarks/profile_accuracy.py``'s ZeRO-knob rows):

    * a parameter is released after its module runs unless its next use comes within
      ``stage3_max_reuse_distance`` elements of fetched parameters; at the end of forward the next use
      is in backward (distance ~ 2x the parameters used after it), so the last modules' weights stay
      gathered (all of a small model's). ``stage3_max_live_parameters`` does not limit this. In
      backward a unit's parameters are released after its use (they do not come back before the
      step ends);
    * with prefetching on (``stage3_prefetch_bucket_size`` > 0) each module call gathers up to a bucket
      ahead while fewer than ``stage3_max_live_parameters`` elements are gathered. Every module call
      prefetches, parameterless ones too; where the calls outnumber the parameters (module-by-module
      hooks, or CLIP's many modules run first) the prefetch runs ahead of use and the gathered set
      fills up to that limit whatever the reuse distance (``prefetch_fills``). With the LM's layers
      as leaf units and cached features one call consumes a whole layer and it does not (measured:
      22.9 M of t5-small's 64.6 M elements gathered with reuse distance 0, against all without leaf
      units);
    * a unit that prefetching did not bring (none, or no room under the limit beside what is kept) is
      gathered on demand; with several parameters (an LM layer when it is a leaf module) the flat
      all-gather buffer and the parameters' copies exist at once (2x the unit);
    * a prefetch's flat buffer lives until the last of its parameters is used: up to one bucket.
    """
    if not (W > 1 if copies is None else copies):
        return 0, 0, 0
    flat_buffers = W > 1
    n_enc = len({m.group(1) for n in inv.names if (m := _LM_LAYER.match(n)) and ".encoder." in m.group(1)})
    tied = not any(n.startswith("lm.lm_head") for n in inv.names)
    thr = z.param_persistence_threshold
    entries = sorted(((_forward_position(nm, n_enc, tied), n, nm) for nm, n in zip(inv.names, inv.numels)
                      if not nm.startswith("vision.")), key=lambda e: -e[0])
    gatherable = sum(n for _, n, _ in entries if n > thr)
    kept, after, kept_names = 0, 0, set()
    i = 0
    while i < len(entries):  # parameters of one position share their distance
        pos = entries[i][0]
        same = [(n, nm) for q, n, nm in entries[i:] if q == pos]
        if 2 * after <= z.max_reuse_distance:
            kept += sum(n for n, _ in same if n > thr)
            kept_names.update(nm for _, nm in same)
        after += sum(n for n, _ in same)
        i += len(same)
    prefetch = z.prefetch_bucket_size > 0

    def sizes(units):  # the largest unit, the most an on-demand gather holds (2x with several parameters), a flat buffer
        return (max((sum(u) for u in units), default=0),
                max((sum(u) * (2 if len(u) > 1 and flat_buffers else 1) for u in units), default=0),
                max((sum(u) for u in units if len(u) > 1 and flat_buffers), default=0))

    units = _gather_units(inv, thr, leaf_layers)
    first, _, first_flat = sizes([[n for _, n in u] for u in units])  # forward gathers every unit once
    running, work, flat = sizes([[n for nm, n in u if nm not in kept_names] for u in units])  # not kept into backward
    fill = min(z.max_live_parameters, gatherable) if prefetch and prefetch_fills else 0
    gathered = min(max(kept, fill), gatherable)
    # backward releases each unit after its use (it does not come back before the step ends)
    if prefetch and running <= z.max_live_parameters:
        backward = max(fill, running)
    else:
        backward = min(max(work, fill), gatherable + flat)
    on_demand_fwd = not prefetch or kept + first > z.max_live_parameters
    bucket = min(z.prefetch_bucket_size, gatherable) if prefetch and flat_buffers else 0
    transient = max(bucket, first_flat if on_demand_fwd else 0)
    return gathered, backward, transient


MIN_AIO_BYTES, AIO_ALIGNED_BYTES = 2 ** 20, 1024  # deepspeed.runtime.swap_tensor.utils


def zero_infinity_bytes(inv: ParamInventory, z: ZeroSettings, world: int, precision: str) -> dict:
    """Stage 3 with NVMe offload: where DeepSpeed 0.19 puts each rank's state, in bytes (parts absent when
    that offload is not to NVMe). Read from ``deepspeed/runtime/swap_tensor`` and ``zero/stage3.py``:

    * ``param_pool``: ``AsyncPartitionedParameterSwapper``'s pinned buffers, ``offload_param.buffer_count``
      x ``buffer_size`` elements (rounded up to the I/O alignment, 1024 x ``aio.intra_op_parallelism``
      bytes) in the model's dtype; allocated whole at ``zero.Init``
    * ``param_host``: partitions that stay in host memory: the trainable ones, up to
      ``offload_param.max_in_cpu`` elements (per optimizer group, the pinned flat buffer
      ``_create_param_groups_fp16_flat_cpu_memory`` allocates; a sub-group that does not fit whole goes to
      NVMe), and every partition smaller than ``max(1 MiB, aio.block_size)``, too small to swap.
      ``max_in_cpu`` does not keep frozen weights in memory: a frozen backbone is on NVMe
    * ``param_reserve``: when some trainable sub-group is on NVMe, the pinned buffer the optimizer step
      writes updated partitions out through (``reserve_partitioned_swap_space``: the largest sub-group's
      parameters at full size, each aligned)
    * ``param_nvme``: the partitions swapped out
    * ``optimizer_pool``: the optimizer swapper's ``SwapBufferManager``, ``offload_optimizer.buffer_count``
      fp32 buffers of the largest sub-group's partition (aligned); the pipelined swapper
      (``pipeline_read``/``pipeline_write``) draws from the same pool
    * ``optimizer_host``: the flat gradient partition (model dtype, pinned) and the sub-groups too small
      to swap (fp32 master, two moments, fp32 gradient)
    * ``optimizer_nvme``: fp32 master, moments and gradient of the swapped sub-groups

    The async I/O handles themselves hold only their request queues (``aio.queue_depth`` iocbs): the
    swappers read into and write from their pinned buffers, so DeepSpeed's bounce buffers are not used.
    """
    b = PRECISION_BYTES[precision]
    W = max(1, int(world))
    min_aio = max(MIN_AIO_BYTES, z.aio_block_size)
    align_bytes = AIO_ALIGNED_BYTES * z.aio_intra_op_parallelism

    def aligned(numel: int, size: int) -> int:
        step = align_bytes // size
        return _ceil_div(numel, step) * step

    groups = inv.optimizer_groups()
    subs = [sub for g in groups for sub in _sub_groups(g, W, z.sub_group_size)]
    pieces = [sum(_ceil_div(n, W) for n in sub) for sub in subs]
    out = {}
    if z.offload_param == "nvme":
        host = nvme = reserve = 0
        aggregate, off_subs = 0, []
        for g in groups:  # the flat buffers of the trainable partitions
            size = sum(_ceil_div(n, W) for n in g)
            flat = size if aggregate + size <= z.max_in_cpu else max(0, z.max_in_cpu - aggregate)
            aggregate += size
            host += flat * b
            offset = 0
            for sub in _sub_groups(g, W, z.sub_group_size):
                total = sum(_ceil_div(n, W) for n in sub)
                if offset + total > flat:
                    off_subs.append(sub)
                offset += total
        outside = [n for sub in off_subs for n in sub]
        outside += [n for n, t in zip(inv.numels, inv.trainable) if not t]
        for n in outside:
            part = _ceil_div(n, W) * b
            if part >= min_aio:
                nvme += part
            else:
                host += part
        if off_subs:
            largest = subs[pieces.index(max(pieces))]
            reserve = sum(aligned(n, b) for n in largest) * b
        out.update(param_pool=z.param_buffer_count * aligned(z.param_buffer_size, b) * b, param_host=host,
                   param_reserve=reserve, param_nvme=nvme)
    if z.offload_optimizer == "nvme" and z.stage == 3:
        swapped = sum(p for p in pieces if p * 4 >= min_aio)
        out.update(optimizer_pool=z.optimizer_buffer_count * aligned(max(pieces, default=0), 4) * 4,
                   optimizer_host=sum(pieces) * b + 16 * (sum(pieces) - swapped), optimizer_nvme=16 * swapped)
    return out


def _sub_groups(numels: list[int], W: int, sub_group_size: int) -> list[list[int]]:
    total = sum(_ceil_div(n, W) for n in numels)
    if sub_group_size is None or sub_group_size >= total:
        return [numels]
    subs, cur, size = [], [], 0
    for i, n in enumerate(numels):
        cur.append(n)
        size += _ceil_div(n, W)
        if size >= sub_group_size or i == len(numels) - 1:
            subs.append(cur)
            cur, size = [], 0
    return subs


def _params_in_partition_numel(groups: list[list[int]], W: int, idle: Optional[list[bool]] = None) -> int:
    """Stage 1/2: the gradient partition buffer holds every parameter that overlaps a rank's slice
    (whole); the largest over ranks (run summaries report the maximum). ``idle[i]``: group ``i``'s
    parameters get no gradient this step, so each also gets a zero gradient of its own."""
    best = 0
    for rank in range(W):
        total = 0
        for i, g in enumerate(groups):
            part = _ceil_div(sum(g), 2 * W) * 2 * W // W
            lo, hi, start = rank * part, (rank + 1) * part, 0
            for n in g:
                if start < hi and start + n > lo:
                    total += n * (2 if idle and idle[i] else 1)
                start += n
        best = max(best, total)
    return best


# ----------------------------------------------------------------------------- the estimate

@dataclass
class MemoryEstimate:
    """Predicted per-rank device memory of one training run, by component (bytes)."""

    components: dict
    """params, grads, optimizer, activations, buffers, peak. activations = autograd's saved bytes at
    the end of a forward; buffers = what else is live at the peak (peak - the others at that moment)."""
    peak_phase: str
    phases: dict
    at_peak: dict
    """activations and grads live at the peak moment (a backward-end peak holds few activations)."""
    host: int
    nvme: int
    settings: dict
    detail: dict

    def to_dict(self) -> dict:
        return {**self.components, "peak_phase": self.peak_phase, "phases": self.phases,
                "activations_at_peak": self.at_peak["activations"], "grads_at_peak": self.at_peak["grads"],
                "host_bytes": self.host, "nvme_bytes": self.nvme, "settings": self.settings,
                "detail": self.detail}


# ----------------------------------------------------------------------------- checkpoints on disk

CHECKPOINTS_KEPT = 2  # vlscale.engine.checkpoint.save_checkpoint's ``keep``
# What the files add to their tensors' bytes (pickle and safetensors headers, names, JSON), fitted on
# tiny runs of every stage and precision (DeepSpeed 0.19.8): per file, per module-state entry (its
# name, twice with param_shapes), per stage-0 optimizer tensor; a rank's client state (its RNG
# states as JSON) and, per frozen tensor, the fingerprint's name and two numbers. Within 3% of the
# files of those runs; the tensors' bytes are exact.
_FILE_OVERHEAD, _OPTIMIZER_ENTRY = 4096, 300
_MODULE_ENTRY = {0: 400, 1: 400, 2: 400, 3: 500}  # stage 3: each entry also carries ZeRO's metadata
_CLIENT_STATE, _FINGERPRINT_ENTRY, _ADAPTER_ENTRY, _UNIVERSAL_FILE = 35_000, 50, 200, 1550


@dataclass
class CheckpointEstimate:
    """Disk bytes of one save: ``checkpoints/step<N>/`` per rank, and ``adapter/`` (rank 0)."""

    tensor_bytes: list[int]
    """per rank, the tensors it writes (exact: the layout :func:`engine_state` follows)"""
    file_bytes: list[int]
    """per rank, the files it writes (tensors + estimated headers and client state)"""
    adapter: int
    universal: int = 0
    """ZeRO 1-3: the universal copy (``checkpoints/.universal-stepN``) a resume on another number of
    ranks writes before loading and removes after (estimated)"""
    kept: int = CHECKPOINTS_KEPT

    @property
    def total(self) -> int:
        return sum(self.file_bytes)

    @property
    def peak_on_disk(self) -> int:
        """output_dir's checkpoints at the peak of a save: the kept ones plus the one being written,
        and the adapter's old and new copy while it is replaced."""
        return (self.kept + 1) * self.total + 2 * self.adapter

    def to_dict(self) -> dict:
        return {"tensor_bytes_by_rank": self.tensor_bytes, "file_bytes_by_rank": self.file_bytes,
                "total": self.total, "adapter": self.adapter, "kept": self.kept, "peak_on_disk": self.peak_on_disk,
                "universal": self.universal}


def checkpoint_bytes(inv: ParamInventory, z: ZeroSettings, world: int, precision: str) -> CheckpointEstimate:
    """What vlscale's ``save_checkpoint`` writes (trainable state only, ``exclude_frozen_parameters``):

    * module state (stage 0-2: rank 0; stage 3: every rank): the trainable parameters in the run's
      precision (stage 3: 0-size placeholders, their data is in the optimizer partitions) and the
      persistent buffers
    * optimizer state, as held in memory (offloaded or not): stage 0 on rank 0, per-parameter fp32
      moments (+ fp32 masters in bf16/fp16); stage 1-3 each rank's fp32 master partition and moments
    * ``client_state_rank<R>.json``: data position, RNG states, the frozen weights' fingerprint
    """
    b = PRECISION_BYTES[precision]
    W = max(1, int(world))
    on_device = dataclasses.replace(z, offload_optimizer="none", offload_param="none")
    opt = engine_state(inv, on_device, W, precision, device="cpu").optimizer
    if z.offload_optimizer != "none":  # DeepSpeedCPUAdam counts steps in a Python int, not a 4-byte tensor
        groups = inv.optimizer_groups()
        opt -= 4 * (sum(len(_sub_groups(g, W, z.sub_group_size)) for g in groups) if z.stage == 3 else len(groups))
    tr = [n for n, t in zip(inv.names, inv.trainable) if t]
    module = inv.n_trainable * b if z.stage < 3 else 0
    module += inv.buffer_bytes(b)
    module_file = module + _FILE_OVERHEAD + (len(tr) + len(inv.buffers)) * _MODULE_ENTRY[z.stage]
    opt_file = opt + _FILE_OVERHEAD
    if z.stage == 0:  # the optimizer state is in rank 0's module file, per parameter
        opt_file = opt + len(tr) * (3 if precision == "fp32" else 4) * _OPTIMIZER_ENTRY
    fingerprint = sum(len(n) + _FINGERPRINT_ENTRY for n, t in zip(inv.names, inv.trainable) if not t)
    client = _CLIENT_STATE + fingerprint
    tensors, files = [], []
    for r in range(W):
        # stage 0: one file on rank 0; else an optimizer partition per rank, the module state on rank 0
        # (stage 1/2) or on every rank (stage 3)
        has_module, has_opt = (r == 0, r == 0) if z.stage == 0 else (z.stage == 3 or r == 0, True)
        tensors.append(has_module * module + has_opt * opt)
        files.append(has_module * module_file + has_opt * opt_file + client)
    adapter = inv.n_trainable * b + 2 * _FILE_OVERHEAD + len(tr) * _ADAPTER_ENTRY  # safetensors + its JSON
    # DeepSpeed's universal format: per trainable parameter, full-shape fp32 weights and both moments in
    # a file each (stage 1/2 also a step count each, and the buffers' fp32 copies); the module-state
    # files copied as they are, at stage 3 also one rank's optimizer file
    universal = 0
    if z.stage > 0:
        universal = 12 * inv.n_trainable + 3 * len(tr) * _UNIVERSAL_FILE
        if z.stage < 3:
            universal += len(tr) * (_UNIVERSAL_FILE + 4) + len(inv.buffers) * _UNIVERSAL_FILE + inv.buffer_bytes(4)
            universal += module_file
        else:
            universal += W * module_file + opt_file
    return CheckpointEstimate(tensors, files, adapter, universal)


PREDICTED_NVME_PATH = "(nvme_path: a prediction swaps nothing)"
"""What a prediction resolves an ``"auto"`` nvme_path to (zero3_nvme.json): it writes nothing there, so it needs no
``VLSCALE_NVME_PATH``; a run (``--measure``) resolves the variable, and a written config keeps ``"auto"``."""


def estimate_checkpoint(cfg: RunConfig, world_size: int = 1, ds_config: Union[dict, str, os.PathLike, None] = None,
                        *, vocab_size: Optional[int] = None,
                        inventory: Optional[ParamInventory] = None) -> CheckpointEstimate:
    """:func:`checkpoint_bytes` for ``cfg`` on ``world_size`` ranks (``ds_config`` as :func:`estimate_memory`)."""
    check_run_config(cfg, "estimate_checkpoint")
    ds_config = _ds_dict(cfg, world_size, ds_config, "cuda")
    z = ZeroSettings.from_ds_config(ds_config, stage=cfg.train.zero_stage)
    return checkpoint_bytes(inventory or parameter_inventory(cfg, vocab_size), z, world_size, cfg.train.precision)


def resolve_ds_config(cfg: RunConfig, world_size: int, ds_file=None, device_type: Optional[str] = None, *,
                      nvme_path: Optional[str] = None) -> dict:
    """The run's resolved DeepSpeed dict: the engine's ``build_deepspeed_config`` on its ``default_ds_file``
    (the file launchers/train.py takes; one that does not exist is refused with DeepSpeedConfigError).
    ``nvme_path``: as ``build_deepspeed_config``'s (a prediction: :data:`PREDICTED_NVME_PATH`)."""
    from vlscale.engine.deepspeed_config import build_deepspeed_config, default_ds_file

    return build_deepspeed_config(default_ds_file(cfg, ds_file), cfg, world_size, device_type=device_type or "cuda",
                                  nvme_path=nvme_path)


def _ds_dict(cfg: RunConfig, world_size: int, ds_config, device: str) -> dict:
    """An estimator's ``ds_config``: the DeepSpeed dict given, or the one a ds_configs/ file (its path; None: the
    run's default file) resolves to for a prediction."""
    if ds_config is None or isinstance(ds_config, (str, os.PathLike)):
        return resolve_ds_config(cfg, world_size, ds_config, device_type=device, nvme_path=PREDICTED_NVME_PATH)
    if not isinstance(ds_config, dict):
        raise TypeError(f"ds_config takes a DeepSpeed dict or a file's path, got {type(ds_config).__name__}")
    return ds_config


def estimate_memory(cfg: RunConfig, world_size: int = 1, ds_config: Union[dict, str, os.PathLike, None] = None, *,
                    device: str = "cuda", vocab_size: Optional[int] = None, padded: bool = True,
                    loss_mode: str = "trainer", inventory: Optional[ParamInventory] = None) -> MemoryEstimate:
    """Predict one rank's memory for ``cfg`` on ``world_size`` ranks.

    ``ds_config``: the run's DeepSpeed dict (its ZeRO stage, offload and bucket sizes; ``train.zero_stage``
    overrides the stage), or a ds_configs/ file's path (as :func:`~vlscale.profiling.planner.plan`'s
    ``ds_file``); default :func:`resolve_ds_config`. ``device``: ``cuda`` (planning) or ``cpu``
    (DeepSpeed's CPU accelerator, to compare with a measured CPU run). ``loss_mode``: ``trainer`` follows
    vlscale's engine (the model's own loss is computed too, the fp32 token-sum cross-entropy is
    backpropagated and the model output stays alive through the step), ``model`` backpropagates the
    model's loss and drops the output.
    """
    if loss_mode not in ("trainer", "model"):
        raise ValueError(f"loss_mode={loss_mode!r}: use 'trainer' or 'model'")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' or 'cpu'")
    from vlscale.engine.deepspeed_config import resolve_batch

    check_run_config(cfg, "estimate_memory")
    cfg = resolve_batch(cfg, world_size)  # the accumulation train.global_batch_size gives on world_size ranks
    ds_config = _ds_dict(cfg, world_size, ds_config, device)
    z = ZeroSettings.from_ds_config(ds_config, stage=cfg.train.zero_stage)
    precision = cfg.train.precision
    check_modelled(ds_config, z.stage, precision)
    b = PRECISION_BYTES[precision]
    inv = inventory or parameter_inventory(cfg, vocab_size)
    shapes = run_shapes(cfg, inv.vocab_size)
    zero3_linear = z.stage == 3 and z.memory_efficient_linear
    act = activation_report(cfg, shapes, TapeOptions(device=device, b=b, zero3_linear=zero3_linear, padded=padded))
    leaf = cfg.train.zero3_leaf_layers
    st = engine_state(inv, z, world_size, precision, device, leaf_layers=leaf,
                      prefetch_fills=not leaf or shapes.vision_on_the_fly)

    N, V = shapes.batch * shapes.dec_len, shapes.vocab
    L = act.logits
    A = act.saved
    extra_fwd = 0
    if loss_mode == "trainer":
        lsm32 = N * V * 4
        A += lsm32 + 4  # the trainer's fp32 log-probabilities (and its total_weight)
        upcast = N * V * 4 if b != 4 else 0  # logits.float() copy, alive while log_softmax runs
        extra_fwd = upcast
        head_grads = 2 * N * V * 4  # nll_loss's and log_softmax's gradients (fp32)
        # the output (logits, encoder output, the model's own loss graph) lives through the step
        enc = shapes.batch * shapes.enc_len * shapes.d_model * b
        kept_after_backward = L + act.log_probs + enc
        kept_in_backward = L + act.encoder_output
    else:
        head_grads = 2 * N * V * b
        kept_after_backward = 0
        kept_in_backward = 0
    base = st.params + st.optimizer + st.comm_persistent + act.batch_bytes
    # gradients held between optimizer steps: the engine's persistent buffers, or with accumulation the
    # previous micro-batches' gradients through the next one's forward and backward (ZeRO-0/1: every
    # trainable parameter's .grad, reduced at the boundary; ZeRO-2: the partition)
    g_persist = st.grads if st.grads_persist else 0
    if cfg.train.gradient_accumulation_steps > 1 and not st.grads_persist:
        n_trainable = sum(n for n, t in zip(inv.numels, inv.trainable) if t)
        g_persist = n_trainable * b if z.stage in (0, 1) else st.grads
    # ZeRO-1 releases its reduce buckets (two with overlap_comm) only at the accumulation boundary: the
    # buffers the first micro-batch's backward allocated stay through the next ones
    ipg_held = 0
    if cfg.train.gradient_accumulation_steps > 1 and z.stage == 1 and z.contiguous_gradients:
        ipg_held = (2 if z.overlap_comm else 1) * z.reduce_bucket_size * b
    g_persist += st.master_grads  # ZeRO-3's offloaded fp32 master gradients, where the host is the device
    held = g_persist + ipg_held
    phases = {}
    atp = {}

    def phase(name, total, acts, grads):
        phases[name] = int(total)
        atp[name] = (int(acts), int(grads))

    vision_gathered = 0
    if z.stage == 3 and zero3_copies_to_device(z, world_size, device) and shapes.vision_on_the_fly:
        vision_gathered = inv.vision_params * b + st.gather_transient
    Ah = A - act.batch_saved  # the activations beyond what the batch (in ``base``) holds already
    phase("vision_forward", base + held + act.vision_transient + vision_gathered, 0, g_persist)
    if st.gather_transient:  # late in forward, before the logits: a flat all-gather buffer beside the gathered
        phase("forward_gather", base + held + Ah + act.encoder_output + st.gathered + st.gather_transient,
              A, g_persist)
    phase("forward_end", base + held + Ah + L + act.encoder_output + extra_fwd + st.gathered, A, g_persist)
    phase("backward_start", base + held + Ah + kept_in_backward + head_grads + st.gathered, A, g_persist)
    # parameters every adapter site of the decoder uses (Hyperformer's decoder hypernetwork and task
    # embeddings): backward accumulates their gradients site after site from its first layers on (the
    # head's gradients consumed, the reduce buckets allocated); a second site's gradient and the
    # out-of-place sum with the first (ZeRO's hooks hold the .grad) live beside the .grad. The encoder's
    # hypernetwork gets its gradients only once backward reaches the encoder, the decoder's activations freed.
    shared = [n for n, nm, t in zip(inv.numels, inv.names, inv.trainable)
              if t and nm.startswith(SHARED_PEFT) and not nm.startswith(ENCODER_SHARED_PEFT)]
    if shared:
        buckets = st.comm_backward * (2 if z.stage in (1, 2) and z.overlap_comm else 1)
        acc = (sum(shared) + 2 * max(shared)) * b
        phase("backward_shared_grads", base + held + Ah + kept_in_backward + st.gathered + acc
              + buckets, A, g_persist + sum(shared) * b)
    if z.stage == 3:  # backward's first layers: the head's gradients gone, its weight released
        phase("backward_gather", base + held + Ah + kept_in_backward + st.gathered_backward, A, g_persist)
    if cfg.train.gradient_checkpointing:
        # the last layer's recompute: what forward kept is still there, or a unit gathered on demand later
        phase("backward_recompute", base + held + Ah + act.block_peak + kept_in_backward
              + max(st.gathered, st.gathered_backward) + st.comm_backward, A + act.block_peak, g_persist)
    boundary = st.grads + st.master_grads
    phase("backward_end", base + boundary + st.comm_backward + kept_after_backward, 0, boundary)
    phase("optimizer_step", base + boundary + st.step_transient + kept_after_backward, 0, boundary)
    if z.stage in (1, 2):
        # the gradient partition is allocated when the first reduce bucket fills, a fraction f of the
        # way through backward: activations of that fraction are gone, the whole partition is there
        f = st.detail["flush_fraction"]
        in_flight = head_grads // 2 + max((n for n, t in zip(inv.numels, inv.trainable) if t), default=0) * b
        phase("backward_first_reduce", base + max(A * (1 - f) - act.batch_saved, 0) + kept_in_backward + st.grads + st.comm_backward
              + in_flight + st.gathered, A * (1 - f), st.grads)
    init = st.params + (0 if st.optimizer_lazy else st.optimizer) + st.init_transient + st.comm_persistent + g_persist
    if z.stage == 3 and z.offload_param == "none":
        # without deepspeed.zero.Init the engine builds the whole model on each rank and DeepSpeed
        # moves it to the device before partitioning it; pretrained backbones load under zero.Init
        # (HfDeepSpeedConfig), so only the rest (CLIP, projection, PEFT) arrives whole
        whole = inv.total if not cfg.model.pretrained else sum(
            n for n, g in zip(inv.numels, inv.groups) if g in ("vision", "projection", "peft"))
        init = max(init, whole * b + (st.params if cfg.model.pretrained else 0))
    phase("init", init, 0, g_persist)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    acts_at, grads_at = atp[peak_phase]
    comps = {"params": st.params, "grads": st.grads, "optimizer": st.optimizer, "activations": A}
    comps["buffers"] = peak - st.params - st.optimizer - acts_at - grads_at
    comps["peak"] = peak
    settings = {"backbone": cfg.model.backbone, "vision": cfg.model.vision, "peft": cfg.peft.method,
                "train_lm": cfg.peft.train_lm, "world_size": world_size, "zero_stage": z.stage,
                "offload_optimizer": z.offload_optimizer, "offload_param": z.offload_param,
                "precision": precision, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                "micro_batch_size": cfg.train.micro_batch_size, "device": device,
                "encoder_length": shapes.enc_len, "decoder_length": shapes.dec_len, "loss_mode": loss_mode}
    detail = {"trainable_params": inv.n_trainable, "total_params": inv.total, "vocab_size": inv.vocab_size,
              "activation_parts": act.by_part, "block_recompute_peak": act.block_peak, "logits": L,
              "log_probs": act.log_probs, "batch": act.batch_bytes, "vision_transient": act.vision_transient,
              "zero3_gathered": st.gathered, "zero3_gathered_backward": st.gathered_backward,
              "zero3_gather_transient": st.gather_transient,
              "zero3_persistent_params": st.persistent_params, "zero_infinity": st.detail["zero_infinity"],
              # evaluation's generation with the model gathered whole (train.eval_gather, vlscale.engine.gathered):
              # every parameter whole on each rank, beside the partitions; or the decoding parameters alone
              "eval_gathered": inv.total * b if z.stage == 3 else 0,
              "eval_gathered_decoder": inv.decoding_params * b if z.stage == 3 else 0,
              "comm_buckets": st.comm_persistent + st.comm_backward, "step_transient": st.step_transient,
              "init_transient": st.init_transient, "vision_params": inv.vision_params,
              "vision_tokens": shapes.vision_tokens_per_image + (0 if shapes.vision_resnet else 1)}
    return MemoryEstimate(comps, peak_phase, phases, {"activations": acts_at, "grads": grads_at},
                          st.host, st.nvme, settings, detail)
