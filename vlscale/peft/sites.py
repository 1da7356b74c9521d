"""Where PEFT modules attach to the language model, and which task's weight set a forward uses.

Sites are sublayers of an HF encoder-decoder whose *output* a forward hook rewrites:

    adapter sites (adapter, Hyperformer, Compacter): the output of each sublayer, before the
    dropout + residual that follows it
        T5:   encoder.block.i.layer.0.SelfAttention        (tuple output: element 0)
              decoder.block.i.layer.1.EncDecAttention      (tuple output: element 0)
              {en,de}coder.block.i.layer.-1.DenseReluDense (tensor)
        BART: model.{en,de}coder.layers.i.self_attn        (tuple output: element 0)
              model.decoder.layers.i.encoder_attn          (tuple output: element 0)
              model.{en,de}coder.layers.i.fc2              (tensor)
    LoRA sites: the q and v projections of encoder self-attention, decoder self-attention and
    decoder cross-attention (T5 ``.q``/``.v``, BART ``q_proj``/``v_proj``).

Every site has a short ``key`` (``encoder_0_self_attn``, ``decoder_1_cross_attn_v``) that names
its PEFT parameters (``peft.adapter.encoder_0_self_attn.down_weight_vqa``).

Sharing across tasks: each projection of a site holds one weight set per *key*: ``shared`` (all
tasks use it) or a task name. ``multiple`` -> one set per task; ``single`` -> ``shared`` only;
``half_shared`` -> the projection named by ``peft.half_shared`` is ``shared``, the other per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

SHARED = "shared"
T5_TYPES = ("t5", "mt5", "umt5")
BART_TYPES = ("bart", "mbart")


@dataclass(frozen=True)
class Site:
    name: str  # dotted path inside the LM, e.g. "encoder.block.0.layer.0.SelfAttention"
    key: str  # short unique name, e.g. "encoder_0_self_attn" (LoRA: "encoder_0_self_attn_q")
    stack: str  # "encoder" or "decoder"
    layer: int
    kind: str  # "self_attn", "cross_attn", "ffn"


# ----------------------------------------------------------------------------- the backbone

def backbone_family(lm: nn.Module) -> str:
    """``"t5"`` or ``"bart"`` from the HF config's model_type; anything else is an error."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in T5_TYPES:
        return "t5"
    if model_type in BART_TYPES:
        return "bart"
    raise ValueError(f"PEFT sites: backbone {type(lm).__name__} (config.model_type={model_type!r}) is not "
                     f"supported; supported model types: {list(T5_TYPES + BART_TYPES)}")


