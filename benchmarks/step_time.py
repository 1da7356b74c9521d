"""Speed of one adapter training step on CPU, against full fine-tuning, the frozen-backbone floor,
AdapterHub ``adapters`` and HF ``peft``, measured as ratios inside one run.

Same T5 (t5-small width by default: d_model 512, d_ff 2048, 8 heads, 6+6 layers, random weights
from ``lm_config("t5-small")``, dropout 0.1 as in its config, train mode), same fixed synthetic
batch, torch AdamW on the trainable parameters (``--optimizer fused`` by default, the fastest on
CPU, so full fine-tuning is not slowed by a slow optimizer), one thread count, variants alternated
round by round (rotating the order), ratios the median of the per-round ratios (DESIGN.md
"Measuring on a CPU machine") with a 95 % bootstrap interval over the rounds (``<ratio>_ci95``;
``--json`` also lists every round's step time). A step is ``zero_grad -> forward -> backward -> optimizer.step``;
its phases are timed too. Two clocks: wall time and the process's CPU time. With one thread (the
default) ratios use CPU time, which does not count the time other processes on a shared machine
hold the cores (their cache and memory-bandwidth pressure still shows); the wall ratios are printed
beside them.

The whole V&L model (``VLModel``: cached RN101 grid features 7x7 -> 6x6 = 36 visual tokens through
the trainable projection, 40 text tokens, 10 target tokens):

    vl_full      peft.method=none, peft.train_lm=true (the LM, its layer norms, the projection)
    vl_floor     peft.method=none: only layer norms + projection train (the frozen-backbone floor)
    vl_adapter   peft.method=adapter, single, fused (our default): adapters + layer norms + projection

    adapter_over_full  = vl_adapter / vl_full      (target <= 0.55)
    adapter_over_floor = vl_adapter / vl_floor     (target <= 1.05)

The LM alone against the peers (same inputs as ``inputs_embeds``: 36 + 40 tokens; only the PEFT
parameters train on both sides; trainable-parameter counts asserted equal; before timing, the
peer gets our weights copied in and must compute the same logits in eval mode, which checks
placement, activation and scale):

    lm_adapter     T5 + our bottleneck adapters (hooks; fused kernel) after self-attn, cross-attn, FFN
    lm_adapterhub  T5 + AdapterHub BnConfig(mh_adapter, cross_adapter, output_adapter) ("double seq_bn"
                   plus cross-attention), same reduction factor, activation gelu, no extra layer norms
    lm_lora        T5 + our LoRA on q, v of encoder self-, decoder self- and cross-attention
    lm_peft_lora   T5 + HF peft LoraConfig(target_modules=[q, v]), same rank, alpha, dropout

    ours_over_adapterhub = lm_adapter / lm_adapterhub     (target <= ~1.0)
    ours_lora_over_peft  = lm_lora / lm_peft_lora         (target <= ~1.0)

AdapterHub 1.3 pins transformers 4.57.x: ``benchmarks/peer_env.sh`` builds that environment and
runs this script there (``--peers required``). Elsewhere ``--peers auto`` skips missing peers and
says why (their ratios are then null).

    python benchmarks/step_time.py [--json] [--d-model 512 --d-ff 2048 --heads 8 --layers 6]
        [--batch 16 --text-len 40 --target-len 10] [--repeats 5] [--threads 1] [--clock cpu|wall]
        [--optimizer fused|foreach|loop] [--flops] [--profile N] [--peers auto|required|off]
        [--variants vl_full,vl_adapter,...,vl_adapter_unfused,lm_adapter_unfused]

``--flops`` also counts each variant's matmul FLOPs for one step (torch.utils.flop_counter),
which bounds what a frozen backbone can save: it still back-propagates input gradients through
every layer (the projection below the encoder trains), and skips only the weight gradients and
the optimizer work of the frozen weights. ``--profile N`` lists each variant's top N ops in one
step (torch.profiler). The ``*_unfused`` variants (not run by default) time our adapters with
``peft.fused=false`` (ratios ``fused_over_unfused_*``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

try:
    import vlscale  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlscale.config import load_config  # noqa: E402
from vlscale.modeling.backbones import build_lm  # noqa: E402
from vlscale.modeling.vl_model import VLModel  # noqa: E402
from vlscale.modeling.vision import vision_dims  # noqa: E402
from vlscale.peft import apply_peft, configure_trainable  # noqa: E402

VL_VARIANTS = ("vl_full", "vl_floor", "vl_adapter", "vl_adapter_unfused")
PEER_VARIANTS = ("lm_adapter", "lm_adapterhub", "lm_lora", "lm_peft_lora", "lm_adapter_unfused")
DEFAULT_VARIANTS = ("vl_full", "vl_floor", "vl_adapter", "lm_adapter", "lm_adapterhub", "lm_lora", "lm_peft_lora")
RATIOS = {  # key: (numerator, denominator, target or None)
    "adapter_over_full": ("vl_adapter", "vl_full", 0.55),
    "adapter_over_floor": ("vl_adapter", "vl_floor", 1.05),
    "ours_over_adapterhub": ("lm_adapter", "lm_adapterhub", 1.0),
    "ours_lora_over_peft": ("lm_lora", "lm_peft_lora", 1.0),
    # diagnostics (variants not run by default): our fused adapter against peft.fused=false
    "fused_over_unfused_vl": ("vl_adapter", "vl_adapter_unfused", None),
    "fused_over_unfused_lm": ("lm_adapter", "lm_adapter_unfused", None),
}
TASK = "vqa"
VISION = "RN101"  # 7x7 grid of 2048-d features, pooled to 6x6 = 36 tokens
VISUAL_TOKENS = 36
CLOCKS = ("wall", "cpu")
PHASES = ("step", "forward", "backward", "optimizer")
PARITY_TOL = 1e-4  # eval-mode logits of ours vs a peer holding the same weights (fp32)


class BenchmarkError(RuntimeError):
    """The benchmark's set-up is wrong (a peer missing, unequal trainable sets, different math)."""


