"""The miniature VL-Adapter replication: the runs behind the paper's Tables 1, 3 and 5 on the
synthetic world, how each is configured, run, scored and tabulated (``launchers/replicate.py``
is the command line).

Every row is one multi-task training of the miniature CLIP-BART (preset ``mini/clip_bart``: the
project's pretrained mini-clip-rn and mini-bart) with a paper method, then a test-split evaluation:

    row overrides = peft section of paper/clip_bart_<method>       (the paper's method settings)
                    with absolute widths scaled by d_model / 768   (see scale_peft_widths)
                  + the row's switches (Table 3: train CLIP / LM; Table 5: projection, layer norms)
                  + data.feature_cache (rows on cached CLIP features) + train.seed [+ train.max_steps]

    python launchers/train.py --deepspeed ds_configs/zero2.json --config mini/clip_bart <overrides> output_dir=OUT/runs/<row>
    python launchers/evaluate.py --adapter OUT/runs/<row>/adapter --split test --out OUT/runs/<row>/eval_test

Scores are each task's headline metric x 100 (VQA score, GQA exact match, NLVR2 accuracy, caption
CIDEr), ``avg`` their mean, ``updated_pct`` the trainable share of all parameters but CLIP's (the
paper's convention with precomputed features; Table 3, where CLIP is in the model, counts CLIP in
both). A row's ``result.json`` marks it done; a rerun skips it (resumable), resumes an
interrupted training from its checkpoint, or only evaluates a finished one, each only if it was made
with the rerun's settings (``plan_job``, ``check_result``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from vlscale.files import fsync_path, write_text_atomic

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
"""The checkout whose launchers/ and ds_configs/ the rows run: launchers/replicate.py sets its own (a wheel-installed
vlscale has neither beside it)."""
MINI_PRESET = "mini/clip_bart"
PAPER_D_MODEL = 768
MINI_ACTIVATION = "gelu"
"""The adapters' GELU of every table made here (exact); the ``paper/*`` presets take the reference's tanh one."""
"""Width of the paper's BART-base; absolute PEFT widths are scaled by d_model / PAPER_D_MODEL."""
WIDTH_KEYS = ("lora_rank", "prompt_hidden_dim", "task_embedding_dim", "layer_embedding_dim",
              "hypernet_hidden_dim")
"""PEFT settings that are absolute widths in the paper (BART-base); ratios (reduction_factor),
counts (n_prompts, phm_dim) and the hypernetwork's 8-d code are kept as they are. lora_alpha
scales with lora_rank so that alpha / rank (the LoRA output scale, 0.25 in the paper) is kept."""
TASKS = ("vqa", "gqa", "nlvr2", "caption")
TASK_HEADERS = {"vqa": "VQA", "gqa": "GQA", "nlvr2": "NLVR2", "caption": "COCO cap. (CIDEr)"}
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Row:
    """One training of a table: ``peft_preset``'s peft section plus ``switches`` on ``mini/clip_bart``."""

    name: str
    label: str
    peft_preset: str
    switches: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    rows: tuple[Row, ...]
    count_vision: bool = False
    """updated_pct counts CLIP's parameters (Table 3: CLIP is part of the trained model)."""


TABLE1_METHODS = ("full_ft", "multiple_adapters", "half_shared_adapters", "single_adapter", "hyperformer",
                  "multiple_compacters", "single_compacter", "multiple_lora", "single_lora",
                  "multiple_prompts", "single_prompt")
_LABELS = {"full_ft": "Full fine-tuning", "multiple_adapters": "Multiple Adapters",
           "half_shared_adapters": "Half-shared Adapters", "single_adapter": "Single Adapter",
           "hyperformer": "Hyperformer", "multiple_compacters": "Multiple Compacters",
           "single_compacter": "Single Compacter", "multiple_lora": "Multiple LoRA",
           "single_lora": "Single LoRA", "multiple_prompts": "Multiple Prompts", "single_prompt": "Single Prompt"}
_IMAGES = "model.feature_source=images"
_TRAIN_CLIP = "peft.train_vision=true"

TABLES: dict[int, Table] = {
    1: Table(1, "Table 1: parameter-efficient methods, multi-task on the four image tasks",
             tuple(Row(m, _LABELS[m], f"paper/clip_bart_{m}") for m in TABLE1_METHODS)),
    3: Table(3, "Table 3: freezing or training CLIP and the language model (CLIP runs in the loop)", (
        Row("clip_frozen_lm_ft", "CLIP frozen, BART fine-tuned", "paper/clip_bart_full_ft", (_IMAGES,)),
        Row("clip_ft_lm_ft", "CLIP fine-tuned, BART fine-tuned", "paper/clip_bart_full_ft", (_IMAGES, _TRAIN_CLIP)),
        Row("clip_frozen_single_adapter", "CLIP frozen, BART frozen + single adapter",
            "paper/clip_bart_single_adapter", (_IMAGES,)),
        Row("clip_ft_single_adapter", "CLIP fine-tuned, BART frozen + single adapter",
            "paper/clip_bart_single_adapter", (_IMAGES, _TRAIN_CLIP)),
    ), count_vision=True),
    5: Table(5, "Table 5: what trains besides the adapter (visual projection, layer norms)", (
        Row("projection_only", "Visual projection only", "paper/clip_bart_single_adapter",
            ("peft.method=none", "peft.train_layer_norms=false")),
        Row("projection_layer_norms", "+ Layer norms", "paper/clip_bart_single_adapter", ("peft.method=none",)),
        Row("single_adapter", "+ Single Adapter", "paper/clip_bart_single_adapter"),
    )),
}


class ReplicationError(RuntimeError):
    """A replication setting or an earlier result does not fit; the message says which."""


