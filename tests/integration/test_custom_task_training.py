"""A custom task trained beside the built-in it is like (data.custom_tasks: okvqa like vqa, read from its own
folder, a copy of the real-format fixtures' vqa/ with COCO's images in okvqa/images/): one process, per-task
adapters (peft.sharing=multiple), 3 steps evaluated at steps 2 and 3. The adapter holds okvqa's own weights,
metrics.json scores both tasks at each evaluation, and launchers/evaluate.py on the saved adapter (whose
adapter_config.json carries the declaration) reproduces the run's final predictions and scores;
launchers/predict.py answers as okvqa."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"


@pytest.fixture(scope="module")
def run(tmp_path_factory, h):
    base = tmp_path_factory.mktemp("custom_tasks")
    root = base / "data"
    for name in ("vqa", "coco"):
        shutil.copytree(REAL / name, root / name)
    shutil.copytree(REAL / "vqa", root / "okvqa")
    shutil.copytree(REAL / "coco" / "images", root / "okvqa" / "images")
    out = base / "run"
    h.launch(h.TINY + ["data.source=real", f"data.root={root}", "data.tasks=[vqa,okvqa]",
                       "data.custom_tasks={okvqa: {like: vqa}}", "peft.sharing=multiple", "train.micro_batch_size=2",
                       "train.max_steps=3", "train.eval_every=2", "train.zero_stage=0", f"output_dir={out}"])
    return root, out


def predictions(folder: Path, task: str) -> list:
    return [(r["uid"], r["prediction"]) for r in map(json.loads, (folder / f"{task}.jsonl").read_text().splitlines())]


def test_the_custom_task_trains_its_own_adapters_and_is_evaluated_beside_vqa(run):
    _, out = run
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    own = [k for k in keys if k.endswith("_okvqa")]
    assert own and len(own) == len([k for k in keys if k.endswith("_vqa")])
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["run_config"]["data"]
    assert saved["custom_tasks"] == {"okvqa": {"like": "vqa"}} and saved["tasks"] == ["vqa", "okvqa"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [2, 3]
    assert all(set(m["tasks"]) == {"vqa", "okvqa"} and "vqa_score" in m["tasks"]["okvqa"] for m in metrics)
    assert {json.loads(line)["task"] for line in (out / "train_log.jsonl").read_text().splitlines()} <= {"vqa", "okvqa"}


def test_evaluate_on_the_saved_adapter_reproduces_the_scores(run, launcher, tmp_path):
    root, out = run
    assert launcher("evaluate").main(["--adapter", str(out / "adapter"), "--split", "val", "--out",
                                      str(tmp_path / "eval"), "--no-progress"]) == 0
    final = json.loads((out / "metrics.json").read_text())[-1]["tasks"]
    assert json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["tasks"] == final
    for task in ("vqa", "okvqa"):
        assert predictions(tmp_path / "eval" / "predictions", task) == predictions(out / "predictions", task)


def test_predict_answers_as_the_custom_task(run, launcher, capsys):
    root, out = run
    image = root / "okvqa" / "images" / "COCO_val2014_000000000073.jpg"
    assert launcher("predict").main(["--adapter", str(out / "adapter"), "--task", "okvqa", "--image", str(image),
                                     "--text", "what is this?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "okvqa"


def test_a_warm_start_with_the_tasks_in_another_order_and_another_prefix_says_so(run, h, tmp_path):
    """From the run's per-task adapter: okvqa and vqa in the other order (allowed: the same tasks), okvqa with
    another prefix (allowed, said at start-up naming both), one step."""
    root, out = run
    proc = h.launch(h.TINY + ["data.source=real", f"data.root={root}", "data.tasks=[okvqa,vqa]",
                              "data.custom_tasks={okvqa: {like: vqa, prefix: 'outside knowledge:'}}",
                              "peft.sharing=multiple", "train.micro_batch_size=2", "train.max_steps=1",
                              "train.eval_every=0", "train.zero_stage=0", f"train.init_adapter={out / 'adapter'}",
                              f"output_dir={tmp_path / 'warm'}"])
    assert (f"vlscale: note: train.init_adapter={str(out / 'adapter')!r}: data.custom_tasks.okvqa's prefix is "
            "'outside knowledge:' here, 'okvqa:' in the adapter's run") in proc.stdout, proc.stdout[-3000:]
