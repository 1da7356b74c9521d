"""Files written whole: a reader (another rank, a resumed run, a user's script) never sees half of one."""

from __future__ import annotations

from pathlib import Path


def write_text_atomic(path, text: str) -> Path:
    """``text`` into ``path`` (its folder made) through a temporary file beside it, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
