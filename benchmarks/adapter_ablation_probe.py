"""What makes the miniature's single adapter fall short of full fine-tuning, and Hyperformer not? One row of the
miniature Table 1 trained with one thing changed.

The row trains as ``launchers/replicate.py`` trains it (``vlscale.replicate.row_overrides``: same preset, steps,
seed and feature cache), in this process, with the model changed right after vlscale builds it, and its test
split is scored as the table scores it. Variants:

``table``
    nothing changed (the control: the table's row).
``reference-init``
    the adapters as the reference code starts them. DESIGN.md starts every PEFT method as the identity
    (vlscale's adapters draw the down-projection as nn.Linear does and zero the up-projection and its bias).
    VL-Adapter's BART (``VLBartModel.__init__``, VL-T5/src) calls ``init_weights()`` after building its layers,
    and the transformers it pins (4.2) then draws every ``nn.Linear`` in the model from N(0, init_std = 0.02)
    with a zero bias, the adapters' down- and up-projections included.
``reference-init+projection``
    the same for the visual projection's linears and embedding too (inside the reference's JointEncoder).
``task-blind``
    Hyperformer with every task reading the first task's embedding: the generated adapters then differ per
    layer and sublayer kind, no longer per task.
``fixed-code``
    ``task-blind``, and each layer's code z (the hypernetwork's LayerNorm output) fixed at its initial value: only
    the generators train, so each site's weights are W = G z_l + c over fixed random codes z_l.
``fixed-code-per-layer``
    ``fixed-code`` with a copy of the generators for each layer (all starting as the shared ones): W_l = G_l z_l + c_l,
    each site's weights as freely set as a single adapter's but over-parameterised by the code's width + 1, and no
    longer coupled across layers.
``stack-shared``
    one adapter per stack (encoder, decoder) and sublayer kind (self-attention, cross-attention, FFN), shared by
    all the stack's layers: layer 0's adapters stand in for every layer's, as the shared part c of Hyperformer's
    generated weights W = G z + c does.

``--adapter-lr-scale S`` (any variant with bottleneck adapters) trains each adapter weight W as S * W' with W' = W / S
the parameter: Adam's step on W' is scale-free, so W moves as under S times the learning rate while the layer norms
and the visual projection keep theirs (decoupled weight decay stays relative; Adam's eps is S times smaller in
effect).

The re-drawn weights come from a generator seeded by ``--seed``, so the run's other random draws (dropout, data
order) stay those of the table's run.

    python benchmarks/adapter_ablation_probe.py --variant reference-init --seed 0 --feature-cache DIR --out RUN_DIR
        [--row single_adapter] [--json FILE]

It prints the row's scores and average next to full fine-tuning's and the unchanged row's of the same seed, where
``benchmarks/results/replicate_table1_seeds.json`` / ``replicate_table1_hyperformer_seeds.json`` hold them, and how
far training moved the adapters' weights (``weight_motion``: the RMS per entry of W - W_start of the first task's
down- and up-projection, generated ones for Hyperformer, mean over the sites).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_ROW = {"task-blind": "hyperformer", "fixed-code": "hyperformer", "fixed-code-per-layer": "hyperformer"}
STD = 0.02  # BartConfig.init_std


def peft_modules(model, kind) -> list:
    """The model's PEFT modules of one class."""
    return [m for m in model.peft.modules() if isinstance(m, kind)]


