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
        all_gather, reduce_scatter: (W-1)/W x bytes;  all_reduce: 2 (W-1)/W x bytes;  broadcast, other: bytes
        (on one rank nothing is sent: 0)

**Predicting** (:func:`predict_zero3_comm`): the frozen-aware ZeRO-3 accounting of one optimizer
step. Which modules run, how often, in which order, and when gradients reach them comes from one
forward and backward of the model built on the ``meta`` device (no memory, no weights: every registry
backbone up to t5-11b in seconds), traced by :func:`trace_zero3_step` with hooks placed and triggered
as DeepSpeed's: a unit's (a module outside the leaf units, or a leaf unit) pre-forward gathers its
parameters and its post-forward releases them; a gradient reaching one of its output tensors gathers
them for backward, and they are released once the gradients of its input tensors are computed. In
the simplest case, with b the bytes per element of the parameters, P(p) = W * ceil(numel(p) / W) the
padded size ZeRO-3 gathers, k micro-batches::

    all_gather     = k * [ sum over forward calls of a module: P(p) * b for its non-persistent params
                         + sum over calls whose output needs a gradient: the same again (backward) ]
                     + P * b of every persistent parameter (DeepSpeed re-gathers them after the step)
    reduce_scatter = k * sum over trainable params: P(p) * g     (g: gradient communication bytes)