# ----------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One way of training the same model on the same batch; ``loss_fn`` runs the forward."""

    name: str
    module: nn.Module
    loss_fn: Callable[[], torch.Tensor]
    lr: float
    optimizer_kind: str = "fused"
    optimizer: Optional[torch.optim.Optimizer] = None
    times: dict = field(default_factory=lambda: {c: {ph: [] for ph in PHASES} for c in CLOCKS})

    def __post_init__(self):
        params = self.trainable()
        if not params:
            raise BenchmarkError(f"variant {self.name}: nothing trains")
        kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[self.optimizer_kind]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01, eps=1e-6, **kw)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def step(self, record: bool) -> float:
        """One training step; with ``record``, its phases' times on both clocks are kept."""
        marks = [_now()]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        marks.append(_now())
        loss.backward()
        marks.append(_now())
        self.optimizer.step()
        marks.append(_now())
        if record:
            for c, clock in enumerate(CLOCKS):
                start, fwd, bwd, end = (m[c] for m in marks)
                for phase, value in zip(PHASES, (end - start, fwd - start, bwd - fwd, end - bwd)):
                    self.times[clock][phase].append(value)
        return loss.item()


def _now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, user + system)."""
    return time.perf_counter(), time.process_time()


class LMWithPeft(nn.Module):
    """The bare LM plus our PEFT controller (what ``configure_trainable`` expects: ``lm``, ``peft``)."""

    def __init__(self, lm: nn.Module, peft_cfg):
        super().__init__()
        self.lm = lm
        self.peft = apply_peft(lm, peft_cfg, [TASK])
        self.peft.set_task(TASK)
        configure_trainable(self, peft_cfg)


def arch_overrides(args) -> dict:
    return dict(d_model=args.d_model, d_ff=args.d_ff, num_heads=args.heads, num_layers=args.layers,
                num_decoder_layers=args.layers, d_kv=args.d_kv)


def run_config(args, method: str, **peft):
    """The run config of a VL variant (t5-small registry name; width set by the built LM)."""
    overrides = ["model.backbone=t5-small", "model.feature_source=cache", f"model.vision={VISION}",
                 "model.pool_size=6", f"data.tasks=[{TASK}]", f"peft.method={method}", "peft.sharing=single",
                 f"peft.reduction_factor={args.reduction_factor}", f"peft.lora_rank={args.lora_rank}",
                 f"peft.lora_alpha={args.lora_alpha}", f"peft.lora_dropout={args.lora_dropout}",
                 f"peft.activation={args.activation}"]
    overrides += [f"peft.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in peft.items()]
    return load_config("tiny", overrides)


def make_batches(args, lm, seed: int = 1) -> tuple[dict, dict]:
    """(the VLModel batch, the LM-only batch): same shapes, fixed values."""
    g = torch.Generator().manual_seed(seed)
    dims = vision_dims(VISION)
    b, vocab = args.batch, lm.config.vocab_size
    ids = torch.randint(3, vocab, (b, args.text_len), generator=g)
    labels = torch.randint(3, vocab, (b, args.target_len), generator=g)
    vl = {"task": TASK, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
          "vis_feats": torch.randn(b, 1, dims["grid_tokens"], dims["grid_dim"], generator=g)}
    n_tokens = VISUAL_TOKENS + args.text_len
    lm_batch = {"inputs_embeds": torch.randn(b, n_tokens, lm.config.d_model, generator=g),
                "attention_mask": torch.ones(b, n_tokens, dtype=torch.long), "labels": labels}
    return vl, lm_batch


def build_base(args) -> tuple[nn.Module, dict, dict]:
    """(the frozen T5 every variant copies, the VLModel batch, the LM-only batch), seeded by ``--seed``."""
    torch.manual_seed(args.seed)
    base_lm = build_lm("t5-small", config_overrides=arch_overrides(args)).train()
    for p in base_lm.parameters():
        p.requires_grad_(False)
    return (base_lm, *make_batches(args, base_lm))


def vl_variant(name: str, args, base_lm, projector_state, batch) -> Variant:
    cfg = {"vl_full": lambda: run_config(args, "none", train_lm=True),
           "vl_floor": lambda: run_config(args, "none"),
           "vl_adapter": lambda: run_config(args, "adapter", fused=True),
           "vl_adapter_unfused": lambda: run_config(args, "adapter", fused=False)}[name]()
    model = VLModel(cfg, copy.deepcopy(base_lm), None)
    if projector_state is not None:
        model.projector.load_state_dict(projector_state)
    configure_trainable(model, cfg.peft)
    model.train()
    return Variant(name, model, lambda: model(batch).loss, cfg.lr, args.optimizer)


def lm_forward(lm, batch):
    return lambda: lm(**batch, use_cache=False).loss


def perturb_(params, seed: int, std: float = 0.02) -> None:
    """Random non-zero values (up-projections and LoRA B start at zero) so the parity check means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ours_adapter_variant(args, base_lm, batch, fused: bool = True) -> Variant:
    cfg = run_config(args, "adapter", fused=fused, train_layer_norms=False, train_projection=False)
    wrapper = LMWithPeft(copy.deepcopy(base_lm), cfg.peft).train()
    perturb_([p for _, p in sorted(wrapper.peft.named_parameters())], seed=2)
    name = "lm_adapter" if fused else "lm_adapter_unfused"
    return Variant(name, wrapper, lm_forward(wrapper.lm, batch), cfg.lr, args.optimizer)


