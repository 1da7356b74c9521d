"""launchers/predict.py refuses what an adapter cannot answer in one line, before the model is built: an unknown
task or one it was not trained on (naming the tasks it was), a video task, the wrong number of images, a question
task without text, a caption with text, a missing or unreadable image. (The answers themselves:
tests/integration/test_predict.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlscale.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def adapter(monkeypatch, tmp_path):
    """An adapter of vqa and nlvr2 with one set of modules per task (only its config is read: nothing is built)."""
    from vlscale.engine import checkpoint
    from vlscale.modeling import vl_model

    saved = load_config("tiny", ["data.tasks=[vqa,nlvr2]", "peft.sharing=multiple"]).to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved, "vocab_size": 1})
    monkeypatch.setattr(vl_model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqa2", "--image", "{a}", "--text", "q?"], "unknown task 'vqa2'; this adapter was trained on "
                                                           "['vqa', 'nlvr2']"),
    (["--task", "gqa", "--image", "{a}", "--text", "q?"], "the adapter was not trained on task 'gqa' and has no "
                                                          "weights for it; it was trained on ['vqa', 'nlvr2']"),
    (["--task", "tvqa", "--image", "{a}", "--text", "q?"], "task 'tvqa' is a video task; prediction takes images: "
                                                           "the image tasks this adapter was trained on are "
                                                           "['vqa', 'nlvr2']"),
    (["--task", "nlvr2", "--image", "{a}", "--text", "s."], "task 'nlvr2' takes 2 image(s) per question, got 1"),
    (["--task", "vqa", "--image", "{a}", "--image", "{a}", "--text", "q?"],
     "task 'vqa' takes 1 image(s) per question, got 2"),
    (["--task", "vqa", "--image", "{a}"], "task 'vqa' needs a text (the question or statement), got ''"),
    (["--task", "vqa", "--image", "{dir}/none.jpg", "--text", "q?"], "--image {dir}/none.jpg: no such file"),
    (["--task", "vqa", "--image", "{dir}/bad.jpg", "--text", "q?"], "cannot read image {dir}/bad.jpg"),
])
def test_bad_input_is_refused_naming_it_before_the_model_is_built(adapter, launcher, argv, message):
    (adapter / "bad.jpg").write_bytes(b"not an image")
    argv = [a.format(a=adapter / "a.png", dir=adapter) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        launcher("predict").main(["--adapter", "unused", *argv])
    assert message.format(dir=adapter) in str(e.value)


def test_a_caption_takes_no_text(monkeypatch, adapter, launcher):
    from vlscale.engine import checkpoint

    saved = load_config("tiny").to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved, "vocab_size": 1})
    with pytest.raises(ValueError, match=r"task 'caption' takes no text \(the run's caption inputs are the prefix "
                                         r"'caption:' alone\), got 'a photo'"):
        launcher("predict").main(["--adapter", "unused", "--task", "caption", "--image", str(adapter / "a.png"),
                                  "--text", "a photo"])


def test_the_command_line_says_one_line(tmp_path):
    """Run as a script: the error is one line on stderr naming the file at fault, exit code 1."""
    done = subprocess.run([sys.executable, str(ROOT / "launchers" / "predict.py"), "--adapter", str(tmp_path / "nope"),
                           "--task", "vqa", "--image", "a.jpg", "--text", "q?"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"predict.py: CheckpointError: {tmp_path / 'nope'} does not exist (an adapter directory is a run's "
        f"output_dir/adapter)"]
