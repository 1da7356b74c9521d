"""Measured memory: run real training steps and report the analytic model's components from tensors.

    params      bytes of the parameters a rank holds (ZeRO-3: the ``ds_tensor`` partitions, plus the
                small persistent parameters kept whole)
    grads       the engine's gradient buffers at the accumulation boundary (stage 0: ``param.grad``;
                1/2: the gradient partition buffer; 3: the flat gradient-partition buffer)
    optimizer   fp32 master partitions (when they are a separate copy) + Adam's exp_avg/exp_avg_sq
    activations unique storages autograd saves for backward during one forward
                (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded)
    peak        GPU: ``torch.cuda.max_memory_allocated``; CPU: the peak of live tensor bytes seen by
                :class:`LiveTensorTracker` (a TorchDispatchMode that follows every storage an ATen op
                returns until it dies), with the process's peak RSS beside it
    buffers     peak - params - grads - optimizer - activations: what else was live at the peak
    checkpoint  after the steps, the training checkpoint saved as the trainer saves it: the bytes each
                rank wrote (files, and the tensors in them), against ``analytic.checkpoint_bytes``

The parameter, gradient and optimizer figures are read by ``vlscale.engine.accounting``, as the
engine's ``run_summary.json`` reads them. 2-rank runs go through ``torchrun`` (see ``measure_memory``).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlscale.config import PRECISION_BYTES, torch_dtype
from vlscale.engine.accounting import gradient_bytes, live_gradient_bytes, optimizer_state_bytes, parameter_bytes


def _storage(t) -> Optional[torch.UntypedStorage]:
    if not isinstance(t, torch.Tensor) or t.is_sparse or t.layout != torch.strided:
        return None
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and not isinstance(t, torch.nn.Parameter):
        return None  # tensor subclasses (DTensor, fake tensors) hold no memory of their own here
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveTensorTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages on one device type, following every ATen op's outputs.

    Storages are keyed by their Python object (PyTorch preserves one per storage), sized when
    first seen and re-sized when an op returns them changed (``resize_``); a weak reference drops
    them when they die. ``track(tensors)`` registers storages that existed before the mode started
    (the model's parameters). ``phase(name)`` labels the peak.
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        self.peak_phase = ""
        self.phase_name = "start"
        self.phase_peaks: dict[str, int] = {}
        self.on_peak = None  # called at every new peak (e.g. to read what is live then)
        self.phase_starts: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _dead(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self._refs.pop(key, None)
        self.current -= size

    def _see(self, st: torch.UntypedStorage) -> None:
        if st.device.type != self.device_type:
            return
        key = id(st)
        size = st.nbytes()
        old = self._sizes.get(key)
        if old is None:
            ref = self._refs.get(key)
            if ref is not None and ref() is not st:  # id reused before the callback ran
                self._dead(key)
            self._sizes[key] = size
            self._refs[key] = weakref.ref(st, lambda _r, k=key: self._dead(k))
            self.current += size
        elif old != size:
            self._sizes[key] = size
            self.current += size - old
        else:
            return
        self._bump()

    def _bump(self) -> None:
        if self.current > self.phase_peaks.get(self.phase_name, -1):
            self.phase_peaks[self.phase_name] = self.current
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = self.phase_name
            if self.on_peak is not None:
                self.on_peak()

    def track(self, tensors: Iterable) -> None:
        for t in tensors:
            st = _storage(t)
            if st is not None:
                self._see(st)

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.phase_peaks.setdefault(name, self.current)
        self.phase_starts[name] = self.current

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_phase = self.phase_name
        self.phase_peaks = {self.phase_name: self.current}

    # ------------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            st = _storage(t)
            if st is not None:
                self._see(st)
        return out  # resize_ and set_ return the tensor they change: seen again here, re-sized


@contextlib.contextmanager
def _patched_storage_resize(tracker: LiveTensorTracker):
    """``UntypedStorage.resize_`` bypasses the dispatcher; follow it while tracking."""
    original = torch.UntypedStorage.resize_

    def resize_(self, size):
        result = original(self, size)
        tracker._see(self)
        return result

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def saved_bytes(fn, inputs=()) -> dict:
    """Bytes autograd saves for backward while ``fn()`` runs, each storage once: ``all``, and
    ``activations``, the storages other than those of ``inputs`` (the op's arguments, which the caller
    keeps anyway). Counted as they are saved, whether or not the graph is still alive afterwards."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    return {"all": sum(storages.values()),
            "activations": sum(n for ptr, n in storages.items() if ptr not in input_ptrs)}


