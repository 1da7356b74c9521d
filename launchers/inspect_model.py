"""Where each module of a V&L model went, and how many parameters train.

    python launchers/inspect_model.py --config paper/clip_bart_single_adapter [key=value ...] [--json]
    python launchers/inspect_model.py --adapter runs/default/adapter [--json]   (a trained run's model)

Builds the model on the ``meta`` device (no weights, no network, seconds even for t5-11b) with the
vocabulary the trainer gives it, the tokenizer's length, where the tokenizer loads offline (the
synthetic world's ships with the package: tiny/mini backbones, ``model.tokenizer=synthetic``); else
with the registry's vocabulary, and says so. It prints: the PEFT sites (which LM sublayer each
method attaches to), parameter counts by group (trainable or frozen), and ``updated_pct`` =
trainable / total without the vision encoder (the paper's convention when features are
precomputed) beside ``updated_pct_with_vision`` = trainable / total with CLIP (where the features
come from a cache the model holds no CLIP; the registry's ``model.vision`` is then counted).
``--adapter DIR`` inspects the model a run trained: the config and vocabulary its ``adapter_config.json`` records
(an adapter/ copied alone will do), overrides that change the model refused as evaluate.py refuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlscale.config import ConfigError, load_config  # noqa: E402
from vlscale.log import logs_to_console  # noqa: E402


def numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _offline_tokenizer(cfg) -> bool:
    """Whether the run's tokenizer loads without the network: the synthetic world's, which ships with the
    package (model.tokenizer=synthetic, or the default of tiny/mini backbones), or a local folder."""
    from vlscale.modeling.backbones import is_tiny

    tok = cfg.model.tokenizer
    if tok:
        return tok == "synthetic" or Path(tok).is_dir()
    return is_tiny(cfg.model.backbone) or bool(cfg.model.backbone_path and Path(cfg.model.backbone_path).is_dir())


def _vocab_size(cfg) -> tuple[int, str]:
    """(the vocabulary the model is built with, where it comes from). As the trainer: the tokenizer's
    length, where the tokenizer loads offline; else the model's vocabulary (a pretrained model.backbone_path's
    config.json, else the registry's) + extra special tokens."""
    from vlscale.modeling.backbones import lm_config
    from vlscale.modeling.vl_model import checkpoint_vocab_size

    why = "is not loaded offline"
    if _offline_tokenizer(cfg):
        from vlscale.data import build_tokenizer

        try:
            return len(build_tokenizer(cfg)), "the run's tokenizer"
        except OSError as e:  # a local folder without usable tokenizer files
            why = f"did not load: {e}"
    folder = checkpoint_vocab_size(cfg) if cfg.model.pretrained else None
    base, extra = folder or lm_config(cfg.model.backbone).vocab_size, cfg.model.extra_special_tokens
    where = "model.backbone_path's config.json:" if folder else "the registry's"
    note = (f"{where} {base:,}{f' + {extra} extra tokens' if extra else ''}; the tokenizer "
            f"({cfg.model.tokenizer or cfg.model.backbone_path or cfg.model.backbone}) {why}, "
            f"so a trained model's vocabulary may differ")
    return base + extra, note


def inspect(cfg, vocab_size=None) -> dict:
    """The report of ``cfg``'s model; ``vocab_size``: a trained adapter's (default: :func:`_vocab_size`)."""
    from vlscale.modeling.vl_model import build_model, checkpoint_vocab_size
    from vlscale.peft.trainable import count_parameters, parameter_groups, with_registry_vision

    vocab_size, vocab_source = (vocab_size, "the adapter's") if vocab_size else _vocab_size(cfg)
    model = build_model(cfg, vocab_size=vocab_size, device="meta")
    built = model.lm.get_input_embeddings().num_embeddings
    if vocab_size and built > vocab_size:  # the checkpoint's or registry's embeddings outnumber the tokenizer's tokens
        where = ("model.backbone_path's config.json" if checkpoint_vocab_size(cfg)  # (a folder not there: the registry)
                 else f"{cfg.model.backbone}'s registry config")
        vocab_source = f"{where}; {vocab_source}: {vocab_size:,}"
    counts = count_parameters(model)
    counts.update(with_registry_vision(cfg, model, counts))
    groups = {g: {"params": sum(numel(p) for _, p in ps),
                  "trainable": sum(numel(p) for _, p in ps if p.requires_grad)}
              for g, ps in parameter_groups(model).items() if ps}
    # Placement: every top-level component, its parameters and how many of them train.
    placement = defaultdict(lambda: {"params": 0, "trainable": 0})
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "lm":
            key = ".".join(parts[:3]) if parts[1] in ("encoder", "decoder", "model") else ".".join(parts[:2])
        elif parts[0] == "peft":
            key = ".".join(parts[:2])
        else:
            key = parts[0]
        placement[key]["params"] += numel(p)
        placement[key]["trainable"] += numel(p) if p.requires_grad else 0
    sites = list(model.peft.sites)
    return {
        "config": cfg.name,
        "backbone": cfg.model.backbone,
        "vision": cfg.model.vision,
        "feature_source": cfg.model.feature_source,
        "peft_method": cfg.peft.method,
        "peft_sharing": cfg.peft.sharing,
        "tasks": list(cfg.data.tasks),
        "vocab_size": model.lm.get_input_embeddings().num_embeddings,
        "vocab_source": vocab_source,
        "peft_sites": sites,
        "placement": dict(placement),
        "groups": groups,
        **counts,
    }


def print_report(r: dict) -> None:
    print(f"{r['config']}: {r['backbone']} + CLIP {r['vision']} ({r['feature_source']}), "
          f"peft={r['peft_method']}/{r['peft_sharing']}, tasks={','.join(r['tasks'])}")
    sites = r["peft_sites"]
    print(f"\nPEFT sites ({len(sites)}):")
    shown = sites if len(sites) <= 12 else sites[:6] + ["..."] + sites[-6:]
    for s in shown:
        print(f"  {s}")
    print(f"\n{'module':<40} {'params':>15} {'trainable':>15}")
    for k, v in sorted(r["placement"].items()):
        print(f"{k:<40} {v['params']:>15,} {v['trainable']:>15,}")
    print(f"\n{'group':<40} {'params':>15} {'trainable':>15}")
    for k, v in sorted(r["groups"].items()):
        print(f"{k:<40} {v['params']:>15,} {v['trainable']:>15,}")
    print(f"\nvocabulary {r['vocab_size']:,} ({r['vocab_source']})")
    print(f"trainable {r['trainable']:,} / total {r['total']:,} "
          f"(without the frozen CLIP {r['total_without_vision']:,}; with CLIP {r['total_with_vision']:,}: "
          f"{r['vision_source']})")
    print(f"updated_pct {r['updated_pct']:.2f}%   updated_pct_with_vision {r['updated_pct_with_vision']:.2f}%")


@logs_to_console
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--config", default=None, help="preset name or YAML path (default: the embedded default)")
    which.add_argument("--adapter", default=None, type=os.path.expanduser,  # --adapter=~/x: no shell expands it
                       help="a trained run's adapter/ directory: its model")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_intermixed_args(argv)
    from vlscale.engine.checkpoint import CheckpointError

    try:  # a value the model's build refuses (peft.phm_dim not dividing d_model) is a ConfigError too
        if args.adapter:
            from vlscale.predict import load_run_config

            cfg, meta = load_run_config(args.adapter, args.overrides)
            report = inspect(cfg, meta["vocab_size"])
        else:
            report = inspect(load_config(args.config, args.overrides))
    except (ConfigError, ValueError, CheckpointError) as e:  # --adapter: not one, an override changing the model
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
