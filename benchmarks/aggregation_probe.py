"""Why the miniature does not learn VQA's yes/no and counting questions (nor NLVR2) in short runs.

    python benchmarks/aggregation_probe.py [--qtype exist|count|color] [--steps 1250] [--batch 64]
                                           [--rows NAME,...] [--json] [--out FILE]

Trains on one VQA question type of the synthetic world (8,000 training examples, ~2,000 of the type)
and prints validation accuracy every 250 steps for several learners, all from the same cached
mini-CLIP-RN grid features (3 x 3 x 512, made with launchers/extract_features.py on first use):

* ``cls``: a 2-layer pre-LN transformer encoder over [CLS; colour and shape query tokens; 9 visual
  tokens], a linear readout of CLS. The reference: what these features allow a small model to learn.
* ``vl-*``: the project's VLModel (vlscale.modeling.vl_model.build_model), a sequence-to-sequence LM
  answering in text, in a bare loop (AdamW, no warmup, no DeepSpeed): ``vl-ft-<lr>`` full
  fine-tuning of the pretrained mini BART, ``vl-adapter-<lr>`` one adapter with the LM frozen,
  ``vl-oracle-*`` the same with the CLIP features replaced by an oracle (each object's cell holds
  one-hot colour and shape), ``vl-random-*`` a randomly initialised mini BART, ``*-dropout0``
  without dropout (the mini BART's is 0.1), ``*-textfirst`` with VL-T5's encoder layout
  [text; visual tokens] instead of DESIGN.md's [visual tokens; text] (the text then keeps the
  positions it was pretrained at), ``vl-t5-*`` the pretrained mini T5 (pre-LN, relative position
  buckets) in place of the mini BART (post-LN, learned positions).

Figures go to BENCHMARKS.md ("What the miniature does not learn, and why").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlscale.config import load_config  # noqa: E402
from vlscale.data import load_examples  # noqa: E402
from vlscale.data.collate import Collator, fetch_visuals  # noqa: E402
from vlscale.data.features import FeatureCache  # noqa: E402
from vlscale.data.synthetic import ANSWER_SPACES, COLOR_NAMES, SHAPES  # noqa: E402

OVERRIDES = ["data.tasks=[vqa]", "data.synthetic_train=8000", "data.synthetic_eval=400"]
# name -> (kind, lr, extra config overrides, oracle features)
ROWS = {
    "cls": ("cls", 1e-3, [], False),
    "vl-ft-1e-4": ("vl", 1e-4, ["peft.train_lm=true"], False),
    "vl-ft-3e-4": ("vl", 3e-4, ["peft.train_lm=true"], False),
    "vl-ft-1e-3": ("vl", 1e-3, ["peft.train_lm=true"], False),
    "vl-adapter-1e-3": ("vl", 1e-3, ["peft.method=adapter"], False),
    "vl-adapter-3e-3": ("vl", 3e-3, ["peft.method=adapter"], False),
    "vl-oracle-ft-3e-4": ("vl", 3e-4, ["peft.train_lm=true"], True),
    "vl-oracle-ft-1e-3": ("vl", 1e-3, ["peft.train_lm=true"], True),
    "vl-ft-3e-4-dropout0": ("vl", 3e-4, ["peft.train_lm=true", "model.dropout=0"], False),
    "vl-random-ft-3e-4": ("vl", 3e-4, ["peft.train_lm=true", "model.pretrained=false"], False),
    "vl-ft-3e-4-textfirst": ("vl-textfirst", 3e-4, ["peft.train_lm=true"], False),
    "vl-adapter-1e-3-textfirst": ("vl-textfirst", 1e-3, ["peft.method=adapter"], False),
    # the project's pretrained mini-t5 (pre-LN, relative positions) in place of mini-bart (post-LN)
    "vl-t5-ft-3e-4": ("vl", 3e-4, ["peft.train_lm=true", "model.backbone=mini-t5"], False),
    "vl-t5-adapter-1e-3": ("vl", 1e-3, ["peft.method=adapter", "model.backbone=mini-t5"], False),
}
DEFAULT_ROWS = ("cls", "vl-ft-1e-4", "vl-ft-3e-4", "vl-ft-1e-3", "vl-adapter-1e-3", "vl-oracle-ft-1e-3",
                "vl-oracle-ft-3e-4")


class OracleFeatures:
    """Feature source whose 3 x 3 grid holds each object's one-hot colour and shape in its cell."""

    kind = "features"

    def __init__(self, examples, dim: int):
        self.scenes = {e.image_ids[0]: e.extra["scene"][0] for e in examples}
        self.dim = dim

    def __getitem__(self, image_id: str) -> torch.Tensor:
        x = torch.zeros(9, self.dim)
        for color, shape, _size, row, col in self.scenes[image_id]:
            x[row * 3 + col, COLOR_NAMES.index(color)] = 1
            x[row * 3 + col, len(COLOR_NAMES) + SHAPES.index(shape)] = 1
        return x


