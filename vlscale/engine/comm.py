"""Communication volume of ZeRO-3 training: counted from the collectives, and predicted.

**Counting** (:class:`CommCounter`): a ``TorchDispatchMode`` that sees every ``c10d`` collective op
the process group runs, whoever calls it (DeepSpeed's ZeRO-3 coordinator, its gradient reduction,
the trainer's loss all-reduce), and whatever Python wrapper it came through
(``all_gather_into_tensor``, ``_all_gather_base``, coalesced variants, ``reduce_scatter_tensor``,
``all_reduce``, ``broadcast``...). Bytes are counted per op type with this convention:

    bytes of one collective = the size of the full, unpartitioned tensor it works on, per rank
        all_gather      the gathered output (W x the input partition)
        reduce_scatter  the full input (W x the output partition)
        all_reduce      the tensor;   broadcast: the tensor
    wire bytes (what each rank sends under the ring / tree algorithms NCCL and gloo use)
        all_gather, reduce_scatter: (W-1)/W x bytes;  all_reduce: 2 (W-1)/W x bytes;  broadcast: bytes

**Predicting** (:func:`predict_zero3_comm`): the frozen-aware ZeRO-3 accounting of one optimizer
step. Which modules run, how often, and whether gradients flow back through them comes from one
forward of the model built on the ``meta`` device (no memory, no weights: every registry backbone
up to t5-11b in seconds), recorded with module hooks. Then, with b the bytes per element of the
parameters, P(p) = W * ceil(numel(p) / W) the padded size ZeRO-3 gathers, k micro-batches::

    all_gather     = k * [ sum over forward calls of a module: P(p) * b for its non-persistent params
                         + sum over calls whose output needs a gradient: the same again (backward) ]
                     + P * b of every persistent parameter (DeepSpeed re-gathers them after the step)
    reduce_scatter = k * sum over trainable params: P(p) * g     (g: gradient communication bytes)

so a frozen parameter costs an all-gather in forward and, when gradients pass through its module
(frozen linear layers inside the encoder/decoder), one in backward, and never a reduce-scatter;
frozen embeddings (integer inputs) and the ``no_grad`` vision encoder are gathered in forward only.
Persistent parameters (``numel <= stage3_param_persistence_threshold``, within
``stage3_model_persistence_threshold``) stay whole and are not gathered per use. A ZeRO-3 leaf
module (each LM layer with ``train.zero3_leaf_layers``) is one module here: all its parameters are
gathered for a call, and again in backward when the layer's output needs a gradient, also those of
its submodules whose own output does not (T5's relative position bias).

A gathered parameter is released after its module ran unless DeepSpeed sees it used again within
``stage3_max_reuse_distance`` elements of the step's module trace (forward calls, then the calls
that need gradients in reverse); the accounting replays that rule over the traced calls, so with
re-use (DeepSpeed's default 1e9) a parameter used at the end of forward and the start of backward
is gathered once. With ``stage3_max_reuse_distance = 0`` every use is a gather. This is the steady
state from the second step on: DeepSpeed records the trace during the first step and releases
everything after use meanwhile (and gathers the persistent parameters once at their first use).
Prefetching (``stage3_prefetch_bucket_size``) moves gathers earlier; it can also keep a parameter
whose next use falls inside the prefetch window, which the accounting does not model (it then
over-predicts: ``prefetch`` in the detail says whether prefetching was on).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OP_TYPES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "other")

# c10d op name -> (op type, index of the argument holding the full tensors)
_C10D_OPS = {
    "_allgather_base_": ("all_gather", 0),
    "allgather_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "alltoall_": ("other", 1),
    "alltoall_base_": ("other", 1),
    "gather_": ("other", 1),
    "scatter_": ("other", 0),
    "reduce_": ("other", 0),
    "send": ("other", 0),
    "recv_": ("other", 0),
    "recv_any_source_": ("other", 0),
}
_WIRE_FACTOR = {"all_gather": lambda w: (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
                "all_reduce": lambda w: 2 * (w - 1) / w, "broadcast": lambda w: 1.0 if w > 1 else 0.0,
                "other": lambda w: 1.0}


def _tensor_bytes(obj) -> int:
    flat, _ = tree_flatten(obj)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def _c10d_op_name(func) -> Optional[str]:
    name = getattr(func, "_schema", None)
    name = name.name if name is not None else ""
    if not name.startswith("c10d::"):
        return None
    return name.split("::", 1)[1]


class CommCounter(TorchDispatchMode):
    """Counts the bytes and calls of every collective run while active (see the module docstring).

    ``with CommCounter(world_size) as c: ...``; read ``c.bytes`` / ``c.calls`` (dicts by op type),
    ``c.wire_bytes()``, or ``c.snapshot()``; ``c.reset()`` starts a new count (e.g. per step).
    ``log=True`` also keeps one ``(op, c10d name, dtype, bytes)`` record per call in ``c.records``.
    """

    def __init__(self, world_size: int, log: bool = False):
        super().__init__()
        if world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be >= 1")
        self.world_size = int(world_size)
        self.log = log
        self.reset()

    def reset(self) -> None:
        self.bytes = {k: 0 for k in OP_TYPES}
        self.calls = {k: 0 for k in OP_TYPES}
        self.records: list[tuple[str, str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _c10d_op_name(func)
        if name is not None and name in _C10D_OPS:
            kind, index = _C10D_OPS[name]
            n = _tensor_bytes(args[index]) if len(args) > index else 0
            self.bytes[kind] += n
            self.calls[kind] += 1
            if self.log:
                flat, _ = tree_flatten(args[index] if len(args) > index else ())
                dtype = next((str(t.dtype) for t in flat if isinstance(t, torch.Tensor)), "")
                self.records.append((kind, name, dtype, n))
        return func(*args, **(kwargs or {}))

    def wire_bytes(self) -> dict:
        w = self.world_size
        return {k: int(round(v * _WIRE_FACTOR[k](w))) for k, v in self.bytes.items()}

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "wire_bytes": self.wire_bytes(),
                "world_size": self.world_size}


# ----------------------------------------------------------------------------- the module-use trace

@dataclass
class ModuleCall:
    """One call of a module that owns parameters directly, in forward order."""

    module: str
    params: list[str]
    """Names (first registered name) of the module's own parameters (``recurse=False``; a ZeRO-3 leaf
    module's: all the parameters under it)."""
    backward: bool
    """Some output needs a gradient: ZeRO-3 gathers the parameters again in backward."""