def read_json(path: Path, remedy: str):
    """An earlier invocation's JSON file; one cut short (a crash mid-write) is a ReplicationError naming it and
    the ``remedy``, never a partial result."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ReplicationError(f"{path} is not valid JSON ({e}): cut short by a crash? {remedy}") from None


def get_table(number) -> Table:
    try:
        return TABLES[int(number)]
    except (KeyError, ValueError):
        raise ReplicationError(f"--table {number!r}: choose one of {sorted(TABLES)}") from None


def select_rows(table: Table, names: Optional[Sequence[str]]) -> list[Row]:
    """The table's rows, or those named (in the table's order); unknown or repeated names are an error."""
    if not names:
        return list(table.rows)
    valid = [r.name for r in table.rows]
    unknown = [n for n in names if n not in valid]
    if unknown:
        hints = [hint for hint in (_row_hint(n, table) for n in unknown) if hint]
        raise ReplicationError(f"--methods {unknown} are not rows of Table {table.number}; valid: {valid}"
                               + "".join(f"; {hint}" for hint in hints))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ReplicationError(f"--methods names {', '.join(twice)} more than once; each row is trained once a seed "
                               f"(--seed 0,1,2 for repeats)")
    return [r for r in table.rows if r.name in names]


def _row_hint(name: str, table: Table) -> str:
    """What an unknown ``--methods`` name may have meant: the row of a preset's name, a row of another table, or
    the nearest row name."""
    import difflib

    valid = [r.name for r in table.rows]
    row = name.removeprefix("paper/").removeprefix("clip_bart_")
    if row != name and row in valid:
        return f"{name}: that preset's row is {row}"
    others = [str(t.number) for t in TABLES.values() if t is not table and name in [r.name for r in t.rows]]
    if others:
        return f"{name} is a row of Table {' and Table '.join(others)} (--table {others[0]})"
    near = difflib.get_close_matches(name, valid, n=1)
    return f"{name}: did you mean {near[0]}?" if near else ""


# ----------------------------------------------------------------------------- configuration

def scale_peft_widths(peft: dict, d_model: int, reference: int = PAPER_D_MODEL) -> dict:
    """The paper's absolute PEFT widths (set for BART-base, d_model 768) scaled to ``d_model``."""
    out = dict(peft)
    ratio = d_model / reference
    for key in WIDTH_KEYS:
        out[key] = max(1, int(round(peft[key] * ratio)))
    if peft["lora_rank"]:
        out["lora_alpha"] = float(peft["lora_alpha"]) * out["lora_rank"] / peft["lora_rank"]
    return out


def _value(v) -> str:
    """A value as parse_overrides reads it back (YAML): bare words where they stay strings."""
    import yaml

    if isinstance(v, str) and yaml.safe_load(v) == v:
        return v
    return json.dumps(v)  # JSON scalars and lists are YAML too


def row_overrides(row: Row, *, feature_cache: Optional[str] = None, seed: int = 0, steps: Optional[int] = None,
                  extra: Sequence[str] = (), preset: str = MINI_PRESET) -> list[str]:
    """Every ``key=value`` a row's training gets on top of ``preset`` (output_dir excluded)."""
    from vlscale.config import ConfigError, load_config, parse_overrides
    from vlscale.modeling.backbones import lm_config

    base = load_config(preset, list(extra))
    paper = dataclasses.asdict(load_config(row.peft_preset).peft)
    peft = dict(scale_peft_widths(paper, lm_config(base.model.backbone).d_model), activation=MINI_ACTIVATION)
    widths = [f"peft.{k}={_value(v)}" for k, v in peft.items()]
    decided = widths + list(row.switches)
    try:
        switched = load_config(preset, list(extra) + decided)
    except ConfigError as e:
        if not extra:
            raise
        raise ReplicationError(f"row {row.name!r} with --set {' --set '.join(extra)}: {e} (--set applies to every "
                               f"row; leave this one out of --methods)") from e
    # only the widths its method reads: every other method's were "has no effect" notes in each train.log
    unread = switched.unread_settings()
    out = [o for o in widths if o.split("=", 1)[0] not in unread] + list(row.switches)
    if switched.model.feature_source == "cache":
        if not feature_cache:
            raise ReplicationError(f"row {row.name!r} trains on cached CLIP features; a feature cache is needed")
        out.append(f"data.feature_cache={feature_cache}")
    out.append(f"train.seed={int(seed)}")
    if steps is not None:
        out.append(f"train.max_steps={int(steps)}")
    user_keys = set(_flat_keys(parse_overrides(list(extra))))
    clash = sorted(user_keys & set(_flat_keys(parse_overrides(decided + out))))  # a --set of an unread width too
    if clash:
        raise ReplicationError(f"--set {clash[0]} conflicts with a setting the replication decides per row "
                               f"({row.name}); use --steps / --seed, or change the row in vlscale/replicate.py")
    return list(extra) + out


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def backbone_fingerprint(cfg, vision_only: bool = False) -> str:
    """sha256 (16 hex) of the pretrained weight files a run config loads (``vision_only``: CLIP's):
    results and feature caches made from other weights must not be mixed with new ones."""
    import hashlib

    from vlscale.modeling.backbones import ASSET_DIR, hub_id

    files = []
    if cfg.model.pretrained and not vision_only:
        lm_dir = Path(cfg.model.backbone_path or hub_id(cfg.model.backbone))
        files += sorted(lm_dir.glob("*.safetensors")) if lm_dir.is_dir() else []
    vp = cfg.model.vision_pretrained
    if vp == "synthetic":
        files.append(ASSET_DIR / f"{cfg.model.vision}.safetensors")
    elif vp and Path(vp).is_file():
        files.append(Path(vp))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def row_config(overrides: Sequence[str], preset: str = MINI_PRESET):
    from vlscale.config import load_config

    return load_config(preset, list(overrides))


