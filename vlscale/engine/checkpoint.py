"""What a run writes to keep: the trained adapter, and the resumable training checkpoint.

``output_dir/adapter/``: the trainable parameters only, gathered to their full shapes on rank 0
(under ZeRO-3 a rank holds a 1/world slice, or a 0-size placeholder, of each parameter; saving
those is the classic "empty adapter" bug), and the buffers training changes (:func:`trained_buffers`:
the persistent buffers of every module that holds a trainable parameter, e.g. the BatchNorm running
statistics of a CLIP ResNet trained with ``peft.train_vision``; rank 0's), as
``adapter_model.safetensors``, plus ``adapter_config.json`` with the whole RunConfig, the vocabulary
size, the tokenizer's identity and every tensor's name and shape (``parameters``; ``buffers`` since
format_version 2, not counted in ``trainable_params``): all that :func:`load_adapter` needs on a
freshly built model. It is written to ``.tmp-adapter/`` and renamed into place, the adapter it replaces moved
to ``adapter.old`` meanwhile; a save that died between those renames leaves ``adapter.old`` alone, which the next
save puts back before it writes and :func:`read_adapter_config` names (it loads nothing stale).

``output_dir/checkpoints/``: DeepSpeed's own checkpoint (trainable parameters, ZeRO-partitioned
optimizer, LR scheduler) under ``step<N>/``, plus per rank ``client_state_rank<R>.json`` (step,
data-loader position, python/numpy/torch RNG states, a fingerprint of the frozen weights). A
checkpoint is written to ``.tmp-step<N>/``, flushed to disk and renamed into place, then the ``latest`` file is
replaced atomically and durably (:func:`vlscale.files.write_text_atomic`), so a crash while saving, or a power
loss after it, leaves the previous checkpoint intact and ``latest``, or the new one whole. Older
checkpoints beyond the last ``keep`` are removed. A save that fails on any rank (a full disk, or any other
error in that rank's part: its DeepSpeed state or its client state) removes its temporary folder and is a
:class:`CheckpointError` naming the step, the reason and the folder, on every rank (with the rank that failed).
Rank 0's client state also records the ZeRO stage and the names and sizes of DeepSpeed's files, so a
resume at another stage, or of a checkpoint missing a file, is refused before DeepSpeed reads it
(:func:`check_checkpoint_files`).

The frozen weights (the backbone, CLIP) are left out of ``checkpoints/``: a resumed run builds them
again from ``model.*`` as it did at the start, so each checkpoint holds only what training changed
(DeepSpeed's default writes the whole model: at ZeRO-3 each rank's partition of it as well, which
no load reads). :func:`frozen_fingerprint` (per frozen tensor, the whole tensor's sums of squares and
of absolute values) is saved instead, and a resume whose freshly built frozen weights differ from the
run's is refused, naming the first tensor that differs.

A checkpoint resumes on another number of ranks when the global batch (ranks x micro-batch x
accumulation) is the same, so the data order continues (:func:`check_output_dir` says which
settings keep it). Under ZeRO the checkpoint is converted to DeepSpeed's universal format first
(``deepspeed.checkpoint.ds_to_universal``, every file read with ``weights_only=True``) into
``.universal-step<N>/``, loaded, and removed; defects of DeepSpeed 0.19.8's ZeRO-3 universal
load are mended after it (see :func:`load_checkpoint`: every group got group 0's hyperparameters and
group 0's Adam step count). Stage 0 checkpoints are whole on rank 0.

Nothing is unpickled: the adapter is safetensors, client state is JSON, and DeepSpeed's files are
read by :class:`SafeTorchCheckpointEngine` with ``torch.load(weights_only=True)``, allowing only
the few DeepSpeed classes its state dicts contain.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from vlscale.engine.distributed import peer_gone
from vlscale.files import fsync_path, fsync_tree, save_safetensors, write_text_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "vlscale-adapter"
ADAPTER_FORMAT_VERSION = 2  # 2: the buffers of trained modules too (config key "buffers"); 1: parameters only
LATEST = "latest"
GATHER_CHUNK_ELEMENTS = 50_000_000  # elements of trainable parameters a save or a load gathers at once

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint or adapter directory is missing, incomplete, or does not fit the model."""


# ----------------------------------------------------------------------------- ZeRO helpers

def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter, each shared parameter once, in module order."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def trained_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, buffer) of the persistent buffers of every module that itself holds a trainable
    parameter, each buffer once, in module order: what training changes besides the parameters (a
    trained BatchNorm's running_mean, running_var and num_batches_tracked). Decided by trainability
    alone, so a freshly built model of the same config names the same buffers."""
    return _persistent_buffers(model, trained=True)


def _persistent_buffers(model: torch.nn.Module, trained: bool) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, buffer) of the persistent buffers (those a state dict saves), each once, in module order,
    of the modules that hold a trainable parameter of their own (``trained``) or of those that hold none."""
    seen, out = set(), []
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) != trained:
            continue
        for name, b in module.named_buffers(prefix=prefix, recurse=False):
            if b is not None and name.rsplit(".", 1)[-1] not in module._non_persistent_buffers_set \
                    and id(b) not in seen:
                seen.add(id(b))
                out.append((name, b))
    return out


def gather_trained_buffers(model: torch.nn.Module, rank: int = 0) -> dict[str, torch.Tensor]:
    """CPU copies of :func:`trained_buffers` on rank 0 ({} elsewhere). ZeRO-3 partitions parameters, not
    buffers: every rank holds each buffer whole (its own: BatchNorm statistics of its own batches), so
    rank 0's are taken, without a collective; a partitioned one would be refused."""
    if rank != 0:
        return {}
    out = {}
    for name, b in trained_buffers(model):
        if is_partitioned(b):
            raise CheckpointError(f"buffer {name} is ZeRO-partitioned (shape {tuple(b.shape)}, full "
                                  f"{full_shape(b)}); refusing to save a partition")
        out[name] = b.detach().to("cpu", copy=True).contiguous()
    return out


def _gathered(params: list, modifier_rank: Optional[int]):
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank)


def _chunks(named: list[tuple[str, torch.nn.Parameter]], chunk_elements: int):
    """``named`` in order, cut into runs of at most ``chunk_elements`` elements (full shapes; a parameter larger
    than that is a run alone): what one ``GatheredParameters`` of a save or a load holds at once."""
    chunk, size = [], 0
    for name, p in named:
        n = int(np.prod(full_shape(p)))
        if chunk and size + n > chunk_elements:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, p))
        size += n
    if chunk:
        yield chunk


def gather_trainable_state_dict(model: torch.nn.Module, rank: int = 0, chunk_elements: int = GATHER_CHUNK_ELEMENTS
                                ) -> dict[str, torch.Tensor]:
    """Full-shape CPU copies of the trainable parameters on rank 0 ({} elsewhere).

    A collective under ZeRO-3: every rank must call it. Parameters are gathered in chunks of at most
    ``chunk_elements`` elements so no rank ever holds more than one chunk beyond its partition.
    """
    out: dict[str, torch.Tensor] = {}
    for chunk in _chunks(trainable_parameters(model), chunk_elements):
        with _gathered([p for _, p in chunk], modifier_rank=None):
            if rank == 0:
                for name, p in chunk:
                    t = p.detach().to("cpu", copy=True).contiguous()
                    if tuple(t.shape) != full_shape(p):  # an empty partition has another shape too
                        raise CheckpointError(f"parameter {name} gathered to shape {tuple(t.shape)}, expected "
                                              f"{full_shape(p)}; refusing to save a partitioned tensor")
                    out[name] = t
    return out


# ----------------------------------------------------------------------------- adapter/

