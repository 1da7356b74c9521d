"""checkpoints/ is written atomically (vlscale.engine.checkpoint.save_checkpoint): a save that dies half
way leaves the previous checkpoint whole and still ``latest``; the next save, of any step, clears what
it left; the last ``keep`` checkpoints stay. One process, an engine that writes a file per tag (DeepSpeed's own
writing is the end-to-end tests'). And which resumes a checkpoint allows: its global batch, on any number of ranks."""

import contextlib
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from vlscale.engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


class FilesEngine:
    """Writes ``<dir>/<tag>/model_states.pt`` as DeepSpeed's save_checkpoint would; ``die`` makes the
    write stop half way with an error (a full disk, a killed process)."""

    def __init__(self):
        self.die = False
        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model_states.pt").write_bytes(b"half" if self.die else b"whole " + tag.encode())
        if self.die:
            raise OSError(28, "No space left on device")
        assert save_latest is False, "the 'latest' pointer is vlscale's to write, after the files"


def test_a_save_that_dies_leaves_the_previous_checkpoint(tmp_path):
    """A write that fails (a full disk) is one line naming the step, the reason and the folder; the
    previous checkpoint stays whole and ``latest``, and the half-written folder is removed."""
    engine, root = FilesEngine(), tmp_path / "checkpoints"
    assert ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, rank=0) == "step2"
    assert ckpt.latest_tag(root) == "step2"

    engine.die = True
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_checkpoint(engine, tmp_path, 4, {"step": 4}, rank=0)
    message = str(failed.value)
    assert message.startswith(f"the checkpoint at step 4 could not be written to {root} (No space left on device; ")
    assert f"the previous checkpoint {root / 'step2'} is intact (--resume continues from it)" in message
    assert "the temporary folder .tmp-step4 is removed" in message and "\n" not in message
    assert ckpt.latest_tag(root) == "step2"
    assert (root / "step2" / "model_states.pt").read_bytes() == b"whole step2"
    assert json.loads((root / "step2" / "client_state_rank0.json").read_text())["step"] == 2
    assert not (root / "step4").exists()
    assert ckpt.check_output_dir(tmp_path, resume=True, world_size=1) == "step2"
    assert not (root / ".tmp-step4").exists(), "the dead save's half-written folder is removed"

    # what a save killed outright leaves (no exception handler ran): cleared by the next save
    (root / ".tmp-step4" / "step4").mkdir(parents=True)
    (root / ".tmp-step4" / "step4" / "model_states.pt").write_bytes(b"half")
    engine.die = False
    for step in (6, 8):  # not step 4 again: the leftover must go all the same (it is a whole checkpoint's size)
        ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, rank=0, keep=2)
    assert ckpt.latest_tag(root) == "step8"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step6", "step8"]
    assert (root / "step8" / "model_states.pt").read_bytes() == b"whole step8"


def test_the_same_tensors_and_metadata_give_the_same_file(tmp_path):
    """safetensors writes its metadata in a hash map's order, another at each save: two runs of the same weights
    wrote adapter files of other bytes (sha256)."""
    from safetensors import safe_open

    from vlscale.files import save_safetensors

    meta = {"format": ckpt.ADAPTER_FORMAT, "step": "30", "z": "\u00e9/\n"}
    files = {save_safetensors({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, tmp_path / f"{i}.safetensors",
                              metadata=meta).read_bytes() for i in range(10)}
    assert len(files) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), torch.arange(3.0))
    meta = {"format": ckpt.ADAPTER_FORMAT, "step": "30"}  # an adapter's two keys, given in either order
    files = {save_safetensors({"a": torch.ones(2)}, tmp_path / f"{i}.safetensors", metadata=dict(items)).read_bytes()
             for i, items in enumerate([list(meta.items())] * 5 + [list(meta.items())[::-1]] * 5)}
    assert len(files) == 1


def test_a_safetensors_header_of_another_layout_is_left_as_written(tmp_path):
    """_sort_metadata rewrites the metadata in place only where the header's first bytes read back as the same
    keys and values: another layout (the tensors first, other values) is left as the library wrote it."""
    from vlscale.files import _sort_metadata

    meta = {"step": "30", "format": "x"}
    for first in ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": meta},
                  {"__metadata__": {"step": "31", "format": "x"}}):
        header = json.dumps(first, separators=(",", ":")).encode()
        raw = len(header).to_bytes(8, "little") + header + bytes(4)
        (tmp_path / "f").write_bytes(raw)
        _sort_metadata(tmp_path / "f", meta)
        assert (tmp_path / "f").read_bytes() == raw


def test_a_checkpoint_is_on_disk_before_latest_names_it(tmp_path, monkeypatch):
    """``latest`` was written with write_text and renamed over the old one with no fsync, and the checkpoint's
    files were renamed into place unflushed: after a power loss the page cache's rename could survive without the
    bytes, leaving ``latest`` empty or naming a folder of empty files. Now every file is flushed before its rename
    and the folder after it; a crash before ``latest``'s rename leaves the old ``latest``."""
    engine, root = FilesEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, rank=0)
    events, real_fsync, real_replace, pointer_text = [], os.fsync, os.replace, []

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        if Path(dst).name == ckpt.LATEST:
            pointer_text.append(Path(src).read_text())
            raise KeyboardInterrupt  # the process dies before latest's rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(engine, tmp_path, 4, {"step": 4}, rank=0)
    monkeypatch.undo()
    assert ckpt.latest_tag(root) == "step2"
    assert (root / "step4" / "model_states.pt").read_bytes() == b"whole step4"

    def when(event):
        assert event in events, f"{event} not in {events}"
        return events.index(event)

    moved = when(("replace", str(root / ".tmp-step4" / "step4"), str(root / "step4")))
    for name in ("model_states.pt", "client_state_rank0.json"):
        assert when(("fsync", str(root / ".tmp-step4" / "step4" / name))) < moved
    pointer = next(e for e in events if e[0] == "replace" and e[2] == str(root / ckpt.LATEST))
    assert pointer_text == ["step4"] and Path(pointer[1]).parent == root  # the new pointer, written beside latest
    assert moved < when(("fsync", str(root))) < when(("fsync", pointer[1])) < events.index(pointer)

    ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6}, rank=0)  # the next save goes through
    assert ckpt.latest_tag(root) == "step6"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step4", "step6"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    """A resumed run that reaches a step it had saved before (Ctrl-C at step k, resumed, saved at k
    again on a later stop) replaces that folder as a whole."""
    engine, root = FilesEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3, "run": "first"}, rank=0)
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3, "run": "second"}, rank=0)
    assert ckpt.latest_tag(root) == "step3"
    assert json.loads((root / "step3" / "client_state_rank0.json").read_text())["run"] == "second"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step3"]


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_its_own_last_ones(tmp_path):
    """Step 6's checkpoint cannot be resumed and ``latest`` is pointed back at step 4 (as the refusal says to); the
    resumed run saves step 5 on a stop: kept are steps 4 and 5, its own last two, not step 6 of the abandoned
    line in place of step 4 (step 6 stays until the run saves that step again)."""
    engine, root = FilesEngine(), tmp_path / "checkpoints"
    for step in (4, 6):
        ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, rank=0, keep=2)
    (root / "latest").write_text("step4")
    ckpt.save_checkpoint(engine, tmp_path, 5, {"step": 5}, rank=0, keep=2)
    assert ckpt.latest_tag(root) == "step5"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step4", "step5", "step6"]
    ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6, "run": "resumed"}, rank=0, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step5", "step6"]
    assert json.loads((root / "step6" / "client_state_rank0.json").read_text())["run"] == "resumed"


def _written_by(root, ranks: int, micro: int, accum: int = 1):
    """A checkpoint folder as ``ranks`` ranks leave it: one client state each, with the loader's state."""
    folder = root / "checkpoints" / "step4"
    folder.mkdir(parents=True)
    for r in range(ranks):
        state = {"step": 4, "loader": {"step": 4, "micro_index": 0, "world_size": ranks, "accum": accum,
                                       "sampler": {"global_batch_size": ranks * micro * accum, "position": 4}}}
        (folder / f"client_state_rank{r}.json").write_text(json.dumps(state))
    (root / "checkpoints" / "latest").write_text("step4")


@pytest.mark.parametrize("world, batch, ok", [(2, 8, True), (1, 8, True), (4, 8, True), (1, 4, False),
                                               (2, 16, False)])
def test_resume_needs_the_global_batch_on_any_number_of_ranks(tmp_path, world, batch, ok):
    """Written by 2 ranks x micro-batch 4: a resume with the same global batch (8) goes on any number
    of ranks; another global batch is refused (it would change the data order), naming settings that
    keep it."""
    _written_by(tmp_path, ranks=2, micro=4)
    if ok:
        assert ckpt.check_output_dir(tmp_path, True, world, batch) == "step4"
        return
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_output_dir(tmp_path, True, world, batch)
    msg = str(e.value)
    assert "written by 2 ranks with a global batch of 8 (2 ranks x micro-batch 4 x accumulation 1)" in msg
    assert f"global batch of {batch}" in msg
    assert f"train.micro_batch_size={8 // world} train.gradient_accumulation_steps=1" in msg


def test_written_bytes_attributes_deepspeeds_files_to_their_rank(tmp_path):
    """DeepSpeed's names: rank 0's module state (stage 0-2), each rank's ZeRO files, with the bf16
    optimizer's ``bf16_`` prefix too, and vlscale's client state per rank."""
    files = {"mp_rank_00_model_states.pt": (0, 10), "zero_pp_rank_1_mp_rank_00_model_states.pt": (1, 3),
             "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": (0, 7),
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": (1, 5)}
    for name, (_, n) in files.items():
        torch.save({"state": {"exp_avg": torch.zeros(n)}, "step": 4}, tmp_path / name)
    for r in (0, 1):
        (tmp_path / f"client_state_rank{r}.json").write_text("{}")
    written = ckpt.written_bytes(tmp_path)
    assert written["tensors"] == [4 * (10 + 7), 4 * (3 + 5)]
    sizes = [sum((tmp_path / n).stat().st_size for n, (r, _) in files.items() if r == rank) + 2 for rank in (0, 1)]
    assert written["files"] == sizes


def test_a_run_whose_output_dir_cannot_hold_its_checkpoints_is_refused(tmp_path, monkeypatch):
    """Before the model is built (trainer.setup_run), not at the first save: the need is the profiler's
    (three checkpoints at once for a run that saves five times, two copies of adapter/), with 5 %
    margin; a resume needs the next checkpoint only."""
    import shutil
    from collections import namedtuple

    from vlscale.config import load_config
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.analytic import default_vocab_size, estimate_checkpoint

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "not" / "yet" / "run"  # the nearest existing folder's file system is asked
    cfg = load_config("tiny", [f"output_dir={out}", "train.max_steps=10", "train.save_every=2"])
    ds = build_deepspeed_config(root / "ds_configs" / "zero3.json", cfg, 2, device_type="cpu")
    vocab = default_vocab_size(cfg)
    disk = estimate_checkpoint(cfg, 2, ds, vocab_size=vocab)
    need = 3 * disk.total + 2 * disk.adapter
    asked = []
    usage = namedtuple("usage", "total used free")

    def free(n):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(Path(p)) or usage(10 ** 15, 0, n))

    free(int(need * 1.06))
    trainer.check_disk_space(cfg, ds, 2, vocab, out)
    assert asked[-1] == tmp_path
    free(need)
    with pytest.raises(ckpt.CheckpointError) as refused:
        trainer.check_disk_space(cfg, ds, 2, vocab, out)
    message = str(refused.value)
    assert f"output_dir {str(out)!r}" in message and "3 checkpoint(s)" in message and "5 save(s)" in message
    trainer.check_disk_space(cfg, ds, 2, vocab, out, resume=True)  # the kept checkpoints are on disk already


def test_a_run_that_saves_once_needs_room_for_one_checkpoint(tmp_path, monkeypatch):
    """Fewer saves than the checkpoints kept + 1 (CHECKPOINTS_KEPT): the run never holds more checkpoints than it
    writes."""
    import shutil
    from collections import namedtuple

    from vlscale.config import load_config
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.analytic import default_vocab_size, estimate_checkpoint

    root = Path(__file__).resolve().parents[2]
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_every=2"])
    ds = build_deepspeed_config(root / "ds_configs" / "zero3.json", cfg, 2, device_type="cpu")
    vocab = default_vocab_size(cfg)
    disk = estimate_checkpoint(cfg, 2, ds, vocab_size=vocab)
    assert disk.kept + 1 > 1
    usage = namedtuple("usage", "total used free")
    need = disk.total + 2 * disk.adapter
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 15, 0, int(need * 1.06)))
    trainer.check_disk_space(cfg, ds, 2, vocab, tmp_path / "run")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 15, 0, need))
    with pytest.raises(ckpt.CheckpointError, match=r"1 checkpoint\(s\) of .* at once \(1 save\(s\)"):
        trainer.check_disk_space(cfg, ds, 2, vocab, tmp_path / "run")


@pytest.mark.parametrize("max_steps, save_every, saves", [(3, 2, 2), (7, 3, 3), (3, 4, 1), (3, 0, 1)])
def test_the_disk_check_counts_the_save_at_the_end_of_a_run_off_the_save_schedule(tmp_path, monkeypatch, max_steps,
                                                                                    save_every, saves):
    """The loop saves every train.save_every steps and at the end (trainer.train): 3 steps saving every 2 save at
    steps 2 and 3, every 4 (or never) at step 3 only; the check counts the same saves, and room for as many
    checkpoints at once (up to the kept ones + the one written)."""
    import shutil
    from collections import namedtuple

    from vlscale.config import load_config
    from vlscale.engine import trainer
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.analytic import default_vocab_size, estimate_checkpoint

    root = Path(__file__).resolve().parents[2]
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"train.max_steps={max_steps}",
                               f"train.save_every={save_every}"])
    ds = build_deepspeed_config(root / "ds_configs" / "zero3.json", cfg, 2, device_type="cpu")
    vocab = default_vocab_size(cfg)
    disk = estimate_checkpoint(cfg, 2, ds, vocab_size=vocab)
    held = min(saves, disk.kept + 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10 ** 15, 0, 0))
    with pytest.raises(ckpt.CheckpointError, match=rf"needs about .*: {held} checkpoint\(s\) of .* at once "
                                                   rf"\({saves} save\(s\), {disk.kept} kept"):
        trainer.check_disk_space(cfg, ds, 2, vocab, tmp_path / "run")


def test_one_run_per_output_dir_and_no_run_overwrites_another(tmp_path, monkeypatch):
    """A second run (or a resume) in an output_dir another run is using is refused, naming its pid;
    a finished run's adapter/ or step folders are not overwritten when its checkpoint's 'latest' is gone."""
    import os

    held = ckpt.lock_output_dir(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match=rf"is in use by another vlscale run \(pid {os.getpid()} on "):
        ckpt.lock_output_dir(tmp_path / "run")
    held.close()
    ckpt.lock_output_dir(tmp_path / "run").close()  # free again

    done = tmp_path / "done"
    (done / "adapter").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match=r"holds another run's \['adapter'\]"):
        ckpt.check_output_dir(done, resume=False)
    (done / "checkpoints" / "step9").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match=r"no 'latest' file\); it holds \['step9'\]: write the one"):
        ckpt.check_output_dir(done, resume=True)
    assert ckpt.check_output_dir(tmp_path / "fresh", resume=False) is None
    # a relative output_dir that is not there (resumed from another folder): named with the working directory, not
    # "no checkpoint ...; drop --resume to start a new run", which would start the run again elsewhere
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"--resume: output_dir 'runs/a' does not exist (read from the working directory {tmp_path}: run from the "
            f"folder it is relative to, or give its absolute path); give the run's output_dir (output_dir=...), or "
            f"drop --resume to start a new run") + "$"):
        ckpt.check_output_dir("runs/a", resume=True)


def test_an_output_dir_another_run_is_writing_is_refused_as_such_before_start(tmp_path, launcher):
    """A start into the output_dir of a run still training was told "already holds a run's checkpoint ...; pass
    --resume to continue it" (the checkpoint the other run is writing), and a --resume before its first save "no
    checkpoint to resume ...; drop --resume to start a new run": each hint, followed, met the lock after start-up.
    The lock is looked at first, before start-up; looking neither takes it nor makes the file."""
    import os

    from vlscale.config import load_config

    out = tmp_path / "run"
    train = launcher("train")
    cfg = load_config("tiny", [f"output_dir={out}"])
    held = ckpt.lock_output_dir(out)
    in_use = f"CheckpointError: output_dir '{out}' is in use by another vlscale run (pid {os.getpid()} on "
    assert train.refused_before_start(cfg, True, "ds_configs/zero3.json").startswith(in_use)  # before its first save
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / ckpt.LATEST).write_text("step2")
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json").startswith(in_use)
    held.close()
    assert "already holds a run's checkpoint" in train.refused_before_start(cfg, False, "ds_configs/zero3.json")
    ckpt.lock_output_dir(out).close()  # the looks left it free
    assert ckpt.lock_holder(tmp_path / "fresh") is None and not (tmp_path / "fresh").exists()