so a frozen parameter costs an all-gather in forward and, when gradients pass through its module
(frozen linear layers inside the encoder/decoder), one in backward, and never a reduce-scatter;
frozen embeddings (integer inputs) and the ``no_grad`` vision encoder are gathered in forward only.
Persistent parameters (``numel <= stage3_param_persistence_threshold``, within
``stage3_model_persistence_threshold``) stay whole and are not gathered per use. A ZeRO-3 leaf
module (each LM layer with ``train.zero3_leaf_layers``) is one unit: all its parameters are
gathered for a call, and again in backward when the layer's output needs a gradient, also those of
its submodules whose own output does not (T5's relative position bias). A parameter a module's
forward reads without calling its owner (``nn.MultiheadAttention``'s ``out_proj.weight``, T5's
``wo.weight`` read by ``T5DenseActDense``) is gathered with the reading unit, as DeepSpeed registers it
there (an external parameter) on the first step.

**Gradient checkpointing** (``train.gradient_checkpointing``: transformers checkpoints each layer's
``forward``, non-reentrant, so a leaf layer's own hooks stay outside the checkpoint): in backward,
the first tensor a checkpointed layer saved runs its forward again, up to the last saved tensor
backward needs, interleaved with backward. The recompute calls the layer's submodules, each hooked
unit's pre-forward gathering what is not gathered: a leaf layer is still gathered for its own
backward, so only the units it calls outside it (the PEFT adapters its sublayers call) are gathered
again, except one gathered already for its own backward (the last adapter of the layer); module by
module, the layer's frozen linears too, which DeepSpeed holds for the backward unit running then and
releases with it. Checkpointing also makes the embeddings' output need a gradient
(``enable_input_require_grads``), so the token embeddings are gathered in backward. The detail keeps
``recompute_all_gather`` apart from ``backward_all_gather``.

A gathered parameter is released when its unit is done unless DeepSpeed sees it used again within
``stage3_max_reuse_distance`` elements of the step's module trace (every pre-forward and pre-backward
in order, recomputes included; the elements counted as DeepSpeed counts them, a leaf unit's release
counting the later units' parameters recursively) and unless another running unit holds it; the
accounting replays those rules over the trace, so with re-use (DeepSpeed's default 1e9) a parameter
used at the end of forward and the start of backward is gathered once. With
``stage3_max_reuse_distance = 0`` every use is a gather. This is the steady state from the second
step on: DeepSpeed records the trace during the first step and releases everything after use
meanwhile (and gathers the persistent parameters once at their first use). Prefetching
(``stage3_prefetch_bucket_size``) moves gathers earlier; it can also keep a parameter whose next use
falls inside the prefetch window, which the accounting does not model (it then over-predicts:
``prefetch`` in the detail says whether prefetching was on). Counted = predicted to the byte on the
tiny CLIP-T5 on 2 ranks, leaf layers or module by module, with and without checkpointing, re-use
distances 0, 6e4-2e5 (where the window binds) and 1e9; tests/unit/test_comm_accounting.py runs two.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlscale.config import PRECISION_BYTES, PRECISIONS

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
    "gather_into_tensor_": ("other", 1),
    "scatter_": ("other", 0),
    "reduce_": ("other", 0),
    "send": ("other", 0),
    "recv_": ("other", 0),
    "recv_any_source_": ("other", 0),
}
_WIRE_FACTOR = {"all_gather": lambda w: (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
                "all_reduce": lambda w: 2 * (w - 1) / w, "broadcast": lambda w: 1.0 if w > 1 else 0.0,
                "other": lambda w: 1.0 if w > 1 else 0.0}


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


# ----------------------------------------------------------------------------- the ZeRO-3 step trace

@dataclass
class Zero3Unit:
    """A module DeepSpeed's ZeRO-3 hooks: every module outside a leaf unit, and each leaf unit
    (``set_z3_leaf_modules``), whose parameters it gathers as one."""

    name: str
    leaf: bool
    direct: list[str]
    """Its own parameters (``recurse=False``), by first registered name."""
    nested: list[str]
    """Every parameter under it (``recurse=True``)."""


@dataclass
class Zero3Trace:
    """One micro-batch's forward and backward as DeepSpeed's ZeRO-3 hooks see it.

    ``events`` in order, each ``(kind, unit index, arg)``:
    ``("fetch", u, phase)`` a unit's pre-forward (phase ``forward``; ``recompute`` when a checkpointed
    block's forward runs again inside backward) or pre-backward hook (``backward``: a gradient reached
    one of its output tensors; once per such tensor);
    ``("release", u, "forward" | "backward")`` its post-forward hook, or its post-backward hook (the
    gradients of all its input tensors that need one are computed);
    ``("access", u, param)`` in forward, unit ``u`` (the innermost running one) read a parameter it
    does not own (DeepSpeed's parameter getter makes it an external parameter of ``u`` if it is not
    gathered then); ``("backward_end", None, None)``."""

    units: list[Zero3Unit]
    events: list[tuple]
    info: dict[str, ParamInfo]


class _ParamAccess(dict):
    """A module's ``_parameters`` that reports each read (DeepSpeed's ``ZeROOrderedDict`` does the same to
    find external parameters)."""

    on_access = None

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if self.on_access is not None and value is not None:
            self.on_access(value)
        return value


def _apply_to_tensors(fn, value):
    """DeepSpeed's ``apply_to_tensors_only``: ``fn`` on each tensor of nested tuples, lists and dicts
    (dicts in place)."""
    if isinstance(value, (tuple, list)):
        out = [_apply_to_tensors(fn, v) for v in value]
        return value.__class__(*out) if hasattr(value, "_fields") else value.__class__(out)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = _apply_to_tensors(fn, value[key])
        return value
    return fn(value) if isinstance(value, torch.Tensor) else value


def _default_loss(out) -> torch.Tensor:
    """A loss over the logits (the trainer's cross-entropy reads only them), else the output's own."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None:
        logits = out["loss"] if isinstance(out, dict) else out.loss
    return logits.float().sum()


def trace_zero3_step(model: torch.nn.Module, batch: dict, forward=None, loss=None) -> Zero3Trace:
    """Run one training-mode forward (``forward(model, batch)``, default ``model(batch)``) and backward
    (of ``loss(output)``, default the sum of the logits) with hooks placed and triggered as DeepSpeed's
    ZeRO-3 places them (``DeepSpeedZeRoOffload._register_deepspeed_module``): pre-forward and
    post-forward hooks on every unit, an autograd function on each output tensor whose backward is the
    unit's pre-backward hook, one on each positional input tensor whose backward counts down to the
    unit's post-backward hook. Gradient checkpointing runs as configured on the model, so a checkpointed
    block's recompute (its submodules' forward again, inside backward, stopped after the last tensor
    backward needs) is in the trace, interleaved with backward as it runs. Works on the ``meta``
    device. -> :class:`Zero3Trace`; the model's gradients and hooks are left as they were."""
    names: dict[int, str] = {}
    info: dict[str, ParamInfo] = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        info[name] = ParamInfo(int(getattr(p, "ds_numel", p.numel())), bool(p.requires_grad))
    mod_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    hooked: list[torch.nn.Module] = []  # DeepSpeed's recursion: children of non-leaf modules, repeats included

    def walk(m):
        hooked.append(m)
        if not getattr(m, "_z3_leaf", False):
            for child in m.children():
                walk(child)

    walk(model)
    index: dict[int, int] = {}
    units: list[Zero3Unit] = []
    for m in hooked:
        if id(m) not in index:
            index[id(m)] = len(units)
            units.append(Zero3Unit(mod_names.get(id(m), type(m).__name__), bool(getattr(m, "_z3_leaf", False)),
                                   [names[id(p)] for p in m.parameters(recurse=False) if id(p) in names],
                                   [names[id(p)] for p in m.parameters(recurse=True) if id(p) in names]))
    owned = [set(u.nested if u.leaf else u.direct) for u in units]
    events: list[tuple] = []
    stack: list[int] = []  # DeepSpeed's FWD_MODULE_STACK
    in_forward = [False]

    def on_access(p):
        name = names.get(id(p))
        if in_forward[0] and stack and name is not None and name not in owned[stack[-1]]:
            events.append(("access", stack[-1], name))

    def unit_functions(u: int, state: dict):
        class PreBackward(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x.detach()

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def backward(ctx, *grads):
                events.append(("fetch", u, "backward"))
                return grads

        class PostBackward(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x.detach()

            @staticmethod
            def setup_context(ctx, inputs, output):
                if inputs[0].requires_grad:
                    state["remaining"] += 1

            @staticmethod
            def backward(ctx, *grads):
                state["remaining"] -= 1
                if state["remaining"] == 0:
                    events.append(("release", u, "backward"))
                return grads

        return PreBackward, PostBackward

    functions: dict[int, tuple] = {}
    handles = []
    for m in hooked:
        u = index[id(m)]
        if u not in functions:
            state = {"remaining": 0}
            functions[u] = unit_functions(u, state) + (state,)
        pre_backward, post_backward, state = functions[u]

        def pre_forward(mod, args, u=u):
            stack.append(u)
            events.append(("fetch", u, "recompute" if torch._C._current_graph_task_id() != -1 else "forward"))

        def post_forward(mod, args, out, u=u):
            if stack:
                stack.pop()
            events.append(("release", u, "forward"))

        def wrap_outputs(mod, args, out, fn=pre_backward):
            return _apply_to_tensors(fn.apply, out)

        def wrap_inputs(mod, args, fn=post_backward, state=state):
            state["remaining"] = 0
            return _apply_to_tensors(fn.apply, args)

        # DeepSpeed's order: after the model's own hooks (PEFT sites), fetch and release, then the
        # pre-backward function on the outputs and the post-backward one on the inputs
        handles += [m.register_forward_pre_hook(pre_forward), m.register_forward_hook(post_forward),
                    m.register_forward_hook(wrap_outputs), m.register_forward_pre_hook(wrap_inputs)]
    swapped = []
    for m in {id(m): m for m in model.modules()}.values():
        if type(m.__dict__.get("_parameters")) is dict:
            access = _ParamAccess(m._parameters)
            access.on_access = on_access
            swapped.append((m, m._parameters))
            m._parameters = access
    # the trace's backward must neither add to gradients the model holds nor leave its own: set them aside
    had_grad = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    was_training = model.training
    model.train()
    try:
        ctx = _MetaScalars() if any(p.device.type == "meta" for p in model.parameters()) else contextlib.nullcontext()
        with ctx:
            in_forward[0] = True
            out = (forward or (lambda m, b: m(b)))(model, batch)
            in_forward[0] = False
            (loss or _default_loss)(out).backward()
        events.append(("backward_end", None, None))
    finally:
        in_forward[0] = False
        for h in handles:
            h.remove()
        for m, original in swapped:
            m._parameters = original
        for p in model.parameters():
            p.grad = had_grad.get(id(p))
        model.train(was_training)
    return Zero3Trace(units, events, info)


def _calls_to_trace(calls: Iterable[ModuleCall], info: dict[str, ParamInfo]) -> Zero3Trace:
    """A forward-only call list as a step trace: each call gathered and released in forward, then those
    whose output needs a gradient in reverse order, each gathered and released in backward."""
    calls = list(calls)
    units = [Zero3Unit(c.module, False, list(c.params), list(c.params)) for c in calls]
    events = [e for i in range(len(calls)) for e in (("fetch", i, "forward"), ("release", i, "forward"))]
    events += [e for i in reversed(range(len(calls))) if calls[i].backward
               for e in (("fetch", i, "backward"), ("release", i, "backward"))]
    return Zero3Trace(units, events + [("backward_end", None, None)], info)


def _replay_zero3(trace: Zero3Trace, persistent: set[str], max_reuse_distance: int, *, record: bool,
                  external: dict[int, list[str]]) -> list[tuple[str, str]]:
    """DeepSpeed's ``PartitionedParameterCoordinator`` over one micro-batch's trace (no prefetch): which
    parameters are gathered when. ``record``: the first step's rule (release all after each use);
    else the steady state's re-use rule over the recorded fetch order. ``external`` (per unit, filled
    in): parameters registered by the getter. -> [(phase, parameter name)] per gather."""
    units, info = trace.units, trace.info
    order = [u for kind, u, _ in trace.events if kind == "fetch"]

    def params(u: int, recurse: Optional[bool] = None) -> list[str]:
        unit = units[u]
        own = unit.nested if (unit.leaf if recurse is None else recurse) else unit.direct
        return own + external.get(u, [])

    gathers: list[tuple[str, str]] = []
    available: set[str] = set()
    active: dict[str, set] = {}  # parameter -> the units holding it (ds_active_sub_modules)
    backward: dict[int, None] = {}  # units between pre- and post-backward, in first-fetch order
    recomputed: dict[int, set] = {}  # frozen parameters a recompute gathered, held by a backward unit
    step = 0
    for kind, u, arg in trace.events:
        if kind == "fetch":
            if arg == "backward":
                backward[u] = None
            own = params(u)
            for name in dict.fromkeys(own):
                if name not in persistent and name not in available:
                    gathers.append((arg, name))
                    available.add(name)
            for name in own:
                active.setdefault(name, set()).add(u)
                # a frozen parameter gathered by a recompute stays until the backward unit running
                # then is done (DeepSpeed's update_recompute_parameters)
                if arg == "recompute" and backward and not info[name].trainable:
                    owner = next(reversed(backward))
                    recomputed.setdefault(owner, set()).add(name)
                    active[name].add(owner)
            step += 1
        elif kind == "release":
            own = params(u)
            release = set(own)
            if not record:
                release -= persistent
                traversed = 0  # kept if used again within max_reuse_distance elements of the trace
                for later in order[step:]:
                    if traversed >= max_reuse_distance or not release:
                        break
                    for name in params(later, recurse=units[u].leaf):
                        release.discard(name)
                        traversed += info[name].numel
            held = set(own)
            if arg == "backward":
                extra = recomputed.pop(u, set())
                release |= extra - persistent
                held |= extra
                backward.pop(u, None)
            for name in held:
                active.get(name, set()).discard(u)
                if name in release and name not in persistent and not active.get(name):
                    available.discard(name)
        elif kind == "access":
            if arg not in persistent and arg not in available:
                external.setdefault(u, [])
                if arg not in external[u]:
                    external[u].append(arg)
                gathers.append(("forward", arg))
                available.add(arg)
        elif kind == "backward_end":  # release_backward_leftovers
            while backward:
                left, _ = backward.popitem()
                for name in set(params(left)) | recomputed.pop(left, set()):
                    active.get(name, set()).discard(left)
                    if name not in persistent and not active.get(name):
                        available.discard(name)
    return gathers


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


def zero3_comm_accounting(calls, info: dict[str, ParamInfo], world_size: int, *,
                          param_bytes: int, grad_bytes: Optional[int] = None, micro_batches: int = 1,
                          param_persistence_threshold: int = 100_000,
                          model_persistence_threshold: int = 2 ** 63 - 1,
                          max_reuse_distance: int = 0) -> CommPrediction:
    """The frozen-aware accounting of one optimizer step (formulas: module docstring). ``calls``: a
    :class:`Zero3Trace` (:func:`trace_zero3_step`; ``info`` is then its own), or forward-only
    :class:`ModuleCall` s, each gathered in forward and, when its output needs a gradient, in backward."""
    W = int(world_size)
    if W < 1:
        raise ValueError(f"world_size={world_size!r} must be >= 1")
    g = param_bytes if grad_bytes is None else grad_bytes
    trace = calls if isinstance(calls, Zero3Trace) else _calls_to_trace(calls, info)
    info = trace.info
    persistent = persistent_parameters(info, param_persistence_threshold, model_persistence_threshold)

    def padded(name: str) -> int:
        return W * math.ceil(info[name].numel / W)

    external: dict[int, list[str]] = {}
    if any(kind == "access" for kind, _, _ in trace.events):  # the first step finds the external parameters
        _replay_zero3(trace, persistent, max_reuse_distance, record=True, external=external)
    gathered = {phase: {"frozen": 0, "trainable": 0} for phase in ("forward", "recompute", "backward")}
    for phase, name in _replay_zero3(trace, persistent, max_reuse_distance, record=False, external=external):
        gathered[phase]["trainable" if info[name].trainable else "frozen"] += padded(name) * param_bytes
    post_step = sum(padded(n) for n in persistent) * param_bytes
    trainable = [n for n, p in info.items() if p.trainable]
    rs = sum(padded(n) for n in trainable) * g
    k = int(micro_batches)
    detail = {f"{phase}_all_gather": {key: v * k for key, v in gathered[phase].items()}
              for phase in ("forward", "backward", "recompute")}
    detail.update({"post_step_all_gather": post_step,
                   "reduce_scatter_per_micro_batch": rs, "micro_batches": k,
                   "persistent_params": len(persistent),
                   "persistent_numel": sum(info[n].numel for n in persistent),
                   "external_params": sum(len(v) for v in external.values()),
                   "param_bytes": param_bytes, "grad_bytes": g, "max_reuse_distance": max_reuse_distance,
                   "frozen_numel": sum(p.numel for p in info.values() if not p.trainable),
                   "trainable_numel": sum(p.numel for p in info.values() if p.trainable)})
    all_gather = k * sum(sum(v.values()) for v in gathered.values()) + post_step
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
    """Bytes per gradient element ZeRO-3 reduces: ``communication_data_type`` if set (DeepSpeed takes
    only ``fp32``, ``fp16``, ``bf16`` there, case aside), else the parameters' dtype."""
    explicit = ds_config.get("communication_data_type")
    if explicit is not None and str(explicit).lower() not in PRECISIONS:
        raise ValueError(f"communication_data_type={explicit!r} is not one of {PRECISIONS}")
    return PRECISION_BYTES[precision if explicit is None else str(explicit).lower()]


def _checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether some block of ``model`` is set to checkpoint (transformers' ``gradient_checkpointing`` flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def predict_zero3_comm(cfg, ds_config: dict, world_size: int, *, vocab_size: Optional[int] = None,
                       model: Optional[torch.nn.Module] = None) -> CommPrediction:
    """Predicted ZeRO-3 communication of one optimizer step of ``cfg`` on ``world_size`` ranks.

    Builds the model on the ``meta`` device as the run builds it (LM layers as leaf units with
    ``train.zero3_leaf_layers``, gradient checkpointing with ``train.gradient_checkpointing``), or
    uses ``model`` (full-shape meta or real parameters, built from ``cfg``), traces one forward and
    backward on a batch of the run's shapes (:func:`trace_zero3_step`), and applies
    :func:`zero3_comm_accounting` with the DeepSpeed dict's persistence thresholds and re-use distance,
    ``train.gradient_accumulation_steps`` micro-batches, the precision's parameter bytes and the
    gradient communication dtype.
    """
    from vlscale.engine.deepspeed_config import resolve_batch
    from vlscale.modeling.vl_model import build_model
    from vlscale.profiling.analytic import default_vocab_size
    from vlscale.profiling.measure import synthetic_batch

    z = _zero_settings(ds_config)
    if z["stage"] != 3:
        raise ValueError(f"zero_optimization.stage={z['stage']}: the accounting is for ZeRO stage 3")
    vocab = vocab_size or default_vocab_size(cfg)
    if model is None:
        model = build_model(cfg, vocab_size=vocab, device="meta")
        from vlscale.engine.sharded_loading import mark_zero3_leaf_layers

        mark_zero3_leaf_layers(model, cfg)  # as the trainer's build_model_zero3
    elif _checkpointing_on(model) != bool(cfg.train.gradient_checkpointing):
        raise ValueError(f"predict_zero3_comm: the model's gradient checkpointing is "
                         f"{'on' if _checkpointing_on(model) else 'off'} but train.gradient_checkpointing="
                         f"{str(cfg.train.gradient_checkpointing).lower()}; build the model from the same config "
                         "(vlscale.modeling.vl_model.build_model) or pass none")
    device = next(model.parameters()).device
    batch = synthetic_batch(cfg, 1, vocab, device=device, dtype=next(model.parameters()).dtype)
    trace = trace_zero3_step(model, batch)
    prediction = zero3_comm_accounting(trace, trace.info, world_size, param_bytes=PRECISION_BYTES[cfg.train.precision],
                                       grad_bytes=communication_dtype_bytes(ds_config, cfg.train.precision),
                                       micro_batches=resolve_batch(cfg, world_size).train.gradient_accumulation_steps,
                                       param_persistence_threshold=z["param_persistence_threshold"],
                                       model_persistence_threshold=z["model_persistence_threshold"],
                                       max_reuse_distance=z["max_reuse_distance"])
    prediction.detail["prefetch"] = world_size > 1 and z["prefetch_bucket_size"] > 0
    prediction.detail["gradient_checkpointing"] = bool(cfg.train.gradient_checkpointing)
    return prediction