def updated_params(cfg) -> dict:
    """Trainable / total parameter counts of a run config (built on the meta device, no weights); with
    CLIP counted from the registry where the run reads cached features (as inspect_model.py counts)."""
    from vlscale.modeling.vl_model import build_model
    from vlscale.peft.trainable import count_parameters, with_registry_vision

    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    return dict(counts, **with_registry_vision(cfg, model, counts))


def headline_pct(counts: dict, table: "Table") -> float:
    """The updated % a table reports: Table 3 counts CLIP (frozen or trained), the others leave a frozen CLIP out
    (the paper's convention, as inspect_model.py's ``updated_pct``)."""
    return counts["updated_pct_with_vision"] if table.count_vision else counts["updated_pct"]


def pct_without_vision(counts: dict) -> float:
    """Updated % of the model without its vision encoder, trained or frozen (the language side alone)."""
    total = counts["total_without_vision"] - counts["trainable_vision"]
    return 100.0 * (counts["trainable"] - counts["trainable_vision"]) / total if total else 0.0


def uses_cache(overrides: Sequence[str], preset: str = MINI_PRESET) -> bool:
    return row_config([o for o in overrides if not o.startswith("data.feature_cache=")], preset).model.feature_source \
        == "cache"


# ----------------------------------------------------------------------------- seeds

MAX_SEEDS = 1000
"""The most seeds one ``--seed`` may give: each seed trains every row of the table (1000 seeds are ~10,000
trainings, against the paper's 3), so more is a typo (``0-100000000``), which planned every row once a seed."""


def parse_seeds(text) -> list[int]:
    """``--seed``: one seed (``3``), several (``0,1,2``) or ranges (``0-4``, ``0-2,7``); each once, in that order;
    at most :data:`MAX_SEEDS`."""
    spans = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)  # "0-" is no range (it ran seed 0 alone)
            if first < 0 or last < first:
                raise ValueError(part)
        except ValueError:
            raise ReplicationError(f"--seed {text}: {part!r} is not a seed (an integer >= 0) or a range a-b with a <= b; "
                                   f"e.g. --seed 0, --seed 0,1,2, --seed 0-4") from None
        spans.append(range(first, last + 1))
    count = sum(map(len, spans))
    if count > MAX_SEEDS:
        raise ReplicationError(f"--seed {text}: {count} seeds, at most {MAX_SEEDS} (each trains every row)")
    seeds: dict[int, None] = {}
    for seed in (s for span in spans for s in span):
        if seed in seeds:
            raise ReplicationError(f"--seed {text}: seed {seed} is given twice")
        seeds[seed] = None
    return list(seeds)


def seed_dir(out: Path, seed: int, seeds: Sequence[int]) -> Path:
    """Where one seed's rows go (``runs/<row>/``, its own results.json and table): ``out`` itself for one seed,
    ``out/seed<S>`` for several (``out`` then holds the table over the seeds)."""
    return Path(out) if len(seeds) == 1 else Path(out) / f"seed{seed}"


def check_layout(out: Path, seeds: Sequence[int]) -> None:
    """One ``--out`` holds either one seed's replication (``runs/``) or several seeds' (``seed<S>/runs/``):
    a table over seeds must not take in rows of a one-seed run there, nor the reverse. A results.json there that
    does not read is refused (:func:`read_json`)."""
    out = Path(out)
    several = sorted(p.name for p in out.glob("seed*") if (p / "runs").is_dir())
    if len(seeds) == 1 and several:
        raise ReplicationError(f"{out} holds a replication over several seeds ({', '.join(several)}); pass those "
                               f"seeds to --seed to add to it, or choose another --out for one seed")
    if len(seeds) > 1 and (out / "runs").is_dir():
        raise ReplicationError(f"{out} holds a one-seed replication ({out / 'runs'}); choose another --out for "
                               f"several seeds")
    for results in {out / "results.json", *(seed_dir(out, s, seeds) / "results.json" for s in seeds)}:
        if results.exists():  # read at the end for its invocations: refused now, not after the trainings
            read_json(results, "Delete it: a rerun writes it again from the rows' result.json (without the "
                               "earlier invocations' times)")


OUT_LOCK = ".replicate.lock"


def lock_out(out: Path):
    """Hold ``out``'s lock (an open file; released when this process ends): a second replicate.py into the same
    --out cleared the rows the first was training before their first checkpoint (as stopped ones) and FAILED the
    others on their output_dir's lock. The holder's pid is named in the refusal."""
    from vlscale.files import hold_lock

    out.mkdir(parents=True, exist_ok=True)
    f, holder = hold_lock(out / OUT_LOCK, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if f is None:
        raise ReplicationError(f"{out} is in use by another replicate.py ({holder}); wait for it to end or choose "
                               f"another --out")
    return f


SUMMARY_KEYS = ("label", "peft_preset", "updated_pct", "updated_pct_without_vision", "updated_pct_with_vision",
                "trainable_params", "total_params")


def aggregate_seeds(per_seed: dict[int, dict[str, dict]]) -> tuple[dict[str, dict], list[str]]:
    """{seed: {row: result}} -> ({row: its mean over the seeds}, rows missing from some seed's results).

    A row's entry keeps results.json's keys (``scores``: each task's mean; ``avg``: the mean average) and adds
    ``avg_sd`` (the sample standard deviation of the average over the seeds), ``scores_sd`` and ``avg_by_seed``.
    Only rows every seed finished are averaged."""
    def sd(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]] if all(n in per_seed[s] for s in seeds)]
    partial = sorted({n for s in seeds for n in per_seed[s]} - set(names))
    out = {}
    for name in names:
        rs = [per_seed[s][name] for s in seeds]
        tasks = [t for t in rs[0]["scores"] if all(t in r["scores"] for r in rs)]
        avgs = [r["avg"] for r in rs]
        out[name] = {**{k: rs[0][k] for k in SUMMARY_KEYS if k in rs[0]},
                     "scores": {t: statistics.mean(r["scores"][t] for r in rs) for t in tasks},
                     "scores_sd": {t: sd([r["scores"][t] for r in rs]) for t in tasks},
                     "avg": statistics.mean(avgs), "avg_sd": sd(avgs),
                     "avg_by_seed": {str(s): a for s, a in zip(seeds, avgs)}}
    return out, partial