def tokenizer_info(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return {"class": type(tokenizer).__name__, "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "length": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": getattr(tokenizer, "bos_token_id", None)}


def _replaced(final: Path) -> Path:
    """Where :func:`_replace_dir` keeps the folder it replaces until the new one is in place."""
    return final.with_name(final.name + ".old")


def _restore_replaced(final: Path) -> None:
    """Finish what a :func:`_replace_dir` into ``final`` that died between its two renames left: the replaced folder
    at ``final.old`` beside the new ``final`` is removed; ``final.old`` alone (``final`` gone) is the last complete
    one, renamed back to ``final``."""
    old = _replaced(final)
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def _replace_dir(tmp: Path, final: Path) -> None:
    """``tmp`` renamed to ``final``; a ``final`` there is moved to ``final.old`` first and removed after. ``tmp``'s
    files are flushed to disk first and the renames after (:func:`vlscale.files.fsync_tree`)."""
    fsync_tree(tmp)
    old, replacing = _replaced(final), final.exists()
    if replacing:
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if replacing:
        shutil.rmtree(old)


def save_adapter(model: torch.nn.Module, adapter_dir, cfg, tokenizer=None, vocab_size: Optional[int] = None,
                 rank: int = 0, extra: Optional[dict] = None) -> Optional[Path]:
    """Write ``adapter_dir`` (see the module docstring). Collective (every rank calls it); rank 0 writes,
    and a write that fails is the same :class:`CheckpointError` on every rank."""
    state = gather_trainable_state_dict(model, rank=rank)
    buffers = gather_trained_buffers(model, rank=rank)
    adapter_dir = Path(adapter_dir)
    tmp = adapter_dir.with_name(f".tmp-{adapter_dir.name}")
    writes = _Writes(tmp)
    if rank == 0:
        with writes:
            _restore_replaced(adapter_dir)  # a save that died between its renames: the previous adapter/ back first
            if tmp.exists():
                shutil.rmtree(tmp)
            _write_adapter(state, buffers, tmp, adapter_dir, cfg, tokenizer, vocab_size, extra)
    reason = writes.agree()
    if reason is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _restore_replaced(adapter_dir)  # failed between the renames: the previous one back in place
        at = f" at step {extra['step']}" if extra and "step" in extra else ""
        kept = "the previous adapter/ is intact" if adapter_dir.is_dir() else "no earlier adapter/ exists"
        raise CheckpointError(f"the adapter{at} could not be written to {adapter_dir} ({reason}); {kept} and the "
                              "temporary folder is removed") from writes.error
    return adapter_dir if rank == 0 else None


def _write_adapter(state: dict, buffers: dict, tmp: Path, adapter_dir: Path, cfg, tokenizer, vocab_size,
                   extra) -> None:
    from vlscale.engine.deepspeed_config import batch_as_given

    clash = sorted(set(state) & set(buffers))
    if clash:
        raise CheckpointError(f"names both a trainable parameter and a buffer: {clash[:3]}")
    tmp.mkdir(parents=True)
    step = {"step": str(extra["step"])} if extra and "step" in extra else {}  # load_adapter's check of a torn read
    save_safetensors({**state, **buffers}, tmp / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT, **step})
    meta = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
        "run_config": batch_as_given(cfg).to_dict(),
        "vocab_size": int(vocab_size if vocab_size is not None else len(tokenizer)),
        "tokenizer": tokenizer_info(tokenizer),
        "build_seed": cfg.train.seed,
        "trainable_params": int(sum(t.numel() for t in state.values())),
        "parameters": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for name, t in state.items()},
        "buffers": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                    for name, t in buffers.items()},
    }
    meta.update(extra or {})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1))
    _replace_dir(tmp, adapter_dir)


def _step_of(adapter_dir: Path):
    """The step an adapter folder was saved at, as its config records it; "?" where it does not read."""
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("step", "?")
    except (OSError, ValueError, AttributeError):
        return "?"


def read_adapter_config(adapter_dir) -> dict:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        old = _replaced(adapter_dir)
        if not adapter_dir.exists() and (old / ADAPTER_CONFIG).is_file():
            raise CheckpointError(
                f"{adapter_dir} does not exist, but {old.name} does: a save that replaced it was interrupted "
                f"({old.name} holds the previous adapter, of step {_step_of(old)}; the new one was in "
                f".tmp-{adapter_dir.name}). Rename {old} to {adapter_dir} to use the previous one, or resume the "
                f"run: its next save puts that back before writing")
        if not adapter_dir.exists():
            raise CheckpointError(f"{adapter_dir} does not exist (an adapter directory is a run's output_dir/adapter)")
        if (adapter_dir / "adapter" / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{adapter_dir} is a run's output_dir, not an adapter directory: pass "
                                  f"{adapter_dir / 'adapter'}")
        raise CheckpointError(f"{adapter_dir} is not an adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    except OSError as e:  # its permissions
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: format={meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if meta.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={meta['format_version']} is newer than this vlscale "
                              f"({ADAPTER_FORMAT_VERSION})")
    for key in ("run_config", "vocab_size"):
        if key not in meta:
            raise CheckpointError(f"{path}: key {key!r} is missing")
    return meta


def _check_earlier_layouts(names, named: dict, weights: Path) -> None:
    """Refuse, naming the cause, a file of a layout an earlier vlscale saved that today's model cannot take:
    Hyperformer's single hypernetwork with a site embedding (before 2026-12-03; today one per stack, the
    reference's), whose weights do not map onto the per-stack generators."""
    old = "peft.hyperformer.hypernet."
    if any(n.startswith(old) for n in names) and not any(n.startswith(old) for n in named):
        raise CheckpointError(f"{weights}: a Hyperformer adapter of an earlier vlscale's layout (one hypernetwork "
                              "with a site embedding for every site, before 2026-12-03); this vlscale builds the "
                              "reference's layout (a hypernetwork per stack, a generator per sublayer kind), which "
                              "those weights do not convert to: train the adapter again")


# Settings of model.* / peft.* a model may differ in from the adapter's run and still take it: where the same frozen
# weights load from, the adapter kernel used, and training-only dropout rates.
ADAPTER_FREE_SETTINGS = ("model.backbone_path", "model.vision_pretrained", "model.feature_source", "model.dropout",
                         "peft.fused", "peft.lora_dropout")


def adapter_settings_mismatch(model: torch.nn.Module, meta: dict) -> Optional[str]:
    """The first ``model.*`` / ``peft.*`` setting (but :data:`ADAPTER_FREE_SETTINGS`) in which the model was built
    otherwise than the adapter's run (:func:`settings_mismatch`), or None; None too for a model that carries no
    RunConfig. Names and shapes alone let an adapter of google-t5/t5-base onto flan-t5-base, of RN101 onto RN50, or of
    lora_alpha 32 onto 8."""
    from vlscale.config import RunConfig

    cfg = getattr(model, "cfg", None)
    return settings_mismatch(cfg, meta) if isinstance(cfg, RunConfig) else None


def trained_with(meta: dict, key: str):
    """The value of setting ``key`` (``"data.tasks"``) in the run_config of an adapter's ``meta``
    (adapter_config.json), or None where its run_config leaves it out."""
    section, name = key.split(".")
    return (meta["run_config"].get(section) or {}).get(name)


def settings_mismatch(cfg, meta: dict) -> Optional[str]:
    """The first ``model.*`` / ``peft.*`` setting (but :data:`ADAPTER_FREE_SETTINGS`) in which the RunConfig ``cfg``
    builds its model otherwise than the adapter's run (``meta``: its adapter_config.json), or None. Settings ``cfg``
    does not read (:meth:`RunConfig.unread_settings`: ``peft.lora_rank`` under ``peft.method=adapter``) are not
    compared: they build nothing (a warm start from another preset carries its other methods' widths); where the
    adapter's run read one, the setting that makes it unread (the method, the sharing) differs and is named."""
    from vlscale.modeling.backbones import canonical_lm_name

    def canonical(key: str, value):
        if key == "model.backbone" and isinstance(value, str):
            try:
                return canonical_lm_name(value)
            except KeyError:
                return value
        return value

    now, unread = cfg.to_dict(), cfg.unread_settings()
    for section in ("model", "peft"):
        for name, value in (meta["run_config"].get(section) or {}).items():
            key = f"{section}.{name}"
            if key in ADAPTER_FREE_SETTINGS or key in unread or name not in now[section]:
                continue
            if canonical(key, now[section][name]) != canonical(key, value):
                return f"the adapter was trained with {key}={value!r}, the model is built with {key}={now[section][name]!r}"
    return None


def load_adapter(model: torch.nn.Module, adapter_dir, check_only: bool = False, meta: Optional[dict] = None,
                 collective: bool = False, chunk_elements: int = GATHER_CHUNK_ELEMENTS,
                 tasks: Optional[list] = None) -> dict:
    """Load ``adapter_dir`` onto a freshly built model (strict: the same trainable names and shapes, and
    the same buffers of trained modules, :func:`trained_buffers`; a model that carries its RunConfig, built
    with the adapter's run's model.* / peft.* settings, :func:`adapter_settings_mismatch`). ``check_only``: only compare names and
    shapes (a model built on the meta device will do), raising as the load would, and copy nothing.
    ``meta``: the adapter_config.json the caller read already (read here otherwise).

    A run still training replaces its adapter/ at each save (:func:`_replace_dir`): an evaluation of it read the
    config of one step and the weights of a later one, same names and shapes, and reported them as the first step's.
    The weights file records its step (since this check): one of another step than ``meta`` is refused.

    Works on a plain model and on a ZeRO-3 partitioned one (collective then: every rank calls it). The names and
    shapes are checked from the file's header; the trainable parameters are then gathered and set in chunks of at
    most ``chunk_elements`` elements (as :func:`gather_trainable_state_dict` saves them), each tensor read from the
    open file as its chunk is set, and under ZeRO-3 only by the rank that sets a partitioned parameter (rank 0: the
    gather's exit gives its values to the others). A rank holds one chunk beyond its partition and one tensor of the
    file, where it held the whole file and every trainable parameter gathered at once (for a full fine-tuning
    adapter, ``peft.train_lm=true``, twice the model's trained weights on every rank).

    Collective (``collective``, and always for a model with ZeRO-3 partitioned trainable parameters): every rank of
    the process group calls it and opens the files itself; whether each could, and read the same names, shapes and
    step, is agreed before the first gather, so a rank that cannot read them (another file system, permissions) is
    the same :class:`CheckpointError` on every rank, naming the rank(s) and the path, where that rank raised alone
    and the others waited in the gather until the process group's timeout. Callers whose every rank loads a model
    that is not partitioned (evaluate.py on several ranks, a warm start: DeepSpeed's engine comes after) pass
    ``collective=True``: their next collective would wait instead.
    An adapter of format_version 1 holds no buffers: the model keeps its freshly built ones, with a
    warning where it has buffers of trained modules. ``tasks``: the model's tasks where they are a subset of the
    adapter's run's ``data.tasks`` (a warm start, :func:`check_init_adapter`): the file's weights of its other tasks
    (``peft.sharing=multiple``/``half_shared``, Hyperformer's task embeddings, prompts) are left out, as the model has
    none. Returns the adapter's config dict.
    """
    from safetensors import SafetensorError

    adapter_dir = Path(adapter_dir)
    named = dict(trainable_parameters(model))
    collective = collective or any(is_partitioned(p) for p in named.values())
    with contextlib.ExitStack() as files:
        meta, weights, f, shapes = _open_adapter(adapter_dir, meta, files, collective)
        if tasks is not None:
            from vlscale.peft.trainable import task_of

            then = list(trained_with(meta, "data.tasks") or [])
            shapes = {n: shape for n, shape in shapes.items() if task_of(n, then) in (None, *tasks)}
        _check_earlier_layouts(shapes, named, weights)
        buffers = dict(trained_buffers(model))
        with_buffers = "buffers" in meta  # format_version >= 2
        from vlscale.peft.trainable import unused_vision_parameters

        unused = unused_vision_parameters(model)
        never_run = sorted(n for n, p in model.named_parameters() if id(p) in unused and n in shapes)
        if never_run and not check_only:  # an earlier vlscale trained them (CLIP's attention pool) to no effect
            logger.warning(f"{weights} holds {len(never_run)} parameters the model's visual path never runs (e.g. "
                           f"{never_run[:2]}), trained without effect by an earlier vlscale: left out")
            shapes = {n: shape for n, shape in shapes.items() if n not in never_run}
        _check_fits(model, meta, weights, shapes, named, buffers, with_buffers)
        settings = adapter_settings_mismatch(model, meta)
        if settings:  # the same names and shapes, another model: its outputs would not be the trained ones
            raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: {settings}. Build the model from the adapter's "
                                  f"adapter_config.json run_config.")
        if check_only:
            return meta
        if buffers and not with_buffers:
            logger.warning(f"{adapter_dir} was written by an earlier vlscale (format_version "
                           f"{meta.get('format_version', 0)}) that saved no buffers: the {len(buffers)} buffers of "
                           f"trained modules (e.g. {list(buffers)[:3]}: BatchNorm statistics of a trained vision "
                           f"tower) keep their freshly built values, so the outputs can differ from the trained "
                           f"model's")
        problem = None  # a read that fails on one rank: it goes on through the gathers, then every rank is told

        def copy(name: str, t: torch.Tensor) -> None:
            nonlocal problem
            if problem is None:
                try:
                    t.copy_(f.get_tensor(name).to(dtype=t.dtype, device=t.device))
                except (OSError, SafetensorError) as e:
                    problem = CheckpointError(f"{weights}: {name} could not be read ({e})")

        with torch.no_grad():
            for chunk in _chunks(list(named.items()), chunk_elements):
                with _gathered([p for _, p in chunk], modifier_rank=0):
                    for name, p in chunk:
                        if _sets_data(p):
                            copy(name, p.data)
            for name, b in (buffers.items() if with_buffers else ()):
                copy(name, b)
        _agree(problem, collective, weights)
    return meta


