"""How a run was made, for whoever reads its output_dir months later: run_summary.json's and adapter_config.json's
``provenance`` (a list: the run's start, then each ``--resume`` that ran under other software, git commit, ranks or
devices, or on changed data files, with ``from_step``).

One segment: ``versions`` (python, torch and its CUDA, transformers, deepspeed, open_clip, safetensors, numpy,
vlscale), ``git`` (``commit`` and ``dirty``, tracked files only, of the checkout vlscale was imported from; null where
that is not a git checkout or git is not there), ``argv`` (this process's), ``launcher_argv`` (the parent's command
line under a launcher: torchrun's, deepspeed's), ``world_size``, ``devices`` (device name -> ranks on it) and, for
``data.source=real``, ``data_files``: each annotation / subtitle file the run reads, with its size, mtime_ns and
sha256 (0.23 s per 100 MB here, once per start: a fraction of the time the loader takes to parse the same file).
A run started from a trained adapter (``train.init_adapter``) has ``init_adapter`` in its first segment: the folder,
the step the adapter was saved at, and its weights file's size, mtime_ns and sha256 (:func:`init_adapter`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {"transformers": "transformers", "deepspeed": "deepspeed", "open_clip": "open_clip_torch",
                 "safetensors": "safetensors", "numpy": "numpy"}
RESUME_MAY_DIFFER = ("argv", "launcher_argv")  # a --resume's command line always differs


def versions() -> dict:
    import torch

    import vlscale

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for key, dist in DISTRIBUTIONS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    out["vlscale"] = vlscale.__version__
    return out


def git_state(root: Path = CHECKOUT) -> Optional[dict]:
    """{commit, dirty} of the git checkout at ``root`` (dirty: a tracked file differs from the commit); None where
    ``root`` is no checkout (an installed wheel), git is missing or fails. ~5 ms (two git calls)."""
    if not (root / ".git").exists():
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def launcher_argv(launched: bool) -> Optional[list]:
    """The command line of the launcher that started this process (its parent's), or None without a launcher
    (``launched``: the DistInfo's) or where it cannot be read (no /proc)."""
    if not launched:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]  # each argument ends with a NUL


def device_name(device) -> str:
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def file_fingerprint(path) -> dict:
    """Path, size, mtime_ns and sha256 of a file the run read; a file gone or unreadable since (moved during the
    start-up) is recorded with the OS's reason, not a traceback that ends a run whose data is already read."""
    path = Path(path).resolve()
    try:
        st = path.stat()
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # as evaluation's _adapter_sha256
    except OSError as e:
        return {"path": str(path), "error": e.strerror or str(e)}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def data_files(cfg) -> Optional[list]:
    """Fingerprints of the annotation and subtitle files a ``data.source=real`` run reads (train, val, and test with
    train.test_eval); None for the synthetic world or an HF dataset (its name is in the run's settings)."""
    if cfg.data.source != "real" or cfg.data.hf_dataset:
        return None
    from vlscale.data.real import annotation_path, subtitle_path
    from vlscale.data.tasks import get_task

    paths = []
    for task in cfg.data.tasks:
        for split in ("train", "val", "test") if cfg.train.test_eval else ("train", "val"):
            paths.append(annotation_path(cfg, task, split))  # read by the loader and check_eval_data before this
        if get_task(task).modality == "video":
            paths.append(subtitle_path(cfg, task))
    return [file_fingerprint(p) for p in dict.fromkeys(p for p in paths if p is not None)]


def init_adapter(folder, meta: dict) -> dict:
    """What a warm start began from: the adapter ``folder`` (absolute), the step its ``meta`` (adapter_config.json)
    records, and :func:`file_fingerprint`'s size, mtime_ns and sha256 of its weights file."""
    from vlscale.engine.checkpoint import ADAPTER_WEIGHTS

    folder = Path(folder).resolve()
    weights = file_fingerprint(folder / ADAPTER_WEIGHTS)
    return {"path": str(folder), "step": meta.get("step"), **{k: v for k, v in weights.items() if k != "path"}}


def provenance(cfg, dist, devices: list, started_from: Optional[dict] = None) -> dict:
    """This process's segment (rank 0 calls it with its DistInfo; ``devices``: every rank's :func:`device_name`).
    ``started_from``: :func:`init_adapter`'s record of the ``train.init_adapter`` the run started from, taken before
    its load (None: it started from none, or resumes: the segment has no ``init_adapter`` then, and a resume's is not
    compared with the start's)."""
    segment = {"versions": versions(), "git": git_state(), "argv": [sys.executable, *sys.argv],
               "launcher_argv": launcher_argv(dist.launched), "world_size": dist.world_size,
               "devices": dict(Counter(devices)), "data_files": data_files(cfg)}
    if started_from is not None:
        segment["init_adapter"] = started_from
    return segment


def with_resumed(earlier: Optional[list], segment: dict, step: int) -> list:
    """The run's segments after a --resume at ``step``: ``earlier`` (the checkpoint's; None before this record
    existed), and this one where it differs from the last in anything but its command line."""
    earlier = list(earlier or [])
    last = earlier[-1] if earlier else None
    same = last is not None and all(last.get(k) == v for k, v in segment.items() if k not in RESUME_MAY_DIFFER)
    return earlier if same else [*earlier, {**segment, "from_step": step}]


def print_version_note(meta: dict, who: str) -> Optional[str]:
    """Print (from ``who``, to stderr) and return a note where the adapter (adapter_config.json's ``meta``) was trained
    with another vlscale version or torch major than this process runs; None where it matches or does not say (an
    adapter of before this record). A note, not a refusal: the adapter's load checks what must match."""
    segments = meta.get("provenance") or []
    if not segments:
        return None
    then = segments[-1].get("versions") or {}
    now = versions()
    differ = []
    if then.get("vlscale") and then["vlscale"] != now["vlscale"]:
        differ.append(f"vlscale {then['vlscale']} (this is {now['vlscale']})")
    if then.get("torch") and then["torch"].split(".")[0] != now["torch"].split(".")[0]:
        differ.append(f"torch {then['torch']} (this is {now['torch']})")
    if not differ:
        return None
    note = f"{who}: note: the adapter was trained with {' and '.join(differ)}"
    print(note, file=sys.stderr, flush=True)
    return note