# ----------------------------------------------------------------------------- results

def headline_scores(eval_metrics: dict) -> dict[str, float]:
    """``eval_metrics.json`` -> {task: headline metric x 100}."""
    from vlscale.data.tasks import get_task

    tasks = eval_metrics.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ReplicationError(f"eval_metrics.json has no per-task scores: keys {sorted(eval_metrics)}")
    out = {}
    for task, metrics in tasks.items():
        metric = get_task(task).metric
        if metric not in metrics:
            raise ReplicationError(f"eval_metrics.json: task {task!r} lacks its metric {metric!r} ({sorted(metrics)})")
        out[task] = 100.0 * float(metrics[metric])
    return out


def average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def make_result(row: Row, table: Table, overrides: Sequence[str], run_dir: Path, seconds: Optional[float],
                cpu_seconds: Optional[float] = None) -> dict:
    """The row's entry of results.json, from its run directory."""
    cfg = row_config(overrides)
    counts = updated_params(cfg)
    test = json.loads((run_dir / "eval_test" / "eval_metrics.json").read_text())
    scores = headline_scores(test)
    result = {"label": row.label, "peft_preset": row.peft_preset, "updated_pct": headline_pct(counts, table),
              "updated_pct_without_vision": pct_without_vision(counts),
              "updated_pct_with_vision": counts["updated_pct_with_vision"],
              "trainable_params": counts["trainable"], "total_params": counts["total"],
              "scores": scores, "avg": average(scores), "split": "test",
              "train_eval_seconds": seconds, "cpu_seconds": cpu_seconds, "overrides": list(overrides),
              "backbones": backbone_fingerprint(cfg)}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        history = json.loads(metrics.read_text())
        if history:
            val = headline_scores(history[-1])
            result["val_scores"], result["val_avg"] = val, average(val)
    summary = run_dir / "run_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        result["steps"], result["step_time_s"] = s.get("steps"), s.get("step_time_s")
    return result


ADAPTER_ROWS = ("multiple_adapters", "half_shared_adapters", "single_adapter")
PROMPT_ROWS = ("multiple_prompts", "single_prompt")


def paper_claims(table: Table, results: dict) -> list[dict]:
    """The paper's headline claims for a table, checked on the miniature's results (rows present only).

    Table 1: a single adapter reaches >= 97 % of full fine-tuning's average with < 10 % of the
    parameters updated; prompt tuning lands below every adapter variant; sharing one adapter does
    not lose to one adapter per task. Table 5: each addition (layer norms, then the adapter) helps.
    """
    avg = {n: r["avg"] for n, r in results.items()}
    out = []

    def claim(text, value, holds):
        out.append({"claim": text, "value": value, "holds": bool(holds)})

    if table.number == 1:
        if {"single_adapter", "full_ft"} <= avg.keys():
            ratio = avg["single_adapter"] / avg["full_ft"] if avg["full_ft"] else float("nan")
            pct = results["single_adapter"]["updated_pct"]
            full_by_seed = results["full_ft"].get("avg_by_seed", {})
            by_seed = [(a, full_by_seed.get(s)) for s, a in results["single_adapter"].get("avg_by_seed", {}).items()]
            seeds = "; per seed " + ", ".join(f"{100 * a / f:.1f}%" for a, f in by_seed) \
                if by_seed and all(f for _, f in by_seed) else ""
            claim("single adapter >= 97% of full fine-tuning's average, < 10% parameters updated",
                  f"{100 * ratio:.1f}% of full FT at {pct:.2f}% updated{seeds}", ratio >= 0.97 and pct < 10.0)
        adapters = [n for n in ADAPTER_ROWS if n in avg]
        prompts = [n for n in PROMPT_ROWS if n in avg]
        if adapters and prompts:
            best_p, worst_a = max(prompts, key=avg.get), min(adapters, key=avg.get)
            claim("prompt tuning below every adapter variant",
                  f"best prompt {best_p} {avg[best_p]:.2f} vs worst adapter {worst_a} {avg[worst_a]:.2f}",
                  avg[best_p] < avg[worst_a])
        if {"single_adapter", "multiple_adapters"} <= avg.keys():
            claim("a single shared adapter does not lose to one adapter per task",
                  f"{avg['single_adapter']:.2f} vs {avg['multiple_adapters']:.2f}",
                  avg["single_adapter"] >= avg["multiple_adapters"])
    if table.number == 5:
        order = [n for n in ("projection_only", "projection_layer_norms", "single_adapter") if n in avg]
        for a, b in zip(order, order[1:]):
            claim(f"{b} improves on {a}", f"{avg[b]:.2f} vs {avg[a]:.2f}", avg[b] > avg[a])
    return out