def redraw(model, variant: str, seed: int, std: float = STD) -> int:
    """The reference's BART initialisation of the adapters (and the projection): weights N(0, std), biases 0.
    -> the number of parameters re-drawn."""
    import torch
    from torch import nn

    from vlscale.peft.adapter import BottleneckAdapter

    g = torch.Generator().manual_seed(seed)
    tensors = [t for module in peft_modules(model, BottleneckAdapter) for t in module.named_parameters(recurse=False)]
    if not tensors:
        raise SystemExit(f"--variant {variant}: the model has no bottleneck adapter to re-draw (peft.method?)")
    if variant == "reference-init+projection":
        for module in model.projector.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                tensors += list(module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, p in tensors:
            if name.endswith("bias") or "_bias_" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return sum(p.numel() for _, p in tensors)


def blind_to_tasks(model) -> int:
    """Every task reads the first task's Hyperformer embedding (the others get no gradient). -> parameters of the
    embedding every task now reads."""
    from vlscale.peft.hyperformer import TaskEmbeddings

    tables = peft_modules(model, TaskEmbeddings)
    if not tables:
        raise SystemExit("--variant task-blind: the model has no Hyperformer task embeddings (peft.method?)")
    firsts = [next(table.parameters()) for table in tables]
    for table, first in zip(tables, firsts):
        table.forward = lambda task, first=first: first[0]
    return sum(first.numel() for first in firsts)


def fix_codes(model, per_layer: bool = False) -> int:
    """task-blind, and every layer's code z computed once (no gradient) and kept; ``per_layer``: each layer gets its
    own copy of the generators. -> parameters no longer used."""
    import copy

    import torch
    from torch import nn

    from vlscale.peft.hyperformer import HyperformerLayers

    blind_to_tasks(model)
    unused = 0
    for layers in peft_modules(model, HyperformerLayers):
        task_embedding = layers.task_embeddings(layers.tasks[0])
        unused += task_embedding.numel()
        for net in layers.hypernets.values():
            table = net.layer_embedding.weight
            with torch.no_grad():
                codes = net.norm(net.projector(torch.cat([task_embedding.expand(len(table), -1), table], -1)))
            unused += sum(p.numel() for m in (net.layer_embedding, net.projector, net.norm) for p in m.parameters())
            if per_layer:
                net.layer_generators = nn.ModuleList(copy.deepcopy(net.generators) for _ in range(len(table)))
                unused += sum(p.numel() for p in net.generators.parameters())
                net.forward = (lambda _task_embedding, layer, kind, net=net, codes=codes:
                               net.layer_generators[int(layer)][kind](codes[layer]))
            else:
                net.forward = (lambda _task_embedding, layer, kind, net=net, codes=codes:
                               net.generators[kind](codes[layer]))
    return unused


def share_across_layers(model) -> int:
    """Every layer of a stack uses layer 0's adapter of the same sublayer kind. -> adapter parameters left."""
    from vlscale.peft.adapter import AdapterLayers
    from vlscale.peft.sites import adapter_sites

    owners = peft_modules(model, AdapterLayers)
    if not owners:
        raise SystemExit("--variant stack-shared: the model has no bottleneck adapters (peft.method?)")
    for owner in owners:
        first = {}
        for site in adapter_sites(model.lm):
            kept = first.setdefault((site.stack, site.kind), owner.sites[site.key])
            owner.sites[site.key] = kept
    return sum(p.numel() for owner in owners for p in owner.parameters())


def site_weights(model) -> dict:
    """{site key: (W_d, W_u)} the first task's adapter of every site uses (generated ones for Hyperformer),
    detached copies."""
    import torch

    from vlscale.peft.adapter import AdapterLayers
    from vlscale.peft.hyperformer import HyperformerLayers

    task, out = model.peft.tasks[0], {}
    with torch.no_grad():
        for m in peft_modules(model, (AdapterLayers, HyperformerLayers)):
            for key in m.sites:
                generated = isinstance(m, HyperformerLayers)
                w_d, _, w_u, _ = m.weights(key, task) if generated else m.sites[key].weights(task)
                out[key] = (w_d.detach().clone(), w_u.detach().clone())
    return out


def weight_motion(start: dict, end: dict) -> dict:
    """How far training moved the adapters' weights: the RMS per entry of W - W_start, mean over sites."""
    if not start:
        return {"down_rms_change": float("nan"), "up_rms_change": float("nan"), "down_rms_start": float("nan"),
                "sites": 0}
    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    return {"down_rms_change": sum(rms(end[k][0], w[0]) for k, w in start.items()) / len(start),
            "up_rms_change": sum(rms(end[k][1], w[1]) for k, w in start.items()) / len(start),
            "down_rms_start": sum(rms(w[0], 0 * w[0]) for w in start.values()) / len(start),
            "sites": len(start)}


def scale_adapter_lr(model, scale: float) -> int:
    """Every bottleneck adapter weight W becomes scale * W' (W' = W / scale the parameter). -> parameters scaled."""
    import torch

    from vlscale.peft.adapter import BottleneckAdapter

    adapters = peft_modules(model, BottleneckAdapter)
    if not adapters:
        raise SystemExit("--adapter-lr-scale: the model has no bottleneck adapters (peft.method?)")
    for adapter in adapters:
        with torch.no_grad():
            for p in adapter.parameters(recurse=False):
                p.div_(scale)
        weights = adapter.weights
        adapter.weights = lambda task, weights=weights: tuple(scale * w for w in weights(task))
    return sum(p.numel() for a in adapters for p in a.parameters(recurse=False))


# variant -> change(model, seed) -> parameters changed (each function's docstring says which)
CHANGES = {
    "reference-init": lambda model, seed: redraw(model, "reference-init", seed),
    "reference-init+projection": lambda model, seed: redraw(model, "reference-init+projection", seed),
    "task-blind": lambda model, seed: blind_to_tasks(model),
    "fixed-code": lambda model, seed: fix_codes(model),
    "fixed-code-per-layer": lambda model, seed: fix_codes(model, per_layer=True),
    "stack-shared": lambda model, seed: share_across_layers(model),
}
VARIANTS = ("table", *CHANGES)


def same_seed_averages(row: str, seed: int) -> tuple:
    """(full fine-tuning's, the unchanged row's) average test score of ``seed`` where the results files hold them."""
    results = ROOT / "benchmarks" / "results"
    full = row_avg = None
    seeds = json.loads((results / "replicate_table1_seeds.json").read_text())
    for run in seeds["runs"]:
        if run["seed"] == seed:
            full = run["methods"]["full_ft"]["avg"]
            row_avg = run["methods"].get(row, {}).get("avg")
    if row == "hyperformer":
        hyper = json.loads((results / "replicate_table1_hyperformer_seeds.json").read_text())
        row_avg = next((r["hyperformer"]["avg"] for r in hyper["runs"] if r["seed"] == seed), None)
    return full, row_avg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="train this many steps instead of the table's (a smoke test)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="settings on top of the row's (e.g. train.lr=0.01); not the keys the row decides")
    ap.add_argument("--adapter-lr-scale", type=float, default=1.0, metavar="S",
                    help="the bottleneck adapters' weights move as under S times the learning rate (see above)")
    ap.add_argument("--row", help="the Table 1 row (default: single_adapter; hyperformer for task-blind)")
    ap.add_argument("--feature-cache", required=True, help="the miniature's feature cache (replicate.py OUT/features)")
    ap.add_argument("--out", required=True, type=Path, help="the training's output_dir (must not hold another run)")
    ap.add_argument("--json", type=Path, help="also write the result to this file as JSON")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    row_name = args.row or DEFAULT_ROW.get(args.variant, "single_adapter")

    import vlscale.modeling.vl_model as vl_model
    from vlscale.replicate import average, get_table, headline_scores, row_overrides, select_rows

    (row,) = select_rows(get_table(1), [row_name])
    overrides = row_overrides(row, feature_cache=args.feature_cache, seed=args.seed, steps=args.steps,
                              extra=args.set)
    changed = {}
    build = vl_model.build_model

    def build_and_change(cfg, *a, **kw):
        model = build(cfg, *a, **kw)
        if kw.get("device") != "meta":
            if args.variant in CHANGES:
                changed["params"] = CHANGES[args.variant](model, args.seed)
            if args.adapter_lr_scale != 1.0:
                changed["lr_scaled_params"] = scale_adapter_lr(model, args.adapter_lr_scale)
            changed["model"], changed["start"] = model, site_weights(model)
        return model

    vl_model.build_model = build_and_change
    start = time.time()
    sys.argv = [str(ROOT / "launchers" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
                "--config", "mini/clip_bart", "--no-progress", *overrides, f"output_dir={args.out}",
                "train.test_eval=true"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    if "model" not in changed:
        raise SystemExit("the training built no model this probe could change")
    motion = weight_motion(changed["start"], site_weights(changed["model"]))
    scores = headline_scores(json.loads((args.out / "eval_test" / "eval_metrics.json").read_text()))
    full_avg, row_avg = same_seed_averages(row_name, args.seed) if args.steps is None else (None, None)
    if args.set or args.adapter_lr_scale != 1.0:
        row_avg = None  # the unchanged row is not this one
    avg = average(scores)
    result = {"row": row_name, "variant": args.variant, "set": args.set, "seed": args.seed,
              "steps": args.steps or "the table's",
              "changed_params": changed.get("params", 0), "adapter_lr_scale": args.adapter_lr_scale,
              "updated_pct": json.loads((args.out / "run_summary.json").read_text())["updated_pct"],
              "weight_motion": motion,
              "scores": scores, "avg": avg, "full_ft_avg": full_avg, "table_row_avg": row_avg,
              "over_full_ft_pct": 100 * avg / full_avg if full_avg else None, "wall_s": round(time.time() - start, 1),
              "command": "python benchmarks/adapter_ablation_probe.py " + " ".join(argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{row_name}, {args.variant}, seed {args.seed}: " + ", ".join(f"{t} {s:.2f}" for t, s in scores.items()) +
          f"; avg {avg:.2f}" + (f" = {result['over_full_ft_pct']:.1f}% of full fine-tuning's {full_avg:.2f}"
                                 if full_avg else "") +
          (f" (the table's {row_name}, this seed: {row_avg:.2f})" if row_avg is not None else "") +
          f"; adapter weights moved (RMS per entry, mean over sites): down {motion['down_rms_change']:.4f}, "
          f"up {motion['up_rms_change']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