class SavedTensorCounter:
    """Bytes autograd saves for backward inside the context, counting each storage once.

    Storages of module parameters and buffers (also ZeRO-3's gathered copies, which are the
    parameters' data while a module runs) are not activations and are left out. ``alive_bytes()``
    sums the saved storages still alive (freed graph branches drop out).
    """

    def __init__(self, modules: Iterable[torch.nn.Module] = ()):
        self.modules = list(modules)
        self._seen: dict[int, tuple[weakref.ref, int, str]] = {}
        self._ctx = None

    def _param_storages(self) -> dict[int, weakref.ref]:
        """The parameters' and buffers' storages by address (read once per context), held weakly: an address
        alone would take an activation allocated where a released one was (ZeRO-3 frees gathered data) for a
        parameter."""
        if self._cached is None:
            self._cached = {}
            for m in self.modules:
                for t in list(m.parameters()) + list(m.buffers()):
                    if t.numel() > 0:
                        st = t.untyped_storage()
                        self._cached[st.data_ptr()] = weakref.ref(st)
        return self._cached

    def _pack(self, t):
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t  # ZeRO-3 swaps a parameter's data: keep the parameter, as autograd does
        self._record(t)
        # a tensor saved by the node that produced it would hold that node: a reference cycle that
        # outlives the graph (autograd itself saves outputs without their grad_fn); an alias does not
        return t.detach() if t.grad_fn is not None else t

    def _record(self, t) -> None:
        st = _storage(t)
        if st is None or st.nbytes() == 0:
            return
        key = id(st)
        entry = self._seen.get(key)
        if entry is None or entry[0]() is not st:
            own = self._param_storages().get(st.data_ptr())
            if own is not None and own() is st:
                return
            self._seen[key] = (weakref.ref(st, lambda _r, k=key: self._seen.pop(k, None)), st.nbytes(),
                               st.device.type)

    def __enter__(self):
        self._cached = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._cached = None
        return False

    def alive_bytes(self, device_type: Optional[str] = None) -> int:
        return sum(n for ref, n, dev in self._seen.values()
                   if ref() is not None and (device_type is None or dev == device_type))


def measured_device_type() -> str:
    """Where a measured run's ranks train: ``cuda``, unless there is no GPU or ``DS_ACCELERATOR=cpu``."""
    from vlscale.engine.distributed import local_device_type

    return local_device_type()