def ours_lora_variant(args, base_lm, batch) -> Variant:
    cfg = run_config(args, "lora", train_layer_norms=False, train_projection=False)
    wrapper = LMWithPeft(copy.deepcopy(base_lm), cfg.peft).train()
    perturb_([p for _, p in sorted(wrapper.peft.named_parameters())], seed=3)
    return Variant("lm_lora", wrapper, lm_forward(wrapper.lm, batch), cfg.lr, args.optimizer)


def adapterhub_variant(args, base_lm, batch, ours: Variant) -> Variant:
    import adapters
    from adapters import BnConfig

    lm = copy.deepcopy(base_lm)
    adapters.init(lm)
    config = BnConfig(mh_adapter=True, cross_adapter=True, output_adapter=True,
                      reduction_factor=args.reduction_factor, non_linearity=args.activation_peer,
                      original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                      ln_before=False, ln_after=False, scaling=1.0, dropout=0.0, init_weights="bert")
    lm.add_adapter("vl", config=config)
    lm.train_adapter("vl")
    # Our weights into theirs: site "<stack>.block.i.layer.j.<Sublayer>" <-> "<stack>.block.i.layer.j.adapters.vl".
    peft = ours.module.peft
    with torch.no_grad():
        for site_name, key in zip(peft.sites, peft.adapter.sites.keys()):
            theirs = lm.get_submodule(site_name.rsplit(".", 1)[0] + ".adapters.vl")
            w_down, b_down, w_up, b_up = peft.adapter.sites[key].weights(TASK)
            down, up = theirs.adapter_down[0], theirs.adapter_up
            for dst, src in ((down.weight, w_down), (down.bias, b_down), (up.weight, w_up), (up.bias, b_up)):
                if dst.shape != src.shape:
                    raise BenchmarkError(f"AdapterHub adapter at {site_name}: {tuple(dst.shape)} vs ours "
                                         f"{tuple(src.shape)}")
                dst.copy_(src)
    lm.train()
    return Variant("lm_adapterhub", lm, lm_forward(lm, batch), ours.lr, args.optimizer)


