"""Memory planner: the fastest ZeRO / offload / checkpointing / micro-batch / precision setting that fits.

For a run config, a per-GPU memory budget and a world size, every combination of

    ZeRO stage 0-3 x offload (none; optimizer to CPU; optimizer + parameters to CPU; NVMe)
    x gradient checkpointing off/on x micro-batch 1, 2, 4, ... x precision (bf16, fp32; fp16 in bf16's place on request:
      ``launchers/profile_memory.py`` asks where the run config has train.precision=fp16)

is estimated with :func:`vlscale.profiling.analytic.estimate_memory` (peak per rank), the ones whose
peak plus a headroom fit the budget are kept and ranked by a throughput model. "Fastest" assumes
(all figures per optimizer step of one rank, then per sample; the constants are options):

* compute: forward = 2 x (language-model + projection parameters) x tokens FLOPs, backward = the
  forward again for input gradients plus the trainable fraction again for weight gradients; the
  frozen CLIP tower (images encoded on the fly) costs a forward only; gradient checkpointing
  repeats the forward (about +33% of forward + backward for a frozen backbone it is +50%);
  fp32 runs at ``fp32_speed`` (0.5) of bf16's rate (TF32 tensor cores vs bf16);
* utilisation grows with the micro-batch: a GPU runs at tokens / (tokens + ``half_util_tokens``) of
  its peak (``peak_tflops``), so tiny micro-batches are penalised;
* communication at ``link_gbps`` (GB/s, per direction), as DeepSpeed schedules it: ZeRO-0/1 all-reduce
  the accumulated trainable gradients once per step, at the accumulation boundary (2x their 16/32-bit
  size); ZeRO-2/3 reduce-scatter each micro-batch's gradients in its backward (1x), ZeRO-2 all-gathers
  the updated trainable parameters after the step (1x), and ZeRO-3 all-gathers every parameter twice
  per micro-batch (forward and backward) - the frozen backbone too;
* offload at ``pcie_gbps``: optimizer offload moves each micro-batch's gradient partition to the CPU
  (fp32), and once per step runs Adam there (``cpu_adam_params_per_s``) and moves the updated
  parameters back; NVMe (``nvme_gbps``) also swaps the optimizer state in and out once per step;
  parameter offload streams the parameter partitions in for every micro-batch's forward and backward.

So a step of ``a`` accumulated micro-batches takes ``a x (per micro-batch) + (per step)``: accumulation
spreads the per-step costs (ZeRO-0/1's all-reduce, the offloaded optimizer's step) over more samples.

The model is coarse; what it gets right is the ordering most people want: no offload and no
recompute when memory allows, larger micro-batches first, ZeRO-3's all-gathers and offload's
PCIe traffic only when they buy the memory needed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from vlscale.config import PRECISION_BYTES, RunConfig
from vlscale.engine.deepspeed_config import (default_ds_file, global_batch_size, load_ds_file, micro_batch_sizes,
                                             resolve_batch)
from vlscale.profiling.analytic import (PREDICTED_NVME_PATH, GiB, MemoryEstimate, ZeroSettings, estimate_memory,
                                        fmt_bytes, parameter_inventory, parse_size, resolve_ds_config)

OFFLOADS = {
    "none": ("none", "none"),
    "opt_cpu": ("cpu", "none"),
    "opt_param_cpu": ("cpu", "cpu"),
    "opt_nvme": ("nvme", "none"),
    "opt_param_nvme": ("nvme", "nvme"),
}


@dataclass
class CostModel:
    """Assumptions of the throughput model (see the module docstring)."""

    peak_tflops: float = 400.0
    fp32_speed: float = 0.5
    half_util_tokens: int = 2048
    link_gbps: float = 100.0
    pcie_gbps: float = 20.0
    nvme_gbps: float = 3.0
    cpu_adam_params_per_s: float = 1.0e9


@dataclass
class PlanOption:
    zero_stage: int
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int
    precision: str
    peak: int
    fits: bool
    samples_per_s: float
    estimate: MemoryEstimate = field(repr=False)

    def label(self) -> str:
        return (f"zero{self.zero_stage} offload={self.offload} ckpt={'on' if self.gradient_checkpointing else 'off'} "
                f"mbs={self.micro_batch_size} {self.precision}")

    global_batch: int
    """The run config's global batch (micro x world x accumulation), kept by the overrides."""
    world_size: int = 1
    headroom: int = 0
    """Bytes kept free within the budget: fits = peak + headroom <= budget."""

    def __post_init__(self):
        share = self.micro_batch_size * self.world_size  # plan() offers divisors only; a direct build is checked
        if share < 1 or self.global_batch < share or self.global_batch % share:
            raise ValueError(f"global batch {self.global_batch} is not micro-batch {self.micro_batch_size} x "
                             f"{self.world_size} ranks x a whole accumulation")

    @property
    def accumulation(self) -> int:
        """Gradient accumulation steps that keep the global batch (exact: checked when built)."""
        return self.global_batch // (self.micro_batch_size * self.world_size)

    def overrides(self) -> list[str]:
        return [f"train.zero_stage={self.zero_stage}", f"train.micro_batch_size={self.micro_batch_size}",
                f"train.gradient_accumulation_steps={self.accumulation}",
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"train.precision={self.precision}"]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "estimate"}
        d["components"] = dict(self.estimate.components)
        d["peak_phase"] = self.estimate.peak_phase
        d["host_bytes"] = self.estimate.host
        d["nvme_bytes"] = self.estimate.nvme
        d["gradient_accumulation_steps"] = self.accumulation
        return d