def markdown_table(table: Table, results: dict, notes: Sequence[str] = ()) -> str:
    """The table as Markdown: method, updated params %, per-task scores, average."""
    scored = list(dict.fromkeys(t for r in results.values() for t in r["scores"]))
    tasks = [t for t in TASKS if t in scored] + [t for t in scored if t not in TASKS]  # custom tasks after the paper's
    head = ["Method", "Updated params (%)"] + [TASK_HEADERS.get(t, t) for t in tasks] + ["Avg"]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table.rows:
        r = results.get(row.name)
        if r is None:
            continue
        cells = [f"{row.label} (`{row.name}`)", f"{r['updated_pct']:.2f}"]
        cells += [f"{r['scores'][t]:.2f}" if t in r["scores"] else "-" for t in tasks]
        cells.append(f"{r['avg']:.2f}" + (f" ± {r['avg_sd']:.2f}" if "avg_sd" in r else ""))
        lines.append("| " + " | ".join(cells) + " |")
    checks = paper_claims(table, results)
    if checks:
        lines += ["", "Paper claims on the miniature:", ""]
        lines += [f"- {'holds' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} ({c['value']})" for c in checks]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(table: Table, results: dict, path: Path) -> Optional[str]:
    """Average score against updated parameters (%), one point per row, named in a legend with both figures.
    -> None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'); no plot written"
    # a legend, not labels at the points: the adapter-like rows sit within a few % and points of each other
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    colours, markers = plt.get_cmap("tab20").colors, "osD^vPX*"
    for i, row in enumerate(r for r in table.rows if r.name in results):
        r = results[row.name]
        spread = f" ± {r['avg_sd']:.1f}" if "avg_sd" in r else ""
        ax.scatter(r["updated_pct"], r["avg"], s=40, color=colours[i % len(colours)], marker=markers[i % len(markers)],
                   label=f"{row.name} ({r['updated_pct']:.2f} %, {r['avg']:.1f}{spread})", edgecolors="black",
                   linewidths=0.4, zorder=3)
        if "avg_sd" in r:
            ax.errorbar(r["updated_pct"], r["avg"], yerr=r["avg_sd"], fmt="none", ecolor=colours[i % len(colours)],
                        capsize=3, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("updated parameters (%, log scale)")
    ax.set_ylabel("average test score")
    ax.set_title(f"Miniature VL-Adapter, Table {table.number}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False, borderaxespad=0)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except BaseException:  # a full disk: the half-written plot is not left beside the earlier one
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return None


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_outputs(table: Table, out: Path, results: dict, meta: dict) -> dict:
    """results.json, table<N>.md and table<N>.png in ``out`` (an earlier table<N>.png removed where none is plotted:
    no results, or no matplotlib); -> {name: path or note}."""
    seeds = meta.get("seeds")
    seed = (f"seeds {', '.join(map(str, seeds))} (the mean over them; Avg ± the sample standard deviation of the "
            f"average over the seeds; each seed's table in seed<S>/)") if seeds else f"seed {meta.get('seed')}"
    notes = [f"Miniature: preset `{MINI_PRESET}`, {meta.get('steps')} steps per training, {seed}, "
             f"test split ({meta.get('test_examples')} examples per task); scores are each task's metric x 100."
             if meta.get("steps") else None,
             "Updated params: trainable / all parameters" + (" including CLIP's." if table.count_vision else
                                                             " except CLIP's (features precomputed).")]
    if meta.get("partial_rows"):
        notes.append(f"Left out: {', '.join(meta['partial_rows'])} (not finished for every seed).")
    for inv in meta.get("invocations", []):
        if inv.get("rows_run_now"):
            notes.append(f"`{inv['command']}`: {inv['elapsed_s'] / 60:.1f} min wall, {inv.get('parallel')} trainings at "
                         f"a time, {inv['cpu_s'] / 60:.1f} CPU-minutes, for {', '.join(inv['rows_run_now'])}.")
    data = {"table": table.number, "title": table.title, **meta, "methods": results,
            "paper_claims": paper_claims(table, results)}
    write_json(out / "results.json", data)
    md = out / f"table{table.number}.md"
    write_text_atomic(md, markdown_table(table, results, [n for n in notes if n]))
    png = out / f"table{table.number}.png"
    why = plot(table, results, png) if results else "no results to plot"
    if why is not None:  # an earlier invocation's plot would show rows results.json no longer holds
        png.unlink(missing_ok=True)
    return {"results": str(out / "results.json"), "markdown": str(md), "plot": str(png) if why is None else why}


# ----------------------------------------------------------------------------- running

@dataclass
class Job:
    """One row: a queue of commands (features are made before any job starts), then the result."""

    row: Row
    overrides: list[str]
    run_dir: Path
    commands: deque = field(default_factory=deque)
    proc: Optional[subprocess.Popen] = None
    phase: str = "queued"
    error: Optional[str] = None
    log: Optional[Path] = None
    command_started: Optional[float] = None
    """When the running command started (its wall time goes to the row's :data:`SEGMENTS_FILE`)."""
    seed: Optional[int] = None
    """Set where the replication runs several seeds: the job is named ``<row> (seed S)``."""
    resumes: Optional[str] = None
    """The checkpoint its training resumes from (``step245``), said when it starts."""
    gpu: Optional[str] = None
    """The GPU its commands see (``CUDA_VISIBLE_DEVICES``), where the machine has several."""
    _log_file: object = None

    @property
    def name(self) -> str:
        return self.row.name if self.seed is None else f"{self.row.name} (seed {self.seed})"


def python_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launchers" / script), *args]


def train_command(overrides: Sequence[str], run_dir: Path, resume: bool) -> list[str]:
    """Training, then the test split evaluated in the same process (eval_test/, train.test_eval)."""
    cmd = python_cmd("train.py", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--config", MINI_PRESET,
                     "--no-progress")
    if resume:
        cmd.append("--resume")
    return cmd + list(overrides) + [f"output_dir={run_dir}", "train.test_eval=true"]


def eval_command(run_dir: Path) -> list[str]:
    return python_cmd("evaluate.py", "--adapter", str(run_dir / "adapter"), "--split", "test", "--no-progress",
                      "--out", str(run_dir / "eval_test"))


def plan_job(row: Row, overrides: list[str], run_dir: Path, fingerprint: Optional[str] = None,
             dry_run: bool = False) -> Job:
    """Which commands a row still needs (resumption): none, evaluate the test split, resume, or train
    (training evaluates the test split at its end).

    A row's earlier work is used only if it was made with this run's settings: a finished row whose
    settings or backbone weights (``fingerprint``) differ, and an interrupted or unevaluated training
    that ran with other settings (another ``--steps`` would mix two learning-rate schedules in one
    result), are a ReplicationError naming the row, the setting, its two values and the ways on.
    ``dry_run``: the same plan and checks, with nothing removed (a run that stopped before its first
    checkpoint is cleared before training it again)."""
    job = Job(row, overrides, run_dir)
    if (run_dir / RESULT_FILE).exists():
        check_result(row, overrides, run_dir, fingerprint)
        job.phase = "done"
        return job
    summary = run_dir / "run_summary.json"
    finished = summary.exists() and json.loads(summary.read_text()).get("completed") and \
        (run_dir / "adapter" / "adapter_config.json").exists()
    latest = run_dir / "checkpoints" / "latest"
    resumes = latest.read_text().strip() if latest.exists() else None  # the checkpoint (step245) a training resumes
    resume = resumes is not None
    evaluated = (run_dir / "eval_test" / "eval_metrics.json").exists()
    if evaluated or finished or resume:
        what = "training" if evaluated or finished else f"interrupted training (checkpoint {resumes})"
        check_trained_settings(row, overrides, run_dir, what)
    if evaluated:
        job.phase = "collect"
        return job
    if finished:  # trained, but its test split was not evaluated (stopped in between)
        job.commands.append(("eval", eval_command(run_dir)))
        return job
    if not resume and run_dir.exists() and not dry_run:
        _clear_partial(run_dir)
    job.resumes = resumes
    job.commands.append(("train", train_command(overrides, run_dir, resume)))  # evaluates the test split too
    return job


# Settings a row's earlier work may differ in: where it is (a moved --out: its output_dir and its feature cache's
# folder, --out/features, whose contents are checked by the backbone weights' fingerprint), the preset's labels,
# and what leaves the trained model and its scores alone (how often it logged and saved; train.test_eval: rows
# finished before the test split was evaluated by the training itself), and the settings the row does not read
# (RunConfig.unread_settings: earlier rows were given every method's widths, rows now only their method's).
SAME_ROW_KEYS = ("output_dir", "name", "description", "train.test_eval", "train.log_every", "train.save_every",
                 "data.feature_cache")
_UNSET = object()


def _setting(key: str, value) -> str:
    return f"no {key} override (the preset's)" if value is _UNSET else f"{key}={_value(value)}"


def _differences(old: dict, new: dict, ignore: Sequence[str] = SAME_ROW_KEYS) -> list[tuple[str, object, object]]:
    return [(k, old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k, _UNSET) != new.get(k, _UNSET)]


def _how_on(diff: list, run_dir: Path, use: str, why: str = "") -> str:
    """'k=a, this run gives k=b (and N more: ...)[ (why)]; <the ways on>' for a list of (key, old, new)."""
    key, old, new = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:4])}{', ...' if len(diff) > 4 else ''})" \
        if len(diff) > 1 else ""
    flag = {"train.max_steps": "--steps", "train.seed": "--seed"}.get(key)
    same = f" ({flag} {_value(old)})" if flag and old is not _UNSET else ""
    return (f"{_setting(key, old)}, this run gives {_setting(key, new)}{more}{f' ({why})' if why else ''}; rerun "
            f"with the settings it was made with{same} {use}, choose another --out, or delete {run_dir} to train "
            f"the row again")