def synthetic_batch(cfg, batch_size: int, vocab_size: int, *, device="cpu", dtype=torch.float32,
                    padded: bool = True, seed: int = 0, task: Optional[str] = None) -> dict:
    """A batch of the run's worst-case shapes (the batch dict contract of vlscale.data.tasks).

    Text is ``data.max_input_length`` tokens, targets ``data.max_target_length``; with ``padded``
    the first example's text ends in 3 padding positions, so attention masks are per example.
    Images (``feature_source=images``) or cached features (``cache``) of the vision model's shape.
    """
    from vlscale.data.tasks import get_task
    from vlscale.modeling.vision import vision_dims

    g = torch.Generator().manual_seed(seed)
    task = task or max(cfg.data.tasks, key=lambda t: get_task(t).n_images)
    n_img = get_task(task).n_images
    L, T = cfg.data.max_input_length, cfg.data.max_target_length
    dims = vision_dims(cfg.model.vision)
    high = max(5, min(vocab_size, 1000))
    batch = {"task": task,
             "input_ids": torch.randint(4, high, (batch_size, L), generator=g),
             "attention_mask": torch.ones(batch_size, L, dtype=torch.long),
             "labels": torch.randint(4, high, (batch_size, T), generator=g)}
    if padded and L > 3:
        batch["attention_mask"][0, -3:] = 0
    video = get_task(task).modality == "video"
    if cfg.model.feature_source == "images":
        s = dims["image_size"]
        shape = (batch_size, 1, cfg.model.max_frames, 3, s, s) if video else (batch_size, n_img, 3, s, s)
        batch["pixel_values"] = torch.randn(*shape, generator=g).to(dtype)
    else:
        if video:
            shape = (batch_size, 1, cfg.model.max_frames, dims["embed_dim"])
        else:
            shape = (batch_size, n_img, dims["grid_tokens"], dims["grid_dim"])
        batch["vis_feats"] = torch.randn(*shape, generator=g).to(dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- a measured run

LOSS_MODES = ("trainer", "model")


def _trainer_loss(out, labels):
    """The engine's loss (vlscale.engine.trainer): a token-sum cross-entropy on the fp32-upcast logits."""
    from vlscale.engine.trainer import _token_cross_entropy_sum

    return _token_cross_entropy_sum(out.logits, labels)


def _optimizer_groups(model, tasks=(), peft_lr=None):
    """The trainer's groups (each task's own weight sets apart; the PEFT weights apart with a peft_lr). Its
    TaskSteps is not installed: a measured run steps every group, so every optimizer state exists, as in
    training once each task has had a step."""
    try:
        from vlscale.engine.trainer import optimizer_groups
    except ImportError:
        optimizer_groups = None
    if optimizer_groups is not None:
        return optimizer_groups(model, tasks, peft_lr)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    flat = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [g for g in ({"params": decay}, {"params": flat, "weight_decay": 0.0}) if g["params"]]


def _rss_peak_bytes() -> int:
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


FP16_SKIPS = 32  # overflowed steps a measured fp16 run may skip while the loss scale comes down (2^16 -> 2^-16)


def _run_peak(init_peak: int, steps_peak: int, steps_phase: str, at_steps_peak: dict) -> tuple[int, str, dict]:
    """The run's peak, its phase, and the activations and gradients live then: the steps' peak, or DeepSpeed's
    set-up's (phase ``init``) where that is higher (ZeRO-3 partitions a whole model), when none are live."""
    if init_peak > steps_peak:
        return init_peak, "init", {"activations": 0, "grads": 0}
    return steps_peak, steps_phase, dict(at_steps_peak)


def run_measured_steps(cfg, ds_config: dict, *, vocab_size: int, steps: int = 3, loss_mode: str = "trainer",
                       padded: bool = True, rank: int = 0, world_size: int = 1,
                       checkpoint_dir: Optional[str] = None) -> dict:
    """Build the model and the DeepSpeed engine as the trainer does, run ``steps`` optimizer steps on
    worst-case batches and read every component from the real tensors (one rank's view). Under fp16,
    steps that overflow (skipped by the dynamic loss scaling; ``skipped_steps``) do not count: until
    a step is applied Adam's moments do not exist, and the optimizer state would read low.

    ``checkpoint_dir`` (the same folder on every rank): then also save the training checkpoint there
    as the trainer does (``vlscale.engine.checkpoint.save_checkpoint``) and report, on rank 0, the
    bytes each rank wrote (``checkpoint_file_bytes_by_rank``, ``checkpoint_tensor_bytes_by_rank``);
    the folder is removed afterwards.

    Must run inside an initialised process group (``deepspeed.init_distributed``).
    """
    import deepspeed

    from vlscale.modeling.vl_model import build_model

    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode={loss_mode!r}: use one of {LOSS_MODES}")
    dtype = torch_dtype(cfg.train.precision)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    device_type = measured_device_type()
    cuda = device_type == "cuda"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab_size, device="cpu", dtype=dtype)
    if stage == 3:
        from vlscale.engine.sharded_loading import mark_zero3_leaf_layers

        mark_zero3_leaf_layers(model, cfg)  # as the trainer's build_model_zero3
    tracker = LiveTensorTracker(device_type)
    tracker.track(list(model.parameters()) + list(model.buffers()))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    B = cfg.train.micro_batch_size
    result = {"stage": stage, "world_size": world_size, "device": device_type, "steps": steps}
    counter_peak = {"activations": 0, "grads": 0}
    counter = None

    def on_peak():
        counter_peak["activations"] = counter.alive_bytes(device_type) if counter is not None else 0
        counter_peak["grads"] = live_gradient_bytes(engine, device_type) if engine is not None else 0

    engine = None
    cuda_phases: dict = {"peaks": {}, "starts": {}, "now": None}

    def phase(name: str) -> None:
        """Start phase ``name``: the tracker's on CPU; on CUDA the allocator's peak of the phase that ends."""
        tracker.phase(name)
        if cuda:
            torch.cuda.synchronize()
            if cuda_phases["now"] is not None:
                cuda_phases["peaks"][cuda_phases["now"]] = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            cuda_phases["now"] = name
            cuda_phases["starts"][name] = int(torch.cuda.memory_allocated())

    ctx = contextlib.nullcontext() if cuda else tracker
    with ctx, (contextlib.nullcontext() if cuda else _patched_storage_resize(tracker)):
        phase("init")
        groups = _optimizer_groups(model, cfg.data.tasks, cfg.train.peft_lr)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        device = engine.device
        # the trainer's corrections of DeepSpeed's stage-0 half-precision wrapper (its updates, not its memory)
        from vlscale.engine.half_precision import stage0_corrections

        scale_loss = stage0_corrections(engine, cfg.train.precision)
        init_peak = torch.cuda.max_memory_allocated() if cuda else tracker.peak
        result["init_peak"] = int(init_peak)
        if not cuda:
            tracker.reset_peak()
            tracker.on_peak = on_peak
        activations, grads = 0, None
        # fp16: a step whose gradients overflow is skipped and leaves Adam's state uncreated; measure
        # ``steps`` applied steps, after the dynamic loss scale has come down (at most FP16_SKIPS more)
        # with gradient accumulation an optimizer step is ``accum`` micro-batches; it counts at its boundary
        accum = int(ds_config.get("gradient_accumulation_steps", 1) or 1)
        applied, skipped, step, micro = 0, 0, 0, 0
        while applied < steps:
            if skipped > (FP16_SKIPS if cfg.train.precision == "fp16" else 0):
                raise RuntimeError(f"{skipped} of {step} measured steps overflowed and were skipped (fp16 loss scale "
                                   f"{getattr(engine.optimizer, 'loss_scale', None)}); measure in bf16 or fp32")
            batch = synthetic_batch(cfg, B, vocab_size, device=device, dtype=dtype, padded=padded,
                                    seed=1000 * micro + rank)
            phase(f"forward{step}")
            counter = SavedTensorCounter([engine.module])
            with counter:
                out = engine(batch)
                loss = _trainer_loss(out, batch["labels"]) if loss_mode == "trainer" else out.loss
            activations = max(activations, counter.alive_bytes(device_type))
            if loss_mode == "model":
                del out
            phase(f"backward{step}")
            engine.backward(loss * float(engine.optimizer.loss_scale) if scale_loss else loss)
            if grads is None:
                grads = gradient_bytes(engine, stage)
            phase(f"step{step}")
            engine.step()
            del loss, batch
            if loss_mode == "trainer":
                del out
            micro += 1
            if micro % accum == 0:
                was_applied = bool(engine.was_step_applied())
                applied, skipped, step = applied + was_applied, skipped + (not was_applied), step + 1
        result["skipped_steps"] = skipped
        if cuda:
            phase("end")  # closes the last step's phase
            del cuda_phases["peaks"]["init"]  # init is init_peak, below
            peak = max(cuda_phases["peaks"].values())
        else:
            peak = tracker.peak
    peak_phase = max(cuda_phases["peaks"], key=cuda_phases["peaks"].get) if cuda else tracker.peak_phase
    peak, peak_phase, at_peak = _run_peak(init_peak, peak, peak_phase, counter_peak)
    counter_peak.update(at_peak)
    if checkpoint_dir is not None:
        result.update(_measured_checkpoint(engine, checkpoint_dir, steps, rank))
    # read as run_summary.json does, after training (ZeRO-3 keeps small parameters whole from step 1 on)
    result.update(params=parameter_bytes(engine.module), optimizer=optimizer_state_bytes(engine), grads=int(grads or 0),
                  activations=int(activations), peak=int(peak),
                  peak_phase=peak_phase,
                  activations_at_peak=None if cuda else int(counter_peak["activations"]),
                  grads_at_peak=None if cuda else int(counter_peak["grads"]),
                  rss_peak=_rss_peak_bytes(),
                  # init: the set-up's peak on either device (on CPU the tracker's "init" phase went on past
                  # its reset, through the first batch's making)
                  phase_peaks=dict(cuda_phases["peaks"] if cuda else tracker.phase_peaks, init=int(init_peak)),
                  phase_starts=({k: v for k, v in cuda_phases["starts"].items() if k != "end"} if cuda
                                else dict(tracker.phase_starts)))
    return result