@dataclass
class ParamInfo:
    numel: int
    trainable: bool


class _MetaScalars(TorchDispatchMode):
    """Answers data-dependent scalar reads on meta tensors (``mask.all()`` in HF's mask helpers) so a
    forward on the meta device runs through; values only steer fast paths, never which modules run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


def trace_module_calls(model: torch.nn.Module, batch: dict, forward=None) -> tuple[list[ModuleCall], dict]:
    """Run one training-mode forward (``forward(model, batch)``, default ``model(batch)``) and record
    every call of a module with direct parameters. A ZeRO-3 leaf module (``set_z3_leaf_modules``, e.g.
    an LM layer with ``train.zero3_leaf_layers``) is one call with all the parameters under it, and
    its descendants are not recorded: DeepSpeed gathers the whole unit, in backward too when the
    unit's output needs a gradient. -> (calls, {param name: ParamInfo}) with each shared parameter
    under its first name, in ``named_parameters`` order."""
    names: dict[int, str] = {}
    info: dict[str, ParamInfo] = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        info[name] = ParamInfo(int(getattr(p, "ds_numel", p.numel())), bool(p.requires_grad))
    calls: list[ModuleCall] = []
    mod_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    leaves = [m for m in model.modules() if getattr(m, "_z3_leaf", False)]
    inside_leaf = {id(d) for m in leaves for d in m.modules() if d is not m}

    def hook(mod, args, out):
        if id(mod) in inside_leaf:
            return
        leaf = getattr(mod, "_z3_leaf", False)
        own = [names[id(p)] for p in mod.parameters(recurse=leaf) if id(p) in names]
        if not own:
            return
        flat, _ = tree_flatten(out)
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)
        calls.append(ModuleCall(mod_names.get(id(mod), type(mod).__name__), own, needs_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.train()
    try:
        ctx = _MetaScalars() if any(p.device.type == "meta" for p in model.parameters()) else contextlib.nullcontext()
        with ctx:
            (forward or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls, info


# ----------------------------------------------------------------------------- the accounting

@dataclass
class CommPrediction:
    """Predicted bytes per optimizer step per rank (the counting convention of :class:`CommCounter`)."""

    all_gather: int
    reduce_scatter: int
    world_size: int
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def persistent_parameters(info: dict[str, ParamInfo], param_threshold: int,
                          model_threshold: int = 2 ** 63 - 1) -> set[str]:
    """DeepSpeed's rule (``mark_persistent_parameters``): in ``named_parameters`` order, a parameter
    of at most ``param_threshold`` elements stays whole while the running total fits ``model_threshold``."""
    kept, total = set(), 0
    for name, p in info.items():
        if p.numel + total > model_threshold:
            continue
        if p.numel <= param_threshold:
            kept.add(name)
            total += p.numel
    return kept


def zero3_comm_accounting(calls: Iterable[ModuleCall], info: dict[str, ParamInfo], world_size: int, *,
                          param_bytes: int, grad_bytes: Optional[int] = None, micro_batches: int = 1,
                          param_persistence_threshold: int = 100_000,
                          model_persistence_threshold: int = 2 ** 63 - 1,
                          max_reuse_distance: int = 0) -> CommPrediction:
    """The frozen-aware accounting of one optimizer step (formulas: module docstring)."""
    W = int(world_size)
    if W < 1:
        raise ValueError(f"world_size={world_size!r} must be >= 1")
    g = param_bytes if grad_bytes is None else grad_bytes
    persistent = persistent_parameters(info, param_persistence_threshold, model_persistence_threshold)

    def padded(name: str) -> int:
        return W * math.ceil(info[name].numel / W)

    calls = list(calls)
    trace = [(c, "forward") for c in calls] + [(c, "backward") for c in reversed(calls) if c.backward]
    gathered = {"forward": {"frozen": 0, "trainable": 0}, "backward": {"frozen": 0, "trainable": 0}}
    available: set[str] = set()
    for s, (call, phase) in enumerate(trace):
        own = [n for n in dict.fromkeys(call.params) if n not in persistent]
        for name in own:
            if name not in available:
                gathered[phase]["trainable" if info[name].trainable else "frozen"] += padded(name) * param_bytes
                available.add(name)
        release = set(own)
        traversed = 0  # DeepSpeed keeps a parameter used again within max_reuse_distance elements
        for later, _ in trace[s + 1:]:
            if traversed >= max_reuse_distance or not release:
                break
            for name in later.params:
                release.discard(name)
                traversed += info[name].numel
        available -= release
    fwd, bwd = gathered["forward"], gathered["backward"]
    post_step = sum(padded(n) for n in persistent) * param_bytes
    trainable = [n for n, p in info.items() if p.trainable]
    rs = sum(padded(n) for n in trainable) * g
    k = int(micro_batches)
    detail = {"forward_all_gather": {key: v * k for key, v in fwd.items()},
              "backward_all_gather": {key: v * k for key, v in bwd.items()},
              "post_step_all_gather": post_step,
              "reduce_scatter_per_micro_batch": rs, "micro_batches": k,
              "persistent_params": len(persistent), "persistent_numel": sum(info[n].numel for n in persistent),
              "param_bytes": param_bytes, "grad_bytes": g, "max_reuse_distance": max_reuse_distance,
              "frozen_numel": sum(p.numel for p in info.values() if not p.trainable),
              "trainable_numel": sum(p.numel for p in info.values() if p.trainable)}
    all_gather = k * (sum(fwd.values()) + sum(bwd.values())) + post_step
    return CommPrediction(int(all_gather), int(k * rs), W, detail)


def _zero_settings(ds_config: dict) -> dict:
    z = dict(ds_config.get("zero_optimization") or {})

    def num(key, default):
        v = z.get(key, default)
        return default if v in (None, "auto") else int(float(v))

    return {"stage": int(z.get("stage", 0)),
            "param_persistence_threshold": num("stage3_param_persistence_threshold", 100_000),
            "model_persistence_threshold": num("stage3_model_persistence_threshold", 2 ** 63 - 1),
            "max_reuse_distance": num("stage3_max_reuse_distance", 1_000_000_000),
            "prefetch_bucket_size": num("stage3_prefetch_bucket_size", 50_000_000)}


def communication_dtype_bytes(ds_config: dict, precision: str) -> int:
    """Bytes per gradient element ZeRO-3 reduces: ``communication_data_type`` if set, else the
    parameters' dtype."""
    names = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
    explicit = ds_config.get("communication_data_type")
    if explicit is not None:
        if str(explicit).lower() not in names:
            raise ValueError(f"communication_data_type={explicit!r} is not one of {sorted(names)}")
        return names[str(explicit).lower()]
    return names[precision]