def test_an_output_dir_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch, launcher):
    """An existing output_dir the run cannot write in (chmod 500 for a non-root user, a read-only mount) was an
    OSError traceback from the lock file on rank 0, and a gloo "Connection closed by peer" on the other ranks
    (the error escaped before rank 0's refusal is shared). It is refused on every rank once the process group is
    up (train.output_dir_refused), before the model's build, and the lock's
    failure is a CheckpointError naming the folder (shared with every rank by setup_run)."""
    from vlscale.config import load_config

    out = tmp_path / "run"
    (out / ckpt.LOCK_FILE).mkdir(parents=True)  # unopenable even for root, who passes chmod 500
    with pytest.raises(ckpt.CheckpointError, match=rf"output_dir '{out}' cannot be written: Is a directory"):
        ckpt.lock_output_dir(out)

    cfg = load_config("tiny", [f"output_dir={tmp_path / 'ro'}"])
    (tmp_path / "ro").mkdir()
    train = launcher("train")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path / "ro")
                        else real_access(path, mode))
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") is None  # made after the port is bound
    refusal = train.output_dir_refused(cfg.output_dir)
    assert refusal == (f"CheckpointError: output_dir '{tmp_path / 'ro'}' cannot be written (its permissions, or a "
                       f"read-only file system); make it writable or choose another output_dir (output_dir=...)")
    # a symbolic link to nothing (a purged scratch folder) in the way: the OS's reason was "File exists"
    (tmp_path / "runs").symlink_to(tmp_path / "purged")
    out = tmp_path / "runs" / "a"
    refusal = train.output_dir_refused(load_config("tiny", [f"output_dir={out}"]).output_dir)
    assert refusal == (f"FileExistsError: output_dir '{out}' cannot be created: {tmp_path / 'runs'} is a symbolic "
                       f"link to {tmp_path / 'purged'}, which does not exist")
    from vlscale.files import out_problem

    assert out_problem(tmp_path / "runs" / "a").startswith(f"--out {tmp_path / 'runs' / 'a'} cannot be created or "
                                                           f"written: {tmp_path / 'runs'} is a symbolic link to ")
    # the folder itself a link to nothing, named as the link says (relative); a link to a folder there is no problem
    from vlscale.files import dangling_link

    (tmp_path / "rel").symlink_to("purged")
    (tmp_path / "fine").symlink_to(tmp_path)
    assert dangling_link(tmp_path / "rel") == f"{tmp_path / 'rel'} is a symbolic link to purged, which does not exist"
    assert dangling_link(tmp_path / "fine" / "a") is None


def test_more_ranks_than_gpus_is_refused_in_one_line_before_start(monkeypatch, launcher):
    """torchrun --nproc_per_node 8 (or deepspeed --num_gpus 8) on 4 GPUs: ranks 4-7 were a CUDA "invalid device
    ordinal" traceback from DeepSpeed's set_device, after the process group started."""
    from vlscale.config import load_config

    for name, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "5"), ("DS_ACCELERATOR", "cuda"),
                        ("CUDA_VISIBLE_DEVICES", "0,1,2,3")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launcher("train").refused_before_start(load_config("tiny"), False, "ds_configs/zero3.json") == (
        "LOCAL_RANK=5 needs a GPU cuda:5, but this machine shows 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3): start at "
        "most 4 rank(s) on it (deepspeed --num_gpus 4, torchrun --nproc_per_node 4)")
    from vlscale.engine.distributed import local_gpu_problem

    monkeypatch.setenv("LOCAL_RANK", "4")  # the first past the last
    assert local_gpu_problem().startswith("LOCAL_RANK=4 needs a GPU cuda:4, but this machine shows 4 GPU(s)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the reason it shows none
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "shows 0 GPU(s) (CUDA_VISIBLE_DEVICES=):" in local_gpu_problem()
    monkeypatch.delenv("RANK")  # no launcher: the run takes cuda:LOCAL_RANK all the same
    assert local_gpu_problem().startswith("LOCAL_RANK=4 needs a GPU cuda:4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_gpu_problem() is None
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # ranks on the CPU take no GPU
    assert local_gpu_problem() is None


def test_a_data_root_or_annotation_file_not_there_is_refused_before_start(tmp_path, monkeypatch, launcher):
    """data.root, and each task's train and val annotation files (test's with train.test_eval), are checked before
    the process group and DeepSpeed start: they were found about 10 s in, by the train loader and the eval check."""
    from vlscale.config import load_config

    train = launcher("train")
    monkeypatch.chdir(tmp_path)
    out = f"output_dir={tmp_path / 'run'}"
    cfg = load_config("tiny", [out, "data.source=real", "data.root=nowhere", "data.tasks=[gqa]"])
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") == (
        f"DataError: split 'train' not found for gqa: data.root='nowhere' is not a directory (read from the working "
        f"directory {tmp_path}: run from the folder it is relative to, or give its absolute path); give data.root=DIR, "
        f"the folder the datasets are in (layout: docs/datasets.md)")
    gqa = tmp_path / "data" / "gqa"
    gqa.mkdir(parents=True)
    (gqa / "train.json").write_text("[]")
    cfg = load_config("tiny", [out, "data.source=real", f"data.root={tmp_path / 'data'}", "data.tasks=[gqa]"])
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json").startswith(
        f"DataError: split 'val' not found for gqa: gqa val annotations: {gqa / 'valid.json'}")
    (gqa / "valid.json").write_text("[]")
    with_test = load_config("tiny", [out, "data.source=real", f"data.root={tmp_path / 'data'}", "data.tasks=[gqa]",
                                     "train.test_eval=true"])
    assert train.refused_before_start(with_test, False, "ds_configs/zero3.json").startswith(
        f"DataError: split 'test' not found for gqa: gqa test annotations: {gqa / 'testdev.json'}")
    assert not (tmp_path / "run").exists()  # each refused before the output_dir is made
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") is None


def test_a_resume_told_to_stop_at_a_step_already_done_is_refused(tmp_path, monkeypatch, launcher):
    """--resume --stop-after-steps K with the checkpoint at step K or later trained on to train.max_steps (the
    loop never met step K), as K < 1 did: refused before start-up, naming the checkpoint's step."""
    from vlscale.config import load_config

    out = tmp_path / "run"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / ckpt.LATEST).write_text("step2")
    monkeypatch.setattr(ckpt, "check_output_dir", lambda *a, **k: "step2")  # a resumable checkpoint at step 2
    cfg = load_config("tiny", [f"output_dir={out}", "train.max_steps=4"])
    train = launcher("train")
    for k in (1, 2):
        assert train.refused_before_start(cfg, True, "ds_configs/zero3.json", k) == (
            f"--stop-after-steps {k}: the checkpoint resumed is at step 2 already (the run would train on to "
            f"train.max_steps=4); give a later step, K > 2")
    assert train.refused_before_start(cfg, True, "ds_configs/zero3.json", 3) is None


def test_rank_without_world_size_is_refused_before_start(tmp_path, monkeypatch, launcher):
    """RANK left in the environment without WORLD_SIZE (no launcher sets one alone) was a TypeError traceback."""
    from vlscale.config import load_config

    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    assert launcher("train").refused_before_start(cfg, False, "ds_configs/zero3.json") == (
        "RANK=0 is set but WORLD_SIZE is not: a launcher (deepspeed, torchrun) sets both; unset RANK to train as "
        "one process")


def test_srun_tasks_without_a_launcher_are_refused_before_start(tmp_path, monkeypatch, launcher, capsys):
    """``srun -n 2 python launchers/train.py`` gives each task SLURM_PROCID / SLURM_STEP_NUM_TASKS but no RANK:
    each trained as a 1-rank run, the first holding output_dir's lock, the other failing on it (measured). Refused
    on every task, naming a launcher to start; one task, a batch script's own process (no SLURM_STEP_NUM_TASKS) and
    a launched rank are not."""
    from vlscale.config import load_config
    from vlscale.engine.distributed import srun_without_launcher

    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert srun_without_launcher() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert srun_without_launcher() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    assert launcher("train").refused_before_start(cfg, False, "ds_configs/zero3.json").startswith(
        "srun started this process as task 1 of 2 without a launcher's RANK / WORLD_SIZE, so each task would train "
        "alone: let srun start one launcher per node, e.g. srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES")
    assert launcher("train").main(["--config", "tiny", f"output_dir={tmp_path / 'run'}"]) == 1
    # about the launch, not a rank: it said "vlscale: rank 0: srun started this process as task 1 of 2"
    assert capsys.readouterr().err.startswith("vlscale: srun started this process as task 1 of 2 without")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert srun_without_launcher() is None


def test_bad_environment_variables_are_refused_before_start(tmp_path, monkeypatch, launcher):
    """A VLSCALE_DIST_TIMEOUT that is no number was a traceback from the process group's set-up, and a bad
    VLSCALE_ADAPTER_BACKEND a traceback from the first forward, after the model was built: one line before
    start-up, naming the variable, and no output_dir made."""
    from vlscale.config import load_config

    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    train = launcher("train")
    for name, raw, message in (
            ("VLSCALE_DIST_TIMEOUT", "5min", "VLSCALE_DIST_TIMEOUT='5min' must be a number of seconds"),
            ("VLSCALE_WATCHDOG_TIMEOUT", "0", "VLSCALE_WATCHDOG_TIMEOUT='0' must be a number of seconds > 0 (inf: never)"),
            ("VLSCALE_ADAPTER_BACKEND", "fast",
             "VLSCALE_ADAPTER_BACKEND='fast' is not valid; choose one of ['auto', 'triton', 'torch']"),
            # a traceback from the process group's set-up (init_distributed reads it on the CPU)
            ("VLSCALE_CPU_FP16", "yes", "VLSCALE_CPU_FP16='yes' must be 0 or 1")):
        with monkeypatch.context() as m:
            m.setenv(name, raw)
            assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") == message
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_file_at_fault_is_refused_before_start(tmp_path, launcher):
    """A --deepspeed file that is not JSON, holds a misspelt key (a nested one too) or disagrees with the run config
    was refused only after start-up (the process group, DeepSpeed's import), by then having made the output_dir: one
    line before start-up, nothing made."""
    from vlscale.config import load_config

    (tmp_path / "comma.json").write_text('{"zero_optimization": {"stage": 3,}}')
    (tmp_path / "typo.json").write_text('{"zero_optimizaton": {"stage": 3}}')
    (tmp_path / "nested.json").write_text('{"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sizee": 9}}')
    (tmp_path / "batch.json").write_text('{"train_batch_size": 64}')
    for zero_stage in ("null", "0"):  # the file is read also where train.zero_stage replaces its stage
        cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"train.zero_stage={zero_stage}"])
        train = launcher("train")
        assert train.refused_before_start(cfg, False, str(tmp_path / "comma.json")).startswith(
            f"DeepSpeedConfigError: {tmp_path / 'comma.json'}: not valid JSON")
        assert train.refused_before_start(cfg, False, str(tmp_path / "typo.json")).startswith(
            f"DeepSpeedConfigError: {tmp_path / 'typo.json'}: unknown top-level key 'zero_optimizaton'")
        assert train.refused_before_start(cfg, False, str(tmp_path / "nested.json")).startswith(
            f"DeepSpeedConfigError: {tmp_path / 'nested.json'}: unknown key "
            f"zero_optimization.stage3_prefetch_bucket_sizee; did you mean 'stage3_prefetch_bucket_size'?")
        assert train.refused_before_start(cfg, False, str(tmp_path / "batch.json")) == (
            f"DeepSpeedConfigError: {tmp_path / 'batch.json'}: train_batch_size=64 conflicts with the run config's "
            f"value 16 (train.micro_batch_size=16 x world_size=1 x train.gradient_accumulation_steps=1); remove the "
            f"key or set it to \"auto\"")
    assert not (tmp_path / "run").exists()


def test_nvme_offload_that_cannot_run_is_refused_before_start(tmp_path, monkeypatch, launcher):
    """ZeRO-Infinity (zero3_nvme.json) without DeepSpeed's async_io op (no libaio), or with an nvme_path that is not a
    folder, was refused after the process group had started: one line before start-up, naming the key at fault
    (and the path), nothing made. The op is only asked whether it can be built (a compile test), not built."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from vlscale.config import load_config

    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    train, nvme = launcher("train"), "ds_configs/zero3_nvme.json"
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path / "swap"))
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    assert train.refused_before_start(cfg, False, nvme).startswith(
        f"DeepSpeedConfigError: {nvme}: zero_optimization.offload_optimizer.device='nvme' (ZeRO-Infinity) needs "
        "DeepSpeed's async_io op")
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    assert train.refused_before_start(cfg, False, nvme).startswith(
        f"DeepSpeedConfigError: {nvme}: zero_optimization.offload_optimizer.nvme_path='{tmp_path / 'swap'}' does not "
        "exist")
    assert not (tmp_path / "run").exists()
    (tmp_path / "swap").mkdir()
    assert train.refused_before_start(cfg, False, nvme) is None


def test_weights_the_build_would_not_find_are_refused_before_start(tmp_path, launcher, monkeypatch):
    """A model.backbone_path or model.vision_pretrained that is not there was found by the model's build, after the
    data had loaded (minutes on a real dataset), and a model.vision=local-dir: folder without its config was a
    FileNotFoundError traceback after start-up: refused before start-up in the build's words, nothing made. A hub
    id is not looked for (HF_HUB_OFFLINE, nothing cached: the load finds it or says so)."""
    from vlscale.config import load_config

    train, out = launcher("train"), f"output_dir={tmp_path / 'run'}"
    for overrides, message in (
            ([f"model.backbone_path={tmp_path / 'nope'}"], f"model.backbone_path='{tmp_path / 'nope'}' does not exist"),
            ([], "model.backbone=tiny-t5 is a random test architecture with no pretrained weights"),
            (["model.pretrained=false", f"model.vision_pretrained={tmp_path / 'clip.pt'}"],
             f"model.vision_pretrained='{tmp_path / 'clip.pt'}': no such file")):
        cfg = load_config("tiny", [out, "model.pretrained=true", *overrides])
        assert train.refused_before_start(cfg, False, "ds_configs/zero3.json").startswith(f"MissingWeights: {message}")
    cfg = load_config("tiny", [out, f"model.vision=local-dir:{tmp_path}"])  # a folder without open_clip_config.json
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") == (
        f"SourceError: model.vision='local-dir:{tmp_path}': cannot read its open_clip config ([Errno 2] No such file "
        f"or directory: '{tmp_path / 'open_clip_config.json'}')")
    cfg = load_config("tiny", [out, f"model.tokenizer={tmp_path / 'tok'}"])  # was found after start-up
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") == (
        f"SourceError: model.tokenizer='{tmp_path / 'tok'}' does not exist (expected a local folder, or a hub id)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()  # weights/tok with weights/ here: a folder missing there, not a hub id to try
    cfg = load_config("tiny", [out, "model.tokenizer=weights/tok"])
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") == (
        f"SourceError: model.tokenizer='weights/tok' does not exist (read from the working directory {tmp_path}: run "
        "from the folder it is relative to, or give its absolute path); not looked up on the hub: its folder 'weights' "
        "is here")
    assert not (tmp_path / "run").exists()
    cfg = load_config("tiny", [out, "model.pretrained=true", "model.backbone_path=nobody/no-such-t5"])
    assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") is None


def test_metrics_hold_one_entry_per_step_and_split(tmp_path, monkeypatch):
    """--resume of a finished run evaluates its last step again: the entry is replaced, not repeated."""
    from types import SimpleNamespace

    from vlscale.engine import trainer

    monkeypatch.setattr(trainer, "_evaluate", lambda run, split, pred: {"vqa": {"vqa_score": run.step / 10}})
    run = SimpleNamespace(step=5, is_main=True, out=tmp_path, writer=None, last_scores=None)
    for step in (5, 10, 10):
        run.step = step
        trainer.run_evaluation(run, "val")
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [(h["step"], h["split"]) for h in history] == [(5, "val"), (10, "val")]


class TorchWriterEngine(FilesEngine):
    """Writes its file with torch.save, as DeepSpeed's TorchCheckpointEngine does; ``fail`` replaces the
    writer's error by one a full disk gives."""

    fail = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
            raise self.fail
        torch.save({"module": self.module.state_dict()}, folder / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368"),
     "RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368")])
def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, error, reason):
    """torch's writer on a full disk raises RuntimeError("... unexpected pos N vs M"); an OSError(ENOSPC)
    where Python writes. Either is the checkpoint's step, the reason, the free space and the folder; the
    previous checkpoint is still 'latest' and whole (its files as written), the temporary folder gone."""
    engine, root = TorchWriterEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3, "loader": {}, "world_size": 1}, rank=0)
    before = {f.name: f.read_bytes() for f in (root / "step3").iterdir()}
    engine.fail = error
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6, "loader": {}, "world_size": 1}, rank=0)
    message = str(failed.value)
    assert f"the checkpoint at step 6 could not be written to {root} ({reason}; " in message
    assert " free on its file system)" in message and "\n" not in message
    assert f"the previous checkpoint {root / 'step3'} is intact" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step3"]
    assert {f.name: f.read_bytes() for f in (root / "step3").iterdir()} == before
    ckpt.check_checkpoint_files(root / "step3")  # every file the size it was written at

    # a collective whose peer's process ended is not dressed up as this rank's failure
    engine.fail = RuntimeError("Connection closed by peer")
    with pytest.raises(RuntimeError, match="^Connection closed by peer$"):
        ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6}, rank=0)


class DeepSpeedWriterEngine(FilesEngine):
    """Writes its file through DeepSpeed's own TorchCheckpointEngine, as a real engine's save does."""

    def __init__(self):
        super().__init__()
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.checkpoint_engine.zipfile_serialization = True  # DeepSpeed's config default

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save(state_dict={"w": torch.zeros(100_000)}, path=str(folder / "optim_states.pt"))