def trained_settings(run_dir: Path) -> Optional[dict]:
    """The settings the training in ``run_dir`` ran with, flat (``train.max_steps``: 300, ...): its
    run_config.yaml, else its adapter's; None when neither is there."""
    from vlscale.config import ConfigError, config_from_dict, flat_settings, load_config

    path = run_dir / "run_config.yaml"
    adapter = run_dir / "adapter" / "adapter_config.json"
    try:
        if path.exists():
            return flat_settings(load_config(str(path)).to_dict())
        if adapter.exists():
            path = adapter
            return flat_settings(config_from_dict(json.loads(adapter.read_text())["run_config"]).to_dict())
    except (ConfigError, ValueError, KeyError, TypeError) as e:
        raise ReplicationError(f"{path} cannot be read ({type(e).__name__}: {e}): the settings of the training in "
                               f"{run_dir} are unknown; delete {run_dir} to train the row again") from None
    return None


def check_trained_settings(row: Row, overrides: Sequence[str], run_dir: Path, what: str = "training",
                           role: str = "") -> None:
    """Refuse to resume, evaluate or collect a training in ``run_dir`` that ran with other settings than
    this row's now (``--steps``, ``--seed``, ``--set``, the row's or the preset's)."""
    saved = trained_settings(run_dir)
    if saved is None:
        raise ReplicationError(f"row {row.name}: the {what} in {run_dir} has no run_config.yaml, so its settings "
                               f"cannot be checked against this run's; delete {run_dir} to train the row again")
    from vlscale.config import flat_settings

    cfg = row_config([*overrides, f"output_dir={run_dir}", "train.test_eval=true"])
    diff = _differences(saved, flat_settings(cfg.to_dict()), (*SAME_ROW_KEYS, *cfg.unread_settings()))
    if diff:
        interrupted = what.startswith("interrupted")
        raise ReplicationError(f"row {row.name}: {role}the {what} in {run_dir} ran with other settings: "
                               + _how_on(diff, run_dir, "to finish it" if interrupted else "to use it",
                                         "resuming it would mix both in one result" if interrupted else ""))


