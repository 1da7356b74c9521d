"""The embedded default learns: a short run on the synthetic world, scored against each task's best
text-only answer prior (:func:`vlscale.data.synthetic.answer_prior_baseline`, which picks the best of
several priors with the evaluation labels, so it is an optimistic bar).

One training of the default preset (pretrained mini CLIP-RN + mini BART, one shared adapter) on
precomputed CLIP features, 1 process, its 450 steps at lr 3e-3 (tests/integration/learning_run.py;
about 2 minutes on one core, beside the rest of the suite).
It runs at ZeRO stage 0: on one process ZeRO-3 partitions nothing and computes the same updates (the
same scores to the last digit, measured), but its per-module gather/release hooks cost 0.43 s a step
against 0.115 s on this 2 M-parameter model; partitioning has its own tests (test_zero3.py).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from vlscale.config import load_config
from vlscale.data import load_examples
from vlscale.data.synthetic import ANSWER_SPACES, answer_prior_baseline
from vlscale.data.tasks import get_task

@pytest.fixture(scope="module")
def short_run(learning_job, h):
    """tests/integration/learning_run.py's training: a background job of the suite (one process, one
    torch thread, forked from the preloaded server), started when collection ends (tests/conftest.py)."""
    out = learning_job.folder / "run"
    cfg = load_config(str(out / "run_config.yaml"))
    scores = h.read_json(out / "metrics.json")[-1]
    assert scores["split"] == "val" and scores["step"] == 450
    return {"out": out, "cfg": cfg, "scores": scores["tasks"], "stdout": learning_job.output()}


def _score_and_baseline(run, task: str) -> tuple[float, float]:
    cfg = run["cfg"]
    metric = get_task(task).metric
    base = answer_prior_baseline(load_examples(cfg, task, "train"), load_examples(cfg, task, "val"), task)
    return run["scores"][task][metric], base


def test_the_run_prints_per_task_scores(short_run):
    assert "final scores (val, step 450)" in short_run["stdout"]
    for task in ("vqa", "gqa", "nlvr2", "caption"):
        assert f"\n  {task} " in short_run["stdout"]


def test_every_step_is_logged_with_its_gradient_norm(short_run):
    """At ZeRO stage 0 in fp32 DeepSpeed keeps no gradient norm (a plain torch optimizer); the trainer
    takes it itself (before clipping, as DeepSpeed's optimizers report theirs)."""
    lines = (short_run["out"] / "train_log.jsonl").read_text().splitlines()
    log = [json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON literal {token}")) for line in lines]
    assert [r["step"] for r in log] == list(range(1, 451))
    assert all(r["skipped"] is False and isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in log)


@pytest.mark.parametrize("task,margin", [("gqa", 0.05), ("caption", 0.5), ("vqa", 0.0)])
def test_short_run_beats_the_text_only_baseline(short_run, task, margin):
    score, base = _score_and_baseline(short_run, task)
    assert score > base + margin, f"{task}: {score:.3f} vs text-only baseline {base:.3f}"


def test_vqa_reads_the_image(short_run):
    """Colour questions (the image alone decides the answer) far above uniform guessing. Colour is what
    450 steps learn first (measured: colour 0.62, shape 0.19 against chance 0.17 / 0.25; shape reaches
    ~0.98 after 1500 steps with more data)."""
    cfg = short_run["cfg"]
    examples = {e.uid: e for e in load_examples(cfg, "vqa", "val")}
    right = defaultdict(list)
    for line in (short_run["out"] / "predictions" / "vqa.jsonl").read_text().splitlines():
        p = json.loads(line)
        e = examples[p["uid"]]
        right[e.extra["qtype"]].append(p["prediction"] == e.target)
    acc = sum(right["color"]) / len(right["color"])
    assert acc > 2.5 / len(ANSWER_SPACES["color"]), acc


@pytest.mark.xfail(strict=True, reason="known gap: NLVR2 (like VQA's yes/no and counting questions) needs "
                                       "aggregation over objects, which the seq2seq model learns only after a "
                                       "500-1,000-step loss plateau of such questions alone (benchmarks/"
                                       "aggregation_probe.py); a short multi-task run does not leave it")
def test_short_run_beats_the_nlvr2_baseline(short_run):
    score, base = _score_and_baseline(short_run, "nlvr2")
    assert score > base + 0.05, f"nlvr2: {score:.3f} vs text-only baseline {base:.3f}"