def test_a_file_size_limit_while_deepspeed_writes_names_the_file_and_the_os_reason(tmp_path):
    """A real write refused past this process's file-size limit (``ulimit -f``; Python ignores SIGXFSZ, so the write
    fails with EFBIG): torch's writer said "RuntimeError: ... unexpected pos 576 vs 534", neither the file nor the
    reason; now the OS's reason and the file. The file written whole under no limit loads."""
    import resource

    engine, root = DeepSpeedWriterEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3}, rank=0)
    assert torch.equal(torch.load(root / "step3" / "optim_states.pt")["w"], torch.zeros(100_000))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(ckpt.CheckpointError) as failed:
            ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6}, rank=0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert (f"({os.strerror(27)}: {root / '.tmp-step6' / 'step6' / 'optim_states.pt'}; this process's file-size "
            "limit (ulimit -f) is 100000 bytes)") in str(failed.value)
    assert ckpt.latest_tag(root) == "step3" and sorted(p.name for p in root.iterdir()) == ["latest", "step3"]


def test_deepspeeds_torch_writer_keeps_its_format_and_other_writers_and_errors_are_left_as_they_are(tmp_path):
    """The save that names its file writes the format DeepSpeed's config asks for (the legacy, non-zip one where
    its zipfile serialization is off), raises an error that is no write's as it is (a pickling error, an OSError
    with no errno), and replaces only TorchCheckpointEngine's save: another checkpoint engine writes its own way."""
    import zipfile

    engine, root = DeepSpeedWriterEngine(), tmp_path / "checkpoints"
    engine.checkpoint_engine.zipfile_serialization = False
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3}, rank=0)
    written = root / "step3" / "optim_states.pt"
    assert not zipfile.is_zipfile(written) and torch.equal(torch.load(written)["w"], torch.zeros(100_000))
    save = ckpt._torch_save_naming_its_file(engine.checkpoint_engine)
    for error in (ValueError("not a write's"), OSError("no errno")):
        class Refused:
            def __reduce__(self, error=error):
                raise error

        with pytest.raises(type(error)) as failed:
            save({"x": Refused()}, str(tmp_path / "x.pt"))
        assert failed.value is error

    class OtherWriter:  # DeepSpeed's decoupled or Nebula engines, say
        def save(self, state_dict, path):
            Path(path).write_bytes(b"its own format")

    engine.checkpoint_engine = OtherWriter()
    ckpt.save_checkpoint(engine, tmp_path, 6, {"step": 6}, rank=0)
    assert (root / "step6" / "optim_states.pt").read_bytes() == b"its own format"


ONE_RANK_FAILS_WORKER = r"""
import json, os, sys, time, torch
from vlscale.engine.distributed import init_distributed
d = init_distributed()
import deepspeed
from vlscale.engine import checkpoint as ckpt

out = sys.argv[1]
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                                          "zero_allow_untested_optimizer": True})
ckpt.save_checkpoint(engine, out, 1, {"step": 1}, d.rank)  # the checkpoint to keep

def on_rank_1(obj, name, error):
    real = getattr(obj, name)
    def fail(*args, **kwargs):
        if d.rank == 1:
            raise error
        return real(*args, **kwargs)
    setattr(obj, name, fail)
    return lambda: delattr(obj, name)

no_memory = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 4096 bytes")
cases = {"deepspeed_state": ({"step": 2}, lambda: on_rank_1(engine.optimizer, "state_dict", no_memory)),
         "client_state": ({"step": 2, "loader": {"seen": {1, 2} if d.rank == 1 else [1, 2]}}, None)}
result = {}
for case, (state, patch) in cases.items():
    undo = patch() if patch else None
    t0 = time.perf_counter()
    try:
        ckpt.save_checkpoint(engine, out, 2, state, d.rank)
        result[case] = None
    except Exception as e:
        result[case] = [type(e).__name__, str(e), time.perf_counter() - t0, type(e.__cause__).__name__]
    if undo:
        undo()
result["latest"] = ckpt.latest_tag(out + "/checkpoints")
result["then"] = ckpt.save_checkpoint(engine, out, 3, {"step": 3}, d.rank)  # the ranks are still in step
with open(f"{out}/rank{d.rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.destroy_process_group()
os._exit(0)
"""


def test_a_failure_on_rank_1_alone_is_the_same_checkpoint_error_on_every_rank(tmp_path, preloaded):
    """Rank 1 alone fails inside DeepSpeed's save (its optimizer state cannot be built: out of host memory) or
    writing its client state (a value JSON cannot hold). Neither is a write failure, so the error escaped on rank 1
    alone while rank 0 waited in DeepSpeed's barrier or the ranks' agreement until the process group's timeout
    (the watchdog's 6 minutes by default). Now both ranks raise the same CheckpointError at once, naming rank 1
    and its reason (rank 1's error its cause); the previous checkpoint stays, and the ranks stay in step."""
    script = tmp_path / "worker.py"
    script.write_text(ONE_RANK_FAILS_WORKER)
    proc = preloaded.run(script, [tmp_path], nproc=2, env=dict(preloaded.env, VLSCALE_DIST_TIMEOUT="20"),
                         cwd=ROOT, timeout=90)
    assert proc.returncode == 0, proc.stdout[-6000:]
    root = tmp_path / "checkpoints"
    reasons = {"deepspeed_state": ("RuntimeError", "RuntimeError: DefaultCPUAllocator: not enough memory: you "
                                                   "tried to allocate 4096 bytes"),
               "client_state": ("TypeError", "TypeError: cannot store a set in a JSON checkpoint")}
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, (cause, reason) in reasons.items():
            kind, message, seconds, caused_by = result[case]
            assert kind == "CheckpointError", (rank, case, result[case])
            assert message.startswith(f"the checkpoint at step 2 could not be written to {root} (rank 1: {reason}); "
                                      f"the previous checkpoint {root / 'step1'} is intact"), (rank, case, message)
            assert seconds < 5, (rank, case, seconds)
            assert caused_by == (cause if rank == 1 else "NoneType"), (rank, case, caused_by)
        assert result["latest"] == "step1" and result["then"] == "step3", (rank, result)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step1", "step3"]


def test_a_full_disk_while_saving_the_adapter_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from vlscale.config import load_config

    model, cfg = torch.nn.Linear(2, 2), load_config("tiny")
    ckpt.save_adapter(model, tmp_path / "adapter", cfg, vocab_size=10, extra={"step": 2})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_adapter(model, tmp_path / "adapter", cfg, vocab_size=10, extra={"step": 4})
    message = str(failed.value)
    assert message.startswith(f"the adapter at step 4 could not be written to {tmp_path / 'adapter'} "
                              "(No space left on device; ")
    assert "the previous adapter/ is intact and the temporary folder is removed" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert ckpt.read_adapter_config(tmp_path / "adapter")["step"] == 2


def test_an_adapter_save_that_dies_between_its_renames_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """save_adapter moves adapter/ to adapter.old, renames .tmp-adapter to adapter/, then removes adapter.old. An
    error between the two renames was reported as "no earlier adapter/ exists" with adapter.old left behind; a
    process killed there left no adapter/ at all: evaluate.py said the folder did not exist, and the next save
    failing (a full disk) lost the previous adapter for good. Now the previous one is put back: at once on an
    error, by the next save after a kill; a reader is told where it is and loads nothing stale."""
    import errno

    import safetensors.torch

    from vlscale.config import load_config

    model, cfg, adapter = torch.nn.Linear(2, 2), load_config("tiny"), tmp_path / "adapter"
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 2})
    real_replace = os.replace

    def second_rename_fails(error):
        def replace(src, dst):
            if Path(src).name == ".tmp-adapter" and (tmp_path / "adapter.old").exists():
                raise error
            return real_replace(src, dst)
        return replace

    monkeypatch.setattr(ckpt.os, "replace", second_rename_fails(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(ckpt.CheckpointError, match="the previous adapter/ is intact"):
        ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert ckpt.read_adapter_config(adapter)["step"] == 2

    # killed between the renames (no handler runs): adapter.old and the new .tmp-adapter, no adapter/
    monkeypatch.setattr(ckpt.os, "replace", second_rename_fails(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 4})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-adapter", "adapter.old"]
    with pytest.raises(ckpt.CheckpointError, match=rf"^{adapter} does not exist, but adapter\.old does: a save that "
                                                   r"replaced it was interrupted \(adapter\.old holds the previous "
                                                   r"adapter, of step 2; .*Rename .*adapter\.old to .*adapter to use"):
        ckpt.read_adapter_config(adapter)

    # the next save puts the previous one back before writing: a save that fails keeps it ...
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match="the previous adapter/ is intact"):
        ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert ckpt.read_adapter_config(adapter)["step"] == 2
    # ... and one that succeeds replaces it, leaving nothing beside it
    monkeypatch.undo()
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert ckpt.read_adapter_config(adapter)["step"] == 6


def test_an_eval_report_of_a_task_subset_keeps_the_other_tasks(tmp_path):
    """evaluate.py --tasks vqa into the eval_test/ that train.test_eval wrote kept only vqa's scores
    (the others' predictions stayed, their scores were gone); now the same adapter, split and step merge,
    and a report of another step is replaced."""
    import json

    from vlscale.engine.evaluation import write_eval_report

    adapter = tmp_path / "adapter"
    write_eval_report(tmp_path, adapter, "test", 6, {"vqa": {"vqa_score": 0.1}, "gqa": {"exact_match": 0.2}})
    write_eval_report(tmp_path, adapter, "test", 6, {"vqa": {"vqa_score": 0.3}})
    report = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert report["tasks"] == {"vqa": {"vqa_score": 0.3}, "gqa": {"exact_match": 0.2}}
    write_eval_report(tmp_path, adapter, "test", 9, {"vqa": {"vqa_score": 0.4}})
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["tasks"] == {"vqa": {"vqa_score": 0.4}}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_safetensors_files_take_the_umask_like_every_other_file(tmp_path, umask):
    """safetensors creates its files 0600: an adapter or a feature cache shard shared with colleagues could not
    be read by them, while the JSON beside it could. vlscale.files.save_safetensors gives them 0666 less the
    umask, as open() gives any file; the feature cache writes its shards through it."""
    import os

    from safetensors.torch import load_file

    from vlscale.data.features import FeatureWriter
    from vlscale.files import save_safetensors

    old = os.umask(umask)
    try:
        path = save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors", metadata={"format": "pt"})
        cache = FeatureWriter(tmp_path / "cache", {"vision": "RN50", "pretrained": None, "kind": "grid",
                                                   "dtype": "float32"})
        cache.add("img", torch.zeros(3, 4))
        cache.close()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask
    shards = list((tmp_path / "cache").glob("shard_*.safetensors"))
    assert shards and all(p.stat().st_mode & 0o777 == mode for p in [path, *shards])
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}, "the metadata given is in the file"


def test_a_safetensors_write_the_os_refuses_is_its_oserror_naming_the_file(tmp_path):
    """Past this process's file-size limit (a real EFBIG: Python ignores SIGXFSZ) safetensors raised
    "SafetensorError: Error while serializing: I/O error: File too large (os error 27)", naming no file, and
    a launcher's check of a full disk (an OSError's errno) missed it; nothing of the file is left."""
    import errno
    import resource

    from vlscale.files import save_safetensors

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, limits[1]))
    try:
        with pytest.raises(OSError) as failed:
            save_safetensors({"w": torch.zeros(10_000)}, tmp_path / "a.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert (failed.value.errno, failed.value.filename) == (errno.EFBIG, str(tmp_path / "a.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_error_that_is_not_the_oss_is_raised_as_it_is(tmp_path):
    """Tensors sharing memory are refused by safetensors before any write: its own error, not the OS's."""
    from vlscale.files import save_safetensors

    shared = torch.zeros(4)
    with pytest.raises(RuntimeError, match="share memory"):
        save_safetensors({"a": shared, "b": shared}, tmp_path / "a.safetensors")


@pytest.mark.parametrize("status", [OSError("no /proc"), "Name:\tpython\nPid:\t7\n", "Umask:\t?\n"])
def test_safetensors_files_take_the_umask_where_proc_does_not_say_it(tmp_path, monkeypatch, status):
    """No /proc (macOS), a kernel before 4.7 (no Umask line), a line that does not parse: the umask is read by
    setting it and putting it back, so the file gets 0666 less the umask and the next files still get it."""
    from vlscale.files import save_safetensors

    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) != "/proc/self/status":
            return real_read_text(self, *args, **kwargs)
        if isinstance(status, Exception):
            raise status
        return status

    monkeypatch.setattr(Path, "read_text", read_text)
    old = os.umask(0o027)
    try:
        path = save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        (tmp_path / "after.txt").write_text("x")
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in (path, tmp_path / "after.txt")] == [0o640, 0o640]


def _record_syncs(monkeypatch):
    """os.fsync and os.replace calls as they come: ("fsync", path, size for a file) and ("replace", src, dst)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), st.st_size if not os.path.isdir(
            f"/proc/self/fd/{fd}") else None))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_write_text_atomic_flushes_the_whole_text_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The temporary file holds every byte when it is flushed to disk (a flush of Python's buffer first), the
    rename comes after, then the folder's flush (the rename itself); the folder is made; the path comes back."""
    from vlscale.files import write_text_atomic

    events = _record_syncs(monkeypatch)
    path = tmp_path / "new" / "metrics.json"
    text = '{"step": 3}\n' * 100
    assert write_text_atomic(path, text) == path
    monkeypatch.undo()
    tmp = events[0][1]  # a temporary file beside the path
    assert Path(tmp).parent == path.parent and tmp != str(path)
    assert events == [("fsync", tmp, len(text)), ("replace", tmp, str(path)), ("fsync", str(path.parent), None)]
    assert path.read_text() == text and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_write_text_atomic_that_fails_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk at the flush: the old metrics.json is whole and no temporary file is left beside it (a fixed
    ``metrics.json.tmp`` was left behind, a file per failed write on a disk already full); the error names the
    file (a write's error names none: a launcher's line said the reason without it)."""
    import errno

    from vlscale.files import write_text_atomic

    path = write_text_atomic(tmp_path / "metrics.json", "old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left") as failed:
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert failed.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_text_atomic_whose_rename_fails_raises_the_renames_error_and_leaves_no_temporary_file(tmp_path,
                                                                                                     monkeypatch):
    """A folder where the file goes: the rename's own error (from the temporary file to the path), the temporary
    file removed; where its removal fails too (a folder turned read-only), the write's error is still the one told."""
    from vlscale.files import write_text_atomic

    path = tmp_path / "metrics.json"
    (path / "kept").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as failed:
        write_text_atomic(path, "new")
    assert failed.value.filename2 == str(path) and Path(failed.value.filename).parent == tmp_path
    assert failed.value.filename != str(path) and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]

    def unlink(what):
        raise PermissionError(13, "Permission denied", str(what))

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(IsADirectoryError):
        write_text_atomic(path, "new")


def test_two_writers_of_one_file_at_once_each_write_their_own_temporary_file(tmp_path, monkeypatch):
    """A second process writes the file while the first is between its write and its rename: each completes and
    the file holds one whole text (a shared ``<name>.tmp`` was truncated and renamed away by the second, and the
    first's rename failed with FileNotFoundError)."""
    from vlscale.files import write_text_atomic

    path, real_fsync, calls = tmp_path / "results.json", os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:  # the first writer's flush: the other writes the whole file meanwhile
            write_text_atomic(path, "second")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(path, "first")
    monkeypatch.undo()
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_write_text_atomic_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    """0666 less the umask, as ``open(path, "w")`` gives (a run's metrics shared with a group stay readable by it),
    not the 0600 of the temporary file it is renamed from."""
    from vlscale.files import write_text_atomic

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("metrics.json", "plain.json")] == [0o666 & ~umask] * 2


def test_fsync_tree_flushes_every_file_and_folder_and_leaves_links_alone(tmp_path, monkeypatch):
    """Every file and folder under the checkpoint's temporary folder, itself included; a link (to a file
    elsewhere, or to nothing: a tokenizer link a user kept) is neither followed nor an error."""
    from vlscale.files import fsync_tree

    folder = tmp_path / "step4"
    (folder / "zero" / "empty").mkdir(parents=True)
    (folder / "model_states.pt").write_bytes(b"12345")
    (folder / "zero" / "optim_states.pt").write_bytes(b"123")
    (tmp_path / "elsewhere.txt").write_text("outside")
    (folder / "to_elsewhere").symlink_to(tmp_path / "elsewhere.txt")
    (folder / "zero" / "dangling").symlink_to("/nowhere/spiece.model")
    events = _record_syncs(monkeypatch)
    fsync_tree(folder)
    monkeypatch.undo()
    assert sorted(e[1:] for e in events) == sorted([
        (str(folder / "model_states.pt"), 5), (str(folder / "zero" / "optim_states.pt"), 3),
        (str(folder), None), (str(folder / "zero"), None), (str(folder / "zero" / "empty"), None)])