def _sets_data(p: torch.Tensor) -> bool:
    """Whether this rank sets ``p`` in a load: a ZeRO-3 parameter is set by rank 0 of its group (the modifier rank of
    its ``GatheredParameters``), whose values its exit gives to the others; any other tensor by every rank."""
    import torch.distributed as dist

    return not is_partitioned(p) or dist.get_rank(p.ds_process_group) == 0


def _open_adapter(adapter_dir: Path, meta: Optional[dict], files: contextlib.ExitStack, collective: bool):
    """(meta, the weights file's path, the file open in ``files``, {name: shape} from its header) for
    :func:`load_adapter`: its config (``meta`` or read), the file's step checked against it. ``collective``: every
    rank opens its own and the ranks agree (:func:`_agree`) that each could, with the same names, shapes and step."""
    from safetensors import SafetensorError, safe_open

    problem, f, shapes, weights, header = None, None, {}, adapter_dir / ADAPTER_WEIGHTS, None
    try:
        meta = meta if meta is not None else read_adapter_config(adapter_dir)
        if not weights.exists():  # a folder of its name is not readable as one, below
            raise CheckpointError(f"{adapter_dir}: {ADAPTER_WEIGHTS} is missing")
        try:
            f = files.enter_context(safe_open(str(weights), framework="pt"))  # its header; the data as it is copied
            step = (f.metadata() or {}).get("step")
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
        if step is not None and "step" in meta and step != str(meta["step"]):
            raise CheckpointError(f"{weights} holds the weights of step {step}, but the {ADAPTER_CONFIG} read with "
                                  f"them is of step {meta['step']}: the run writing {adapter_dir} replaced it while "
                                  f"it was read (it is still training); read it again, or evaluate a copy of it")
        header = hashlib.sha256(json.dumps([step, sorted(shapes.items())]).encode()).hexdigest()
    except CheckpointError as e:
        problem = e
    _agree(problem, collective, weights, header)
    return meta, weights, f, shapes


def _agree(problem: Optional[CheckpointError], collective: bool, weights: Path, header: Optional[str] = None) -> None:
    """Raise ``problem`` (this rank's), or with ``collective`` (one all-gather) every rank's on every rank, naming the
    ranks and ``weights``; and where ``header`` (a digest of the file's names, shapes and step) differs from rank 0's,
    say which ranks read another file (each rank opens its own copy of the path)."""
    from vlscale.engine.distributed import all_gather_object

    mine = (None if problem is None else str(problem), header)
    views = all_gather_object(mine) if collective else [mine]
    if len(views) == 1:
        if problem is not None:
            raise problem
        return
    failed = [(r, why) for r, (why, _) in enumerate(views) if why is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise CheckpointError(f"{weights} could not be read on rank{'s' if len(failed) > 1 else ''} {ranks} of "
                              f"{len(views)}: " + "; ".join(f"rank {r}: {why.removeprefix(f'{weights}: ')}"
                                                            for r, why in failed)) from problem
    other = [str(r) for r, (_, seen) in enumerate(views) if seen != views[0][1]]
    if other:
        raise CheckpointError(f"{weights} holds other tensor names, shapes or another step on rank"
                              f"{'s' if len(other) > 1 else ''} {', '.join(other)} than on rank 0: each rank reads "
                              f"its own copy of the path, and they differ; every rank must read the same adapter")


def _check_fits(model, meta: dict, weights: Path, shapes: dict, named: dict, buffers: dict, with_buffers: bool) -> None:
    """Refuse a file (``shapes``: its names and shapes) whose tensors are not the model's trainable parameters
    (``named``) and, since format_version 2, the buffers of its trained modules (``buffers``), naming what differs."""
    expected = {**named, **buffers} if with_buffers else named
    missing = sorted(set(expected) - set(shapes))
    missing_params = [n for n in missing if n in named]
    missing_buffers = [n for n in missing if n not in named]
    unexpected = sorted(set(shapes) - set(expected))
    bad_shape = [f"{n}: file {shapes[n]} vs model {full_shape(expected[n])}"
                 for n in sorted(set(expected) & set(shapes)) if shapes[n] != full_shape(expected[n])]
    empty = [n for n, shape in shapes.items()
             if np.prod(shape) == 0 and n in named and np.prod(full_shape(named[n])) != 0]
    if not (missing or unexpected or bad_shape or empty):
        return
    parts = []
    if missing_params:
        parts.append(f"{len(missing_params)} trainable parameters missing from the file (e.g. {missing_params[:3]})")
    if missing_buffers:
        parts.append(f"{len(missing_buffers)} buffers of trained modules missing from the file "
                     f"(e.g. {missing_buffers[:3]})")
    if unexpected:
        what = "trainable parameters or buffers of trained modules" if with_buffers else "trainable parameters"
        parts.append(f"{len(unexpected)} tensors in the file that are not {what} of the model "
                     f"(e.g. {unexpected[:3]})")
    if bad_shape:
        parts.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:3]})")
    if empty:
        parts.append(f"0-size tensors saved from a partitioned model (e.g. {empty[:3]})")
    settings = adapter_settings_mismatch(model, meta)
    raise CheckpointError(f"{weights} does not fit the model: " + "; ".join(parts) +
                          (f" ({settings})" if settings else "") +
                          ". Build the model from the adapter's adapter_config.json run_config.")


