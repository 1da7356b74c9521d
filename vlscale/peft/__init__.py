"""Parameter-efficient fine-tuning of the encoder-decoder LM: one entry point, one controller.

    peft = apply_peft(lm, cfg.peft, tasks)   # -> PeftController (register it as `model.peft`)
    peft.set_task("vqa")                     # or: with peft.task("vqa"): ...
    out = lm(...)                            # forward hooks on the LM's sublayers apply the method
    prompts = peft.prompts(B, dtype)         # (B, P, d_model) or None, prepended by the VLModel

The controller owns every PEFT module (parameter names start with ``peft.`` in the VLModel) and
never registers anything inside ``lm``, whose state_dict stays that of the bare backbone. The
methods, one file each: ``adapter`` (bottleneck adapters), ``hyperformer``, ``compacter``,
``lora``, ``prompt``; ``none`` inserts nothing (optionally only prompts, peft.extra_prompts).
Where each method goes: ``sites``. What trains: ``trainable`` (the one place deciding it).
The task is sticky: it stays selected until the next ``set_task``, so that gradient checkpointing,
which re-runs forwards during backward, sees the same task.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from vlscale.peft.adapter import AdapterLayers
from vlscale.peft.compacter import CompacterLayers
from vlscale.peft.hyperformer import HyperformerLayers
from vlscale.peft.lora import LoRALayers
from vlscale.peft.prompt import PromptEncoder
from vlscale.peft.sites import (SHARED, Site, adapter_sites, backbone_family, check_tasks, lm_dtype_device,
                                lora_sites)
from vlscale.peft.trainable import configure_trainable, count_parameters

ADAPTER_LIKE = {"adapter": AdapterLayers, "hyperformer": HyperformerLayers, "compacter": CompacterLayers}

__all__ = ["apply_peft", "PeftController", "configure_trainable", "count_parameters", "Site"]


class PeftController(nn.Module):
    """Owns the PEFT modules of one LM, hooks them into it, and routes each forward to a task's set."""

    def __init__(self, lm: nn.Module, cfg, tasks: Sequence[str]):
        super().__init__()
        self.method = cfg.method
        self.sharing = cfg.sharing
        self.tasks = check_tasks(tasks)
        self._task: Optional[str] = None
        self._sites: list[Site] = []
        self._lm_ref = weakref.ref(lm)  # not a submodule: the LM's state_dict stays clean
        self.family = backbone_family(lm)
        dtype, device = lm_dtype_device(lm)
        d_model = lm.config.d_model

        if self.method in ADAPTER_LIKE:
            sites = adapter_sites(lm)
            setattr(self, self.method, ADAPTER_LIKE[self.method](sites, cfg, self.tasks, d_model, device, dtype))
            self._hook_sites(lm, sites, self._adapter_hook, with_kwargs=False)
        elif self.method == "lora":
            sites = lora_sites(lm)
            self.lora = LoRALayers(sites, cfg, self.tasks, lm, device, dtype)
            self._hook_sites(lm, sites, self._lora_hook, with_kwargs=True)
        elif self.method not in ("prompt", "none"):
            raise ValueError(f"peft.method={self.method!r} is not one of "
                             f"{list(ADAPTER_LIKE) + ['lora', 'prompt', 'none']}")
        if self.method == "prompt" or cfg.extra_prompts:
            keys = (SHARED,) if self.method == "prompt" and cfg.sharing == "single" else self.tasks
            self.prompt = PromptEncoder(keys, cfg.n_prompts, d_model, cfg.prompt_hidden_dim, device, dtype)

    # ------------------------------------------------------------------ hooks
    def _hook_sites(self, lm: nn.Module, sites: Sequence[Site], hook, with_kwargs: bool) -> None:
        for site in sites:
            module = lm.get_submodule(site.name)
            module.register_forward_hook(functools.partial(hook, site.key), with_kwargs=with_kwargs)
            self._sites.append(site)

    # The hooks run a container's ``forward`` as a plain call, not through ``__call__``: the containers
    # (AdapterLayers, HyperformerLayers, CompacterLayers, LoRALayers) own no parameters, only the
    # modules they call, which stay hooked. Under ZeRO-3 that spares DeepSpeed's fetch/release hooks
    # on a parameterless module at every site: the default model on 2 CPU ranks makes 191 hooked module
    # fetches a step instead of 236 (counted); its step time moved within this machine's noise
    # (six paired 60-step runs: ratios 0.58-1.06, median 0.94).
    def _adapter_hook(self, site_key: str, module: nn.Module, args, output):
        layers = getattr(self, self.method).forward
        if isinstance(output, tuple):
            return (layers(output[0], site_key, self._task),) + tuple(output[1:])
        if isinstance(output, torch.Tensor):
            return layers(output, site_key, self._task)
        raise TypeError(f"peft {self.method} at {site_key}: the sublayer returned {type(output).__name__}, "
                        "expected a tensor or a tuple whose first element is the hidden states")

    def _lora_hook(self, site_key: str, module: nn.Module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        return output + self.lora.forward(x, site_key, self._task, module.training)

    # ------------------------------------------------------------------ the task
    def set_task(self, name: str) -> None:
        """Select the per-task modules used by the next forwards (until the next call)."""
        if name not in self.tasks:
            raise KeyError(f"peft.set_task: unknown task {name!r}; known tasks: {list(self.tasks)}")
        self._task = name

    @contextlib.contextmanager
    def task(self, name: str):
        """``with peft.task("vqa"):`` selects a task and restores the previous one on exit."""
        previous = self._task
        self.set_task(name)
        try:
            yield self
        finally:
            if previous is None:
                self._task = None
            else:
                self.set_task(previous)

    # ------------------------------------------------------------------ prompts
    def prompts(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """(batch_size, n_prompts, d_model) encoder prompts of the current task, or None without prompts."""
        encoder = getattr(self, "prompt", None)
        if encoder is None:
            return None
        return encoder(batch_size, self._task, dtype)

    def _lm(self, what: str) -> nn.Module:
        lm = self._lm_ref()
        if lm is None:
            raise RuntimeError(f"peft.{what}: the language model this controller was applied to no longer exists")
        return lm

    # ------------------------------------------------------------------ introspection
    @property
    def sites(self) -> list[str]:
        """Dotted names of the hooked LM sublayers."""
        return [s.name for s in self._sites]

    def lora_bias_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in the LM, parameter) of the biases of LoRA-adapted projections (BART; none in T5)."""
        if self.method != "lora":
            return []
        lm = self._lm("lora_bias_parameters")
        out = []
        for site in self._sites:
            bias = getattr(lm.get_submodule(site.name), "bias", None)
            if bias is not None:
                out.append((f"{site.name}.bias", bias))
        return out

    def extra_repr(self) -> str:
        return f"method={self.method}, sharing={self.sharing}, tasks={list(self.tasks)}, sites={len(self._sites)}"


def apply_peft(lm: nn.Module, peft_cfg, tasks: Sequence[str]) -> PeftController:
    """Insert the configured PEFT method into ``lm`` (HF T5 or BART) for ``tasks``; see the module doc."""
    if not hasattr(peft_cfg, "method"):  # a method's name or a dict: an AttributeError inside
        named = f" {peft_cfg!r}" if isinstance(peft_cfg, str) else ""
        raise TypeError(f"apply_peft takes a PeftConfig (vlscale.config.PeftConfig(method='lora'), or a RunConfig's "
                        f".peft), got {type(peft_cfg).__name__}{named}")
    return PeftController(lm, peft_cfg, tasks)