def test_fsync_tree_closes_every_descriptor_it_opens(tmp_path, monkeypatch):
    """A checkpoint folder of ZeRO-3 shards holds a file per rank and parameter group: flushing each must close
    its descriptor, also where the flush fails (EIO), or a save of many files runs out of them ("Too many open
    files") and a failed one leaks."""
    from vlscale.files import fsync_path, fsync_tree

    folder = tmp_path / "step4"
    (folder / "zero").mkdir(parents=True)
    for i in range(20):
        (folder / "zero" / f"shard_{i}.pt").write_bytes(b"x")
    before = len(os.listdir("/proc/self/fd"))
    fsync_tree(folder)
    assert len(os.listdir("/proc/self/fd")) == before

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        fsync_path(folder / "zero" / "shard_0.pt")
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_folder_another_process_removes_while_it_is_tried_is_no_problem(tmp_path, monkeypatch):
    """Each rank of ``evaluate.py`` on 2 ranks checks the one --out at once, making what is missing to try it and
    removing it again: a rank that had seen the folder there, removed by the other before its next look, refused
    it as "a file, not a folder" (test_evaluate_sharded, once in a slow hour). A file is still one."""
    from vlscale.files import folder_problem

    out = tmp_path / "out"
    out.mkdir()
    real_is_dir = Path.is_dir

    def removed_meanwhile(self):
        if self == out and out.exists():
            out.rmdir()  # the other rank's removal, between this one's two looks
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", removed_meanwhile)
    assert folder_problem(out) is None
    assert not out.exists()  # tried by making it, and removed as this process made it
    monkeypatch.undo()
    out.mkdir()  # removed after this process's looks, before its check of the permissions: no problem either
    real_access = os.access

    def access_after_removal(path, mode):
        if Path(path) == out and out.exists():
            out.rmdir()
        return real_access(path, mode)

    monkeypatch.setattr(os, "access", access_after_removal)
    assert folder_problem(out) is None
    monkeypatch.undo()
    (tmp_path / "f").write_text("")
    assert folder_problem(tmp_path / "f" / "out") == f"{tmp_path / 'f'} is a file, not a folder"
    assert folder_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"


def test_files_are_written_through_a_linked_folder(tmp_path):
    """An output_dir that is a symbolic link (to a scratch disk) is written and flushed through the link."""
    from vlscale.files import fsync_path, write_text_atomic

    (tmp_path / "scratch").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "scratch")
    write_text_atomic(tmp_path / "run" / "run_summary.json", "{}")
    fsync_path(tmp_path / "run")
    assert (tmp_path / "scratch" / "run_summary.json").read_text() == "{}"


def test_an_adapter_path_that_is_not_one_says_what_it_is(tmp_path):
    """evaluate.py --adapter: a path that does not exist, a run's output_dir (its adapter/ one level down)
    and a folder without adapter_config.json each get their own message."""
    with pytest.raises(ckpt.CheckpointError, match=r"/nowhere does not exist \(an adapter directory is a run's "
                                                   r"output_dir/adapter\)"):
        ckpt.read_adapter_config(tmp_path / "nowhere")
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / ckpt.ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path / 'run'} is a run's output_dir, not an adapter "
                                                   rf"directory: pass {tmp_path / 'run' / 'adapter'}$"):
        ckpt.read_adapter_config(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match=r"is not an adapter directory: adapter_config\.json is missing"):
        ckpt.read_adapter_config(tmp_path)


def test_a_checkpoint_file_whose_bytes_changed_is_refused_naming_it(tmp_path):
    """A DeepSpeed file corrupted in place (its size unchanged: a bad sector, a stray write) loaded without
    complaint: torch.load does not check the CRC-32s torch.save stores, and the resumed run trained on
    NaN optimizer state. The resume's check reads them and names the file and the checkpoint before."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = root / f"step{step}"
        folder.mkdir(parents=True)
        torch.save({"module": {"w": torch.randn(4096)}}, folder / "mp_rank_00_model_states.pt")
        sizes = {"mp_rank_00_model_states.pt": (folder / "mp_rank_00_model_states.pt").stat().st_size}
        (folder / "client_state_rank0.json").write_text(json.dumps({"step": step, "zero_stage": 0,
                                                                    "deepspeed_files": sizes}))
    (root / "latest").write_text("step4")
    assert ckpt.check_output_dir(tmp_path, True, 1, verify=True) == "step4"
    f = root / "step4" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64  # NaNs in the tensor's bytes
    f.write_bytes(bytes(data))
    assert ckpt.check_output_dir(tmp_path, True, 1) == "step4"  # the sizes alone do not see it
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_output_dir(tmp_path, True, 1, verify=True)
    msg = str(e.value)
    assert f"{root / 'step4'} is corrupt" in msg and "mp_rank_00_model_states.pt: Bad CRC-32" in msg, msg
    assert f"the previous checkpoint is {root / 'step2'}" in msg
    # files written without CRC-32s (torch's compute_crc32 off) are not refused for lacking them
    from torch.utils.serialization import config

    config.save.compute_crc32 = False
    try:
        torch.save({"module": {"w": torch.randn(4096)}}, f)
    finally:
        config.save.compute_crc32 = True
    state = json.loads((root / "step4" / "client_state_rank0.json").read_text())
    state["deepspeed_files"] = {f.name: f.stat().st_size}
    (root / "step4" / "client_state_rank0.json").write_text(json.dumps(state))
    assert ckpt.check_output_dir(tmp_path, True, 1, verify=True) == "step4"


def test_a_full_disk_outside_a_save_is_one_line_and_cleanup_still_runs(tmp_path, launcher, capsys):
    """A disk filling between saves failed train_log.jsonl's or TensorBoard's next write: a traceback through
    TensorBoard's writer thread, a bare "OSError: [Errno 28] No space left on device" naming no folder, then a
    second traceback from the writer's close() in the cleanup, which skipped the lock's release and the
    process group's teardown. The launcher reports it as one line naming output_dir, the free space and the
    checkpoint left; close() reports the writer's failure and goes on."""
    import errno
    from types import SimpleNamespace

    from vlscale.engine import trainer

    train = launcher("train")
    (tmp_path / "checkpoints" / "step4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step4")
    line = train.disk_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert line.startswith(f"OSError: writing the run's files in output_dir '{tmp_path}' failed (No space left on "
                           f"device; "), line
    assert line.endswith(f"the last checkpoint is {tmp_path / 'checkpoints' / 'step4'} (--resume continues from it "
                         f"once there is room)"), line
    assert train.disk_failure(FileNotFoundError(errno.ENOENT, "No such file or directory", "x"), tmp_path) is None
    assert train.disk_failure(ValueError("not a write"), tmp_path) is None

    class FailingWriter:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    lock = ckpt.lock_output_dir(tmp_path)
    trainer.close(SimpleNamespace(watchdog=None, stop=None, writer=FailingWriter(), lock=lock, out=tmp_path))
    assert lock.closed
    assert "TensorBoard's events could not all be written" in capsys.readouterr().err


TENSORBOARD_FULL_DISK = r"""
import errno, sys
sys.path.insert(0, sys.argv[1])
from torch.utils.tensorboard import SummaryWriter
from vlscale.engine.trainer import quiet_tensorboard_thread_failures
quiet_tensorboard_thread_failures()
writer = SummaryWriter(sys.argv[2])
thread = writer._get_file_writer().event_writer._async_writer._worker
def full(data):
    raise OSError(errno.ENOSPC, "No space left on device")
thread._record_writer.write = full
writer.add_scalar("loss", 1.0, 1)
thread.join(timeout=10)
try:
    writer.close()
except OSError as e:
    print(f"raised again: {e}")
"""


def test_tensorboards_writer_thread_leaves_a_failed_write_to_the_run(tmp_path, preloaded):
    """A full disk under TensorBoard's writer thread printed the thread's own traceback before the launcher's
    one line; the thread keeps the error, and the run's next write raises it (reported once, by the launcher).
    In a process of its own (pytest replaces threading.excepthook), forked from the preloaded server: its
    output is stdout and stderr together, and only the one line is printed to stdout."""
    script = tmp_path / "tensorboard_full_disk.py"
    script.write_text(TENSORBOARD_FULL_DISK)
    proc = preloaded.run(script, [ROOT, tmp_path / "tb"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "raised again: [Errno 28] No space left on device" in proc.stdout
    assert "Traceback" not in proc.stdout and "Exception in thread" not in proc.stdout, proc.stdout


class FakeGPUs:
    """torch.cuda's generator functions over ``n`` fake devices, ``current`` the rank's (set_device's)."""

    def __init__(self, monkeypatch, n: int, current: int, states=None):
        self.n, self.current = n, current
        self.states = states or {i: torch.full((16,), i, dtype=torch.uint8) for i in range(n)}
        for name, fn in (("is_available", lambda: True), ("is_initialized", lambda: True),
                         ("device_count", lambda: self.n), ("current_device", lambda: self.current),
                         ("get_rng_state", self.get), ("set_rng_state", self.set),
                         ("get_rng_state_all", lambda: [self.get(i) for i in range(self.n)]),
                         ("set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])):
            monkeypatch.setattr(torch.cuda, name, fn)

    def index(self, device) -> int:
        i = device if isinstance(device, int) else torch.device(device).index
        i = self.current if i is None else i
        if not 0 <= i < self.n:
            raise IndexError(f"no GPU {i}: {self.n} visible")  # torch.cuda.default_generators[i]
        return i

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()


def test_resume_restores_the_ranks_own_gpu_generator(monkeypatch):
    """The checkpoint keeps the generator of the rank's device and restores it onto the rank's device: every
    visible device's list (get_rng_state_all) failed to restore where fewer GPUs are visible and put another
    device's state on the rank's where ranks map to other local devices."""
    gpus = FakeGPUs(monkeypatch, n=8, current=5)  # rank 5 of one node x 8
    gpus.states[5] = torch.arange(16, dtype=torch.uint8)  # the stream rank 5's dropout advanced
    saved = ckpt._from_jsonable(json.loads(json.dumps(ckpt._to_jsonable(ckpt.rng_state()))))
    gpus = FakeGPUs(monkeypatch, n=4, current=1)  # resumed on 2 nodes x 4: rank 5 is local rank 1
    ckpt.set_rng_state(saved)
    assert torch.equal(gpus.states[1], torch.arange(16, dtype=torch.uint8))
    assert all(torch.equal(gpus.states[i], torch.full((16,), i, dtype=torch.uint8)) for i in (0, 2, 3))


def test_resume_reads_an_earlier_checkpoints_list_of_gpu_generators(monkeypatch):
    """Checkpoints of an earlier vlscale hold every visible device's generator: the rank's own is restored."""
    FakeGPUs(monkeypatch, n=2, current=1)
    saved = dict(ckpt.rng_state(), cuda=[torch.full((16,), k, dtype=torch.uint8) for k in (7, 9)])
    gpus = FakeGPUs(monkeypatch, n=2, current=1)
    ckpt.set_rng_state(saved)
    assert torch.equal(gpus.states[1], torch.full((16,), 9, dtype=torch.uint8))
    assert torch.equal(gpus.states[0], torch.full((16,), 0, dtype=torch.uint8))


def test_latest_naming_a_folder_left_as_old_says_how_to_recover(tmp_path):
    """A save of a step that already exists (a run resumed from before it) moves the old folder to step<N>.old,
    puts the new one in place and removes the old one; a crash between the two renames left latest naming a
    missing folder, and the refusal did not say that step<N>.old holds it."""
    root = tmp_path / "checkpoints"
    (root / "step4.old").mkdir(parents=True)
    (root / ckpt.LATEST).write_text("step4")
    with pytest.raises(ckpt.CheckpointError, match=r"names checkpoint 'step4', which does not exist .*but step4\.old "
                                                   r"does: a save that replaced it was interrupted; rename .*step4\.old "
                                                   r"to step4 to resume"):
        ckpt.latest_tag(root)
    (root / "step4.old").rename(root / "step4")
    assert ckpt.latest_tag(root) == "step4"


def test_a_save_of_the_latest_step_that_fails_between_its_renames_puts_it_back(tmp_path, monkeypatch):
    """A resumed run whose steps were all done saves its last step again (its adapter/ was of an earlier step):
    step<N>/ is moved to step<N>.old, the new one renamed in, the old one removed. An error on the second rename
    said "the previous checkpoint .../step<N> is intact (--resume continues from it)" with step<N> gone and latest
    naming it, so --resume was refused until the user renamed step<N>.old back. Now it is put back at once."""
    import errno

    engine, root = FilesEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3, "run": "first"}, rank=0)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == root / ".tmp-step3" / "step3":  # the second rename
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(ckpt.CheckpointError, match=rf"the previous checkpoint {root / 'step3'} is intact"):
        ckpt.save_checkpoint(engine, tmp_path, 3, {"step": 3, "run": "second"}, rank=0)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step3"]
    assert ckpt.check_output_dir(tmp_path, resume=True, world_size=1) == "step3"
    assert json.loads((root / "step3" / "client_state_rank0.json").read_text())["run"] == "first"


def test_a_new_run_does_not_overwrite_an_adapter_left_as_old(tmp_path):
    """A run whose adapter save was killed between its renames leaves adapter.old and no adapter/; with its
    checkpoints gone (moved away to free space), a new run in that output_dir was allowed, and its first save put
    adapter.old back as adapter/ only to replace it: the earlier run's adapter was deleted without a word."""
    from vlscale.config import load_config

    done = tmp_path / "done"
    ckpt.save_adapter(torch.nn.Linear(2, 2), done / "adapter", load_config("tiny"), vocab_size=10, extra={"step": 2})
    (done / "adapter").rename(done / "adapter.old")
    with pytest.raises(ckpt.CheckpointError, match=r"holds another run's \['adapter\.old'\]"):
        ckpt.check_output_dir(done, resume=False)
    assert ckpt.read_adapter_config(done / "adapter.old")["step"] == 2


def test_the_frozen_fingerprint_covers_batch_norm_statistics_of_frozen_modules_only():
    """Weights that differ in a frozen CLIP's batch-norm statistics alone give other features: the fingerprint
    holds the persistent buffers of modules training none of their own parameters (not a trained batch norm's,
    which change in training, nor non-persistent ones), and an older fingerprint without them still compares."""
    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).requires_grad_(False)
    frozen.register_buffer("scratch", torch.ones(2), persistent=False)
    before = ckpt.frozen_fingerprint(frozen)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "0.weight"} <= set(before)
    assert "scratch" not in before
    with torch.no_grad():
        frozen[1].running_var.mul_(2.0)
    problem = ckpt.frozen_mismatch(before, ckpt.frozen_fingerprint(frozen))
    assert problem and problem.startswith("1.running_var differs")
    older = {k: v for k, v in before.items() if "running" not in k and "batches" not in k}
    assert ckpt.frozen_mismatch(older, ckpt.frozen_fingerprint(frozen)) is None
    frozen[1].requires_grad_(True)  # a trained batch norm: its statistics are the run's, not the backbone's
    assert not {k for k in ckpt.frozen_fingerprint(frozen) if k.startswith("1.")}


# ----------------------------------------------------------------------------- rules a plausible slip would break

def test_frozen_weights_of_the_same_sum_of_squares_but_other_values_are_told_apart():
    """[3, 4] and [5, 0] have one sum of squares (25): the sum of |w| (7 vs 5) is what tells them apart."""
    then, now = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        then.weight.copy_(torch.tensor([[3.0, 4.0]]))
        now.weight.copy_(torch.tensor([[5.0, 0.0]]))
    saved = ckpt.frozen_fingerprint(then.requires_grad_(False))
    problem = ckpt.frozen_mismatch(saved, ckpt.frozen_fingerprint(now.requires_grad_(False)))
    assert problem == "weight differs (sum of squares 25 now, 25 in the checkpointed run; sum of |w| 5 vs 7)"


def test_latest_written_by_hand_with_a_newline_names_its_step(tmp_path):
    """The refusals say "write 'step1' into .../latest"; ``echo step1 > latest`` adds a newline."""
    root = tmp_path / "checkpoints"
    (root / "step1").mkdir(parents=True)
    (root / ckpt.LATEST).write_text("step1\n")
    assert ckpt.latest_tag(root) == "step1"


def test_client_state_survives_json_with_its_types():
    """Client state goes through JSON: tuples (python's RNG state), non-string keys, numpy arrays and tensors
    come back as they went in, with their dtypes."""
    state = {"rng": (3, (1, 2), None), "by_task": {0: "vqa", 1: "gqa"}, "np": np.arange(3, dtype=np.uint32),
             "t": torch.tensor([1, 2], dtype=torch.int64), "f": np.float64(0.5)}
    back = ckpt._from_jsonable(json.loads(json.dumps(ckpt._to_jsonable(state))))
    assert back["rng"] == (3, (1, 2), None) and back["by_task"] == {0: "vqa", 1: "gqa"} and back["f"] == 0.5
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2]
    assert back["t"].dtype == torch.int64 and back["t"].tolist() == [1, 2]


def test_an_adapter_of_a_newer_format_is_refused_naming_the_versions(tmp_path):
    from vlscale.config import load_config

    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter", load_config("tiny"), vocab_size=10)
    path = tmp_path / "adapter" / ckpt.ADAPTER_CONFIG
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=ckpt.ADAPTER_FORMAT_VERSION + 1)))
    with pytest.raises(ckpt.CheckpointError, match=rf"adapter_config\.json: format_version="
                                                   rf"{ckpt.ADAPTER_FORMAT_VERSION + 1} is newer than this vlscale "
                                                   rf"\({ckpt.ADAPTER_FORMAT_VERSION}\)"):
        ckpt.read_adapter_config(tmp_path / "adapter")


