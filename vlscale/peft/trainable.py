"""What trains: the one place that sets ``requires_grad`` on every parameter of the V&L model.

The model exposes ``lm`` (HF T5/BART), ``vision`` (CLIP visual encoder or None), ``projector``
(the visual projection) and ``peft`` (the PeftController). Every parameter falls in one group:

    group            what                                                 trains when
    peft             every parameter of model.peft                        always
    layer_norm       the weights of model.lm's layer norms (T5LayerNorm, LayerNorm)  train_layer_norms or train_lm
    layer_norm_bias  their biases (BART; T5's norms have none)            train_layer_norms, bias=all or train_lm
    lora_bias        biases of the LoRA-adapted q/v projections (BART)    method=lora and bias=lora_only|all, or train_lm
    bias             every other bias of model.lm's modules (BART)         bias=all or train_lm
    lm               the rest of model.lm (tied embeddings/output layer too)  train_lm
    projection       model.projector                                      train_projection
    vision           model.vision                                         train_vision

``bias`` is a module's own ``bias`` parameter; T5's relative-position table (``relative_attention_bias.weight``)
is an embedding's weight and stays in ``lm`` (the reference's name match, ``"bias" in name``, would train it
under LoRA; its BART scripts, the paper's Table 1, have no such table).

Parameters the run's visual path never runs stay frozen whatever the switches say: image tasks take
the CLIP grid (``encode_grid``), which leaves out an RN's attention pool and a ViT's output
projection; video tasks take the CLIP image embedding, which runs them
(``VisionEncoder.unused_parameter_names``). They would get no gradient, only optimizer state, a place
in adapter/ and a share of ``updated_pct``.

The paper's Table 5 "projection only" is method=none with train_layer_norms=false; "projection +
layer norms" is method=none. Counts use ``ds_numel`` where DeepSpeed ZeRO-3 partitioned a
parameter and work on the meta device. ``updated_pct`` follows the paper: trainable parameters
over all parameters except the vision encoder's (features precomputed), in percent.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterator

from torch import nn

from vlscale.peft.sites import param_numel

log = logging.getLogger(__name__)

GROUPS = ("peft", "layer_norm", "layer_norm_bias", "lora_bias", "bias", "lm", "projection", "vision")
_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


def is_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm, T5LayerNorm and other *LayerNorm / *RMSNorm modules (apex's FusedRMSNorm too)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _named(module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
    if module is None:
        return iter(())
    return ((f"{prefix}.{n}", p) for n, p in module.named_parameters())


def parameter_groups(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each parameter of the model, once, in its group (names as in the model: ``lm.encoder...``)."""
    groups: dict[str, list] = {g: [] for g in GROUPS}
    seen: set[int] = set()

    def put(group: str, name: str, p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            groups[group].append((name, p))

    if not hasattr(model, "lm"):  # a bare LM: apply_peft keeps its modules out of it, so they would go uncounted
        raise TypeError(f"configure_trainable and count_parameters take the V&L model (vlscale.modeling.vl_model."
                        f"build_model: lm, vision, projector, peft), got {type(model).__name__}")
    lm = model.lm
    peft = getattr(model, "peft", None)
    for name, p in _named(peft, "peft"):
        put("peft", name, p)
    if peft is not None:
        for name, p in peft.lora_bias_parameters():
            put("lora_bias", f"lm.{name}", p)
    for mod_name, module in lm.named_modules():
        norm = is_layer_norm(module)
        for n, p in module.named_parameters(recurse=False):
            if norm:
                group = "layer_norm_bias" if n == "bias" else "layer_norm"
            elif n == "bias":
                group = "bias"
            else:
                continue
            put(group, f"lm.{mod_name}.{n}" if mod_name else f"lm.{n}", p)
    for name, p in _named(lm, "lm"):
        put("lm", name, p)
    for name, p in _named(getattr(model, "projector", None), "projector"):
        put("projection", name, p)
    for name, p in _named(getattr(model, "vision", None), "vision"):
        put("vision", name, p)
    if isinstance(model, nn.Module):
        stray = [n for n, p in model.named_parameters() if id(p) not in seen]
        if stray:
            raise ValueError(f"configure_trainable: parameter {stray[0]!r} (and {len(stray) - 1} more) belongs to "
                             "none of model.lm / vision / projector / peft; vlscale/peft/trainable.py must be "
                             "told which group it is in")
    return groups


def _trains(group: str, cfg) -> bool:
    return {
        "peft": True,
        "layer_norm": cfg.train_layer_norms or cfg.train_lm,
        "layer_norm_bias": cfg.train_layer_norms or cfg.bias == "all" or cfg.train_lm,
        "lora_bias": (cfg.method == "lora" and cfg.bias != "none") or cfg.train_lm,
        "bias": cfg.bias == "all" or cfg.train_lm,
        "lm": cfg.train_lm,
        "projection": cfg.train_projection,
        "vision": cfg.train_vision,
    }[group]


def task_of(name: str, tasks) -> "str | None":
    """The task whose own weight set the parameter ``name`` is (a PEFT ``..._<task>`` under sharing
    multiple / half_shared, a task's prompt), else None (shared, backbone, projection)."""
    if not name.startswith("peft."):
        return None  # a task's name may hold "_" (the API's tasks: sites.check_tasks): the longest that ends it
    return max((t for t in tasks if name.endswith("_" + t)), key=len, default=None)


def optimizer_group_layout(names, ndims, tasks, split_peft: bool = False) -> list[tuple]:
    """How the trainable parameters (``names``/``ndims`` of them, module order) form optimizer groups:
    ``[(task, decay, peft, [indices])]``. Matrices (weight decay) then vectors; shared parameters first, then
    each task's own weight sets in groups of their own, so that a step of one task can leave the other
    tasks' groups out of the optimizer, as the reference trainer's AdamW skips parameters without a
    gradient (``vlscale.engine.trainer.TaskSteps``). ``split_peft`` (``train.peft_lr`` is set): the PEFT
    weights (``peft.*``, ``peft`` True) and the rest (False) apart, each kind before the other in its slot;
    otherwise ``peft`` is None and they share groups. The engine (``trainer.optimizer_groups``) and the
    memory model (``ParamInventory.optimizer_groups``) both build their groups from this."""
    order = [None, *tasks]
    slots: dict = {}
    for i, (name, nd) in enumerate(zip(names, ndims)):
        peft = name.startswith("peft.") if split_peft else None
        slots.setdefault((task_of(name, tasks), nd >= 2, peft), []).append(i)
    kinds = (True, False) if split_peft else (None,)
    return [(t, d, k, slots[(t, d, k)]) for t in order for d in (True, False) for k in kinds if (t, d, k) in slots]


def unused_vision_parameters(model) -> set[int]:
    """ids of model.vision's parameters the run's visual path never runs (grid features of image tasks:
    an RN's attention pool, a ViT's output projection); empty for video tasks and without a vision encoder."""
    vision = getattr(model, "vision", None)
    if vision is None or not hasattr(vision, "unused_parameter_names"):
        return set()
    names = set(vision.unused_parameter_names(video=bool(getattr(model, "video", False))))
    return {id(p) for n, p in vision.named_parameters() if n in names}


def _warn_lora_rank(model, peft_cfg) -> None:
    """A LoRA rank above the adapted projections' width adds parameters (and updated %) but no capacity:
    B A of rank r has rank at most min(in, out). Said once per process, in one line."""
    lora = getattr(getattr(model, "peft", None), "lora", None) if peft_cfg.method == "lora" else None
    sites = list(getattr(lora, "sites", {}).values()) if lora is not None else []
    if not sites:
        return
    width = min(min(s.in_features, s.out_features) for s in sites)
    if peft_cfg.lora_rank > width:
        _say_lora_rank(peft_cfg.lora_rank, width)


@functools.lru_cache(maxsize=None)
def _say_lora_rank(rank: int, width: int) -> None:
    """Once a process: a run builds its model twice (on ``meta`` for the start-up estimates, then for real)."""
    log.warning("peft.lora_rank=%d exceeds the width of the LoRA-adapted projections (%d): B A has rank at most "
                "%d, so the extra rank only adds parameters (and updated %%); set peft.lora_rank <= %d",
                rank, width, width, width)


def configure_trainable(model, peft_cfg) -> dict[str, dict]:
    """Set ``requires_grad`` on every parameter; -> {group: {"total": n, "trainable": n, "tensors": k}}."""
    _warn_lora_rank(model, peft_cfg)
    counts = {}
    unused = unused_vision_parameters(model)
    for group, params in parameter_groups(model).items():
        on = _trains(group, peft_cfg)
        total = trainable = 0
        for _, p in params:
            trains = on and id(p) not in unused
            p.requires_grad_(trains)
            total += param_numel(p)
            trainable += param_numel(p) if trains else 0
        counts[group] = {"total": total, "trainable": trainable, "tensors": len(params)}
    return counts


def count_parameters(model) -> dict:
    """trainable / total / total_without_vision counts and updated_pct (percent, the paper's convention:
    a frozen CLIP is not counted; a trained one is, so the figure never exceeds 100)."""
    groups = parameter_groups(model)
    total = trainable = frozen_vision = trainable_vision = 0
    for group, params in groups.items():
        for _, p in params:
            n = param_numel(p)
            total += n
            trainable += n if p.requires_grad else 0
            frozen_vision += n if group == "vision" and not p.requires_grad else 0
            trainable_vision += n if group == "vision" and p.requires_grad else 0
    without = total - frozen_vision
    return {
        "trainable": trainable,
        "trainable_vision": trainable_vision,
        "total": total,
        "total_without_vision": without,
        "updated_pct": 100.0 * trainable / without if without else 0.0,
        "updated_pct_with_vision": 100.0 * trainable / total if total else 0.0,
    }


def with_registry_vision(cfg, model, counts: dict) -> dict:
    """:func:`count_parameters`' ``updated_pct_with_vision`` counting CLIP also where the model holds none
    (model.feature_source=cache: the features come from a cache, so no vision encoder is built): its
    parameters are then those of the registry's tower (model.vision), built on the meta device as
    vlscale.profiling.analytic does. -> the keys to update ``counts`` with."""
    if model.vision is not None:
        return {"total_with_vision": counts["total"], "vision_source": "the model's vision encoder"}
    from vlscale.modeling.vision import build_vision_encoder

    clip = sum(param_numel(p) for p in build_vision_encoder(cfg.model.vision, device="meta").parameters())
    total = counts["total"] + clip
    return {"total_with_vision": total,
            "updated_pct_with_vision": 100.0 * counts["trainable"] / total if total else 0.0,
            "vision_source": f"the registry's {cfg.model.vision}, not built with "
                             f"model.feature_source={cfg.model.feature_source}"}