def peft_lora_variant(args, base_lm, batch, ours: Variant) -> Variant:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=["q", "v"], bias="none")
    model = get_peft_model(copy.deepcopy(base_lm), config)
    inner = model.base_model.model
    lora = ours.module.peft.lora
    with torch.no_grad():
        for key, layer in lora.sites.items():
            name = lora.site_names[key]
            target = inner.get_submodule(name)
            a, b = layer.factors(TASK)
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
            if abs(target.scaling["default"] - layer.scale) > 1e-12:
                raise BenchmarkError(f"peft LoRA scaling {target.scaling['default']} != ours {layer.scale} at {name}")
    model.train()
    return Variant("lm_peft_lora", model, lm_forward(model, batch), ours.lr, args.optimizer)


def check_parity(ours: Variant, peer: Variant, bare_lm: nn.Module, batch: dict, n: int = 2) -> float:
    """Max |logits difference| of ours and the peer (same weights) in eval mode on the first ``n``
    examples; raises beyond PARITY_TOL, or when the PEFT modules do not change the bare LM's logits
    (the check would then prove nothing)."""
    small = {k: v[:n] for k, v in batch.items()}
    outs = []
    for module in (ours.module, peer.module, bare_lm):
        was_training = module.training
        module.eval()
        with torch.no_grad():
            lm = module.lm if isinstance(module, LMWithPeft) else module
            outs.append(lm(**small, use_cache=False).logits)
        module.train(was_training)
    err = (outs[0] - outs[1]).abs().max().item()
    scale = max(1.0, outs[1].abs().max().item())
    effect = (outs[1] - outs[2]).abs().max().item()
    if not err <= PARITY_TOL * scale:
        raise BenchmarkError(f"{ours.name} and {peer.name} compute different logits with the same weights "
                             f"(max |diff| {err:.3g}, max |logit| {scale:.3g}): the setups do not match")
    if not effect > 100 * PARITY_TOL * scale:
        raise BenchmarkError(f"{peer.name}: its PEFT modules barely change the logits (max |diff| to the bare "
                             f"LM {effect:.3g}); the parity check cannot tell whether they run")
    return err


def check_counts(ours: Variant, peer: Variant) -> None:
    if ours.n_trainable() != peer.n_trainable():
        raise BenchmarkError(f"trainable parameters differ: {ours.name} {ours.n_trainable():,} vs "
                             f"{peer.name} {peer.n_trainable():,}; the comparison would not be like with like")