def test_an_earlier_bf16_checkpoint_is_checked_against_deepspeeds_bf16_file_names(tmp_path):
    """A checkpoint of an earlier vlscale records no file list: DeepSpeed's names for its stage are expected, the
    optimizer's with the "bf16_" prefix where the run was bf16 (else a whole checkpoint was called incomplete)."""
    step = tmp_path / "step2"
    step.mkdir()
    (step / "client_state_rank0.json").write_text(json.dumps({"step": 2, "zero_stage": 2}))
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (step / name).write_bytes(b"x")
    ckpt.check_checkpoint_files(step, zero_stage=2)
    (step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"incomplete \(zero_pp_rank_0_mp_rank_00_optim_states\.pt is "
                                                   r"missing\)"):
        ckpt.check_checkpoint_files(step, zero_stage=2)


@pytest.mark.parametrize("zero3", [False, True])
def test_a_group_no_step_has_drawn_gets_adams_fresh_state(zero3):
    """A per-task group whose task was never drawn has no optimizer state: it gets what AdamW makes at its first
    step (zero moments of its partition's shape, step 0, the type of the others' step), the others kept."""
    flats = [torch.ones(3), torch.ones(2)]
    states = {0: {"exp_avg": torch.full((3,), 0.1), "exp_avg_sq": torch.full((3,), 0.2), "step": torch.tensor(4.0)}}
    osd = ({"optimizer_state_dict": {"state": states}, "fp32_flat_groups": flats} if zero3 else
           {"base_optimizer_state": {"state": states}, "single_partition_of_fp32_groups": flats})
    ckpt.fill_unstepped_groups({"optimizer_state_dict": osd})
    assert states[0]["step"].item() == 4.0 and torch.equal(states[0]["exp_avg"], torch.full((3,), 0.1))
    assert set(states[1]) == {"exp_avg", "exp_avg_sq", "step"}
    assert torch.equal(states[1]["exp_avg"], torch.zeros(2)) and torch.equal(states[1]["exp_avg_sq"], torch.zeros(2))
    assert isinstance(states[1]["step"], torch.Tensor) and states[1]["step"].item() == 0.0


def test_the_adapter_keeps_persistent_buffers_of_trained_modules_only():
    """A trained module's running statistics go into adapter/; its non-persistent buffers (scratch a state dict
    never holds) and a frozen module's buffers do not."""
    trained, frozen = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2).requires_grad_(False)
    trained.register_buffer("scratch", torch.ones(2), persistent=False)
    model = torch.nn.Sequential(trained, frozen)
    assert [n for n, _ in ckpt.trained_buffers(model)] == ["0.running_mean", "0.running_var", "0.num_batches_tracked"]


def test_an_adapter_of_0_size_tensors_is_refused_as_saved_from_a_partitioned_model(tmp_path):
    """The classic ZeRO-3 "empty adapter": the refusal says where such a file comes from, beside the shapes."""
    from safetensors.torch import save_file

    from vlscale.config import load_config

    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter", load_config("tiny"), vocab_size=10)
    save_file({"weight": torch.zeros(0), "bias": torch.zeros(2)}, str(tmp_path / "adapter" / ckpt.ADAPTER_WEIGHTS))
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the model: 1 shape mismatches .*; 0-size tensors "
                                                   r"saved from a partitioned model \(e\.g\. \['weight'\]\)"):
        ckpt.load_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter")


def test_a_client_state_without_its_step_is_refused_naming_it_and_the_earlier_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in ("step1", "step2"):
        (root / step).mkdir(parents=True)
    (root / "step2" / "client_state_rank0.json").write_text(json.dumps({"loader": {}}))
    with pytest.raises(ckpt.CheckpointError, match=r"step2/client_state_rank0\.json is not a client state \(no "
                                                   r"'step'\); the previous checkpoint is .*step1: write 'step1'"):
        ckpt.read_client_state(root / "step2" / "client_state_rank0.json")


# ----------------------------------------------------------------------------- second round: checkpoints no test built

def test_rank_0s_check_reads_every_ranks_client_state(tmp_path):
    """check_output_dir runs before anything is built: a truncated client state of rank 1 is found there, not by
    rank 1 alone once the others are inside DeepSpeed's collectives; each rank's load reads only its own."""
    step = tmp_path / "checkpoints" / "step2"
    step.mkdir(parents=True)
    for r in range(2):
        (step / f"client_state_rank{r}.json").write_text(json.dumps({"step": 2, "zero_stage": 2, "deepspeed_files": {}}))
    ckpt.check_checkpoint_files(step, zero_stage=2)
    (step / "client_state_rank1.json").write_text('{"step": 2, "zer')
    with pytest.raises(ckpt.CheckpointError, match=r"step2/client_state_rank1\.json is not valid JSON, truncated or "
                                                   r"corrupt .*; no earlier checkpoint is kept"):
        ckpt.check_checkpoint_files(step, zero_stage=2)
    ckpt.check_checkpoint_files(step, zero_stage=2, every_state=False)


def test_an_earlier_zero3_checkpoint_is_known_by_its_file_names(tmp_path):
    """A checkpoint of an earlier vlscale records neither its stage nor its files: a ZeRO-3 one, whose model-states
    file does not read memory-mapped (not a zip archive), is stage 3 by that file's name, and every rank's model
    states are expected as well as its optimizer states."""
    step = tmp_path / "step2"
    step.mkdir()
    for r in range(2):
        (step / f"client_state_rank{r}.json").write_text(json.dumps({"step": 2}))
        (step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"not a zip archive")
        (step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    ckpt.check_checkpoint_files(step, zero_stage=3)
    with pytest.raises(ckpt.CheckpointError, match=r"step2 was written at ZeRO stage 3 and this run is at ZeRO "
                                                   r"stage 2"):
        ckpt.check_checkpoint_files(step, zero_stage=2)
    (step / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"step2 is incomplete \(zero_pp_rank_1_mp_rank_00_model_states"
                                                   r"\.pt is missing\)"):
        ckpt.check_checkpoint_files(step, zero_stage=3)


def test_a_stage_0_checkpoints_trained_set_leaves_out_its_buffers(tmp_path):
    """At stage 0 DeepSpeed's module state holds the trained parameters and every buffer (named in buffer_names):
    a trained batch norm's statistics are not parameters the run trained, so its own checkpoint fits the model."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    buffers = [n for n, _ in model.named_buffers()]
    torch.save({"module": model.state_dict(), "buffer_names": buffers}, tmp_path / "mp_rank_00_model_states.pt")
    assert ckpt.saved_trained_shapes(tmp_path) == {"0.weight": (2, 2), "0.bias": (2,), "1.weight": (2,),
                                                   "1.bias": (2,)}
    ckpt.check_trained_parameters(tmp_path, model)


def test_a_checkpoint_that_trained_a_parameter_of_another_shape_is_refused_naming_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    shapes = [{"weight": torch.Size([2, 3])}, {"bias": torch.Size([2])}]  # DeepSpeed's param_shapes, one dict a group
    torch.save({"param_shapes": shapes}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"trained other parameters than this one does: 1 of another shape "
                                                   r"now \(weight\)\. Its optimizer state does not fit"):
        ckpt.check_trained_parameters(tmp_path, model)
    shapes[0]["weight"] = torch.Size([2, 2])
    torch.save({"param_shapes": shapes}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    ckpt.check_trained_parameters(tmp_path, model)


def test_a_checkpoints_module_state_may_lack_the_frozen_parameters_only(tmp_path):
    """DeepSpeed's custom_load_fn: the frozen parameters are left out of checkpoints (built again); a trainable one
    missing, or a tensor the model does not have, is refused naming it."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    trained = {"1.weight": torch.full((2, 2), 3.0), "1.bias": torch.full((2,), 4.0)}
    ckpt.load_module_state(trained, model)
    assert torch.equal(model[1].weight, trained["1.weight"]) and torch.equal(model[1].bias, trained["1.bias"])
    with pytest.raises(ckpt.CheckpointError, match=r"1 trainable parameters or buffers missing \(e\.g\. "
                                                   r"\['1\.bias'\]\), 0 unexpected"):
        ckpt.load_module_state({"1.weight": trained["1.weight"]}, model)
    with pytest.raises(ckpt.CheckpointError, match=r"0 trainable parameters or buffers missing \(e\.g\. \[\]\), 1 "
                                                   r"unexpected \(e\.g\. \['2\.weight'\]\)"):
        ckpt.load_module_state({**trained, "2.weight": torch.zeros(2, 2)}, model)


def test_a_refused_resume_counts_the_accumulation_and_suggests_only_settings_that_fit(tmp_path):
    """Written by 2 ranks x micro-batch 4 x accumulation 2 (global batch 16): the refusal says so, and the settings
    it suggests give that global batch on the resume's ranks; 3 ranks divide no micro-batch of it, so none is."""
    _written_by(tmp_path, ranks=2, micro=4, accum=2)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_output_dir(tmp_path, True, 4, 8)
    msg = str(e.value)
    assert "written by 2 ranks with a global batch of 16 (2 ranks x micro-batch 4 x accumulation 2)" in msg
    assert ("(train.global_batch_size=16 derives the accumulation on any number of ranks that divides it; or e.g. "
            "train.micro_batch_size=4 train.gradient_accumulation_steps=1 or train.micro_batch_size=2 "
            "train.gradient_accumulation_steps=2)") in msg
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_output_dir(tmp_path, True, 3, 12)
    assert "this run has 3 ranks and a global batch of 12" in str(e.value)
    assert "train.micro_batch_size=" not in str(e.value)
    # ... nor is train.global_batch_size=16 offered as if it worked there (the launcher refuses 16 on 3 ranks)
    assert str(e.value).endswith("(train.global_batch_size=16 derives the accumulation on any number of ranks that "
                                 "divides it; 3 ranks do not: resume on such a number of ranks), so that the data "
                                 "order continues.")


def test_an_empty_latest_is_refused_naming_it(tmp_path):
    """An empty ``latest`` names no checkpoint (it is not the checkpoints/ folder itself)."""
    root = tmp_path / "checkpoints"
    (root / "step1").mkdir(parents=True)
    (root / ckpt.LATEST).write_text("\n")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/latest names checkpoint '', which does not exist in"):
        ckpt.latest_tag(root)


def test_a_latest_naming_a_deleted_checkpoint_points_to_the_one_before_it(tmp_path):
    """step6/ deleted (a user freeing space, a cleanup): the refusal named no way on, unlike a truncated step6/."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step{step}").mkdir(parents=True)
    (root / ckpt.LATEST).write_text("step6")
    with pytest.raises(ckpt.CheckpointError, match=r"names checkpoint 'step6', which does not exist in .*; the "
                                                   r"previous checkpoint is .*step4: write 'step4' into .*latest to "
                                                   r"resume"):
        ckpt.latest_tag(root)


def test_the_earlier_checkpoint_to_resume_is_the_newest_by_step_number(tmp_path):
    """step10 comes after step9 (by number, not as text); a step8.old an interrupted save left is no checkpoint."""
    root = tmp_path / "checkpoints"
    for step in (9, 10, 11):
        (root / f"step{step}").mkdir(parents=True)
    (root / "step8.old").mkdir()
    assert ckpt.earlier_checkpoint_hint(root / "step11") == (
        f"the previous checkpoint is {root / 'step10'}: write 'step10' into {root / ckpt.LATEST} to resume from it")


def test_an_adapter_config_without_its_vocabulary_size_is_refused_naming_the_key(tmp_path):
    """The model to load onto is built with the adapter's vocabulary size: a config without it is named, not
    a KeyError in the build."""
    from vlscale.config import load_config

    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter", load_config("tiny"), vocab_size=10)
    path = tmp_path / "adapter" / ckpt.ADAPTER_CONFIG
    meta = json.loads(path.read_text())
    assert meta["vocab_size"] == 10
    del meta["vocab_size"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=r"adapter_config\.json: key 'vocab_size' is missing"):
        ckpt.read_adapter_config(tmp_path / "adapter")


def test_an_earlier_checkpoints_list_without_the_ranks_device_leaves_its_generator(monkeypatch):
    """An earlier vlscale's list of 2 visible devices' generators, resumed on device 2 (of 4): none is the rank's,
    so its generator is left as it is (not an IndexError), the host's restored."""
    FakeGPUs(monkeypatch, n=2, current=1)
    saved = dict(ckpt.rng_state(), cuda=[torch.full((16,), k, dtype=torch.uint8) for k in (7, 9)])
    gpus = FakeGPUs(monkeypatch, n=4, current=2)
    torch.manual_seed(123)
    ckpt.set_rng_state(saved)
    assert all(torch.equal(gpus.states[i], torch.full((16,), i, dtype=torch.uint8)) for i in range(4))
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_a_frozen_tensor_whose_partition_is_out_on_nvme_is_left_out_of_the_fingerprint():
    """ZeRO-Infinity keeps a partition on NVMe with a placeholder tensor in memory: its sums would be of the
    placeholder (0 here, the saved run's values there), so that tensor is not fingerprinted; the others are."""
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 1).requires_grad_(False)
    for p, status in ((model.weight, "NOT_AVAILABLE"), (model.bias, "AVAILABLE")):
        p.ds_id, p.ds_tensor = 0, torch.ones(1)
        p.ds_tensor.status = SimpleNamespace(name=status)
    assert ckpt.frozen_fingerprint(model) == {"bias": [1.0, 1.0]}


def test_an_adapter_of_a_setting_this_vlscale_no_longer_has_still_compares_the_others():
    """A model.* / peft.* key the model's RunConfig does not know (a retired setting) is not compared."""
    from vlscale.config import load_config

    model = torch.nn.Linear(2, 2)
    model.cfg = load_config("tiny")
    saved = model.cfg.to_dict()
    meta = {"run_config": dict(saved, model=dict(saved["model"], retired_setting=1))}
    assert ckpt.adapter_settings_mismatch(model, meta) is None
    meta["run_config"]["model"]["pool_size"] = saved["model"]["pool_size"] + 1
    assert ckpt.adapter_settings_mismatch(model, meta).startswith("the adapter was trained with model.pool_size=")


def test_a_resumed_schedule_gives_each_group_its_own_lr_at_the_loaded_step():
    """A LambdaLR's lr at the loaded step is each group's base lr times this run's multiplier, set as its last lr
    too; another scheduler's saved last lr is kept."""
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1 - s / 10, lambda s: 1 - s / 20])
    schedule.last_epoch = 4  # as the checkpoint's scheduler state leaves it
    assert ckpt.scheduled_lrs(schedule) == pytest.approx([0.6, 0.4])
    assert schedule.get_last_lr() == pytest.approx([0.6, 0.4])
    other = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    assert ckpt.scheduled_lrs(other) == other.get_last_lr()
    assert ckpt.scheduled_lrs(None) is None


def test_only_a_failed_write_is_told_with_the_free_space(tmp_path):
    """A full disk's reason names the free space where the save wrote (the nearest folder that exists); a
    CheckpointError is vlscale's own refusal, told as it is, even where it quotes a write's reason."""
    full = ckpt.write_failure_reason(OSError(28, "No space left on device", str(tmp_path / "f")), tmp_path / "a" / "b")
    assert full.startswith(f"No space left on device: {tmp_path / 'f'}; ") and full.endswith(" free on its file system")
    # a file too large for its file system (FAT's 4 GiB) under no file-size limit: the free space, not "ulimit -f"
    import resource

    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resource, "getrlimit", lambda which: unlimited)
        too_large = ckpt.write_failure_reason(OSError(27, "File too large", str(tmp_path / "f")), tmp_path)
    assert too_large.startswith(f"File too large: {tmp_path / 'f'}; ")
    assert too_large.endswith(" free on its file system")
    nested = ckpt.CheckpointError("the adapter could not be written to out/adapter (No space left on device)")
    assert ckpt.write_failure_reason(nested, tmp_path) == ("CheckpointError: the adapter could not be written to "
                                                           "out/adapter (No space left on device)")


def test_an_output_dir_that_cannot_be_entered_is_refused_at_start_up(tmp_path, monkeypatch, launcher):
    """Writing a file in a folder needs its execute (search) bit as well as its write bit: an output_dir that is
    writable but not searchable (chmod 600) is refused at start-up (train.output_dir_refused), as a read-only one
    is."""
    from vlscale.config import load_config

    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config("tiny", [f"output_dir={out}"])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK if str(path) == str(out)
                        else real_access(path, mode))
    assert launcher("train").output_dir_refused(cfg.output_dir) == (
        f"CheckpointError: output_dir '{out}' cannot be written (its permissions, or a read-only file system); "
        f"make it writable or choose another output_dir (output_dir=...)")


def test_a_resume_with_another_runs_settings_is_refused_before_start_naming_the_setting(tmp_path, launcher):
    """--resume into an output_dir whose checkpoint another run's settings wrote is refused before start-up with
    the setting that differs as the headline (not what it changes downstream: the checkpoint's files, its batch)."""
    from vlscale.config import load_config, save_config

    out = tmp_path / "run"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / ckpt.LATEST).write_text("step2")
    (out / "checkpoints" / "step2" / "client_state_rank0.json").write_text(json.dumps({"step": 2}))
    save_config(load_config("tiny", [f"output_dir={out}", "train.seed=1"]), out / "run_config.yaml")
    cfg = load_config("tiny", [f"output_dir={out}", "train.seed=2"])
    refusal = launcher("train").refused_before_start(cfg, True, "ds_configs/zero3.json")
    assert refusal.startswith("ConfigError: --resume: train.seed=2 differs from the checkpointed run's train.seed=1 "
                              f"({out / 'run_config.yaml'})"), refusal