def check_result(row: Row, overrides: Sequence[str], run_dir: Path, fingerprint: Optional[str] = None,
                 kept: bool = False) -> None:
    """A finished row's ``result.json`` may be used (skipped, or ``kept`` in the table while other rows
    run) only if it was made with these settings and backbone weights; otherwise a ReplicationError."""
    saved = read_json(run_dir / RESULT_FILE, f"Delete it: a rerun collects the row again from {run_dir}")
    who = f"row {row.name} is in the table this run writes, but" if kept else f"row {row.name}:"

    def pairs(ov):
        import yaml

        return {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in ov)}

    # the settings, not the command's spelling: --set in another order, --set train.max_steps=N for --steps N, a
    # moved --out and a changed train.save_every / log_every are the same row
    diff = _differences(pairs(saved.get("overrides", [])), pairs(overrides))
    if diff:  # nor a setting its method does not read (earlier rows were given every method's widths)
        from vlscale.config import ConfigError

        try:
            unread = row_config(overrides).unread_settings()
        except ConfigError:  # settings that do not load (a key renamed since): all of them differ
            unread = set()
        diff = [d for d in diff if d[0] not in unread]
    if diff:
        raise ReplicationError(f"{who} {run_dir / RESULT_FILE} was made with other settings: "
                               + _how_on(diff, run_dir, "to use it"))
    if fingerprint is not None and saved.get("backbones") != fingerprint:
        raise ReplicationError(f"{who} {run_dir / RESULT_FILE} was made with other backbone weights "
                               f"({saved.get('backbones')} vs {fingerprint} now); choose another --out or "
                               f"delete {run_dir}")
    if (run_dir / "run_config.yaml").exists():  # what it trained with (the preset's or the row's values then)
        check_trained_settings(row, overrides, run_dir, role="its result is in the table this run writes, but "
                               if kept else "")


SEGMENTS_FILE = "replicate_segments.jsonl"
"""A row's commands as they ended, one JSON line each (phase, wall and CPU seconds, exit code): a row trained
over several invocations (interrupted, resumed) is timed over all of them."""


_CUT_SHORT_SAID: set = set()


def _segment(line: str) -> Optional[dict]:
    """One line of :data:`SEGMENTS_FILE` read; None when it is not one."""
    try:
        seg = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(seg, dict) and all(isinstance(seg.get(k), (int, float)) for k in ("seconds", "cpu_s"))
    return seg if ok else None


def _said_cut_short(path: Path) -> None:
    if path not in _CUT_SHORT_SAID:
        _CUT_SHORT_SAID.add(path)
        logger.warning(f"{path}: its last line was cut short (a crash while it was written): that command's time "
                       f"is left out")


def read_segments(path: Path) -> list[dict]:
    """The commands :data:`SEGMENTS_FILE` ``path`` records. A last line cut short (a crash mid-append: no newline
    after it) is left out and said once; a line that does not read before it is a ReplicationError naming it."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines()
    segments = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        seg = _segment(line)
        if seg is None:
            if i == len(lines) and not text.endswith("\n"):
                _said_cut_short(path)
                break
            raise ReplicationError(f"{path}, line {i}: not a recorded command ({line[:80]!r}); delete that line "
                                   f"(its command's time is then left out)")
        segments.append(seg)
    return segments


def record_segment(path: Path, segment: dict) -> None:
    """Append ``segment`` to :data:`SEGMENTS_FILE` ``path``, flushed to disk. A last line cut short is dropped
    first (said once): the new line after it would make it a line in the middle, which reads as corruption."""
    new = not path.exists()
    with open(path, "a+b") as f:
        f.seek(0)
        text = f.read()
        if text and not text.endswith(b"\n"):
            start = text.rfind(b"\n") + 1
            if _segment(text[start:].decode(errors="replace")) is None:
                f.truncate(start)
                _said_cut_short(path)
            else:  # whole but for its newline
                f.write(b"\n")
        f.write((json.dumps(segment) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_path(path.parent)


def time_spent(run_dir: Path) -> tuple[Optional[float], Optional[float]]:
    """(wall, CPU) seconds of the row's commands over every invocation; (None, None) when none is recorded."""
    path = run_dir / SEGMENTS_FILE
    if not path.exists():
        return None, None
    segments = read_segments(path)
    return round(sum(s["seconds"] for s in segments), 1), round(sum(s["cpu_s"] for s in segments), 1)