def lm_dtype_device(lm: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device PEFT modules are created in: those of the LM's input embeddings, but the host for a
    ZeRO-3 partitioned LM (``ds_id``): there, as the vision tower and the projection, they are built whole on the
    host and ``deepspeed.initialize`` partitions them, so their initial values are a whole build's (created on
    the partitions' device, a GPU, they drew from the GPU's generator instead)."""
    try:
        p = lm.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        p = next(lm.parameters())
    return p.dtype, (torch.device("cpu") if hasattr(p, "ds_id") else p.device)


def param_shape(p: torch.Tensor) -> torch.Size:
    """Full shape of a parameter, also when DeepSpeed ZeRO-3 partitioned it (0-size + ds_shape)."""
    return getattr(p, "ds_shape", p.shape)


def param_numel(p: torch.Tensor) -> int:
    """Full element count of a parameter, also under ZeRO-3 partitioning."""
    n = getattr(p, "ds_numel", None)
    return int(n) if n is not None else p.numel()


def _stacks(lm: nn.Module, family: str):
    if family == "t5":
        return [("encoder", "encoder.block", lm.encoder.block), ("decoder", "decoder.block", lm.decoder.block)]
    base, prefix = (lm.model, "model.") if hasattr(lm, "model") else (lm, "")
    return [("encoder", f"{prefix}encoder.layers", base.encoder.layers),
            ("decoder", f"{prefix}decoder.layers", base.decoder.layers)]


def adapter_sites(lm: nn.Module) -> list[Site]:
    """Self-attention, cross-attention (decoder) and FFN outputs of every layer, in forward order."""
    family = backbone_family(lm)
    sites = []
    for stack, path, layers in _stacks(lm, family):
        for i, block in enumerate(layers):
            if family == "t5":
                for j, sub in enumerate(block.layer):
                    for attr, kind in (("SelfAttention", "self_attn"), ("EncDecAttention", "cross_attn"),
                                       ("DenseReluDense", "ffn")):
                        if hasattr(sub, attr):
                            sites.append(Site(f"{path}.{i}.layer.{j}.{attr}", f"{stack}_{i}_{kind}", stack, i, kind))
            else:
                for attr, kind in (("self_attn", "self_attn"), ("encoder_attn", "cross_attn"), ("fc2", "ffn")):
                    if getattr(block, attr, None) is not None:
                        sites.append(Site(f"{path}.{i}.{attr}", f"{stack}_{i}_{kind}", stack, i, kind))
    if not sites:
        raise ValueError(f"PEFT sites: found no adapter sites in {type(lm).__name__}")
    return sites


def lora_sites(lm: nn.Module) -> list[Site]:
    """q and v projections of encoder self-attn, decoder self-attn and decoder cross-attn."""
    family = backbone_family(lm)
    proj = ("q", "v") if family == "t5" else ("q_proj", "v_proj")
    sites = []
    for attn in adapter_sites(lm):
        if attn.kind == "ffn":
            continue
        for p, short in zip(proj, ("q", "v")):
            sites.append(Site(f"{attn.name}.{p}", f"{attn.key}_{short}", attn.stack, attn.layer, attn.kind))
    return sites


def zero3_unused_anchor(module: nn.Module, used: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``0 * sum`` of ``module``'s own trainable parameters a forward does not use, under ZeRO-3.

    Adding it to the output gives other tasks' weight sets an exact zero gradient. DeepSpeed
    ZeRO-3 (0.19) otherwise re-applies the gradient from the last step that used a parameter
    (per-task adapters under sharing=multiple drift from a plain-PyTorch run from the third step
    of alternating tasks; ZeRO-2 has no such problem). Returns None without ZeRO-3 partitioned
    parameters (``ds_id``), without grad mode, or when every parameter was used.
    """
    if not torch.is_grad_enabled():
        return None
    used_ids = {id(p) for p in used}
    unused = [p for p in module.parameters(recurse=False)
              if p.requires_grad and id(p) not in used_ids and hasattr(p, "ds_id")]
    if not unused:
        return None
    # summed in fp32: an fp16 weight set summing past 65,504 gave inf, and inf * 0 a NaN output
    return torch.stack([p.sum(dtype=torch.float32) for p in unused]).sum() * 0.0


# ----------------------------------------------------------------------------- task sharing

def weight_keys(sharing: str, half_shared: str, part: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """Keys of the weight sets of one projection (``part`` = "down" or "up") under a sharing mode."""
    if sharing == "single" or (sharing == "half_shared" and part == half_shared):
        return (SHARED,)
    if sharing in ("multiple", "half_shared"):
        return tuple(tasks)
    raise ValueError(f"peft.sharing={sharing!r} is not one of ['multiple', 'half_shared', 'single']")


def select_key(keys: Iterable[str], task: Optional[str], owner: str) -> str:
    """The weight-set key the current ``task`` uses among ``keys`` (``shared`` wins)."""
    keys = tuple(keys)
    if SHARED in keys:
        return SHARED
    if task is None:
        raise RuntimeError(f"{owner}: no task selected; call peft.set_task(name) with one of {list(keys)} "
                           "(with gradient checkpointing, keep the task set until backward has run)")
    if task not in keys:
        raise KeyError(f"{owner}: unknown task {task!r}; known tasks: {list(keys)}")
    return task


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Task names usable as parameter-name parts: non-empty, unique, no dots, not ``shared``."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("apply_peft: the task list is empty; pass the run's data.tasks")
    for t in tasks:
        if not isinstance(t, str) or not t or "." in t or t == SHARED:
            raise ValueError(f"apply_peft: task name {t!r} is not usable (a non-empty string without dots, "
                             f"not {SHARED!r})")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"apply_peft: task names repeat in {list(tasks)}")
    return tasks
