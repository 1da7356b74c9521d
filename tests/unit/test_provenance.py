"""vlscale.provenance: what run_summary.json and adapter_config.json record of how a run was made."""

import shutil
import subprocess
from pathlib import Path

import pytest

from vlscale import provenance
from vlscale.config import load_config
from vlscale.engine import distributed

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "real_data"


def test_git_state_is_null_outside_a_checkout_or_where_git_fails(tmp_path, monkeypatch):
    assert provenance.git_state(tmp_path) is None  # an installed wheel: no .git, no git call
    (tmp_path / ".git").mkdir()  # not a repository: git fails
    assert provenance.git_state(tmp_path) is None

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_state(provenance.CHECKOUT) is None


def test_git_state_of_a_checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("x")  # an output in the checkout does not make it dirty
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.py").write_text("a = 2\n")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": True}


def test_real_data_files_are_fingerprinted(tmp_path):
    shutil.copytree(FIXTURES / "gqa", tmp_path / "gqa")
    shutil.copytree(FIXTURES / "tvc", tmp_path / "tvc")
    def names(files):
        return [Path(f["path"]).relative_to(tmp_path).as_posix() for f in files]

    video = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "tasks": ["tvc"]}})
    assert names(provenance.data_files(video)) == ["tvc/train.jsonl", "tvc/val.jsonl", "tvc/subtitles.jsonl"]
    cfg = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "tasks": ["gqa"]}})
    files = provenance.provenance(cfg, 1, ["cpu: x"])["data_files"]
    assert names(files) == ["gqa/train.json", "gqa/valid.json"]
    assert files[0]["size"] == (tmp_path / "gqa" / "train.json").stat().st_size and files[0]["mtime_ns"] > 0
    (tmp_path / "gqa" / "train.json").write_text((tmp_path / "gqa" / "train.json").read_text() + " ")
    again = provenance.data_files(cfg)
    assert again[0]["sha256"] != files[0]["sha256"] and again[1:] == files[1:]  # a replaced file shows
    cfg.train.test_eval = True
    assert names(provenance.data_files(cfg))[-1] == "gqa/testdev.json"
    assert provenance.data_files(load_config("tiny")) is None  # the synthetic world: its seed is in the settings


def test_a_resume_adds_a_segment_only_where_it_differs():
    first = {"versions": {"torch": "2.1.0"}, "git": None, "argv": ["train.py"], "world_size": 2}
    again = dict(first, argv=["train.py", "--resume"])
    assert provenance.with_resumed([first], again, 4) == [first]
    other = dict(again, versions={"torch": "2.2.0"})
    assert provenance.with_resumed([first], other, 4) == [first, {**other, "from_step": 4}]
    assert provenance.with_resumed(None, again, 4) == [{**again, "from_step": 4}]  # a checkpoint of before this


def test_an_adapter_of_another_vlscale_or_torch_major_gets_a_note(capsys):
    now = provenance.versions()
    same = {"provenance": [{"versions": dict(now, torch=now["torch"].split(".")[0] + ".99")}]}
    assert provenance.print_version_note(same, "evaluate.py") is None  # a minor torch release: no note
    assert provenance.print_version_note({}, "evaluate.py") is None  # an adapter of before this record
    old = {"provenance": [{"versions": dict(now, vlscale="0.0.1", torch="1.13.1")}]}
    note = provenance.print_version_note(old, "evaluate.py")
    assert note == (f"evaluate.py: note: the adapter was trained with vlscale 0.0.1 (this is {now['vlscale']}) and "
                    f"torch 1.13.1 (this is {now['torch']})")
    assert capsys.readouterr().err == note + "\n"


def test_launcher_argv_only_under_a_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "_NO_LAUNCHER", True)  # set by a 1-rank group's own RANK
    assert provenance.launcher_argv() is None
    monkeypatch.setattr(distributed, "_NO_LAUNCHER", False)
    if Path("/proc/self/cmdline").exists():  # the parent's command line (torchrun's, deepspeed's)
        assert provenance.launcher_argv() and all(isinstance(a, str) for a in provenance.launcher_argv())