def _clear_partial(run_dir: Path) -> None:
    """A run that stopped before its first checkpoint: remove its files so train.py starts afresh."""
    import shutil

    for p in run_dir.iterdir():
        if p.name in ("train.log", "eval.log"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def subprocess_env(threads: int) -> dict:
    """Each row's commands run as their own one-process jobs: launcher variables this process may have
    inherited (a torchrun / deepspeed / MPI environment) are not passed on."""
    from vlscale.engine.distributed import LAUNCHER_VARS

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def visible_gpus() -> list[str]:
    """The GPUs the jobs share out (``CUDA_VISIBLE_DEVICES``'s entries, else every device), none on the host."""
    import torch

    from vlscale.engine.distributed import local_device_type

    if local_device_type() != "cuda":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def stop_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` for the rows' commands: SIGTERM to the child when this process ends, however (Linux;
    elsewhere None). A SIGKILLed or crashed replicate.py left its trainings running orphaned, and its rerun's
    trainings of those rows FAILED on their output_dir's lock; now they checkpoint on that SIGTERM and the rerun
    resumes them."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def default_parallel(threads: int = 1) -> int:
    """Trainings at once: the CPUs this process may use (not the machine's), ``threads`` each."""
    from vlscale.engine.distributed import usable_cpu_count

    return max(1, usable_cpu_count() // max(1, threads))


def run_status(job: Job) -> str:
    """One short status of a running job: its training step and loss, or its phase."""
    if job.phase != "train":
        return f"{job.name}: {job.phase}"
    log = job.run_dir / "train_log.jsonl"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 400))
            last = f.read().decode(errors="ignore").strip().splitlines()[-1]
        rec = json.loads(last)
        return f"{job.name}: step {rec['step']} loss {rec['loss']:.3f}"
    except (OSError, IndexError, ValueError, KeyError):
        return f"{job.name}: starting"


def tail(path: Optional[Path], n: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="ignore").splitlines()[-n:])


class Runner:
    """Runs jobs ``parallel`` at a time (each command a subprocess with ``threads`` torch threads)."""

    def __init__(self, jobs: list[Job], parallel: int, threads: int, on_done: Callable[[Job], None],
                 progress: bool = True, poll_s: float = 2.0, echo: Callable[[str], None] = print):
        self.pending = deque(j for j in jobs if j.phase != "done")
        self.jobs, self.parallel, self.threads = jobs, max(1, parallel), threads
        self.on_done, self.progress, self.poll_s, self.echo = on_done, progress, poll_s, echo
        self.running: list[Job] = []
        self.env = subprocess_env(threads)
        # each job is a one-process run on its first visible GPU: with several, each job gets the least used
        # one (all of them used GPU 0 before, the others idle)
        self.gpus = visible_gpus()

    def _start_next_command(self, job: Job) -> None:
        phase, cmd = job.commands.popleft()
        job.phase, job.log = phase, job.run_dir / f"{phase}.log"
        job.run_dir.mkdir(parents=True, exist_ok=True)
        job._log_file = open(job.log, "a")
        job._log_file.write(f"$ {' '.join(cmd)}\n")
        job._log_file.flush()
        job.command_started = time.time()
        env = self.env
        if len(self.gpus) > 1:
            if job.gpu is None:
                load = {g: sum(j.gpu == g for j in self.running if j is not job) for g in self.gpus}
                job.gpu = min(self.gpus, key=load.get)
            env = dict(env, CUDA_VISIBLE_DEVICES=job.gpu)
        job.proc = subprocess.Popen(cmd, env=env, stdout=job._log_file,  # in this working directory, where --set's
                                    stderr=subprocess.STDOUT, preexec_fn=stop_with_parent())  # paths were checked

    @staticmethod
    def _poll(job: Job, wait: bool = False) -> Optional[int]:
        """The command's exit code once it ended (None while it runs; ``wait``: until it ends); records the
        command (its wall and CPU time) in the row's :data:`SEGMENTS_FILE`."""
        pid, status, usage = os.wait4(job.proc.pid, 0 if wait else os.WNOHANG)
        if pid == 0:
            return None
        cpu = usage.ru_utime + usage.ru_stime
        job.proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = round(time.time() - job.command_started, 1)
        record_segment(job.run_dir / SEGMENTS_FILE, {"phase": job.phase, "seconds": seconds, "cpu_s": round(cpu, 1),
                                                     "exit": job.proc.returncode})
        return job.proc.returncode

    def _finish(self, job: Job, bar) -> None:
        try:
            self.on_done(job)
            job.phase = "done"
            msg = f"{job.name}: done"
        except Exception as e:  # a bad result must not stop the other rows
            job.phase, job.error = "failed", f"{type(e).__name__}: {e}"
            msg = f"{job.name}: FAILED collecting the result: {job.error}"
        self.running.remove(job)
        if bar is not None:
            bar.update(1)
            bar.write(msg)
        else:
            self.echo(msg)

    def run(self) -> list[Job]:
        from vlscale.log import interruptible, progress_bar

        total = len(self.jobs)
        bar = progress_bar(total=total, initial=total - len(self.pending), desc="trainings", unit="run",
                           dynamic_ncols=True) if self.progress else None
        # SIGTERM (a scheduler's or kill's) stops the trainings as Ctrl-C does: they checkpoint, a rerun resumes;
        # before, this process ended and its trainings ran on orphaned
        with interruptible():
            self._run(bar)
        return self.jobs

    def _run(self, bar) -> None:
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.parallel:
                    job = self.pending.popleft()
                    self.running.append(job)
                    if job.commands:
                        self._start_next_command(job)
                        resumed = f" from its checkpoint {job.resumes}" if job.resumes and job.phase == "train" else ""
                        note = f"{job.name}: {job.phase} started{resumed} (log {job.log})"
                        bar.write(note) if bar is not None else self.echo(note)
                for job in list(self.running):
                    if job.proc is None:  # nothing left to run: collect
                        self._finish(job, bar)
                        continue
                    rc = self._poll(job)
                    if rc is None:
                        continue
                    job._log_file.close()
                    job.proc = None
                    if rc != 0:
                        if rc in INTERRUPTED_CODES:  # the training alone was stopped by a signal: it checkpointed
                            job.phase, job.error = "interrupted", f"{job.log.name} stopped by a signal (exit {rc})"
                            msg = f"{job.name}: interrupted ({job.error}); a rerun resumes it"
                        else:
                            job.phase, job.error = "failed", f"{job.log.name} exited with {rc}"
                            msg = f"{job.name}: FAILED ({job.error}); last lines of {job.log}:\n{tail(job.log)}"
                        self.running.remove(job)
                        bar.write(msg) if bar is not None else self.echo(msg)
                        if bar is not None:
                            bar.update(1)
                        continue
                    if job.commands:
                        self._start_next_command(job)
                    else:
                        self._finish(job, bar)
                if bar is not None:
                    bar.set_postfix_str(" | ".join(run_status(j) for j in self.running), refresh=True)
                if self.pending or self.running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            for job in self.running:
                if job.proc is not None:
                    job.proc.terminate()  # train.py checkpoints on SIGTERM; a rerun resumes
            for job in self.running:
                if job.proc is not None:
                    self._poll(job, wait=True)
            raise
        finally:
            if bar is not None:
                bar.close()


INTERRUPTED_CODES = (130, 143, 138, -signal.SIGINT, -signal.SIGTERM, -signal.SIGUSR1)  # train.py's stop signals
"""A training's exit codes when a signal stopped it (train.py: 128 + the signal, after its checkpoint)."""


