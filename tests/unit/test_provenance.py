"""vlscale.provenance: what run_summary.json and adapter_config.json record of how a run was made."""

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    (tmp_path / "site-packages").mkdir()  # a wheel installed in a venv inside some checkout: not its commit
    assert provenance.git_state(tmp_path / "site-packages") is None


def test_versions_name_each_library_and_null_for_one_not_installed(monkeypatch):
    assert list(provenance.versions()) == ["python", "torch", "cuda", "transformers", "deepspeed", "open_clip",
                                           "safetensors", "numpy", "vlscale"]
    monkeypatch.setitem(provenance.DISTRIBUTIONS, "absent", "vlscale-no-such-distribution")
    assert provenance.versions()["absent"] is None


def test_real_data_files_are_fingerprinted(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "gqa", tmp_path / "gqa")
    shutil.copytree(FIXTURES / "tvc", tmp_path / "tvc")
    def names(files):
        return [Path(f["path"]).relative_to(tmp_path).as_posix() for f in files]

    video = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "tasks": ["tvc"]}})
    assert names(provenance.data_files(video)) == ["tvc/train.jsonl", "tvc/val.jsonl", "tvc/subtitles.jsonl"]
    (tmp_path / "tvc" / "subtitles.jsonl").unlink()  # none: the run reads none
    assert names(provenance.data_files(video)) == ["tvc/train.jsonl", "tvc/val.jsonl"]
    cfg = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "tasks": ["gqa"]}})
    dist = distributed.DistInfo(0, 2, 0, torch.device("cpu"), "cpu", "gloo")
    segment = provenance.provenance(cfg, dist, ["cpu: x", "cpu: x"])
    assert (segment["world_size"], segment["devices"]) == (2, {"cpu: x": 2})
    assert segment["argv"] == [sys.executable, *sys.argv] and "launcher_argv" in segment
    files = segment["data_files"]
    assert names(files) == ["gqa/train.json", "gqa/valid.json"]
    st = (tmp_path / "gqa" / "train.json").stat()
    assert (files[0]["size"], files[0]["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    (tmp_path / "gqa" / "train.json").write_text((tmp_path / "gqa" / "train.json").read_text() + " ")
    again = provenance.data_files(cfg)
    assert again[0]["sha256"] != files[0]["sha256"] and again[1:] == files[1:]  # a replaced file shows
    cfg.train.test_eval = True
    assert names(provenance.data_files(cfg))[-1] == "gqa/testdev.json"
    assert provenance.data_files(load_config("tiny")) is None  # the synthetic world: its seed is in the settings
    hf = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "hf_dataset": "org/name"}})
    assert provenance.data_files(hf) is None  # its name is in the settings
    shutil.copytree(FIXTURES / "coco", tmp_path / "coco")
    caption = load_config("tiny", {"data": {"source": "real", "root": str(tmp_path), "tasks": ["caption"]}})
    assert names(provenance.data_files(caption)) == ["coco/dataset_coco.json"]  # train and val: one file, once
    monkeypatch.chdir(tmp_path)  # a relative path is recorded absolute
    assert provenance.file_fingerprint("gqa/valid.json")["path"] == str((tmp_path / "gqa" / "valid.json").resolve())


def test_a_resume_adds_a_segment_only_where_it_differs():
    first = {"versions": {"torch": "2.1.0"}, "git": None, "argv": ["train.py"], "world_size": 2}
    again = dict(first, argv=["train.py", "--resume"])
    assert provenance.with_resumed([first], again, 4) == [first]
    other = dict(again, versions={"torch": "2.2.0"})
    assert provenance.with_resumed([first], other, 4) == [first, {**other, "from_step": 4}]
    assert provenance.with_resumed(None, again, 4) == [{**again, "from_step": 4}]  # a checkpoint of before this
    # compared with the last segment, not the first; another launcher command line is no new segment either
    resumed = [first, {**other, "from_step": 4}]
    assert provenance.with_resumed(resumed, dict(other, launcher_argv=["torchrun", "t.py"]), 6) == resumed


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
    assert provenance.print_version_note({"provenance": [{"versions": {"python": "3.11"}}]}, "x") is None  # unsaid
    assert provenance.print_version_note({"provenance": [*old["provenance"], {"versions": now}]}, "x") is None  # the
    # last segment's versions trained the adapter's weights (a resume under this version)


def test_launcher_argv_only_under_a_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "0")  # a 1-rank group's own RANK: the DistInfo says no launcher
    assert provenance.launcher_argv(False) is None
    if not Path("/proc/self/cmdline").exists():
        return
    # the parent's command line (torchrun's, deepspeed's), an empty argument kept; None once it cannot be read
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "", "é"])
    try:
        monkeypatch.setattr(os, "getppid", lambda: parent.pid)
        for _ in range(500):  # its cmdline can read empty for a moment after the exec here
            if Path(f"/proc/{parent.pid}/cmdline").read_bytes():
                break
            time.sleep(0.002)
        assert provenance.launcher_argv(True) == [sys.executable, "-c", "import time; time.sleep(60)", "", "é"]
    finally:
        parent.kill()
        parent.wait()
    assert provenance.launcher_argv(True) is None  # no /proc entry


def test_device_names(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"NVIDIA H100 ({device})")
    assert provenance.device_name(torch.device("cuda", 1)) == "NVIDIA H100 (cuda:1)"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "processor\t: 0\nmodel name\t: Some CPU @ 2GHz\n")
    assert provenance.device_name(torch.device("cpu")) == "cpu: Some CPU @ 2GHz"

    def no_proc(self, *a, **k):
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", no_proc)  # macOS: no /proc
    assert provenance.device_name(torch.device("cpu")) == "cpu: " + (platform.processor() or platform.machine())


def test_a_data_file_gone_since_it_was_read_is_recorded_not_a_traceback(tmp_path):
    gone = tmp_path / "val.json"
    assert provenance.file_fingerprint(gone) == {"path": str(gone.resolve()), "error": "No such file or directory"}
    gone.mkdir()  # unreadable as a file
    assert provenance.file_fingerprint(gone)["error"] == "Is a directory"