def check_init_adapter(cfg) -> dict:
    """``train.init_adapter``'s adapter_config.json, checked against the run ``cfg`` before anything is built (a warm
    start: :func:`load_adapter` loads it onto the freshly built model). Refused, naming ``train.init_adapter`` and
    the folder: a folder that is missing or not an adapter (:func:`read_adapter_config`), a weights file missing,
    unreadable or of another step than its config (:func:`_open_adapter`, as the load reads it), another model.* /
    peft.* setting (:func:`settings_mismatch`, naming both values), and, for an adapter that holds weights of each
    task (``peft.sharing=multiple`` or ``half_shared``, Hyperformer's task embeddings, per-task prompts), a task in
    ``data.tasks`` the adapter's run lacks (it has no weights to start from), naming it; a subset of the adapter's
    tasks starts from their weights and the shared ones (the others' are left out: :func:`load_adapter`'s
    ``tasks``). An adapter whose weights are all shared by the tasks (``peft.sharing=single``) starts any tasks.
    Names and shapes are checked by the load, after the build."""
    from vlscale.peft.trainable import task_of

    folder = Path(cfg.train.init_adapter)
    where = f"train.init_adapter={str(folder)!r}"
    try:
        with contextlib.ExitStack() as files:  # its config, and the weights file's header and step
            meta = _open_adapter(folder, None, files, collective=False)[0]
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    config = folder / ADAPTER_CONFIG
    problem = settings_mismatch(cfg, meta)
    if problem:
        raise CheckpointError(f"{where}: {problem}; a warm start builds the model the adapter was trained with "
                              f"(the run_config in {config})")
    then, now = list(trained_with(meta, "data.tasks") or []), list(cfg.data.tasks)
    per_task = [n for n in (*meta.get("parameters", {}), *meta.get("buffers", {})) if task_of(n, then)]
    if per_task and not set(now) <= set(then):
        only_now = [t for t in now if t not in then]
        raise CheckpointError(
            f"{where}: the adapter was trained with data.tasks={then!r}, this run has data.tasks={now!r}: "
            f"{only_now} only in this run (no weights to start from). "
            f"The adapter holds weights of each task (e.g. {per_task[0]}, peft.sharing="
            f"{trained_with(meta, 'peft.sharing')!r}), so a warm start from it trains its tasks "
            f"or some of them; one whose weights are all shared (peft.sharing=single, except Hyperformer) starts any "
            f"({config})")
    return meta


def redeclared_tasks_note(cfg, meta: dict) -> Optional[str]:
    """A note for a warm start (``meta``: the adapter's adapter_config.json) whose run declares a custom task of the
    adapter's run otherwise (another ``like`` or ``prefix``, ``data.custom_tasks``), or None. Allowed, as other
    data.* settings are (a prompt or data ablation from trained weights), but said: the task's weights were trained
    on inputs of the other prefix or format."""
    from vlscale.data.tasks import get_task

    def declared(custom: dict, name: str) -> dict:
        d = custom[name]
        return {"like": d.get("like"), "prefix": d.get("prefix", f"{name}:")}

    then = trained_with(meta, "data.custom_tasks") or {}
    changed = [(t, declared(then, t), {"like": get_task(t).format, "prefix": get_task(t).prefix})
               for t in cfg.data.tasks if t in then and t in cfg.data.custom_tasks]
    changed = [(t, a, b) for t, a, b in changed if a != b]
    if not changed:
        return None
    told = "; ".join(f"{t}'s {k} is {b[k]!r} here, {a[k]!r} in the adapter's run" for t, a, b in changed
                     for k in a if a[k] != b[k])
    return (f"train.init_adapter={str(cfg.train.init_adapter)!r}: data.custom_tasks.{told} (its weights were trained "
            f"on the other inputs; allowed, as another data.* setting is)")


# ----------------------------------------------------------------------------- RNG and JSON state

def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.cpu().tolist(), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            return {"__dict_items__": [[_to_jsonable(k), _to_jsonable(v)] for k, v in obj.items()]}
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a JSON checkpoint")


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        if "__dict_items__" in obj:
            return {_from_jsonable(k): _from_jsonable(v) for k, v in obj["__dict_items__"]}
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


def rng_state() -> dict:
    """This rank's random-number state: the host's generators and, on a GPU, the generator of the rank's own
    device (the current one, ``init_distributed`` set it). Not every visible device's: the others are other
    ranks' or unused, and that list, restored by device index, failed on a machine showing fewer GPUs and put
    another device's state on this rank's where ranks map to other local devices (2 nodes x 4 -> 1 x 8)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # an earlier vlscale saved every visible device's, in device order
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)


# ----------------------------------------------------------------------------- frozen weights

def frozen_names(model: torch.nn.Module) -> set[str]:
    """Every state-dict name of a frozen parameter, tied aliases included (an embedding shared by the
    encoder, the decoder and the LM head is one parameter under three names)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


@contextlib.contextmanager
def frozen_left_out(model: torch.nn.Module):
    """While open, ``model.state_dict()`` leaves out the frozen parameters under every name.
    (DeepSpeed's ``exclude_frozen_parameters`` drops each one under its first name only.)"""
    names = frozen_names(model)

    def drop(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in names]:
            del state_dict[key]

    handle = model.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def load_module_state(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's ``custom_load_fn``: load a checkpoint's module state, which may lack exactly the
    frozen parameters (they are the freshly built ones, see :func:`frozen_fingerprint`)."""
    result = dst.load_state_dict(src, strict=False)
    frozen = frozen_names(dst)
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"the checkpoint's module state does not fit the model: {len(missing)} trainable "
                              f"parameters or buffers missing (e.g. {missing[:3]}), {len(result.unexpected_keys)} "
                              f"unexpected (e.g. {result.unexpected_keys[:3]})")


def frozen_fingerprint(model: torch.nn.Module, device=None, chunk_elements: int = 1 << 24) -> dict[str, list[float]]:
    """{name: [sum of squares, sum of absolute values]} of each frozen parameter, and of each persistent
    buffer of a module that trains none of its own parameters (a frozen CLIP's batch-norm statistics: weights
    that differ there alone give other features), in float64.

    Collective under ZeRO-3: each rank sums its partition (padding adds 0) and one all-reduce makes
    the whole tensor's sums, the same on every rank and for any number of ranks (buffers are whole on
    every rank). A parameter with a partition out on NVMe (ZeRO-Infinity; its tensor is then a
    placeholder) on some rank is left out.
    """
    from vlscale.engine.distributed import all_reduce_sum

    names, rows, partitioned = [], [], []
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *_persistent_buffers(model, trained=False)]:
            if p.requires_grad:
                continue
            t = p.ds_tensor if is_partitioned(p) else p
            away = getattr(t, "status", None) is not None and t.status.name != "AVAILABLE"
            squares = absolute = 0.0
            for chunk in ([] if away else t.detach().reshape(-1).split(chunk_elements)):
                chunk = chunk.double()
                squares += float(chunk.square().sum())
                absolute += float(chunk.abs().sum())
            names.append(name)
            rows.append([squares, absolute, float(away)])
            partitioned.append(is_partitioned(p))
    if any(partitioned):
        flat = all_reduce_sum([x for row in rows for x in row], device if device is not None else "cpu")
        sums = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        rows = [total if part else mine for total, mine, part in zip(sums, rows, partitioned)]
    return {name: row[:2] for name, row in zip(names, rows) if not row[2]}


def frozen_mismatch(saved: Optional[dict], now: dict, rtol: float = 1e-9,
                    then: str = "in the checkpointed run") -> Optional[str]:
    """Why the frozen weights built now are not the checkpointed run's (``then``: where ``saved`` is from, as
    the message names it), or None. Tensors fingerprinted on one side only (a partition on NVMe) are not
    compared; which parameters are frozen is the run config's, checked before. ``saved`` None: a checkpoint from
    before fingerprints (vlscale then wrote the frozen weights into it). The sums are over whole tensors, so any
    number of ranks compares."""
    if saved is None:
        return None
    for name in sorted(set(saved) & set(now)):
        a, b = saved[name], now[name]
        if any(abs(x - y) > rtol * max(abs(x), abs(y)) for x, y in zip(a, b)):
            return (f"{name} differs (sum of squares {b[0]:.10g} now, {a[0]:.10g} {then}; "
                    f"sum of |w| {b[1]:.10g} vs {a[1]:.10g})")
    return None


# ----------------------------------------------------------------------------- checkpoints/

class SafeTorchCheckpointEngine:
    """DeepSpeed checkpoint engine that loads with ``weights_only=True`` (no arbitrary unpickling)."""

    @staticmethod
    def safe_globals() -> list:
        out = []
        try:
            from deepspeed.runtime.zero.config import ZeroStageEnum
            out.append(ZeroStageEnum)
        except ImportError:  # pragma: no cover - depends on the DeepSpeed version
            pass
        try:
            from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
            out += [LossScaler, DynamicLossScaler]
        except ImportError:  # pragma: no cover
            pass
        try:
            from deepspeed.utils.tensor_fragment import fragment_address
            out.append(fragment_address)
        except ImportError:  # pragma: no cover
            pass
        return out


def _safe_load(load, path, *args, **kwargs):
    """``load`` (torch.load) with ``weights_only=True`` and only DeepSpeed's few state classes allowed."""
    import pickle

    kwargs["weights_only"] = True
    with torch.serialization.safe_globals(SafeTorchCheckpointEngine.safe_globals()):
        try:
            return load(path, *args, **kwargs)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing ({e.strerror})") from e
        except pickle.UnpicklingError as e:  # names the refused global
            raise CheckpointError(f"{path}: refused to load with weights_only=True ({e}). vlscale never "
                                  f"unpickles arbitrary objects from checkpoints.") from e
        except Exception as e:  # a truncated or corrupt file: torch's zip reader fails
            raise CheckpointError(f"{path}: not a readable checkpoint file, truncated or corrupt "
                                  f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e


def install_safe_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read files with ``torch.load(weights_only=True)``."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_vlscale_safe", False):
        return
    ce.load = lambda path, map_location=None: _safe_load(torch.load, path, map_location=map_location)
    ce._vlscale_safe = True


