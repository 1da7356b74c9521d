"""Files written whole: a reader (another rank, a resumed run, a user's script) never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def write_text_atomic(path, text: str) -> Path:
    """``text`` into ``path`` (its folder made) through a temporary file beside it, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _umask() -> int:
    try:  # Linux: read without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file``, with the permissions any other file gets (0666 less the umask): the
    library creates its files 0600, so an adapter or a feature cache shared with colleagues could not be read
    by them."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path