def test_the_zero_stage_checked_before_start_is_train_zero_stage_over_the_files(tmp_path, monkeypatch, launcher):
    """A checkpoint is checked against the stage the run trains at: train.zero_stage when set, else the
    DeepSpeed file's (a checkpoint of stage 3 resumed with train.zero_stage=0 and zero3.json is refused)."""
    from vlscale.config import load_config

    seen = []
    monkeypatch.setattr(ckpt, "check_output_dir", lambda *a, **k: seen.append(k["zero_stage"]))
    train = launcher("train")
    for overrides, stage in (([], 3), (["train.zero_stage=0"], 0), (["train.zero_stage=2"], 2)):
        cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", *overrides])
        assert train.refused_before_start(cfg, False, "ds_configs/zero3.json") is None
        assert seen[-1] == stage, (overrides, seen)
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}"])
    assert train.refused_before_start(cfg, False, "ds_configs/zero2.json") is None and seen[-1] == 2


def test_every_write_the_disk_refuses_is_one_line_naming_the_missing_checkpoint(tmp_path, launcher):
    """A full disk, a quota, a read-only remount and a file-size limit each end the run in one line naming
    output_dir; with no checkpoint written yet, the line says so (there is nothing to --resume)."""
    import errno

    train = launcher("train")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        line = train.disk_failure(OSError(code, os.strerror(code)), tmp_path)
        assert line is not None and line.startswith(
            f"OSError: writing the run's files in output_dir '{tmp_path}' failed ({os.strerror(code)}"), (code, line)
        assert line.endswith("; no checkpoint had been written"), line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.parametrize("resume, kept", [(False, "no checkpoint was written"),
                                          (True, "no new checkpoint was written")])
def test_ctrl_c_in_the_first_seconds_is_the_start_up_line_not_a_traceback(resume, kept, signum, tmp_path, monkeypatch,
                                                                          launcher, capsys):
    """Ctrl-C while torch and DeepSpeed are imported (before the run's config is even checked: the first ~4 s of
    `python launchers/train.py`) was a KeyboardInterrupt traceback through an import; now it is start-up's line.
    SIGTERM there ended the process with no line at all (exit 143, measured at 1 s and 6 s): the same line, 143;
    so did SLURM's SIGUSR1 (--signal=USR1@120, a stop request once the run's handler is in): the same line, 138."""
    import vlscale.engine.distributed as distributed

    def interrupted():
        assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN), "it would end start-up silently"
        signal.raise_signal(signum)

    handlers = lambda: [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]  # noqa: E731
    before = handlers()
    train = launcher("train")
    monkeypatch.setattr(train, "refused_before_start", lambda *a: None)  # --resume of nothing: refused
    for where in ("quiet_library_warnings", "init_distributed"):  # torch's imports; the process group's rendezvous
        monkeypatch.setattr(distributed, where, interrupted)
        try:
            ended = train.main(["--config", "tiny", f"output_dir={tmp_path}"] + ["--resume"] * resume)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt would stop pytest itself
            ended = e
        assert ended == 128 + signum, where
        assert capsys.readouterr().err == (f"vlscale: rank 0: aborted ({signum.name} during start-up, before "
                                           f"training began: {kept})\n"), where
        assert handlers() == before  # the launcher's handlers are gone with its main
        monkeypatch.setattr(distributed, where, lambda: None)


@pytest.mark.parametrize("raised, code, said, traceback", [
    ("signal", 128 + 15, "stopped at step 3 (SIGTERM); resume with --resume", False),
    ("stop_after", 0, "stopped at step 3 (--stop-after-steps 3); resume with --resume", False),
    ("config", 1, "vlscale: rank 0: ConfigError: data.tasks: bad", False),
    ("nonfinite", 1, "vlscale: rank 0: NonFiniteLoss: loss is nan", False),
    ("data", 1, "vlscale: rank 0: DataError: gqa example 'q1': image 'x': cannot read image /d/x.jpg", False),
    ("disk", 1, "vlscale: rank 0: OSError: writing the run's files in output_dir", False),
    ("bug", 1, "vlscale: rank 0: KeyError: 'oops'", True),
    # a GPU out of memory (an RTX 3090 another job holds 8.2 GiB of): torch's line, then the planner's command
    ("oom", 1, "vlscale: rank 0: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; this process can "
               "have 15.0 GiB of the GPU's 23.69 GiB, a setting that fits it: python launchers/profile_memory.py "
               "--config tiny --world-size 1 --budget 15.0GiB output_dir={out} (--write-config FILE writes it); "
               "what is kept", True),
    ("peer", 1, "vlscale: rank 0: stopped: another rank's process ended (its own line says why)", False),
    ("abort", 128 + 2, "vlscale: rank 0: aborted (second SIGINT)", False),
    # Ctrl-C while the model loads (Python's handler; vlscale's is installed last): the line was "aborted ()"
    ("startup", 128 + 2, "vlscale: rank 0: aborted (SIGINT during start-up, before training began: no checkpoint "
                         "was written)\n", False),
    # ... of a --resume: its checkpoint is kept ("no checkpoint was written" read as if it were lost)
    ("startup_resumed", 128 + 2, "vlscale: rank 0: aborted (SIGINT during start-up, before training began: no new "
                                 "checkpoint was written; {out}/checkpoints/step2 is intact)\n", False),
    # SIGTERM there (a scheduler's): the process ended with no line (exit 143, measured)
    ("startup_sigterm", 128 + 15, "vlscale: rank 0: aborted (SIGTERM during start-up, before training began: no "
                                  "checkpoint was written)\n", False),
    ("setup", 1, "vlscale: rank 0: DataError: gqa train annotations: /d/train.json is not JSON\n", False),
    ("unwritten", 1, "vlscale: rank 0: DataError: image 'y': cannot read image /d/y.jpg (OSError: truncated) "
                     "(run_summary.json not written: OSError: [Errno 30] Read-only file system)\n", False),
])
def test_how_a_run_ends_sets_its_exit_code_and_its_last_line(raised, code, said, traceback, tmp_path, monkeypatch,
                                                              launcher, capsys):
    """launchers/train.py's documented exit codes and last lines, the run itself stood in for: a signal is
    128 + its number (a second Ctrl-C aborting the run 130 too), --stop-after-steps 0; an error in the run's
    input (a config value, a diverged loss, a full disk) is one line without a traceback, any other error one line
    after its traceback, except a collective failed because another rank's process ended: one line saying so, no
    traceback (that rank's own line says why); --no-progress reaches the run; an error mid-run goes to record_stop
    (run_summary.json saying why, for an input error; one that could not be written is said at the end of the
    error's line), not one before the run exists, and a stop request to run_summary.json's ``stopped``."""
    import errno
    from types import SimpleNamespace

    import vlscale.engine.distributed as distributed
    from vlscale.config import ConfigError
    from vlscale.engine import trainer

    from vlscale.data.real import DataError

    errors = {"config": ConfigError("data.tasks: bad"), "nonfinite": trainer.NonFiniteLoss("loss is nan"),
              "data": DataError("gqa example 'q1': image 'x': cannot read image /d/x.jpg (OSError: truncated)"),
              "disk": OSError(errno.ENOSPC, "No space left on device"), "bug": KeyError("oops"),
              "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              "peer": RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:30461"),
              "signal": trainer.RunStopped(3, "SIGTERM", signal.SIGTERM),
              "stop_after": trainer.RunStopped(3, "--stop-after-steps 3"),
              "abort": KeyboardInterrupt("second SIGINT"),  # a second Ctrl-C: no checkpoint
              "setup": DataError("gqa train annotations: /d/train.json is not JSON"),  # while the run is built
              "startup": KeyboardInterrupt(),
              "startup_resumed": KeyboardInterrupt(),
              "startup_sigterm": None,  # raised as the signal, in setup_run below
              "unwritten": DataError("image 'y': cannot read image /d/y.jpg (OSError: truncated)")}
    setups = []

    runs = []

    def setup_run(cfg, ds_config, dist, resume, show_progress):
        setups.append(show_progress)
        if raised == "startup_resumed":  # the resumed run's (made here: without --resume the launcher refuses it)
            ckpt.save_checkpoint(FilesEngine(), tmp_path / "run", 2, {"step": 2}, rank=0)
        if raised == "startup_sigterm":
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN), "it would end silently"
            signal.raise_signal(signal.SIGTERM)
        if raised in ("setup", "startup", "startup_resumed"):
            raise errors[raised]
        runs.append(SimpleNamespace(out=tmp_path / "run", dist=dist, stopped=None, watchdog=None, writer=None,
                                    lock=None, stop=distributed.StopSignal().install()))  # as setup_run's last
        return runs[-1]

    def train(run, stop_after_steps=None):
        raise errors[raised]

    device = torch.device("cuda:0" if raised == "oom" else "cpu")
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(0, 1, 0, device, "cpu", "gloo"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 29, 25_438_715_904))  # 0.5 GiB free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 29 * 2 ** 29)  # 14.5 GiB held by torch
    monkeypatch.setattr(trainer, "setup_run", setup_run)
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "finish", lambda run, completed=True: None)
    handlers = lambda: [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]  # noqa: E731
    before, real_close = handlers(), trainer.close

    def close(run):  # a SIGTERM in the cleanup ends the process as it did before (it raised a traceback from here)
        assert handlers() == before
        real_close(run)  # the run's StopSignal gives back what it found: start-up's handlers, set again in the close
        assert handlers() == before

    monkeypatch.setattr(trainer, "close", close)
    stops = []  # record_stop writes run_summary.json for the errors of the run's input (mid-run: an unreadable image)

    def record_stop(run, e):
        stops.append(e)
        if raised == "unwritten":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return "; what is kept"

    monkeypatch.setattr(trainer, "record_stop", record_stop)
    assert launcher("train").main(["--config", "tiny", "--no-progress", f"output_dir={tmp_path / 'run'}"]) == code
    out, err = capsys.readouterr()
    assert setups == [False]
    assert stops == ([] if raised in ("signal", "stop_after", "abort", "setup", "startup", "startup_resumed",
                                      "startup_sigterm")
                     else [errors[raised]])
    kept = bool(stops) and raised != "unwritten"  # the error's line ends with what is kept
    assert err.rstrip().endswith("; what is kept") == kept, err
    if isinstance(errors[raised], trainer.RunStopped):  # run_summary.json says why a stop request stopped it too
        assert runs[0].stopped == {"reason": str(errors[raised]), "rank": 0, "checkpoint": None}
    assert said.format(out=tmp_path / "run") in out + err, (out, err)
    assert ("Traceback (most recent call last)" in err) == traceback, err
    assert handlers() == before  # and after main: in the process group's teardown too


def test_a_gpu_run_whose_memory_estimate_exceeds_its_gpu_is_warned_before_the_models_build(tmp_path, monkeypatch,
                                                                                             launcher, capsys):
    """On a GPU, before the model's build, rank 0 compares the planner's estimate of the run's per-rank peak (tiny
    at micro-batch 2048: 3.55 GiB) with what the process can have of its GPU (free + what torch holds): over it, one
    warning line with both figures and the planner's command, and the run starts (the estimate can be high). A run
    that fits, another rank, a CPU run and a DeepSpeed setting the estimate does not model say nothing and start.
    It was learnt from the out-of-memory error, minutes later."""
    from types import SimpleNamespace

    import vlscale.engine.distributed as distributed
    from vlscale.engine import trainer

    built = []  # what was printed before the model's build
    monkeypatch.setattr(trainer, "setup_run",
                        lambda *a, **k: built.append(capsys.readouterr().out) or SimpleNamespace(stop=None))
    monkeypatch.setattr(trainer, "train", lambda run, stop_after_steps=None: None)
    monkeypatch.setattr(trainer, "finish", lambda run, completed=True: None)
    monkeypatch.setattr(trainer, "close", lambda run: None)
    monkeypatch.setattr(distributed, "destroy", lambda: None)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail(f"train.py exited {code}"))  # 2 ranks: not returned
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 ** 29)  # 0.5 GiB held by torch
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["zero_hpz_partition_size"] = 2  # ZeRO++: refused by the estimate
    (tmp_path / "hpz.json").write_text(json.dumps(ds))
    said = []
    for i, (device, rank, free_gib, ds_args) in enumerate([
            ("cuda:0", 0, 1.5, []),  # 3.55 GiB estimated, 2.0 GiB to have: one line
            ("cuda:0", 0, 20.0, []),  # it fits
            ("cuda:0", 0, 3.5, []),  # 3.55 GiB in 4.0 GiB, not with the planner's headroom: its command says "no"
            ("cuda:0", 1, 1.5, []),  # rank 0 says it
            ("cpu", 0, 1.5, []),  # no GPU, nothing checked
            ("cuda:0", 0, 1.5, ["--deepspeed", str(tmp_path / "hpz.json")])]):  # not modelled: no estimate
        dist = distributed.DistInfo(rank, 2, rank, torch.device(device), torch.device(device).type, "gloo")
        monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: dist)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2 ** 30), 25_438_715_904))
        monkeypatch.setenv("RANK", str(rank))
        args = ["--config", "tiny", "--no-progress", *ds_args, f"output_dir={tmp_path / str(i)}",
                "train.micro_batch_size=2048"]
        assert launcher("train").main(args) == 0
        said.append([line for line in built[-1].splitlines() if "memory estimate" in line])
    assert said == [[f"vlscale: warning: this run's memory estimate is 3.55 GiB per GPU (4.15 GiB with the headroom "
                     f"the planner keeps free) and this process can have 2.0 GiB of the GPU's 23.69 GiB: it may run "
                     f"out of memory (it starts: the estimate can be high, docs/scaling.md); a setting that fits: "
                     f"python launchers/profile_memory.py --config tiny --world-size 2 --budget 2.0GiB "
                     f"output_dir={tmp_path / '0'} train.micro_batch_size=2048 (--write-config FILE writes it)"], [],
                    [f"vlscale: warning: this run's memory estimate is 3.55 GiB per GPU (4.25 GiB with the headroom "
                     f"the planner keeps free) and this process can have 4.0 GiB of the GPU's 23.69 GiB: it may run "
                     f"out of memory (it starts: the estimate can be high, docs/scaling.md); a setting that fits: "
                     f"python launchers/profile_memory.py --config tiny --world-size 2 --budget 4.0GiB "
                     f"output_dir={tmp_path / '2'} train.micro_batch_size=2048 (--write-config FILE writes it)"],
                    [], [], []], said


def test_a_new_run_over_another_runs_checkpoint_is_refused_by_the_launcher_naming_its_rank(tmp_path, monkeypatch,
                                                                                           launcher, capsys):
    """``python launchers/train.py`` (no launcher: rank 0) or a rank of torchrun / deepspeed (RANK as the launcher
    set it) into an output_dir holding a run's checkpoint, without --resume: exit 1 before the process group
    starts, with one line naming the rank, the checkpoint and --resume; the checkpoint is left as it was."""
    from vlscale.engine import distributed

    out = tmp_path / "run"
    ckpt.save_checkpoint(FilesEngine(), out, 2, {"step": 2}, rank=0)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: pytest.fail("the process group started"))
    for rank, env in (("0", {}), ("1", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})):
        with monkeypatch.context() as m:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
                m.delenv(name, raising=False)
            for name, value in env.items():
                m.setenv(name, value)
            assert launcher("train").main(["--config", "tiny", "--no-progress", f"output_dir={out}"]) == 1
        assert capsys.readouterr().err == (
            f"vlscale: rank {rank}: CheckpointError: output_dir {str(out)!r} already holds a run's checkpoint "
            f"({out / 'checkpoints' / 'step2'}); pass --resume to continue it or choose another output_dir "
            f"(output_dir=...)\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_trainable_parameters_are_gathered_in_chunks_of_their_full_size(monkeypatch):
    """Under ZeRO-3 each rank holds a 0-size partition of every parameter: the adapter's parameters are gathered a
    chunk at a time, each chunk at most ``chunk_elements`` elements of the full shapes (one parameter larger than
    that alone), so no rank holds more than one chunk beyond its partition; every parameter comes back whole, once."""
    sizes = {"a": 4, "b": 6, "c": 3, "big": 12, "d": 4, "e": 5}
    model = torch.nn.Module()
    full = {}
    for name, n in sizes.items():
        full[name] = torch.arange(n, dtype=torch.float32) + 100 * len(full)
        p = torch.nn.Parameter(torch.empty(0))  # the rank's partition, as ZeRO-3 leaves it
        p.ds_id, p.ds_shape = len(full), (n,)
        setattr(model, name, p)
    model.frozen = torch.nn.Parameter(torch.ones(50), requires_grad=False)  # never gathered for the adapter
    names = {id(p): n for n, p in model.named_parameters()}
    chunks = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank):
        chunks.append([names[id(p)] for p in params])
        for p in params:
            p.data = full[names[id(p)]].clone()
        yield
        for p in params:
            p.data = torch.empty(0)

    monkeypatch.setattr(ckpt, "_gathered", gathered)
    out = ckpt.gather_trainable_state_dict(model, rank=0, chunk_elements=10)
    assert chunks == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert list(out) == list(sizes) and all(torch.equal(out[n], full[n]) for n in sizes)
    assert all(p.numel() == 0 for n, p in model.named_parameters() if n != "frozen")  # partitions again
    chunks.clear()
    assert ckpt.gather_trainable_state_dict(model, rank=1, chunk_elements=10) == {}  # a collective: still gathers
    assert chunks == [["a", "b"], ["c"], ["big"], ["d", "e"]]