def peer_status(kind: str) -> Optional[str]:
    """None when the peer library imports and fits this transformers; else the reason it does not."""
    try:
        import transformers

        if kind == "adapterhub":
            import adapters  # noqa: F401
        else:
            import peft  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means the peer is not there; the reason is reported
        return f"{type(e).__name__}: {e}"
    if kind == "adapterhub" and not transformers.__version__.startswith("4.57."):
        return f"adapters 1.3 needs transformers 4.57.x, found {transformers.__version__}"
    return None


# ----------------------------------------------------------------------------------- measuring
def count_flops(variant: Variant) -> int:
    """Matmul/conv FLOPs of one full step (forward + backward) of ``variant``."""
    from torch.utils.flop_counter import FlopCounterMode

    variant.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        variant.loss_fn().backward()
    variant.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile_ops(variant: Variant, top: int) -> list[dict]:
    """The ``top`` ops by self CPU time in one step of ``variant`` (forward, backward, optimizer)."""
    from torch.profiler import ProfilerActivity, profile

    variant.step(record=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(record=False)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]


def balanced_repeats(repeats: int, n_variants: int) -> int:
    """``repeats`` rounded up to a multiple of the number of variants, so that with the order rotated
    each round every variant leads equally often and an effect of the position in a round cannot bias
    a ratio (none is established: in 100 rounds of lm_adapter / lm_adapterhub the median ratio was
    1.021 in the rounds ours led and 0.987 in the others, in 100 of lm_lora / lm_peft_lora 0.991 and
    1.006, the other way; both within the noise of 50 rounds)."""
    return -(-repeats // n_variants) * n_variants


def measure(variants: list[Variant], repeats: int, warmup: int) -> None:
    """Alternate the variants round by round (order rotated each round); the first rounds warm up.
    ``repeats`` should be a multiple of the number of variants (:func:`balanced_repeats`)."""
    for r in range(warmup + repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            gc.collect()
            v.step(record=r >= warmup)


def round_ratios(num: Variant, den: Variant, clock: str) -> list[float]:
    """num/den step time within each round (drift between rounds cancels)."""
    return [a / b for a, b in zip(num.times[clock]["step"], den.times[clock]["step"])]


def paired_ratio(num: Variant, den: Variant, clock: str) -> float:
    """Median over rounds of :func:`round_ratios`."""
    return statistics.median(round_ratios(num, den, clock))


def paired_ratio_ci(num: Variant, den: Variant, clock: str, level: float = 0.95, draws: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of :func:`paired_ratio` (rounds resampled with replacement, percentile
    interval): how far the median ratio moves with which rounds happened to be drawn. A ratio whose
    interval holds 1.0 does not tell the two variants apart on this machine."""
    ratios = round_ratios(num, den, clock)
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    lo = medians[int((1 - level) / 2 * draws)]
    hi = medians[min(draws - 1, int((1 + level) / 2 * draws))]
    return lo, hi


def summarise(variants: dict, args, info: dict) -> dict:
    out = dict(info)
    out["clock"] = args.clock
    out["variants"] = {}
    clock, other = args.clock, [c for c in CLOCKS if c != args.clock][0]
    for name, v in variants.items():
        t = v.times[clock]
        out["variants"][name] = {
            "step_ms": 1e3 * statistics.median(t["step"]),
            "step_ms_min": 1e3 * min(t["step"]), "step_ms_max": 1e3 * max(t["step"]),
            "step_ms_rounds": [round(1e3 * x, 2) for x in t["step"]],
            "forward_ms": 1e3 * statistics.median(t["forward"]),
            "backward_ms": 1e3 * statistics.median(t["backward"]),
            "optimizer_ms": 1e3 * statistics.median(t["optimizer"]),
            f"step_ms_{other}": 1e3 * statistics.median(v.times[other]["step"]),
            "trainable_params": v.n_trainable(),
            "total_params": sum(p.numel() for p in v.module.parameters()),
        }
        if name in info.get("flops", {}):
            out["variants"][name]["gflops"] = info["flops"][name] / 1e9
    out.pop("flops", None)
    for key, (num, den, target) in RATIOS.items():
        if num in variants and den in variants:
            out[key] = paired_ratio(variants[num], variants[den], clock)
            out[f"{key}_ci95"] = paired_ratio_ci(variants[num], variants[den], clock)
            out[f"{key}_of_medians"] = (statistics.median(variants[num].times[clock]["step"])
                                        / statistics.median(variants[den].times[clock]["step"]))
            out[f"{key}_{other}"] = paired_ratio(variants[num], variants[den], other)
            if target is not None:
                out[f"{key}_target"] = target
                out[f"{key}_met"] = out[key] <= target
        elif target is not None:
            out[key] = None
    if "vl_adapter" in variants and "vl_full" in variants and "gflops" in out["variants"].get("vl_full", {}):
        out["flop_ratio_adapter_over_full"] = (out["variants"]["vl_adapter"]["gflops"]
                                               / out["variants"]["vl_full"]["gflops"])
    return out


def print_report(res: dict) -> None:
    clock, other = res["clock"], [c for c in CLOCKS if c != res["clock"]][0]
    print(f"step time ({clock} clock), CPU, {res['threads']} threads, {res['optimizer']}, torch {res['torch']}, "
          f"transformers {res['transformers']}, {res['repeats']} alternating rounds after {res['warmup']} warm-up")
    print(f"model {res['model']}\nbatch {res['batch']}")
    print(f"{'variant':<15}{'step ms':>9}{'min':>9}{'max':>9}{'fwd':>9}{'bwd':>9}{'optim':>8}{other + ' ms':>10}"
          f"{'trainable':>13}{'GFLOP':>8}")
    for name, v in res["variants"].items():
        gf = f"{v['gflops']:8.1f}" if "gflops" in v else f"{'':>8}"
        print(f"{name:<15}{v['step_ms']:9.0f}{v['step_ms_min']:9.0f}{v['step_ms_max']:9.0f}{v['forward_ms']:9.0f}"
              f"{v['backward_ms']:9.0f}{v['optimizer_ms']:8.0f}{v['step_ms_' + other]:10.0f}"
              f"{v['trainable_params']:13,}{gf}")
    for key, (num, den, target) in RATIOS.items():
        if key not in res:
            continue
        if res[key] is None:
            print(f"{key:<22} n/a ({res['skipped'].get(key, 'not run')})")
            continue
        verdict = "" if target is None else f"; target <= {target}: {'met' if res[key + '_met'] else 'MISSED'}"
        lo, hi = res[key + "_ci95"]
        print(f"{key:<22} {res[key]:.3f}  [{lo:.3f}, {hi:.3f}] ({num} / {den}; ratio of medians {res[key + '_of_medians']:.3f}, "
              f"{other} clock {res[key + '_' + other]:.3f}{verdict})")
    if "flop_ratio_adapter_over_full" in res:
        print(f"matmul FLOPs adapter/full: {res['flop_ratio_adapter_over_full']:.3f}")
    for name, err in res.get("parity_max_abs_diff", {}).items():
        print(f"parity {name}: max |logit diff| {err:.2e} with the same weights (eval mode)")
    for name, ops in res.get("profile", {}).items():
        print(f"profile {name} (one step, self CPU ms by op): "
              + ", ".join(f"{op['op']} {op['self_ms']:.0f} (x{op['calls']})" for op in ops))


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    p.add_argument("--text-len", type=int, default=40, help="text tokens (36 visual tokens come in front)")
    p.add_argument("--target-len", type=int, default=10)
    p.add_argument("--reduction-factor", type=int, default=8)
    p.add_argument("--activation", choices=("gelu", "gelu_tanh"), default="gelu")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 (default) is the steadiest on a shared machine")
    p.add_argument("--optimizer", choices=("fused", "foreach", "loop"), default="fused",
                   help="torch AdamW implementation for every variant (fused: the fastest on CPU, so full "
                        "fine-tuning is not slowed by a slow optimizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", choices=("auto", "required", "off"), default="auto")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from " + ", ".join(VL_VARIANTS + PEER_VARIANTS)
                        + " (default: all but the *_unfused diagnostics)")
    p.add_argument("--flops", action="store_true", help="also count matmul FLOPs of one step per variant")
    p.add_argument("--clock", choices=CLOCKS, default=None,
                   help="what the ratios use: cpu (process CPU time; default with --threads 1, immune to "
                        "being descheduled on a shared machine) or wall (default with more threads)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one step of each variant (torch.profiler) and list its top N ops")
    args = p.parse_args(argv)
    args.activation_peer = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[args.activation]
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VL_VARIANTS + PEER_VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VL_VARIANTS + PEER_VARIANTS)}")
    args.variants = wanted
    if args.clock is None:
        args.clock = "cpu" if args.threads == 1 else "wall"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 4.57 deprecation notes

    torch.set_num_threads(args.threads)
    base_lm, vl_batch, lm_batch = build_base(args)
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "repeats": args.repeats, "warmup": args.warmup, "optimizer": f"torch AdamW ({args.optimizer})",
            "skipped": {}, "parity_max_abs_diff": {},
            "model": dict(arch_overrides(args), vocab=base_lm.config.vocab_size,
                          reduction_factor=args.reduction_factor, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, activation=args.activation),
            "batch": dict(micro_batch=args.batch, visual_tokens=VISUAL_TOKENS, text_tokens=args.text_len,
                          target_tokens=args.target_len)}

    variants: dict[str, Variant] = {}
    projector_state = None  # the first VL variant's projector init, copied into the others
    for name in VL_VARIANTS:
        if name in args.variants:
            torch.manual_seed(args.seed + 1)
            variants[name] = vl_variant(name, args, base_lm, projector_state, vl_batch)
            projector_state = projector_state or copy.deepcopy(variants[name].module.projector.state_dict())

    pairs = (("lm_adapter", "lm_adapterhub", "adapterhub", ours_adapter_variant, adapterhub_variant,
              "ours_over_adapterhub"),
             ("lm_lora", "lm_peft_lora", "peft", ours_lora_variant, peft_lora_variant, "ours_lora_over_peft"))
    for ours_name, peer_name, kind, make_ours, make_peer, ratio_key in pairs:
        ours = None
        if ours_name in args.variants:
            ours = variants[ours_name] = make_ours(args, base_lm, lm_batch)
        if peer_name not in args.variants or args.peers == "off":
            info["skipped"][ratio_key] = "peer not requested"
            continue
        problem = peer_status(kind)
        if problem is not None:
            if args.peers == "required":
                raise BenchmarkError(f"peer {kind} is not usable here ({problem}); run benchmarks/peer_env.sh")
            info["skipped"][ratio_key] = f"{kind} unavailable: {problem}"
            continue
        if ours is None:
            ours = make_ours(args, base_lm, lm_batch)  # needed for its weights and counts
        peer = variants[peer_name] = make_peer(args, base_lm, lm_batch, ours)
        check_counts(ours, peer)
        info["parity_max_abs_diff"][f"{ours_name} vs {peer_name}"] = check_parity(ours, peer, base_lm, lm_batch)
    if "lm_adapter_unfused" in args.variants:
        variants["lm_adapter_unfused"] = ours_adapter_variant(args, base_lm, lm_batch, fused=False)

    if args.flops:
        info["flops"] = {name: count_flops(v) for name, v in variants.items()}
    if args.profile:
        info["profile"] = {name: profile_ops(v, args.profile) for name, v in variants.items()}
    repeats = balanced_repeats(args.repeats, len(variants))
    if repeats != args.repeats:
        print(f"step_time: {repeats} rounds instead of --repeats {args.repeats}, so that each of the "
              f"{len(variants)} variants leads equally often", file=sys.stderr)
        info["repeats"] = repeats
    measure(list(variants.values()), repeats, args.warmup)
    res = summarise(variants, args, info)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_report(res)
    return res


if __name__ == "__main__":
    main()