def predict_zero3_comm(cfg, ds_config: dict, world_size: int, *, vocab_size: Optional[int] = None,
                       model: Optional[torch.nn.Module] = None) -> CommPrediction:
    """Predicted ZeRO-3 communication of one optimizer step of ``cfg`` on ``world_size`` ranks.

    Builds the model on the ``meta`` device (or uses ``model``, which must hold full-shape meta or
    real parameters), runs one forward on a batch of the run's shapes to learn which modules run and
    which need gradients, and applies :func:`zero3_comm_accounting` with the DeepSpeed dict's
    persistence thresholds, ``train.gradient_accumulation_steps`` micro-batches, the precision's
    parameter bytes and the gradient communication dtype.
    """
    from vlscale.modeling.vl_model import build_model
    from vlscale.profiling.analytic import default_vocab_size
    from vlscale.profiling.measure import synthetic_batch

    z = _zero_settings(ds_config)
    if z["stage"] != 3:
        raise ValueError(f"zero_optimization.stage={z['stage']}: the accounting is for ZeRO stage 3")
    if cfg.train.gradient_checkpointing:
        raise NotImplementedError("train.gradient_checkpointing=true re-runs checkpointed blocks' forward (and "
                                  "their gathers) in backward; the accounting does not model the recompute yet")
    vocab = vocab_size or default_vocab_size(cfg)
    if model is None:
        meta_cfg = copy.deepcopy(cfg)
        meta_cfg.train.gradient_checkpointing = False
        model = build_model(meta_cfg, vocab_size=vocab, device="meta")
        from vlscale.engine.sharded_loading import mark_zero3_leaf_layers

        mark_zero3_leaf_layers(model, cfg)  # as the trainer's build_model_zero3
    device = next(model.parameters()).device
    batch = synthetic_batch(cfg, 1, vocab, device=device, dtype=next(model.parameters()).dtype)
    calls, info = trace_module_calls(model, batch)
    b = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.train.precision]
    prediction = zero3_comm_accounting(calls, info, world_size, param_bytes=b,
                                 grad_bytes=communication_dtype_bytes(ds_config, cfg.train.precision),
                                 micro_batches=cfg.train.gradient_accumulation_steps,
                                 param_persistence_threshold=z["param_persistence_threshold"],
                                 model_persistence_threshold=z["model_persistence_threshold"],
                                 max_reuse_distance=z["max_reuse_distance"])
    prediction.detail["prefetch"] = world_size > 1 and z["prefetch_bucket_size"] > 0
    return prediction