class ClsProbe(nn.Module):
    """[CLS; query tokens; visual tokens] -> 2-layer pre-LN encoder -> linear readout of CLS."""

    def __init__(self, feat_dim: int, n_classes: int, d: int = 128):
        super().__init__()
        self.vis = nn.Sequential(nn.Linear(feat_dim, d), nn.LayerNorm(d))
        self.pos = nn.Parameter(torch.randn(9, d) * 0.02)
        self.query = nn.Embedding(len(COLOR_NAMES) + len(SHAPES), d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, n_classes)

    def forward(self, feats, query):
        h = torch.cat([self.cls.expand(len(feats), 1, -1), self.query(query), self.vis(feats) + self.pos], 1)
        return self.out(self.encoder(h)[:, 0])


def query_tokens(e) -> list[int]:
    """The question's colour and/or shape as indices (colours first, then shapes); two per question."""
    words = [w.rstrip("?s") for w in e.text.split()]
    ids = [COLOR_NAMES.index(w) for w in words if w in COLOR_NAMES]
    ids += [len(COLOR_NAMES) + SHAPES.index(w) for w in words if w in SHAPES]
    return (ids * 2)[:2]


def ensure_features(cache: Path) -> None:
    if (cache / "meta.json").exists():
        return
    subprocess.run([sys.executable, str(ROOT / "launchers" / "extract_features.py"), "--synthetic", "--quiet",
                    "--out", str(cache), *OVERRIDES], check=True)


def train_curve(step_loss, accuracy, params, lr: float, steps: int, every: int) -> list[dict]:
    """AdamW on ``step_loss()`` for ``steps`` steps; mean loss and ``accuracy()`` every ``every`` steps."""
    opt = torch.optim.AdamW(params, lr, weight_decay=0.01)
    curve, losses = [], []
    for step in range(1, steps + 1):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % every == 0:
            curve.append({"step": step, "loss": sum(losses[-every:]) / every, "val_acc": accuracy()})
    return curve


def run_cls(train, val, source, steps: int, batch: int, lr: float, every: int) -> list[dict]:
    torch.manual_seed(0)
    answers = sorted({e.target for e in train + val})

    def tensors(examples):
        feats = torch.stack([source[e.image_ids[0]].float() for e in examples])
        return feats, torch.tensor([query_tokens(e) for e in examples]), \
            torch.tensor([answers.index(e.target) for e in examples])

    (xt, qt, yt), (xv, qv, yv) = tensors(train), tensors(val)
    mu, sd = xt.mean((0, 1)), xt.std((0, 1)) + 1e-5
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    model = ClsProbe(xt.shape[-1], len(answers))

    def step_loss():
        i = torch.randint(len(xt), (batch,))
        return nn.functional.cross_entropy(model(xt[i], qt[i]), yt[i])

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        acc = (model(xv, qv).argmax(1) == yv).float().mean().item()
        model.train()
        return acc

    return train_curve(step_loss, accuracy, model.parameters(), lr, steps, every)