def _ds_for(base_ds: dict, stage: int, offload: str) -> dict:
    ds = copy.deepcopy(base_ds)
    z = ds.setdefault("zero_optimization", {})
    z["stage"] = stage
    opt_dev, par_dev = OFFLOADS[offload]
    for key, dev in (("offload_optimizer", opt_dev), ("offload_param", par_dev)):
        if dev == "none":
            z.pop(key, None)
        elif not isinstance(z.get(key), dict) or z[key].get("device") != dev:  # the file's block kept on its device
            block = {"device": dev, "pin_memory": True}
            if dev == "nvme":
                block["nvme_path"] = "auto"
            z[key] = block
    return ds


def throughput(cfg: RunConfig, est: MemoryEstimate, world_size: int, offload: str, cost: CostModel) -> float:
    """Predicted samples per second per rank under :class:`CostModel`: a step of ``cfg``'s gradient accumulation
    (``train.gradient_accumulation_steps``, or what ``train.global_batch_size`` derives on ``world_size`` ranks)
    micro-batches, each charged the per-micro-batch costs, plus the per-step ones once (the module docstring)."""
    s = est.settings
    inv_total = est.detail["total_params"]
    trainable = est.detail["trainable_params"]
    vision = est.detail.get("vision_params", 0)
    lm = max(1, inv_total - vision)
    mbs = s["micro_batch_size"]
    tokens = mbs * (s["encoder_length"] + s["decoder_length"])
    fwd = 2.0 * lm * tokens
    bwd = fwd * (1.0 + trainable / lm)
    flops = fwd + bwd + (fwd if s["gradient_checkpointing"] else 0.0)
    if cfg.model.feature_source == "images":
        flops += 2.0 * vision * mbs * est.detail.get("vision_tokens", 50)
    speed = cost.peak_tflops * 1e12 * (cost.fp32_speed if s["precision"] == "fp32" else 1.0)
    util = tokens / (tokens + cost.half_util_tokens)
    t = flops / (speed * util)
    b = PRECISION_BYTES[s["precision"]]
    W, stage = world_size, s["zero_stage"]
    accum = resolve_batch(cfg, world_size).train.gradient_accumulation_steps  # micro-batches per optimizer step
    t_step = 0.0  # what runs once per optimizer step, at the accumulation boundary; t: once per micro-batch
    if W > 1:
        link = cost.link_gbps * 1e9
        grads = trainable * b * (W - 1) / W  # one reduce-scatter (or all-gather) of the trainable gradients
        if stage < 2:  # ZeRO-0/1 all-reduce the accumulated gradients at the boundary
            t_step += 2.0 * grads / link
        else:  # ZeRO-2/3 reduce-scatter each micro-batch's gradients in its backward
            t += grads / link
            if stage == 2:  # and ZeRO-2 all-gathers the updated parameters after the step
                t_step += grads / link
            else:  # ZeRO-3 all-gathers every parameter, the frozen backbone too, in forward and in backward
                t += 2.0 * inv_total * b * (W - 1) / W / link
    opt_dev, par_dev = OFFLOADS[offload]
    if opt_dev != "none":  # each micro-batch's gradient partition to the host (fp32); at the step, Adam there
        bw = (cost.pcie_gbps if opt_dev == "cpu" else min(cost.pcie_gbps, cost.nvme_gbps)) * 1e9
        t += trainable / W * 4 / bw
        t_step += trainable / W * 4 / bw + trainable / W / cost.cpu_adam_params_per_s  # and the parameters back
        if opt_dev == "nvme":  # the optimizer state (fp32 master, Adam's two moments) swapped in and out
            t_step += 2.0 * 12 * trainable / W / (cost.nvme_gbps * 1e9)
    if par_dev != "none":  # the parameter partitions streamed in for forward and for backward
        bw = cost.pcie_gbps if par_dev == "cpu" else min(cost.pcie_gbps, cost.nvme_gbps)
        t += 2.0 * inv_total * b / W / (bw * 1e9)
    return mbs * accum / (t * accum + t_step)