def _measured_checkpoint(engine, root: str, step: int, rank: int) -> dict:
    """Save ``engine``'s checkpoint as the trainer does (collective) and read back what each rank wrote."""
    import shutil

    from vlscale.engine import checkpoint as ckpt

    state = {"step": step, "frozen": ckpt.frozen_fingerprint(engine.module, engine.device)}
    tag = ckpt.save_checkpoint(engine, root, step, state, rank)
    out = {}
    if rank == 0:
        written = ckpt.written_bytes(os.path.join(root, "checkpoints", tag))
        out = {"checkpoint_file_bytes_by_rank": written["files"], "checkpoint_tensor_bytes_by_rank": written["tensors"]}
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _worker(spec_path: str, out_path: str) -> None:
    """One rank of a measured run (started by :func:`measure_memory_cases`): each case in turn, in one
    process group, the previous case's engine and model freed first."""
    import gc
    import importlib
    import json

    from vlscale.config import config_from_dict
    from vlscale.engine.distributed import init_distributed

    spec = json.loads(open(spec_path).read())
    # torchrun's ranks, or one rank through a file store (measure_memory passes no launcher variables)
    dist = init_distributed()
    rank, world = dist.rank, dist.world_size
    torch.set_num_threads(int(spec.get("threads", 1)))
    importlib.import_module("torch._dynamo")  # before DeepSpeed patches tensor creation (ZeRO-3)

    results = []
    for i, case in enumerate(spec["cases"]):
        gc.collect()
        torch.distributed.barrier()
        results.append(run_measured_steps(config_from_dict(case["cfg"]), case["ds_config"],
                                          vocab_size=case["vocab_size"], steps=case["steps"],
                                          loss_mode=case["loss_mode"], padded=case["padded"], rank=rank,
                                          world_size=world, checkpoint_dir=f"{out_path}.checkpoint{i}"))
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(results, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


PROCESS_BYTES = 2 * 1024 ** 3  # a rank's own footprint: torch, DeepSpeed, transformers (~1 GiB measured) x2


def measured_run_host_bytes(est, world_size: int) -> int:
    """Host memory a measured run of ``est``'s config needs on this machine: each rank builds the whole
    model (``run_measured_steps``) before DeepSpeed partitions it, on the CPU accelerator trains there
    (the predicted peak, which there holds the host-offloaded bytes too), and carries its process footprint."""
    per_rank = est.detail["total_params"] * PRECISION_BYTES[est.settings["precision"]] + PROCESS_BYTES
    if est.settings["device"] == "cpu":
        per_rank += est.components["peak"]
    return int(world_size) * per_rank


def available_host_bytes() -> Optional[int]:
    """``MemAvailable`` of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_memory(cfg, world_size: int = 1, ds_config: Optional[dict] = None, *, vocab_size: Optional[int] = None,
                   steps: int = 3, loss_mode: str = "trainer", padded: bool = True, timeout_s: int = 600,
                   threads: int = 1) -> dict:
    """Run ``steps`` real training steps in a fresh process group (``torchrun`` for several ranks; on
    a machine without GPU DeepSpeed's CPU accelerator with gloo) and return the measured components
    per rank: the maximum over ranks, and ``by_rank`` lists.

    ``ds_config``: a resolved DeepSpeed dict (``build_deepspeed_config``); default: ZeRO stage
    ``train.zero_stage`` (0 when unset) with DeepSpeed's defaults.
    """
    case = dict(cfg=cfg, ds_config=ds_config, vocab_size=vocab_size, steps=steps, loss_mode=loss_mode, padded=padded)
    return measure_memory_cases([case], world_size, timeout_s=timeout_s, threads=threads)[0]


def measure_memory_cases(cases: list[dict], world_size: int = 1, *, timeout_s: int = 600, threads: int = 1,
                         launch=None) -> list[dict]:
    """:func:`measure_memory` for several runs on the same number of ranks, one after the other in one
    process group (the start-up and its imports paid once). Each case: a dict with ``cfg`` and the
    optional ``ds_config``, ``vocab_size``, ``steps`` (3), ``loss_mode`` ("trainer"), ``padded`` (True).
    Every figure is the case's own (its tensors, tracked from its model's build on), except ``rss_peak``:
    the process's high-water mark so far, so a later case reports at least an earlier one's.

    ``launch(python_args, world_size, env, cwd, timeout_s) -> (exit code, output)`` starts the ranks
    (``python_args`` is what follows ``python``); default: torchrun, or one plain process."""
    import json
    import shutil
    import tempfile

    from vlscale.engine.distributed import LAUNCHER_VARS
    from vlscale.profiling.analytic import default_vocab_size, resolve_ds_config

    known = ("cfg", "ds_config", "vocab_size", "steps", "loss_mode", "padded")
    specs = []
    for i, c in enumerate(cases):
        if set(c) - set(known) or "cfg" not in c:
            raise ValueError(f"measure_memory_cases: case {i}: unknown keys {sorted(set(c) - set(known))} or no "
                             f"'cfg' (a case takes {', '.join(known)})")
        cfg = c["cfg"]
        ds = c.get("ds_config") if c.get("ds_config") is not None else resolve_ds_config(cfg, world_size, None)
        loss_mode = c.get("loss_mode", "trainer")
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode={loss_mode!r}: use one of {LOSS_MODES}")
        specs.append({"cfg": cfg.to_dict(), "ds_config": ds, "vocab_size": c.get("vocab_size") or default_vocab_size(cfg),
                      "steps": c.get("steps", 3), "loss_mode": loss_mode, "padded": c.get("padded", True)})
    tmp = tempfile.mkdtemp(prefix="vlscale_measure_")
    try:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump({"cases": specs, "threads": threads}, f)
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(threads))
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        args = ["-m", "vlscale.profiling.measure", "--worker", spec_path, out_path]
        env = {k: v for k, v in env.items() if k not in LAUNCHER_VARS}  # a fresh group of its own
        code, output = (launch or _launch)(args, world_size, env, root, timeout_s)
        if code != 0:
            raise RuntimeError(f"measured run failed (exit {code}): python {' '.join(args)} on {world_size} "
                               f"rank(s)\n{output[-8000:]}")
        ranks = [json.loads(open(f"{out_path}.rank{r}").read()) for r in range(world_size)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [_over_ranks([r[i] for r in ranks]) for i in range(len(specs))]


def _launch(args: list[str], world_size: int, env: dict, cwd: str, timeout_s: float) -> tuple[int, str]:
    import subprocess
    import sys

    from vlscale.engine.distributed import free_port

    if world_size > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + args
    else:
        cmd = [sys.executable] + args
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s)
    return proc.returncode, proc.stdout


def _over_ranks(ranks: list[dict]) -> dict:
    """One case's per-rank results -> the maximum over ranks, ``<key>_by_rank`` lists, and the buffers
    (what else was live at the peak) of the rank with the highest peak."""
    out = dict(ranks[0])
    for key in ("params", "grads", "optimizer", "activations", "peak", "rss_peak", "init_peak",
                "activations_at_peak", "grads_at_peak"):
        values = [r.get(key) for r in ranks]
        if all(v is not None for v in values):
            out[key] = max(values)
            out[f"{key}_by_rank"] = values
    top = max(ranks, key=lambda r: r["peak"])
    out["peak_phase"] = top.get("peak_phase")
    if out.get("activations_at_peak") is not None:
        out["activations_at_peak"] = top["activations_at_peak"]
        out["grads_at_peak"] = top["grads_at_peak"]
        # what else was live at the peak (the batch, logits, gathered parameters, buckets...)
        out["buffers"] = (top["peak"] - top["params"] - top["optimizer"] - top["activations_at_peak"]
                          - top["grads_at_peak"])
    return out


if __name__ == "__main__":  # pragma: no cover - the worker entry point
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python -m vlscale.profiling.measure --worker SPEC.json OUT.json")


# ----------------------------------------------------------------------------- the GPU section

GPU_CONFIGS = (
    # (name, overrides): random weights, images encoded on the fly by ViT-B-32 (49 tokens) + 47 text
    # tokens = 96 encoder tokens, 32 decoder tokens (multiples of 16: no SDPA mask padding)
    ("t5-base adapters", ["model.backbone=t5-base", "train.micro_batch_size=32"]),
    ("t5-base adapters ckpt", ["model.backbone=t5-base", "train.micro_batch_size=32",
                               "train.gradient_checkpointing=true"]),
    ("t5-large full-FT ckpt", ["model.backbone=t5-large", "train.micro_batch_size=16", "peft.train_lm=true",
                               "train.gradient_checkpointing=true"]),
)
GPU_COMMON = ["model.vision=ViT-B-32", "model.feature_source=images", "data.tasks=[vqa]",
              "data.max_input_length=47", "data.max_target_length=32", "train.precision=bf16", "train.zero_stage=0",
              "peft.method=adapter", "peft.sharing=single"]


class _Bf16MasterAdamW:
    """Plain-PyTorch stand-in for DeepSpeed's stage-0 bf16 optimizer (FP16_UnfusedOptimizer): bf16
    weights, per-parameter fp32 masters and AdamW (torch, foreach) on them; the fp32 gradients are
    made at the step and dropped after it."""

    def __init__(self, params, lr: float, betas, eps: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        decay = [m for m in self.masters if m.dim() >= 2]  # the engine's groups: matrices, then the rest
        flat = [m for m in self.masters if m.dim() < 2]
        groups = [g for g in ({"params": decay}, {"params": flat, "weight_decay": 0.0}) if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def step(self) -> None:
        for m, p in zip(self.masters, self.params):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.params):
                p.copy_(m)
                m.grad = None
                p.grad = None


def measure_torch_bf16(cfg, vocab_size: int, steps: int = 3, device: str = "cuda") -> dict:
    """Measure the plain-PyTorch stand-in of DeepSpeed stage 0 bf16 (:class:`_Bf16MasterAdamW`) in this
    process: the allocator's peak on CUDA, :class:`LiveTensorTracker`'s on CPU (after the model is built)."""
    from vlscale.modeling.vl_model import build_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab_size, device="cpu", dtype=torch.bfloat16).to(dev)
    model.train()
    tracker = LiveTensorTracker(dev.type)
    tracker.track(list(model.parameters()) + list(model.buffers()))
    phases = {}
    activations = 0
    with (contextlib.nullcontext() if cuda else tracker):
        opt = _Bf16MasterAdamW(model.parameters(), cfg.lr, cfg.train.adam_betas, cfg.train.adam_eps,
                               cfg.train.weight_decay)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else tracker.current
        peak = 0

        def mark(name):  # per-phase peaks of the last step (where the peak happens)
            nonlocal peak
            if cuda:
                torch.cuda.synchronize()
                now, top = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                now, top = tracker.current, tracker.peak
                tracker.reset_peak()
            peak = max(peak, top)
            phases[name] = {"peak": int(top), "now": int(now)}

        for step in range(steps):
            batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab_size, device=dev, dtype=torch.bfloat16,
                                    seed=step)
            mark("batch")
            with SavedTensorCounter([model]) as counter:
                out = model(batch)
                loss = _trainer_loss(out, batch["labels"])
            activations = max(activations, counter.alive_bytes(dev.type))
            mark("forward")
            loss.backward()
            mark("backward")
            opt.step()
            mark("step")
            del out, loss, batch
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = sum(m.numel() * 4 for m in opt.masters) + sum(
        v.numel() * v.element_size() for s in opt.opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"engine": "torch (bf16 weights, fp32 masters, AdamW)", "peak": int(peak), "params": int(params),
            "optimizer": int(optimizer), "activations": int(activations), "resident_after_setup": int(base),
            "last_step_phases": phases}


def run_gpu_section(out: dict, steps: int = 3) -> dict:
    """Predicted vs allocator peak on one CUDA GPU for :data:`GPU_CONFIGS` (bf16, random weights).

    Uses DeepSpeed (stage 0, one process) when it imports, else plain PyTorch with the same memory
    layout (bf16 weights, fp32 masters and AdamW moments for the trainable parameters); records
    which in ``out["profile_memory"]["engine"]``. Fills and returns ``out["profile_memory"]``.
    """
    import time

    from vlscale.config import load_config
    from vlscale.profiling.analytic import default_vocab_size, estimate_memory, resolve_ds_config

    section = out.setdefault("profile_memory", {})
    if not torch.cuda.is_available():
        section["skipped"] = "no CUDA device"
        return section
    try:
        import deepspeed  # noqa: F401

        engine = "deepspeed"
    except Exception as e:  # noqa: BLE001 - any import failure means the plain-PyTorch path
        engine = "torch"
        section["deepspeed_import_error"] = f"{type(e).__name__}: {e}"[:300]
    section["engine"] = engine
    section["device"] = torch.cuda.get_device_name()
    rows = []
    for name, overrides in GPU_CONFIGS:
        t0 = time.time()
        cfg = load_config("tiny", GPU_COMMON + overrides)
        vocab = default_vocab_size(cfg)
        ds = resolve_ds_config(cfg, 1, None, device_type="cuda")
        est = estimate_memory(cfg, 1, ds, device="cuda", vocab_size=vocab)
        row = {"config": name, "overrides": GPU_COMMON + overrides, "predicted": dict(est.components),
               "predicted_phase": est.peak_phase}
        try:
            if engine == "deepspeed":
                # a 1-rank group on a file store (a fixed TCP port failed with EADDRINUSE when another
                # section's group still held it, H200 2026-12-04)
                from vlscale.engine.distributed import init_distributed

                init_distributed()
                meas = run_measured_steps(cfg, ds, vocab_size=vocab, steps=steps)
                meas["engine"] = "deepspeed stage 0"
            else:
                meas = measure_torch_bf16(cfg, vocab, steps, "cuda")
        except Exception as e:  # noqa: BLE001 - report the failure of one config, keep the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            torch.cuda.empty_cache()
            continue
        row["measured"] = meas
        row["errors"] = {k: (est.components[k] - meas[k]) / meas[k] for k in ("peak", "params", "optimizer",
                                                                              "activations") if meas.get(k)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        torch.cuda.empty_cache()
    section["configs"] = rows
    return section
