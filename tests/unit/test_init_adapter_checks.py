"""train.init_adapter's checks that need no trained adapter: what a warm start says of a custom task declared
otherwise than in the adapter's run (vlscale.engine.checkpoint.redeclared_tasks_note)."""

import shutil
from pathlib import Path

import pytest

from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
TINY = ["model.vision=tiny-clip-rn", "model.vision_pretrained=null", "model.feature_source=images"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_root")
    shutil.copytree(REAL / "vqa", root / "vqa")
    shutil.copytree(REAL / "vqa", root / "okvqa")
    return root


def warm(root, declared: str, tasks="[vqa,okvqa]"):
    return load_config("tiny", [*TINY, "data.source=real", f"data.root={root}", f"data.tasks={tasks}",
                                f"data.custom_tasks={declared}", "train.init_adapter=runs/a/adapter"])


def meta(custom_tasks: dict) -> dict:
    return {"run_config": {"data": {"tasks": ["vqa", *custom_tasks], "custom_tasks": custom_tasks}}}


def test_a_custom_task_declared_otherwise_than_in_the_adapters_run_is_said(root):
    """Another prefix (the default '<name>:' is the declaration's too) or another like: allowed (a prompt ablation
    from trained weights), and said naming the task, the key and both values."""
    then = meta({"okvqa": {"like": "vqa"}})
    assert ckpt.redeclared_tasks_note(warm(root, "{okvqa: {like: vqa, prefix: 'okvqa:'}}"), then) is None
    assert ckpt.redeclared_tasks_note(warm(root, "{okvqa: {like: vqa}}", "[vqa]"), then) is None  # not trained now
    note = ckpt.redeclared_tasks_note(warm(root, "{okvqa: {like: vqa, prefix: 'outside knowledge:'}}"), then)
    assert note == ("train.init_adapter='runs/a/adapter': data.custom_tasks.okvqa's prefix is 'outside knowledge:' "
                    "here, 'okvqa:' in the adapter's run (its weights were trained on the other inputs; allowed, as "
                    "another data.* setting is)")
    note = ckpt.redeclared_tasks_note(warm(root, "{okvqa: {like: gqa}}"), then)
    assert "data.custom_tasks.okvqa's like is 'gqa' here, 'vqa' in the adapter's run" in note


def test_provenance_records_a_relative_adapter_folder_as_an_absolute_path(tmp_path, monkeypatch):
    import hashlib

    from vlscale.provenance import init_adapter

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ckpt.ADAPTER_WEIGHTS).write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    record = init_adapter("a", {"step": 7})
    assert record["path"] == str((tmp_path / "a").resolve()) and record["step"] == 7 and record["size"] == 7
    assert record["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_an_adapter_per_task_refuses_a_run_of_none_of_its_tasks(tmp_path):
    """Its per-task weights are found by the adapter's tasks (a run of [caption] names none of vqa, gqa)."""
    from vlscale.data import build_tokenizer
    from vlscale.modeling.vl_model import build_model

    cfg = load_config("tiny", [*TINY, "peft.sharing=multiple", "data.tasks=[vqa,gqa]"])
    tokenizer = build_tokenizer(cfg)
    ckpt.save_adapter(build_model(cfg, vocab_size=len(tokenizer)), tmp_path / "multi", cfg, tokenizer=tokenizer)
    other = load_config("tiny", [*TINY, "peft.sharing=multiple", "data.tasks=[caption]",
                                 f"train.init_adapter={tmp_path / 'multi'}"])
    with pytest.raises(ckpt.CheckpointError, match=r"\['caption'\] only in this run \(no weights to start from\)"):
        ckpt.check_init_adapter(other)