def _zero3_group_steps(folder: Path) -> Optional[tuple[dict, list]]:
    """(each param group's Adam step count, the fp32 groups) of a ZeRO-3 checkpoint, from rank 0's
    optimizer-states file (every rank's holds the same counts); None where there is no such file."""
    files = sorted(folder.glob("zero_pp_rank_0_mp_rank_*_optim_states.pt"))
    if not files:
        return None
    # mmap: only the step counts are read, not the moments (gigabytes a rank under full fine-tuning), on every rank
    osd = _safe_load(torch.load, files[0], map_location="cpu", mmap=True).get("optimizer_state_dict") or {}
    if "optimizer_state_dict" not in osd or "fp32_flat_groups" not in osd:
        return None
    states = osd["optimizer_state_dict"]["state"]
    counts = {g: float(s["step"]) for g, s in states.items() if isinstance(s, dict) and "step" in s}
    return counts, list(osd["fp32_flat_groups"])


def fill_unstepped_groups(state: Any) -> Any:
    """A ZeRO optimizer-states file's contents (``*_optim_states.pt``, stages 1-3) with Adam's state made for the
    param groups that hold none: ``exp_avg`` and ``exp_avg_sq`` zeros of the group's fp32 partition, ``step`` 0 (what
    AdamW creates at a group's first step, so its updates are unchanged). Per-task groups (:class:`TaskSteps`) of a
    task no step has drawn yet have no state, and DeepSpeed's universal conversion then failed (``KeyError:
    'exp_avg'`` at stages 1-2, ``KeyError: <group>`` at stage 3): a resume on another number of ranks of a checkpoint
    written before every task was drawn. Anything else is returned as it is."""
    osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(osd, dict):
        return state
    if "base_optimizer_state" in osd and "single_partition_of_fp32_groups" in osd:  # ZeRO 1-2
        states, flats = osd["base_optimizer_state"]["state"], osd["single_partition_of_fp32_groups"]
    elif "optimizer_state_dict" in osd and "fp32_flat_groups" in osd:  # ZeRO 3
        states, flats = osd["optimizer_state_dict"]["state"], osd["fp32_flat_groups"]
    else:
        return state
    steps = [s["step"] for s in states.values() if isinstance(s, dict) and "step" in s]
    for g, flat in enumerate(flats):
        if not states.get(g):
            states[g] = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            if steps:
                states[g]["step"] = torch.zeros_like(steps[0]) if isinstance(steps[0], torch.Tensor) else 0
    return state


@contextlib.contextmanager
def weights_only_loads(post=None):
    """While open, every ``torch.load`` reads with ``weights_only=True``: DeepSpeed's universal
    checkpoint code (conversion and loading) calls ``torch.load(weights_only=False)`` itself. ``post``: applied to
    what each load returns."""
    original = torch.load
    post = post or (lambda loaded: loaded)
    torch.load = lambda path, *args, **kwargs: post(_safe_load(original, path, *args, **kwargs))
    try:
        yield
    finally:
        torch.load = original


def _to_universal(root: Path, tag: str, rank: int, quiet: bool = False) -> Path:
    """Rank 0 converts ``root/tag`` into DeepSpeed's universal format (full-shape fp32 weights and
    optimizer state per parameter, for any number of ranks) under ``root/.universal-<tag>/<tag>``;
    every rank waits for it. -> the folder to load ``tag`` from. ``quiet`` (--no-progress): the
    conversion's print()s and tqdm bars (it has no option to leave them out) are shown only if it fails."""
    import argparse
    import io
    import sys

    from vlscale.engine.distributed import barrier

    out = root / f".universal-{tag}"
    if rank == 0:
        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(out / tag), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        said = io.StringIO()
        with weights_only_loads(post=fill_unstepped_groups), contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(said))
                stack.enter_context(contextlib.redirect_stderr(said))
            try:
                ds_to_universal.main(args)
            except Exception:
                stack.close()
                sys.stderr.write(said.getvalue())  # what it said before it failed
                raise
    barrier()
    return out


def needs_universal(output_dir, world_size: int) -> bool:
    """Whether resuming ``output_dir`` on ``world_size`` ranks reads another number of ranks' ZeRO
    partitions (then the engine must be built with ``checkpoint.load_universal``)."""
    root = Path(output_dir) / "checkpoints"
    tag = latest_tag(root)
    return tag is not None and saved_world_size(root / tag) != world_size


def latest_tag(ckpt_root) -> Optional[str]:
    path = Path(ckpt_root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(ckpt_root) / tag).is_dir():
        old = Path(ckpt_root) / f"{tag}.old"
        if tag and old.is_dir():  # a save of this step again (a run resumed from before it) died while replacing it
            raise CheckpointError(f"{path} names checkpoint {tag!r}, which does not exist in {ckpt_root}, but {old.name} "
                                  f"does: a save that replaced it was interrupted; rename {old} to {tag} to resume "
                                  f"from it")
        raise CheckpointError(f"{path} names checkpoint {tag!r}, which does not exist in {ckpt_root}; "
                              f"{earlier_checkpoint_hint(Path(ckpt_root) / tag)}")
    return tag


LOCK_FILE = ".vlscale.lock"