def default_headroom(budget: int) -> int:
    """What the planner keeps free within ``budget`` unless told: 5% of it + 0.5 GiB."""
    return int(0.05 * budget + 0.5 * GiB)


def fit_hint(options: list[PlanOption], budget: int) -> str:
    """What would make a plan in which no setting fits fit: the budget its smallest peak needs."""
    low = min(options, key=lambda o: o.peak)
    need = low.peak + low.headroom
    if low.headroom == default_headroom(budget):  # the headroom grows with the budget
        need = (low.peak + 0.5 * GiB) / 0.95
    need = f"{math.ceil(need / GiB * 100) / 100:.2f}GiB" if need >= GiB else f"{math.ceil(need / 2 ** 20)}MiB"
    return (f"none fits: the smallest peak, {fmt_bytes(low.peak)} ({low.label()}), needs --budget {need} with "
            f"the headroom; else a smaller --headroom or model.backbone")


def plan(cfg: RunConfig, budget, world_size: int = 1, *, ds_file=None, stages: Iterable[int] = (0, 1, 2, 3),
         offloads: Iterable[str] = ("none", "opt_cpu", "opt_param_cpu"), checkpointing: Iterable[bool] = (False, True),
         micro_batches: Optional[Iterable[int]] = None, precisions: Iterable[str] = ("bf16", "fp32"),
         headroom: Optional[float] = None, cost: Optional[CostModel] = None,
         device: str = "cuda") -> list[PlanOption]:
    """Every setting estimated, fitting ones first, fastest first.

    ``budget``: bytes or a size string (``"24GiB"``). ``headroom``: bytes kept free for the CUDA
    context, allocator fragmentation and NCCL buffers (default 5% of the budget + 0.5 GiB).
    """
    from vlscale.config import check_run_config

    check_run_config(cfg, "plan")
    budget = parse_size(budget)
    headroom = default_headroom(budget) if headroom is None else int(headroom)
    cost = cost or CostModel()
    # the run's global batch is kept: a micro-batch x the ranks divides it, accumulation makes up the rest
    global_batch = global_batch_size(cfg, world_size)
    per_rank = global_batch // world_size
    if micro_batches is None:  # the divisors up to 64, and the config's own
        mbs_list = sorted({*micro_batch_sizes(per_rank, 64), cfg.train.micro_batch_size})
    else:
        micro_batches = list(micro_batches)  # an iterator too: the message below lists what was given
        mbs_list = [m for m in micro_batches if m > 0 and per_rank % m == 0]
        if not mbs_list:
            raise ValueError(f"no micro-batch in {micro_batches} divides the global batch {global_batch} "
                             f"over {world_size} ranks (train.micro_batch_size x train.gradient_accumulation_steps "
                             f"x ranks)")
    inv = parameter_inventory(cfg)
    predicted = dict(device_type=device, nvme_path=PREDICTED_NVME_PATH)
    base_ds = resolve_ds_config(cfg, world_size, ds_file, **predicted)  # a bad file: refused here
    bases: dict[bool, dict] = {}

    def base_for(stage: int) -> dict:
        """The file resolved as a run at ``stage`` resolves it: ZeRO-3's bucket and persistence settings differ
        from ZeRO-0/1/2's (zero2.json at stage 3 gets stage3_prefetch_bucket_size and persistence as
        zero3.json does, not DeepSpeed's own defaults)."""
        family = stage == 3
        if (base_ds.get("zero_optimization", {}).get("stage", 0) == 3) == family:
            return base_ds
        if family not in bases:
            raw, _ = load_ds_file(default_ds_file(cfg, ds_file))  # a copy: the caller's dict stays as it is
            if not family:  # stage 2 as this file's family: no parameter offload (options drop it anyway), and
                z = raw.setdefault("zero_optimization", {})  # no optimizer on NVMe, which ZeRO-2 refuses (zero3_nvme
                z.pop("offload_param", None)  # .json planned a traceback); the options' own on cpu replace it
                if (z.get("offload_optimizer") or {}).get("device") == "nvme":
                    z.pop("offload_optimizer")
            c = copy.deepcopy(cfg)
            c.train.zero_stage = 3 if family else 2
            bases[family] = resolve_ds_config(c, world_size, raw, **predicted)
        return bases[family]

    options = []
    for precision in precisions:
        for stage in stages:
            for offload in offloads:
                opt_dev, par_dev = OFFLOADS[offload]
                if (opt_dev != "none" and stage < 2) or ("nvme" in (opt_dev, par_dev) or par_dev != "none") and stage < 3:
                    continue  # (ZeRO-2 "offloads" an NVMe optimizer to host memory: refused by build_deepspeed_config)
                for ckpt in checkpointing:
                    for mbs in mbs_list:
                        c = copy.deepcopy(cfg)
                        c.train.precision, c.train.zero_stage = precision, stage
                        c.train.gradient_checkpointing, c.train.micro_batch_size = ckpt, mbs
                        c.train.gradient_accumulation_steps = per_rank // mbs  # held gradients (estimate_memory)
                        ds = _ds_for(base_for(stage), stage, offload)
                        est = estimate_memory(c, world_size, ds, device=device, inventory=inv)
                        est.detail["vision_params"] = inv.vision_params
                        peak = est.components["peak"]
                        options.append(PlanOption(stage, offload, ckpt, mbs, precision, peak,
                                                  peak + headroom <= budget,
                                                  throughput(c, est, world_size, offload, cost), est,
                                                  global_batch, world_size, headroom))
    # fitting first, fastest first (ties: the smaller peak); then the rest by peak
    options.sort(key=lambda o: (not o.fits, -float(f"{o.samples_per_s:.4g}") if o.fits else 0, o.peak))
    return options