def test_a_parameter_the_gather_left_partitioned_is_not_saved(monkeypatch):
    """A gather that leaves a parameter as its partition (0 elements here; ZeRO-3's own gather is what fills it) is
    refused naming the parameter, instead of writing a 0-size tensor into adapter/."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(0))
    model.w.ds_id, model.w.ds_shape = 1, (4, 2)
    monkeypatch.setattr(ckpt, "_gathered", lambda params, modifier_rank: contextlib.nullcontext())
    with pytest.raises(ckpt.CheckpointError, match=r"^parameter w gathered to shape \(0,\), expected \(4, 2\); refusing "
                                              r"to save a partitioned tensor$"):
        ckpt.gather_trainable_state_dict(model, rank=0)


def test_the_out_of_memory_command_carries_the_run_s_own_settings_and_a_budget_rounded_down(monkeypatch, launcher):
    """The planner's command for a rank out of GPU memory: the run's --deepspeed file and world size (no --config:
    the embedded default, as the run), and a --budget rounded down (15.08 GiB -> 15.0: rounded up, the plan would
    not fit); any other error, no command."""
    from types import SimpleNamespace

    train = launcher("train")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(14.08 * 2 ** 30))
    args = train.parse_args(["--deepspeed", "ds_configs/zero2.json", "train.micro_batch_size=2"])
    dist = SimpleNamespace(device=torch.device("cuda:1"), world_size=2)
    assert train.out_of_memory_advice(torch.OutOfMemoryError("CUDA out of memory"), args, dist) == (
        "; this process can have 15.0 GiB of the GPU's 80.00 GiB, a setting that fits it: python "
        "launchers/profile_memory.py --deepspeed ds_configs/zero2.json --world-size 2 --budget 15.0GiB "
        "train.micro_batch_size=2 (--write-config FILE writes it)")
    assert train.out_of_memory_advice(RuntimeError("CUDA error"), args, dist) == ""


@pytest.mark.parametrize("raised", [None, "stop_after"])
def test_the_launcher_hands_resume_and_stop_after_steps_to_the_run_and_says_whether_it_completed(
        raised, tmp_path, monkeypatch, launcher):
    """--resume reaches setup_run and --stop-after-steps K the loop; run_summary.json says ``completed: true``
    after a run trained to its end, ``false`` after one stopped at step K (finish(completed=False))."""
    from types import SimpleNamespace

    import vlscale.engine.distributed as distributed
    from vlscale.engine import trainer

    seen = {}

    def setup_run(cfg, ds_config, dist, resume, show_progress):
        seen["resume"] = resume
        return SimpleNamespace(out=tmp_path / "run", dist=dist, stop=None)

    def train(run, stop_after_steps=None):
        seen["stop_after_steps"] = stop_after_steps
        if raised:
            raise trainer.RunStopped(stop_after_steps, "--stop-after-steps")

    train_module = launcher("train")
    monkeypatch.setattr(train_module, "refused_before_start", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(0, 1, 0, torch.device("cpu"), "cpu", "gloo"))
    monkeypatch.setattr(trainer, "setup_run", setup_run)
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "finish", lambda run, completed=True: seen.update(
        completed=completed, stopped=getattr(run, "stopped", None)))
    monkeypatch.setattr(trainer, "close", lambda run: None)
    assert train_module.main(["--config", "tiny", "--no-progress", "--resume", "--stop-after-steps", "5",
                              f"output_dir={tmp_path / 'run'}"]) == 0
    stopped = {"reason": "stopped at step 5 (--stop-after-steps)", "rank": 0, "checkpoint": None} if raised else None
    assert seen == {"resume": True, "stop_after_steps": 5, "completed": raised is None, "stopped": stopped}


def test_auto_resume_resumes_only_an_output_dir_with_a_checkpoint_and_keeps_resume_s_checks(tmp_path, monkeypatch,
                                                                                             launcher):
    """--auto-resume, a requeued job's one command: a new run where output_dir has no checkpoints/latest (none yet,
    or a run killed before its first save), --resume where it has one: the check before start-up gets resume=True,
    so --resume's refusals hold (an unreadable 'latest' too)."""
    from vlscale.engine import trainer

    out = tmp_path / "run"
    train = launcher("train")
    seen = []
    monkeypatch.setattr(train, "refused_before_start", lambda cfg, resume, *a: seen.append(resume) or "refused")
    monkeypatch.setattr(trainer, "setup_run", lambda *a, **k: pytest.fail("the run started"))
    argv = ["--config", "tiny", "--no-progress", "--auto-resume", f"output_dir={out}"]
    assert train.main(argv) == 1
    (out / "checkpoints" / "step2").mkdir(parents=True)  # killed while it wrote its first save: no 'latest'
    assert train.main(argv) == 1
    assert train.main(argv + ["--resume"]) == 1  # --resume as given: refused there, not a new run
    (out / "checkpoints" / ckpt.LATEST).write_text("step2")
    assert train.main(argv) == 1
    assert seen == [False, False, True, True]
    import vlscale.engine.distributed as distributed

    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: pytest.fail("start-up"))
    with pytest.raises(pytest.fail.Exception, match="start-up"):  # a config that does not load: said after start-up
        train.main(argv + ["train.no_such_key=1"])


def test_a_resume_told_to_stop_at_a_step_already_done_is_refused_by_the_launcher(tmp_path, monkeypatch, launcher,
                                                                                 capsys):
    """main hands --stop-after-steps to the check before start-up: one line, exit 1, no run started."""
    from vlscale.engine import trainer

    out = tmp_path / "run"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / ckpt.LATEST).write_text("step2")
    monkeypatch.setattr(ckpt, "check_output_dir", lambda *a, **k: "step2")
    monkeypatch.setattr(trainer, "check_settings_early", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "setup_run", lambda *a, **k: pytest.fail("the run started"))
    assert launcher("train").main(["--config", "tiny", "--no-progress", "--resume", "--stop-after-steps", "2",
                                   f"output_dir={out}", "train.max_steps=4"]) == 1
    assert capsys.readouterr().err == (
        "vlscale: rank 0: --stop-after-steps 2: the checkpoint resumed is at step 2 already (the run would train on "
        "to train.max_steps=4); give a later step, K > 2\n")


# ----------------------------------------------------------------------------- third round: what no test pinned

def test_a_zero3_partitioned_buffer_is_refused_not_saved():
    """adapter/ holds rank 0's trained buffers whole: one ZeRO-3 partitioned (a slice, or a 0-size placeholder) is
    refused naming it, as a partitioned parameter is; other ranks take no copies."""
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(3.0)
    saved = ckpt.gather_trained_buffers(bn)
    assert torch.equal(saved["running_mean"], torch.full((2,), 3.0)) and ckpt.gather_trained_buffers(bn, 1) == {}
    bn.running_var.ds_id, bn.running_var.ds_shape = 7, (2,)
    with pytest.raises(ckpt.CheckpointError, match=r"^buffer running_var is ZeRO-partitioned \(shape \(2,\), full "
                                                   r"\(2,\)\); refusing to save a partition$"):
        ckpt.gather_trained_buffers(bn)


def test_a_save_after_one_killed_between_its_renames_leaves_no_old_adapter(tmp_path):
    """A save killed between its renames leaves adapter.old (and a half .tmp-adapter); the next save that succeeds
    puts it back first and replaces it: nothing is left beside the new adapter/ (a stale adapter.old stayed, and
    made every later run in that output_dir refused as holding another run's adapter)."""
    from vlscale.config import load_config

    model, cfg, adapter = torch.nn.Linear(2, 2), load_config("tiny"), tmp_path / "adapter"
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 2})
    adapter.rename(tmp_path / "adapter.old")
    (tmp_path / ".tmp-adapter").mkdir()
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert ckpt.read_adapter_config(adapter)["step"] == 4


def test_an_adapter_folder_without_its_config_beside_an_old_one_is_named_as_it_is(tmp_path):
    """adapter.old is named as the interrupted save's only where adapter/ itself is gone: an adapter/ that exists
    without its config is said to be no adapter directory, not to be missing."""
    (tmp_path / "adapter.old").mkdir()
    (tmp_path / "adapter.old" / ckpt.ADAPTER_CONFIG).write_text(json.dumps({"step": 2}))
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ckpt.CheckpointError, match=rf"^{tmp_path / 'adapter'} is not an adapter directory: "
                                                   rf"adapter_config\.json is missing$"):
        ckpt.read_adapter_config(tmp_path / "adapter")


def test_a_frozen_tensor_tied_under_two_names_is_left_out_of_the_checkpoint_under_both():
    """A frozen embedding shared with the output layer (one parameter, two state-dict names) is frozen under both
    names: checkpoints/ holds neither copy, and loading the module state back misses neither."""
    model = torch.nn.Module()
    model.embed, model.proj = torch.nn.Embedding(4, 3), torch.nn.Linear(3, 3)
    model.head = torch.nn.Linear(3, 4, bias=False)
    model.head.weight = model.embed.weight
    model.embed.requires_grad_(False)
    assert ckpt.frozen_names(model) == {"embed.weight", "head.weight"}
    with ckpt.frozen_left_out(model):
        saved = model.state_dict()
    assert sorted(saved) == ["proj.bias", "proj.weight"]
    assert "head.weight" in model.state_dict(), "only while open"
    ckpt.load_module_state(saved, model)


def test_a_group_whose_saved_state_is_empty_gets_adams_fresh_state_too():
    """At stages 1-2 DeepSpeed's file holds an empty state for a group no step has drawn (the universal conversion
    then failed on KeyError: 'exp_avg'), not no entry: it is filled as an absent one is."""
    flats = [torch.ones(3), torch.ones(2)]
    states = {0: {"exp_avg": torch.full((3,), 0.1), "exp_avg_sq": torch.full((3,), 0.2), "step": torch.tensor(4.0)},
              1: {}}
    ckpt.fill_unstepped_groups({"optimizer_state_dict": {"base_optimizer_state": {"state": states},
                                                         "single_partition_of_fp32_groups": flats}})
    assert set(states[1]) == {"exp_avg", "exp_avg_sq", "step"} and states[1]["step"].item() == 0.0
    assert torch.equal(states[1]["exp_avg"], torch.zeros(2)) and torch.equal(states[1]["exp_avg_sq"], torch.zeros(2))


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_silences_the_universal_conversion_and_a_failure_still_shows_it(tmp_path, monkeypatch, capsys,
                                                                                     quiet):
    """A --no-progress resume on another number of ranks showed DeepSpeed's conversion anyway: its print()s and tqdm
    bars (it has no quiet option). Quiet, it says nothing, unless it fails: then what it said comes before the error."""
    import tqdm
    from deepspeed.checkpoint import ds_to_universal

    def main(args, fail=False):
        print(f"Converting DeepSpeed checkpoint in {args.input_folder}")
        for _ in tqdm.tqdm(range(3)):
            pass
        if fail:
            raise KeyError("param_shapes")

    monkeypatch.setattr(ds_to_universal, "main", main)
    assert ckpt._to_universal(tmp_path, "step2", 0, quiet=quiet) == tmp_path / ".universal-step2"
    out, err = capsys.readouterr()
    assert ("Converting DeepSpeed checkpoint in" in out, "3/3" in err) == (not quiet, not quiet), (out, err)
    monkeypatch.setattr(ds_to_universal, "main", lambda args: main(args, fail=True))
    with pytest.raises(KeyError, match="param_shapes"):
        ckpt._to_universal(tmp_path, "step2", 0, quiet=quiet)
    out, err = capsys.readouterr()
    assert "Converting DeepSpeed checkpoint in" in out + err and "3/3" in out + err, (out, err)


def test_the_universal_format_is_needed_on_another_number_of_ranks_only(tmp_path):
    step = tmp_path / "checkpoints" / "step2"
    assert not ckpt.needs_universal(tmp_path, 2), "no checkpoint: nothing to convert"
    step.mkdir(parents=True)
    for r in range(2):
        (step / f"client_state_rank{r}.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("step2")
    assert not ckpt.needs_universal(tmp_path, 2)
    assert ckpt.needs_universal(tmp_path, 1) and ckpt.needs_universal(tmp_path, 4)


def test_a_new_run_over_a_checkpoint_is_told_to_pass_resume(tmp_path):
    """Without --resume an output_dir whose checkpoint ``latest`` names is refused as holding a run's checkpoint,
    naming it and --resume; the checkpoint is left as it was."""
    import re

    engine, root = FilesEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, rank=0)
    with pytest.raises(ckpt.CheckpointError, match="^" + re.escape(
            f"output_dir {str(tmp_path)!r} already holds a run's checkpoint ({root / 'step2'}); pass --resume to "
            f"continue it or choose another output_dir (output_dir=...)") + "$"):
        ckpt.check_output_dir(tmp_path, resume=False)
    assert ckpt.check_output_dir(tmp_path, resume=True, world_size=1) == "step2"


def test_checkpoints_of_stages_1_and_2_resume_at_either_and_no_other(tmp_path):
    """Stages 1 and 2 write the same optimizer files: a stage-1 checkpoint resumes at stage 2 and the other way
    round; stage 0 and stage 3 are refused naming both stages."""
    step = tmp_path / "step2"
    step.mkdir()
    for saved, other in ((1, 2), (2, 1)):
        (step / "client_state_rank0.json").write_text(json.dumps({"step": 2, "zero_stage": saved,
                                                                  "deepspeed_files": {}}))
        ckpt.check_checkpoint_files(step, zero_stage=other)
        for refused in (0, 3):
            with pytest.raises(ckpt.CheckpointError, match=rf"step2 was written at ZeRO stage {saved} and this run is "
                                                           rf"at ZeRO stage {refused}: "):
                ckpt.check_checkpoint_files(step, zero_stage=refused)


def test_an_earlier_stage_0_checkpoint_expects_no_optimizer_files(tmp_path):
    """A checkpoint of an earlier vlscale (no stage, no file list recorded) at stage 0, as its model-states file
    says, is whole in that one file: no ZeRO optimizer file is asked for; without that file it is incomplete."""
    step = tmp_path / "step2"
    step.mkdir()
    (step / "client_state_rank0.json").write_text(json.dumps({"step": 2}))
    torch.save({"module": {"w": torch.ones(2)}, "ds_config": {"zero_optimization": {"stage": 0}}},
               step / "mp_rank_00_model_states.pt")
    ckpt.check_checkpoint_files(step, zero_stage=0)
    with pytest.raises(ckpt.CheckpointError, match=r"written at ZeRO stage 0 and this run is at ZeRO stage 2"):
        ckpt.check_checkpoint_files(step, zero_stage=2)
    (step / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"step2 is incomplete \(mp_rank_00_model_states\.pt is missing\)"):
        ckpt.check_checkpoint_files(step, zero_stage=0)


def test_a_checkpoint_file_cut_short_is_refused_naming_both_sizes(tmp_path):
    """Rank 0's client state records the size of each DeepSpeed file as written: a file of another size now (cut
    short by a copy, a full disk) is refused before DeepSpeed reads it, with the earlier checkpoint to use."""
    engine, root = FilesEngine(), tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt.save_checkpoint(engine, tmp_path, step, {"step": step}, rank=0)
    f = root / "step4" / "model_states.pt"
    written = f.stat().st_size
    f.write_bytes(f.read_bytes()[:3])
    with pytest.raises(ckpt.CheckpointError, match=rf"step4 is incomplete \(model_states\.pt is 3 bytes, {written} "
                                                   rf"when written\); the previous checkpoint is .*step2"):
        ckpt.check_output_dir(tmp_path, resume=True, world_size=1)


def test_the_next_save_removes_a_checkpoint_left_as_old(tmp_path):
    """A save of a step again killed after its renames, before removing the folder it replaced, leaves
    ``step<N>.old`` (a whole checkpoint's size, which no pruning counts): the next save removes it."""
    import shutil

    engine, root = FilesEngine(), tmp_path / "checkpoints"
    ckpt.save_checkpoint(engine, tmp_path, 2, {"step": 2}, rank=0)
    shutil.copytree(root / "step2", root / "step2.old")
    ckpt.save_checkpoint(engine, tmp_path, 4, {"step": 4}, rank=0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step2", "step4"]


def test_rank_0_records_deepspeeds_files_not_the_other_ranks_client_states(tmp_path):
    """The other ranks write their client states while rank 0 lists the folder: the sizes rank 0 records (which a
    resume checks) are DeepSpeed's files only, so a client state it saw half written is not refused later."""

    class OtherRankWriting(FilesEngine):
        def save_checkpoint(self, save_dir, tag, *args, **kwargs):
            super().save_checkpoint(save_dir, tag, *args, **kwargs)
            (Path(save_dir) / tag / "client_state_rank1.json").write_text('{"st')  # rank 1, half way

    ckpt.save_checkpoint(OtherRankWriting(), tmp_path, 2, {"step": 2}, rank=0)
    state = json.loads((tmp_path / "checkpoints" / "step2" / "client_state_rank0.json").read_text())
    assert list(state["deepspeed_files"]) == ["model_states.pt"]


class LoadingEngine:
    """What load_checkpoint asks of a one-rank DeepSpeed engine at stage 0: its load records its arguments, moves
    the scheduler to the checkpoint's step (3) and returns the folder it read (None: DeepSpeed found nothing)."""

    def __init__(self, found=True):
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.AdamW([{"params": [self.module.weight], "lr": 1.0},
                                            {"params": [self.module.bias], "lr": 2.0}])
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [lambda s: 1 / (s + 1), lambda s: 0.5])
        self.device, self.found, self.loads = "cpu", found, []

    def train_batch_size(self):
        return 4

    def zero_optimization_stage(self):
        return 0

    def zero_optimization(self):
        return False

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loads.append((load_dir, tag, kwargs))
        self.lr_scheduler.last_epoch = 3
        return (str(Path(load_dir) / tag) if self.found else None), {}