def use_text_first(model) -> None:
    """Reorder ``model.encoder_inputs`` to VL-T5's [text; visual tokens] (the probe's rows have no prompts)."""
    visual_first = model.encoder_inputs

    def encoder_inputs(batch: dict):
        embeds, mask = visual_first(batch)
        v = mask.shape[1] - batch["input_ids"].shape[1]  # the visual tokens in front
        return torch.cat([embeds[:, v:], embeds[:, :v]], dim=1), torch.cat([mask[:, v:], mask[:, :v]], dim=1)

    model.encoder_inputs = encoder_inputs


def run_vl(cfg, train, val, source, steps: int, batch: int, lr: float, every: int,
           text_first: bool = False) -> list[dict]:
    from vlscale.data.tokenizer import build_tokenizer
    from vlscale.modeling.vl_model import build_model

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, vocab_size=len(tok))
    if text_first:
        use_text_first(model)
    collate = Collator(tok, cfg)

    def step_loss():
        ex = rng.sample(train, batch)
        return model(collate(ex, fetch_visuals(source, ex))).loss

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        right = 0
        for i in range(0, len(val), 100):
            ex = val[i:i + 100]
            out = tok.batch_decode(model.generate(collate(ex, fetch_visuals(source, ex)), max_new_tokens=5),
                                   skip_special_tokens=True)
            right += sum(o.strip() == e.target for o, e in zip(out, ex))
        model.train()
        return right / len(val)

    return train_curve(step_loss, accuracy, [p for p in model.parameters() if p.requires_grad], lr, steps, every)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtype", default="exist", choices=("exist", "count", "color", "shape"))
    ap.add_argument("--steps", type=int, default=1250)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "aggregation_probe" / "features"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    ensure_features(cache)
    base = [*OVERRIDES, "model.feature_source=cache", f"data.feature_cache={cache}"]
    cfg0 = load_config("default", base)
    train = [e for e in load_examples(cfg0, "vqa", "train") if e.extra["qtype"] == args.qtype]
    val = [e for e in load_examples(cfg0, "vqa", "val") if e.extra["qtype"] == args.qtype]
    clip = FeatureCache(cache)
    feat_dim = clip[train[0].image_ids[0]].shape[-1]
    oracle = OracleFeatures(load_examples(cfg0, "vqa", "train") + load_examples(cfg0, "vqa", "val"), feat_dim)
    majority = max(ANSWER_SPACES[args.qtype], key=lambda a: sum(e.target == a for e in val))
    result = {"qtype": args.qtype, "train_examples": len(train), "val_examples": len(val), "batch": args.batch,
              "steps": args.steps, "val_majority_acc": sum(e.target == majority for e in val) / len(val),
              "chance": 1 / len(ANSWER_SPACES[args.qtype]), "rows": {}}
    print(f"{args.qtype}: {len(train)} training / {len(val)} val examples, batch {args.batch}; "
          f"val majority answer {result['val_majority_acc']:.3f}, chance {result['chance']:.3f}", flush=True)
    for name in rows:
        kind, lr, extra, use_oracle = ROWS[name]
        source = oracle if use_oracle else clip
        t0 = time.time()
        if kind == "cls":
            curve = run_cls(train, val, source, args.steps, args.batch, lr, args.every)
        else:
            curve = run_vl(load_config("default", base + extra), train, val, source, args.steps, args.batch, lr,
                           args.every, text_first=kind == "vl-textfirst")
        result["rows"][name] = {"lr": lr, "overrides": extra, "oracle": use_oracle, "curve": curve,
                                "seconds": round(time.time() - t0, 1)}
        print(f"{name:20s} " + "  ".join(f"{c['step']}: {c['val_acc']:.2f} (loss {c['loss']:.2f})" for c in curve)
              + f"  [{time.time() - t0:.0f} s]", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