def write_ds_config(option: PlanOption, path, *, ds_file=None, cfg: Optional[RunConfig] = None) -> dict:
    """Write the option's DeepSpeed JSON: the file :func:`plan` estimated it from (``default_ds_file``: ``ds_file``,
    else ``cfg``'s ``train.deepspeed``, else ``ds_configs/zero3.json``; pass what ``plan`` was given) with the
    chosen ZeRO stage and offload; batch sizes and precision stay as the file has them (the shipped files: ``"auto"``,
    which the run config fills: pass ``option.overrides()``)."""
    base, _ = load_ds_file(default_ds_file(cfg, ds_file))  # a copy; a missing or unreadable file is refused
    ds = _ds_for(base, option.zero_stage, option.offload)
    z = ds["zero_optimization"]
    if option.zero_stage < 3:
        for key in list(z):
            if key.startswith("stage3_") or key == "sub_group_size":
                z.pop(key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2) + "\n")
    return ds


def format_table(options: list[PlanOption], budget: int, limit: int = 20) -> str:
    lines = []
    if options:  # every option keeps the run's global batch: micro-batch x accumulation x ranks
        o = options[0]
        lines.append(f"global batch {o.global_batch} = micro-batch (mbs) x accumulation (accum) x {o.world_size} "
                     f"rank{'s' if o.world_size != 1 else ''}")
    lines.append(f"{'#':>3} {'setting':52s} {'accum':>5} {'peak/rank':>12} {'host/rank':>11} {'fits':>5} "
                 f"{'samples/s':>10}")
    for i, o in enumerate(options[:limit], 1):
        lines.append(f"{i:>3} {o.label():52s} {o.accumulation:>5} {fmt_bytes(o.peak):>12} "
                     f"{fmt_bytes(o.estimate.host):>11} {'yes' if o.fits else 'no':>5} {o.samples_per_s:>10.1f}")
    n_fit = sum(o.fits for o in options)
    kept = f"{fmt_bytes(options[0].headroom)} headroom" if options else "headroom"
    lines.append(f"{n_fit} of {len(options)} settings fit {fmt_bytes(budget)} per GPU (the budget; {kept} kept "
                 f"free within it, --headroom)")
    if options and not n_fit:
        lines.append(fit_hint(options, budget))
    return "\n".join(lines)


__all__ = ["CostModel", "PlanOption", "plan", "fit_hint", "default_headroom", "throughput", "write_ds_config",
           "format_table", "OFFLOADS", "ZeroSettings"]