def lock_output_dir(output_dir):
    """Hold an exclusive lock on ``output_dir/.vlscale.lock`` (an open file; released when it is closed or
    the process ends): two runs writing one output_dir (a second start, a resume while the first still
    runs) would interleave their logs and overwrite each other's checkpoints. The holder's pid and
    start time are written in the file and named in the refusal."""
    import datetime

    from vlscale.files import hold_lock

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f, holder = hold_lock(out / LOCK_FILE, f"pid {os.getpid()} on {socket.gethostname()}, "
                                               f"since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
    except OSError as e:  # an output_dir the run cannot write (its permissions, a read-only file system)
        raise CheckpointError(f"output_dir {str(out)!r} cannot be written: {e.strerror or e}"
                              f"{': ' + str(e.filename) if e.filename else ''}; make it writable or choose "
                              f"another output_dir (output_dir=...)") from None
    if f is None:
        raise in_use_error(out, holder)
    return f


def lock_holder(output_dir) -> Optional[str]:
    """Who holds ``output_dir``'s lock (what :func:`lock_output_dir` wrote: pid, host, time), or None where no run
    does, looked at without taking it (:func:`vlscale.files.lock_holder`), for the launcher's refusal before
    start-up: there the output_dir's checkpoints, which another run may still be writing, would give another refusal,
    and a hint (--resume, or dropping it) that meets the lock."""
    from vlscale import files

    return files.lock_holder(Path(output_dir) / LOCK_FILE)


def in_use_error(output_dir, holder: str) -> CheckpointError:
    return CheckpointError(f"output_dir {str(output_dir)!r} is in use by another vlscale run ({holder}); wait for it "
                           "to end or choose another output_dir (output_dir=...)")


def check_output_dir(output_dir, resume: bool, world_size: Optional[int] = None,
                     global_batch: Optional[int] = None, zero_stage: Optional[int] = None,
                     verify: bool = False) -> Optional[str]:
    """Refuse to overwrite another run; with ``resume``, the tag to resume from. With ``world_size``
    and ``global_batch``, a resume that cannot continue the run's data order is refused too (before
    anything is built): another number of ranks is fine when the global batch is the same. A resume
    of a checkpoint with a corrupt client state or missing files, or (with ``zero_stage``, this run's)
    one written at a ZeRO stage that does not load into this run's, is refused as well; with ``verify``, one
    whose files' bytes changed since they were written too (:func:`check_checkpoint_files`)."""
    ckpt_root = Path(output_dir) / "checkpoints"
    tag = latest_tag(ckpt_root)
    steps = sorted(p.name for p in ckpt_root.glob("step*") if p.is_dir()) if ckpt_root.is_dir() else []
    if tag is not None and not resume:
        raise CheckpointError(
            f"output_dir {str(output_dir)!r} already holds a run's checkpoint ({ckpt_root / tag}); pass --resume "
            f"to continue it or choose another output_dir (output_dir=...)")
    if resume and not Path(output_dir).exists():  # a relative output_dir given from another folder (so no tag)
        from vlscale.files import cwd_note

        raise CheckpointError(f"--resume: output_dir {str(output_dir)!r} does not exist{cwd_note(output_dir)}; give "
                              f"the run's output_dir (output_dir=...), or drop --resume to start a new run")
    if resume and tag is None:
        hint = (f"; it holds {steps}: write the one to resume into {ckpt_root / LATEST}" if steps
                else "; drop --resume to start a new run")
        raise CheckpointError(f"--resume: no checkpoint to resume in {str(ckpt_root)!r} (no '{LATEST}' file){hint}")
    if not resume:  # another run's results, even without its checkpoint's 'latest': not overwritten either
        adapter = Path(output_dir) / "adapter"  # or adapter.old alone: its save was killed between the renames
        held = [p.name for p in (adapter, _replaced(adapter)) if p.is_dir()] + steps
        if held:
            raise CheckpointError(f"output_dir {str(output_dir)!r} holds another run's {held} (its checkpoint "
                                  "is gone or has no 'latest'); choose another output_dir (output_dir=...) or move "
                                  "them away")
    if resume and world_size is not None:
        _check_world_size(ckpt_root / tag, world_size, global_batch)
    if resume:
        check_checkpoint_files(ckpt_root / tag, zero_stage, verify=verify)
    return tag


def step_number(name: str) -> Optional[int]:
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def earlier_checkpoint_hint(ckpt_dir) -> str:
    """What to do when the checkpoint in ``ckpt_dir`` (``checkpoints/step<N>``) cannot be resumed: point
    ``latest`` at the newest earlier step folder kept beside it, or start anew if there is none."""
    ckpt_dir = Path(ckpt_dir)
    root, now = ckpt_dir.parent, step_number(ckpt_dir.name)
    earlier = sorted((p for p in root.glob("step*") if p.is_dir() and step_number(p.name) is not None
                      and (now is None or step_number(p.name) < now)), key=lambda p: step_number(p.name))
    if earlier:
        return (f"the previous checkpoint is {earlier[-1]}: write '{earlier[-1].name}' into {root / LATEST} to "
                f"resume from it")
    return f"no earlier checkpoint is kept in {root}: start a new run (another output_dir)"


def read_client_state(path) -> dict:
    """A ``client_state_rank<R>.json`` as stored (JSON, not yet decoded by :func:`_from_jsonable`). A file
    that is not valid JSON (truncated, a full disk) or holds no step is a CheckpointError naming it and
    the earlier checkpoint to resume instead."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {earlier_checkpoint_hint(path.parent)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON, truncated or corrupt ({e}); "
                              f"{earlier_checkpoint_hint(path.parent)}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a client state (no 'step'); {earlier_checkpoint_hint(path.parent)}")
    return state


def _zero_family(stage) -> str:
    """DeepSpeed checkpoints load into the engines of one family: stage 0; stages 1 and 2 (the same
    optimizer and files); stage 3."""
    return {0: "0", 1: "1-2", 2: "1-2", 3: "3"}.get(stage, str(stage))


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states(ckpt_dir: Path) -> tuple[Optional[str], Optional[dict]]:
    """(file name, contents) of rank 0's DeepSpeed model-states file in ``ckpt_dir``, read memory-mapped
    (its tensors stay on disk); (name, None) when it is not readable that way, (None, None) when absent."""
    for name in MODEL_STATES:
        if (ckpt_dir / name).is_file():
            try:
                return name, _safe_load(torch.load, ckpt_dir / name, map_location="cpu", mmap=True)
            except CheckpointError:  # not zip-serialised (no mmap), or truncated
                return name, None
    return None, None


def _saved_stage(ckpt_dir: Path, state: dict) -> Optional[int]:
    """The ZeRO stage that wrote ``ckpt_dir``: recorded in rank 0's client state, or (a checkpoint of an
    earlier vlscale) in the DeepSpeed config its model-states file holds; None when that file is gone or
    unreadable (DeepSpeed's load then says so)."""
    if state.get("zero_stage") is not None:
        return int(state["zero_stage"])
    name, saved = _model_states(ckpt_dir)
    if saved is None:
        return 3 if name is not None and name.startswith("zero_pp_rank_") else None
    stage = ((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
    return int(stage) if stage is not None else None


def saved_trained_shapes(ckpt_dir) -> Optional[dict[str, tuple[int, ...]]]:
    """name -> full shape of each parameter the checkpoint's run trained: DeepSpeed's ``param_shapes``
    (ZeRO 1-3, one dict per optimizer group), or the saved module's non-buffer entries (stage 0, whose
    module state holds only what trained); None when the model-states file is unreadable."""
    _, saved = _model_states(Path(ckpt_dir))
    if saved is None:
        return None
    if saved.get("param_shapes"):
        return {n: tuple(shape) for group in saved["param_shapes"] for n, shape in group.items()}
    buffers = set(saved.get("buffer_names") or ())
    return {n: tuple(t.shape) for n, t in (saved.get("module") or {}).items() if n not in buffers}


def check_trained_parameters(ckpt_dir, model: torch.nn.Module) -> None:
    """Refuse, before DeepSpeed loads it (its refusal is a size mismatch deep in the optimizer load), a
    checkpoint whose run trained other parameters than ``model`` trains: a vlscale that decided the
    trainable set otherwise wrote it (before 2026-12-02 a CLIP-training image run also trained CLIP's
    attention pool, which the image path never runs)."""
    saved = saved_trained_shapes(ckpt_dir)
    if saved is None:
        return
    now = {name: full_shape(p) for name, p in trainable_parameters(model)}
    gone, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    reshaped = sorted(n for n in set(saved) & set(now) if saved[n] != now[n])
    if not (gone or new or reshaped):
        return

    def some(names, what):
        return f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    problems = [some(names, what) for names, what in (
        (gone, "trained then, frozen or absent now"), (new, "trained now, not then"),
        (reshaped, "of another shape now")) if names]
    raise CheckpointError(
        f"{ckpt_dir} was written by a run that trained other parameters than this one does: "
        f"{'; '.join(problems)}. Its optimizer state does not fit this run (a vlscale that chose the trainable "
        f"parameters otherwise wrote it). Finish it with that version, or start a new run in another output_dir")


def _expected_deepspeed_files(ckpt_dir: Path, stage, world: int) -> list[str]:
    """DeepSpeed's file names for a checkpoint of ``stage`` written by ``world`` ranks (a checkpoint of an
    earlier vlscale, which did not record them). Optimizer files carry DeepSpeed's "bf16_" prefix under bf16."""
    names = {p.name for p in ckpt_dir.iterdir()}
    prefix = "bf16_" if any(n.startswith("bf16_zero_pp_rank_") for n in names) else ""
    files = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3
             else ["mp_rank_00_model_states.pt"])
    if stage not in (0, None):
        files += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return files


def _corruption(f: Path) -> Optional[str]:
    """Why the torch archive ``f`` (a DeepSpeed ``.pt`` file) is corrupt: a record whose bytes no longer
    match the CRC-32 that torch.save stored (torch.load does not check it: a changed byte of a tensor loads
    as another value, NaN for all we know), or an archive that does not read; None when it is intact.
    Records stored without a CRC (torch's ``compute_crc32`` off: 0) are not checked."""
    import zipfile

    try:
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if info.CRC:
                    with archive.open(info) as record:  # raises BadZipFile at the end on a CRC mismatch
                        while record.read(1 << 24):
                            pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def check_checkpoint_files(ckpt_dir, zero_stage: Optional[int] = None, every_state: bool = True,
                           verify: bool = False) -> None:
    """Refuse, before DeepSpeed reads it (its refusals are an empty AssertionError or a None deep inside), a
    checkpoint written at a ZeRO stage that does not load into ``zero_stage`` (this run's; None: not
    compared), or one whose files are missing or not the size they were written at. ``every_state``:
    every rank's client state is read too (rank 0's check before anything is built), so no rank finds
    its own corrupt once the others are inside DeepSpeed's collectives. ``verify``: every DeepSpeed file
    is read and checked against the CRC-32s stored in it as well (:func:`_corruption`)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_client_state(ckpt_dir / "client_state_rank0.json")
    saved = _saved_stage(ckpt_dir, state)
    if zero_stage is not None and saved is not None and _zero_family(saved) != _zero_family(zero_stage):
        raise CheckpointError(
            f"{ckpt_dir} was written at ZeRO stage {saved} and this run is at ZeRO stage {zero_stage}: DeepSpeed's "
            f"checkpoints of stage 0, of stages 1-2 and of stage 3 do not load into one another. Resume at the run's "
            f"stage: with the --deepspeed file it ran with")  # not train.zero_stage=N: --resume refuses a changed setting
    world = int(state.get("world_size") or saved_world_size(ckpt_dir))
    problems = [f"client_state_rank{r}.json is missing" for r in range(world)
                if not (ckpt_dir / f"client_state_rank{r}.json").is_file()]
    if every_state:
        for r in range(1, world):
            if (ckpt_dir / f"client_state_rank{r}.json").is_file():
                read_client_state(ckpt_dir / f"client_state_rank{r}.json")
    recorded = state.get("deepspeed_files")
    if recorded is None:  # written by an earlier vlscale: DeepSpeed's names for the stage, where it is known
        stage = saved if saved is not None else zero_stage
        recorded = {n: None for n in _expected_deepspeed_files(ckpt_dir, stage, world)} if stage is not None else {}
    for name, size in sorted(recorded.items()):
        f = ckpt_dir / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif size is not None and f.stat().st_size != size:
            problems.append(f"{name} is {f.stat().st_size} bytes, {size} when written")
    if problems:
        raise CheckpointError(f"{ckpt_dir} is incomplete ({'; '.join(problems)}); {earlier_checkpoint_hint(ckpt_dir)}")
    if verify:
        corrupt = [f"{name}: {why}" for name in sorted(recorded) if (why := _corruption(ckpt_dir / name))]
        if corrupt:
            raise CheckpointError(f"{ckpt_dir} is corrupt, its bytes changed since they were written "
                                  f"({'; '.join(corrupt)}); {earlier_checkpoint_hint(ckpt_dir)}")


WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter", "No space left", "Disk quota",
                  "Input/output error")


def is_write_failure(e: BaseException) -> bool:
    """An error of writing a file: any OSError, or torch's writer failing (a full disk shows as
    RuntimeError "unexpected pos N vs M" or "PytorchStreamWriter failed writing file")."""
    if isinstance(e, CheckpointError):
        return False
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in WRITE_FAILURES))


def _torch_save_naming_its_file(writer):
    """DeepSpeed's ``TorchCheckpointEngine.save`` (``torch.save`` to a path) through a file Python opens: torch's
    own writer on a full disk, a quota or a file-size limit said only "unexpected pos N vs M" (neither the file nor
    the OS's reason); Python's write raises the OSError, raised again here with the file's path."""
    def save(state_dict, path):
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=writer.zipfile_serialization)
        except Exception as e:
            cause = e
            while cause is not None and not (isinstance(cause, OSError) and cause.errno):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e
    return save


def write_failure_reason(e: BaseException, folder: Path) -> str:
    """A rank's failure during a save in one line; a failed write's (:func:`is_write_failure`) with the free space
    where it wrote."""
    if isinstance(e, OSError) and e.strerror:
        reason = f"{e.strerror}{': ' + str(e.filename) if e.filename else ''}"
    else:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = f"{type(e).__name__}: {lines[0] if lines else ''}"
    if not is_write_failure(e):
        return reason
    if isinstance(e, OSError) and e.errno == errno.EFBIG:  # the free space is beside the point
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return f"{reason}; this process's file-size limit (ulimit -f) is {limit} bytes"
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        from vlscale.profiling.analytic import fmt_bytes

        reason += f"; {fmt_bytes(shutil.disk_usage(where).free)} free on its file system"
    except Exception:  # the reason stands without it
        pass
    return reason


def written_bytes(ckpt_dir) -> dict[str, list[int]]:
    """What each rank wrote into one checkpoint folder (``checkpoints/step<N>``): ``{"files": bytes on
    disk per rank, "tensors": bytes of the tensors in them per rank}``, read with weights_only=True.
    DeepSpeed's ``mp_rank_00_model_states.pt`` is rank 0's, ``zero_pp_rank_<R>_*`` and
    ``client_state_rank<R>.json`` rank R's."""
    ckpt_dir = Path(ckpt_dir)
    world = saved_world_size(ckpt_dir)
    files, tensors = [0] * world, [0] * world
    for f in sorted(ckpt_dir.iterdir()):
        if f.name.startswith("client_state_rank"):
            rank = int(f.name[len("client_state_rank"):-len(".json")])
        elif "zero_pp_rank_" in f.name:  # zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt, bf16_zero_pp_rank_R_...
            rank = int(f.name.split("zero_pp_rank_")[1].split("_")[0])
        else:
            rank = 0
        files[rank] += f.stat().st_size
        if f.suffix == ".pt":
            leaves, _ = tree_flatten(_safe_load(torch.load, f, map_location="cpu"))
            tensors[rank] += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
    return {"files": files, "tensors": tensors}


def saved_world_size(ckpt_dir) -> int:
    """How many ranks wrote the checkpoint in ``ckpt_dir`` (one client state file each)."""
    return len(list(Path(ckpt_dir).glob("client_state_rank*.json")))


def _check_world_size(ckpt_dir: Path, world_size: int, global_batch: Optional[int]) -> None:
    """A resume on ``world_size`` ranks with ``global_batch`` continues the data order of the run in
    ``ckpt_dir`` only with its global batch (on any number of ranks); refused otherwise."""
    saved = saved_world_size(ckpt_dir)
    state = read_client_state(ckpt_dir / "client_state_rank0.json") if saved else {}
    loader = state.get("loader", {})
    saved_batch = loader.get("sampler", {}).get("global_batch_size")
    if (saved == world_size) if global_batch is None else (saved_batch == global_batch):
        return
    micro = saved_batch // (saved * loader.get("accum", 1)) if saved_batch else "?"
    hint = ""
    if saved_batch:
        fits = [f"train.micro_batch_size={saved_batch // (world_size * a)} train.gradient_accumulation_steps={a}"
                for a in range(1, saved_batch + 1) if saved_batch % (world_size * a) == 0][:2]
        hint = (f" (train.global_batch_size={saved_batch} derives the accumulation on any number of ranks that "
                f"divides it" + (f"; or e.g. {' or '.join(fits)}" if fits else
                                 f"; {world_size} ranks do not: resume on such a number of ranks") + ")")
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    by = f"{saved} rank{'s' if saved != 1 else ''}"
    raise CheckpointError(
        f"{ckpt_dir} was written by {by} with a global batch of {saved_batch} ({by} x micro-batch "
        f"{micro} x accumulation {loader.get('accum', '?')}); this run has {ranks} and a global batch of "
        f"{global_batch}. Resuming (on any number of ranks) needs the same global batch, ranks x "
        f"train.micro_batch_size x train.gradient_accumulation_steps{hint}, so that the data order continues.")


class _Writes:
    """One rank's part of a collective save. Its first failure (any Exception: a write that fails, a full disk,
    or anything else in the rank's own part) is kept, not raised, and later writes are skipped, so the rank goes
    on through the save's collectives with the others; :meth:`agree` (collective) then tells every rank which
    ranks failed. Raised at once, a failure on one rank (a full local disk on one node) left the others in
    DeepSpeed's barrier, to end on a gloo error ("Connection closed by peer") instead of the reason, or, where
    the rank went on, waiting there until the process group's timeout. Not kept: KeyboardInterrupt and SystemExit
    (a second Ctrl-C aborts at once; the first one only asks the run to stop after a checkpoint), and a collective
    whose peer's process ended (:func:`vlscale.engine.distributed.peer_gone`: no agreeing with it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.error: Optional[BaseException] = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if not isinstance(error, Exception) or peer_gone(error):
            return False
        self.error = self.error or error
        return True

    def guard(self, fn):
        def guarded(*args, **kwargs):
            if self.error is None:
                with self:
                    return fn(*args, **kwargs)
        return guarded

    @contextlib.contextmanager
    def inside(self, engine):
        """The rank's own steps of ``engine.save_checkpoint``, between DeepSpeed's collectives, go through
        :meth:`guard`: its module and optimizer states built and written (``_save_checkpoint``,
        ``_save_zero_checkpoint``), its checkpoint engine's ``save`` and ``makedirs``, the recovery script's copy.
        An error that escapes DeepSpeed's save elsewhere left the rest of its collectives undone on this rank:
        with other ranks it is raised at once (agreeing would wait in another collective than theirs until the
        process group's timeout; the rank's process ends instead, and their collective fails at once)."""
        import torch.distributed as dist

        writer = getattr(engine, "checkpoint_engine", None)
        patched = [(obj, name, getattr(obj, name), name in vars(obj)) for obj, name in
                   ((writer, "save"), (writer, "makedirs"), (engine, "_copy_recovery_script"),
                    (engine, "_save_checkpoint"), (engine, "_save_zero_checkpoint"))
                   if obj is not None and hasattr(obj, name)]
        for obj, name, fn, _ in patched:
            if obj is writer and name == "save" and type(writer).__name__ == "TorchCheckpointEngine":
                fn = _torch_save_naming_its_file(writer)
            setattr(obj, name, self.guard(fn))
        alone = not (dist.is_initialized() and dist.get_world_size() > 1)
        try:
            with self if alone else contextlib.nullcontext():
                yield
        finally:
            for obj, name, fn, own in patched:
                setattr(obj, name, fn) if own else delattr(obj, name)

    def agree(self) -> Optional[str]:
        """Collective: None when every rank wrote its part, else each failed rank's reason."""
        from vlscale.engine.distributed import all_gather_object

        mine = write_failure_reason(self.error, self.folder) if self.error is not None else None
        reasons = all_gather_object(mine)
        failed = [(r, why) for r, why in enumerate(reasons) if why is not None]
        if not failed:
            return None
        return "; ".join(why if len(reasons) == 1 else f"rank {r}: {why}" for r, why in failed)


def save_checkpoint(engine, output_dir, step: int, client_state: dict, rank: int, keep: int = 2) -> str:
    """Write ``checkpoints/step<N>`` atomically (collective: every rank calls it). Returns the tag. A failure of
    any rank's part (a write, its DeepSpeed state, its client state) is the same :class:`CheckpointError` on every
    rank, naming the rank and reason, with that rank's error as its ``__cause__`` (see :class:`_Writes`)."""
    from vlscale.engine.distributed import barrier

    root = Path(output_dir) / "checkpoints"
    tag = f"step{step}"
    tmp = root / f".tmp-{tag}"
    writes = _Writes(root)
    previous = None
    with writes, contextlib.suppress(CheckpointError):
        previous = latest_tag(root)

    def check() -> None:
        reason = writes.agree()
        if reason is None:
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _restore_replaced(root / tag)  # failed between the renames: the step's previous folder back in place
        kept = (f"the previous checkpoint {root / previous} is intact (--resume continues from it)" if previous
                else "no earlier checkpoint exists")
        raise CheckpointError(f"the checkpoint at step {step} could not be written to {root} ({reason}); {kept}, "
                              f"and the temporary folder {tmp.name} is removed") from writes.error

    if rank == 0:
        with writes:
            # what an earlier save that died left: its half-written folder, or a replaced one not yet removed
            for stale in [*root.glob(".tmp-step*"), *root.glob("step*.old"), *root.glob(".universal-step*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
    check()
    with frozen_left_out(engine.module), writes.inside(engine):
        engine.save_checkpoint(str(tmp), tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
    with writes:
        if writes.error is None:
            state = dict(client_state, rng=rng_state())
            stage = getattr(engine, "zero_optimization_stage", None)
            if stage is not None:
                state["zero_stage"] = int(stage())
            if rank == 0:  # DeepSpeed's save ends in a barrier: every rank's files are written
                state["deepspeed_files"] = {f.name: f.stat().st_size for f in sorted((tmp / tag).iterdir())
                                            if f.is_file() and not f.name.startswith("client_state_rank")}
            (tmp / tag / f"client_state_rank{rank}.json").write_text(json.dumps(_to_jsonable(state)))
    check()
    if rank == 0:
        with writes:
            _replace_dir(tmp / tag, root / tag)
            shutil.rmtree(tmp)
            write_text_atomic(root / LATEST, tag)
    check()
    if rank == 0:  # the last ``keep`` up to this step: later ones are of a line resumed from before them (latest
        # pointed back at an earlier step), not newer than this one, and were kept in place of the run's own
        tags = sorted((p for p in root.glob("step*") if p.is_dir() and step_number(p.name) is not None
                       and step_number(p.name) <= step), key=lambda p: step_number(p.name))
        for old in tags[:-keep] if keep > 0 else []:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return tag


def scheduled_lrs(scheduler) -> Optional[list[float]]:
    """Each param group's lr at the scheduler's current step, from its own multipliers (a LambdaLR: the
    multipliers are this run's functions; ``base_lrs`` and ``last_epoch`` come from the checkpoint), set as its
    last lr too; None without a scheduler, another kind's saved last lr."""
    if scheduler is None:
        return None
    if not hasattr(scheduler, "lr_lambdas"):
        return list(scheduler.get_last_lr())
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    scheduler._last_lr = list(lrs)
    return lrs


def load_checkpoint(engine, output_dir, rank: int, world_size: int, frozen: Optional[dict] = None,
                    quiet: bool = False) -> dict:
    """Restore engine state and RNGs from ``checkpoints/latest``; returns this rank's client state.

    On another number of ranks than the checkpoint's (same global batch): under ZeRO the checkpoint
    is converted to DeepSpeed's universal format first (the engine must have been built with
    ``checkpoint.load_universal``, see :func:`needs_universal`); a rank the checkpoint has no state
    for takes rank 0's data position and seeds its RNGs from the step and its rank.
    ``frozen``: :func:`frozen_fingerprint` of the model as built now; a checkpoint whose run had other
    frozen weights is refused on every rank (collective). ``quiet``: the conversion's output left out
    (:func:`_to_universal`)."""
    from vlscale.engine.distributed import all_reduce_sum, barrier

    root = Path(output_dir) / "checkpoints"
    tag = latest_tag(root)
    if tag is None:
        raise CheckpointError(f"no checkpoint in {root}")
    _check_world_size(root / tag, world_size, int(engine.train_batch_size()))
    stage = getattr(engine, "zero_optimization_stage", None)
    check_checkpoint_files(root / tag, int(stage()) if stage is not None else None, every_state=False)
    check_trained_parameters(root / tag, engine.module)
    resized = saved_world_size(root / tag) != world_size
    own = root / tag / f"client_state_rank{rank}.json"
    client_file = own if own.is_file() or not resized else root / tag / "client_state_rank0.json"
    if not client_file.is_file():
        raise CheckpointError(f"{root / tag} holds no state for rank {rank} ({client_file.name} is missing)")
    client_state = read_client_state(client_file)  # before DeepSpeed loads: a corrupt file changes nothing
    universal = resized and engine.zero_optimization()
    if universal and not engine.load_universal_checkpoint():
        raise CheckpointError(f"{root / tag} was written by {saved_world_size(root / tag)} ranks: build the engine "
                              f"with ds_config['checkpoint']['load_universal'] = True to resume it on {world_size}")
    install_safe_loading(engine)
    load_dir = _to_universal(root, tag, rank, quiet) if universal else root
    # Two defects of DeepSpeed 0.19.8's ZeRO-3 universal load, mended after it: it gives every param group
    # group 0's hyperparameters (the no-decay group would decay; the run's own, from the same config,
    # are put back, and each group's current lr from the loaded scheduler: train.peft_lr's groups have
    # their own), and one Adam step-count tensor to every group, which each group's step then
    # advances in place (group g would count g+1 steps per step: a wrong bias correction)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]
    own_steps = _zero3_group_steps(root / tag) if universal and int(engine.zero_optimization_stage()) == 3 else None
    try:
        with weights_only_loads() if universal else contextlib.nullcontext():
            path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True,
                                             custom_load_fn=load_module_state)
    finally:
        if universal:
            barrier()
            if rank == 0:
                shutil.rmtree(load_dir, ignore_errors=True)
    # Each group's lr from this run's schedule at the loaded step. The loaded groups hold the lr the checkpointed
    # run's schedule gave after its last step; with another train.max_steps (a run extended or shortened) that
    # is the old schedule's (0 at its end), and the first resumed step would run at it.
    lrs = scheduled_lrs(engine.lr_scheduler)
    for i, group in enumerate(inner.param_groups):
        if universal:
            group.update(groups[i])
        if lrs is not None:
            group["lr"] = lrs[i]
    if universal:
        for param_state in inner.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3's sub-groups, the state's keys
    if own_steps is not None and flats is not None and len(own_steps[1]) == len(flats):
        # ... and that tensor holds group 0's count: per-task groups (TaskSteps) step only when their task is
        # drawn, so each sub-group's own count (0 for a task not drawn yet) is put back, else Adam's bias
        # correction is another group's (a 2 -> 1 rank resume with 4 tasks differed by 1.5e-3 in fp32)
        counts, _ = own_steps
        for g, flat in enumerate(flats):
            param_state = inner.state.get(flat)
            if param_state and isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"].fill_(counts.get(g, 0.0))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    state = _from_jsonable(client_state)
    if frozen is not None:
        problem = frozen_mismatch(state.get("frozen"), frozen)
        if all_reduce_sum([float(problem is not None)], engine.device)[0]:
            raise CheckpointError(
                f"--resume: the frozen weights built now are not those of the run in {root / tag}"
                f"{': ' + problem if problem else ' (found on another rank)'}. Checkpoints hold only the trained "
                f"parameters; the frozen ones are built again from model.* as at the run's start, and what that "
                f"gives has changed (the weight files, or a library version initialising random weights "
                f"otherwise). Restore them, or start a new run.")
    rng = state.pop("rng")
    if client_file == own:
        set_rng_state(rng)
    else:
        seed = (int(state["step"]) * 1_000_003 + rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    state["tag"] = tag
    return state