def _draws():
    import random

    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_resume_restores_the_ranks_generators_position_and_schedule(tmp_path):
    """load_checkpoint on one rank: DeepSpeed loads the module, optimizer and scheduler states (the module's through
    load_module_state); the rank's python, numpy and torch generators continue where the save left them; the
    client state (the sampler's position) comes back without its RNG; each group's lr is the schedule's at the
    loaded step. On more ranks than wrote it (the same global batch), a rank without a state of its own takes rank
    0's position and generators seeded from the step and its rank: the same on every resume, another per rank."""
    import random

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = {"step": 3, "loader": {"sampler": {"global_batch_size": 4, "position": 12}, "accum": 1}}
    ckpt.save_checkpoint(FilesEngine(), tmp_path, 3, state, rank=0)
    after_save = _draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    engine = LoadingEngine()
    loaded = ckpt.load_checkpoint(engine, tmp_path, rank=0, world_size=1)
    assert _draws() == after_save
    assert {k: loaded[k] for k in state} == state and loaded["tag"] == "step3" and "rng" not in loaded
    (load_dir, tag, kwargs), = engine.loads
    assert (load_dir, tag) == (str(tmp_path / "checkpoints"), "step3")
    assert kwargs["load_optimizer_states"] and kwargs["load_lr_scheduler_states"] and kwargs["load_module_strict"]
    assert kwargs["custom_load_fn"] is ckpt.load_module_state
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1.0 / 4, 2.0 * 0.5]

    seen = {}
    for rank in (1, 2, 1):
        loaded = ckpt.load_checkpoint(LoadingEngine(), tmp_path, rank=rank, world_size=4)
        assert loaded["loader"]["sampler"]["position"] == 12
        seen.setdefault(rank, []).append(_draws())
    assert seen[1][0] == seen[1][1] != seen[2][0] and after_save not in (seen[1][0], seen[2][0])


def test_a_resume_refuses_other_frozen_weights_and_a_load_deepspeed_did_not_do(tmp_path):
    ckpt.save_checkpoint(FilesEngine(), tmp_path, 3, {"step": 3, "frozen": {"w": [2.0, 2.0]},
                                                      "loader": {"sampler": {"global_batch_size": 4}}}, rank=0)
    ckpt.load_checkpoint(LoadingEngine(), tmp_path, rank=0, world_size=1, frozen={"w": [2.0, 2.0]})
    with pytest.raises(ckpt.CheckpointError, match=r"^--resume: the frozen weights built now are not those of the run "
                                                   r"in .*step3: w differs \(sum of squares 2\.5 now, 2 in the "
                                                   r"checkpointed run"):
        ckpt.load_checkpoint(LoadingEngine(), tmp_path, rank=0, world_size=1, frozen={"w": [2.5, 2.0]})
    with pytest.raises(ckpt.CheckpointError, match=r"^DeepSpeed could not load .*checkpoints/step3$"):
        ckpt.load_checkpoint(LoadingEngine(found=False), tmp_path, rank=0, world_size=1)


def test_the_adapter_records_the_models_vocabulary_over_the_tokenizers_length(tmp_path):
    """A model whose embedding has more rows than its tokenizer (a checkpoint folder larger than the tokenizer keeps
    its rows) is rebuilt from adapter_config.json with the vocab_size given, not the tokenizer's length; without
    one, the tokenizer's length is it. The tokenizer's identity is recorded beside it."""
    from vlscale.config import load_config

    class Tokenizer:
        name_or_path, pad_token_id, eos_token_id, bos_token_id = "spm", 0, 1, None

        def __len__(self):
            return 10

    cfg = load_config("tiny")
    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "a", cfg, tokenizer=Tokenizer(), vocab_size=12)
    meta = ckpt.read_adapter_config(tmp_path / "a")
    assert meta["vocab_size"] == 12 and meta["tokenizer"] == {
        "class": "Tokenizer", "name_or_path": "spm", "length": 10, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": None}
    ckpt.save_adapter(torch.nn.Linear(2, 2), tmp_path / "b", cfg, tokenizer=Tokenizer())
    assert ckpt.read_adapter_config(tmp_path / "b")["vocab_size"] == 10


def test_a_ranks_writes_after_its_first_failure_are_skipped(tmp_path):
    """_Writes keeps a rank's first failure and skips its later guarded writes (no more files onto a full disk);
    the rank still goes on to agree with the others, which is then the first failure's reason."""
    import errno

    writes, calls = ckpt._Writes(tmp_path), []

    def write(i):
        calls.append(i)
        if i == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    guarded = writes.guard(write)
    guarded(1)
    guarded(2)
    assert calls == [1] and writes.error.errno == errno.ENOSPC
    assert writes.agree().startswith("No space left on device; ")


def test_a_checkpoint_that_trained_many_other_parameters_names_three_and_says_there_are_more(tmp_path):
    step = tmp_path / "step2"
    step.mkdir()
    torch.save({"module": {f"p{i}": torch.zeros(2) for i in range(5)}, "buffer_names": []},
               step / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"trained other parameters than this one does: 5 trained then, "
                                                   r"frozen or absent now \(p0, p1, p2, \.\.\.\)"):
        ckpt.check_trained_parameters(step, torch.nn.Module())


@pytest.mark.parametrize("world, exits", [(1, []), (2, [1])])
def test_a_failed_rank_of_several_leaves_through_os_exit(world, exits, tmp_path, monkeypatch, launcher, capsys):
    """A rank whose run failed leaves through os._exit(code) when there are other ranks (a peer may be gone or
    inside a collective: the process group's teardown would wait on it), after its line naming its rank; one
    process ends through the teardown and returns its code."""
    from types import SimpleNamespace

    import vlscale.engine.distributed as distributed
    from vlscale.config import ConfigError
    from vlscale.engine import trainer

    def train(run, stop_after_steps=None):
        raise ConfigError("data.tasks: bad")

    left = []
    monkeypatch.setattr(os, "_exit", left.append)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(world - 1, world, 0, torch.device("cpu"), "cpu", "gloo"))
    monkeypatch.setattr(distributed, "destroy", lambda: left.append("destroy"))
    monkeypatch.setattr(trainer, "setup_run", lambda *a, **k: SimpleNamespace(out=tmp_path / "run", stop=None))
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "close", lambda run: None)
    assert launcher("train").main(["--config", "tiny", "--no-progress", f"output_dir={tmp_path / 'run'}"]) == 1
    assert left[:1] == (exits or ["destroy"])
    assert f"vlscale: rank {world - 1}: ConfigError: data.tasks: bad" in capsys.readouterr().err


@pytest.mark.parametrize("world, raised, calls", [
    (2, "signal", ["finish", "close", "barrier", 128 + signal.SIGTERM]),
    (2, "error", ["close", 1]),
    (1, "signal", ["finish", "close", "destroy"])])
def test_a_rank_stopped_by_a_signal_waits_for_the_others_before_it_leaves(world, raised, calls, tmp_path, monkeypatch,
                                                                          launcher):
    """Ranks stopped together by a signal leave together (a barrier after their checkpoint, run_summary.json and
    TensorBoard's close): DeepSpeed's launch.py terminates the ranks left once one exits non-zero, and that second
    signal aborts a rank at once, rank 0 maybe still writing run_summary.json. A failed rank does not wait (a peer
    may be gone); one process ends through the teardown."""
    from types import SimpleNamespace

    import vlscale.engine.distributed as distributed
    from vlscale.config import ConfigError
    from vlscale.engine import trainer

    def train(run, stop_after_steps=None):
        raise trainer.RunStopped(3, "SIGTERM", signal.SIGTERM) if raised == "signal" else ConfigError("bad")

    left = []

    def _exit(code):
        left.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", _exit)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda *a, **k: distributed.DistInfo(0, world, 0, torch.device("cpu"), "cpu", "gloo"))
    monkeypatch.setattr(distributed, "destroy", lambda: left.append("destroy"))
    monkeypatch.setattr(distributed, "barrier", lambda: left.append("barrier"))
    monkeypatch.setattr(trainer, "setup_run", lambda cfg, ds, dist, *a, **k: SimpleNamespace(
        out=tmp_path / "run", dist=dist, stop=None))
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "finish", lambda run, completed=True: left.append("finish"))
    monkeypatch.setattr(trainer, "close", lambda run: left.append("close"))
    with contextlib.suppress(SystemExit):
        launcher("train").main(["--config", "tiny", "--no-progress", f"output_dir={tmp_path / 'run'}"])
    assert left == calls


def test_an_adapter_replaced_while_it_is_read_is_refused_not_loaded_as_the_earlier_step(tmp_path, monkeypatch):
    """evaluate.py --adapter RUN/adapter while RUN trains: its next save renames a new adapter/ into place between
    the reads of adapter_config.json and of the weights, and the weights of step 2 loaded as step 1's (same names,
    same shapes). The weights now record their step, and one of another step than the config read is refused."""
    from vlscale.config import load_config

    cfg, adapter, model = load_config("tiny"), tmp_path / "adapter", torch.nn.Linear(2, 2)
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 1})
    read = ckpt.read_adapter_config

    def then_the_run_saves(path):
        meta = read(path)
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 2})
        return meta

    monkeypatch.setattr(ckpt, "read_adapter_config", then_the_run_saves)
    with pytest.raises(ckpt.CheckpointError, match="holds the weights of step 2, but the adapter_config.json read "
                                                   "with them is of step 1: the run writing"):
        ckpt.load_adapter(torch.nn.Linear(2, 2), adapter)
    monkeypatch.setattr(ckpt, "read_adapter_config", read)
    meta = read(adapter)  # evaluate.py's load_run_config, before the model is built ...
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 3})  # ... while the run saves again
    with pytest.raises(ckpt.CheckpointError, match="holds the weights of step 3, but the adapter_config.json read "
                                                   "with them is of step 2"):
        ckpt.load_adapter(torch.nn.Linear(2, 2), adapter, meta=meta)
    loaded = torch.nn.Linear(2, 2)
    assert ckpt.load_adapter(loaded, adapter)["step"] == 3 and torch.equal(loaded.weight, model.weight)


def test_the_memory_warning_and_the_planner_agree_on_what_fits(monkeypatch, launcher):
    """memory_warning's estimate is of the run's world size (tiny under ZeRO-3: 1.6 MB a rank less over 8 ranks than
    on 1, which the test above's 3.55 GiB at micro-batch 2048 does not show), and it warns where the planner, given
    the budget its command names, finds the run's own setting does not fit (peak + the headroom it keeps free over
    the budget). It compared the peak alone with what the process can have: tiny at micro-batch 2048 (3.55 GiB) on
    4.0 GiB was no warning while `profile_memory.py --budget 4.0GiB` said "no" for that setting (measured)."""
    import argparse
    from types import SimpleNamespace

    import vlscale.profiling.analytic as analytic
    from vlscale.config import load_config
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.profiling.planner import plan

    cfg = load_config("tiny")
    ds = build_deepspeed_config(str(ROOT / "ds_configs" / "zero3.json"), cfg, 8, device_type="cuda")
    seen, estimate = [], analytic.estimate_memory
    monkeypatch.setattr(analytic, "estimate_memory", lambda c, w, *a, **k: seen.append(w) or estimate(c, w, *a, **k))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 ** 20)
    dist = SimpleNamespace(device=torch.device("cuda:0"), world_size=8)
    args = argparse.Namespace(config=None, deepspeed=None, overrides=[])
    warned, fits = [], []
    for gib in (0.6, 0.5):  # tiny's 30 MiB + 0.53 GiB of headroom fit 0.6 GiB; 30 MiB + 0.525 GiB do not fit 0.5
        have = analytic.parse_size(f"{gib}GiB") + 2 ** 20  # the command's --budget: rounded down to 0.1 GiB
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (have - 2 ** 20, 25_438_715_904))
        warned.append(launcher("train").memory_warning(cfg, ds, args, dist))
        fits += [o.fits for o in plan(cfg, f"{gib}GiB", 8, ds_file=str(ROOT / "ds_configs" / "zero3.json"),
                                      stages=(3,), offloads=("none",), checkpointing=(False,), micro_batches=(16,),
                                      precisions=("fp32",))]
    assert seen == [8, 8] and fits == [True, False]
    assert warned[0] is None and warned[1].startswith("warning: this run's memory estimate is ") and (
        "the planner keeps free) and this process can have 0.5 GiB of the GPU's 23.69 GiB" in warned[1]), warned


def test_the_memory_warning_is_the_planners_verdict_at_its_budgets_edge(monkeypatch, launcher):
    """The planner's "fits" is peak + headroom <= the budget its command names (what the process can have, rounded
    down to 0.1 GiB): a peak that fills that budget exactly is no warning, one byte more is, though it would fit the
    unrounded 0.6 GiB + 60 MiB the process has."""
    import argparse
    from types import SimpleNamespace

    import vlscale.profiling.analytic as analytic
    from vlscale.profiling.planner import default_headroom

    budget = analytic.parse_size("0.6GiB")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (budget + 59 * 2 ** 20, 25_438_715_904))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 ** 20)
    dist = SimpleNamespace(device=torch.device("cuda:0"), world_size=2)
    args = argparse.Namespace(config=None, deepspeed=None, overrides=[])
    said = []
    for peak in (budget - default_headroom(budget), budget - default_headroom(budget) + 1):
        monkeypatch.setattr(analytic, "estimate_memory", lambda *a, **k: SimpleNamespace(components={"peak": peak}))
        said.append(launcher("train").memory_warning(None, {}, args, dist))
    assert said[0] is None and "this process can have 0.6 GiB of the GPU's" in said[1], said


def test_a_fault_of_the_memory_estimate_is_said_not_dropped(monkeypatch, launcher):
    """memory_warning caught every exception of the estimate and said nothing: a setting the estimate does not model
    (a ValueError, ZeRO++ in the test above) is still no warning, and a fault of its own (a TypeError) one line
    naming it; the run starts either way (it does not need the estimate)."""
    import argparse
    from types import SimpleNamespace

    import vlscale.profiling.analytic as analytic

    dist = SimpleNamespace(device=torch.device("cuda:0"), world_size=2)
    args = argparse.Namespace(config=None, deepspeed=None, overrides=[])
    said = []
    for error in (ValueError("zero_optimization.zero_hpz_partition_size=2: ..."),
                  TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")):
        monkeypatch.setattr(analytic, "estimate_memory", lambda *a, **k: (_ for _ in ()).throw(error))
        said.append(launcher("train").memory_warning(None, {}, args, dist))
    assert said == [None, "the memory estimate failed (TypeError: unsupported operand type(s) for +: 'int' and "
                          "'NoneType'): this run's memory is not checked against its GPU"], said


def test_weights_saved_before_they_recorded_their_step_load_with_their_configs_step(tmp_path):
    """An adapter saved before its weights recorded their step (their metadata: the format alone) loads as it did,
    and so do weights of a step with a config of none: only a recorded step other than the config's is refused."""
    from safetensors.torch import save_file

    from vlscale.config import load_config

    cfg, adapter, model = load_config("tiny"), tmp_path / "adapter", torch.nn.Linear(2, 2)
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 1})
    save_file(dict(model.state_dict()), str(adapter / ckpt.ADAPTER_WEIGHTS), metadata={"format": ckpt.ADAPTER_FORMAT})
    loaded = torch.nn.Linear(2, 2)
    assert ckpt.load_adapter(loaded, adapter)["step"] == 1 and torch.equal(loaded.weight, model.weight)
    meta = {k: v for k, v in ckpt.read_adapter_config(adapter).items() if k != "step"}  # save_adapter's caller's
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 2})  # ... replaced by a run's save
    assert ckpt.load_adapter(loaded, adapter, meta=meta) is meta  # no step to compare: it loads, as it did


def test_load_trained_model_loads_only_the_weights_of_the_config_its_caller_read(tmp_path, monkeypatch):
    """evaluate.py and Predictor read adapter_config.json once (load_run_config) and load_trained_model checks both
    of its loads against it: weights saved since are refused before the model's build (the check on the meta
    device) and after it (saved while it built), not loaded as the step read."""
    import vlscale.modeling.vl_model as vl_model
    from vlscale.config import load_config
    from vlscale.predict import load_trained_model

    cfg, adapter, model = load_config("tiny"), tmp_path / "adapter", torch.nn.Linear(2, 2)
    ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 1})
    meta = ckpt.read_adapter_config(adapter)
    monkeypatch.setattr(vl_model, "build_model", lambda *a, **k: torch.nn.Linear(2, 2))

    def build():  # the run saves again while the model builds
        ckpt.save_adapter(model, adapter, cfg, vocab_size=10, extra={"step": 2})
        return torch.nn.Linear(2, 2)

    with pytest.raises(ckpt.CheckpointError, match="holds the weights of step 2, but the adapter_config.json read "
                                                   "with them is of step 1"):
        load_trained_model(cfg, meta, adapter, "cpu", torch.float32, check_frozen=False, build=build)
    with pytest.raises(ckpt.CheckpointError, match="holds the weights of step 2, but the adapter_config.json read "
                                                   "with them is of step 1"):
        load_trained_model(cfg, meta, adapter, "cpu", torch.float32, check_frozen=False,
                           build=lambda: pytest.fail("the model was built"))
